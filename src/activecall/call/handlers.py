"""What to do with an inbound INVITE (docs/api.md, "Inbound calls: invite handlers"): the handler
interface, the playbook router, the webhook handler, and the small pure
functions they share (URI user part, custom X- headers, safe playbook paths).

A handler never raises into the SIP layer: every outcome is a ``Decision``
value — ``Pending`` (wait up to accept_timeout for a client on
``/call/sip?id=<dialogId>``), ``RouteToPlaybook`` (answer and run it) or
``Reject`` (final response code + the text for the ``Reason`` header).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import stat
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence, Union

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from activecall.config import PlaybookHandler as PlaybookHandlerConfig
from activecall.config import WebhookHandler as WebhookHandlerConfig
from activecall.sip.uas import IncomingInvite  # the SIP layer fills it in
from activecall.httpclient import default_http_client
from activecall.protocol.events import rfc3339

log = Logger(namespace="activecall.handlers")

# -- the interface ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pending:
    """Keep the INVITE pending for a client to accept/reject by ``dialog_id``."""

    dialog_id: str


@dataclass(frozen=True)
class RouteToPlaybook:
    """Answer the call and run a playbook: a file (``path``) or inline text (``content``)."""

    name: str
    path: Optional[str] = None
    content: Optional[str] = None
    extras: dict = field(default_factory=dict, compare=True)


@dataclass(frozen=True)
class Reject:
    """Answer the INVITE with ``code`` and ``Reason: <reason>``."""

    code: int
    reason: str


Decision = Union[Pending, RouteToPlaybook, Reject]


class InviteHandler(Protocol):
    def on_invite(self, invite: IncomingInvite) -> "defer.Deferred[Decision]":
        """Decide; the Deferred never fails (errors are a ``Reject``)."""


# -- pure helpers ----------------------------------------------------------------------------------

_NAME_ADDR = re.compile(r"<([^>]*)>")


def uri_user(uri: str) -> str:
    """The user part of a SIP/tel URI: ``"Bob" <sip:+1212@h;x>`` -> ``+1212``.

    Empty when the URI has no user part.  User parameters (``;npdi``) and a
    password (``user:pw@``) are cut off.
    """
    text = uri.strip()
    m = _NAME_ADDR.search(text)
    if m:
        text = m.group(1).strip()
    scheme = re.match(r"(sips?|tel):", text, flags=re.IGNORECASE)
    rest = text[scheme.end():] if scheme else text
    if scheme and scheme.group(1).lower() == "tel":
        user = rest
    elif "@" in rest:
        user = rest.split("@", 1)[0]
    else:
        return ""
    return user.split(";", 1)[0].split(":", 1)[0]


def match_candidates(uri: str) -> tuple[str, ...]:
    """What a rule regex is tried against: the full URI, then its bare user part."""
    user = uri_user(uri)
    return (uri, user) if user and user != uri else (uri,)


#: headers the SIP stack knows (long and compact forms, lower case): not "custom"
STANDARD_HEADERS = frozenset(h.lower() for h in (
    "Accept", "Accept-Contact", "Accept-Encoding", "Accept-Language", "Alert-Info", "Allow", "Allow-Events",
    "Authentication-Info", "Authorization", "Call-ID", "Call-Info", "Contact", "Content-Disposition",
    "Content-Encoding", "Content-Language", "Content-Length", "Content-Type", "CSeq", "Date", "Error-Info",
    "Event", "Expires", "From", "In-Reply-To", "Max-Forwards", "Min-Expires", "Min-SE", "MIME-Version",
    "Organization", "Priority", "Proxy-Authenticate", "Proxy-Authorization", "Proxy-Require", "RAck",
    "Reason", "Record-Route", "Refer-To", "Referred-By", "Reply-To", "Require", "Retry-After", "Route",
    "RSeq", "Server", "Session-Expires", "Subject", "Subscription-State", "Supported", "Timestamp", "To",
    "Unsupported", "User-Agent", "Via", "Warning", "WWW-Authenticate",
    "i", "m", "e", "l", "c", "f", "s", "k", "t", "v", "o", "u", "r", "b", "x", "a", "y",
))


def custom_headers(headers: Sequence[tuple[str, str]]) -> dict[str, str]:
    """The non-standard headers (``X-Tenant-ID``, ``P-Asserted-Identity``…) as extras.

    Keys keep the first spelling seen; repeated headers are joined with ``", "``.
    """
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for name, value in headers:
        lower = name.strip().lower()
        if lower in STANDARD_HEADERS:
            continue
        key = seen.setdefault(lower, name.strip())
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


def filter_extras(extras: dict[str, str], names: Optional[Sequence[str]]) -> dict[str, str]:
    """Only the ``sip.extract_headers`` of a playbook (case-insensitive); None keeps all."""
    if names is None:
        return dict(extras)
    wanted = {n.lower() for n in names}
    return {k: v for k, v in extras.items() if k.lower() in wanted}


class PlaybookNameError(ValueError):
    """A playbook name that would leave the playbook directory."""


def check_file_name(name: str) -> str:
    """A single playbook file name for the REST API: no ``..``, ``/``, ``\\``, NUL, absolute or hidden."""
    if (not name or ".." in name or "/" in name or "\\" in name or "\x00" in name
            or os.path.isabs(name) or name.startswith(".") or re.match(r"^[A-Za-z]:", name)):
        raise PlaybookNameError(f"invalid playbook file name {name!r}")
    return name


def resolve_playbook(playbook_dir: str, name: str) -> str:
    """The path of playbook ``name`` under ``playbook_dir`` (sub-folders allowed).

    Raises ``PlaybookNameError`` for anything that escapes the directory
    (``..``, absolute paths, NUL, backslashes, symlinks pointing out).
    The original's ``config/playbook/`` prefix is accepted and dropped.
    """
    original = name
    for prefix in ("config/playbook/", "./config/playbook/"):
        if name.startswith(prefix):
            name = name[len(prefix):]
    base = playbook_dir.rstrip("/") + "/"
    if name.startswith(base):
        name = name[len(base):]
    parts = name.split("/")
    if (not name or "\x00" in name or "\\" in name or os.path.isabs(name)
            or any(p in ("", ".", "..") for p in parts)):
        raise PlaybookNameError(f"invalid playbook name {original!r}")
    root = _real_root(playbook_dir)
    path = root
    for part in parts:  # the common case, no symlink below the root: one lstat per part
        path = os.path.join(path, part)
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            return os.path.join(root, *parts)  # missing: realpath would give the same name
        if stat.S_ISLNK(mode):
            break
    else:
        return path
    path = os.path.realpath(os.path.join(root, *parts))
    if os.path.commonpath([root, path]) != root:
        raise PlaybookNameError(f"playbook {original!r} is outside the playbook directory")
    return path


_ROOT_TTL = 2.0  # seconds a playbook directory's real path is trusted
_REAL_ROOTS: dict[str, tuple[float, str]] = {}


def _real_root(playbook_dir: str) -> str:
    """``realpath(playbook_dir)``, kept for a moment: it walks every component of the directory
    (several lstats), twice per routed call.  A directory swapped for a symlink elsewhere is
    followed within ``_ROOT_TTL``."""
    now = time.monotonic()
    known = _REAL_ROOTS.get(playbook_dir)
    if known is not None and now - known[0] < _ROOT_TTL:
        return known[1]
    root = os.path.realpath(playbook_dir)
    if len(_REAL_ROOTS) > 64:
        _REAL_ROOTS.clear()
    _REAL_ROOTS[playbook_dir] = (now, root)
    return root


def resolve_configured_playbook(playbook_dir: str, name: str) -> str:
    """The path of a playbook the *configuration* names (``[handler]`` ``default``, a rule's
    ``playbook``, ``--handler``).

    The configuration is the operator's: an absolute path is used as written, anywhere on the
    disk.  A relative name means what it means everywhere else — a file under ``playbook_dir``,
    resolved and confined by ``resolve_playbook`` (raises ``PlaybookNameError``).  Names that
    arrive over the API never come through here.
    """
    if os.path.isabs(name):
        return os.path.normpath(name)
    return resolve_playbook(playbook_dir, name)


@dataclass(frozen=True)
class PlaybookFile:
    """A playbook file whose path is already decided (confined under ``playbook_dir``, or named
    by the configuration): the runner loads it as is instead of resolving a name again."""

    path: str


def playbook_route(playbook_dir: str, name: str, extras: dict, configured: bool = False) -> Decision:
    """The decision for "run playbook ``name``": inline text, a file, or 503 Playbook Not Found.

    ``configured``: ``name`` comes from the configuration, so an absolute path is allowed
    (``resolve_configured_playbook``); otherwise (webhook answers) it must stay under
    ``playbook_dir``."""
    if name.lstrip().startswith("---"):
        return RouteToPlaybook(name="<inline>", content=name, extras=extras)
    try:
        path = (resolve_configured_playbook if configured else resolve_playbook)(playbook_dir, name)
    except PlaybookNameError as e:
        log.warn("refusing playbook: {err}", err=e)
        return Reject(503, "Playbook Not Found")
    if not os.path.isfile(path):
        log.warn("playbook {name} not found at {path}", name=name, path=path)
        return Reject(503, "Playbook Not Found")
    return RouteToPlaybook(name=name, path=path, extras=extras)


def configured_source(playbook_dir: str, name: str) -> Union[str, PlaybookFile]:
    """What ``start_playbook`` gets for a configured playbook (``--call`` with ``--handler``):
    inline text as is, a file as a ``PlaybookFile`` (a name that cannot be resolved stays a
    name, so the runner reports it)."""
    if name.lstrip().startswith("---"):
        return name
    try:
        return PlaybookFile(resolve_configured_playbook(playbook_dir, name))
    except PlaybookNameError:
        return name


# -- playbook routing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompiledRule:
    playbook: str
    caller: Optional[re.Pattern]
    callee: Optional[re.Pattern]

    def matches(self, caller: str, callee: str) -> bool:
        """Both present patterns must match (search semantics, as the original's regex crate)."""
        for pattern, uri in ((self.caller, caller), (self.callee, callee)):
            if pattern is not None and not any(pattern.search(c) for c in match_candidates(uri)):
                return False
        return True


def compile_rules(rules) -> tuple[CompiledRule, ...]:
    out = []
    for i, rule in enumerate(rules):
        compiled = {}
        for side in ("caller", "callee"):
            pattern = getattr(rule, side)
            try:
                compiled[side] = re.compile(pattern) if pattern is not None else None
            except re.error as e:
                raise ValueError(f"rule {i}: invalid {side} regex {pattern!r}: {e}") from None
        out.append(CompiledRule(rule.playbook, compiled["caller"], compiled["callee"]))
    return tuple(out)


class PlaybookRouter:
    """``[handler] type = "playbook"``: ordered rules, first match wins, then ``default``."""

    def __init__(self, config: PlaybookHandlerConfig, playbook_dir: str):
        self.rules = compile_rules(config.rules)
        self.default = config.default
        self.playbook_dir = playbook_dir

    def choose(self, caller: str, callee: str) -> Optional[str]:
        """The playbook name for this caller/callee, or None."""
        for rule in self.rules:
            if rule.matches(caller, callee):
                return rule.playbook
        return self.default

    def route(self, invite: IncomingInvite) -> Decision:
        name = self.choose(invite.caller, invite.callee)
        if name is None:
            return Reject(503, "no matching playbook")
        extras = custom_headers(invite.headers)
        extras.update(caller=invite.caller, callee=invite.callee)
        return playbook_route(self.playbook_dir, name, extras, configured=True)

    def on_invite(self, invite: IncomingInvite) -> defer.Deferred:
        return defer.succeed(self.route(invite))


# -- webhook ------------------------------------------------------------------------------------------


def webhook_body(invite: IncomingInvite, created_at: str) -> dict:
    """The JSON the webhook receives: the original's fields and the guide's."""
    return {
        "dialogId": invite.dialog_id,
        "createdAt": created_at,
        "caller": invite.caller,
        "callee": invite.callee,
        "event": "invite",
        "headers": [f"{name}: {value}" for name, value in invite.headers],
        "offer": invite.offer,
        "call_id": invite.call_id,
        "from_tag": invite.from_tag,
        "to_tag": invite.to_tag,
    }


def webhook_decision(body: bytes, invite: IncomingInvite, playbook_dir: str) -> Decision:
    """A 2xx response body may decide at once; anything else leaves the call pending.

    ``{"action":"accept","playbook":"x.md"}`` runs the playbook;
    ``{"action":"reject","code":486,"reason":"Busy"}`` rejects (default 603 Decline).
    """
    try:
        value = json.loads(body) if body.strip() else None
    except ValueError:
        value = None
    if not isinstance(value, dict):
        return Pending(invite.dialog_id)
    action = str(value.get("action", "")).lower()
    if action == "reject":
        code = value.get("code")
        if not (isinstance(code, int) and not isinstance(code, bool) and 300 <= code <= 699):
            code = 603
        reason = value.get("reason")
        return Reject(code, reason if isinstance(reason, str) and reason else "Rejected by webhook")
    if action == "accept":
        name = value.get("playbook")
        if isinstance(name, str) and name:
            extras = custom_headers(invite.headers)
            extras.update(caller=invite.caller, callee=invite.callee)
            return playbook_route(playbook_dir, name, extras)
        log.warn("webhook said accept without a playbook; the call stays pending for a client")
    return Pending(invite.dialog_id)


def _timed_out(result, timeout):
    """Whatever the cancelled request failed with (treq wraps it), call it a timeout."""
    return Failure(defer.TimeoutError(f"no answer within {timeout}s"))


class WebhookInviteHandler:
    """``[handler] type = "webhook"``: ask an HTTP service, round-robin over ``urls``.

    Non-2xx, a connection error or no answer within ``timeout`` -> 503 with
    ``Failed to process invite: …`` (the caller hears it at once, not after a
    SIP transaction timeout).  ``clock`` drives the timeout (tests use Clock).
    """

    def __init__(self, config: WebhookHandlerConfig, playbook_dir: str, reactor=None, clock=None,
                 http_client=None):
        if reactor is None:
            from twisted.internet import reactor
        urls = tuple(config.urls) or ((config.url,) if config.url else ())
        if not urls:
            raise ValueError("a webhook handler needs url or urls")
        self.urls = urls
        self._next_url = itertools.cycle(urls)
        self.method = config.method
        self.headers = tuple(config.headers)
        self.timeout = config.timeout
        self.playbook_dir = playbook_dir
        self.clock = clock or reactor
        self.http = http_client or default_http_client(reactor)

    def on_invite(self, invite: IncomingInvite) -> defer.Deferred:
        url = next(self._next_url)
        d = self._ask(url, invite)
        d.addTimeout(self.timeout, self.clock, onTimeoutCancel=_timed_out)
        d.addErrback(self._failed, url, invite)
        return d

    @defer.inlineCallbacks
    def _ask(self, url: str, invite: IncomingInvite):
        body = json.dumps(webhook_body(invite, rfc3339(self.clock.seconds()))).encode("utf-8")
        headers: dict[str, list[str]] = {}
        for name, value in self.headers:
            headers.setdefault(name, []).append(value)
        headers["Content-Type"] = ["application/json"]
        response = yield self.http.request(self.method, url, data=body, headers=headers)
        content = yield response.content()
        if not 200 <= response.code < 300:
            return Reject(503, f"Failed to process invite: webhook {url} answered HTTP {response.code}")
        return webhook_decision(content, invite, self.playbook_dir)

    def on_message(self, message) -> defer.Deferred:
        """An out-of-dialog SIP MESSAGE (``IncomingMessage``) posted to the webhook as
        ``{"event": "message", …}``: a 2xx answer -> 200 to the sender, anything else -> 503."""
        url = next(self._next_url)
        body = json.dumps({
            "event": "message", "createdAt": rfc3339(self.clock.seconds()), "caller": message.from_uri,
            "callee": message.to_uri, "call_id": message.call_id, "contentType": message.content_type,
            "body": message.text, "headers": [f"{name}: {value}" for name, value in message.headers],
        }).encode("utf-8")
        headers: dict[str, list[str]] = {}
        for name, value in self.headers:
            headers.setdefault(name, []).append(value)
        headers["Content-Type"] = ["application/json"]
        d = self.http.request(self.method, url, data=body, headers=headers)

        def answered(response):
            d2 = response.content()
            d2.addCallback(lambda _: 200 if 200 <= response.code < 300 else 503)
            return d2

        def failed(failure):
            log.warn("MESSAGE from {sender} not delivered to {url}: {why}", sender=message.from_uri, url=url,
                     why=failure.getErrorMessage() or failure.type.__name__)
            return 503

        d.addCallback(answered)
        d.addTimeout(self.timeout, self.clock)
        d.addErrback(failed)
        return d

    def _failed(self, failure, url: str, invite: IncomingInvite) -> Reject:
        if failure.check(defer.TimeoutError, defer.CancelledError):
            why = f"webhook {url} did not answer within {self.timeout:g}s"
        else:
            why = f"webhook {url}: {failure.getErrorMessage() or failure.type.__name__}"
        log.warn("INVITE {dialog_id} rejected: {why}", dialog_id=invite.dialog_id, why=why)
        return Reject(503, f"Failed to process invite: {why}")


def handler_for(config, playbook_dir: str, reactor=None) -> Optional[InviteHandler]:
    """The handler for ``config.handler`` (None: every INVITE gets 503 "No invite handler configured")."""
    if isinstance(config, WebhookHandlerConfig):
        return WebhookInviteHandler(config, playbook_dir, reactor=reactor)
    if isinstance(config, PlaybookHandlerConfig):
        return PlaybookRouter(config, playbook_dir)
    return None


# -- pending playbooks ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PendingPlaybook:
    """A playbook waiting for the WebSocket that will run it (by session id)."""

    name: Optional[str] = None  # a file under playbook_dir
    content: Optional[str] = None  # inline text starting with ---
    extras: dict = field(default_factory=dict)


class PendingPlaybooks:
    """Session id -> PendingPlaybook, each forgotten after ``ttl`` seconds if nobody takes it.

    Filled by ``POST /api/playbook/run`` and by the SIP playbook route; the
    WebSocket that connects with ``?id=`` takes it.
    """

    def __init__(self, clock=None, ttl: float = 300.0):
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.ttl = ttl
        self._entries: dict[str, tuple[PendingPlaybook, Any]] = {}

    def add(self, session_id: str, pending: PendingPlaybook) -> None:
        self._forget(session_id)
        timer = self.clock.callLater(self.ttl, self._expire, session_id)
        self._entries[session_id] = (pending, timer)

    def take(self, session_id: str) -> Optional[PendingPlaybook]:
        entry = self._entries.pop(session_id, None)
        if entry is None:
            return None
        pending, timer = entry
        if timer.active():
            timer.cancel()
        return pending

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _expire(self, session_id: str) -> None:
        if self._entries.pop(session_id, None) is not None:
            log.info("pending playbook for {id} expired unused", id=session_id)

    def _forget(self, session_id: str) -> None:
        entry = self._entries.pop(session_id, None)
        if entry is not None and entry[1].active():
            entry[1].cancel()

    def clear(self) -> None:
        """Cancel every timer (shutdown)."""
        for session_id in list(self._entries):
            self._forget(session_id)
