"""SIP calls through the whole daemon, against sipp:

- playbook routing: sipp calls, speaks a flite sentence as PCMU RTP and presses
  1 (sipp's RFC 4733 pcap); the call is answered with a negotiated codec, the
  recording's caller channel holds the speech (its sound: sipp paces the RTP in
  real time, so how a recogniser hears the file differs run to run; telephone-band
  recognition is tested on fixed clips in test_speech_telephone), the digit
  arrives once, custom X- headers reach the CDR extras;
- webhook routing: a real HTTP webhook keeps the INVITE pending, a /call/sip
  client accepts it by dialog id;
- delayed offer: an INVITE without SDP gets our offer in the 200, the ACK's answer is used (and an ACK
  without one ends the call with a BYE);
- outbound: /call/sip ``invite`` dials sipp's UAS; ``hangup`` sends the BYE;
- no handler: 503.
"""

import glob
import json
import os
import wave

import numpy as np
from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web import resource, server

from activecall.audio import resample
from activecall.media.codecs import ulaw_encode
from activecall.speech.testing import synthesize_pcm
from tests.helpers import free_port, loud_ms, spawn_daemon, write_config
from tests.test_sip_integration import SCENARIOS, port_bound, sipp, sipp_result, udp_port, when
from tests.wsclient import connect, send_json

SENTENCE = "my account number is one two three four five"

PLAYBOOK = """---
llm:
  provider: echo
  greeting: "Hello."
tts:
  provider: flite
vad:
  type: webrtcvad
sip:
  extract_headers: ["X-Tenant-ID"]
---
You repeat what the caller says.
"""


def write_ulaw_wav(path: str, pcm8k: np.ndarray) -> None:
    """A G.711 µ-law WAV (format 7), what sipp's rtp_stream plays as PT 0."""
    data = bytes(ulaw_encode(pcm8k))
    fmt = (b"fmt " + (18).to_bytes(4, "little") + (7).to_bytes(2, "little") + (1).to_bytes(2, "little")
           + (8000).to_bytes(4, "little") + (8000).to_bytes(4, "little") + (1).to_bytes(2, "little")
           + (8).to_bytes(2, "little") + (0).to_bytes(2, "little"))
    body = b"WAVE" + fmt + b"data" + len(data).to_bytes(4, "little") + data
    with open(path, "wb") as f:
        f.write(b"RIFF" + len(body).to_bytes(4, "little") + body)


class DaemonCase(unittest.TestCase):
    timeout = 60

    def start(self, handler_toml: str):
        if getattr(self, "root", None) is None:  # a test may have made it to put files there first
            self.root = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.root, "playbooks"))
        with open(os.path.join(self.root, "playbooks", "test.md"), "w") as f:
            f.write(PLAYBOOK)
        self.sip_port = udp_port()
        self.http_port = free_port()
        base = free_port() // 2 * 2
        conf = write_config(self, f'''
addr = "127.0.0.1"
udp_port = {self.sip_port}
tcp_port = 0
http_addr = "127.0.0.1:{self.http_port}"
rtp_start_port = {base}
rtp_end_port = {base + 20}
media_cache_path = "{self.root}/cache"
playbook_dir = "{self.root}/playbooks"
[recording]
enabled = true
auto_start = true
path = "{self.root}/rec"
[callrecord]
type = "local"
root = "{self.root}/cdr"
{handler_toml}
''')
        self.daemon = spawn_daemon(self, conf)
        return self.daemon.wait_for("activecall ready")

    @defer.inlineCallbacks
    def wait_cdr(self):
        for _ in range(200):
            found = glob.glob(os.path.join(self.root, "cdr", "*", "*.json"))
            if found:
                with open(found[0]) as f:
                    return json.load(f)
            yield _later(0.05)
        raise AssertionError("no CDR was written\n" + self.daemon.output[-3000:])


def _later(seconds):
    d = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


class PlaybookRoutedCallTests(DaemonCase):
    @defer.inlineCallbacks
    def test_speech_and_dtmf_from_sipp(self):
        yield self.start('[handler]\ntype = "playbook"\ndefault = "test.md"\n')
        speech = yield synthesize_pcm(SENTENCE)
        pcm8k = resample(np.concatenate([np.zeros(4000, np.int16), speech, np.zeros(8000, np.int16)]),
                         16000, 8000)
        wav = os.path.join(self.root, "speech.wav")
        write_ulaw_wav(wav, pcm8k)
        scenario = os.path.join(self.root, "uac_media.xml")
        with open(os.path.join(SCENARIOS, "uac_media.xml")) as f:
            text = f.read()
        with open(scenario, "w") as f:
            f.write(text.replace("{SPEECH_WAV}", wav).replace("{SPEECH_MS}", str(int(pcm8k.size / 8) + 300)))
        uac = sipp(self, f"127.0.0.1:{self.sip_port}", "-p", str(udp_port()),
                   "-mp", str(udp_port() // 2 * 2), scenario=scenario)
        yield sipp_result(uac, timeout=30)
        cdr = yield self.wait_cdr()
        self.assertEqual(cdr["callType"], "sip")
        self.assertEqual(cdr["hangupReason"], "caller")
        self.assertEqual(cdr["extras"].get("X-Tenant-ID"), "acme")
        with open(cdr["dumpEventFile"]) as f:
            events = [json.loads(json.loads(line)["content"]) for line in f]
        digits = [e["digit"] for e in events if e.get("event") == "dtmf"]
        self.assertEqual(digits, ["1"])
        with wave.open(cdr["recorder"][0]["path"]) as w:
            self.assertEqual((w.getnchannels(), w.getframerate()), (2, 16000))
            frames = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, 2)
        # the caller's channel holds the sentence: at least half the sound sipp sent (the recorder
        # leaves silence where packets came late; nothing is lost on loopback) and not much more (it is
        # the caller's audio, not the greeting or noise)
        sent = loud_ms(resample(pcm8k, 8000, 16000))
        recorded = loud_ms(frames[:, 0])
        self.assertGreater(sent, 1500)
        self.assertGreaterEqual(recorded, sent // 2, (recorded, sent))
        self.assertLessEqual(recorded, sent * 3 // 2, (recorded, sent))
        self.assertGreater(np.abs(frames[:, 1]).mean(), 10)  # the greeting, right channel


class DelayedOfferTests(DaemonCase):
    @defer.inlineCallbacks
    def test_an_invite_without_sdp_is_answered_with_an_offer(self):
        """RFC 3261 §13.2.1: sipp's INVITE has no SDP, so our 200 offers (the scenario checks PCMU is
        in it) and sipp's ACK answers.  Media then flows both ways on the negotiated ports: sipp
        echoes the greeting back, and the recording's caller channel holds that echo."""
        yield self.start('[handler]\ntype = "playbook"\ndefault = "test.md"\n')
        uac = sipp(self, f"127.0.0.1:{self.sip_port}", "-p", str(udp_port()), "-mp", str(udp_port() // 2 * 2),
                   "-rtp_echo", scenario="uac_delayed_offer.xml")
        yield sipp_result(uac, timeout=30)
        cdr = yield self.wait_cdr()
        self.assertEqual((cdr["hangupReason"], cdr["statusCode"]), ("caller", 200))
        with open(cdr["dumpEventFile"]) as f:
            events = [json.loads(json.loads(line)["content"]) for line in f]
        answer = next(e for e in events if e.get("event") == "answer")
        self.assertIn("RTP/AVP 0", answer["sdp"])  # the caller's answer, from its ACK
        with wave.open(cdr["recorder"][0]["path"]) as w:
            frames = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, 2)
        self.assertGreater(np.abs(frames[:, 1]).mean(), 10)  # the greeting went out
        self.assertGreater(np.abs(frames[:, 0]).mean(), 10)  # and came back through sipp's echo

    @defer.inlineCallbacks
    def test_an_ack_without_the_answer_ends_the_call_with_bye(self):
        yield self.start('[handler]\ntype = "playbook"\ndefault = "test.md"\n')
        uac = sipp(self, f"127.0.0.1:{self.sip_port}", "-p", str(udp_port()), "-mp", str(udp_port() // 2 * 2),
                   scenario="uac_delayed_offer_no_answer.xml")
        yield sipp_result(uac, timeout=30)  # sipp fails unless our BYE comes
        cdr = yield self.wait_cdr()
        self.assertEqual(cdr["statusCode"], 488)


class HostileSdpTests(DaemonCase):
    """An offer the RTP path could not use gets 488 at once (never a traceback from the media tick
    later), and the call's CDR and event dump are written, even for a long, odd Call-ID."""

    @defer.inlineCallbacks
    def bad_offer(self, call_id, address, port):
        yield self.start('[handler]\ntype = "playbook"\ndefault = "test.md"\n')
        scenario = os.path.join(self.root, "uac_bad_sdp.xml")
        with open(os.path.join(SCENARIOS, "uac_bad_sdp.xml")) as f:
            text = f.read()
        with open(scenario, "w") as f:
            f.write(text.replace("{ADDRESS}", address).replace("{PORT}", str(port)))
        uac = sipp(self, f"127.0.0.1:{self.sip_port}", "-p", str(udp_port()), "-cid_str", call_id,
                   scenario=scenario)
        yield sipp_result(uac, timeout=30)  # sipp fails unless the answer is 488
        cdr = yield self.wait_cdr()
        self.assertEqual(cdr["statusCode"], 488)
        self.assertNotIn("Traceback", self.daemon.output)
        return cdr

    @defer.inlineCallbacks
    def test_a_port_above_65535_is_488(self):
        cdr = yield self.bad_offer("bad-port-%u-%p@%s", "127.0.0.1", 70000)
        self.assertTrue(cdr["callId"].startswith("bad-port-"))

    @defer.inlineCallbacks
    def test_a_long_odd_call_id_with_an_unusable_address_keeps_its_cdr(self):
        """RFC 4475 §3.1.1.11 shape: a Call-ID of some 500 bytes, here with "/" and ".." too
        (it used to fail the CDR with ENAMETOOLONG, logged critical)."""
        call_id = "../../" + "long/value" * 48 + "@" + "very" * 10 + ".example.com"
        cdr = yield self.bad_offer(call_id, "media.example.com", 30000)
        self.assertTrue(cdr["callId"].startswith(call_id), cdr["callId"])  # the session id: Call-ID, then tags
        self.assertTrue(os.path.isfile(cdr["dumpEventFile"]))
        self.assertEqual(os.path.dirname(cdr["dumpEventFile"]), os.path.join(self.root, "rec"))


class ReinviteTests(DaemonCase):
    @defer.inlineCallbacks
    def test_a_reinvite_changing_the_codec_moves_the_media(self):
        """uac_reinvite_codec.xml checks every answer follows its re-INVITE (PCMU, then PCMA, then PCMA
        recvonly for a hold: the RTP leg renegotiated, not the SIP layer's copy of our first answer);
        the session reports the hold once."""
        yield self.start('[handler]\ntype = "playbook"\ndefault = "test.md"\n')
        uac = sipp(self, f"127.0.0.1:{self.sip_port}", "-p", str(udp_port()), "-mp", str(udp_port() // 2 * 2),
                   "-rtp_echo", scenario="uac_reinvite_codec.xml")
        yield sipp_result(uac, timeout=30)
        cdr = yield self.wait_cdr()
        self.assertEqual(cdr["hangupReason"], "caller")
        with open(cdr["dumpEventFile"]) as f:
            events = [json.loads(json.loads(line)["content"]) for line in f]
        self.assertEqual([e["onHold"] for e in events if e.get("event") == "hold"], [True])


class NoHandlerTests(DaemonCase):
    @defer.inlineCallbacks
    def test_no_handler_rejects_with_503(self):
        yield self.start("")
        uac = sipp(self, f"127.0.0.1:{self.sip_port}", "-p", str(udp_port()), builtin="uac")
        code = yield when(uac.ended, 15, "sipp to finish")
        self.assertNotEqual(code, 0)  # sipp's uac expects 200; it got 503
        errors = os.path.join(uac.workdir, "errors.log")
        if os.path.exists(errors):
            with open(errors) as f:
                self.assertIn("503", f.read())
        else:
            self.assertIn("503", uac.output)


class ConfiguredAbsolutePlaybookTests(DaemonCase):
    @defer.inlineCallbacks
    def test_a_rule_naming_an_absolute_path_answers_and_the_api_may_not_name_it(self):
        """``[[handler.rules]] playbook = "/…/elsewhere/sales.md"`` (outside ``playbook_dir``) answers
        sipp's call with that playbook; the same file named by a /call invite, absolute or with
        ``../``, is refused (API names stay under ``playbook_dir``)."""
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.root, "elsewhere"))
        sales = os.path.join(self.root, "elsewhere", "sales.md")
        with open(sales, "w") as f:
            f.write(PLAYBOOK.replace('greeting: "Hello."', 'greeting: "Sales here."'))
        yield self.start(f'[handler]\ntype = "playbook"\ndefault = "test.md"\n'
                         f'[[handler.rules]]\ncallee = "^service$"\nplaybook = "{sales}"\n')
        uac = sipp(self, f"127.0.0.1:{self.sip_port}", "-p", str(udp_port()), builtin="uac")
        yield sipp_result(uac, timeout=15)  # it needs our 200; it hangs up after its pause
        cdr = yield self.wait_cdr()
        self.assertEqual((cdr["hangupReason"], cdr["statusCode"]), ("caller", 200))
        with open(cdr["dumpEventFile"]) as f:
            events = [json.loads(json.loads(line)["content"]) for line in f]
        said = [e["text"] for e in events if e.get("event") == "addHistory" and e.get("speaker") == "assistant"]
        self.assertEqual(said[:1], ["Sales here."])
        for name in (sales, "../elsewhere/sales.md"):
            proto, client = yield connect(self, self.http_port, "/call", "id=api-" + str(len(name)))
            send_json(proto, {"command": "invite", "option": {"codec": "pcm", "playbook": name}})
            error = yield client.wait_event("error")
            self.assertEqual(error["sender"], "playbook", name)
            self.assertIn("invalid playbook name", error["error"])
            yield client.closed


class WebhookAndOutboundTests(DaemonCase):
    @defer.inlineCallbacks
    def test_webhook_pending_then_accept_over_call_sip(self):
        hooks = []

        class Hook(resource.Resource):
            isLeaf = True

            def render_POST(self, request):
                hooks.append(json.loads(request.content.read()))
                return b"{}"

        port = reactor.listenTCP(0, server.Site(Hook()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        yield self.start(f'[handler]\ntype = "webhook"\nurl = "http://127.0.0.1:{port.getHost().port}/hook"\n')
        uac = sipp(self, f"127.0.0.1:{self.sip_port}", "-p", str(udp_port()), builtin="uac")
        for _ in range(200):
            if hooks:
                break
            yield _later(0.05)
        self.assertEqual(hooks[0]["event"], "invite")
        dialog_id = hooks[0]["dialogId"]
        proto, client = yield connect(self, self.http_port, "/call/sip", f"id={dialog_id}")
        send_json(proto, {"command": "ringing"})
        send_json(proto, {"command": "accept", "option": {"codec": "pcmu"}})
        answer = yield client.wait_event("answer")
        self.assertIn("m=audio", answer["sdp"])
        self.assertIn("RTP/AVP 0", answer["sdp"])  # sipp offers PCMU only
        yield sipp_result(uac, timeout=15)  # sipp's uac hangs up after its pause
        hangup = yield client.wait_event("hangup")
        self.assertEqual(hangup["reason"], "caller")

    @defer.inlineCallbacks
    def test_outbound_invite_and_hangup(self):
        yield self.start("")
        uas_port = udp_port()
        uas = sipp(self, "-p", str(uas_port), "-mp", str(udp_port() // 2 * 2), builtin="uas")
        yield when(port_bound(uas_port), 15, "sipp uas to bind")
        proto, client = yield connect(self, self.http_port, "/call/sip", "id=out1")
        send_json(proto, {"command": "invite", "option": {
            "callee": f"sip:bob@127.0.0.1:{uas_port}", "caller": "sip:agent@example.com"}})
        answer = yield client.wait_event("answer")
        self.assertIn("m=audio", answer["sdp"])
        send_json(proto, {"command": "hangup", "headers": {"X-Reason": "done"}})
        hangup = yield client.wait_event("hangup")
        self.assertEqual(hangup["reason"], "system")
        yield sipp_result(uas, timeout=15)
