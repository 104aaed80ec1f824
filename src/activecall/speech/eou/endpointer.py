"""When does the caller's turn end?  A small state machine on the call's clock, apart from any model.

Silence alone is a poor end-of-turn signal: people pause inside sentences
("my number is five five five … and then one two three"), so a short silence
cuts them off and a long one makes every answer late.  After a *short* pause
(``pauseMs``, 200 ms) the endpointer asks an end-of-turn detector
(``IEndOfTurnDetector``, e.g. Smart Turn) about the turn's audio so far.
With ``earlyLook`` (off by default, docs/benchmarks.md: on the shipped
defaults it made voice to voice later) the pause is also timed from the
call's VAD (silero) when the call has one (``speech_ended``: its speech end says where the voice stopped and how long
ago, so the *early* question comes ``pauseMs`` after the caller's last voiced
audio as silero hears it, what silero already waited included).  The
recogniser's own webrtcvad pause (``paused``, ~100 ms later: it hears a
word's tail longer) asks when there was no early question (no call VAD), and
takes a *second look* unless the early answer already ended the turn (at
once, beside a still-running early look): Smart Turn is
less sure after ~200 ms of quiet than after ~300 ms, both ways, so the early
look ends the turn only at P ≥ ``earlyThreshold`` (0.8) and otherwise leaves
the turn to the look the recogniser's pause alone would have taken
(docs/benchmarks.md, "End of turn from silero's speech end").  A pause is
judged at most twice.  Then:

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
    ``probability`` and ``inference_ms``) or ``"timeout"`` (the silence ceiling ended the turn).
    ``early``: the verdict of the early look (timed from the call VAD's speech end, ``earlyThreshold``)."""

    completed: bool
    reason: str
    probability: Optional[float] = None
    inference_ms: Optional[float] = None
    early: bool = False


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
        self._due = None  # the question timed from the call VAD's speech end, not asked yet
        self._stage: Optional[str] = None  # the last look asked: "early" (the call VAD's) or "late" (the recogniser's)
        self._late_answered = False  # the second look answered: a slower early answer no longer counts
        self._asked: dict = {}  # look -> the detector's pending answer (Deferred)
        self.waiting = False  # a pause is being judged (or waits for the ceiling)
        self.inferences = 0  # detector runs started, for tests and logs

    @property
    def pause_ms(self) -> int:
        return self.options.pauseMs

    @property
    def early_look(self) -> bool:
        """``eou.earlyLook``: the call VAD's speech end times a first look (off by default)."""
        return bool(getattr(self.options, "earlyLook", False))

    # -- inputs ---------------------------------------------------------------------------------

    def paused(self, pcm, quiet_ms: Optional[int] = None) -> None:
        """The recogniser's VAD heard ``pauseMs`` (or ``quiet_ms``) of quiet after speech; ``pcm`` is the
        turn's audio up to now.

        If the call VAD's question for this pause came first (and did not end the turn), this is the *second
        look*, asked now, with the longer quiet, even while the early answer is still being computed (a
        loaded machine must not make the turn later than the recogniser's pause alone would: the two run
        side by side; the first "complete" ends the turn; once the second look answered, a late early
        answer no longer counts).  Otherwise a new pause: whatever was pending is withdrawn and the
        detector is asked about this one (the recogniser reports a start between two of its pauses, so
        that is the older contract, kept)."""
        if self.waiting and self._stage == "early":
            self._ask("late", pcm, self._generation)
            return
        self._drop()
        self._start_pause(quiet_ms)
        self._ask("late", pcm, self._generation)

    def speech_ended(self, quiet_ms: int, audio: Callable[[], object],
                     still_quiet: Optional[Callable[[], bool]] = None) -> None:
        """The call's VAD says the voice stopped ``quiet_ms`` ago (its own end detection waited that long:
        silero's ``silencePadding``, its window and batch): ask ``pauseMs`` after the voice stopped, i.e.
        ``pauseMs - quiet_ms`` from now (at once if the VAD already waited as long), about ``audio()``, the
        turn's audio at that moment.  ``still_quiet()`` is checked then: if the VAD heard voice again
        meanwhile (a word shorter than its ``speechPadding``, which starts no segment) the question is not
        asked and the recogniser's own pause decides.  Ignored while the pause is already being judged,
        and without ``eou.earlyLook``."""
        if self.waiting or not self.early_look:
            return
        self._drop()
        delay = max(0, self.options.pauseMs - max(0, quiet_ms))
        generation = self._generation
        if delay == 0:
            self._pause_due(generation, audio, still_quiet, quiet_ms)
        else:
            self._due = self.clock.callLater(delay / 1000.0, self._pause_due, generation, audio, still_quiet,
                                             self.options.pauseMs)

    def _pause_due(self, generation: int, audio, still_quiet, quiet_ms: int) -> None:
        self._due = None
        if generation != self._generation or self.waiting:
            return
        if still_quiet is not None and not still_quiet():
            log.debug("voice again before the pause was due; the recogniser's pause decides")
            return
        pcm = audio()
        if pcm is None:
            return
        self._start_pause(quiet_ms)
        self._ask("early", pcm, self._generation)

    def _start_pause(self, quiet_ms: Optional[int]) -> None:
        """A pause is judged from now: arm the ceiling, counted from where the quiet began."""
        self.waiting = True
        quiet = self.options.pauseMs if quiet_ms is None else max(quiet_ms, self.options.pauseMs)
        remaining = max(0, self.options.timeout - quiet) / 1000.0
        self._timer = self.clock.callLater(remaining, self._ceiling, self._generation)

    def _ask(self, stage: str, pcm, generation: int) -> None:
        self._stage = stage
        self.inferences += 1
        d = defer.maybeDeferred(self.detector.analyze, pcm)
        if not d.called:
            self._asked[stage] = d
        d.addCallbacks(self._answered, self._failed, callbackArgs=(generation, stage),
                       errbackArgs=(generation, stage))

    def resumed(self) -> None:
        """The caller speaks again: whatever was pending no longer counts."""
        self._drop()

    def reset(self) -> None:
        """The utterance ended some other way (the call closed it): forget the pending decision."""
        self._drop()

    # -- outcomes -------------------------------------------------------------------------------

    def _answered(self, prediction: TurnPrediction, generation: int, stage: str = "late") -> None:
        if generation != self._generation:
            log.debug("end-of-turn answer {p:.3f} came after the turn moved on; ignored",
                      p=prediction.probability)
            return
        self._asked.pop(stage, None)
        if stage == "early" and self._late_answered:
            log.debug("early end-of-turn answer {p:.3f} came after the second look's; ignored",
                      p=prediction.probability)
            return
        if stage == "late":
            self._late_answered = True
        threshold = self.options.threshold
        if stage == "early":  # after less quiet the model must be surer (module docstring)
            threshold = max(threshold, getattr(self.options, "earlyThreshold", threshold))
        completed = prediction.probability >= threshold
        self._decided(TurnDecision(completed, "model", prediction.probability, prediction.inference_ms,
                                   early=stage == "early"))
        if completed:
            self._end()

    def _failed(self, failure, generation: int, stage: str = "late") -> None:
        if failure.check(defer.CancelledError) and generation != self._generation:
            return  # withdrawn by _drop
        if generation == self._generation:
            self._asked.pop(stage, None)
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
        self._stage = None
        self._late_answered = False
        asked, self._asked = self._asked, {}
        for d in asked.values():
            if not d.called:
                d.cancel()  # its answer could no longer count
        for name in ("_timer", "_due"):
            timer = getattr(self, name)
            if timer is not None:
                if timer.active():
                    timer.cancel()
                setattr(self, name, None)
