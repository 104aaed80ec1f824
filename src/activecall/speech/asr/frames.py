"""The ASR worker wire format, shared by the daemon and ``python -m activecall.speech.asr.worker``.

Pure bytes in, bytes out (no Twisted, no pocketsphinx) so both sides and the
tests use the same code.  A frame is a 4-byte big-endian length, then that many
bytes: a 1-byte kind, a 4-byte big-endian stream id, the payload.

Requests (daemon -> worker), each answered by exactly one reply, in order:

- ``O`` open a stream; payload JSON decoder options (``hmm``, ``lm``, ``dict``, ``cmninit``)
- ``B`` begin an utterance
- ``A`` audio: 16 kHz int16 little-endian; reply = partial text
- ``E`` end the utterance with its last audio; reply = final text
- ``C`` close the stream (its decoder goes back to the worker's spare list)

Replies (worker -> daemon): ``T`` text (UTF-8, empty for none) or ``X`` error
message (UTF-8).  Ordering is what ties a reply to its request: a worker
answers every well-framed request, garbage included, once.
"""

from __future__ import annotations

import struct

OPEN, BEGIN, AUDIO, END, CLOSE = b"O", b"B", b"A", b"E", b"C"
TEXT, ERROR = b"T", b"X"
REQUESTS = (OPEN, BEGIN, AUDIO, END, CLOSE)

MAX_FRAME = 8 * 1024 * 1024  # 4 minutes of audio: far above one 320 ms step; beyond it the stream is garbage

_HEAD = struct.Struct(">IcI")


class FrameError(ValueError):
    """The byte stream cannot be framed any more (the peer is not speaking this protocol)."""


def encode(kind: bytes, stream: int, payload: bytes = b"") -> bytes:
    return _HEAD.pack(5 + len(payload), kind, stream) + payload


class FrameDecoder:
    """Feed bytes, get ``(kind, stream, payload)`` tuples; raises ``FrameError`` on a bad length."""

    def __init__(self, max_frame: int = MAX_FRAME):
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, int, bytes]]:
        self._buf += data
        out = []
        while len(self._buf) >= 4:
            (size,) = struct.unpack_from(">I", self._buf)
            if size < 5 or size > self.max_frame:
                raise FrameError(f"bad frame length {size}")
            if len(self._buf) < 4 + size:
                break
            _, kind, stream = _HEAD.unpack_from(self._buf)
            out.append((kind, stream, bytes(self._buf[9:4 + size])))
            del self._buf[:4 + size]
        return out
