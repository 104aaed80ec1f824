"""Answering-machine detection (``amd`` option) on an outbound call's first seconds.

What it hears is the callee's audio (16 kHz frames from the leg, after the answer).  Each 20 ms frame is
voice or silence by its mean absolute level (``silenceThreshold``); voiced runs of at least
``minWordLength`` separated by at least ``betweenWordsSilence`` of quiet are words.  The verdict, the
rules tried on every frame in this order (after Asterisk's AMD(), whose defaults these are):

- a beep (below) before any verdict → ``machine``, then ``beep``;
- ``initialSilence`` of silence before any voice → ``machine`` (machines often wait; people say hello);
- the greeting (voice, with gaps shorter than ``afterGreetingSilence``) longer than ``greeting`` →
  ``machine``; more than ``maximumWords`` words → ``machine``;
- voice, then ``afterGreetingSilence`` of silence, within the limits above → ``human``;
- nothing decided within ``totalAnalysisTime`` → ``unknown``.

Frames are counted, not wall time: the verdict on the same audio is always the same.

Beep / fax: a Goertzel filter per candidate tone on every frame; a frame is tonal when one tone holds
more than ``TONE_SHARE`` of the frame's energy; ``beepLength`` (150 ms) of the same tone is a beep.
1100 Hz (fax CNG) and 2100 Hz (fax CED / modem answer) give ``fax``, the others (``BEEP_TONES``) give
``beep``.  After ``machine`` the detector keeps listening for the beep for ``beepTimeout``; the beep
is reported as its own ``answerMachineDetection{result: "beep", beep: true}`` event (a playbook waits
for it to leave its message).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import numpy as np
from twisted.logger import Logger

from activecall.protocol import events as ev

log = Logger(namespace="activecall.call.amd")

FRAME_MS = 20
#: tones answering machines and voicemail systems beep with (Hz); fax tones are told apart
BEEP_TONES = (440.0, 480.0, 620.0, 850.0, 950.0, 1000.0, 1400.0, 1800.0, 2000.0)
FAX_TONES = (1100.0, 2100.0)
#: share of a frame's energy one tone must hold for the frame to count as that tone
TONE_SHARE = 0.6
#: frames quieter than this (mean absolute level) are never tonal
TONE_FLOOR = 200.0


@dataclass(frozen=True)
class AmdSettings:
    """The timers (ms) and thresholds; the option's keys are these names."""

    initialSilence: int = 2500
    greeting: int = 1500
    afterGreetingSilence: int = 800
    totalAnalysisTime: int = 5000
    minWordLength: int = 100
    betweenWordsSilence: int = 50
    maximumWords: int = 3
    silenceThreshold: int = 256
    beepLength: int = 150
    beepTimeout: int = 30000

    @classmethod
    def from_option(cls, value) -> "AmdSettings":
        """``amd: true`` or ``amd: {greeting: 2000, ...}``; unknown keys and bad values raise ValueError."""
        if value is True or value is None:
            return cls()
        if not isinstance(value, dict):
            raise ValueError("amd must be true or an object of timers")
        known = {f.name for f in fields(cls)}
        changes = {}
        for key, v in value.items():
            if key == "enabled":
                continue
            if key not in known:
                raise ValueError(f"amd.{key} is not a known setting ({', '.join(sorted(known))})")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"amd.{key} must be a non-negative number")
            changes[key] = int(v)
        return replace(cls(), **changes)


def enabled(value) -> bool:
    if value is None or value is False:
        return False
    if isinstance(value, dict):
        return value.get("enabled", True) is not False
    return bool(value)


def _goertzel_bank(freqs, n=320, rate=16000):
    """cos/sin rows whose products with a frame give each tone's power (a Goertzel per tone)."""
    t = np.arange(n) / rate
    return (np.cos(2 * np.pi * np.outer(freqs, t)), np.sin(2 * np.pi * np.outer(freqs, t)))


class ToneDetector:
    """Per frame: which candidate tone, if any, dominates it; ``frames`` long runs of one tone fire."""

    def __init__(self, tones=BEEP_TONES + FAX_TONES, frames: int = 8):
        self.tones = tuple(tones)
        self._cos, self._sin = _goertzel_bank(self.tones)
        self.frames = frames
        self._run_tone: Optional[float] = None
        self._run = 0

    def tone_of(self, frame: np.ndarray) -> Optional[float]:
        x = frame.astype(np.float64)
        if x.size != self._cos.shape[1] or np.mean(np.abs(x)) < TONE_FLOOR:
            return None
        total = float(np.dot(x, x))
        if total <= 0:
            return None
        power = (self._cos @ x) ** 2 + (self._sin @ x) ** 2
        power *= 2.0 / x.size  # a pure tone's power over its frame energy is ~1
        best = int(np.argmax(power))
        return self.tones[best] if power[best] / total > TONE_SHARE else None

    def feed(self, frame: np.ndarray) -> Optional[float]:
        """The tone when ``frames`` consecutive frames held it (once per run), else None."""
        tone = self.tone_of(frame)
        if tone is not None and tone == self._run_tone:
            self._run += 1
        else:
            self._run_tone, self._run = tone, (1 if tone is not None else 0)
        if tone is not None and self._run == self.frames:
            return tone
        return None


class AnsweringMachineDetector:
    """One call's detector: ``feed`` it 16 kHz frames; ``on_verdict(result, reason, start_ms, end_ms)``."""

    def __init__(self, settings: AmdSettings, on_verdict):
        self.s = settings
        self.on_verdict = on_verdict
        self.tones = ToneDetector(frames=max(1, -(-settings.beepLength // FRAME_MS)))
        self.verdict: Optional[str] = None
        self.beep_heard = False
        self.finished = False
        self.ms = 0  # audio analysed so far
        self.voice_ms = 0  # the greeting: from its first voiced frame to the last
        self.greeting_start: Optional[int] = None
        self.silence_ms = 0  # quiet since the last voiced frame (or the start)
        self.voiced_run = 0
        self.words = 0
        self._in_word = False
        self._after_verdict_ms = 0

    def feed(self, pcm: np.ndarray) -> None:
        for i in range(0, len(pcm) - 319, 320):
            if self.finished:
                return
            self._frame(pcm[i:i + 320])

    def _frame(self, frame: np.ndarray) -> None:
        self.ms += FRAME_MS
        tone = self.tones.feed(frame)
        if tone is not None:
            kind = "fax" if tone in FAX_TONES else "beep"
            if self.verdict is None:
                self._decide("fax" if kind == "fax" else "machine", f"{tone:.0f} Hz tone")
            if kind == "beep" and not self.beep_heard:
                self.beep_heard = True
                self.on_verdict("beep", f"{tone:.0f} Hz tone", self.ms - self.s.beepLength, self.ms)
            self.finished = True
            return
        if self.verdict is not None:
            self._after_verdict_ms += FRAME_MS
            if self.verdict != "machine" or self._after_verdict_ms >= self.s.beepTimeout:
                self.finished = True
            return
        voiced = float(np.mean(np.abs(frame.astype(np.int32)))) > self.s.silenceThreshold
        if voiced:
            if self.greeting_start is None:
                self.greeting_start = self.ms - FRAME_MS
            self.silence_ms = 0
            self.voiced_run += FRAME_MS
            if not self._in_word and self.voiced_run >= self.s.minWordLength:
                self._in_word = True
                self.words += 1
            self.voice_ms = self.ms - self.greeting_start
        else:
            self.silence_ms += FRAME_MS
            if self.silence_ms >= self.s.betweenWordsSilence:
                self.voiced_run = 0
                self._in_word = False
        if self.greeting_start is None:
            if self.silence_ms >= self.s.initialSilence:
                self._decide("machine", f"{self.silence_ms} ms of silence before any voice")
        elif self.words > self.s.maximumWords:
            self._decide("machine", f"{self.words} words in the greeting")
        elif self.voice_ms > self.s.greeting:
            self._decide("machine", f"a greeting longer than {self.s.greeting} ms")
        elif self.silence_ms >= self.s.afterGreetingSilence:
            self._decide("human", f"a {self.voice_ms - self.silence_ms} ms greeting, then silence")
        if self.verdict is None and self.ms >= self.s.totalAnalysisTime:
            self._decide("unknown", f"no verdict within {self.s.totalAnalysisTime} ms")

    def _decide(self, result: str, reason: str) -> None:
        self.verdict = result
        self.on_verdict(result, reason, 0, self.ms)


def start_amd(session, value) -> Optional[AnsweringMachineDetector]:
    """Run the detector on ``session``'s inbound audio from now on; verdicts become events."""
    try:
        settings = AmdSettings.from_option(value)
    except ValueError as e:
        session.error("amd", str(e), code=400)
        return None
    started = session.now()

    def verdict(result, reason, start_ms, end_ms):
        log.info("call {id}: answering-machine detection: {result} ({reason})", id=session.id,
                 result=result, reason=reason)
        session.extras["amd"] = result if result != "beep" else session.extras.get("amd", "machine")
        session.emit(ev.AnswerMachineDetection(
            trackId=session.id, timestamp=session.now(), startTime=started + start_ms,
            endTime=started + end_ms, text=reason, result=result, beep=True if result == "beep" else None))

    detector = AnsweringMachineDetector(settings, verdict)

    def sink(pcm):
        detector.feed(np.asarray(pcm))
        if detector.finished and sink in session.audio_sinks:
            session.audio_sinks.remove(sink)

    session.audio_sinks.append(sink)
    session.amd = detector
    return detector
