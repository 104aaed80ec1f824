"""Semantic end of turn (speech/eou/): the turn decision on a task.Clock, the recogniser's endpointing with it,
the call's eou/metrics events, the Smart Turn features and model on fixed clips, and inference off the reactor.

No assertion here is about wall time: the decision runs on ``task.Clock``, stream times are counted in
samples, and the model's clips are judged only by which side of the threshold they fall, with a margin.
"""

from __future__ import annotations

import io
import shutil
import threading
import wave

import numpy as np
from twisted.internet import defer, task, utils
from twisted.trial import unittest

from activecall.protocol import commands as cmd
from activecall.protocol import events as ev
from activecall.call.speech import SpeechProcessors, attach_end_of_turn
from activecall.playbook.parser import parse_playbook
from activecall.playbook.start import playbook_call_option
from activecall.audio import resample
from activecall.speech import registry
from activecall.speech.asr.base import StreamingRecognizer
from activecall.speech.base import AsrOptions, OptionError, ProviderNotFound
from activecall.speech.eou import features
from activecall.speech.eou.base import EouOptions, TurnPrediction
from activecall.speech.eou.endpointer import TurnDecision, TurnEndpointer
from activecall.speech.eou.smart_turn import SmartTurnDetector, shared_model
from activecall.speech.testing import frames, speech_extent, synthesize_pcm

COMPLETE = "I would like to check the status of my order."
#: trailing-off turns flite's rms voice says so that Smart Turn v3.2 hears them unfinished (P < 0.1 here)
INCOMPLETE = ["my number is five five five and", "I want to check the status of my"]


class FakeDetector:
    """Answers each ``analyze`` with a Deferred the test fires; keeps what it was given."""

    name = "fake"

    def __init__(self):
        self.calls: list[tuple[np.ndarray, defer.Deferred]] = []

    def analyze(self, pcm):
        d = defer.Deferred()
        self.calls.append((pcm, d))
        return d

    def answer(self, probability, index=-1):
        self.calls[index][1].callback(TurnPrediction(probability, 12.5))


class EndpointerTests(unittest.TestCase):
    """The decision alone: pauses, resumptions and answers on a task.Clock."""

    def setUp(self):
        self.clock = task.Clock()
        self.detector = FakeDetector()
        self.decisions: list[TurnDecision] = []
        self.ends = []
        self.e = TurnEndpointer(self.clock, self.detector, EouOptions(pauseMs=200, timeout=1500, threshold=0.5,
                                                                      earlyLook=True),
                                on_decision=self.decisions.append)
        self.e.on_end = lambda: self.ends.append(self.clock.seconds())

    def test_complete_ends_the_turn_at_once(self):
        self.e.paused(np.ones(1600, dtype=np.int16))
        self.clock.advance(0.05)
        self.assertEqual(self.ends, [])  # waits for the detector, not for the silence
        self.detector.answer(0.93)
        self.assertEqual(self.ends, [0.05])
        self.assertEqual(self.decisions, [TurnDecision(True, "model", 0.93, 12.5)])
        self.assertEqual(self.clock.getDelayedCalls(), [])  # the ceiling was disarmed
        self.clock.advance(5)
        self.assertEqual(len(self.ends), 1)

    def test_incomplete_waits_for_the_ceiling(self):
        self.e.paused(np.ones(1600, dtype=np.int16))
        self.detector.answer(0.08)
        self.assertEqual(self.decisions, [TurnDecision(False, "model", 0.08, 12.5)])
        self.clock.advance(1.29)  # the quiet is 200 + 1290 ms: not yet the 1500 ms ceiling
        self.assertEqual(self.ends, [])
        self.clock.advance(0.01)
        self.assertEqual(len(self.ends), 1)
        self.assertEqual(self.decisions[-1], TurnDecision(True, "timeout"))

    def test_threshold_is_inclusive_and_configurable(self):
        e = TurnEndpointer(self.clock, self.detector, EouOptions(threshold=0.7), on_decision=self.decisions.append)
        e.on_end = lambda: self.ends.append("end")
        e.paused(np.ones(10, dtype=np.int16))
        self.detector.answer(0.69)
        self.assertEqual(self.ends, [])
        e.resumed()
        e.paused(np.ones(10, dtype=np.int16))
        self.detector.answer(0.7)
        self.assertEqual(self.ends, ["end"])

    def test_speech_resuming_cancels_the_pending_decision(self):
        self.e.paused(np.ones(1600, dtype=np.int16))
        self.clock.advance(0.1)
        self.e.resumed()
        self.detector.answer(0.99)  # too late: the caller is talking again
        self.clock.advance(10)  # and no ceiling either
        self.assertEqual((self.ends, self.decisions), ([], []))
        self.assertFalse(self.e.waiting)

    def test_resuming_after_incomplete_then_complete(self):
        self.e.paused(np.ones(1600, dtype=np.int16))
        self.detector.answer(0.1)
        self.clock.advance(1.0)
        self.e.resumed()
        self.clock.advance(2.0)
        self.e.paused(np.ones(3200, dtype=np.int16))  # the next pause asks about the longer turn
        self.assertEqual(self.detector.calls[-1][0].size, 3200)
        self.detector.answer(0.8)
        self.assertEqual(self.ends, [3.0])
        self.assertEqual([d.completed for d in self.decisions], [False, True])

    def test_detector_failure_leaves_the_ceiling(self):
        self.e.paused(np.ones(1600, dtype=np.int16))
        self.detector.calls[-1][1].errback(RuntimeError("model broke"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.clock.advance(1.3)
        self.assertEqual(len(self.ends), 1)
        self.assertEqual(self.decisions, [TurnDecision(True, "timeout")])

    def test_an_answer_after_the_ceiling_is_ignored(self):
        self.e.paused(np.ones(1600, dtype=np.int16))
        self.clock.advance(1.3)
        self.assertEqual(len(self.ends), 1)
        self.detector.answer(0.99)
        self.assertEqual(len(self.ends), 1)
        self.assertEqual(self.decisions, [TurnDecision(True, "timeout")])

    def test_reset_forgets_everything(self):
        self.e.paused(np.ones(1600, dtype=np.int16))
        self.e.reset()
        self.detector.answer(0.99)
        self.clock.advance(5)
        self.assertEqual(self.ends, [])

    def test_a_pause_timed_from_the_call_vads_speech_end(self):
        """The call's VAD reports the end 130 ms after the voice stopped: the question comes 70 ms later (200 ms
        after the voice), about the audio then; the ceiling still counts from where the quiet began."""
        audio = []
        self.e.speech_ended(130, lambda: audio.append(self.clock.seconds()) or np.ones(1600, dtype=np.int16))
        self.clock.advance(0.069)
        self.assertEqual(self.detector.calls, [])
        self.clock.advance(0.001)
        self.assertEqual(len(self.detector.calls), 1)
        self.assertAlmostEqual(audio[0], 0.07)
        self.detector.answer(0.1)
        self.clock.advance(1.5 - 0.2 - 0.001)  # ceiling 1500 ms after the voice stopped = 1370 ms from now
        self.assertEqual(self.ends, [])
        self.clock.advance(0.001)
        self.assertEqual(len(self.ends), 1)
        self.assertAlmostEqual(self.ends[0], 1.37)
        self.assertEqual([d.reason for d in self.decisions], ["model", "timeout"])

    def test_a_vad_that_waited_longer_than_the_pause_asks_at_once(self):
        self.e.speech_ended(300, lambda: np.ones(10, dtype=np.int16))
        self.assertEqual(len(self.detector.calls), 1)
        self.detector.answer(0.2)
        self.clock.advance(1.2 - 0.001)  # the quiet was 300 ms already: 1200 ms to the ceiling
        self.assertEqual(self.ends, [])
        self.clock.advance(0.001)
        self.assertEqual(len(self.ends), 1)

    def test_speech_before_the_pause_is_due_cancels_it(self):
        self.e.speech_ended(100, lambda: np.ones(10, dtype=np.int16))
        self.clock.advance(0.05)
        self.e.resumed()
        self.clock.advance(5)
        self.assertEqual((self.detector.calls, self.ends, self.decisions), ([], [], []))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_voice_heard_meanwhile_leaves_the_recognisers_pause(self):
        quiet = [False]
        self.e.speech_ended(100, lambda: np.ones(10, dtype=np.int16), still_quiet=lambda: quiet[0])
        self.clock.advance(0.1)
        self.assertEqual(self.detector.calls, [])  # a short word came: not a pause
        self.assertFalse(self.e.waiting)
        self.e.paused(np.ones(20, dtype=np.int16))  # the recogniser's own pause, later
        self.assertEqual(len(self.detector.calls), 1)

    def test_incomplete_early_gets_a_second_look_at_the_recognisers_pause(self):
        """Smart Turn scores finished sentences low after only ~200-300 ms of quiet: an "incomplete" from the
        call VAD's early question is looked at again when the recogniser's own pause comes, and only then;
        the ceiling still counts from the quiet's start."""
        self.e.speech_ended(120, lambda: np.ones(10, dtype=np.int16))
        self.clock.advance(0.08)
        self.detector.answer(0.2)
        self.clock.advance(0.1)
        self.e.paused(np.ones(30, dtype=np.int16))  # the recogniser's pause: the second look
        self.assertEqual([pcm.size for pcm, _ in self.detector.calls], [10, 30])
        self.detector.answer(0.3)
        self.e.speech_ended(400, lambda: np.ones(50, dtype=np.int16))  # no third look at the same pause
        self.assertEqual(len(self.detector.calls), 2)
        self.clock.advance(1.19)  # at 1.37 s: the voice stopped 1.49 s ago
        self.assertEqual(self.ends, [])
        self.clock.advance(0.02)  # the ceiling came at 1.38 s: 1500 ms after the voice stopped
        self.assertEqual(len(self.ends), 1)
        self.assertEqual([(d.completed, d.reason) for d in self.decisions],
                         [(False, "model"), (False, "model"), (True, "timeout")])

    def test_a_second_look_does_not_wait_for_a_slow_early_answer(self):
        """On a loaded machine the early look may still be running at the recogniser's pause: the second look
        starts beside it, so the turn ends no later than with the recogniser's pause alone."""
        self.e.speech_ended(120, lambda: np.ones(10, dtype=np.int16))
        self.clock.advance(0.08)
        self.e.paused(np.ones(30, dtype=np.int16))  # the early question is still being answered
        self.assertEqual([pcm.size for pcm, _ in self.detector.calls], [10, 30])
        self.detector.answer(0.2, index=0)
        self.assertEqual(self.ends, [])
        self.detector.answer(0.9, index=1)
        self.assertEqual(len(self.ends), 1)
        self.assertEqual([(d.probability, d.early) for d in self.decisions], [(0.2, True), (0.9, False)])

    def test_the_first_complete_of_two_running_looks_ends_the_turn(self):
        self.e.speech_ended(120, lambda: np.ones(10, dtype=np.int16))
        self.clock.advance(0.08)
        self.e.paused(np.ones(30, dtype=np.int16))
        self.detector.answer(0.95, index=0)  # the early look, surer than earlyThreshold
        self.assertEqual(len(self.ends), 1)
        self.assertTrue(self.detector.calls[1][1].called)  # the second look was withdrawn
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_an_early_answer_after_the_second_looks_does_not_count(self):
        self.e.speech_ended(120, lambda: np.ones(10, dtype=np.int16))
        self.clock.advance(0.08)
        self.e.paused(np.ones(30, dtype=np.int16))
        self.detector.answer(0.3, index=1)  # the second look: not finished
        self.detector.answer(0.95, index=0)  # the early look, about less quiet, comes later: ignored
        self.assertEqual(self.ends, [])
        self.assertEqual([d.probability for d in self.decisions], [0.3])
        self.clock.advance(1.5)
        self.assertEqual(len(self.ends), 1)  # the ceiling

    def test_a_failed_early_look_leaves_the_second(self):
        self.e.speech_ended(120, lambda: np.ones(10, dtype=np.int16))
        self.clock.advance(0.08)
        self.e.paused(np.ones(30, dtype=np.int16))
        self.detector.calls[0][1].errback(RuntimeError("model broke"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual([pcm.size for pcm, _ in self.detector.calls], [10, 30])
        self.detector.answer(0.9)
        self.assertEqual(len(self.ends), 1)

    def test_complete_early_needs_no_second_look(self):
        self.e.speech_ended(120, lambda: np.ones(10, dtype=np.int16))
        self.clock.advance(0.08)
        self.detector.answer(0.8)  # at earlyThreshold: the turn ends before the recogniser's pause
        self.assertEqual((len(self.detector.calls), len(self.ends)), (1, 1))
        self.assertFalse(self.e.waiting)

    def test_the_early_look_must_be_surer(self):
        """``earlyThreshold`` (0.8): after only ``pauseMs`` of quiet a 0.7 does not end the turn (Smart Turn
        scored a flite "my number is five five five and" 0.70 there); the second look's 0.6 does."""
        self.e.speech_ended(120, lambda: np.ones(10, dtype=np.int16))
        self.clock.advance(0.08)
        self.detector.answer(0.7)
        self.assertEqual(self.ends, [])
        self.e.paused(np.ones(30, dtype=np.int16))
        self.detector.answer(0.6)
        self.assertEqual(len(self.ends), 1)
        self.assertEqual([(d.completed, d.probability) for d in self.decisions], [(False, 0.7), (True, 0.6)])
        e = TurnEndpointer(self.clock, self.detector, EouOptions(threshold=0.5, earlyThreshold=0.6, earlyLook=True))
        e.on_end = lambda: self.ends.append("custom")
        e.speech_ended(200, lambda: np.ones(10, dtype=np.int16))
        self.detector.answer(0.65)
        self.assertEqual(self.ends[-1], "custom")

    def test_the_recognisers_pause_first_then_the_call_vads_report(self):
        self.e.paused(np.ones(30, dtype=np.int16))  # no early question (late silero batch): one question
        self.e.speech_ended(100, lambda: np.ones(10, dtype=np.int16))
        self.clock.advance(0.2)
        self.detector.answer(0.1)
        self.assertEqual([pcm.size for pcm, _ in self.detector.calls], [30])

    def test_a_synchronous_detector(self):
        class Instant:
            name = "instant"

            def analyze(self, pcm):
                return defer.succeed(TurnPrediction(0.9, 1.0))

        e = TurnEndpointer(self.clock, Instant(), EouOptions())
        e.on_end = lambda: self.ends.append("end")
        e.paused(np.ones(10, dtype=np.int16))
        self.assertEqual(self.ends, ["end"])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class OptionTests(unittest.TestCase):
    def test_defaults(self):
        o = EouOptions.from_dict({})
        self.assertEqual((o.type, o.threshold, o.pauseMs, o.timeout), ("smart_turn", 0.5, 200, 1500))
        self.assertEqual((o.earlyLook, o.earlyThreshold), (False, 0.8))

    def test_wire_option_round_trip(self):
        option = cmd.CallOption.from_dict({"eou": {"type": "smart_turn", "threshold": 0.6, "pauseMs": 250,
                                                   "timeout": 2000, "earlyThreshold": 0.9, "earlyLook": True}}).eou
        o = EouOptions.from_dict(option.to_dict())
        self.assertEqual((o.threshold, o.pauseMs, o.timeout, o.earlyThreshold, o.earlyLook), (0.6, 250, 2000, 0.9, True))

    def test_bad_values_name_the_key(self):
        for bad, key in (({"threshold": 1.5}, "eou.threshold"), ({"threshold": "high"}, "eou.threshold"),
                         ({"pauseMs": 10}, "eou.pauseMs"), ({"pauseMs": 300, "timeout": 200}, "eou.timeout"),
                         ({"earlyThreshold": 0}, "eou.earlyThreshold"),
                         ({"earlyThreshold": "sure"}, "eou.earlyThreshold"), ({"earlyLook": "yes"}, "eou.earlyLook")):
            e = self.assertRaises(OptionError, EouOptions.from_dict, bad)
            self.assertIn(key, str(e))

    def test_registry(self):
        self.assertIsNone(registry.create_eou_detector({"type": "none"}))
        self.assertIsInstance(registry.create_eou_detector({}), SmartTurnDetector)
        e = self.assertRaises(ProviderNotFound, registry.create_eou_detector, {"type": "livekit"})
        self.assertIn("none, smart_turn", str(e))

    def test_a_missing_model_file_fails_at_set_up(self):
        e = self.assertRaises(Exception, registry.create_eou_detector, {"extra": {"model": "/nonexistent.onnx"}})
        self.assertIn("/nonexistent.onnx", str(e))

    def test_playbooks_turn_it_on_by_default(self):
        option = playbook_call_option(parse_playbook("---\nasr: {provider: pocketsphinx}\n---\nHi\n"))
        self.assertEqual(option.eou.type, "smart_turn")
        option = playbook_call_option(parse_playbook("---\neou: {type: none}\n---\nHi\n"))
        self.assertEqual(option.eou.type, "none")
        option = playbook_call_option(parse_playbook("---\neou: {threshold: 0.7, pauseMs: 300, timeout: 2500}\n---\n"))
        self.assertEqual((option.eou.threshold, option.eou.pauseMs, option.eou.timeout), (0.7, 300, 2500))


# -- the recogniser's endpointing with an endpointer -----------------------------------------------------


class EchoRecognizer(StreamingRecognizer):
    """Decodes nothing: each final says how many samples its utterance had."""

    name = "echo"

    def _begin(self):
        self.samples = 0

    def _decode(self, pcm):
        self.samples += pcm.size
        return None

    def _finish(self, pcm):
        return f"utterance of {self.samples + pcm.size} samples"


def _sync(f, *args):
    return defer.maybeDeferred(f, *args)


class RecognizerEndpointingTests(unittest.TestCase):
    """flite speech with an 800 ms pause inside the turn, fed frame by frame with the clock in step."""

    @defer.inlineCallbacks
    def setUp(self):
        first = yield synthesize_pcm("My number is five five five")
        second = yield synthesize_pcm("and then one two three.")
        a, b = speech_extent(first)
        c, d = speech_extent(second)
        gap = np.zeros(12800, dtype=np.int16)  # 800 ms: the 500 ms default cuts here (webrtcvad hangs on ~100 ms)
        self.pcm = np.concatenate([first[a:b], gap, second[c:d], np.zeros(2 * 16000, dtype=np.int16)])
        self.speech_end_ms = (b - a + gap.size + d - c) * 1000 // 16000

    def run_call(self, endpointer=None):
        clock = task.Clock()
        results = []
        asr = EchoRecognizer(AsrOptions(provider="echo"), results.append, reactor=clock, run_in_thread=_sync)
        if endpointer is not None:
            endpointer.clock = clock
            self.assertTrue(asr.endpoint_with(endpointer))
        for frame in frames(self.pcm):
            asr.feed(frame)
            clock.advance(0.02)
        return [r for r in results if r.final]

    def test_silence_alone_cuts_the_turn_at_the_pause(self):
        self.assertEqual(len(self.run_call()), 2)

    def test_incomplete_at_the_pause_keeps_one_utterance(self):
        detector = FakeDetector()
        verdicts = iter([0.1, 0.9])  # the pause inside the turn, then its end
        detector.analyze = lambda pcm: (detector.calls.append((pcm, None)),
                                        defer.succeed(TurnPrediction(next(verdicts), 5.0)))[1]
        decisions = []
        finals = self.run_call(TurnEndpointer(None, detector, EouOptions(), on_decision=decisions.append))
        self.assertEqual(len(finals), 1)
        self.assertEqual([d.completed for d in decisions], [False, True])
        first_audio, second_audio = (pcm for pcm, _ in detector.calls)
        self.assertGreater(second_audio.size, first_audio.size)  # the whole turn so far, pre-roll included
        self.assertEqual(second_audio.dtype, np.int16)
        # the model said "complete" at the first 200-ms pause: the final came well before the 500 ms default
        self.assertLess(finals[0].end_ms - self.speech_end_ms, 400)

    def test_pending_audio_is_decoded_when_the_caller_pauses(self):
        """At each pause the decoder gets everything heard so far, before the detector answers: only the
        pause's audio is left for the final (docs/speech.md, "What streams")."""
        detector = FakeDetector()
        decoded_at_pause = []
        asr_box = []

        def analyze(pcm):
            asr = asr_box[0]
            decoded_at_pause.append((asr.samples, asr._fed - asr._utt.start_sample))
            return defer.succeed(TurnPrediction(0.9, 5.0))

        detector.analyze = analyze
        original = EchoRecognizer.endpoint_with

        def capture(asr, endpointer):
            asr_box.append(asr)
            return original(asr, endpointer)

        self.patch(EchoRecognizer, "endpoint_with", capture)
        self.run_call(TurnEndpointer(None, detector, EouOptions()))
        self.assertTrue(decoded_at_pause)
        for decoded, heard in decoded_at_pause:  # all but the frame whose VAD verdict was the pause
            self.assertLessEqual(heard - decoded, 320)

    def test_always_incomplete_ends_at_the_ceiling(self):
        detector = FakeDetector()
        detector.analyze = lambda pcm: defer.succeed(TurnPrediction(0.05, 5.0))
        decisions = []
        finals = self.run_call(TurnEndpointer(None, detector, EouOptions(timeout=1500),
                                              on_decision=decisions.append))
        self.assertEqual(len(finals), 1)
        self.assertEqual(decisions[-1], TurnDecision(True, "timeout"))
        self.assertGreaterEqual(finals[0].end_ms - self.speech_end_ms, 1500)

    def test_external_endpointing_is_left_alone(self):
        asr = EchoRecognizer(AsrOptions(provider="echo", extra={"endpointing": "external"}), list.append,
                             reactor=task.Clock(), run_in_thread=_sync)
        self.assertFalse(asr.endpoint_with(TurnEndpointer(task.Clock(), FakeDetector(), EouOptions())))


# -- the call's events ---------------------------------------------------------------------------------


class FakeSession:
    id = "s1"

    def __init__(self):
        self.clock = task.Clock()
        self.events = []

    def now(self):
        return int(self.clock.seconds() * 1000)

    def emit(self, event):
        self.events.append(event)


class VadPauseTests(unittest.TestCase):
    """The call's VAD (silero) hears the speech end before the recogniser's own pause: with an end-of-turn
    endpointer, its ``SpeechEnded`` has the recogniser decode the words so far at once
    (``speech_paused``); without one (the recogniser ends utterances itself) nothing changes."""

    def attach(self, eou):
        from activecall.call import speech as call_speech
        from activecall.speech import defaults as speech_defaults, registry
        from activecall.speech.base import SpeechEnded, SpeechStarted

        s = FakeSession()
        s.realtime_controller = None
        s.leg, s.audio_sinks, s.option = None, [], cmd.CallOption(
            vad=cmd.VadOption(type="fake"), asr=cmd.TranscriptionOption(provider="echo"), eou=eou,
            interruption=cmd.InterruptionOption(echoCancel=False))
        s.speech = speech_defaults.for_call(s.option.vad.to_dict(), s.option.asr.to_dict(), None, None)
        s.error = lambda *a, **k: self.fail(f"error {a}")
        vad_events = []

        class Vad:
            name = "fake"

            def __init__(self, on_event):
                vad_events.append(on_event)

            def feed(self, pcm):
                pass

        paused = []

        class Recognizer(EchoRecognizer):
            def speech_paused(self):
                paused.append(True)
                super().speech_paused()

        self.patch(registry, "create_vad", lambda options, on_event, **deps: Vad(on_event))
        self.patch(registry, "create_recognizer", lambda options, on_result, **deps: Recognizer(
            AsrOptions(provider="echo"), on_result, reactor=s.clock, run_in_thread=_sync))
        self.patch(registry, "create_eou_detector", lambda options, **deps: (
            None if (options or {}).get("type") == "none" else _FakeSmartTurn()))
        processors = call_speech.attach_processors(s)
        on_vad = vad_events[0]
        on_vad(SpeechStarted(0))
        on_vad(SpeechEnded(0, 900))
        return s, processors, paused

    def test_speech_end_decodes_the_words_so_far_with_an_endpointer(self):
        s, processors, paused = self.attach(cmd.EouOption(type="smart_turn"))
        self.assertIsNotNone(processors.endpointer)
        self.assertEqual(paused, [True])
        self.assertEqual([e.TAG for e in s.events if e.TAG in ("speaking", "silence")], ["speaking", "silence"])

    def test_no_endpointer_no_early_decode(self):
        s, processors, paused = self.attach(cmd.EouOption(type="none"))
        self.assertIsNone(processors.endpointer)
        self.assertEqual(paused, [])


class CallVadPauseTests(unittest.TestCase):
    """The call's VAD (here ``ScriptedVad``: it knows where flite's voice is and reports it with silero's
    padding) times the end-of-turn pause; the recogniser's webrtcvad (it hears each clip's tail ~100 ms
    longer) is the fallback.  Frames and the clock go in step; stream times are counted in samples."""

    @defer.inlineCallbacks
    def setUp(self):
        first = yield synthesize_pcm("My number is five five five")
        second = yield synthesize_pcm("and then one two three.")
        a, b = speech_extent(first)
        c, d = speech_extent(second)
        self.first, self.second = first[a:b], second[c:d]

    def run_call(self, gap_ms, verdicts, eou=None, call_vad=True):
        from activecall.call import speech as call_speech
        from activecall.speech import defaults as speech_defaults
        from activecall.testing import ScriptedVad

        first_ms = self.first.size * 1000 // 16000
        second_start = first_ms + gap_ms
        self.segments = [(0, first_ms), (second_start, second_start + self.second.size * 1000 // 16000)]
        pcm = np.concatenate([self.first, np.zeros(gap_ms * 16, dtype=np.int16), self.second,
                              np.zeros(2 * 16000, dtype=np.int16)])
        s = FakeSession()
        s.realtime_controller = None
        s.leg, s.audio_sinks = None, []
        s.option = cmd.CallOption(vad=cmd.VadOption(type="silero") if call_vad else None,
                                  asr=cmd.TranscriptionOption(provider="echo"),
                                  eou=eou or cmd.EouOption(type="smart_turn"),
                                  interruption=cmd.InterruptionOption(echoCancel=False))
        s.speech = speech_defaults.for_call(s.option.vad.to_dict() if call_vad else None,
                                            s.option.asr.to_dict(), None, None)
        s.error = lambda *a, **k: self.fail(f"error {a}")
        results, asked, box = [], [], {}
        verdicts = iter(list(verdicts) + [verdicts[-1]] * 10)
        detector = _FakeSmartTurn()

        def analyze(pcm):
            asr = box["asr"]
            asked.append({"heard_ms": asr._fed * 1000 // 16000, "samples": pcm.size,
                          "asr_vad_speaking": asr._vad.segmenter.speaking})
            return defer.succeed(TurnPrediction(next(verdicts), 7.0))

        detector.analyze = analyze
        detector.options = EouOptions.from_dict({"earlyLook": True, **(eou.to_dict() if eou is not None else {})})

        def recognizer(options, on_result, **deps):
            box["asr"] = EchoRecognizer(AsrOptions(provider="echo"), lambda r: (results.append(r), on_result(r)),
                                        reactor=s.clock, run_in_thread=_sync)
            return box["asr"]

        self.patch(registry, "create_vad", lambda options, on_event, **deps: ScriptedVad(self.segments, on_event))
        self.patch(registry, "create_recognizer", recognizer)
        self.patch(registry, "create_eou_detector", lambda options, **deps: detector)
        processors = call_speech.attach_processors(s)
        self.assertIsNotNone(processors.endpointer)
        for frame in frames(pcm):
            processors.feed(frame)
            s.clock.advance(0.02)
        return [r for r in results if r.final], asked, s

    def test_mid_sentence_pause_held_open_asked_at_the_vads_end_plus_pause(self):
        # the mid-sentence pause: early question and second look both "incomplete"; the turn's end: "complete"
        finals, asked, s = self.run_call(800, [0.1, 0.1, 0.9])
        self.assertEqual(len(finals), 1)  # "... five five five" [800 ms] "and then ...": one turn
        self.assertEqual(len(asked), 3)
        first_end, second_end = self.segments[0][1], self.segments[1][1]
        # 200 ms after the voice stopped (the call VAD's 100 ms padding counted in), within a 20 ms frame
        self.assertTrue(180 <= asked[0]["heard_ms"] - first_end <= 220, asked[0])
        self.assertTrue(asked[0]["asr_vad_speaking"])  # before the recogniser's own pause ...
        self.assertFalse(asked[1]["asr_vad_speaking"])  # ... which takes the second look
        self.assertGreater(asked[1]["heard_ms"], asked[0]["heard_ms"])
        self.assertTrue(180 <= asked[2]["heard_ms"] - second_end <= 220, asked[2])
        eous = [e for e in s.events if e.TAG == "eou"]
        self.assertEqual([(e.completed, e.probability, e.inferenceMs) for e in eous],
                         [(False, 0.1, 7), (False, 0.1, 7), (True, 0.9, 7)])
        metrics = [e.data for e in s.events if e.TAG == "metrics" and e.key == "eou.smart_turn"]
        self.assertEqual(metrics, [{"probability": 0.1, "completed": False, "early": True},
                                   {"probability": 0.1, "completed": False},
                                   {"probability": 0.9, "completed": True, "early": True}])
        # the same call without a call VAD: the recogniser's pause asks, later
        finals_fallback, asked_fallback, _ = self.run_call(800, [0.1, 0.9], call_vad=False)
        self.assertEqual(len(finals_fallback), 1)
        self.assertEqual(len(asked_fallback), 2)
        self.assertGreater(asked_fallback[1]["heard_ms"], asked[2]["heard_ms"])
        self.assertGreater(finals_fallback[0].end_ms, finals[0].end_ms)

    def test_off_by_default_the_recognisers_pause_asks_as_before(self):
        """Without ``eou.earlyLook`` (the default) a call VAD changes nothing: the same questions, at the same
        stream times, as without one."""
        finals, asked, _ = self.run_call(800, [0.1, 0.9], eou=cmd.EouOption(type="smart_turn", earlyLook=False))
        self.assertEqual(len(finals), 1)
        self.assertEqual(len(asked), 2)
        self.assertFalse(any(a["asr_vad_speaking"] for a in asked))
        _, asked_without_vad, _ = self.run_call(800, [0.1, 0.9], call_vad=False)
        self.assertEqual([a["heard_ms"] for a in asked], [a["heard_ms"] for a in asked_without_vad])
        self.assertFalse(EouOptions().earlyLook)

    def test_the_recognisers_pause_is_the_second_look(self):
        """An early "incomplete" at the turn's end is looked at again at the recogniser's pause, which ends
        the turn as it would have without the early question."""
        finals, asked, _ = self.run_call(800, [0.1, 0.1, 0.3, 0.9])
        self.assertEqual(len(finals), 1)
        self.assertEqual(len(asked), 4)
        self.assertFalse(asked[3]["asr_vad_speaking"])

    def test_a_short_word_before_the_pause_is_due_is_no_pause(self):
        """The voice comes back 150 ms after it stopped: the call VAD reported the end (100 ms padding), its
        next start comes only 250 ms into the words, but the question due at 200 ms sees the voice and is not
        asked; the recogniser's webrtcvad never paused there, so the turn is judged once, at its end."""
        finals, asked, _ = self.run_call(150, [0.9])
        self.assertEqual(len(asked), 1)
        self.assertEqual(len(finals), 1)
        self.assertGreater(asked[0]["heard_ms"], self.segments[1][1])

    def test_a_turn_ended_while_the_recognisers_vad_hears_on_loses_no_words(self):
        """The model says complete 200 ms after "five five five"; the recogniser's webrtcvad still hears the
        tail (its segment is open) when the caller goes on 250 ms after the pause began: no start from it,
        so the call VAD's start opens the next utterance, with its pre-roll."""
        finals, asked, _ = self.run_call(250, [0.9, 0.9])
        self.assertTrue(asked[0]["asr_vad_speaking"])
        self.assertEqual(len(finals), 2)
        second_samples = int(finals[1].text.split()[2])
        self.assertGreaterEqual(second_samples, self.second.size)
        self.assertEqual(len(asked), 2)

    def test_always_incomplete_ends_at_the_ceiling_from_the_vads_end(self):
        finals, asked, s = self.run_call(800, [0.05], eou=cmd.EouOption(type="smart_turn", timeout=1500))
        self.assertEqual(len(finals), 1)
        self.assertEqual(len(asked), 4)  # two looks at each pause
        eous = [e for e in s.events if e.TAG == "eou"]
        self.assertEqual([e.completed for e in eous], [False, False, False, False, True])
        self.assertIsNone(eous[-1].probability)  # the ceiling's verdict
        # 1500 ms after the voice stopped, within two frames (a synchronous VAD's event comes before the
        # recogniser is fed that frame, so the pause it reports is a frame short)
        self.assertTrue(1500 <= finals[0].end_ms - self.segments[1][1] <= 1540, finals[0].end_ms)


class _FakeSmartTurn(FakeDetector):
    name = "smart_turn"
    options = EouOptions()


class CallEventTests(unittest.TestCase):
    def attach(self, option, recognizer=None):
        s = FakeSession()
        processors = SpeechProcessors(s, recognizer=recognizer or EchoRecognizer(
            AsrOptions(provider="echo"), list.append, reactor=s.clock, run_in_thread=_sync), asr_provider="echo")
        detector = FakeDetector()
        endpointer = attach_end_of_turn(s, processors, option, model=object())
        if endpointer is not None:
            endpointer.detector = detector
        return s, endpointer, detector

    def test_verdicts_become_eou_and_metrics_events(self):
        s, endpointer, detector = self.attach(cmd.EouOption(type="smart_turn"))
        endpointer.paused(np.ones(1600, dtype=np.int16))
        detector.answer(0.12345678)
        s.clock.advance(1.3)
        eou1, metrics, eou2 = s.events
        self.assertEqual((eou1.completed, eou1.probability, eou1.inferenceMs), (False, 0.1235, 12))
        self.assertEqual(ev.to_wire(eou1), {"event": "eou", "trackId": "s1", "timestamp": 0, "completed": False,
                                            "probability": 0.1235, "inferenceMs": 12})
        self.assertEqual((metrics.key, metrics.duration, metrics.data),
                         ("eou.smart_turn", 12, {"probability": 0.1235, "completed": False}))
        self.assertEqual(ev.to_wire(eou2), {"event": "eou", "trackId": "s1", "timestamp": 1300, "completed": True})

    def test_none_and_absent_turn_it_off(self):
        self.assertIsNone(self.attach(None)[1])
        self.assertIsNone(self.attach(cmd.EouOption(type="none"))[1])

    def test_a_recogniser_that_ends_sentences_itself_keeps_doing_so(self):
        class Cloud:
            name = "cloud"

        s, endpointer, _ = self.attach(cmd.EouOption(), recognizer=Cloud())
        self.assertIsNone(endpointer)


# -- the model -------------------------------------------------------------------------------------------


def _pinned_signal() -> np.ndarray:
    t = np.arange(3 * 16000) / 16000.0
    x = (0.3 * np.sin(2 * np.pi * (200 + 600 * t) * t) + 0.05 * np.sin(2 * np.pi * 3000 * t)).astype(np.float32)
    return features.last_window(x)


class FeatureTests(unittest.TestCase):
    def test_matches_the_reference_implementation(self):
        """Values computed with Pipecat's ``compute_whisper_log_mel_features`` (pipecat-ai 1.14.0) on this input."""
        mel = features.log_mel(_pinned_signal())
        self.assertEqual((mel.shape, mel.dtype), ((80, 800), np.float32))
        for (i, j), want in {(0, 0): -0.21874763071537018, (79, 799): -0.18938897550106049,
                             (5, 799): -0.09302684664726257, (20, 500): 0.721215009689331,
                             (22, 565): 0.9158119559288025, (46, 646): 0.3995816111564636,
                             (6, 500): 1.528199315071106, (55, 556): 1.2309998273849487}.items():
            self.assertAlmostEqual(float(mel[i, j]), want, places=5, msg=(i, j))
        self.assertAlmostEqual(float(mel.astype(np.float64).sum()), -9729.685101750216, delta=0.05)

    def test_last_window_pads_at_the_start_and_keeps_the_end(self):
        x = np.arange(10, dtype=np.float32)
        w = features.last_window(x)
        self.assertEqual(w.size, features.WINDOW_SAMPLES)
        self.assertTrue(np.array_equal(w[-10:], x))
        long = np.arange(features.WINDOW_SAMPLES + 5, dtype=np.float32)
        self.assertEqual(features.last_window(long)[0], 5)


def _turn(pcm: np.ndarray) -> np.ndarray:
    """A turn as the detector gets it: the speech (flite's padding cut off) and a 200 ms pause."""
    a, b = speech_extent(pcm)
    return np.concatenate([pcm[a:b], np.zeros(3200, dtype=np.int16)])


class SmartTurnModelTests(unittest.TestCase):
    """Smart Turn v3.2 on fixed flite clips (voice rms).  flite's robotic voice confuses the model on some
    sentences and voices (awb, kal16; docs/speech.md); these are clips it separates by a wide margin."""

    @defer.inlineCallbacks
    def test_complete_sentence_against_trailing_off(self):
        model = shared_model()
        complete = model.predict(_turn((yield synthesize_pcm(COMPLETE))))
        for text in INCOMPLETE:
            incomplete = model.predict(_turn((yield synthesize_pcm(text))))
            self.assertGreater(complete, 0.5, COMPLETE)  # measured 0.96
            self.assertLess(incomplete, 0.5, text)  # measured 0.06 and 0.01
            self.assertGreater(complete - incomplete, 0.5, text)

    def test_silence_and_float_input(self):
        model = shared_model()
        p = model.predict(np.zeros(16000, dtype=np.int16))
        self.assertTrue(0.0 <= p <= 1.0)
        self.assertAlmostEqual(model.predict(np.zeros(16000, dtype=np.float32)), p, places=6)

    @defer.inlineCallbacks
    def test_mandarin_through_features_and_inference(self):
        """espeak-ng's Mandarin voice (the only offline Chinese TTS here): the model runs on it and answers a
        probability, but it scores espeak-ng's complete and unfinished sentences alike (all ~0.7-0.98), so
        only the path is tested, not the verdict."""
        if shutil.which("espeak-ng") is None:
            raise unittest.SkipTest("espeak-ng is not installed (tools/install-debian-deps)")
        model = shared_model()
        for text in ("我想查询一下我的订单状态。", "我的电话号码是一三八"):
            data = yield utils.getProcessOutput("espeak-ng", ["-v", "cmn", "--stdout", text], errortoo=False)
            pcm = resample(*_wav(data), 16000)
            self.assertGreater(pcm.size, 8000, text)
            mel = features.log_mel(features.last_window(_turn(pcm).astype(np.float32) / 32768))
            self.assertTrue(np.isfinite(mel).all())
            p = model.predict(_turn(pcm))
            self.assertTrue(0.0 <= p <= 1.0, (text, p))


def _wav(data: bytes) -> tuple[np.ndarray, int]:
    with wave.open(io.BytesIO(data)) as w:  # espeak-ng's stdout WAV has a streaming (huge) length
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2"), w.getframerate()


class OffTheReactorTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_inference_runs_on_a_worker_thread(self):
        reactor_thread = threading.get_ident()
        seen = []
        real = shared_model()

        class Watched:
            def predict(self, pcm):
                seen.append(threading.get_ident())
                return real.predict(pcm)

        detector = SmartTurnDetector(EouOptions(), model=Watched())
        prediction = yield detector.analyze(np.zeros(16000, dtype=np.int16))
        self.assertEqual(len(seen), 1)
        self.assertNotEqual(seen[0], reactor_thread)
        self.assertIsInstance(prediction, TurnPrediction)
        self.assertTrue(0.0 <= prediction.probability <= 1.0)
        self.assertGreaterEqual(prediction.inference_ms, 0.0)

