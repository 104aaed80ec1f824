"""The call session and its server-side playback, driven by task.Clock:
playId rules, interruption order, autoHangup, waitInputTimeout, inactivity,
one teardown, the event journal and the CDR."""

import dataclasses
import json
import os

import numpy as np
from twisted.internet import defer, task
from twisted.trial import unittest

from activecall.call.cdr import LocalCdrWriter
from activecall.call.playback import SynthesisUnavailable
from activecall.call.session import CallSession, CallState
from activecall.config import load_config
from activecall.media.tracks import FRAME_SAMPLES
from activecall.testing import FakeSynthesizer as FakeSynth  # frames per text at once, or held
from activecall.protocol import commands as cmd
from activecall.protocol import events as ev



def immediate(f, *a, **kw):
    return defer.maybeDeferred(f, *a, **kw)


class SessionTestBase(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.events = []
        root = os.path.abspath(self.mktemp())
        cfg, _ = load_config(None)
        self.cfg = dataclasses.replace(
            cfg, recording=dataclasses.replace(cfg.recording, path=os.path.join(root, "rec")),
            media_cache_path=os.path.join(root, "cache"))
        self.synth = FakeSynth()
        self.cdr = LocalCdrWriter(os.path.join(root, "cdr"), run=immediate)

    def make(self, option=None, **kw):
        s = CallSession("s1", "webSocket", clock=self.clock, emit=self.events.append, config=self.cfg,
                        synthesizer_for=lambda opt: self.synth, cdr_writer=self.cdr, **kw)
        s.option = option or cmd.CallOption(tts=cmd.SynthesisOption(provider="fake"))
        return s

    def tags(self):
        return [(e.TAG, getattr(e, "playId", None)) for e in self.events]

    def run_ticks(self, session, n):
        frames = []
        for _ in range(n):
            frames.append(session.tick())
        return frames


class PlayIdRulesTests(SessionTestBase):
    def test_same_play_id_queues_on_the_same_track(self):
        s = self.make()
        s.answered()
        self.events.clear()
        s.handle(cmd.Tts(text="one", playId="p1"))
        s.handle(cmd.Tts(text="two", playId="p1", endOfStream=True))
        self.assertEqual(self.tags()[0], ("trackStart", "p1"))
        self.assertEqual(self.synth.texts, ["one", "two"])
        frames = self.run_ticks(s, 7)
        self.assertEqual(sum(f is not None for f in frames), 6)
        self.assertEqual([t for t, _ in self.tags() if t in ("trackStart", "trackEnd", "interruption")],
                         ["trackStart", "trackEnd"])

    def test_both_absent_play_ids_are_equal(self):
        s = self.make()
        s.handle(cmd.Tts(text="a"))
        s.handle(cmd.Tts(text="b"))
        self.assertEqual([t for t, _ in self.tags()], ["trackStart", "metrics", "metrics"])

    def test_new_play_id_interrupts_then_starts(self):
        s = self.make()
        s.handle(cmd.Tts(text="first", playId="p1"))
        self.run_ticks(s, 1)  # audio started
        self.events.clear()
        s.handle(cmd.Tts(text="second", playId="p2"))
        self.assertEqual(self.tags()[:3], [("interruption", "p1"), ("trackEnd", "p1"), ("trackStart", "p2")])
        interruption = self.events[0]
        self.assertEqual(interruption.current, 20)
        self.assertEqual(interruption.subtitle, "first")

    def test_no_interruption_before_audio_started(self):
        s = self.make()
        s.handle(cmd.Tts(text="first", playId="p1"))
        self.events.clear()
        s.handle(cmd.Tts(text="second", playId="p2"))
        self.assertEqual(self.tags()[:2], [("trackEnd", "p1"), ("trackStart", "p2")])

    def test_track_ends_only_after_end_of_stream(self):
        s = self.make()
        s.handle(cmd.Tts(text="a", playId="p"))
        self.run_ticks(s, 10)
        self.assertNotIn("trackEnd", [t for t, _ in self.tags()])
        s.handle(cmd.Tts(text="", playId="p", endOfStream=True))
        self.run_ticks(s, 1)
        self.assertEqual(self.tags()[-1], ("trackEnd", "p"))

    def test_no_tts_option_is_an_error_event(self):
        s = self.make(option=cmd.CallOption())
        s.playback.synthesizer_for = lambda opt: (_ for _ in ()).throw(SynthesisUnavailable("no tts option available"))
        s.handle(cmd.Tts(text="x"))
        self.assertEqual(self.events[-1].TAG, "error")
        self.assertEqual(self.events[-1].error, "no tts option available")
        self.assertEqual(self.events[-1].sender, "command")

    def test_base64_pcm(self):
        import base64

        s = self.make()
        pcm = np.arange(FRAME_SAMPLES * 2, dtype="<i2")
        s.handle(cmd.Tts(text=base64.b64encode(pcm.tobytes()).decode(), base64=True, endOfStream=True))
        frames = self.run_ticks(s, 3)
        np.testing.assert_array_equal(np.concatenate(frames[:2]), pcm)
        self.assertEqual(self.synth.texts, [])
        self.assertEqual(self.tags()[-1][0], "trackEnd")

    def test_interrupt_stops_with_interruption_then_track_end(self):
        s = self.make()
        s.handle(cmd.Tts(text="a", playId="p"))
        self.run_ticks(s, 1)
        self.events.clear()
        s.handle(cmd.Interrupt())
        self.assertEqual(self.tags(), [("interruption", "p"), ("trackEnd", "p")])
        self.assertIsNone(s.tick())

    def test_graceful_interrupt_finishes_the_current_sentence(self):
        self.synth.hold = True
        s = self.make()
        s.handle(cmd.Tts(text="one", playId="p"))
        s.handle(cmd.Tts(text="two", playId="p"))
        s.handle(cmd.Interrupt(graceful=True))
        d, feed = self.synth.pending.pop(0)
        feed(np.full(FRAME_SAMPLES * 2, 1000, dtype=np.int16))
        d.callback(None)
        frames = self.run_ticks(s, 3)
        self.assertEqual(sum(f is not None for f in frames), 2)
        self.assertEqual(self.synth.texts, ["one"])  # "two" was dropped
        self.assertIn(("trackEnd", "p"), self.tags())
        self.assertNotIn("interruption", [t for t, _ in self.tags()])

    def test_pause_and_resume(self):
        s = self.make()
        s.handle(cmd.Tts(text="a", playId="p", endOfStream=True))
        self.assertIsNotNone(s.tick())
        s.handle(cmd.Pause())
        self.assertEqual(self.run_ticks(s, 5), [None] * 5)
        s.handle(cmd.Resume())
        self.assertEqual(sum(f is not None for f in self.run_ticks(s, 3)), 2)


class TimersTests(SessionTestBase):
    def test_auto_hangup_after_the_matching_track_end(self):
        s = self.make()
        s.answered()
        s.handle(cmd.Tts(text="bye", playId="p", autoHangup=True, endOfStream=True))
        self.run_ticks(s, 4)
        self.assertEqual(s.state, CallState.ENDED)
        self.assertEqual(s.end_reason, "autohangup")
        hangup = [e for e in self.events if e.TAG == "hangup"][0]
        self.assertEqual(hangup.reason, "autohangup")

    def test_superseded_track_does_not_auto_hangup(self):
        s = self.make()
        s.handle(cmd.Tts(text="bye", playId="p1", autoHangup=True, endOfStream=True))
        s.handle(cmd.Tts(text="other", playId="p2", endOfStream=True))
        self.run_ticks(s, 10)
        self.assertNotEqual(s.state, CallState.ENDED)

    def test_wait_input_timeout_ms(self):
        s = self.make()
        s.handle(cmd.Tts(text="q", playId="p", waitInputTimeout=1500, endOfStream=True))
        self.run_ticks(s, 4)
        armed = ev.now_ms(self.clock)
        self.clock.advance(1.4)
        self.assertNotIn("silence", [t for t, _ in self.tags()])
        self.clock.advance(0.2)
        silence = self.events[-1]
        self.assertEqual(silence.TAG, "silence")
        self.assertEqual(silence.trackId, "server-side-track")
        self.assertEqual((silence.startTime, silence.duration), (armed, 1500))

    def test_wait_input_cancelled_by_speech(self):
        s = self.make()
        s.handle(cmd.Tts(text="q", playId="p", waitInputTimeout=1000, endOfStream=True))
        self.run_ticks(s, 4)
        s.emit(ev.Speaking(trackId="s1", timestamp=0, startTime=0))
        self.clock.advance(2)
        self.assertNotIn("silence", [t for t, _ in self.tags()])

    def test_inactivity(self):
        s = self.make(option=cmd.CallOption(inactivityTimeout=10))
        s.answered()
        self.clock.advance(6)
        s.audio_received()
        self.clock.advance(6)
        self.assertNotEqual(s.state, CallState.ENDED)
        self.clock.advance(5)
        self.assertEqual(s.state, CallState.ENDED)
        self.assertEqual(s.end_reason, "inactivityTimeout")
        self.assertIn("inactivity", [t for t, _ in self.tags()])


class TeardownTests(SessionTestBase):
    def test_one_teardown_for_many_ways_out(self):
        closed = []

        class Leg:
            def close(self):
                closed.append(1)

        s = self.make()
        s.leg = Leg()
        s.answered()
        self.clock.advance(2)
        d1 = s.end("caller", initiator="caller")
        d2 = s.kill()
        d3 = s.handle(cmd.Hangup(reason="callee"))
        self.assertIs(self.successResultOf(d1), s)
        self.assertIs(self.successResultOf(d2), s)
        self.successResultOf(d3)
        self.assertEqual(closed, [1])
        self.assertEqual(s.end_reason, "caller")
        names = [t for t, _ in self.tags()]
        self.assertEqual(names.count("hangup"), 1)
        self.assertEqual(names[-4:], ["trackEnd", "hangup", "end", "error"])  # the late hangup is refused
        track_end = [e for e in self.events if e.TAG == "trackEnd"][-1]
        self.assertEqual(track_end.duration, 2000)

    def test_cdr_and_journal(self):
        s = self.make(option=cmd.CallOption(caller="sip:a@x", callee="sip:b@y",
                                            tts=cmd.SynthesisOption(provider="fake", secretKey="SECRET")))
        s.receive_frame('{"command":"history","speaker":"user","text":"hi"}')
        s.receive_frame("not json")
        s.answered()
        self.successResultOf(s.end("caller"))
        cdr_files = [os.path.join(d, f) for d, _, fs in os.walk(self.cdr.root) for f in fs]
        self.assertEqual(len(cdr_files), 1)
        with open(cdr_files[0]) as f:
            cdr = json.load(f)
        self.assertEqual(cdr["callId"], "s1")
        self.assertEqual(cdr["hangupReason"], "caller")
        self.assertEqual(cdr["caller"], "sip:a@x")
        self.assertNotIn("SECRET", json.dumps(cdr))
        self.assertTrue(cdr["dumpEventFile"].endswith("s1.events.jsonl"))
        with open(cdr["dumpEventFile"]) as f:
            lines = [json.loads(line) for line in f]
        kinds = [(line["type"], json.loads(line["content"]).get("event") or json.loads(line["content"]).get("command"))
                 for line in lines if line["content"].startswith("{")]
        self.assertIn(("command", "history"), kinds)
        self.assertIn(("event", "addHistory"), kinds)
        self.assertIn(("event", "hangup"), kinds)
        errors = [e for e in self.events if e.TAG == "error"]
        self.assertEqual(len(errors), 1)  # the bad frame got an error event

    def test_journal_is_flushed_once_per_reactor_turn_and_at_the_end(self):
        s = self.make()
        path = s.journal.path
        s.answered()
        s.emit(ev.Silence(trackId="s1", timestamp=s.now(), startTime=0, duration=1))
        self.assertFalse(os.path.exists(path))  # buffered until the turn ends; created by the first flush
        self.assertFalse(s.journal.created)
        self.clock.advance(0)
        self.assertTrue(s.journal.created)
        with open(path) as f:
            self.assertEqual([json.loads(json.loads(line)["content"])["event"] for line in f],
                             ["trackStart", "answer", "silence"])
        s.emit(ev.Silence(trackId="s1", timestamp=s.now(), startTime=0, duration=2))
        self.successResultOf(s.end("caller"))  # close() writes what the turn has not flushed yet
        self.assertEqual(self.clock.getDelayedCalls(), [])
        with open(path) as f:
            self.assertEqual([json.loads(json.loads(line)["content"])["event"] for line in f],
                             ["trackStart", "answer", "silence", "silence", "trackEnd", "hangup", "end"])

    def test_a_journal_that_cannot_be_created_warns_and_the_cdr_names_no_file(self):
        s = self.make()
        os.makedirs(os.path.dirname(os.path.dirname(s.journal.path)), exist_ok=True)
        with open(os.path.dirname(s.journal.path), "w"):
            pass  # a file where the recording directory should be
        s.answered()
        self.clock.advance(0)
        self.assertFalse(s.journal.created)
        self.successResultOf(s.end("caller"))  # the call itself is unaffected
        cdr_files = [os.path.join(d, f) for d, _, fs in os.walk(self.cdr.root) for f in fs]
        with open(cdr_files[0]) as f:
            cdr = json.load(f)
        self.assertEqual(cdr["hangupReason"], "caller")
        self.assertNotIn("dumpEventFile", cdr)

    def test_one_info_line_per_call(self):
        from twisted.logger import LogLevel, capturedLogs, formatEvent

        s = self.make(option=cmd.CallOption(caller="sip:a@x", callee="sip:b@y"))
        with capturedLogs() as logged:
            s.answered()
            self.clock.advance(2)
            self.successResultOf(s.end("caller", initiator="caller"))
        infos = [formatEvent(e) for e in logged if e["log_level"] >= LogLevel.info]
        self.assertEqual(infos, ["call s1 ended: caller by caller (webSocket, sip:a@x -> sip:b@y, answered 2000 ms)"])

    def test_play_missing_file_reports_and_ends(self):
        s = self.make()
        s.playback.loader.run = immediate
        s.handle(cmd.Play(url="/nonexistent.wav"))
        tags = [t for t, _ in self.tags()]
        self.assertEqual(tags[:2], ["trackStart", "error"])
        self.assertTrue(self.events[1].sender.startswith("filetrack: "))
        s.tick()
        self.assertEqual(self.tags()[-1], ("trackEnd", "/nonexistent.wav"))


class RecordingTests(SessionTestBase):
    def enable(self, **kw):
        self.cfg = dataclasses.replace(self.cfg, recording=dataclasses.replace(self.cfg.recording, **kw))

    def read_wav(self, path):
        import wave

        with wave.open(path) as w:
            self.assertEqual((w.getnchannels(), w.getsampwidth(), w.getframerate()), (2, 2, 16000))
            return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, 2)

    def test_auto_start_records_caller_left_bot_right(self):
        self.enable(enabled=True, auto_start=True)
        s = self.make()
        s.answered()
        s.handle(cmd.Tts(text="x", playId="p", endOfStream=True))  # 3 frames of 1000
        for _ in range(3):
            s.audio_in(np.full(FRAME_SAMPLES, -500, dtype=np.int16))
            s.tick()
        path = s.recorder.path
        self.successResultOf(s.end("caller"))
        self.assertEqual(os.path.basename(path), "s1.wav")
        data = self.read_wav(path)
        self.assertEqual(data.shape, (3 * FRAME_SAMPLES, 2))
        self.assertTrue((data[:, 0] == -500).all())
        self.assertTrue((data[:, 1] == 1000).all())
        cdr_file = [os.path.join(d, f) for d, _, fs in os.walk(self.cdr.root) for f in fs][0]
        with open(cdr_file) as f:
            rec = json.load(f)["recorder"][0]
        self.assertEqual(rec["path"], path)
        self.assertEqual(rec["size"], 44 + 3 * FRAME_SAMPLES * 4)

    def test_header_valid_while_recording(self):
        self.enable(enabled=True, auto_start=True, ptime=20)
        s = self.make()
        s.answered()
        s.audio_in(np.ones(FRAME_SAMPLES * 2, dtype=np.int16))
        self.clock.advance(1.0)  # written once it is older than the recorder's lag
        s.audio_in(np.ones(FRAME_SAMPLES, dtype=np.int16))
        data = self.read_wav(s.recorder.path)  # not closed yet: a crash now keeps this
        self.assertEqual(data.shape[0], 16000 - 9600)  # up to now minus the 600 ms lag
        self.assertTrue((data[:FRAME_SAMPLES * 2, 0] == 1).all())
        self.assertFalse(data[FRAME_SAMPLES * 2:, 0].any())  # the quiet second in between
        s.end("caller")
        data = self.read_wav(s.recorder.path)
        self.assertEqual(data.shape[0], 16000)  # the late frame sits one second in
        self.assertTrue((data[-FRAME_SAMPLES:, 0] == 1).all())

    def test_recorder_keeps_bursts_whole_and_places_gaps(self):
        from activecall.media.recorder import BOT, CALLER, WavRecorder

        clock = task.Clock()
        path = self.mktemp() + ".wav"
        rec = WavRecorder(path, clock=clock, ptime_ms=20)
        frame = np.ones(FRAME_SAMPLES, dtype=np.int16)
        for i in range(10):  # the bot speaks steadily for 200 ms
            rec.write(BOT, frame * 2)
            if i == 7:  # the caller's first 8 frames arrive late, all at once
                for _ in range(8):
                    rec.write(CALLER, frame)
            clock.advance(0.02)
        rec.close()
        data = self.read_wav(path)
        self.assertEqual(data.shape[0], 10 * FRAME_SAMPLES)
        self.assertTrue((data[:, 1] == 2).all())
        self.assertTrue((data[:8 * FRAME_SAMPLES, 0] == 1).all())  # the burst is whole, not cut

    def test_enabled_without_auto_start_needs_the_option(self):
        self.enable(enabled=True, auto_start=False)
        s = self.make()
        s.answered()
        self.assertIsNone(s.recorder)
        s2 = CallSession("s2", "webSocket", clock=self.clock, emit=self.events.append, config=self.cfg)
        s2.option = cmd.CallOption(recorder=cmd.RecorderOption(recorderFile="rec-{id}"))
        s2.answered()
        self.assertEqual(os.path.basename(s2.recorder.path), "rec-s2.wav")
        s2.end("caller")

    def test_disabled_refuses_a_requested_recording(self):
        self.enable(enabled=False)
        s = self.make(option=cmd.CallOption(recorder=cmd.RecorderOption()))
        s.answered()
        self.assertIsNone(s.recorder)
        self.assertEqual(self.events[-1].TAG, "error")
        self.assertIn("disabled", self.events[-1].error)

    def test_a_hostile_session_id_keeps_its_recording_journal_and_cdr(self):
        """A long Call-ID (RFC 4475 §3.1.1.11) or one with ``/``, ``..`` or unicode: every file
        is written, under its own directory, and the CDR keeps the whole id."""
        from tests.test_filenames import LONG_CALL_ID

        self.enable(enabled=True, auto_start=True)
        rec_dir = self.cfg.recording.path
        for n, sid in enumerate([LONG_CALL_ID, "../../x/y@z", "caf\u00e9/\u4e2d\u00ff\u0001"]):
            s = CallSession(sid, "sip", clock=self.clock, emit=self.events.append, config=self.cfg,
                            cdr_writer=self.cdr)
            s.option = cmd.CallOption(recorder=cmd.RecorderOption(recorderFile="rec-{id}"))
            s.answered()
            s.audio_in(np.ones(FRAME_SAMPLES, dtype=np.int16))
            self.successResultOf(s.end("caller"))
            self.assertEqual([e for e in self.events if e.TAG == "error"], [])
            self.assertEqual(os.path.dirname(s.recorder.path), rec_dir)
            self.assertTrue(os.path.isfile(s.recorder.path))
            self.assertEqual(os.path.dirname(s.journal.path), rec_dir)
            self.assertTrue(s.journal.created)
            cdrs = sorted(os.path.join(d, f) for d, _, fs in os.walk(self.cdr.root) for f in fs)
            self.assertEqual(len(cdrs), n + 1)
            records = []
            for path in cdrs:
                with open(path, encoding="utf-8") as f:
                    records.append(json.load(f))
            record = next(r for r in records if r["callId"] == sid)
            self.assertEqual(record["dumpEventFile"], s.journal.path)
            self.assertEqual(record["recorder"][0]["path"], s.recorder.path)

    def test_recorder_file_cannot_escape(self):
        self.enable(enabled=True)
        s = self.make(option=cmd.CallOption(recorder=cmd.RecorderOption(recorderFile="../../etc/x")))
        s.answered()
        self.assertIsNone(s.recorder)
        self.assertIn("leaves the recording directory", self.events[-1].error)


class MuteTests(SessionTestBase):
    def test_mute_bot_caller_and_all(self):
        s = self.make()
        got = []
        s.audio_sinks.append(got.append)
        s.handle(cmd.Tts(text="x", playId="p", endOfStream=True))
        s.handle(cmd.Mute(trackId="server-side-track"))
        self.assertFalse(s.tick().any())  # the bot's frame goes out silent
        s.audio_in(np.ones(FRAME_SAMPLES, dtype=np.int16))
        self.assertTrue(got[-1].any())  # the caller is not muted
        s.handle(cmd.Mute(trackId="s1"))
        s.audio_in(np.ones(FRAME_SAMPLES, dtype=np.int16))
        self.assertFalse(got[-1].any())
        s.handle(cmd.Unmute())
        self.assertTrue(s.tick().any())
        s.handle(cmd.Mute(trackId="nope"))
        self.assertEqual(self.events[-1].TAG, "error")
