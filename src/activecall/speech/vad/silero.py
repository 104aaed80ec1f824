"""Silero VAD v5/v6 through onnxruntime, without torch.

The model file, ``silero_vad.onnx`` (MIT, from the silero-vad 6.2.3 wheel;
notice in ``data/LICENSE.silero-vad``), ships with activecall as package data
in ``activecall/speech/vad/data/``, so ``pip install activecall`` is enough.
Another variant (e.g. ``silero_vad_16k_op15.onnx``) is looked up in an
installed ``silero-vad`` wheel (``pip install --no-deps silero-vad``: its
torch dependency is not needed); importing that package would import torch,
so the file is found through the import system's spec (or the distribution's
file list) without executing it.

Inference is batched across calls: every stream hands its 512-sample windows
to one shared ``SileroBatcher``; windows that arrive in the same reactor turn
(one media tick feeds every call) go to onnxruntime in one ``run`` on a
worker thread, so 100 calls cost one thread hop per tick and the reactor only
copies arrays.  A stream's windows stay in order because each batch runs in
rounds (round k carries the k-th pending window of every stream) and only one
batch is in flight at a time.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from typing import Callable, Optional

import numpy as np
from twisted.internet import defer, threads
from twisted.logger import Logger

from activecall.audio import SAMPLE_RATE
from activecall.speech.base import SpeechError
from activecall.speech.vad.base import WindowedVad

log = Logger(namespace="activecall.speech.vad.silero")

WINDOW = 512
CONTEXT = 64


#: the models shipped with activecall (package data)
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def model_path(variant: str = "silero_vad.onnx") -> str:
    """Path of the ONNX model: activecall's package data first, then an installed silero-vad wheel."""
    shipped = os.path.join(DATA_DIR, variant)
    if os.path.exists(shipped):
        return shipped
    spec = importlib.util.find_spec("silero_vad")
    if spec is not None and spec.origin:
        path = os.path.join(os.path.dirname(spec.origin), "data", variant)
        if os.path.exists(path):
            return path
    try:
        for f in importlib.metadata.files("silero-vad") or ():
            if f.name == variant:
                return str(f.locate())
    except importlib.metadata.PackageNotFoundError:
        pass
    raise SpeechError(
        f"vad type 'silero' needs the model file {variant}: it is neither in {DATA_DIR} "
        "(activecall's package data: reinstall activecall) nor in an installed silero-vad wheel "
        "(pip install --no-deps silero-vad)")


class SileroModel:
    """One onnxruntime session; ``run`` is blocking and meant for a worker thread."""

    def __init__(self, path: Optional[str] = None, threads: int = 1):
        try:
            import onnxruntime as ort
        except ImportError:
            raise SpeechError("vad type 'silero' needs onnxruntime") from None
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path or model_path(), sess_options=so,
                                            providers=["CPUExecutionProvider"])
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)

    def run(self, inputs: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """inputs [N, 64+512] float32 in -1..1, state [2, N, 128] -> (probs [N], state)."""
        out, new_state = self.session.run(None, {"input": inputs, "state": state, "sr": self._sr})
        return out[:, 0], new_state

    def run_streams(self, jobs: list) -> list:
        """Classify every job's windows in order; one ``run`` per round across all jobs.

        ``jobs``: list of (state [2,128], context [64], windows [k,512] float32).
        Returns, per job, (probs [k], state, context).
        """
        states = [j[0] for j in jobs]
        contexts = [j[1] for j in jobs]
        probs: list[list[float]] = [[] for _ in jobs]
        rounds = max((len(j[2]) for j in jobs), default=0)
        for r in range(rounds):
            idx = [i for i, j in enumerate(jobs) if len(j[2]) > r]
            inputs = np.stack([np.concatenate([contexts[i], jobs[i][2][r]]) for i in idx])
            state = np.stack([states[i] for i in idx], axis=1)
            p, new_state = self.run(inputs.astype(np.float32), state.astype(np.float32))
            for k, i in enumerate(idx):
                probs[i].append(float(p[k]))
                states[i] = new_state[:, k, :]
                contexts[i] = jobs[i][2][r][-CONTEXT:]
        return [(np.array(probs[i]), states[i], contexts[i]) for i in range(len(jobs))]


_shared_model: Optional[SileroModel] = None


def shared_model() -> SileroModel:
    """The process-wide model (loaded once, ~100 ms)."""
    global _shared_model
    if _shared_model is None:
        _shared_model = SileroModel()
    return _shared_model


def _in_thread(f, *args):
    return threads.deferToThread(f, *args)


class SileroBatcher:
    """Gathers windows from many streams and classifies them in one onnxruntime call per turn.

    ``reactor`` schedules the flush (``callLater(0)``: after every stream fed in
    this turn); ``run_in_thread(f, *args) -> Deferred`` defaults to
    ``deferToThread``; tests pass a synchronous one and a ``Clock``.
    """

    def __init__(self, model: Optional[SileroModel] = None, reactor=None,
                 run_in_thread: Callable = _in_thread):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self._model = model
        self.run_in_thread = run_in_thread
        self._queue: dict = {}  # stream -> list of (first_index, windows)
        self._scheduled = None
        self._busy = False
        self.batches = 0  # onnxruntime batches run, for tests and metrics

    @property
    def model(self) -> SileroModel:
        if self._model is None:
            self._model = shared_model()
        return self._model

    def submit(self, stream: "SileroVad", first: int, windows: np.ndarray) -> None:
        self._queue.setdefault(stream, []).append((first, windows))
        if self._scheduled is None and not self._busy:
            self._scheduled = self.reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        self._scheduled = None
        if self._busy or not self._queue:
            return
        queue, self._queue = self._queue, {}
        streams = list(queue)
        firsts = [q[0][0] for q in queue.values()]
        jobs = []
        for s in streams:
            windows = np.concatenate([w for _, w in queue[s]]).astype(np.float32) / 32768.0
            jobs.append((s.state, s.context, windows))
        self._busy = True
        self.batches += 1
        d = self.run_in_thread(self.model.run_streams, jobs)

        def done(results):
            for s, first, (probs, state, context) in zip(streams, firsts, results):
                s.state, s.context = state, context
                s._deliver(first, probs)

        def failed(f):
            log.failure("silero inference failed", f)
            for s, first, (_, _, windows) in zip(streams, firsts, jobs):
                s._deliver(first, np.zeros(len(windows)))  # keep drain() honest: treat as silence

        def next_batch(_):
            self._busy = False
            if self._queue and self._scheduled is None:
                self._scheduled = self.reactor.callLater(0, self._flush)

        d.addCallbacks(done, failed).addBoth(next_batch)


_default_batcher: Optional[SileroBatcher] = None


def default_batcher() -> SileroBatcher:
    global _default_batcher
    if _default_batcher is None:
        _default_batcher = SileroBatcher()
    return _default_batcher


class SileroVad(WindowedVad):
    name = "silero"
    window = WINDOW

    def __init__(self, options, on_event, batcher: Optional[SileroBatcher] = None):
        super().__init__(options, on_event)
        self.batcher = batcher or default_batcher()
        self.batcher.model  # load (once per process) now, so a missing model fails the call set-up
        self.state = np.zeros((2, 128), dtype=np.float32)
        self.context = np.zeros(CONTEXT, dtype=np.float32)

    def _submit(self, first: int, windows: np.ndarray) -> None:
        self.batcher.submit(self, first, windows)
