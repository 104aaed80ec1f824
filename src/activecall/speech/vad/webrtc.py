"""webrtcvad (package ``webrtcvad-wheels``): the GMM VAD from WebRTC.

Microseconds per 30 ms frame (docs/speech.md), so it runs inline on the
reactor: a thread hop would cost more than the work.  Its decisions are binary, so
``voiceThreshold`` has no effect; ``mode`` (0..3) sets the aggressiveness.
"""

from __future__ import annotations

import numpy as np

from activecall.audio import SAMPLE_RATE
from activecall.speech.base import SpeechError
from activecall.speech.vad.base import WindowedVad


class WebRtcVad(WindowedVad):
    name = "webrtcvad"
    window = 480  # 30 ms, one of the three frame sizes webrtcvad accepts

    def __init__(self, options, on_event):
        super().__init__(options, on_event)
        try:
            import webrtcvad
        except ImportError:
            raise SpeechError("vad type 'webrtcvad' needs the package webrtcvad-wheels") from None
        self._vad = webrtcvad.Vad(options.mode)

    def _classify(self, windows: np.ndarray) -> np.ndarray:
        return np.array([1.0 if self._vad.is_speech(w.astype("<i2").tobytes(), SAMPLE_RATE) else 0.0
                         for w in windows])
