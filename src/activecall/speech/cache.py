"""TTS cache under ``media_cache_path``: a repeated prompt costs no synthesis.

Entries are raw 16 kHz int16 files named by the SHA-256 of (provider, voice,
speed, text).  Writes are atomic (temp file + rename), so a crash or a
concurrent call never sees half a prompt.  The directory is bounded by
``max_bytes``: after each write the least recently used entries (by mtime,
touched on every hit) are removed.  Only complete syntheses are stored: a
cancelled or failed one leaves nothing behind.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
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
    return hashlib.sha256(ident.encode("utf-8")).hexdigest()


class TtsCache:
    def __init__(self, path: str, max_bytes: int = 256 * 1024 * 1024):
        self.path = path
        self.max_bytes = max_bytes
        os.makedirs(path, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def _file(self, key: str) -> str:
        return os.path.join(self.path, key + SUFFIX)

    def get(self, key: str) -> Optional[np.ndarray]:
        path = self._file(key)
        try:
            with open(path, "rb") as f:
                data = f.read()
            os.utime(path)  # most recently used
        except FileNotFoundError:
            self.misses += 1
            return None
        self.hits += 1
        return np.frombuffer(data, dtype="<i2").astype(np.int16)

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
