"""Bot-side audio tracks: where the frames a call plays come from.

A track yields 20 ms frames of 16 kHz mono int16 (320 samples) when the
media clock asks (``next_frame``); it never paces itself.  ``TtsTrack`` is
filled by a speech synthesiser as audio arrives; ``FileTrack`` plays a wav/mp3
(any format PyAV reads) from a local path or an http(s) URL cached under
``media_cache_path``.  Decoding runs in a thread, never on the reactor.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections import deque
from typing import Callable, Optional

import numpy as np
from twisted.internet import defer, threads
from twisted.logger import Logger

from activecall.atomicfile import write_atomically
from activecall.audio import FRAME_MS, FRAME_SAMPLES, SAMPLE_RATE

log = Logger(namespace="activecall.media.tracks")


class TrackError(Exception):
    """A track could not produce audio (missing file, undecodable data, HTTP error)."""


class Track:
    """Common bookkeeping: id, playId, SSRC, frames played, the finished signal."""

    kind = "track"
    #: what the call does when the track ends by itself: hang up (``autoHangup``), or wait this many ms
    #: for the caller before a ``silence`` event (``waitInputTimeout``); set per track by the playback
    auto_hangup: bool = False
    wait_input_timeout: Optional[int] = None

    def __init__(self, track_id: str, play_id: Optional[str] = None):
        self.track_id = track_id
        self.play_id = play_id
        self.ssrc = random.getrandbits(32)
        self.frames_played = 0
        self.stopped = False
        self.paused = False
        self.ended = defer.Deferred()  # fires once when the last frame was played or on stop

    @property
    def played_ms(self) -> int:
        return self.frames_played * FRAME_MS

    @property
    def started(self) -> bool:
        """True once audio has gone out (the original's 'after it has started a segment')."""
        return self.frames_played > 0

    def next_frame(self) -> Optional[np.ndarray]:
        """The next 20 ms frame, or None when nothing is due (starved, paused or over)."""
        if self.stopped or self.paused:
            return None
        frame = self._pull()
        if frame is not None:
            self.frames_played += 1
        elif self._exhausted():
            self._finish()
        return frame

    def stop(self) -> None:
        self.stopped = True
        self._finish()

    def _finish(self):
        if not self.ended.called:
            self.ended.callback(self)

    # subclasses
    def _pull(self) -> Optional[np.ndarray]:
        raise NotImplementedError

    def _exhausted(self) -> bool:
        raise NotImplementedError


class PcmBuffer:
    """A FIFO of int16 samples handing out whole 320-sample frames."""

    def __init__(self):
        self._chunks: deque[np.ndarray] = deque()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, pcm: np.ndarray) -> None:
        pcm = np.asarray(pcm, dtype=np.int16).reshape(-1)
        if pcm.size:
            self._chunks.append(pcm)
            self._size += pcm.size

    def pop_frame(self, pad: bool = False) -> Optional[np.ndarray]:
        """A full frame; with ``pad`` the remainder zero-padded; else None if short."""
        if self._size == 0 or (self._size < FRAME_SAMPLES and not pad):
            return None
        out = np.zeros(FRAME_SAMPLES, dtype=np.int16)
        filled = 0
        while filled < FRAME_SAMPLES and self._chunks:
            chunk = self._chunks[0]
            take = min(FRAME_SAMPLES - filled, chunk.size)
            out[filled:filled + take] = chunk[:take]
            filled += take
            if take == chunk.size:
                self._chunks.popleft()
            else:
                self._chunks[0] = chunk[take:]
        self._size -= filled
        return out

    def clear(self) -> None:
        self._chunks.clear()
        self._size = 0


#: synthesised lead-in: samples quieter than this (about -54 dBFS) before the first louder one
LEAD_IN_LEVEL = 64
#: how much of the lead-in is kept before the first louder sample (10 ms: a consonant's attack)
LEAD_IN_KEEP = SAMPLE_RATE // 100
#: at most this much lead-in is dropped (0.5 s)
LEAD_IN_MAX = SAMPLE_RATE // 2


class TtsTrack(Track):
    """Synthesised speech, appended as the synthesiser streams it.

    The track ends only after ``end_of_stream()`` and once every queued sample
    has been played (docs/api.md, "Tracks and playId").

    ``feed(pcm, trim_lead_in=True)`` drops the near-silence a synthesiser puts before
    the first word of the track (flite: ~120 ms at -60 dBFS), keeping 10 ms of it: the
    caller hears the reply that much sooner.  Only the track's start is trimmed; the
    pauses between its sentences stay as synthesised.
    """

    kind = "tts"

    def __init__(self, track_id: str, play_id: Optional[str] = None):
        super().__init__(track_id, play_id)
        self.buffer = PcmBuffer()
        self.eos = False
        self.segments: list[str] = []  # texts queued on this track, for interruption events
        #: (sample of the track where its audio starts, text) per synthesised text: what the bot is
        #: saying at a given point (``words_around``; the barge-in's echo test of recognised words)
        self.spans: list[tuple[int, str]] = []
        self.fed = 0  # samples pushed so far
        self._lead_in = True  # nothing louder than LEAD_IN_LEVEL fed yet
        self._held = np.zeros(0, dtype=np.int16)  # the lead-in's last LEAD_IN_KEEP samples
        self.lead_in_trimmed = 0  # samples dropped

    def feed(self, pcm: np.ndarray, trim_lead_in: bool = False) -> None:
        if self.stopped:
            return
        pcm = np.asarray(pcm, dtype=np.int16).reshape(-1)
        if self._lead_in and trim_lead_in:
            pcm = np.concatenate([self._held, pcm]) if self._held.size else pcm
            loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) >= LEAD_IN_LEVEL)
            onset = int(loud[0]) if loud.size else pcm.size
            cut = min(max(0, onset - LEAD_IN_KEEP), LEAD_IN_MAX - self.lead_in_trimmed)
            self.lead_in_trimmed += cut
            pcm = pcm[cut:]
            if not loud.size and self.lead_in_trimmed < LEAD_IN_MAX:
                self._held = pcm  # still silent: hold the kept part until speech starts
                return
            self._held = np.zeros(0, dtype=np.int16)
        if self._lead_in and (pcm.size or not trim_lead_in):
            self._lead_in = False
            if self._held.size:
                pcm = np.concatenate([self._held, pcm])
                self._held = np.zeros(0, dtype=np.int16)
        self.fed += pcm.size
        self.buffer.push(pcm)

    def words_around(self, before_ms: int = 4000, after_ms: int = 500) -> list[str]:
        """The words of the texts spoken from ``before_ms`` before the playout point to ``after_ms``
        after it, each word placed evenly within its text's audio (a guess, good to a word or two)."""
        now = self.frames_played * FRAME_SAMPLES
        low, high = now - before_ms * SAMPLE_RATE // 1000, now + after_ms * SAMPLE_RATE // 1000
        out: list[str] = []
        for i, (start, text) in enumerate(self.spans):
            end = self.spans[i + 1][0] if i + 1 < len(self.spans) else max(self.fed, start + 1)
            if end < low or start > high:
                continue
            words = text.split()
            for j, word in enumerate(words):
                at = start + (end - start) * (j + 0.5) / max(len(words), 1)
                if low <= at <= high:
                    out.append(word)
        return out

    def end_of_stream(self) -> None:
        if self._held.size:  # a track that never got louder: what was kept still plays
            self.fed += self._held.size
            self.buffer.push(self._held)
            self._held = np.zeros(0, dtype=np.int16)
        self.eos = True

    def drop_pending(self) -> None:
        """Barge-in: forget everything not yet played."""
        self.buffer.clear()

    def _pull(self):
        return self.buffer.pop_frame(pad=self.eos)

    def _exhausted(self) -> bool:
        return self.eos and len(self.buffer) == 0


class FileTrack(Track):
    """Decoded file audio; ``load()`` must complete before frames flow."""

    kind = "file"

    def __init__(self, track_id: str, play_id: Optional[str], source: str):
        super().__init__(track_id, play_id)
        self.source = source
        self.pcm: Optional[np.ndarray] = None
        self.position = 0
        self.loaded = defer.Deferred()  # fires when the decoded audio is in

    def set_audio(self, pcm: np.ndarray) -> None:
        self.pcm = np.asarray(pcm, dtype=np.int16).reshape(-1)
        if not self.loaded.called:
            self.loaded.callback(self)

    @property
    def total_ms(self) -> int:
        return 0 if self.pcm is None else int(self.pcm.size * 1000 / SAMPLE_RATE)

    def _pull(self):
        if self.pcm is None or self.position >= self.pcm.size:
            return None
        frame = self.pcm[self.position:self.position + FRAME_SAMPLES]
        self.position += FRAME_SAMPLES
        if frame.size < FRAME_SAMPLES:
            frame = np.concatenate([frame, np.zeros(FRAME_SAMPLES - frame.size, dtype=np.int16)])
        return frame

    def _exhausted(self) -> bool:
        return self.pcm is not None and self.position >= self.pcm.size


# -- decoding --------------------------------------------------------------------------------


def decode_file(path: str) -> np.ndarray:
    """Any audio file PyAV can read -> 16 kHz mono int16 (blocking; run in a thread)."""
    import av

    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError) as e:
        raise TrackError(f"cannot open {os.path.basename(path)}: {e}") from None
    try:
        streams = container.streams.audio
        if not streams:
            raise TrackError(f"{os.path.basename(path)} has no audio stream")
        resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        parts = []
        for frame in container.decode(streams[0]):
            for out in resampler.resample(frame):
                parts.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):
            parts.append(out.to_ndarray().reshape(-1))
    except av.error.FFmpegError as e:
        raise TrackError(f"cannot decode {os.path.basename(path)}: {e}") from None
    finally:
        container.close()
    if not parts:
        return np.zeros(0, dtype=np.int16)
    return np.concatenate(parts).astype(np.int16)


def cache_path_for_url(cache_dir: str, url: str) -> str:
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:32]
    ext = os.path.splitext(url.split("?", 1)[0])[1][:8] or ".bin"
    return os.path.join(cache_dir, "media", digest + ext)


class MediaLoader:
    """Turns a ``play`` url into PCM: local paths directly, http(s) through a cache."""

    def __init__(self, cache_dir: str, http_get: Optional[Callable] = None,
                 run: Callable[..., defer.Deferred] = threads.deferToThread):
        self.cache_dir = cache_dir
        self.http_get = http_get
        self.run = run

    @defer.inlineCallbacks
    def load(self, url: str):
        if url.startswith(("http://", "https://")):
            path = yield self._fetch(url)
        else:
            path = url[len("file://"):] if url.startswith("file://") else url
            if not os.path.isfile(path):
                raise TrackError(f"file not found: {url}")
        pcm = yield self.run(decode_file, path)
        return pcm

    @defer.inlineCallbacks
    def _fetch(self, url: str):
        path = cache_path_for_url(self.cache_dir, url)
        if os.path.isfile(path):
            return path
        get = self.http_get
        if get is None:
            import treq

            get = treq.get
        response = yield get(url)
        if response.code != 200:
            yield response.content()
            raise TrackError(f"GET {url} answered {response.code}")
        body = yield response.content()
        yield self.run(write_atomically, path, body)
        return path
