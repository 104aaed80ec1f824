"""End-of-turn detection: its options, its interface and what a detector answers.

An end-of-turn detector looks at the audio of the caller's turn so far, at a
short pause, and says how likely it is that the caller has finished
(``TurnPrediction.probability``).  ``endpointer.TurnEndpointer`` turns those
answers into "end the turn now" / "keep listening" on the call's clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from zope.interface import Attribute, Interface

from activecall.speech.base import OptionError, _extra, _get

#: ``eou.type`` when the option names none
DEFAULT_TYPE = "smart_turn"
#: ms of quiet after speech before the detector runs (Pipecat advises a 0.2 s VAD stop with Smart Turn)
DEFAULT_PAUSE_MS = 200
#: ms of quiet after which a turn ends even if the detector said the caller was not done
DEFAULT_TIMEOUT_MS = 1500
#: P(complete) at or above which the turn ends at once
DEFAULT_THRESHOLD = 0.5
#: the bar for the early look (``pauseMs`` after the call VAD's speech end, before the recogniser's own
#: pause): Smart Turn is less sure after less quiet (docs/benchmarks.md, "End of turn from silero's speech end")
DEFAULT_EARLY_THRESHOLD = 0.8


@dataclass(frozen=True)
class EouOptions:
    """``eou`` options (CallOption ``eou`` and the playbook's ``eou``, docs/api.md).

    ``type``: ``smart_turn`` (default) or ``none`` (off).  ``threshold``,
    ``pauseMs``, ``earlyThreshold`` and ``timeout`` (ms, the silence ceiling) are ours (✱).
    ``earlyLook`` (off by default: on the shipped defaults it made voice to voice later, docs/benchmarks.md):
    also ask ``pauseMs`` after the call VAD's speech end; that look ends the turn only at
    P ≥ max(``earlyThreshold``, ``threshold``); below, the recogniser's pause looks again with ``threshold``.
    ``extra.model``: the path of another Smart Turn v3 ONNX file.
    """

    type: str = DEFAULT_TYPE
    threshold: float = DEFAULT_THRESHOLD
    pauseMs: int = DEFAULT_PAUSE_MS
    timeout: int = DEFAULT_TIMEOUT_MS
    earlyLook: bool = False
    earlyThreshold: float = DEFAULT_EARLY_THRESHOLD
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, options: Optional[Mapping[str, Any]]) -> "EouOptions":
        o = dict(options or {})
        w = "eou"
        result = cls(
            type=_get(o, "type", str, cls.type, w) or cls.type,
            threshold=float(_get(o, "threshold", (int, float), cls.threshold, w)),
            pauseMs=_get(o, "pauseMs", int, cls.pauseMs, w),
            timeout=_get(o, "timeout", int, cls.timeout, w),
            earlyLook=_get(o, "earlyLook", bool, cls.earlyLook, w),
            earlyThreshold=float(_get(o, "earlyThreshold", (int, float), cls.earlyThreshold, w)),
            extra=_extra(o, w),
        )
        if not 0.0 < result.threshold < 1.0:
            raise OptionError(f"eou.threshold: must be between 0 and 1, got {result.threshold}")
        if not 0.0 < result.earlyThreshold <= 1.0:
            raise OptionError(f"eou.earlyThreshold: must be above 0 and at most 1, got {result.earlyThreshold}")
        if result.pauseMs < 30:
            raise OptionError(f"eou.pauseMs: at least 30 ms (one VAD frame), got {result.pauseMs}")
        if result.timeout < result.pauseMs:
            raise OptionError(f"eou.timeout: must not be shorter than pauseMs ({result.pauseMs}), "
                              f"got {result.timeout}")
        return result


@dataclass(frozen=True)
class TurnPrediction:
    """A detector's answer: P(the turn is complete), and how long the inference took (wall ms)."""

    probability: float
    inference_ms: float


class IEndOfTurnDetector(Interface):
    """Says, from the audio of a turn so far, whether the speaker has finished."""

    name = Attribute("detector name, e.g. 'smart_turn'")

    def analyze(pcm):
        """A Deferred firing with a ``TurnPrediction`` for ``pcm`` (16 kHz int16, the turn's audio up to
        now, trailing pause included).  Never blocks the caller: blocking work runs off the reactor."""
