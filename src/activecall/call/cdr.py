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
- ``UploadingCdrWriter`` (``type = "http"``: ``HttpStore``, multipart POST;
  ``type = "s3"``: ``S3Store``, objects PUT into a bucket): every record is
  first written durably to a spool directory (``RecordSpool``), then uploaded
  with retries and backoff, then unspooled; what a store that is down did not
  take stays spooled and is uploaded by a later re-scan or the next start.
  After a successful upload the local copies are removed only when
  ``keep_media_copy = false`` (the original's http writer did the opposite of
  its name).
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

from activecall.atomicfile import write_atomically, write_batch
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
        return pretty_json(self.to_dict()).encode("utf-8", "backslashreplace") + b"\n"


_dumps = json.JSONEncoder(ensure_ascii=False).encode  # the C encoder


def pretty_json(value, _indent: str = "\n") -> str:
    """The same text as ``json.dumps(value, ensure_ascii=False, indent=2)``, built from the C encoder's
    compact pieces.  With ``indent`` the json module runs its pure-Python encoder, several times
    slower, whose nested closures are a reference cycle left for the garbage collector on every CDR.
    Values other than dicts with string keys, lists/tuples and JSON scalars go to ``json.dumps``."""
    inner = _indent + "  "
    if isinstance(value, dict):
        if not value:
            return "{}"
        if not all(type(k) is str for k in value):
            return json.dumps(value, ensure_ascii=False, indent=2).replace("\n", _indent)
        return ("{" + inner + ("," + inner).join(_dumps(k) + ": " + pretty_json(v, inner) for k, v in value.items())
                + _indent + "}")
    if isinstance(value, (list, tuple)):
        if not value:
            return "[]"
        return "[" + inner + ("," + inner).join(pretty_json(v, inner) for v in value) + _indent + "]"
    return _dumps(value)


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
                 run: Callable[..., defer.Deferred] = threads.deferToThread, clock=None, gather: float = 0.0):
        self.root = root
        self.tz = tz
        self.run = run
        #: with a ``clock``: a batch starts at most every ``gather`` seconds.  A record written within
        #: that time of the last batch's start waits for the rest of it (an idle daemon's CDR goes at
        #: once).  Each batch wakes a worker thread, which on a loaded core costs more than the write
        #: itself: at 150 calls/s, one wake-up per call was ~0.2 ms of each call's CPU (docs/benchmarks.md).
        self.clock = clock
        self.gather = gather if clock is not None else 0.0
        self._last_start: Optional[float] = None
        self._queue: list[tuple[str, bytes, defer.Deferred]] = []
        self._busy = False  # a batch in flight, or waiting for its turn
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
            self._start_batch()
        return d

    def _start_batch(self) -> None:
        """The queued records as the next batch: now, or once ``gather`` has passed since the last one."""
        self._busy = True
        if self.gather and self._last_start is not None:
            wait = self._last_start + self.gather - self.clock.seconds()
            if wait > 0:
                self.clock.callLater(wait, self._next_batch)
                return
        self._next_batch()

    def _next_batch(self) -> None:
        batch, self._queue = self._queue, []
        self._busy = True
        if self.clock is not None:
            self._last_start = self.clock.seconds()
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
            self._start_batch()
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


# -- uploads: the spool, the stores, the writer -------------------------------------------------------


class UploadError(Exception):
    pass


@dataclass
class _Part:
    field: str
    path: str


@dataclass
class SpoolItem:
    """One record waiting for upload: its JSON as written, and where it is spooled (None: not
    spooled, e.g. the spool directory could not be written)."""

    body: bytes
    path: Optional[str] = None

    @property
    def fields(self) -> dict:
        return json.loads(self.body)

    @property
    def call_id(self) -> str:
        return str(self.fields.get("callId", ""))


class RecordSpool:
    """Records not yet uploaded, one durable file each in ``directory``.

    A record is written whole (temp file, fsync, rename, directory fsync: ``atomicfile``) before the
    first upload attempt and removed only after the store has taken it, so a crash, a restart or a
    store that is down loses nothing: ``pending()`` lists what the next start uploads.  File names
    are ``<YYYYMMDD-HHMMSS>_<callId>_<random>.json`` (UTC; the Call-ID through ``safe_file_part``), so
    a directory listing sorts oldest first.
    """

    def __init__(self, directory: str, run: Callable[..., defer.Deferred] = threads.deferToThread):
        self.directory = directory
        self.run = run

    def add(self, record: CallDetailRecord, body: bytes) -> defer.Deferred:
        """Fires with the spooled item once its file is durable."""
        start = record.startTime if record.startTime.tzinfo else record.startTime.replace(tzinfo=timezone.utc)
        name = (f"{start.astimezone(timezone.utc).strftime('%Y%m%d-%H%M%S')}_{safe_file_part(record.callId)}"
                f"_{uuid.uuid4().hex[:8]}.json")
        path = os.path.join(self.directory, name)
        return defer.maybeDeferred(self.run, write_atomically, path, body).addCallback(
            lambda _: SpoolItem(body, path))

    def pending(self) -> defer.Deferred:
        """Fires with the spooled items, oldest first (an unreadable file is logged and left)."""
        return defer.maybeDeferred(self.run, self._scan)

    def _scan(self) -> list:
        try:
            names = sorted(n for n in os.listdir(self.directory) if n.endswith(".json") and not n.startswith("."))
        except FileNotFoundError:
            return []
        items = []
        for name in names:
            path = os.path.join(self.directory, name)
            try:
                with open(path, "rb") as f:
                    body = f.read()
                json.loads(body)
            except (OSError, ValueError) as e:
                log.warn("spooled record {path} is unreadable ({err}); left in place", path=path, err=e)
                continue
            items.append(SpoolItem(body, path))
        return items

    def remove(self, item: SpoolItem) -> None:
        if item.path is not None:
            try:
                os.unlink(item.path)
            except FileNotFoundError:
                pass


def _media_files(fields: dict) -> list[tuple[str, str]]:
    """(trackId, path) of each recording that still exists."""
    out = []
    for entry in fields.get("recorder") or ():
        path = entry.get("path") if isinstance(entry, dict) else None
        if path and os.path.isfile(path):
            out.append((str(entry.get("trackId", "")), path))
    return out


def _events_file(fields: dict) -> Optional[str]:
    path = fields.get("dumpEventFile")
    return path if path and os.path.isfile(path) else None


def _start_time(fields: dict) -> datetime:
    try:
        start = datetime.fromisoformat(str(fields.get("startTime", "")).replace("Z", "+00:00"))
    except ValueError:
        start = datetime.now(timezone.utc)
    return start if start.tzinfo else start.replace(tzinfo=timezone.utc)


class HttpStore:
    """``type = "http"``: one multipart POST per record (``calllog.json``, plus ``media_<trackId>``
    and ``dump_events_<name>`` files with ``with_media``), success = 2xx."""

    def __init__(self, url: str, headers: Sequence[tuple[str, str]] = (), with_media: bool = False,
                 http_client=None, clock=None, timeout: float = 30.0):
        self.url = url
        self.headers = tuple(headers)
        self.with_media = with_media
        self.http = http_client
        self.clock = clock
        self.timeout = timeout

    def __str__(self) -> str:
        return self.url

    def media_parts(self, fields: dict) -> list[_Part]:
        if not self.with_media:
            return []
        parts = [_Part(f"media_{track}", path) for track, path in _media_files(fields)]
        events = _events_file(fields)
        if events:
            parts.append(_Part(f"dump_events_{os.path.basename(events)}", events))
        return parts

    def uploaded_files(self, fields: dict) -> list[str]:
        return [p.path for p in self.media_parts(fields)]

    @defer.inlineCallbacks
    def upload(self, item: SpoolItem):
        """One multipart POST: the text field ``calllog.json`` and the file parts, streamed."""
        from treq.multipart import MultiPartProducer
        from twisted.web.client import FileBodyProducer

        files = []
        try:
            fields: list = [("calllog.json", item.body.decode("utf-8"))]
            for part in self.media_parts(item.fields):
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


class S3Store:
    """``type = "s3"``: PUT objects into a bucket (``activecall.s3``), under ``root`` (the key prefix):

    - the record: ``<root>/<YYYYMMDD>/<YYYYMMDD-HHMMSS>_<callId>.json`` (the local writer's name);
    - with ``with_media``: each recording at ``<root>/<YYYYMMDD>/<callId>_<trackId>_<file name>`` and
      the event journal at ``<root>/<YYYYMMDD>/<callId>.jsonl``.

    Media go first and the record last, so a record in the bucket means its files are there too.
    Every value from outside (Call-ID, track id, file name) passes through ``safe_file_part``: no key
    leaves the prefix.  ``tz``: the zone of the dates in keys (default local time, as the local writer).
    """

    def __init__(self, client, root: str = "", with_media: bool = False, tz: Optional[tzinfo] = None):
        self.client = client
        self.prefix = "/".join(p for p in root.strip().split("/") if p not in ("", ".", ".."))
        self.with_media = with_media
        self.tz = tz

    def __str__(self) -> str:
        endpoint = self.client.endpoint or "aws"
        return f"s3 {endpoint} bucket {self.client.bucket}"

    def _key(self, day: str, name: str) -> str:
        return "/".join(p for p in (self.prefix, day, name) if p)

    def keys(self, fields: dict) -> tuple[str, list[tuple[str, str]]]:
        """(the record's key, [(key, local path)] of the media to upload)."""
        start = _start_time(fields).astimezone(self.tz)
        day = start.strftime("%Y%m%d")
        call_id = safe_file_part(str(fields.get("callId", "")))
        record_key = self._key(day, f"{start.strftime('%Y%m%d-%H%M%S')}_{call_id}.json")
        media = []
        if self.with_media:
            for track, path in _media_files(fields):
                name = f"{call_id}_{safe_file_part(track)}_{safe_file_part(os.path.basename(path))}"
                media.append((self._key(day, name), path))
            events = _events_file(fields)
            if events:
                media.append((self._key(day, f"{call_id}.jsonl"), events))
        return record_key, media

    def uploaded_files(self, fields: dict) -> list[str]:
        return [path for _, path in self.keys(fields)[1]]

    @defer.inlineCallbacks
    def upload(self, item: SpoolItem):
        record_key, media = self.keys(item.fields)
        for key, path in media:
            yield self.client.put_object(key, path, "audio/wav" if path.endswith(".wav") else "application/octet-stream")
        yield self.client.put_object(record_key, item.body, "application/json")


@implementer(ICdrWriter)
class UploadingCdrWriter:
    """``type = "http"`` and ``"s3"``: spool each record durably, upload it, then unspool it.

    A record goes to the ``spool`` (``RecordSpool``) before anything else; then up to ``attempts``
    uploads run with the ``backoff`` waits between them, on the injected ``clock``.  When they all
    fail the record stays spooled: ``resume()`` (at start-up) and a re-scan every ``rescan_interval``
    seconds try it again, for as long as it takes.  At most ``concurrency`` uploads run at once (a
    store back after an outage gets the backlog gradually).  After a successful upload the local
    recordings and event journal that were uploaded are removed unless ``keep_media_copy``.
    ``local_copy`` (http only, as before): a ``LocalCdrWriter`` also keeping the record under ``root``
    (removed with the media when ``keep_media_copy = false``).

    ``write`` fires with True once the record is uploaded, False when this round of attempts
    failed (the record stays spooled); ``flush()`` when every round in progress has ended.
    """

    def __init__(self, store, spool: Optional[RecordSpool] = None, keep_media_copy: bool = True,
                 local_copy: Optional[LocalCdrWriter] = None, clock=None,
                 backoff: Sequence[float] = (1.0, 2.0, 4.0, 8.0), rescan_interval: float = 60.0,
                 concurrency: int = 8):
        if clock is None:
            from twisted.internet import reactor as clock
        self.store = store
        self.spool = spool
        self.keep_media_copy = keep_media_copy
        self.local_copy = local_copy
        self.clock = clock
        self.backoff = tuple(backoff)
        self.rescan_interval = rescan_interval
        self._limit = defer.DeferredSemaphore(max(1, concurrency))
        self._in_flight: set[defer.Deferred] = set()
        self._busy_paths: set[str] = set()
        self._rescan: Optional[task.LoopingCall] = None
        self._waits: set[defer.Deferred] = set()
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------------------------

    def resume(self) -> defer.Deferred:
        """Upload what an earlier run left in the spool, and re-scan it every ``rescan_interval``."""
        if self._rescan is None and self.spool is not None and self.rescan_interval > 0:
            self._rescan = task.LoopingCall(self._rescan_logged)
            self._rescan.clock = self.clock
            self._rescan.start(self.rescan_interval, now=False).addErrback(
                lambda f: log.failure("spool re-scan stopped", f))
        return self.rescan()

    def stop(self) -> None:
        """Stop re-scanning and waiting between attempts: from now on a record gets one attempt,
        and what is not uploaded stays spooled for the next start (shutdown need not wait for a
        store that is down)."""
        self._stopping = True
        if self._rescan is not None and self._rescan.running:
            self._rescan.stop()
        self._rescan = None
        for d in list(self._waits):
            d.cancel()

    def _rescan_logged(self) -> defer.Deferred:
        # a failed scan (say, the directory became unreadable) is logged; the next one runs anyway
        return self.rescan().addErrback(lambda f: log.failure("cannot scan the call record spool", f))

    @defer.inlineCallbacks
    def rescan(self):
        """One attempt for every spooled record that has no round running (the re-scan interval is
        their backoff); fires with how many were started, once they are."""
        if self.spool is None:
            return 0
        items = yield self.spool.pending()
        rounds = []
        for item in items:
            # (a round that ended while the directory was read has removed its file by now)
            if item.path not in self._busy_paths and os.path.exists(item.path):
                rounds.append(self._track(self._round(item, attempts=1, quiet=True)))
        if rounds:
            log.info("uploading {n} spooled call record(s) to {store}", n=len(rounds), store=self.store)
            defer.gatherResults(rounds).addCallback(self._rescan_done)
        return len(rounds)

    def _rescan_done(self, results) -> None:
        waiting = results.count(False)
        if waiting:
            log.warn("{n} of {total} spooled call record(s) still not uploaded to {store}; next try in {t}s",
                     n=waiting, total=len(results), store=self.store, t=self.rescan_interval)

    # -- ICdrWriter --------------------------------------------------------------------------------

    def write(self, record: CallDetailRecord) -> defer.Deferred:
        return self._track(self._write(record))

    def flush(self) -> defer.Deferred:
        return defer.DeferredList(list(self._in_flight), consumeErrors=True)

    # -- one record ----------------------------------------------------------------------------------

    def _track(self, d: defer.Deferred) -> defer.Deferred:
        self._in_flight.add(d)

        def done(result):
            self._in_flight.discard(d)
            return result

        return d.addBoth(done)

    @defer.inlineCallbacks
    def _write(self, record: CallDetailRecord):
        body = record.to_bytes()
        item = SpoolItem(body)
        if self.spool is not None:
            try:
                item = yield self.spool.add(record, body)
                self._busy_paths.add(item.path)  # a re-scan now must not start a second round
            except Exception:
                log.failure("cannot spool the CDR of {call_id}; uploading it from memory", call_id=record.callId)
        if self.local_copy is not None:
            try:
                yield self.local_copy.write(record)
            except Exception:
                log.failure("cannot write the local copy of the CDR of {call_id}", call_id=record.callId)
        ok = yield self._round(item)
        return ok

    @defer.inlineCallbacks
    def _round(self, item: SpoolItem, attempts: Optional[int] = None, quiet: bool = False):
        """Up to ``len(backoff) + 1`` attempts (or ``attempts``); True once uploaded, False if the
        record stays spooled.  ``quiet``: a failure is logged at debug level (a re-scan sums them up)."""
        if item.path is not None:
            self._busy_paths.add(item.path)
        try:
            attempts = attempts or len(self.backoff) + 1
            for attempt in range(1, attempts + 1):
                try:
                    yield self._limit.run(self.store.upload, item)
                except Exception as e:
                    if attempt == attempts:
                        where = f"kept in {item.path}" if item.path else "not spooled: lost"
                        (log.debug if quiet else log.error)("CDR upload of {call_id} to {store} failed after {n} attempts ({err}); {where}",
                                  call_id=item.call_id, store=self.store, n=attempts, err=_reason(e), where=where)
                        return False
                    wait = self.backoff[attempt - 1]
                    log.warn("CDR upload of {call_id} failed ({err}); retry {attempt} in {wait}s",
                             call_id=item.call_id, err=_reason(e), attempt=attempt, wait=wait)
                    try:
                        yield self._sleep(wait)
                    except defer.CancelledError:
                        return False  # stopping: the record stays spooled for the next start
                    continue
                break
            log.info("CDR of {call_id} uploaded to {store}", call_id=item.call_id, store=self.store)
            self._uploaded(item)
            return True
        finally:
            if item.path is not None:
                self._busy_paths.discard(item.path)

    def _sleep(self, seconds: float) -> defer.Deferred:
        if self._stopping:
            return defer.fail(defer.CancelledError())
        d = task.deferLater(self.clock, seconds, lambda: None)
        self._waits.add(d)
        return d.addBoth(lambda r: (self._waits.discard(d), r)[1])

    def _uploaded(self, item: SpoolItem) -> None:
        if not self.keep_media_copy:
            fields = item.fields
            paths = list(self.store.uploaded_files(fields))
            if self.local_copy is not None:
                try:
                    paths.append(self.local_copy.path_for(CallDetailRecord(
                        callType="", callId=str(fields.get("callId", "")), startTime=_start_time(fields),
                        endTime=_start_time(fields))))
                except Exception:
                    pass
            for path in paths:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    log.warn("cannot remove {path}: {err}", path=path, err=e)
        if self.spool is not None:
            try:
                self.spool.remove(item)
            except OSError as e:
                log.warn("cannot unspool {path}: {err}", path=item.path, err=e)


def _reason(error: BaseException) -> str:
    """What failed, for the log: the exception's message (never a request or its headers)."""
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def HttpCdrWriter(url: str, headers: Sequence[tuple[str, str]] = (), with_media: bool = False,
                  keep_media_copy: bool = True, spool: Optional[RecordSpool] = None,
                  local_copy: Optional[LocalCdrWriter] = None, reactor=None, clock=None, http_client=None,
                  backoff: Sequence[float] = (1.0, 2.0, 4.0, 8.0), timeout: float = 30.0,
                  **kw) -> UploadingCdrWriter:
    """``type = "http"``: the uploading writer with an ``HttpStore``."""
    if reactor is None:
        from twisted.internet import reactor
    clock = clock or reactor
    store = HttpStore(url, headers, with_media, http_client or default_http_client(reactor), clock, timeout)
    return UploadingCdrWriter(store, spool, keep_media_copy, local_copy, clock, backoff, **kw)


def S3CdrWriter(section, reactor=None, clock=None, spool: Optional[RecordSpool] = None, tz=None,
                http_client=None, backoff: Sequence[float] = (1.0, 2.0, 4.0, 8.0), now=None,
                **kw) -> UploadingCdrWriter:
    """``type = "s3"``: the uploading writer with an ``S3Store`` for a ``[callrecord]`` section."""
    from activecall.s3 import S3Client

    if reactor is None:
        from twisted.internet import reactor
    clock = clock or reactor
    endpoint = section.endpoint
    if not endpoint and section.vendor == "gcp":
        endpoint = "https://storage.googleapis.com"
    region = section.region or ("auto" if section.vendor == "gcp" else "us-east-1")
    extra = {"now": now} if now is not None else {}
    client = S3Client(section.bucket, section.access_key, section.secret_key, region=region, endpoint=endpoint,
                      reactor=reactor, clock=clock, http_client=http_client, **extra)
    store = S3Store(client, section.root, section.with_media, tz)
    keep = section.keep_media_copy if section.keep_media_copy is not None else False  # the original's default
    return UploadingCdrWriter(store, spool, keep, None, clock, backoff, **kw)


def writer_for(section, reactor=None):
    """The writer for a ``[callrecord]`` section (None when there is none)."""
    if section is None:
        return None
    if section.type == "http":
        return HttpCdrWriter(section.url, headers=section.headers, with_media=section.with_media,
                             keep_media_copy=section.keep_media_copy is not False, spool=RecordSpool(section.spool_dir),
                             local_copy=LocalCdrWriter(section.root), reactor=reactor)
    if section.type == "s3":
        return S3CdrWriter(section, reactor=reactor, spool=RecordSpool(section.spool_dir))
    return LocalCdrWriter(section.root, clock=reactor, gather=LOCAL_GATHER if reactor is not None else 0.0)


#: ``type = "local"``: at most one batch of CDR files (one worker-thread job) per this many seconds
LOCAL_GATHER = 0.05
