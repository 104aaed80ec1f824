"""Ambiance: a looping background bed (an office, a café) mixed under the bot's voice.

A call gets one when its option (or its playbook) has ``ambiance`` and ``enabled`` is not false;
``[ambiance]`` in the configuration gives the defaults its keys leave out (docs/configuration.md).
``path`` is any file PyAV decodes or an http(s) URL the operator set, fetched once with treq through the
media cache when the call is answered (``MediaLoader``); without a path the bed is a generated soft
room tone (nothing copyrighted ships).  Until the bed is loaded, and if loading fails (an ``error``
event), the call simply has none.

The bed plays at ``normalLevel`` (a linear gain) and is ducked to ``duckLevel`` while the bot speaks;
the gain moves towards its target by ``transitionSpeed`` per 20 ms frame.  It is mixed into what the
caller hears (and what is recorded as the bot's channel, and the echo canceller's reference), never
into what the recogniser gets: that is the caller's audio.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from twisted.internet import defer
from twisted.logger import Logger

from activecall.audio import FRAME_SAMPLES, SAMPLE_RATE
from activecall.protocol import events as ev

log = Logger(namespace="activecall.call.ambiance")

#: the generated room tone's length and level (RMS, dBFS before the level gains)
TONE_SECONDS = 4
TONE_DBFS = -24.0


@dataclass(frozen=True)
class AmbianceSettings:
    path: Optional[str] = None
    duck_level: float = 0.1
    normal_level: float = 0.3
    transition_speed: float = 0.01
    enabled: bool = True

    @classmethod
    def resolve(cls, option, config) -> Optional["AmbianceSettings"]:
        """The call's ``ambiance`` option over ``[ambiance]``; None when the call has no ambiance."""
        if option is None:
            return None
        base = cls() if config is None else cls(config.path, config.duckLevel, config.normalLevel,
                                                config.transitionSpeed, config.enabled)

        def pick(value, default):
            return default if value is None else value

        settings = cls(pick(option.path, base.path), float(pick(option.duckLevel, base.duck_level)),
                       float(pick(option.normalLevel, base.normal_level)),
                       float(pick(option.transitionSpeed, base.transition_speed)),
                       bool(pick(option.enabled, base.enabled)))
        if not settings.enabled:
            return None
        for name in ("duck_level", "normal_level"):
            if not 0.0 <= getattr(settings, name) <= 4.0:
                raise ValueError(f"ambiance.{name}: must be between 0 and 4")
        if not 0.0 < settings.transition_speed <= 1.0:
            raise ValueError("ambiance.transitionSpeed: must be above 0 and at most 1")
        return settings


def room_tone(seconds: int = TONE_SECONDS, seed: int = 20) -> np.ndarray:
    """A soft, seamless room tone: brown-ish noise, low-passed, with the loop's ends cross-faded."""
    rng = np.random.default_rng(seed)
    n = seconds * SAMPLE_RATE
    fade = SAMPLE_RATE // 4
    white = rng.normal(0.0, 1.0, n + fade)
    brown = np.cumsum(white)
    brown -= np.convolve(brown, np.ones(801) / 801, mode="same")  # no drift: keep it above ~20 Hz
    kernel = np.hanning(15)
    tone = np.convolve(brown, kernel / kernel.sum(), mode="same")
    ramp = np.linspace(0.0, 1.0, fade)
    loop = tone[:n].copy()
    loop[:fade] = tone[:fade] * ramp + tone[n:n + fade] * (1.0 - ramp)
    loop *= 32768 * 10 ** (TONE_DBFS / 20) / np.sqrt(np.mean(loop ** 2))
    return np.clip(np.rint(loop), -32768, 32767).astype(np.int16)


class Ambiance:
    """One call's bed: ``mix(bot_frame)`` is called once per outbound frame."""

    def __init__(self, settings: AmbianceSettings, bed: Optional[np.ndarray] = None):
        self.settings = settings
        self.bed: Optional[np.ndarray] = None
        self._pos = 0
        self.gain = settings.normal_level
        if bed is not None:
            self.set_bed(bed)

    def set_bed(self, pcm: np.ndarray) -> None:
        pcm = np.asarray(pcm, dtype=np.int16).reshape(-1)
        if pcm.size < FRAME_SAMPLES:
            pcm = np.resize(pcm, FRAME_SAMPLES) if pcm.size else np.zeros(FRAME_SAMPLES, np.int16)
        self.bed = pcm.astype(np.float32)
        self._pos = 0

    def _next_bed(self) -> np.ndarray:
        bed = self.bed
        end = self._pos + FRAME_SAMPLES
        if end <= bed.size:
            out = bed[self._pos:end]
        else:
            out = np.concatenate([bed[self._pos:], bed[: end - bed.size]])
        self._pos = end % bed.size
        return out

    def mix(self, bot: Optional[np.ndarray]) -> Optional[np.ndarray]:
        if self.bed is None:
            return bot
        speaking = bot is not None and bool(np.any(bot))
        s = self.settings
        target = s.duck_level if speaking else s.normal_level
        start = self.gain
        if start < target:
            self.gain = min(target, start + s.transition_speed)
        elif start > target:
            self.gain = max(target, start - s.transition_speed)
        gains = np.linspace(start, self.gain, FRAME_SAMPLES, dtype=np.float32)
        bed = self._next_bed() * gains
        if bot is not None and bot.size == FRAME_SAMPLES:
            bed = bed + bot.astype(np.float32)
        return np.clip(np.rint(bed), -32768, 32767).astype(np.int16)


def attach_ambiance(session) -> Optional[defer.Deferred]:
    """Start the call's bed if its option asks for one (called when the call is answered)."""
    option = session.option.ambiance if session.option is not None else None
    config = session.config.ambiance if session.config is not None and hasattr(session.config, "ambiance") else None
    try:
        settings = AmbianceSettings.resolve(option, config)
    except ValueError as e:
        session.error("ambiance", str(e), code=400)
        return None
    if settings is None:
        return None
    ambiance = Ambiance(settings)
    session.ambiance = ambiance
    if not settings.path:
        ambiance.set_bed(room_tone())
        return defer.succeed(ambiance)
    d = session.playback.loader.load(settings.path)

    def loaded(pcm):
        if session.ambiance is ambiance:
            ambiance.set_bed(pcm)
        return ambiance

    def failed(f):
        log.warn("call {id}: ambiance {path} not loaded: {e}", id=session.id, path=settings.path, e=f.value)
        session.emit(ev.Error(trackId=session.id, timestamp=session.now(), sender="ambiance",
                              error=f"cannot load {settings.path}: {f.getErrorMessage()}"))
        if session.ambiance is ambiance:
            session.ambiance = None
        return None

    return d.addCallbacks(loaded, failed)
