"""Small PCM helpers the speech providers need: resampling, WAV headers, G.711 μ-law.

Kept here (numpy only) so speech/ does not wait on media/codecs.py; the μ-law
pair exists for the telephone-path tests (flite → 8 kHz PCMU → 16 kHz → ASR).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from math import gcd

import numpy as np

SAMPLE_RATE = 16000  # every provider speaks 16 kHz mono int16 to the rest of the daemon


def as_int16(pcm) -> np.ndarray:
    """A flat int16 array view of ``pcm`` (bytes or array)."""
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        return np.frombuffer(pcm, dtype="<i2")
    return np.asarray(pcm, dtype=np.int16).reshape(-1)


def _lowpass(cutoff: float, taps: int) -> np.ndarray:
    """Kaiser-windowed sinc; ``cutoff`` is a fraction of the (upsampled) Nyquist."""
    n = np.arange(taps) - (taps - 1) / 2
    h = cutoff * np.sinc(cutoff * n) * np.kaiser(taps, 8.0)
    return h / h.sum()


def resample(pcm: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Rational polyphase resampling (upsample, low-pass, decimate), int16 in and out.

    Good enough for speech between 8, 16, 22.05 and 24 kHz; the filter is
    computed once per call, which is cheap next to synthesis.
    """
    pcm = as_int16(pcm)
    if src_rate == dst_rate or pcm.size == 0:
        return pcm.copy()
    g = gcd(src_rate, dst_rate)
    up, down = dst_rate // g, src_rate // g
    taps_per_phase = 24
    h = _lowpass(1.0 / max(up, down), taps_per_phase * max(up, down) | 1) * up
    x = np.zeros(pcm.size * up, dtype=np.float64)
    x[::up] = pcm
    y = np.convolve(x, h, mode="same")[::down]
    return np.clip(np.rint(y), -32768, 32767).astype(np.int16)


@dataclass(frozen=True)
class WavFormat:
    sample_rate: int
    channels: int
    bits: int
    data_offset: int  # bytes before the first sample
    data_size: int  # may be 0 or 0xFFFFFFFF when the writer streamed


class WavError(ValueError):
    pass


def parse_wav_header(head: bytes) -> WavFormat | None:
    """The format of a RIFF/WAVE stream from its first bytes, or None if more bytes are needed."""
    if len(head) < 12:
        return None
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise WavError("not a RIFF/WAVE stream")
    pos, fmt = 12, None
    while pos + 8 <= len(head):
        chunk_id, size = head[pos:pos + 4], struct.unpack("<I", head[pos + 4:pos + 8])[0]
        if chunk_id == b"fmt ":
            if pos + 8 + 16 > len(head):
                return None
            tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", head[pos + 8:pos + 24])
            if tag not in (1, 0xFFFE) or bits != 16:
                raise WavError(f"only 16-bit PCM WAV is supported (format tag {tag}, {bits} bits)")
            fmt = (rate, channels, bits)
        elif chunk_id == b"data":
            if fmt is None:
                raise WavError("WAV data chunk before fmt chunk")
            return WavFormat(fmt[0], fmt[1], fmt[2], pos + 8, size)
        pos += 8 + size + (size & 1)
    return None


def wav_bytes(pcm: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A mono 16-bit WAV file holding ``pcm`` (for cloud uploads and debugging)."""
    data = as_int16(pcm).astype("<i2").tobytes()
    return (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
            + b"data" + struct.pack("<I", len(data)) + data)


# -- G.711 μ-law (ITU-T G.711, segment encoding with bias 0x84) ------------------------------

_BIAS = 0x84
_CLIP = 32635


def _build_ulaw_decode() -> np.ndarray:
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    sign = codes & 0x80
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = (((mantissa << 3) + _BIAS) << exponent) - _BIAS
    return np.where(sign != 0, -magnitude, magnitude).astype(np.int16)


def _build_ulaw_encode() -> np.ndarray:
    samples = np.arange(-32768, 32768, dtype=np.int32)
    sign = np.where(samples < 0, 0x80, 0)
    magnitude = np.minimum(np.abs(samples), _CLIP) + _BIAS
    exponent = np.floor(np.log2(magnitude)).astype(np.int32) - 7
    exponent = np.clip(exponent, 0, 7)
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8)


ULAW_DECODE = _build_ulaw_decode()  # 256 codes -> int16
ULAW_ENCODE = _build_ulaw_encode()  # int16 + 32768 -> code


def ulaw_encode(pcm: np.ndarray) -> bytes:
    return ULAW_ENCODE[as_int16(pcm).astype(np.int32) + 32768].tobytes()


def ulaw_decode(data: bytes) -> np.ndarray:
    return ULAW_DECODE[np.frombuffer(data, dtype=np.uint8)]
