"""The REST side of the API (docs/api.md, "REST routes") as twisted.web resources.

The resources see active calls only through a small ``ActiveCalls`` object
(``list()`` -> summaries, ``kill(id)`` -> bool), so they work with a fake in
tests and with the real session registry later.  ``install_api`` puts them
under the daemon's root resource.  With ``http_token`` set, every route it
installs (and the ``/call`` WebSocket routes hung under ``api.call``) needs
``Authorization: Bearer <token>`` or ``?token=<token>``; /health stays open.
"""

from __future__ import annotations

import glob
import hmac
import json
import os
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable, Optional, Protocol, Sequence, Union

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.web import resource, server, static

from activecall.atomicfile import write_atomically
from activecall.call.handlers import PendingPlaybook, PendingPlaybooks, PlaybookNameError, check_file_name
from activecall.call.session import CallSummary
from activecall.protocol.events import json_text, rfc3339

log = Logger(namespace="activecall.api")

DEFAULT_ICE_SERVERS = (
    {"urls": ["stun:stun.l.google.com:19302"], "username": None, "credential": None,
     "credential_type": "password"},
)


# -- what the resources need from the call layer ------------------------------------------------


class ActiveCalls(Protocol):
    def list(self) -> Sequence[CallSummary]:
        """The calls now active."""

    def kill(self, call_id: str) -> Union[bool, "defer.Deferred[bool]"]:
        """End the call; False when there is no such call."""


class SessionTable:
    """``ActiveCalls`` over the daemon's ``{session id: session}`` dict.

    A session provides ``summary() -> CallSummary`` and ``kill()`` (which may
    return a Deferred); until sessions exist the dict is simply empty.
    """

    def __init__(self, sessions: dict):
        self.sessions = sessions

    def list(self) -> list[CallSummary]:
        return [session.summary() for session in list(self.sessions.values())]

    def kill(self, call_id: str):
        session = self.sessions.get(call_id)
        if session is None:
            return False
        d = defer.maybeDeferred(session.kill)
        d.addCallback(lambda _: True)
        return d


# -- helpers --------------------------------------------------------------------------------------------


def send_json(request, value, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json_text(value).encode("utf-8") + b"\n"


def send_text(request, text: str, code: int = 200, content_type: bytes = b"text/plain; charset=utf-8") -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", content_type)
    return text.encode("utf-8")


def authorized(request, token: Optional[str]) -> bool:
    """``Authorization: Bearer <token>`` or ``?token=<token>``, compared in constant time."""
    if not token:
        return True
    expected = token.encode("utf-8")
    header = request.getHeader(b"authorization") or b""
    if isinstance(header, str):
        header = header.encode("utf-8")
    scheme, _, value = header.partition(b" ")
    candidates = []
    if scheme.lower() == b"bearer":
        candidates.append(value.strip())
    candidates.extend((request.args or {}).get(b"token", [])[:1])
    ok = False
    for candidate in candidates:
        ok |= hmac.compare_digest(candidate, expected)
    return ok


class Unauthorized(resource.Resource):
    isLeaf = True

    def render(self, request):
        request.setHeader(b"www-authenticate", b'Bearer realm="activecall"')
        return send_json(request, {"error": "unauthorized"}, 401)


class TokenGuard(resource.Resource):
    """Wraps a resource (and everything under it) so it needs the API token."""

    def __init__(self, wrapped: resource.Resource, token: Optional[str]):
        super().__init__()
        self.wrapped = wrapped
        self.token = token
        self.isLeaf = getattr(wrapped, "isLeaf", False)

    def getChildWithDefault(self, path, request):
        if not authorized(request, self.token):
            return Unauthorized()
        return self.wrapped.getChildWithDefault(path, request)

    def render(self, request):
        if not authorized(request, self.token):
            return Unauthorized().render(request)
        return self.wrapped.render(request)


def _segment(raw: bytes) -> Optional[str]:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


# -- calls ------------------------------------------------------------------------------------------------


class ListCalls(resource.Resource):
    """``GET /list`` -> ``{"active_calls": [...]}``; ``GET /call/lists`` -> ``{"calls": [...]}``."""

    isLeaf = True

    def __init__(self, calls: ActiveCalls, key: str):
        super().__init__()
        self.calls = calls
        self.key = key

    def render_GET(self, request):
        return send_json(request, {self.key: [c.to_dict() for c in self.calls.list()]})


class KillCall(resource.Resource):
    """``/kill/{id}`` (GET, the original's code: a status object) and
    ``/call/kill/{id}`` (POST, the original's docs: ``true``/``false``).  Both methods work on both."""

    isLeaf = True

    def __init__(self, calls: ActiveCalls, style: str):
        super().__init__()
        self.calls = calls
        self.style = style

    def render_GET(self, request):
        call_id = _segment(b"/".join(request.postpath))
        if not call_id:
            return send_json(request, {"error": "missing call id"}, 400)
        d = defer.maybeDeferred(self.calls.kill, call_id)

        def answer(killed):
            if self.style == "status":
                body = send_json(request, {"status": "killed" if killed else "not_found", "id": call_id})
            else:
                body = send_json(request, bool(killed), 200 if killed else 404)
            request.write(body)
            request.finish()

        def failed(failure):
            log.failure("killing {id} failed", failure, id=call_id)
            request.write(send_json(request, {"error": failure.getErrorMessage()}, 500))
            request.finish()

        d.addCallbacks(answer, failed)
        return server.NOT_DONE_YET

    render_POST = render_GET


class CallRoutes(resource.Resource):
    """``/call``: ``lists`` and ``kill`` here; the WebSocket endpoints hang off it.

    The WebSocket side sets ``websocket`` (served at ``/call`` itself) and
    ``putChild(b"sip", ...)`` / ``putChild(b"webrtc", ...)``.
    """

    def __init__(self, calls: ActiveCalls):
        super().__init__()
        self.websocket: Optional[resource.Resource] = None
        self.putChild(b"lists", ListCalls(calls, "calls"))
        self.putChild(b"kill", KillCall(calls, "bool"))

    def getChild(self, path, request):
        if path == b"":
            return self
        return resource.NoResource()

    def render(self, request):
        if self.websocket is None:
            return send_json(request, {"error": "the /call WebSocket endpoint is not available"}, 404)
        return self.websocket.render(request)


# -- drain ----------------------------------------------------------------------------------------------------


class Drain(resource.Resource):
    """``POST /api/drain``: take the node out of service the way SIGTERM does (docs/scale-out.md): new
    calls are refused, live ones go on until they end (at most ``graceful_shutdown_timeout``), then the
    daemon stops and exits 0.  Answers 202 with the node's state; again while draining, the same."""

    isLeaf = True

    def __init__(self, drain: Callable[[str], dict]):
        super().__init__()
        self.drain = drain

    def render_POST(self, request):
        return send_json(request, self.drain("POST /api/drain"), 202)


# -- ICE servers -------------------------------------------------------------------------------------------


def ice_servers_document(ice_servers) -> list:
    """The configured ``[[ice_servers]]`` in rustrtc's shape, or the default Google STUN entry."""
    if not ice_servers:
        return [dict(s) for s in DEFAULT_ICE_SERVERS]
    return [{"urls": list(s.urls), "username": s.username, "credential": s.credential,
             "credential_type": s.credential_type} for s in ice_servers]


class IceServers(resource.Resource):
    isLeaf = True

    def __init__(self, ice_servers):
        super().__init__()
        self.document = ice_servers_document(ice_servers)

    def render_GET(self, request):
        return send_json(request, self.document)


# -- playbooks ----------------------------------------------------------------------------------------------


class Playbooks(resource.Resource):
    """``GET /api/playbooks`` and ``GET|POST /api/playbooks/{name}``."""

    def __init__(self, playbook_dir: str):
        super().__init__()
        self.playbook_dir = playbook_dir

    def getChild(self, path, request):
        if path == b"" and not request.postpath:
            return self
        return PlaybookFile(self.playbook_dir, path)

    def render_GET(self, request):
        entries = []
        for path in sorted(glob.glob(os.path.join(glob.escape(self.playbook_dir), "*.md"))):
            try:
                mtime = os.stat(path).st_mtime
            except OSError:
                continue
            entries.append({"name": os.path.basename(path), "updated": rfc3339(mtime)})
        return send_json(request, entries)


class PlaybookFile(resource.Resource):
    isLeaf = True

    def __init__(self, playbook_dir: str, raw_name: bytes):
        super().__init__()
        self.playbook_dir = playbook_dir
        self.raw_name = raw_name

    def _path(self, request) -> Optional[str]:
        name = _segment(self.raw_name)
        if name is None or request.postpath:  # more segments: the name had a "/"
            return None
        try:
            return os.path.join(self.playbook_dir, check_file_name(name))
        except PlaybookNameError:
            return None

    def render_GET(self, request):
        path = self._path(request)
        if path is None:
            return send_text(request, "Invalid filename", 400)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (FileNotFoundError, IsADirectoryError):
            return send_text(request, "Playbook not found", 404)
        except (OSError, UnicodeDecodeError) as e:
            return send_text(request, f"Cannot read playbook: {e}", 500)
        return send_text(request, text, 200, b"text/markdown; charset=utf-8")

    def render_POST(self, request):
        path = self._path(request)
        if path is None:
            return send_text(request, "Invalid filename", 400)
        try:
            write_atomically(path, request.content.read())
        except OSError as e:
            log.warn("cannot save playbook {path}: {err}", path=path, err=e)
            return send_text(request, f"Cannot save playbook: {e.strerror or e}", 500)
        request.setResponseCode(200)
        return b""


class PlaybookRun(resource.Resource):
    """``POST /api/playbook/run`` ``{"playbook": "x.md"}`` or ``{"content": "---…"}`` ->
    ``{"session_id": "s.<uuid>"}``; the WebSocket that connects with ``?id=`` runs it."""

    isLeaf = True

    def __init__(self, playbook_dir: str, pending: PendingPlaybooks, new_id: Callable[[], str]):
        super().__init__()
        self.playbook_dir = playbook_dir
        self.pending = pending
        self.new_id = new_id

    def render_POST(self, request):
        try:
            body = json.loads(request.content.read() or b"null")
        except ValueError as e:
            return send_json(request, {"error": f"malformed JSON: {e}"}, 400)
        if not isinstance(body, dict):
            return send_json(request, {"error": 'expected {"playbook": "name.md"} or {"content": "---..."}'}, 400)
        name, content = body.get("playbook"), body.get("content")
        if isinstance(content, str) and content.strip():
            if content.lstrip().startswith("---"):
                pending = PendingPlaybook(content=content)
            else:  # the original: content without front matter is a file name
                name, pending = content.strip(), None
        elif content is not None:
            return send_json(request, {"error": "content: expected a non-empty string"}, 400)
        else:
            pending = None
        if pending is None:
            if not isinstance(name, str) or not name:
                return send_json(request, {"error": 'playbook: expected a file name such as "x.md"'}, 400)
            try:
                check_file_name(name)
            except PlaybookNameError:
                return send_json(request, {"error": "Invalid filename"}, 400)
            if not os.path.isfile(os.path.join(self.playbook_dir, name)):
                return send_json(request, {"error": "Playbook not found"}, 404)
            pending = PendingPlaybook(name=name)
        session_id = self.new_id()
        self.pending.add(session_id, pending)
        return send_json(request, {"session_id": session_id})


def new_session_id() -> str:
    return f"s.{uuid.uuid4()}"


# -- records -------------------------------------------------------------------------------------------------


def _duration(cdr: dict) -> str:
    try:
        start = datetime.fromisoformat(cdr.get("answerTime") or cdr["startTime"])
        end = datetime.fromisoformat(cdr["endTime"])
    except (KeyError, TypeError, ValueError):
        return "0s"
    return f"{max(0, round((end - start).total_seconds()))}s"


def list_records(recording_dir: str, cdr_root: Optional[str]) -> list[dict]:
    """``/api/records``: one entry per ``<id>.events.jsonl`` dump and per local CDR.

    A CDR gives the real duration and status (``completed`` when answered,
    else its hangup reason); a dump alone is ``0s`` / ``completed`` as in the original.
    Newest first.
    """
    records: dict[str, dict] = {}
    for path in glob.glob(os.path.join(glob.escape(recording_dir), "*.events.jsonl")):
        try:
            mtime = os.stat(path).st_mtime
        except OSError:
            continue
        call_id = os.path.basename(path)[: -len(".events.jsonl")]
        records[call_id] = {"id": call_id, "date": rfc3339(mtime), "duration": "0s", "status": "completed",
                            "_sort": mtime}
    if cdr_root:
        for path in glob.glob(os.path.join(glob.escape(cdr_root), "[0-9]" * 8, "*.json")):
            try:
                with open(path, encoding="utf-8") as f:
                    cdr = json.load(f)
                call_id = cdr["callId"]
                start = datetime.fromisoformat(cdr["startTime"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            status = "completed" if cdr.get("answerTime") else str(cdr.get("hangupReason") or "failed")
            records[call_id] = {"id": call_id, "date": rfc3339(start), "duration": _duration(cdr),
                                "status": status, "_sort": start.timestamp()}
    ordered = sorted(records.values(), key=lambda r: r["_sort"], reverse=True)
    for r in ordered:
        del r["_sort"]
    return ordered


class Records(resource.Resource):
    isLeaf = True

    def __init__(self, recording_dir: str, cdr_root: Optional[str], run=threads.deferToThread):
        super().__init__()
        self.recording_dir = recording_dir
        self.cdr_root = cdr_root
        self.run = run

    def render_GET(self, request):
        d = self.run(list_records, self.recording_dir, self.cdr_root)

        def answer(records):
            request.write(send_json(request, records))
            request.finish()

        def failed(failure):
            log.failure("listing records failed", failure)
            request.write(send_json(request, {"error": failure.getErrorMessage()}, 500))
            request.finish()

        d.addCallbacks(answer, failed)
        return server.NOT_DONE_YET


# -- recordings and the console --------------------------------------------------------------------------


def recording_file(recording_dir: str, name: str) -> Optional[str]:
    """The path of ``name`` directly under ``recording_dir``, or None when the name tries to leave it."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or ".." in name:
        return None
    base = os.path.realpath(recording_dir)
    path = os.path.realpath(os.path.join(base, name))
    if os.path.dirname(path) != base:
        return None
    return path


class Recordings(resource.Resource):
    """``GET /api/recordings`` -> ``[{"name", "size", "updated"}]`` (WAV files, newest first);
    ``GET /api/recordings/{name}`` -> the file (Range supported, for the console's player).
    Read-only, files directly under ``[recording] path`` only; traversal is refused (400)."""

    def __init__(self, recording_dir: str):
        super().__init__()
        self.recording_dir = recording_dir

    def getChild(self, path, request):
        if path == b"" and not request.postpath:
            return self
        name = _segment(path)
        target = recording_file(self.recording_dir, name) if name is not None and not request.postpath else None
        if target is None:
            return resource.ErrorPage(400, "Bad Request", "Invalid filename")
        if not os.path.isfile(target):
            return resource.ErrorPage(404, "Not Found", "Recording not found")
        return static.File(target, defaultType="audio/wav")

    def render_GET(self, request):
        entries = []
        for path in glob.glob(os.path.join(glob.escape(self.recording_dir), "*.wav")):
            try:
                st = os.stat(path)
            except OSError:
                continue
            entries.append({"name": os.path.basename(path), "size": st.st_size, "updated": rfc3339(st.st_mtime),
                            "_sort": st.st_mtime})
        entries.sort(key=lambda e: e["_sort"], reverse=True)
        for e in entries:
            del e["_sort"]
        return send_json(request, entries)


def console_directory() -> str:
    """The browser console's files, shipped in the package (``activecall/static``)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "static")


class _StaticFiles(static.File):
    """Static files without directory listings."""

    def directoryListing(self):
        return resource.NoResource("No such file")


def install_console(root: resource.Resource, directory: Optional[str] = None) -> None:
    """``/`` serves the console page and ``/static/*`` its files.  Not behind the token: the page
    only holds code; it asks for the token and sends it with every API call."""
    directory = directory or console_directory()
    files = _StaticFiles(directory)
    files.indexNames = []
    root.putChild(b"static", files)
    root.putChild(b"", static.File(os.path.join(directory, "index.html"), defaultType="text/html"))


# -- wiring ---------------------------------------------------------------------------------------------------


@dataclass
class ApiResources:
    """What ``install_api`` created; ``call`` is where the WebSocket endpoints go."""

    call: CallRoutes
    guarded: dict = field(default_factory=dict)


def install_api(root: resource.Resource, config, calls: ActiveCalls, pending_playbooks: PendingPlaybooks,
                run=threads.deferToThread, new_id: Callable[[], str] = new_session_id,
                api_children: Optional[dict] = None) -> ApiResources:
    """Put the REST routes under ``root`` (the Site's root resource), each behind the token.

    ``api_children`` (name -> resource) go under ``/api`` next to the built-in routes, behind the same
    token: routes that exist only when another part runs (``calls`` -> ``OriginateCall`` with SIP)."""
    token = config.http_token
    cdr_root = config.callrecord.root if config.callrecord is not None else None

    api = resource.Resource()
    api.putChild(b"playbooks", Playbooks(config.playbook_dir))
    playbook = resource.Resource()
    playbook.putChild(b"run", PlaybookRun(config.playbook_dir, pending_playbooks, new_id))
    api.putChild(b"playbook", playbook)
    api.putChild(b"records", Records(config.recording.path, cdr_root, run))
    api.putChild(b"recordings", Recordings(config.recording.path))
    for name, child in (api_children or {}).items():
        api.putChild(name, child)

    kill = KillCall(calls, "status")
    call = CallRoutes(calls)
    children = {
        b"list": ListCalls(calls, "active_calls"),
        b"kill": kill,
        b"call": call,
        b"iceservers": IceServers(config.ice_servers),
        b"api": api,
    }
    guarded = {}
    for name, child in children.items():
        guarded[name] = TokenGuard(child, token)
        root.putChild(name, guarded[name])
    return ApiResources(call=call, guarded=guarded)
