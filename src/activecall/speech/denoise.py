"""Noise suppression and automatic gain on the caller's audio, before VAD and ASR (``denoise: true``).

WebRTC's noise suppressor (level 2) and gain controller through the ``webrtc-noise-gain`` package (the
one the Home Assistant voice pipeline uses; a compiled wheel, no model file, under 0.5 % of a core per
leg).  Chosen by measurement (docs/speech.md, "Denoise and gain"; bench/bench_denoise.py): with the
default recogniser (Whisper) no suppressor lowers the word error on noisy G.711 speech (raw, gain only
and suppression levels 1-3 are within the measurement's noise of each other) and RNNoise raises it,
at ten times the CPU; so RNNoise is not shipped.  The suppressor stays because of the gain controller:
alone it lifts a quiet caller's noise with the speech, and the VAD then takes the lifted noise for a
voice; with the suppressor the noise between words comes out lower than it came in.

The processor works on 10 ms blocks; ``process`` takes the daemon's 20 ms frames.
"""

from __future__ import annotations

import numpy as np

from activecall.speech.base import SpeechError

#: noise suppression level 0 (off) .. 4 (strongest); 1-3 measured alike for the recogniser, 2 kept
DEFAULT_LEVEL = 2
#: the gain controller's target level, dB below full scale (0 turns it off)
DEFAULT_TARGET_DBFS = 3
BLOCK = 160  # 10 ms at 16 kHz


class Denoiser:
    """One call's noise suppressor and gain controller."""

    name = "webrtc"

    def __init__(self, level: int = DEFAULT_LEVEL, target_dbfs: int = DEFAULT_TARGET_DBFS):
        if not 0 <= level <= 4:
            raise SpeechError(f"denoise level must be 0..4, got {level}")
        if not 0 <= target_dbfs <= 31:
            raise SpeechError(f"denoise gain target must be 0..31 dBFS, got {target_dbfs}")
        try:
            from webrtc_noise_gain import AudioProcessor
        except ImportError as e:  # pragma: no cover - it is in install_requires
            raise SpeechError(f"denoise: webrtc-noise-gain is not installed ({e})") from None
        self._processor = AudioProcessor(target_dbfs, level)
        self._pending = b""

    def process(self, pcm: np.ndarray) -> np.ndarray:
        """Denoise one frame (any whole number of 10 ms blocks; a remainder waits for the next call)."""
        data = self._pending + np.asarray(pcm, dtype="<i2").tobytes()
        whole = len(data) - len(data) % (BLOCK * 2)
        self._pending = data[whole:]
        out = [self._processor.Process10ms(data[i:i + BLOCK * 2]).audio for i in range(0, whole, BLOCK * 2)]
        return np.frombuffer(b"".join(out), dtype="<i2").astype(np.int16)
