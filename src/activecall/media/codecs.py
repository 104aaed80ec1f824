"""Audio codecs behind one small interface; the daemon's internal format is 16 kHz mono s16.

Every codec object is one leg's state in both directions: ``encode`` takes
16 kHz int16 PCM (normally a 20 ms frame of 320 samples) and returns an RTP
payload; ``decode`` takes a payload and returns 16 kHz int16 PCM.  Resamplers
and codec state live in the object, so frames join without clicks; make one
per leg with ``create``.

What is hand-written and why: G.711 is two 256/65536-entry numpy tables
(exact ITU segment laws, cross-checked against FFmpeg's decoders in tests);
L16 is a byte swap; the resampler is a small streaming polyphase FIR in numpy
because it runs once per frame per leg and must keep state.  The tables, the
resampler and the frame constants live in ``activecall.audio`` (shared with
speech/); this module adds the codec objects and the batched G.711 path.
G.722 comes from the ``g722`` package (import ``G722``) and Opus from PyAV's
libopus: codecs are never hand-written here.
"""

from __future__ import annotations

import functools
import threading
import weakref
from dataclasses import dataclass
from typing import Optional

import numpy as np

from activecall.audio import (ALAW_DECODE, ALAW_ENCODE, FRAME_MS, FRAME_SAMPLES, SAMPLE_RATE, ULAW_DECODE,
                              ULAW_ENCODE, Resampler, _resampler_filter, alaw_decode, alaw_encode, as_int16,
                              ulaw_decode, ulaw_encode)

__all__ = [
    "SAMPLE_RATE", "FRAME_SAMPLES", "CodecError", "CodecInfo", "Codec", "Resampler", "PcmuCodec", "PcmaCodec",
    "G722Codec", "OpusCodec", "L16Codec", "CODECS", "create", "create_for_payload", "stream_codec",
    "ulaw_encode", "ulaw_decode", "alaw_encode", "alaw_decode", "encode_frames", "decode_payloads",
]


class CodecError(ValueError):
    """An unknown codec name or a payload the decoder refuses."""


# -- per-leg resampler histories --------------------------------------------------------------


class _HistoryBank:
    """The filter histories of many resamplers of one shape, as the rows of one float32 matrix.

    The batched G.711 path (below) reads and writes every leg's history with
    one indexed copy (``matrix[rows]``) instead of a small array per leg; the
    one-by-one path reads and writes the same row, so a codec can move between
    the two at any frame."""

    def __init__(self, width: int, rows: int = 64):
        self.matrix = np.zeros((rows, width), dtype=np.float32)
        self._free = list(range(rows - 1, -1, -1))
        self._lock = threading.Lock()  # codecs may be made and dropped off the reactor thread

    def allocate(self) -> int:
        with self._lock:
            if not self._free:
                rows, width = self.matrix.shape
                grown = np.zeros((2 * rows, width), dtype=np.float32)
                grown[:rows] = self.matrix
                self.matrix = grown
                self._free = list(range(2 * rows - 1, rows - 1, -1))
            return self._free.pop()

    def release(self, row: int) -> None:
        with self._lock:
            self.matrix[row] = 0
            self._free.append(row)


class _BankedResampler(Resampler):
    """A ``Resampler`` whose history is row ``row`` of a ``_HistoryBank`` (released with the resampler)."""

    _bank: Optional[_HistoryBank] = None  # (Resampler.__init__ sets a history before the bank is known)

    def __init__(self, src_rate: int, dst_rate: int, bank: _HistoryBank):
        super().__init__(src_rate, dst_rate)
        if bank.matrix.shape[1] != len(self._taps) - 1:
            raise ValueError("the bank's rows do not fit this resampler's history")
        self._bank = bank
        #: this resampler's row of the bank's matrix (the batched path reads and writes it)
        self.row = bank.allocate()
        self._release_row = weakref.finalize(self, bank.release, self.row)

    def release(self) -> None:
        """Give the row back now (a closed leg's codec), not when the garbage collector gets to the
        resampler; idempotent.  A released resampler starts again from silence if used."""
        if self._bank is not None:
            self._bank = None
            self._release_row()

    @property
    def _history(self) -> np.ndarray:
        if self._bank is None:
            return np.zeros(len(self._taps) - 1, dtype=np.float32)
        return self._bank.matrix[self.row]

    @_history.setter
    def _history(self, value) -> None:
        if self._bank is not None:
            self._bank.matrix[self.row] = value


# -- the interface --------------------------------------------------------------------------


@dataclass(frozen=True)
class CodecInfo:
    """How a codec sits on the wire: its config name, SDP encoding and RTP clock."""

    name: str
    encoding: str
    payload_type: int  # static PT, or our default dynamic one
    clock_rate: int  # RTP timestamp rate (8000 for G.722, 48000 for Opus)
    channels: int = 1

    @property
    def timestamp_step(self) -> int:
        """RTP timestamp units per 20 ms frame."""
        return self.clock_rate * FRAME_MS // 1000


class Codec:
    """One leg's encoder and decoder for one payload format."""

    info: CodecInfo

    def __init__(self, payload_type: Optional[int] = None):
        self.payload_type = self.info.payload_type if payload_type is None else payload_type

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def clock_rate(self) -> int:
        return self.info.clock_rate

    @property
    def timestamp_step(self) -> int:
        return self.info.timestamp_step

    def encode(self, pcm16k: np.ndarray) -> bytes:
        raise NotImplementedError

    def decode(self, payload: bytes) -> np.ndarray:
        raise NotImplementedError

    def conceal(self) -> np.ndarray:
        """A frame for a lost packet: silence unless the codec can do better (Opus PLC)."""
        return np.zeros(FRAME_SAMPLES, dtype=np.int16)

    def close(self) -> None:
        """Release shared state now, when the leg closes (idempotent)."""


class _G711Codec(Codec):
    """G.711, coded one frame at a time here or many legs at once by ``encode_frames``/``decode_payloads``,
    which read the public state below: ``alaw`` (the law), ``downsampler``/``upsampler`` (the 16 <-> 8 kHz
    resamplers: ``row``, their history's row of the shared bank; ``phase``, 0 on a whole-frame boundary)."""

    #: A-law (PCMA) rather than μ-law (PCMU)
    alaw = False
    _encode_table: np.ndarray
    _decode_table: np.ndarray

    def __init__(self, payload_type: Optional[int] = None):
        super().__init__(payload_type)
        self.downsampler = _BankedResampler(SAMPLE_RATE, 8000, _DOWN_BANK)
        self.upsampler = _BankedResampler(8000, SAMPLE_RATE, _UP_BANK)

    def encode(self, pcm16k) -> bytes:
        return self._encode_table[self.downsampler(pcm16k).astype(np.int32) + 32768].tobytes()

    def decode(self, payload: bytes) -> np.ndarray:
        return self.upsampler(self._decode_table[np.frombuffer(payload, dtype=np.uint8)])

    def close(self) -> None:
        """The resamplers' rows of the shared history banks go back at once."""
        self.downsampler.release()
        self.upsampler.release()


class PcmuCodec(_G711Codec):
    info = CodecInfo("pcmu", "PCMU", 0, 8000)
    _encode_table, _decode_table = ULAW_ENCODE, ULAW_DECODE


class PcmaCodec(_G711Codec):
    info = CodecInfo("pcma", "PCMA", 8, 8000)
    alaw = True
    _encode_table, _decode_table = ALAW_ENCODE, ALAW_DECODE


class G722Codec(Codec):
    """G.722 at 64 kbit/s: 16 kHz audio, an 8000 Hz RTP clock (RFC 3551's historical quirk)."""

    info = CodecInfo("g722", "G722", 9, 8000)

    def __init__(self, payload_type: Optional[int] = None):
        super().__init__(payload_type)
        import G722

        self._encoder = G722.G722(SAMPLE_RATE, 64000)
        self._decoder = G722.G722(SAMPLE_RATE, 64000)

    def encode(self, pcm16k) -> bytes:
        return bytes(self._encoder.encode(as_int16(pcm16k)))

    def decode(self, payload: bytes) -> np.ndarray:
        if not payload:
            return np.zeros(0, dtype=np.int16)
        return np.asarray(self._decoder.decode(bytes(payload)), dtype=np.int16)


class OpusCodec(Codec):
    """Opus through PyAV's libopus: we encode 16 kHz mono (libopus takes it natively);
    the decoder yields 48 kHz, stereo downmixed, resampled to 16 kHz."""

    info = CodecInfo("opus", "opus", 111, 48000, 2)

    def __init__(self, payload_type: Optional[int] = None, bitrate: int = 32000):
        super().__init__(payload_type)
        import av

        self._av = av
        enc = av.CodecContext.create("libopus", "w")
        enc.sample_rate = SAMPLE_RATE
        enc.layout = "mono"
        enc.format = "s16"
        enc.bit_rate = bitrate
        enc.options = {"application": "voip", "frame_duration": str(FRAME_MS)}
        self._encoder = enc
        dec = av.CodecContext.create("libopus", "r")
        dec.sample_rate = 48000
        dec.layout = "stereo"
        self._decoder = dec
        self._down = Resampler(48000, SAMPLE_RATE)
        self._pts = 0
        self._pending = np.zeros(0, dtype=np.int16)

    def encode(self, pcm16k) -> bytes:
        """One packet per call; input that is not a whole 20 ms frame is buffered or padded."""
        pcm = np.concatenate((self._pending, as_int16(pcm16k)))
        if pcm.size < FRAME_SAMPLES:
            pcm = np.concatenate((pcm, np.zeros(FRAME_SAMPLES - pcm.size, dtype=np.int16)))
        frame_pcm, self._pending = pcm[:FRAME_SAMPLES], pcm[FRAME_SAMPLES:]
        frame = self._av.AudioFrame.from_ndarray(frame_pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self._pts
        self._pts += FRAME_SAMPLES
        packets = self._encoder.encode(frame)
        return b"".join(bytes(p) for p in packets)

    def decode(self, payload: bytes) -> np.ndarray:
        try:
            frames = self._decoder.decode(self._av.Packet(bytes(payload)))
        except self._av.FFmpegError as e:
            raise CodecError(f"opus payload rejected: {e}") from None
        out = [self._down(self._downmix(f)) for f in frames]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int16)

    @staticmethod
    def _downmix(frame) -> np.ndarray:
        data = frame.to_ndarray()
        channels = len(frame.layout.channels)
        if frame.format.is_planar:
            data = data.reshape(channels, -1).astype(np.float64).mean(axis=0)
        else:
            data = data.reshape(-1, channels).astype(np.float64).mean(axis=1)
        if frame.format.name.startswith(("flt", "dbl")):
            data = data * 32767.0
        return np.clip(np.rint(data), -32768, 32767).astype(np.int16)


class L16Codec(Codec):
    """RFC 3551 L16: big-endian linear PCM at the negotiated clock (16 kHz by default)."""

    info = CodecInfo("l16", "L16", 96, 16000)

    def __init__(self, payload_type: Optional[int] = None, clock_rate: int = 16000):
        super().__init__(payload_type)
        if clock_rate != self.info.clock_rate:
            self.info = CodecInfo("l16", "L16", self.info.payload_type, clock_rate)
        self._down = Resampler(SAMPLE_RATE, clock_rate)
        self._up = Resampler(clock_rate, SAMPLE_RATE)

    def encode(self, pcm16k) -> bytes:
        return self._down(pcm16k).astype(">i2").tobytes()

    def decode(self, payload: bytes) -> np.ndarray:
        usable = len(payload) - len(payload) % 2
        return self._up(np.frombuffer(payload[:usable], dtype=">i2").astype(np.int16))


# -- many legs at once ---------------------------------------------------------------------
#
# Per frame, G.711's work is tiny and numpy's per-call overhead dominates (a
# dozen small array operations per leg per 20 ms).  The media tick therefore
# codes every G.711 leg of the tick together: one matrix of frames (history
# columns first), one float32 matrix product with the resampling FIR written as
# a banded matrix, one table lookup.  The matrices are built from the
# per-leg ``Resampler``'s own taps.  Each G.711 resampler keeps its filter
# history in a row of a shared matrix (``_HistoryBank``), which the batch reads
# and writes with one indexed copy and the one-by-one path uses as its history,
# so a leg may move between the batched and the one-by-one path at any frame
# without a click.

_G711_RATE = 8000
_G711_FRAME = FRAME_SAMPLES * _G711_RATE // SAMPLE_RATE  # 160 bytes per 20 ms
_HISTORY = len(_resampler_filter(2, 2, 16)[0]) - 1  # 32: the 16<->8 kHz filters' history, either way
_DOWN_BANK = _HistoryBank(_HISTORY)  # every G.711 encoder's 16 -> 8 kHz history
_UP_BANK = _HistoryBank(_HISTORY)  # every G.711 decoder's 8 -> 16 kHz history (zero-stuffed)


def _banded(resampler: "Resampler", inputs: int, outputs: int) -> np.ndarray:
    """The linear map (history + zero-stuffed frame) -> output frame of ``resampler`` as a matrix.

    Column ``j`` is the response to a unit impulse at buffer position ``j``,
    computed with the same convolution the streaming path uses."""
    width = len(resampler._kernel)
    size = width - 1 + inputs * resampler.up
    m = np.zeros((size, outputs))
    for j in range(size):
        e = np.zeros(size)
        e[j] = 1.0
        m[j] = np.convolve(e, resampler._kernel, mode="valid")[0:size - width + 1:resampler.down][:outputs]
    return m


@functools.lru_cache(maxsize=1)
def _g711_matrices():
    """(down, up): 16->8 kHz as (32 + 320) x 160; 8->16 kHz as (16 + 160) x 320.

    For the upsampler only the non-zero inputs are kept: its history holds
    the zero-stuffed signal, whose odd positions are always zero on
    whole frames, so half the rows would multiply zeros."""
    down = _banded(Resampler(SAMPLE_RATE, _G711_RATE), FRAME_SAMPLES, _G711_FRAME)
    up_full = _banded(Resampler(_G711_RATE, SAMPLE_RATE), _G711_FRAME, FRAME_SAMPLES)
    up = up_full[0::2]  # history even positions (16) then the frame's samples (160)
    return down.astype(np.float32), up.astype(np.float32)


_PRODUCT_BLOCK = 32  # output columns per block of a banded product (measured best for 200-1000 legs)


@functools.lru_cache(maxsize=1)
def _g711_blocks():
    """``_g711_matrices`` cut into column blocks that keep only the rows each block uses.

    The resampling matrices are banded (an output sample depends on one
    filter's width of inputs, 33 of the 352 rows), so the dense product does
    ~10x the multiplications it needs; blocks of 32 columns do ~3x fewer
    (measured in docs/benchmarks.md)."""
    return tuple(_column_blocks(m, _PRODUCT_BLOCK) for m in _g711_matrices())


def _column_blocks(m: np.ndarray, width: int) -> tuple:
    blocks = []
    for c0 in range(0, m.shape[1], width):
        c1 = min(c0 + width, m.shape[1])
        used = np.nonzero(np.any(m[:, c0:c1] != 0, axis=1))[0]
        r0, r1 = int(used[0]), int(used[-1]) + 1
        blocks.append((r0, r1, c0, c1, np.ascontiguousarray(m[r0:r1, c0:c1])))
    return tuple(blocks)


def _banded_product(x: np.ndarray, blocks: tuple, columns: int) -> np.ndarray:
    """``x @ m`` for the banded ``m`` that ``blocks`` were cut from."""
    y = np.empty((x.shape[0], columns), dtype=np.float32)
    for r0, r1, c0, c1, sub in blocks:
        np.matmul(x[:, r0:r1], sub, out=y[:, c0:c1])
    return y


def _one(code, data):
    """One codec call of a batch: a frame the codec refuses (a corrupt Opus packet) is None,
    not an exception that would cost every other leg its frame."""
    try:
        return code(data)
    except Exception:
        return None


#: legs coded per matrix product: 256 rows of the float32 input (360 KB) stay in a core's L2
#: cache through the banded product's passes, where all 1000 rows of a big tick at once do not
#: (measured in docs/benchmarks.md)
BATCH_ROWS = 256


def _slices(batch: list) -> list:
    """``batch`` cut into as few slices of at most ``BATCH_ROWS`` as it takes, the same size but the last."""
    n = len(batch)
    if n <= BATCH_ROWS:
        return [batch]
    size = -(-n // -(-n // BATCH_ROWS))
    return [batch[k:k + size] for k in range(0, n, size)]


def encode_frames(codecs, frames) -> list:
    """``[c.encode(f) for c, f in zip(codecs, frames)]``, with every G.711 whole frame coded in one go
    (in slices of ``BATCH_ROWS``).

    A frame its codec refuses comes back as None."""
    out = [None] * len(codecs)
    batch, alaw = [], set()
    for i, codec in enumerate(codecs):
        pcm = frames[i]
        if isinstance(codec, _G711Codec) and codec.downsampler.phase == 0 and getattr(pcm, "size", -1) == FRAME_SAMPLES:
            if codec.alaw:
                alaw.add(i)
            batch.append(i)
        else:
            out[i] = _one(codec.encode, pcm)
    if len(batch) < 2:
        for i in batch:
            out[i] = _one(codecs[i].encode, frames[i])
        return out
    for part in _slices(batch):
        _encode_g711(codecs, frames, part, alaw, out)
    return out


def _encode_g711(codecs, frames, batch, alaw_at, out) -> None:
    down, _ = _g711_matrices()
    history = down.shape[0] - FRAME_SAMPLES
    n = len(batch)
    bank = _DOWN_BANK.matrix
    rows = np.fromiter([codecs[i].downsampler.row for i in batch], dtype=np.intp, count=n)
    x = np.empty((n, down.shape[0]), dtype=np.float32)
    x[:, :history] = bank[rows]
    # np.concatenate + reshape: a quarter of np.stack's cost for a thousand small arrays
    x[:, history:] = np.concatenate([frames[i] for i in batch]).reshape(n, FRAME_SAMPLES)
    bank[rows] = x[:, FRAME_SAMPLES:]
    y = _banded_product(x, _g711_blocks()[0], _G711_FRAME)
    y += 32768.5  # then truncation rounds, and the sample is the tables' index (sample + 32768)
    np.clip(y, 0, 65535, out=y)
    index = y.astype(np.uint16)
    coded = np.take(ULAW_ENCODE, index)
    if alaw_at:
        alaw = [row for row, i in enumerate(batch) if i in alaw_at]
        if alaw:
            coded[alaw] = np.take(ALAW_ENCODE, index[alaw])
    blob = coded.tobytes()
    for row, i in enumerate(batch):
        out[i] = blob[row * _G711_FRAME:(row + 1) * _G711_FRAME]


def decode_payloads(codecs, payloads) -> list:
    """``[c.decode(p) for c, p in zip(codecs, payloads)]``, with every 20 ms G.711 payload decoded in one go
    (in slices of ``BATCH_ROWS``).

    A payload its decoder refuses comes back as None."""
    out = [None] * len(codecs)
    batch, alaw = [], set()
    for i, codec in enumerate(codecs):
        payload = payloads[i]
        if isinstance(codec, _G711Codec) and len(payload) == _G711_FRAME and codec.upsampler.phase == 0:
            if codec.alaw:
                alaw.add(i)
            batch.append(i)
        else:
            out[i] = _one(codec.decode, payload)
    if len(batch) < 2:
        for i in batch:
            out[i] = _one(codecs[i].decode, payloads[i])
        return out
    for part in _slices(batch):
        _decode_g711(codecs, payloads, part, alaw, out)
    return out


_ULAW_DECODE_F32 = ULAW_DECODE.astype(np.float32)
_ALAW_DECODE_F32 = ALAW_DECODE.astype(np.float32)


def _decode_g711(codecs, payloads, batch, alaw_at, out) -> None:
    _, up = _g711_matrices()
    history = up.shape[0] - _G711_FRAME
    n = len(batch)
    bank = _UP_BANK.matrix  # zero-stuffed histories: the samples sit in the even columns
    rows = np.fromiter([codecs[i].upsampler.row for i in batch], dtype=np.intp, count=n)
    codes = np.frombuffer(b"".join([payloads[i] for i in batch]), dtype=np.uint8).reshape(n, _G711_FRAME)
    x = np.empty((n, up.shape[0]), dtype=np.float32)
    x[:, :history] = bank[rows, 0::2]
    x[:, history:] = np.take(_ULAW_DECODE_F32, codes)
    if alaw_at:
        alaw = [row for row, i in enumerate(batch) if i in alaw_at]
        if alaw:
            x[alaw, history:] = np.take(_ALAW_DECODE_F32, codes[alaw])
    stuffed = np.zeros((n, 2 * history), dtype=np.float32)  # the new histories, zero-stuffed
    stuffed[:, 0::2] = x[:, -history:]
    bank[rows] = stuffed
    y = _banded_product(x, _g711_blocks()[1], FRAME_SAMPLES)
    y += 32768.5  # truncation then rounds; the offset comes off in the int16 view below
    np.clip(y, 0, 65535, out=y)
    pcm = (y.astype(np.uint16) ^ 0x8000).view(np.int16)
    for row, i in enumerate(batch):
        out[i] = pcm[row]


CODECS = {c.info.name: c for c in (PcmuCodec, PcmaCodec, G722Codec, OpusCodec, L16Codec)}
_BY_ENCODING = {c.info.encoding.lower(): c for c in CODECS.values()}


def create(name: str, payload_type: Optional[int] = None, clock_rate: Optional[int] = None) -> Codec:
    """A fresh codec (one leg's state) by config name: pcmu, pcma, g722, opus, l16."""
    cls = CODECS.get(name.lower())
    if cls is None:
        raise CodecError(f"unknown codec {name!r} (known: {', '.join(CODECS)})")
    if cls is L16Codec and clock_rate:
        return L16Codec(payload_type, clock_rate)
    return cls(payload_type)


def create_for_payload(payload_type: int, encoding: Optional[str] = None, clock_rate: Optional[int] = None) -> Codec:
    """A codec for a negotiated payload type: by SDP encoding name, else by static PT."""
    if encoding:
        cls = _BY_ENCODING.get(encoding.lower())
        if cls is None:
            raise CodecError(f"no codec for encoding {encoding!r}")
        return create(cls.info.name, payload_type, clock_rate)
    for cls in CODECS.values():
        if cls.info.payload_type == payload_type and payload_type < 96:
            return cls(payload_type)
    raise CodecError(f"no codec for payload type {payload_type}")


def stream_codec(name: str) -> Codec:
    """A codec for a byte stream (WebSocket /call): G.711 and G.722 accept any chunk size."""
    return create(name)
