"""Call detail records (docs/api.md, "CDR") and where they go (``[callrecord]``).

One JSON document per call, camelCase keys, unset fields left out.  Secrets
never reach it: ``option`` and ``extras`` pass through ``redact`` every time
the record is serialised, whoever built it.

Writers:

- ``LocalCdrWriter``: ``<root>/<YYYYMMDD>/<YYYYMMDD-HHMMSS>_<callId>.json``
  (local time of the start; a Call-ID that is long or holds unsafe characters is
  named by ``activecall.filenames.safe_file_part``), written to a temp file, fsynced and renamed, so a
  crash leaves either the whole file or none.  Records that arrive while a
  write is in flight are written together in the next one (one thread job and
  one directory fsync per batch, not per call).
- ``HttpCdrWriter``: spools the same local file first, then POSTs multipart
  (``calllog.json``, plus ``media_<trackId>`` / ``dump_events_<name>`` files
  with ``with_media``), retrying with backoff.  A failed upload keeps the
  spool.  After a successful upload the local copies are removed only when
  ``keep_media_copy = false`` (the original did the opposite of its name).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone, tzinfo
from typing import Any, Callable, Optional, Sequence

from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from activecall.atomicfile import write_batch
from activecall.filenames import safe_file_part  # re-exported: callers import it from here too
from activecall.httpclient import default_http_client
from activecall.protocol.commands import redact
from activecall.protocol.events import WireObject, to_wire

log = Logger(namespace="activecall.cdr")


class ICdrWriter(Interface):
    """Where a call's record goes when it ends (``[callrecord]``; the session and the call manager use it)."""

    def write(record):
        """Store one ``CallDetailRecord``; a Deferred that fires once it is stored (or fails)."""

    def flush():
        """A Deferred that fires when every write in flight has finished (shutdown waits for it)."""


@dataclass(frozen=True, kw_only=True)
class RecorderFile(WireObject):
    """One recording of the call (``recorder`` entries)."""

    trackId: str
    path: str
    size: int = 0
    #: ✱ ``wav`` or ``pcm``, and the file's rate
    format: Optional[str] = None
    samplerate: Optional[int] = None
    #: ✱ the spans written as silence (``pauseRecording`` … ``resumeRecording``):
    #: ``[{"startTime", "endTime"}]`` in RFC 3339 UTC; left out when the recording was never paused
    pauses: Optional[tuple[dict, ...]] = None


@dataclass(frozen=True, kw_only=True)
class CallDetailRecord(WireObject):
    """The CDR of one call.  Times are aware datetimes, written as RFC 3339 UTC."""

    callType: str
    option: Any = None  # a CallOption or a plain dict; always redacted on output
    callId: str
    startTime: datetime
    ringTime: Optional[datetime] = None
    answerTime: Optional[datetime] = None
    endTime: datetime
    caller: str = ""
    callee: str = ""
    statusCode: int = 500
    #: a clean reason string (``caller``, ``callee``, ``autohangup``… see events.HangupReason)
    hangupReason: Optional[str] = None
    hangupMessages: tuple = ()
    recorder: tuple[RecorderFile, ...] = ()
    extras: Optional[dict[str, Any]] = None
    dumpEventFile: Optional[str] = None
    referCallrecord: Optional["CallDetailRecord"] = None

    def to_dict(self) -> dict:
        out = to_wire(self)
        for key in ("hangupMessages", "recorder"):
            if not out.get(key):
                out.pop(key, None)
        for key in ("option", "extras"):
            if key in out:
                out[key] = redact(out[key])
        if self.referCallrecord is not None:
            out["referCallrecord"] = self.referCallrecord.to_dict()
        return out

    def to_bytes(self) -> bytes:
        # backslashreplace: a lone surrogate (a JSON ``\udc80`` escape from an API client) is written
        # back as that escape, still valid JSON, instead of failing the whole record
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=2).encode("utf-8", "backslashreplace") + b"\n"


# -- local files --------------------------------------------------------------------------------

@implementer(ICdrWriter)
class LocalCdrWriter:
    """``type = "local"``: one JSON file per call under ``root``.

    ``tz`` is the zone of the file name's date (default: local time, as the
    original); ``run`` runs blocking file work (default: a thread).  One batch
    is in flight at a time; records written meanwhile wait and go in the next
    batch, so under load a thread job and a directory fsync serve many calls
    (each file is still fsynced before its rename, and each ``write`` fires only
    once its own file is durable).
    """

    def __init__(self, root: str, tz: Optional[tzinfo] = None,
                 run: Callable[..., defer.Deferred] = threads.deferToThread):
        self.root = root
        self.tz = tz
        self.run = run
        self._queue: list[tuple[str, bytes, defer.Deferred]] = []
        self._busy = False
        self._idle_waiters: list[defer.Deferred] = []

    def path_for(self, record: CallDetailRecord) -> str:
        start = record.startTime
        if start.tzinfo is None:
            start = start.replace(tzinfo=timezone.utc)
        start = start.astimezone(self.tz)
        day = start.strftime("%Y%m%d")
        name = f"{start.strftime('%Y%m%d-%H%M%S')}_{safe_file_part(record.callId)}.json"
        return os.path.join(self.root, day, name) if self.root else name

    def write(self, record: CallDetailRecord) -> defer.Deferred:
        """Fires with the written path."""
        d = defer.Deferred()
        self._queue.append((self.path_for(record), record.to_bytes(), d))
        if not self._busy:
            self._next_batch()
        return d

    def _next_batch(self) -> None:
        batch, self._queue = self._queue, []
        self._busy = True
        done = defer.maybeDeferred(self.run, write_batch, [(path, data) for path, data, _ in batch])
        done.addBoth(self._batch_done, batch)

    def _batch_done(self, results, batch) -> None:
        if isinstance(results, Failure):
            results = [results] * len(batch)
        for (path, _, d), error in zip(batch, results):
            if error is None:
                d.callback(path)
            else:
                d.errback(error if isinstance(error, Failure) else Failure(error))
        if self._queue:
            self._next_batch()
            return
        self._busy = False
        waiters, self._idle_waiters = self._idle_waiters, []
        for d in waiters:
            d.callback(None)

    def flush(self) -> defer.Deferred:
        """Fires when every record written so far is on disk."""
        if not self._busy:
            return defer.succeed(None)
        d = defer.Deferred()
        self._idle_waiters.append(d)
        return d


# -- http upload ------------------------------------------------------------------------------------


class UploadError(Exception):
    pass


@dataclass
class _Part:
    field: str
    path: str


@implementer(ICdrWriter)
class HttpCdrWriter:
    """``type = "http"``: spool locally, then upload multipart with retries.

    ``backoff`` holds the waits between attempts (so attempts = len + 1).
    ``flush()`` fires when every upload in flight has finished, for shutdown.
    """

    def __init__(self, url: str, headers: Sequence[tuple[str, str]] = (), with_media: bool = False,
                 keep_media_copy: bool = True, spool: Optional[LocalCdrWriter] = None,
                 reactor=None, clock=None, http_client=None,
                 backoff: Sequence[float] = (1.0, 2.0, 4.0, 8.0), timeout: float = 30.0):
        if reactor is None:
            from twisted.internet import reactor
        self.url = url
        self.headers = tuple(headers)
        self.with_media = with_media
        self.keep_media_copy = keep_media_copy
        self.spool = spool
        self.reactor = reactor
        self.clock = clock or reactor
        self.http = http_client or default_http_client(reactor)
        self.backoff = tuple(backoff)
        self.timeout = timeout
        self._in_flight: set[defer.Deferred] = set()

    def media_parts(self, record: CallDetailRecord) -> list[_Part]:
        if not self.with_media:
            return []
        parts = [_Part(f"media_{r.trackId}", r.path) for r in record.recorder if os.path.isfile(r.path)]
        if record.dumpEventFile and os.path.isfile(record.dumpEventFile):
            parts.append(_Part(f"dump_events_{os.path.basename(record.dumpEventFile)}", record.dumpEventFile))
        return parts

    def write(self, record: CallDetailRecord) -> defer.Deferred:
        """Fires with True when uploaded, False when every attempt failed (the spool stays)."""
        d = self._write(record)
        self._in_flight.add(d)
        d.addBoth(self._done, d)
        return d

    def _done(self, result, d):
        self._in_flight.discard(d)
        return result

    @defer.inlineCallbacks
    def _write(self, record: CallDetailRecord):
        spooled = None
        if self.spool is not None:
            try:
                spooled = yield self.spool.write(record)
            except Exception:
                log.failure("cannot spool the CDR of {call_id}", call_id=record.callId)
        body = record.to_bytes()
        parts = self.media_parts(record)
        attempts = len(self.backoff) + 1
        for attempt in range(1, attempts + 1):
            try:
                yield self._upload(body, parts)
            except Exception as e:
                if attempt == attempts:
                    log.error("CDR upload of {call_id} to {url} failed after {n} attempts ({err}); kept at {path}",
                              call_id=record.callId, url=self.url, n=attempts, err=e, path=spooled)
                    return False
                wait = self.backoff[attempt - 1]
                log.warn("CDR upload of {call_id} failed ({err}); retry {attempt} in {wait}s",
                         call_id=record.callId, err=e, attempt=attempt, wait=wait)
                yield task.deferLater(self.clock, wait, lambda: None)
                continue
            break
        log.info("CDR of {call_id} uploaded to {url}", call_id=record.callId, url=self.url)
        if not self.keep_media_copy:
            for path in [p.path for p in parts] + ([spooled] if spooled else []):
                try:
                    os.unlink(path)
                except OSError as e:
                    log.warn("cannot remove {path}: {err}", path=path, err=e)
        return True

    @defer.inlineCallbacks
    def _upload(self, body: bytes, parts: list[_Part]):
        """One multipart POST: the text field ``calllog.json`` and the file parts, streamed."""
        from treq.multipart import MultiPartProducer
        from twisted.web.client import FileBodyProducer

        files = []
        try:
            fields: list = [("calllog.json", body.decode("utf-8"))]
            for part in parts:
                f = open(part.path, "rb")
                files.append(f)
                fields.append((part.field, (os.path.basename(part.path), "application/octet-stream",
                                            FileBodyProducer(f))))
            boundary = uuid.uuid4().hex
            headers = {name: [value] for name, value in self.headers}
            headers["Content-Type"] = [f"multipart/form-data; boundary={boundary}"]
            d = self.http.request("POST", self.url, data=MultiPartProducer(fields, boundary=boundary),
                                  headers=headers)
            d.addTimeout(self.timeout, self.clock,
                         onTimeoutCancel=lambda _, t: Failure(UploadError(f"no answer within {t}s")))
            response = yield d
            yield response.content()
            if not 200 <= response.code < 300:
                raise UploadError(f"HTTP {response.code}")
        finally:
            for f in files:
                f.close()

    def flush(self) -> defer.Deferred:
        return defer.DeferredList(list(self._in_flight), consumeErrors=True)


def writer_for(section, reactor=None):
    """The writer for a ``[callrecord]`` section (None when there is none)."""
    if section is None:
        return None
    spool = LocalCdrWriter(section.root)
    if section.type == "http":
        return HttpCdrWriter(section.url, headers=section.headers, with_media=section.with_media,
                             keep_media_copy=section.keep_media_copy, spool=spool, reactor=reactor)
    return spool
