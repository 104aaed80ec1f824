"""Call recording: stereo 16-bit, caller left, bot right, as a WAV (or headerless ``pcm``) at 16 kHz
(or the configured ``samplerate``: the 16 kHz audio is resampled as it is written).

Audio is collected per channel and written every ``ptime`` ms as one
interleaved block, a channel with nothing to say zero-padded, so the channels
stay aligned in time (see ``WavRecorder`` for late and bursty audio).  After
every flush the RIFF header is rewritten with the new sizes and the file is
flushed to the OS, so a crash or SIGTERM loses at most the last ``ptime`` plus
``lag`` of audio and the file is always a valid WAV.
"""

from __future__ import annotations

import os
import struct
from typing import Optional

import numpy as np
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from activecall.audio import SAMPLE_RATE, Resampler
from activecall.filenames import expand_pattern, safe_file_part

log = Logger(namespace="activecall.recorder")

CALLER, BOT = 0, 1
#: file formats: ``wav`` (RIFF header rewritten after every flush) or ``pcm`` (raw interleaved s16le)
FORMATS = ("wav", "pcm")
#: rates a recording may be written at
SAMPLE_RATES = (8000, 16000, 24000, 32000, 48000)


class IRecorder(Interface):
    """A call's recording as its session uses it: both sides' audio in, one file out (its CDR names it)."""

    path = Attribute("The file the recording is written to.")
    size = Attribute("Its size in bytes so far (the CDR's ``size``).")

    def write(channel, pcm):
        """16 kHz int16 audio of ``CALLER`` or ``BOT``."""

    def close():
        """Write what is left and close the file; later writes are dropped."""


def wav_header(data_bytes: int, rate: int = 16000, channels: int = 2) -> bytes:
    """A 44-byte PCM16 RIFF header for ``data_bytes`` of samples."""
    block = channels * 2
    return (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * block, block, 16)
            + b"data" + struct.pack("<I", data_bytes))


def recording_path(directory: str, session_id: str, template: Optional[str] = None,
                   extension: str = "wav", fields: Optional[dict] = None) -> str:
    """``<dir>/<session>.wav``, or the ``recorderFile`` / ``filename_pattern`` template (``{id}`` and
    the ``fields`` placeholders replaced, see ``expand_pattern``; relative names go under ``dir``;
    ``.<extension>`` appended when missing).  The session id goes through ``safe_file_part`` in both
    (a long or odd Call-ID still gets a file; see activecall/filenames.py); a template that leaves the
    directory or names a file too long for the file system raises ValueError."""
    suffix = "." + extension
    if template:
        name = expand_pattern(template, session_id, fields)
        if not name.endswith(suffix):
            name += suffix
        path = name if os.path.isabs(name) else os.path.join(directory, name)
        real_dir = os.path.realpath(directory)
        if not os.path.isabs(name) and not os.path.realpath(path).startswith(real_dir + os.sep):
            raise ValueError(f"recorderFile {template!r} leaves the recording directory")
        if any(len(part.encode("utf-8", "surrogatepass")) > 255 for part in path.split(os.sep)):
            raise ValueError("recorderFile names a file too long for the file system")
        return path
    return os.path.join(directory, safe_file_part(session_id) + suffix)


class _Channel:
    """One channel's audio waiting to be written: chunks at absolute sample positions."""

    def __init__(self):
        self.chunks: list[tuple[int, np.ndarray]] = []
        self.cursor = 0  # where the next chunk goes

    @property
    def end(self) -> int:
        return self.cursor


@implementer(IRecorder)
class WavRecorder:
    """Writes two channels of 16 kHz int16 audio; ``write(channel, pcm)`` then ``close``.

    Each channel's audio is laid end to end, so a burst of late packets is kept
    whole instead of being cut by padding.  With a ``clock``, a channel that
    went quiet (nothing for ``gap_ms``: the bot is not speaking, the caller's
    stream paused) resumes at the current time, leaving silence, and the file
    is written up to ``lag_ms`` behind now so audio arriving a little late
    still lands in place.  Without a clock both channels are simply padded to
    the longer one at every flush.
    """

    def __init__(self, path: str, rate: int = SAMPLE_RATE, ptime_ms: int = 200, clock=None,
                 lag_ms: int = 600, gap_ms: int = 300, file_format: str = "wav"):
        if file_format not in FORMATS:
            raise ValueError(f"format {file_format!r} is not one of {', '.join(FORMATS)}")
        if rate not in SAMPLE_RATES:
            raise ValueError(f"samplerate {rate} is not one of {', '.join(map(str, SAMPLE_RATES))}")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path = path
        self.format = file_format
        #: the file's rate; positions below count 16 kHz samples (what ``write`` is given)
        self.file_rate = rate
        self._resamplers = (None, None) if rate == SAMPLE_RATE else (
            Resampler(SAMPLE_RATE, rate), Resampler(SAMPLE_RATE, rate))
        #: while paused (``pauseRecording``) both channels are written as silence
        self.paused = False
        rate = SAMPLE_RATE
        self.rate = rate
        self.block_samples = max(1, rate * ptime_ms // 1000)
        self.clock = clock
        self.start = clock.seconds() if clock is not None else 0.0
        self.lag = rate * lag_ms // 1000
        self.gap = rate * gap_ms // 1000
        self._channels = (_Channel(), _Channel())
        self.written = 0  # samples per channel already in the file
        self.data_bytes = 0
        self._file = open(path, "wb")
        if self.format == "wav":
            self._file.write(wav_header(0, self.file_rate))
        self._file.flush()

    @property
    def closed(self) -> bool:
        return self._file is None

    @property
    def size(self) -> int:
        return (44 if self.format == "wav" else 0) + self.data_bytes

    def _now(self) -> int:
        return int((self.clock.seconds() - self.start) * self.rate)

    def write(self, channel: int, pcm: np.ndarray) -> None:
        if self._file is None:
            return
        pcm = np.asarray(pcm, dtype=np.int16).reshape(-1)
        if not pcm.size:
            return
        if self.paused:
            pcm = np.zeros_like(pcm)  # the time goes on in the file, the words do not
        ch = self._channels[channel]
        position = ch.cursor
        if self.clock is not None:
            now = self._now()
            if now - (position + pcm.size) > self.gap:
                position = now - pcm.size  # the channel was quiet: resume at the present
        position = max(position, self.written)  # never before what is already on disk
        ch.chunks.append((position, pcm))
        ch.cursor = position + pcm.size
        if self.clock is None:
            if max(c.end for c in self._channels) - self.written >= self.block_samples:
                self.flush()
        elif self._now() - self.lag - self.written >= self.block_samples:
            self.flush()

    def flush(self, final: bool = False) -> None:
        """Write both channels up to the flush point, silence where a channel has nothing."""
        if self._file is None:
            return
        upto = max(c.end for c in self._channels)
        if self.clock is not None and not final:
            upto = min(upto, self._now() - self.lag)
        n = upto - self.written
        if n <= 0:
            return
        block = np.zeros((n, 2), dtype="<i2")
        for index, ch in enumerate(self._channels):
            keep = []
            for position, pcm in ch.chunks:
                first, last = max(position, self.written), min(position + pcm.size, upto)
                if last > first:
                    block[first - self.written:last - self.written, index] = pcm[first - position:last - position]
                if position + pcm.size > upto:
                    rest = max(position, upto)
                    keep.append((rest, pcm[rest - position:]))
            ch.chunks = keep
        self.written = upto
        if self._resamplers[0] is not None:
            left, right = (r(block[:, i]) for i, r in enumerate(self._resamplers))
            block = np.stack((left, right), axis=1).astype("<i2")
        raw = block.tobytes()
        self._file.seek(0, os.SEEK_END)
        self._file.write(raw)
        self.data_bytes += len(raw)
        if self.format == "wav":
            self._file.seek(0)
            self._file.write(wav_header(self.data_bytes, self.file_rate))
        self._file.flush()

    def close(self) -> None:
        if self._file is None:
            return
        self.flush(final=True)
        try:
            os.fsync(self._file.fileno())
        except OSError:
            pass
        self._file.close()
        self._file = None
