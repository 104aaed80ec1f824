"""Smart Turn v3.2: an audio end-of-turn model run by onnxruntime, without torch.

Pipecat's Smart Turn (https://github.com/pipecat-ai/smart-turn, BSD-2-Clause,
Daily) is a Whisper-Tiny encoder with a small classification head, trained on
23 languages to say from the *sound* of the last seconds of speech (words,
intonation, pace) whether the speaker has finished their turn.  The int8 CPU
build, ``smart-turn-v3.2-cpu.onnx`` (8.7 MB), ships with activecall as package
data in ``activecall/speech/eou/data/`` (taken unmodified from the pipecat-ai
1.14.0 wheel; notice in ``data/LICENSE.smart-turn``); nothing is downloaded at
run time.

- ``SmartTurnModel.predict(audio)`` is the blocking part: the last 8 s of the
  turn's 16 kHz audio (zero-padded at the start when shorter, as Pipecat's
  reference does), Whisper log-mel features (``features.py``), one
  ``session.run``; it returns P(turn complete) in 0..1 (the model ends in a
  sigmoid).  onnxruntime runs with ``intra_op_num_threads=1`` and releases the
  GIL while it works.
- ``SmartTurnDetector`` (``IEndOfTurnDetector``) runs ``predict`` on a small
  thread pool of its own, never on the reactor (a run takes tens of
  milliseconds, docs/benchmarks.md), and answers with a Deferred.  One model
  (one onnxruntime session, thread-safe for ``run``) serves every call of the
  process; it is loaded and run once on the pool when the first detector is
  made, so the first call's first pause does not pay for that.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable, Optional

import numpy as np
from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import implementer

from activecall.audio import SAMPLE_RATE
from activecall.speech.base import SpeechError
from activecall.speech.eou import features
from activecall.speech.eou.base import EouOptions, IEndOfTurnDetector, TurnPrediction
from activecall.speech.installed import module_found, remembered

log = Logger(namespace="activecall.speech.eou")

MODEL_FILE = "smart-turn-v3.2-cpu.onnx"
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def model_path(path: Optional[str] = None) -> str:
    """``path`` (``eou.extra.model``: another Smart Turn v3 ONNX file), else the shipped model."""
    chosen = path or os.path.join(DATA_DIR, MODEL_FILE)
    if not os.path.isfile(chosen):
        raise SpeechError(f"eou type 'smart_turn' needs the model file {chosen}"
                          + ("" if path else " (activecall's package data: reinstall activecall)"))
    return chosen


def available() -> bool:
    """The shipped model and onnxruntime are installed (what makes playbooks turn it on by default;
    remembered for a few seconds, speech/installed.py)."""
    return _model_file_present() and module_found("onnxruntime")


@remembered
def _model_file_present() -> bool:
    return os.path.isfile(os.path.join(DATA_DIR, MODEL_FILE))


def _one_blas_thread() -> None:
    """The features' matrix product ((80, 201) x (201, 801)) on one BLAS thread: OpenBLAS would wake a
    second, spinning thread for it and take ~3x the CPU time (19 against 6 ms a run measured, the same
    result).  Process-wide, as the RTP ticker's limit (media/rtp_ticker.py) is."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a dependency; the limit is an optimisation
        return
    threadpool_limits(limits=1, user_api="blas")


class SmartTurnModel:
    """One onnxruntime session; ``predict`` is blocking and meant for a worker thread."""

    def __init__(self, path: Optional[str] = None, threads: int = 1):
        try:
            import onnxruntime as ort
        except ImportError:
            raise SpeechError("eou type 'smart_turn' needs onnxruntime") from None
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = model_path(path)
        self.session = ort.InferenceSession(self.path, sess_options=so, providers=["CPUExecutionProvider"])
        _one_blas_thread()

    def predict(self, pcm, run_options=None) -> float:
        """P(the turn is complete) for the 16 kHz audio ``pcm`` (int16 samples, or floats in -1..1).

        ``run_options``: an ``onnxruntime.RunOptions`` whose ``terminate`` another thread may set to stop
        the run early (it then raises)."""
        x = np.asarray(pcm)
        if x.dtype == np.int16:
            x = x.astype(np.float32) / 32768.0
        mel = features.turn_log_mel(x)
        (out,) = self.session.run(None, {"input_features": mel[None, :, :]}, run_options)
        return float(np.asarray(out).reshape(-1)[0])


_SKIPPED = object()  # what a withdrawn job returns

_models: dict[Optional[str], SmartTurnModel] = {}
_models_lock = threading.Lock()


def shared_model(path: Optional[str] = None) -> SmartTurnModel:
    """The process-wide model for ``path`` (loaded once, on first use; thread-safe)."""
    with _models_lock:
        model = _models.get(path)
        if model is None:
            model = _models[path] = SmartTurnModel(path)
        return model


def warm(path: Optional[str] = None) -> None:
    """Load the model and run it once (the first run allocates), so a call's first pause pays neither."""
    shared_model(path).predict(np.zeros(SAMPLE_RATE // 10, dtype=np.int16))


_warming: dict[Optional[str], object] = {}  # path -> the Deferred of its warm-up, started once per process

_pool = None


def _thread_pool():
    """A small pool of our own (not the reactor's, which DNS and others share), stopped at shutdown."""
    global _pool
    if _pool is None:
        from twisted.internet import reactor
        from twisted.python.threadpool import ThreadPool
        size = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2))
        _pool = ThreadPool(minthreads=0, maxthreads=size, name="activecall-eou")
        _pool.start()
        reactor.addSystemEventTrigger("during", "shutdown", _stop_pool)
    return _pool


def _stop_pool() -> None:
    global _pool
    pool, _pool = _pool, None
    if pool is not None:
        pool.stop()


def in_eou_thread(f, *args):
    """``f(*args)`` on the end-of-turn thread pool; a Deferred of its result."""
    from twisted.internet import reactor
    return threads.deferToThreadPool(reactor, _thread_pool(), f, *args)


@implementer(IEndOfTurnDetector)
class SmartTurnDetector:
    """``analyze(pcm)`` runs the shared model off the reactor; fires with a ``TurnPrediction``."""

    name = "smart_turn"

    def __init__(self, options: EouOptions, run_in_thread: Callable = in_eou_thread, model=None):
        self.options = options
        self.skipped = 0  # runs withdrawn before a worker took them, or stopped under way
        self.run_in_thread = run_in_thread
        self._path = options.extra.get("model") or None
        self._model = model
        if model is None:
            model_path(self._path)  # fail now, at call set-up, when the file is missing
            if self._path not in _warming:
                _warming[self._path] = self.run_in_thread(warm, self._path).addErrback(
                    lambda f: log.failure("loading the Smart Turn model failed", f))

    def _predict(self, pcm: np.ndarray, run_options=None) -> TurnPrediction:
        started = time.perf_counter()
        model = self._model if self._model is not None else shared_model(self._path)
        if isinstance(model, SmartTurnModel):
            probability = model.predict(pcm, run_options)
        else:  # a stand-in (tests)
            probability = model.predict(pcm)
        return TurnPrediction(probability, (time.perf_counter() - started) * 1000.0)

    def analyze(self, pcm):
        """A Deferred of the ``TurnPrediction``.  Cancelling it withdraws the question (the endpointer does
        when its answer can no longer count: the caller spoke again, the ceiling passed): a job no worker
        took yet is skipped, and a run under way is told to stop (onnxruntime's ``RunOptions.terminate``,
        checked between the graph's nodes), so a backlog under load does not grow with runs nobody
        waits for."""
        withdrawn = threading.Event()
        run_options = _run_options()

        def run(pcm):
            if withdrawn.is_set():
                return _SKIPPED
            try:
                return self._predict(pcm, run_options)
            except Exception:
                if withdrawn.is_set():
                    return _SKIPPED  # terminated
                raise

        def answered(result):
            if result is _SKIPPED:
                self.skipped += 1
            elif not outer.called:
                outer.callback(result)

        def failed(failure):
            if not outer.called:
                outer.errback(failure)

        def withdraw(_):
            withdrawn.set()
            if run_options is not None:
                run_options.terminate = True

        outer = defer.Deferred(withdraw)
        self.run_in_thread(run, np.asarray(pcm)).addCallbacks(answered, failed)
        return outer


def _run_options():
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    return ort.RunOptions()
