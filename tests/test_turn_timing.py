"""Per-turn latency (call/turn_timing.py) on a scripted call driven by task.Clock: the caller's
frames, the VAD/eou/ASR/LLM events a real call emits in that order, the bot's TTS and the media
tick; the ``turn.latency`` metrics event and the Prometheus histograms it feeds."""

import numpy as np
from twisted.internet import defer, task
from twisted.trial import unittest

from activecall.call.session import CallSession
from activecall.call.turn_timing import TurnTiming
from activecall.media.tracks import FRAME_SAMPLES
from activecall.metrics import Metrics
from activecall.protocol import commands as cmd
from activecall.protocol import events as ev
from activecall.testing import FakeSynthesizer

T0 = 1_700_000_000


class TurnTimingTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.events = []
        self.synth = FakeSynthesizer(hold=True)
        self.metrics = Metrics()
        self.session = CallSession("c1", "websocket", clock=self.clock, emit=self.events.append,
                                   synthesizer_for=lambda option: self.synth, dump=False,
                                   metrics=self.metrics)
        self.session.answered()
        self.timing = TurnTiming.attach(self.session, self.metrics)
        self.stream_ms = 0

    def frames(self, ms, level=0):
        """Caller audio for ``ms`` in 20 ms frames, the clock following it."""
        for _ in range(ms // 20):
            self.clock.advance(0.02)
            self.session.audio_in(np.full(FRAME_SAMPLES, level, dtype=np.int16))
            self.stream_ms += 20

    def emit(self, event):
        self.session.emit(event)

    def now(self):
        return self.session.now()

    def tick(self, n=1):
        out = []
        for _ in range(n):
            self.clock.advance(0.02)
            out.append(self.session.tick())
        return out

    def latency_events(self):
        return [e for e in self.events if isinstance(e, ev.Metrics) and e.key == "turn.latency"]

    def histogram(self, name):
        return {s.name: s.value for m in self.metrics.registry.collect() if m.name == name
                for s in m.samples}

    def play_turn(self, speech_ms=1000):
        """One caller turn then the bot's reply: returns the wall time the voiced audio ended."""
        self.emit(ev.Speaking(trackId="c1", timestamp=self.now(), startTime=self.stream_ms))
        start = self.stream_ms
        self.frames(speech_ms, level=3000)
        speech_end = self.clock.seconds()
        end_stream = self.stream_ms
        self.frames(200)  # the end-of-turn pause
        self.clock.advance(0.03)  # the model's inference
        self.emit(ev.Eou(trackId="c1", timestamp=self.now(), completed=True, probability=0.9, inferenceMs=30))
        self.frames(60)  # the recogniser's last decode
        self.emit(ev.AsrFinal(trackId="c1", timestamp=self.now(), index=0, startTime=start,
                              endTime=end_stream, text="hello"))
        llm_start = self.now()
        self.frames(100)  # the silero VAD closes its segment later than the end-of-turn pause
        self.emit(ev.Silence(trackId="c1", timestamp=self.now(), startTime=start, duration=end_stream - start))
        # the LLM answered its first token at llm_start + 80 ms; the bot's TTS starts now
        self.session.handle(cmd.Tts(text="Hi there.", playId="r1", streaming=True))
        self.clock.advance(0.04)
        d, sink = self.synth.pending.pop(0)
        self.assertEqual(self.tick(1), [None])  # the track has no audio yet
        sink(np.full(3 * FRAME_SAMPLES, 1000, dtype=np.int16))  # TTS first audio
        d.callback(None)
        self.tick(1)  # first frame out
        self.clock.advance(0.5)
        self.emit(ev.Metrics(timestamp=self.now(), key="llm_response", duration=self.now() - llm_start,
                             data={"playId": "r1", "text": "Hi there.", "ttfb": 80}))
        return speech_end

    def test_breakdown_from_speech_end(self):
        self.play_turn()
        [m] = self.latency_events()
        # speech end -> pause 200 + inference 30 -> eou; + 60 -> asrFinal; LLM sent then, first
        # token + 80; 100 more of caller frames, 40 of synthesis, the tick: first audio, next tick out
        self.assertEqual(m.data, {
            "eou_ms": 230, "asr_final_ms": 290, "llm_start_ms": 290, "llm_first_token_ms": 370,
            "tts_first_audio_ms": 450, "first_frame_ms": 470, "speech_end": m.data["speech_end"],
        })
        self.assertEqual(m.duration, 470)
        first_frame = self.histogram("activecall_turn_first_frame_seconds")
        self.assertEqual(first_frame["activecall_turn_first_frame_seconds_count"], 1)
        self.assertAlmostEqual(first_frame["activecall_turn_first_frame_seconds_sum"], 0.47)
        self.assertEqual(first_frame['activecall_turn_first_frame_seconds_count'], 1)
        eou = self.histogram("activecall_turn_eou_seconds")
        self.assertAlmostEqual(eou["activecall_turn_eou_seconds_sum"], 0.23)
        self.assertIn(b"activecall_turn_llm_first_token_seconds_bucket", self.metrics.render())

    def test_each_turn_reported_once(self):
        self.play_turn()
        self.tick(10)
        self.play_turn(speech_ms=600)
        self.tick(10)
        latencies = self.latency_events()
        self.assertEqual(len(latencies), 2)
        self.assertEqual(latencies[1].data["first_frame_ms"], 470)
        self.assertEqual(self.histogram("activecall_turn_asr_final_seconds")[
            "activecall_turn_asr_final_seconds_count"], 2)

    def test_no_llm_reported_at_call_end(self):
        """A /call client answering itself (no llm_response): the turn is reported at the end,
        its LLM stages None; a turn with no reply at all is not reported."""
        self.emit(ev.Speaking(trackId="c1", timestamp=self.now(), startTime=0))
        self.frames(500, level=3000)
        self.emit(ev.Silence(trackId="c1", timestamp=self.now(), startTime=0, duration=500))
        self.frames(40)
        self.emit(ev.AsrFinal(trackId="c1", timestamp=self.now(), index=0, startTime=0, endTime=500, text="hi"))
        self.session.handle(cmd.Tts(text="Yes?", playId="r1"))
        self.synth.pending.pop(0)[1](np.full(FRAME_SAMPLES, 500, dtype=np.int16))
        self.tick(2)
        self.assertEqual(self.latency_events(), [])
        self.frames(100)
        self.emit(ev.AsrFinal(trackId="c1", timestamp=self.now(), index=1, startTime=560, endTime=600, text=""))
        [m] = self.latency_events()  # the next turn closed the first
        self.assertEqual(m.data["eou_ms"], None)
        self.assertEqual(m.data["llm_first_token_ms"], None)
        self.assertEqual(m.data["asr_final_ms"], 40)
        self.assertEqual(m.data["first_frame_ms"], 60)
        d = self.session.end("caller")
        self.assertEqual(len(self.latency_events()), 1)  # the second turn had no reply
        return d

    def test_silence_timeouts_are_not_speech_ends(self):
        self.emit(ev.Silence(trackId="c1", timestamp=self.now(), startTime=0, duration=5000))
        self.emit(ev.Eou(trackId="c1", timestamp=self.now(), completed=True))
        self.assertIsNone(self.timing.turn.speech_end)

    def test_the_frame_history_goes_with_the_calls_end(self):
        self.frames(400)
        self.assertEqual(len(self.timing._frames), 20)
        self.emit(ev.Hangup(timestamp=self.now(), reason="caller", initiator="caller", startTime="", hangupTime=""))
        self.assertEqual(len(self.timing._frames), 20)  # a late VAD segment end may still need it
        self.emit(ev.End(trackId="c1", timestamp=self.now()))
        self.assertEqual(len(self.timing._frames), 0)
