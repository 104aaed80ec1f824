"""Whisper-style log-mel features for the Smart Turn v3 model, with numpy only (no torch, no transformers).

Smart Turn v3 is a Whisper-Tiny encoder with a classification head; it expects
the features Hugging Face's ``WhisperFeatureExtractor`` computes for an 8 s
window at 16 kHz (``chunk_length=8``, 80 mel bands, 25 ms Hann window, 10 ms
hop, waveform normalised to zero mean and unit variance first): an
``(80, 800)`` float32 matrix.

Attribution: this is our own code, written after the numpy implementation in
Pipecat (``pipecat/audio/turn/smart_turn/_whisper_features.py``, BSD-2-Clause,
Copyright (c) 2024-2026 Daily), which itself mirrors Hugging Face Transformers'
``feature_extraction_whisper.py`` and ``audio_utils.py`` (Apache-2.0, Copyright
2022-2023 The HuggingFace Inc. team).  The math is theirs: the Slaney mel
scale and area-normalised filters, the periodic Hann window, the centred
(reflect-padded) power spectrogram, ``log10`` with a floor, the dynamic-range
clamp to 8 (80 dB) below the peak and the ``(x + 4) / 4`` rescale.
``tests/test_speech_eou.py`` pins values computed with that reference.
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16000
WINDOW_SECONDS = 8
WINDOW_SAMPLES = SAMPLE_RATE * WINDOW_SECONDS  # 128000
N_FFT = 400  # 25 ms
HOP = 160  # 10 ms
N_MELS = 80
FRAMES = WINDOW_SAMPLES // HOP  # 800 (the STFT gives 801; the last is dropped, as Whisper does)
_MEL_FLOOR = 1e-10
_VARIANCE_EPS = 1e-7


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = 3.0 * hz / 200.0
    above = 15.0 + np.log(np.maximum(hz, 1e-12) / 1000.0) * (27.0 / np.log(6.4))
    return np.where(hz >= 1000.0, above, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = 200.0 * mel / 3.0
    above = 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0))
    return np.where(mel >= 15.0, above, linear)


def mel_filters(n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Triangular filters on the Slaney mel scale from 0 Hz to Nyquist, area-normalised:
    shape ``(n_fft // 2 + 1, n_mels)``."""
    bins = n_fft // 2 + 1
    fft_hz = np.linspace(0.0, sample_rate // 2, bins)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2.0), n_mels + 2))
    width = np.diff(edges)
    offset = edges[None, :] - fft_hz[:, None]  # (bins, n_mels + 2)
    rising = -offset[:, :-2] / width[:-1]
    falling = offset[:, 2:] / width[1:]
    filters = np.maximum(0.0, np.minimum(rising, falling))
    return filters * (2.0 / (edges[2:] - edges[:-2]))[None, :]


_WINDOW = np.hanning(N_FFT + 1)[:-1]  # periodic Hann (torch.hann_window's default)
_FILTERS_T = mel_filters().T.copy()  # (n_mels, bins)


def log_mel(audio: np.ndarray) -> np.ndarray:
    """``(80, 800)`` float32 features of 8 s of 16 kHz mono audio (floats in [-1, 1]).

    Shorter input is zero-padded at the end and longer input cut to its first
    8 s, as the reference does; ``SmartTurn`` passes exactly the last 8 s,
    padded at the *start*.
    """
    x = np.asarray(audio, dtype=np.float32).reshape(-1)
    if x.size < WINDOW_SAMPLES:
        x = np.concatenate([x, np.zeros(WINDOW_SAMPLES - x.size, dtype=np.float32)])
    x = x[:WINDOW_SAMPLES]
    x = (x - x.mean()) / np.sqrt(x.var() + _VARIANCE_EPS)  # float32, before the spectrogram
    padded = np.pad(x.astype(np.float64), N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP]  # (801, 400), a view
    power = np.abs(np.fft.rfft(frames * _WINDOW, axis=-1)) ** 2  # (801, 201)
    mel = np.log10(np.maximum(_MEL_FLOOR, _FILTERS_T @ power.T))[:, :-1]  # (80, 800)
    mel = np.maximum(mel, mel.max() - 8.0)
    return ((mel + 4.0) / 4.0).astype(np.float32)


def turn_log_mel(audio: np.ndarray) -> np.ndarray:
    """``log_mel(last_window(audio))``, without the work on the zero padding: the same ``(80, 800)`` features.

    A turn shorter than 8 s is zero-padded at the start; after the waveform's
    normalisation that padding is one constant value, so every STFT frame lying
    wholly inside it (with its reflected edge) has the same spectrum.  That
    spectrum is computed once and copied (a 2 s turn leaves ~3/4 of the 801 FFTs,
    the products and the logarithms undone).  The normalisation and the
    dynamic-range clamp still see the whole window, so the values are the
    reference's (tests/test_eou_cost.py compares them).
    """
    x = last_window(audio)
    n_pad = WINDOW_SAMPLES - np.asarray(audio).size
    x = (x - x.mean()) / np.sqrt(x.var() + _VARIANCE_EPS)
    padded = np.pad(x.astype(np.float64), N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP]  # (801, 400), a view
    # frames 0..same-1 lie in the constant stretch padded[: N_FFT // 2 + n_pad] (n_pad > N_FFT // 2: the
    # reflected edge is padding too); frame same - 1 stands for them all
    same = (n_pad + N_FFT // 2 - N_FFT) // HOP + 1 if n_pad > N_FFT // 2 else 0
    first = max(0, same - 1)
    power = np.abs(np.fft.rfft(frames[first:] * _WINDOW, axis=-1)) ** 2
    computed = np.log10(np.maximum(_MEL_FLOOR, _FILTERS_T @ power.T))
    mel = np.empty((N_MELS, frames.shape[0]), dtype=np.float64)
    mel[:, first:] = computed
    mel[:, :first] = computed[:, :1]
    mel = mel[:, :-1]
    mel = np.maximum(mel, mel.max() - 8.0)
    return ((mel + 4.0) / 4.0).astype(np.float32)


def whisper_log_mel(audio: np.ndarray) -> np.ndarray:
    """``(80, n // 160)`` float32 Whisper features of any length of 16 kHz audio (floats in [-1, 1]), as
    Whisper's own extractor computes them (no normalisation of the waveform: that is Smart Turn's), for the
    whisper recogniser (``speech/asr/whisper.py``)."""
    x = np.asarray(audio, dtype=np.float32).reshape(-1).astype(np.float64)
    padded = np.pad(x, N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP]
    power = np.abs(np.fft.rfft(frames * _WINDOW, axis=-1)) ** 2
    mel = np.log10(np.maximum(_MEL_FLOOR, _FILTERS_T @ power.T))[:, :-1]
    mel = np.maximum(mel, mel.max() - 8.0)
    return ((mel + 4.0) / 4.0).astype(np.float32)


def last_window(audio: np.ndarray) -> np.ndarray:
    """The last 8 s of ``audio`` (float32), zero-padded at the start when shorter."""
    x = np.asarray(audio, dtype=np.float32).reshape(-1)
    if x.size >= WINDOW_SAMPLES:
        return x[-WINDOW_SAMPLES:]
    return np.concatenate([np.zeros(WINDOW_SAMPLES - x.size, dtype=np.float32), x])
