"""TTS cache under ``media_cache_path``: a repeated prompt costs no synthesis.

Entries are raw 16 kHz int16 files named by the SHA-256 of (provider, voice,
speed, text).  Writes are atomic (temp file + rename), so a crash or a
concurrent call never sees half a prompt.  The directory is bounded by
``max_bytes``: after each write the least recently used entries (by mtime,
touched on hits) are removed.  Only complete syntheses are stored: a
cancelled or failed one leaves nothing behind.

The most recently used entries are also kept in memory (``memory_bytes``, 16 MB by
default): a busy route speaks the same greeting on every call, and reading it back
from disk (open, read, utime) on every call showed in its profile (docs/benchmarks.md).  An entry's content
never changes for its key, so the memory copy needs no checking; the file's mtime is
still touched, at most once a minute, so the directory's LRU order stays right.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import time
from collections import OrderedDict
from typing import Optional

import numpy as np
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from activecall.speech.base import ISynthesizer

log = Logger(namespace="activecall.speech.cache")

SUFFIX = ".pcm"


@functools.lru_cache(maxsize=4096)
def cache_key(provider: str, voice: Optional[str], speed: float, text: str) -> str:
    """The entry's name; memoised, as busy routes speak the same few lines on every call."""
    ident = json.dumps([provider, voice, round(float(speed), 3), text], ensure_ascii=False)
    return hashlib.sha256(ident.encode("utf-8", "surrogatepass")).hexdigest()


class TtsCache:
    TOUCH_INTERVAL = 60.0  # seconds between mtime updates of an entry served from memory

    def __init__(self, path: str, max_bytes: int = 256 * 1024 * 1024, memory_bytes: int = 16 * 1024 * 1024):
        self.path = path
        self.max_bytes = max_bytes
        self.memory_bytes = memory_bytes
        os.makedirs(path, exist_ok=True)
        self.hits = 0
        self.misses = 0
        self._memory: OrderedDict[str, np.ndarray] = OrderedDict()
        self._memory_size = 0
        self._touched: dict[str, float] = {}

    def _file(self, key: str) -> str:
        return os.path.join(self.path, key + SUFFIX)

    def get(self, key: str) -> Optional[np.ndarray]:
        """The entry's samples (a read-only array), or None."""
        pcm = self._memory.get(key)
        if pcm is not None:
            self._memory.move_to_end(key)
            self.hits += 1
            if time.monotonic() - self._touched.get(key, 0.0) >= self.TOUCH_INTERVAL:
                self._touch(key)
            return pcm
        path = self._file(key)
        try:
            with open(path, "rb") as f:
                data = f.read()
            os.utime(path)  # most recently used
        except FileNotFoundError:
            self.misses += 1
            return None
        self.hits += 1
        pcm = np.frombuffer(data, dtype="<i2").astype(np.int16)
        self._remember(key, pcm)
        return pcm

    def _touch(self, key: str) -> None:
        self._touched[key] = time.monotonic()
        try:
            os.utime(self._file(key))
        except FileNotFoundError:
            pass  # evicted from disk (by this or another daemon): memory still has it
        except OSError as e:
            log.debug("TTS cache touch failed: {e}", e=e)

    def _remember(self, key: str, pcm: np.ndarray) -> None:
        if pcm.nbytes > self.memory_bytes // 4:
            return  # a long prompt would push out many short ones
        pcm.flags.writeable = False
        self._memory[key] = pcm
        self._memory_size += pcm.nbytes
        self._touched[key] = time.monotonic()
        while self._memory_size > self.memory_bytes:
            old_key, old = self._memory.popitem(last=False)
            self._memory_size -= old.nbytes
            self._touched.pop(old_key, None)

    def put(self, key: str, pcm: np.ndarray) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".tmp-", suffix=SUFFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(np.asarray(pcm, dtype="<i2").tobytes())
            os.replace(tmp, self._file(key))
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self._remember(key, np.array(pcm, dtype=np.int16).reshape(-1))
        self.evict()

    def evict(self) -> None:
        """Remove least recently used entries until the directory fits ``max_bytes``."""
        entries = []
        for e in os.scandir(self.path):
            if e.name.endswith(SUFFIX) and not e.name.startswith(".tmp-"):
                st = e.stat()
                entries.append((st.st_mtime_ns, st.st_size, e.path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            try:
                os.unlink(path)
                total -= size
            except OSError:
                pass


@implementer(ISynthesizer)
class CachedSynthesizer:
    """Serves a cached prompt at once, otherwise synthesises, streams and stores it."""

    CHUNK = 1600

    def __init__(self, inner, cache: TtsCache, options):
        self.inner = inner
        self.cache = cache
        self.name = inner.name
        self.identity = getattr(inner, "cache_identity", None) or (options.provider, options.speaker, options.speed)

    def key(self, text: str) -> str:
        provider, voice, speed = self.identity
        return cache_key(provider, voice, speed, text)

    def synthesize(self, text: str, sink) -> defer.Deferred:
        key = self.key(text)
        try:
            pcm = self.cache.get(key)
        except OSError as e:
            log.warn("TTS cache read failed: {e}", e=e)
            pcm = None
        if pcm is not None:
            for i in range(0, pcm.size, self.CHUNK):
                sink(pcm[i:i + self.CHUNK])
            return defer.succeed(pcm.size)
        collected: list = []

        def tee(chunk):
            collected.append(np.array(chunk, dtype=np.int16))
            sink(chunk)

        def store(samples):
            if collected:
                try:
                    self.cache.put(key, np.concatenate(collected))
                except OSError as e:
                    log.warn("TTS cache write failed: {e}", e=e)
            return samples

        return self.inner.synthesize(text, tee).addCallback(store)
