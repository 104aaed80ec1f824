"""Pure speech/silence state machine over per-window voice decisions.

Detectors turn audio into (window start, window length, probability); this
class alone decides when speech starts and ends, so every VAD backend has the
same padding semantics (docs/speech.md, "VAD"):

- ``speechPadding``: voiced audio must last this long before ``SpeechStarted``
  (shorter blips are ignored); the event carries the time the voice began;
- ``silencePadding``: quiet must last this long to close a segment; the end
  time is where the quiet began;
- ``voiceThreshold``: a window is voiced at or above it; once speaking, a
  window stays voiced down to ``voiceThreshold - 0.15`` (silero's hysteresis);
- ``silenceTimeout``: while not speaking, ``SilenceTimeout`` repeats every
  this many ms of quiet.
"""

from __future__ import annotations

from typing import Optional

from activecall.speech.base import SilenceTimeout, SpeechEnded, SpeechStarted, VadOptions

HYSTERESIS = 0.15


class Segmenter:
    def __init__(self, options: VadOptions):
        self.options = options
        self.speaking = False
        self._voice_start: Optional[int] = None  # candidate or confirmed speech start
        self._last_voiced_end: Optional[int] = None
        self._quiet_since = 0
        self._silence_reported = 0  # ms of quiet already reported by SilenceTimeout

    def push(self, start_ms: int, length_ms: int, probability: float) -> list:
        """Classify one window; returns the events it caused (usually none)."""
        o = self.options
        end_ms = start_ms + length_ms
        threshold = o.voiceThreshold - HYSTERESIS if self.speaking else o.voiceThreshold
        voiced = probability >= threshold
        events: list = []
        if voiced:
            if self._voice_start is None or (
                    not self.speaking and self._last_voiced_end is not None
                    and start_ms - self._last_voiced_end >= o.silencePadding):
                self._voice_start = start_ms
            self._last_voiced_end = end_ms
            if not self.speaking and end_ms - self._voice_start >= max(o.speechPadding, 1):
                self.speaking = True
                events.append(SpeechStarted(self._voice_start))
        else:
            last = self._last_voiced_end
            if self.speaking and last is not None and end_ms - last >= o.silencePadding:
                events.append(SpeechEnded(self._voice_start, last))
                self.speaking = False
                self._voice_start = None
                self._quiet_since = last
                self._silence_reported = 0
            elif not self.speaking and self._voice_start is not None and last is not None \
                    and end_ms - last >= o.silencePadding:
                self._voice_start = None  # a blip shorter than speechPadding
            if not self.speaking and o.silenceTimeout:
                quiet = end_ms - self._quiet_since
                if quiet - self._silence_reported >= o.silenceTimeout:
                    self._silence_reported += o.silenceTimeout
                    events.append(SilenceTimeout(self._quiet_since, self._silence_reported))
        return events

    def voiced_after(self, ms: int) -> bool:
        """A window ending after ``ms`` was voiced (a speech end at ``ms`` was followed by voice, even one
        too short to start a segment)."""
        return self._last_voiced_end is not None and self._last_voiced_end > ms

    def finish(self, now_ms: int) -> list:
        """End of stream: close an open segment at the last voiced instant."""
        if self.speaking and self._last_voiced_end is not None:
            self.speaking = False
            return [SpeechEnded(self._voice_start, self._last_voiced_end)]
        return []
