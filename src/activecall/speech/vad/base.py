"""What every VAD shares: window buffering, stream time, event delivery."""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from activecall.audio import SAMPLE_RATE
from activecall.speech.base import IVoiceActivityDetector, VadOptions
from activecall.speech.vad.segmenter import Segmenter

log = Logger(namespace="activecall.speech.vad")


@implementer(IVoiceActivityDetector)
class WindowedVad:
    """Cuts the fed stream into fixed windows and runs them through ``_classify``.

    Subclasses either classify synchronously (cheap models) or override
    ``_submit`` to hand windows to a thread/batch and call ``_deliver`` later.
    """

    name = "windowed"
    window = 512  # samples per decision

    def __init__(self, options: VadOptions, on_event: Callable[[object], None]):
        self.options = options
        self.on_event = on_event
        self.segmenter = Segmenter(options)
        #: told ``(start_ms, length_ms, probability, threshold)`` for every classified window (the
        #: barge-in controller's fast voice onset, call/barge_in.py)
        self.on_window: Optional[Callable[[int, int, float, float], None]] = None
        self._pending = np.zeros(0, dtype=np.int16)
        self._next_window = 0  # index of the next window to cut (stream time = index * window)
        self._delivered = 0  # windows classified so far
        self._waiters: list[tuple[int, defer.Deferred]] = []
        self.closed = False

    @property
    def window_ms(self) -> float:
        return self.window * 1000 / SAMPLE_RATE

    def feed(self, pcm) -> None:
        if self.closed:
            return
        pcm = np.asarray(pcm, dtype=np.int16).reshape(-1)
        buf = np.concatenate([self._pending, pcm]) if self._pending.size else pcm
        n = buf.size // self.window
        if n:
            windows = buf[: n * self.window].reshape(n, self.window)
            first = self._next_window
            self._next_window += n
            self._submit(first, windows)
        self._pending = buf[n * self.window:].copy()

    def _submit(self, first: int, windows: np.ndarray) -> None:
        self._deliver(first, self._classify(windows))

    def _classify(self, windows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _deliver(self, first: int, probabilities) -> None:
        """Run the segmenter over classified windows ``first..`` and fire events."""
        for i, p in enumerate(probabilities):
            start = (first + i) * self.window * 1000 // SAMPLE_RATE
            end = (first + i + 1) * self.window * 1000 // SAMPLE_RATE
            if self.on_window is not None:
                try:
                    self.on_window(start, end - start, float(p), self.options.voiceThreshold)
                except Exception:
                    log.failure("VAD window observer failed")
            for event in self.segmenter.push(start, end - start, float(p)):
                self._emit(event)
        self._delivered = first + len(probabilities)
        ready = [d for n, d in self._waiters if n <= self._delivered]
        self._waiters = [(n, d) for n, d in self._waiters if n > self._delivered]
        for d in ready:
            d.callback(None)

    def _emit(self, event) -> None:
        try:
            self.on_event(event)
        except Exception:
            log.failure("VAD event handler failed on {event!r}", event=event)

    def voiced_after(self, ms: int) -> bool:
        """Whether a window classified so far after stream time ``ms`` was voiced (the end-of-turn
        endpointer's check that a pause still holds; windows still in a batch are not seen yet)."""
        return self.segmenter.voiced_after(ms)

    def drain(self) -> defer.Deferred:
        if self._delivered >= self._next_window:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.append((self._next_window, d))
        return d

    def close(self) -> defer.Deferred:
        """Classify what is queued, close an open segment, then ignore further audio."""
        self.closed = True

        def finish(_):
            for event in self.segmenter.finish(int(self._delivered * self.window_ms)):
                self._emit(event)

        return self.drain().addCallback(finish)


class NopVad(WindowedVad):
    """Never hears speech (the original's ``nop`` type): events never fire."""

    name = "nop"

    def _classify(self, windows):
        return np.zeros(len(windows))
