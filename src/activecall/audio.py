"""The daemon's audio format and the sample-level code every layer shares (numpy only).

Internally every call's audio is 16 kHz mono int16 in 20 ms frames of 320
samples; ``SAMPLE_RATE``, ``FRAME_MS``, ``FRAME_SAMPLES`` and ``FRAME_BYTES``
are defined here and nowhere else.  Beside them: the resamplers, the G.711
μ-law/A-law tables, and the WAV header helpers of the speech providers.

This module imports nothing from the rest of activecall; media/, speech/ and
webrtc/ import it.

Two resamplers, on purpose (they were written for different jobs and give
different samples, so they are not merged):

- ``Resampler``: streaming and causal, for the media path (codecs, the
  realtime API's 24 kHz audio).  It keeps its filter history and output phase
  between calls, so frames join without clicks, and its filters are shared
  read-only by every leg; it delays the signal by its group delay
  (``delay``).  ``media/codecs.py`` batches many G.711 legs' resamplers into
  one matrix product built from these very taps.
- ``resample``: one whole buffer at a time, zero-phase (the filter is centred,
  so the output is aligned with the input and as long as the input scaled by
  the ratio), with a longer filter (24 taps per phase, cut at the lower
  Nyquist).  For audio that arrives whole: a flite sentence's WAV, test and
  benchmark fixtures.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from math import gcd

import numpy as np

__all__ = [
    "SAMPLE_RATE", "FRAME_MS", "FRAME_SAMPLES", "FRAME_BYTES", "as_int16", "Resampler", "resample",
    "ULAW_ENCODE", "ULAW_DECODE", "ALAW_ENCODE", "ALAW_DECODE",
    "ulaw_encode", "ulaw_decode", "alaw_encode", "alaw_decode",
    "WavFormat", "WavError", "parse_wav_header", "wav_bytes",
]

SAMPLE_RATE = 16000  # every leg and provider speaks 16 kHz mono int16 to the rest of the daemon
FRAME_MS = 20
FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000  # 320
FRAME_BYTES = FRAME_SAMPLES * 2  # 640


def as_int16(pcm) -> np.ndarray:
    """A flat int16 array of ``pcm`` (bytes are viewed as little-endian samples, not copied)."""
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        return np.frombuffer(pcm, dtype="<i2")
    return np.asarray(pcm, dtype=np.int16).reshape(-1)


# -- resampling -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _lowpass(cutoff: float, taps: int, beta: float = 8.0) -> np.ndarray:
    """Kaiser-windowed sinc; ``cutoff`` as a fraction of Nyquist, unity DC gain.

    Cached (read-only): every codec of every call shares the few filters there are."""
    n = np.arange(taps) - (taps - 1) / 2
    h = cutoff * np.sinc(cutoff * n) * np.kaiser(taps, beta)
    h = h / h.sum()
    h.setflags(write=False)
    return h


@functools.lru_cache(maxsize=32)
def _resampler_filter(up: int, factor: int, taps_per_phase: int) -> tuple[np.ndarray, np.ndarray]:
    """(taps, convolution kernel) of a resampler, shared read-only by every one with these ratios."""
    # cut a little below the lower Nyquist so the transition band does not alias
    taps = _lowpass(0.9 / factor, taps_per_phase * factor + 1)[::-1] * up
    kernel = taps[::-1].copy()  # np.convolve flips: correlate with the taps
    taps.setflags(write=False)
    kernel.setflags(write=False)
    return taps, kernel


class Resampler:
    """Streaming rational resampler (zero-stuff by ``up``, FIR, keep every ``down``-th sample).

    The filter history and the output phase carry over between calls, so any
    chunking gives the same output as one long call: no clicks at frame edges.
    Per output sample it costs one dot product of ``taps_per_phase * up`` taps.
    """

    def __init__(self, src_rate: int, dst_rate: int, taps_per_phase: int = 16):
        g = gcd(src_rate, dst_rate)
        self.src_rate, self.dst_rate = src_rate, dst_rate
        self.up, self.down = dst_rate // g, src_rate // g
        factor = max(self.up, self.down)
        self.passthrough = self.up == self.down
        self._taps, self._kernel = _resampler_filter(self.up, factor, taps_per_phase)
        self._history = np.zeros(len(self._taps) - 1)
        #: start of the next output window in (history + new input) coordinates: 0 when every call so far
        #: ended on a whole output period (whole 20 ms frames do), which the batched G.711 coder needs
        self.phase = 0

    @property
    def delay(self) -> float:
        """Group delay in output samples (the FIR is linear phase)."""
        return (len(self._taps) - 1) / 2 / self.down

    def __call__(self, pcm) -> np.ndarray:
        x = as_int16(pcm)
        if self.passthrough:
            return x.copy()
        u = np.zeros(x.size * self.up)
        u[::self.up] = x
        buf = np.concatenate((self._history, u))
        width = len(self._taps)
        last_start = buf.size - width
        if last_start < self.phase:
            y = np.zeros(0)
        else:
            # one C-level convolution over the frame (twice as fast as strided dot products,
            # which matters: this runs for every G.711/Opus frame of every leg)
            y = np.convolve(buf, self._kernel, mode="valid")[self.phase:last_start + 1:self.down]
        consumed = self.phase + y.size * self.down
        keep = width - 1
        self.phase = consumed - (buf.size - keep)
        self._history = buf[buf.size - keep:]
        return np.clip(np.rint(y), -32768, 32767).astype(np.int16)

    def reset(self) -> None:
        self._history[:] = 0
        self.phase = 0


def resample(pcm, src_rate: int, dst_rate: int) -> np.ndarray:
    """One whole buffer, rational polyphase (upsample, low-pass, decimate), zero-phase; int16 in and out.

    Good enough for speech between 8, 16, 22.05 and 24 kHz; the filter is
    built once per ratio (cached), which is cheap next to synthesis.  Not for
    streams: each call starts from silence (``Resampler`` is the streaming one).
    """
    pcm = as_int16(pcm)
    if src_rate == dst_rate or pcm.size == 0:
        return pcm.copy()
    up, down, base, matrix = _polyphase(src_rate, dst_rate)
    # The upsampled signal is zero but at every up-th sample, and only every down-th output is kept, so
    # each output is one phase of the filter (about 24 taps) against as many input samples: output m is
    # sample m*down + (len(h)-1)//2 of the full convolution ("same", as np.convolve gives).  Outputs
    # q*up .. q*up+up-1 read the inputs q*down+base .. q*down+base+width-1 through the same phases, so a
    # block of ``up`` outputs is one row of input samples times ``matrix`` (up x width): one matrix
    # product for the whole buffer (22.05 -> 16 kHz, 2.5 s: ~13 ms, was ~100 ms gathering taps per output).
    width = matrix.shape[1]
    n_out = -(-pcm.size * up // down)
    blocks = -(-n_out // up)
    left = max(0, -base)
    padded = np.zeros(left + max((blocks - 1) * down + base + width, pcm.size) + 1)
    padded[left:left + pcm.size] = pcm
    rows = np.lib.stride_tricks.as_strided(padded[left + base:], shape=(blocks, width),
                                           strides=(down * padded.itemsize, padded.itemsize), writeable=False)
    out = (rows @ matrix.T).reshape(-1)[:n_out]
    return np.clip(np.rint(out), -32768, 32767).astype(np.int16)


_POLYPHASE: dict = {}


def _polyphase(src_rate: int, dst_rate: int):
    """(up, down, base, matrix) of ``resample``: row r of ``matrix`` holds output phase r's taps at the
    input offsets base .. base+width-1 of its block (zero where no tap meets a sample)."""
    key = (src_rate, dst_rate)
    cached = _POLYPHASE.get(key)
    if cached is not None:
        return cached
    g = gcd(src_rate, dst_rate)
    up, down = dst_rate // g, src_rate // g
    taps_per_phase = 24
    h = _lowpass(1.0 / max(up, down), taps_per_phase * max(up, down) | 1) * up
    taps = np.arange(-(-h.size // up))
    t = np.arange(up) * down + (h.size - 1) // 2
    k = (t % up)[:, None] + taps * up  # filter taps that meet an input sample
    n = (t // up)[:, None] - taps  # and those samples, relative to the block's first input
    base = int(n.min())
    matrix = np.zeros((up, int(n.max()) - base + 1))
    rows, cols = np.nonzero(k < h.size)
    matrix[rows, n[rows, cols] - base] = h[k[rows, cols]]
    cached = _POLYPHASE[key] = (up, down, base, matrix)
    return cached


# -- G.711 tables (ITU-T G.711) ---------------------------------------------------------------


def _ulaw_tables():
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent, mantissa = (codes >> 4) & 7, codes & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    decode = np.where(codes & 0x80, -magnitude, magnitude).astype(np.int16)
    samples = np.arange(-32768, 32768, dtype=np.int32)
    sign = np.where(samples < 0, 0x80, 0)
    biased = np.minimum(np.abs(samples), 32635) + 0x84
    exp = np.clip(np.floor(np.log2(biased)).astype(np.int32) - 7, 0, 7)
    mant = (biased >> (exp + 3)) & 0x0F
    encode = (~(sign | (exp << 4) | mant) & 0xFF).astype(np.uint8)
    return encode, decode


def _alaw_tables():
    codes = np.arange(256, dtype=np.int32) ^ 0x55
    exponent, mantissa = (codes >> 4) & 7, codes & 0x0F
    magnitude = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0))
    decode = np.where(codes & 0x80, magnitude, -magnitude).astype(np.int16)
    samples = np.arange(-32768, 32768, dtype=np.int32) >> 3  # 13-bit
    mask = np.where(samples >= 0, 0xD5, 0x55)
    magnitude = np.where(samples >= 0, samples, -samples - 1)
    seg = np.searchsorted(np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF]), magnitude, side="left")
    mant = np.where(seg < 2, magnitude >> 1, magnitude >> np.maximum(seg, 1)) & 0x0F
    code = np.where(seg >= 8, 0x7F, (np.minimum(seg, 7) << 4) | mant)
    encode = (code ^ mask).astype(np.uint8)
    return encode, decode


ULAW_ENCODE, ULAW_DECODE = _ulaw_tables()  # int16 + 32768 -> code; 256 codes -> int16
ALAW_ENCODE, ALAW_DECODE = _alaw_tables()


def ulaw_encode(pcm) -> bytes:
    return ULAW_ENCODE[as_int16(pcm).astype(np.int32) + 32768].tobytes()


def ulaw_decode(data: bytes) -> np.ndarray:
    return ULAW_DECODE[np.frombuffer(data, dtype=np.uint8)]


def alaw_encode(pcm) -> bytes:
    return ALAW_ENCODE[as_int16(pcm).astype(np.int32) + 32768].tobytes()


def alaw_decode(data: bytes) -> np.ndarray:
    return ALAW_DECODE[np.frombuffer(data, dtype=np.uint8)]


# -- WAV headers ------------------------------------------------------------------------------


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


def wav_bytes(pcm, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A mono 16-bit WAV file holding ``pcm`` (for cloud uploads and debugging)."""
    data = as_int16(pcm).astype("<i2").tobytes()
    return (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
            + b"data" + struct.pack("<I", len(data)) + data)
