"""Call recording: a stereo 16-bit WAV at 16 kHz, caller left, bot right.

Audio is collected per channel and flushed every ``ptime`` ms as one
interleaved block, the quieter channel zero-padded, so the channels stay
aligned in time.  After every flush the RIFF header is rewritten with the new
sizes and the file is flushed to the OS, so a crash or SIGTERM loses at most
the last ``ptime`` of audio and the file is always a valid WAV.
"""

from __future__ import annotations

import os
import struct
from typing import Optional

import numpy as np
from twisted.logger import Logger

log = Logger(namespace="activecall.recorder")

CALLER, BOT = 0, 1


def wav_header(data_bytes: int, rate: int = 16000, channels: int = 2) -> bytes:
    """A 44-byte PCM16 RIFF header for ``data_bytes`` of samples."""
    block = channels * 2
    return (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * block, block, 16)
            + b"data" + struct.pack("<I", data_bytes))


def recording_path(directory: str, session_id: str, template: Optional[str] = None) -> str:
    """``<dir>/<session>.wav``, or the ``recorderFile`` template (``{id}`` replaced;
    relative names go under ``dir``; ``.wav`` appended when missing)."""
    from activecall.call.cdr import safe_file_part

    if template:
        name = template.replace("{id}", session_id)
        if not name.endswith(".wav"):
            name += ".wav"
        path = name if os.path.isabs(name) else os.path.join(directory, name)
        real_dir = os.path.realpath(directory)
        if not os.path.isabs(name) and not os.path.realpath(path).startswith(real_dir + os.sep):
            raise ValueError(f"recorderFile {template!r} leaves the recording directory")
        return path
    return os.path.join(directory, safe_file_part(session_id) + ".wav")


class WavRecorder:
    """Writes two channels of 16 kHz int16 audio; ``write(channel, pcm)`` then ``flush``."""

    def __init__(self, path: str, rate: int = 16000, ptime_ms: int = 200):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path = path
        self.rate = rate
        self.block_samples = max(1, rate * ptime_ms // 1000)
        self._pending = [[], []]
        self._pending_len = [0, 0]
        self.data_bytes = 0
        self._file = open(path, "wb")
        self._file.write(wav_header(0, rate))
        self._file.flush()

    @property
    def closed(self) -> bool:
        return self._file is None

    @property
    def size(self) -> int:
        return 44 + self.data_bytes

    def write(self, channel: int, pcm: np.ndarray) -> None:
        if self._file is None:
            return
        pcm = np.asarray(pcm, dtype=np.int16).reshape(-1)
        self._pending[channel].append(pcm)
        self._pending_len[channel] += pcm.size
        if max(self._pending_len) >= self.block_samples:
            self.flush()

    def flush(self) -> None:
        """Interleave what both channels have, pad the shorter one with silence, write."""
        if self._file is None or max(self._pending_len) == 0:
            return
        n = max(self._pending_len)
        block = np.zeros((n, 2), dtype="<i2")
        for ch in (CALLER, BOT):
            if self._pending_len[ch]:
                samples = np.concatenate(self._pending[ch])
                block[:samples.size, ch] = samples
            self._pending[ch] = []
            self._pending_len[ch] = 0
        raw = block.tobytes()
        self._file.seek(0, os.SEEK_END)
        self._file.write(raw)
        self.data_bytes += len(raw)
        self._file.seek(0)
        self._file.write(wav_header(self.data_bytes, self.rate))
        self._file.flush()

    def close(self) -> None:
        if self._file is None:
            return
        self.flush()
        try:
            os.fsync(self._file.fileno())
        except OSError:
            pass
        self._file.close()
        self._file = None
