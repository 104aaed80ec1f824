"""Parsing client → server commands (docs/api.md): every command, CallOption,
errors instead of silent drops, size limit, secret redaction."""

from __future__ import annotations

import json

from twisted.trial import unittest

from activecall.protocol import commands as c
from activecall.protocol import events as ev


def parse(obj) -> c.Command:
    return c.parse_command(json.dumps(obj))


class EveryCommandTests(unittest.TestCase):
    def test_each_command_parses_into_its_dataclass(self):
        table = [
            ({"command": "invite", "option": {}}, c.Invite(option=c.CallOption())),
            ({"command": "accept", "option": {"codec": "pcmu"}}, c.Accept(option=c.CallOption(codec="pcmu"))),
            ({"command": "reject", "reason": "busy", "code": 486}, c.Reject(reason="busy", code=486)),
            ({"command": "ringing", "earlyMedia": True, "ringtone": "r.wav"},
             c.Ringing(earlyMedia=True, ringtone="r.wav")),
            ({"command": "tts", "text": "hi", "playId": "p1", "endOfStream": True, "waitInputTimeout": 10000},
             c.Tts(text="hi", playId="p1", endOfStream=True, waitInputTimeout=10000)),
            ({"command": "play", "url": "http://x/a.wav", "autoHangup": True},
             c.Play(url="http://x/a.wav", autoHangup=True)),
            ({"command": "interrupt", "graceful": True}, c.Interrupt(graceful=True)),
            ({"command": "pause"}, c.Pause()),
            ({"command": "resume"}, c.Resume()),
            ({"command": "hangup", "reason": "done", "headers": {"X-Why": "done"}},
             c.Hangup(reason="done", headers={"X-Why": "done"})),
            ({"command": "refer", "caller": "sip:a@x", "callee": "sip:b@x", "options": {"timeout": 10}},
             c.Refer(caller="sip:a@x", callee="sip:b@x", options=c.ReferOption(timeout=10))),
            ({"command": "mute", "trackId": "t"}, c.Mute(trackId="t")),
            ({"command": "unmute"}, c.Unmute()),
            ({"command": "history", "speaker": "user", "text": "hello"}, c.History(speaker="user", text="hello")),
            ({"command": "sendDtmf", "digits": "12*#a", "duration": 80}, c.SendDtmf(digits="12*#A", duration=80)),
            ({"command": "acceptTransfer"}, c.AcceptTransfer()),
            ({"command": "rejectTransfer", "code": 486}, c.RejectTransfer(code=486)),
            ({"command": "bridge", "target": "call-2"}, c.Bridge(target="call-2")),
            ({"command": "unbridge"}, c.Unbridge()),
            ({"command": "warmTransfer", "callee": "sip:h@x", "summary": "VIP", "moh": "hold.wav", "timeout": 20},
             c.WarmTransfer(callee="sip:h@x", summary="VIP", moh="hold.wav", timeout=20)),
            ({"command": "pauseRecording"}, c.PauseRecording()),
            ({"command": "resumeRecording"}, c.ResumeRecording()),
            ({"command": "sendMessage", "body": "hi", "contentType": "text/plain"},
             c.SendMessage(body="hi", contentType="text/plain")),
        ]
        for frame, want in table:
            got = parse(frame)
            self.assertEqual(got, want, frame)
            self.assertEqual(got.to_dict()["command"], frame["command"])
            self.assertEqual(parse(got.to_dict()), got)
        self.assertEqual({type(w) for _, w in table}, set(c.COMMANDS.values()))

    def test_defaults_and_helpers(self):
        tts = parse({"command": "tts", "text": "x"})
        self.assertFalse(tts.streaming)
        self.assertFalse(tts.endOfStream)
        self.assertFalse(tts.base64)
        self.assertIsNone(tts.playId)
        self.assertEqual(parse({"command": "play", "url": "u.wav"}).effective_play_id, "u.wav")
        self.assertEqual(parse({"command": "play", "url": "u.wav", "playId": "p"}).effective_play_id, "p")
        self.assertEqual(parse({"command": "hangup", "initiator": "caller"}).clean_reason, "caller")
        self.assertEqual(parse({"command": "hangup"}).clean_reason, "system")

    def test_start_is_the_guides_name_for_invite(self):
        cmd = parse({"command": "start", "option": {
            "codec": "pcm", "sampleRate": 16000, "playbook": "assistant.md",
            "vad": {"type": "silero", "samplerate": 16000, "speechPadding": 300, "silencePadding": 500}}})
        self.assertIsInstance(cmd, c.Invite)
        self.assertEqual(cmd.option.sampleRate, 16000)
        self.assertEqual(cmd.option.playbook, "assistant.md")
        self.assertEqual(cmd.option.vad.speechPadding, 300)

    def test_the_guides_sip_invite(self):
        cmd = parse({"command": "invite", "option": {
            "caller": "sip:agent@active-call.com", "callee": "sip:1001@pbx.example.com:5060", "codec": "pcmu",
            "playbook": "customer_service.md",
            "asr": {"provider": "openai", "model": "whisper-1", "language": "zh-CN"},
            "tts": {"provider": "openai", "model": "tts-1", "voice": "alloy"},
            "sip": {"enableSrtp": True}}})
        self.assertEqual(cmd.option.asr.model, "whisper-1")
        self.assertEqual(cmd.option.tts.voice, "alloy")
        self.assertIs(cmd.option.sip.enableSrtp, True)

    def test_unknown_extra_fields_on_commands_are_ignored(self):
        self.assertEqual(parse({"command": "pause", "whatever": [1, 2]}), c.Pause())
        self.assertEqual(parse({"command": "tts", "text": "x", "bogus": 1}), c.Tts(text="x"))

    def test_null_is_the_same_as_left_out(self):
        self.assertEqual(parse({"command": "tts", "text": "x", "playId": None}), c.Tts(text="x"))


class CallOptionTests(unittest.TestCase):
    FULL = {
        "caller": "sip:a@x", "callee": "sip:b@x", "offer": "v=0", "codec": "g722", "denoise": True,
        "recorder": {"recorderFile": "{id}", "samplerate": 16000, "ptime": 200},
        "vad": {"type": "silero", "voiceThreshold": 0.5, "silenceTimeout": 5000},
        "asr": {"provider": "tencent", "secretKey": "k", "extra": {"a": "b"}, "startWhenAnswer": True},
        "tts": {"provider": "aliyun", "speed": 1.2, "volume": 5, "subtitle": True},
        "mediaPass": {"url": "ws://m", "inputSampleRate": 16000, "outputSampleRate": 8000, "packetSize": 3200},
        "handshakeTimeout": "30s", "enableIpv6": False, "inactivityTimeout": 50,
        "sip": {"username": "u", "password": "p", "hangup_headers": {"X-A": "1"}, "extract_headers": ["X-T"]},
        "extra": {"k": "v"},
        "ambiance": {"path": "bed.wav", "duckLevel": 0.1},
        "eou": {"type": "x", "timeout": 500},
        "realtime": {"provider": "openai", "turnDetection": {"type": "server_vad"}, "tools": [{"name": "f"}]},
        "subscribe": True,
    }

    def test_full_option_round_trips_exactly(self):
        opt = parse({"command": "invite", "option": self.FULL}).option
        self.assertEqual(opt.to_dict(), self.FULL)
        self.assertEqual(opt.sip.extract_headers, ("X-T",))
        self.assertEqual(opt.mediaPass.packetSize, 3200)
        self.assertEqual(opt.handshakeTimeout, "30s")

    def test_unknown_keys_are_kept_everywhere_for_the_cdr(self):
        raw = {"futureKey": {"x": 1}, "tts": {"provider": "p", "stability": 0.3}}
        opt = c.CallOption.from_dict(raw)
        self.assertEqual(opt.to_dict(), raw)
        self.assertEqual(opt.tts.other_keys, {"stability": 0.3})

    def test_api_key_is_an_alias_of_secret_key(self):
        opt = c.CallOption.from_dict({"realtime": {"apiKey": "sk"}, "eou": {"apiKey": "e"}})
        self.assertEqual(opt.realtime.secretKey, "sk")
        self.assertEqual(opt.eou.secretKey, "e")

    def test_sdp_is_the_guides_spelling_of_offer(self):
        self.assertEqual(c.CallOption.from_dict({"sdp": "v=0"}).sdp_offer, "v=0")
        self.assertEqual(c.CallOption.from_dict({"offer": "o", "sdp": "s"}).sdp_offer, "o")

    def test_second_invite_inherits_left_out_fields(self):
        earlier = c.CallOption.from_dict({"asr": {"provider": "a"}, "tts": {"provider": "t"}, "codec": "pcmu"})
        later = c.CallOption.from_dict({"tts": {"provider": "t2"}, "callee": "sip:x@y"})
        merged = later.merged_over(earlier)
        self.assertEqual(merged.asr.provider, "a")
        self.assertEqual(merged.tts.provider, "t2")
        self.assertIsNone(merged.codec)  # codec is not inherited
        self.assertIs(later.merged_over(None), later)

    def test_tts_option_layers_over_the_call_option(self):
        call = c.SynthesisOption(provider="aliyun", speaker="a", speed=1.0)
        cmd = c.SynthesisOption(speaker="b")
        layered = cmd.layered_over(call)
        self.assertEqual((layered.provider, layered.speaker, layered.speed), ("aliyun", "b", 1.0))


class ErrorTests(unittest.TestCase):
    def assertCommandError(self, frame, *fragments, command=None):
        result = c.decode_command(frame)
        self.assertIsInstance(result, c.CommandError, frame)
        for fragment in fragments:
            self.assertIn(fragment, result.message)
        self.assertEqual(result.command, command)
        return result

    def test_malformed_json(self):
        self.assertCommandError('{"command": "tts", ', "malformed JSON")
        self.assertCommandError(b"\xff\xfe", "malformed JSON")

    def test_not_an_object_or_no_command(self):
        self.assertCommandError("[1,2]", "must be a JSON object, got an array")
        self.assertCommandError('{"text":"x"}', 'missing "command"')
        self.assertCommandError('{"command":5}', 'missing "command"')

    def test_unknown_command_names_the_known_ones(self):
        self.assertCommandError('{"command":"candidate"}', "unknown command 'candidate'", "sendDtmf", "invite",
                                command="candidate")

    def test_wrong_field_types_name_the_field(self):
        # the original's own docs example sends graceful as a string
        self.assertCommandError('{"command":"interrupt","graceful":"false"}',
                                "interrupt: field graceful: expected a boolean, got a string", command="interrupt")
        self.assertCommandError('{"command":"tts","text":1}', "field text: expected a string, got an integer",
                                command="tts")
        self.assertCommandError('{"command":"reject","reason":"x","code":true}', "field code", command="reject")
        self.assertCommandError('{"command":"invite","option":{"vad":{"speechPadding":"300"}}}',
                                "field option.vad.speechPadding: expected an integer", command="invite")
        self.assertCommandError('{"command":"invite","option":{"sip":{"extract_headers":"X-A"}}}',
                                "option.sip.extract_headers: expected an array", command="invite")
        self.assertCommandError('{"command":"invite","option":[]}', "option: expected an object", command="invite")

    def test_missing_required_fields(self):
        self.assertCommandError('{"command":"invite"}', "invite: field option: is required", command="invite")
        self.assertCommandError('{"command":"tts"}', "field text: is required", command="tts")
        self.assertCommandError('{"command":"refer","caller":"a"}', "field callee: is required", command="refer")
        self.assertCommandError('{"command":"invite","option":{"mediaPass":{"url":"ws://x"}}}',
                                "option.mediaPass.inputSampleRate: is required", command="invite")

    def test_value_checks(self):
        self.assertCommandError('{"command":"reject","reason":"x","code":42}', "not a SIP status code",
                                command="reject")
        self.assertCommandError('{"command":"tts","text":"x","waitInputTimeout":-1}', "must not be negative",
                                command="tts")
        self.assertCommandError('{"command":"sendDtmf","digits":"12x"}', "not a string of DTMF digits",
                                command="sendDtmf")

    def test_oversized_frames_are_refused_before_parsing(self):
        frame = json.dumps({"command": "tts", "text": "a" * c.MAX_COMMAND_BYTES})
        self.assertCommandError(frame, "larger than the limit")
        frame_ok = json.dumps({"command": "tts", "text": "a" * (c.MAX_COMMAND_BYTES - 100)})
        self.assertIsInstance(c.parse_command(frame_ok), c.Tts)

    def test_error_becomes_an_error_event(self):
        err = c.decode_command('{"command":"nope"}')
        event = err.to_event("s.1", 42)
        self.assertEqual(event, ev.Error(trackId="s.1", timestamp=42, sender="command", error=err.message, code=400))
        self.assertEqual(json.loads(event.to_json())["event"], "error")


class RedactionTests(unittest.TestCase):
    def test_secrets_are_replaced_in_nested_options(self):
        opt = c.CallOption.from_dict({
            "asr": {"provider": "tencent", "secretId": "id", "secretKey": "k", "extra": {"api_key": "z", "ok": "1"}},
            "tts": {"provider": "x", "apiKey": "sk-123"},
            "sip": {"username": "u", "password": "pw", "headers": {"Authorization": "Bearer t", "X-Ok": "1"}},
            "realtime": {"apiKey": "r"},
            "mediaPass": {"url": "wss://user:pw@host/x?token=abc&a=1", "inputSampleRate": 1, "outputSampleRate": 1},
        })
        red = c.redact(opt)
        text = json.dumps(red)
        for secret in ("sk-123", '"pw"', "Bearer t", '"k"', '"z"', "abc", "user:pw"):
            self.assertNotIn(secret, text)
        self.assertEqual(red["sip"]["username"], "u")
        self.assertEqual(red["sip"]["password"], "***")
        self.assertEqual(red["asr"]["extra"], {"api_key": "***", "ok": "1"})
        self.assertEqual(red["mediaPass"]["url"], "wss://***@host/x?token=***&a=1")
        self.assertEqual(red["realtime"]["secretKey"], "***")

    def test_repr_of_options_hides_secrets(self):
        cmd = parse({"command": "invite", "option": {"sip": {"password": "hunter2"}, "tts": {"secretKey": "s3"}}})
        self.assertNotIn("hunter2", repr(cmd))
        self.assertNotIn("s3", repr(cmd))

    def test_secret_key_names(self):
        for name in ("apiKey", "api_key", "X-Api-Key", "secretKey", "secretId", "password", "credential",
                     "Authorization", "http_token", "access_key"):
            self.assertTrue(c.is_secret_key(name), name)
        for name in ("mediaPass", "speechPadding", "maxTokens", "provider", "username", "keepalive"):
            self.assertFalse(c.is_secret_key(name), name)
