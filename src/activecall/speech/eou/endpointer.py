"""When does the caller's turn end?  A small state machine on the call's clock, apart from any model.

Silence alone is a poor end-of-turn signal: people pause inside sentences
("my number is five five five … and then one two three"), so a short silence
cuts them off and a long one makes every answer late.  The recogniser's VAD
reports a *short* pause (``pauseMs``, 200 ms); the endpointer then asks an
end-of-turn detector (``IEndOfTurnDetector``, e.g. Smart Turn) about the
turn's audio so far, and:

- the detector says **complete** (P ≥ ``threshold``): the turn ends at once
  (``on_end()``: the recogniser finalises the utterance);
- it says **incomplete**: keep listening; the turn ends when the quiet reaches
  ``timeout`` ms (the ceiling, counted from where the quiet began) …
- … unless the caller speaks again first (``resumed()``): the pending decision
  is dropped and the next pause asks again, about the longer turn;
- a detector that fails, or is still thinking at the ceiling, leaves the
  ceiling to end the turn; an answer that comes after the turn moved on
  (speech resumed, the ceiling passed, the utterance was closed) is ignored,
  and a question still waiting for the detector then is withdrawn (its
  Deferred is cancelled: a busy detector skips the run that could not count).

``on_decision(TurnDecision)`` reports each verdict that counted (for the
``eou`` and ``metrics`` events).  Nothing here blocks or reads a wall clock:
the clock is an injected ``IReactorTime`` and the detector answers with a
Deferred, so ``task.Clock`` and a fake detector drive it in tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from twisted.internet import defer
from twisted.logger import Logger

from activecall.speech.eou.base import EouOptions, TurnPrediction

log = Logger(namespace="activecall.speech.eou")

#: how much of the turn's audio the detector is given (Smart Turn looks at the last 8 s)
TURN_AUDIO_MS = 8000


@dataclass(frozen=True)
class TurnDecision:
    """``completed``: the turn ends now.  ``reason``: ``"model"`` (the detector's verdict, with its
    ``probability`` and ``inference_ms``) or ``"timeout"`` (the silence ceiling ended the turn)."""

    completed: bool
    reason: str
    probability: Optional[float] = None
    inference_ms: Optional[float] = None


class TurnEndpointer:
    """Decides the end of each turn from pauses, resumptions and the detector's answers.

    ``on_end``: called (once per turn) when the turn is over; the recogniser sets it.
    """

    audio_ms = TURN_AUDIO_MS

    def __init__(self, clock, detector, options: EouOptions,
                 on_decision: Optional[Callable[[TurnDecision], None]] = None):
        self.clock = clock
        self.detector = detector
        self.options = options
        self.on_decision = on_decision
        self.on_end: Optional[Callable[[], None]] = None
        self._generation = 0  # bumped whenever the pending decision stops counting
        self._timer = None
        self._asked: Optional[defer.Deferred] = None  # the detector's pending answer
        self.waiting = False  # a pause is being judged (or waits for the ceiling)
        self.inferences = 0  # detector runs started, for tests and logs

    @property
    def pause_ms(self) -> int:
        return self.options.pauseMs

    # -- inputs ---------------------------------------------------------------------------------

    def paused(self, pcm) -> None:
        """The VAD heard ``pauseMs`` of quiet after speech; ``pcm`` is the turn's audio up to now."""
        self._drop()
        self.waiting = True
        generation = self._generation
        remaining = max(0, self.options.timeout - self.options.pauseMs) / 1000.0
        self._timer = self.clock.callLater(remaining, self._ceiling, generation)
        self.inferences += 1
        d = defer.maybeDeferred(self.detector.analyze, pcm)
        if not d.called:
            self._asked = d
        d.addCallbacks(self._answered, self._failed, callbackArgs=(generation,), errbackArgs=(generation,))

    def resumed(self) -> None:
        """The caller speaks again: whatever was pending no longer counts."""
        self._drop()

    def reset(self) -> None:
        """The utterance ended some other way (the call closed it): forget the pending decision."""
        self._drop()

    # -- outcomes -------------------------------------------------------------------------------

    def _answered(self, prediction: TurnPrediction, generation: int) -> None:
        if generation != self._generation:
            log.debug("end-of-turn answer {p:.3f} came after the turn moved on; ignored",
                      p=prediction.probability)
            return
        completed = prediction.probability >= self.options.threshold
        self._decided(TurnDecision(completed, "model", prediction.probability, prediction.inference_ms))
        if completed:
            self._end()

    def _failed(self, failure, generation: int) -> None:
        if failure.check(defer.CancelledError) and generation != self._generation:
            return  # withdrawn by _drop
        log.failure("end-of-turn detector {name} failed; the silence ceiling ends this turn", failure,
                    name=getattr(self.detector, "name", "?"))

    def _ceiling(self, generation: int) -> None:
        self._timer = None
        if generation != self._generation:
            return
        self._decided(TurnDecision(True, "timeout"))
        self._end()

    def _end(self) -> None:
        self._drop()
        if self.on_end is not None:
            self.on_end()

    def _decided(self, decision: TurnDecision) -> None:
        if self.on_decision is None:
            return
        try:
            self.on_decision(decision)
        except Exception:
            log.failure("end-of-turn decision handler failed on {decision!r}", decision=decision)

    def _drop(self) -> None:
        self._generation += 1
        self.waiting = False
        asked, self._asked = self._asked, None
        if asked is not None and not asked.called:
            asked.cancel()  # its answer could no longer count
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
