"""The cheaper end of turn (issue 20, capacity) gives the verdicts it gave before: the features skipping the
zero padding are the reference's, the model's probabilities on the fixture clips are the reference path's, and
a question withdrawn before the detector's worker took it is skipped, never answered late.

Nothing here measures time: bench/bench_eou.py and bench/bench_turn_latency.py do (docs/benchmarks.md).
"""

from __future__ import annotations

import numpy as np
from twisted.internet import defer, task
from twisted.trial import unittest

from activecall.speech.eou import features
from activecall.speech.eou.base import EouOptions, TurnPrediction
from activecall.speech.eou.endpointer import TurnDecision, TurnEndpointer
from activecall.speech.eou.smart_turn import SmartTurnDetector, SmartTurnModel, shared_model
from activecall.speech.testing import speech_extent, synthesize_pcm

#: complete and trailing-off turns (tests/test_speech_eou.py's), in two flite voices
TEXTS = ["I would like to check the status of my order.", "my number is five five five and",
         "I want to check the status of my", "Can you tell me when the store opens tomorrow?", "Yes."]


def _reference_features(x: np.ndarray) -> np.ndarray:
    return features.log_mel(features.last_window(x))


class TurnFeatureTests(unittest.TestCase):
    """``turn_log_mel`` = ``log_mel(last_window(.))``, value for value, on every length that matters: no
    padding, padding inside the reflected edge (<= 200 samples), exactly a frame boundary, longer than 8 s."""

    def test_equal_to_the_reference_at_every_boundary(self):
        rng = np.random.default_rng(20)
        lengths = [0, 1, 159, 160, 199, 200, 201, 360, 361, 520, 16000, 40001, features.WINDOW_SAMPLES - 201,
                   features.WINDOW_SAMPLES - 200, features.WINDOW_SAMPLES - 1, features.WINDOW_SAMPLES,
                   features.WINDOW_SAMPLES + 7]
        for n in lengths:
            x = (rng.standard_normal(n) * 0.1).astype(np.float32)
            got, want = features.turn_log_mel(x), _reference_features(x)
            self.assertEqual((got.shape, got.dtype), ((80, 800), np.float32), n)
            self.assertTrue(np.array_equal(got, want), (n, float(np.abs(got - want).max())))

    def test_silence_and_a_constant(self):
        for x in (np.zeros(3000, dtype=np.float32), np.full(5000, 0.25, dtype=np.float32)):
            self.assertTrue(np.array_equal(features.turn_log_mel(x), _reference_features(x)))

    @defer.inlineCallbacks
    def test_equal_on_speech(self):
        for text in TEXTS[:2]:
            pcm = (yield synthesize_pcm(text)).astype(np.float32) / 32768
            self.assertTrue(np.array_equal(features.turn_log_mel(pcm), _reference_features(pcm)), text)


def _turn(pcm: np.ndarray) -> np.ndarray:
    a, b = speech_extent(pcm)
    return np.concatenate([pcm[a:b], np.zeros(3200, dtype=np.int16)])


class SameVerdictTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_probabilities_as_the_reference_path_gives_them(self):
        """``SmartTurnModel.predict`` (the features without the padding work, one thread, one BLAS thread)
        against the reference: ``log_mel(last_window(.))`` and the same session run, on complete and
        trailing-off turns in two voices, short (0.6 s) to long (> 8 s)."""
        model = shared_model()
        clips = []
        for voice in ("rms", "slt"):
            for text in TEXTS:
                clips.append((f"{voice}: {text}", _turn((yield synthesize_pcm(text, voice)))))
        clips.append(("long", np.concatenate([c for _, c in clips[:5]])))
        self.assertGreater(clips[-1][1].size, features.WINDOW_SAMPLES)
        for name, pcm in clips:
            mel = _reference_features(pcm.astype(np.float32) / 32768.0)
            (out,) = model.session.run(None, {"input_features": mel[None]})
            want = float(np.asarray(out).reshape(-1)[0])
            got = model.predict(pcm)
            self.assertAlmostEqual(got, want, delta=1e-6, msg=name)


class FakeDetector:
    name = "fake"

    def __init__(self):
        self.calls: list[defer.Deferred] = []
        self.cancelled: list[int] = []  # indices of the withdrawn questions

    def analyze(self, pcm):
        index = len(self.calls)
        d = defer.Deferred(lambda _: self.cancelled.append(index))
        self.calls.append(d)
        return d


class WithdrawTests(unittest.TestCase):
    """The endpointer withdraws (cancels) a question whose answer could no longer count."""

    def setUp(self):
        self.clock = task.Clock()
        self.detector = FakeDetector()
        self.decisions: list[TurnDecision] = []
        self.e = TurnEndpointer(self.clock, self.detector, EouOptions(pauseMs=200, timeout=1500),
                                on_decision=self.decisions.append)
        self.ends = []
        self.e.on_end = lambda: self.ends.append(self.clock.seconds())

    def test_speech_resuming_withdraws_the_question(self):
        self.e.paused(np.ones(1600, dtype=np.int16))
        self.e.resumed()
        self.assertEqual(self.detector.cancelled, [0])
        self.assertEqual(self.flushLoggedErrors(), [])  # a withdrawal is not a detector failure
        self.clock.advance(5)
        self.assertEqual((self.ends, self.decisions), ([], []))

    def test_the_ceiling_withdraws_the_question(self):
        self.e.paused(np.ones(1600, dtype=np.int16))
        self.clock.advance(1.3)
        self.assertEqual(self.decisions, [TurnDecision(True, "timeout")])
        self.assertEqual(self.detector.cancelled, [0])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_a_new_pause_withdraws_the_old_question_only(self):
        self.e.paused(np.ones(1600, dtype=np.int16))
        self.e.paused(np.ones(3200, dtype=np.int16))
        self.assertEqual(self.detector.cancelled, [0])
        self.detector.calls[1].callback(TurnPrediction(0.9, 1.0))
        self.assertEqual(len(self.ends), 1)

    def test_an_answer_is_not_withdrawn(self):
        self.e.paused(np.ones(1600, dtype=np.int16))
        self.detector.calls[0].callback(TurnPrediction(0.2, 1.0))
        self.e.resumed()  # nothing pending any more: nothing to cancel
        self.assertEqual(self.detector.cancelled, [])
        self.assertEqual(self.decisions, [TurnDecision(False, "model", 0.2, 1.0)])


class QueuedRuns:
    """A worker pool whose jobs run when the test says so."""

    def __init__(self):
        self.jobs: list = []

    def __call__(self, f, *args):
        d = defer.Deferred()
        self.jobs.append((f, args, d))
        return d

    def run(self, index=0):
        f, args, d = self.jobs.pop(index)
        d.callback(f(*args))


class CountingModel:
    def __init__(self, p=0.9):
        self.p = p
        self.runs = 0

    def predict(self, pcm):
        self.runs += 1
        return self.p


class DetectorSkipTests(unittest.TestCase):
    def setUp(self):
        self.pool = QueuedRuns()
        self.model = CountingModel()
        self.detector = SmartTurnDetector(EouOptions(), run_in_thread=self.pool, model=self.model)

    def test_a_withdrawn_job_is_not_run(self):
        d = self.detector.analyze(np.zeros(1600, dtype=np.int16))
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.pool.run()  # the worker takes the job after the withdrawal
        self.assertEqual((self.model.runs, self.detector.skipped), (0, 1))

    def test_a_job_runs_and_answers(self):
        d = self.detector.analyze(np.zeros(1600, dtype=np.int16))
        self.pool.run()
        prediction = self.successResultOf(d)
        self.assertEqual((prediction.probability, self.model.runs, self.detector.skipped), (0.9, 1, 0))

    def test_a_job_withdrawn_while_running_is_dropped(self):
        seen = []

        class Withdrawing:
            def predict(inner, pcm):
                seen.append(d.called)
                d.cancel()  # the caller withdraws while the worker runs the model
                return 0.7

        detector = SmartTurnDetector(EouOptions(), run_in_thread=self.pool, model=Withdrawing())
        d = detector.analyze(np.zeros(1600, dtype=np.int16))
        self.pool.run()
        self.assertEqual(seen, [False])
        self.failureResultOf(d, defer.CancelledError)  # no late answer after the cancellation

    def test_through_the_endpointer(self):
        e = TurnEndpointer(task.Clock(), self.detector, EouOptions())
        ends = []
        e.on_end = lambda: ends.append(1)
        e.paused(np.zeros(1600, dtype=np.int16))
        e.resumed()  # the caller talks again before a worker was free
        e.paused(np.zeros(3200, dtype=np.int16))
        self.pool.run(0)  # the withdrawn job: skipped
        self.pool.run(0)  # the current one: answered
        self.assertEqual((self.model.runs, self.detector.skipped, ends), (1, 1, [1]))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_a_run_under_way_is_stopped(self):
        """Withdrawn after the worker took the job: onnxruntime's terminate flag stops the real model's run,
        which ends as a skip, not as a detector failure."""
        real = shared_model()

        class Withdrawn(SmartTurnModel):
            def __init__(inner):
                inner.session, inner.path = real.session, real.path

            def predict(inner, pcm, run_options=None):
                d.cancel()  # the caller spoke again while the worker was starting the run
                return SmartTurnModel.predict(inner, pcm, run_options)

        detector = SmartTurnDetector(EouOptions(), run_in_thread=self.pool, model=Withdrawn())
        d = detector.analyze(np.zeros(16000, dtype=np.int16))
        self.pool.run()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(detector.skipped, 1)
        self.assertEqual(self.flushLoggedErrors(), [])
        # the shared session is not left terminated: the next question is answered
        again = SmartTurnDetector(EouOptions(), run_in_thread=self.pool, model=real)
        d2 = again.analyze(np.zeros(16000, dtype=np.int16))
        self.pool.run()
        self.assertTrue(0.0 <= self.successResultOf(d2).probability <= 1.0)
