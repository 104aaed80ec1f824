"""The HTTP side of the daemon: one twisted.web Site for /health, /ready, /metrics and,
later, the REST and WebSocket API; the admission guard in front of the routes that start calls."""

from __future__ import annotations

import json
import time
from typing import Callable, Iterable

from twisted.logger import Logger
from twisted.web import resource, server

log = Logger(namespace="activecall.http")


def path_skipped(path: str, skip_paths: Iterable[str]) -> bool:
    """``http_access_skip_paths``: exact paths, or prefixes ending in ``*``."""
    for pattern in skip_paths:
        if pattern.endswith("*"):
            if path.startswith(pattern[:-1]):
                return True
        elif path == pattern:
            return True
    return False


class JSONResource(resource.Resource):
    """GET returns ``provider()`` as JSON."""

    isLeaf = True

    def __init__(self, provider: Callable[[], dict]):
        super().__init__()
        self.provider = provider

    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(self.provider()).encode() + b"\n"


class MetricsResource(resource.Resource):
    """Prometheus text exposition of the daemon's registry."""

    isLeaf = True

    def __init__(self, metrics, before_render: Callable[[], None] = lambda: None):
        super().__init__()
        self.metrics = metrics
        self.before_render = before_render

    def render_GET(self, request):
        self.before_render()
        request.setHeader(b"content-type", self.metrics.content_type.encode())
        return self.metrics.render()


def send_refusal(request, refusal) -> bytes:
    """HTTP 503 with ``Retry-After`` and a JSON body naming the reason (draining, max_calls, overload)."""
    request.setResponseCode(503)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"retry-after", str(refusal.retry_after).encode())
    return json.dumps({"error": refusal.text, "reason": refusal.reason}).encode() + b"\n"


class ReadyResource(resource.Resource):
    """``GET /ready``: 200 while the node takes new calls, 503 (with the reason) while it drains, is full
    (``max_calls``) or overloaded: what a load balancer's health check asks.  ``/health`` stays liveness."""

    isLeaf = True

    def __init__(self, status: Callable[[], object], snapshot: Callable[[], dict]):
        super().__init__()
        self.status = status
        self.snapshot = snapshot

    def render_GET(self, request):
        refusal = self.status()
        document = dict(self.snapshot(), ready=refusal is None)
        if refusal is not None:
            document["reason"] = refusal.reason
            request.setResponseCode(503)
            request.setHeader(b"retry-after", str(refusal.retry_after).encode())
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(document).encode() + b"\n"


class Admitted(resource.Resource):
    """A route that starts a call (a ``/call*`` WebSocket upgrade, ``POST /api/calls``) behind the
    admission check: refused with 503 before the upgrade, so nothing of the call exists yet.

    ``check(kind)`` returns None or a refusal; ``exempt(request)`` lets through what belongs to a call
    already admitted (``/call/sip?id=`` of an inbound call that is pending)."""

    isLeaf = True

    def __init__(self, wrapped: resource.Resource, check: Callable[[str], object], kind: str,
                 exempt: Callable[[object], bool] = lambda request: False):
        super().__init__()
        self.wrapped = wrapped
        self.check = check
        self.kind = kind
        self.exempt = exempt

    def render(self, request):
        if request.method != b"OPTIONS" and not self.exempt(request):
            refusal = self.check(self.kind)
            if refusal is not None:
                return send_refusal(request, refusal)
        return self.wrapped.render(request)


class ActiveCallSite(server.Site):
    """A Site whose access log goes to twisted.logger, skipping configured paths."""

    def __init__(self, root, skip_paths=(), **kw):
        super().__init__(root, **kw)
        self.skip_paths = tuple(skip_paths)

    def log(self, request):
        path = request.path.decode("utf-8", "replace")
        if path_skipped(path, self.skip_paths):
            return
        started = getattr(request, "started", None)
        ms = (time.monotonic() - started) * 1000 if started else 0.0
        log.info(
            '{client} "{method} {uri}" {code} {length} {ms:.1f}ms',
            client=getattr(request.getClientAddress(), "host", "-"),
            method=request.method.decode("ascii", "replace"),
            uri=request.uri.decode("utf-8", "replace"),
            code=request.code,
            length=request.sentLength,
            ms=ms,
        )


class _TimedRequest(server.Request):
    def process(self):
        self.started = time.monotonic()
        return super().process()


def build_site(health: Callable[[], dict], metrics, skip_paths=(), on_metrics=lambda: None,
               ready: resource.Resource = None):
    """The daemon's root resource tree: /health, /ready (when given) and /metrics."""
    root = resource.Resource()
    root.putChild(b"health", JSONResource(health))
    if ready is not None:
        root.putChild(b"ready", ready)
    root.putChild(b"metrics", MetricsResource(metrics, on_metrics))
    site = ActiveCallSite(root, skip_paths=skip_paths, requestFactory=_TimedRequest)
    site.root = root
    return site
