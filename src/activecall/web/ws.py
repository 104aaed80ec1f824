"""WebSocket endpoints (Autobahn, in the daemon's twisted.web Site).

``/call``: JSON commands/events and binary audio on one socket;
``/call/sip`` and ``/call/webrtc``: JSON control, media elsewhere.
Query parameters (docs/api.md): ``id``, ``dump``, ``ping``, ``serverSideTrack``.

A frame that is not a valid command gets an ``error`` event and the socket
stays open (the original dropped it silently).  Frames larger than
``MAX_FRAME_BYTES`` are refused by Autobahn (close code 1009).
"""

from __future__ import annotations

import uuid
from typing import Optional

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import task
from twisted.logger import Logger

from activecall.call.manager import DuplicateSession
from activecall.protocol import events as ev

log = Logger(namespace="activecall.ws")

MAX_FRAME_BYTES = 4 * 1024 * 1024
DEFAULT_PING_SECONDS = 20


def _first(params: dict, name: str) -> Optional[str]:
    values = params.get(name)
    return values[0] if values else None


def parse_bool(text: Optional[str], default: bool) -> bool:
    if text is None or text == "":
        return default
    return text.strip().lower() not in ("0", "false", "no", "off")


class CallProtocol(WebSocketServerProtocol):
    """One client connection = one call session."""

    session = None
    _pinger = None

    def onConnect(self, request):
        params = request.params
        self.session_id = _first(params, "id") or f"s.{uuid.uuid4()}"
        self.dump = parse_bool(_first(params, "dump"), True)
        try:
            self.ping_seconds = int(_first(params, "ping") or DEFAULT_PING_SECONDS)
        except ValueError:
            self.ping_seconds = DEFAULT_PING_SECONDS
        self.server_track_id = _first(params, "serverSideTrack") or "server-side-track"
        return None

    def onOpen(self):
        factory = self.factory
        try:
            self.session = factory.manager.open_session(
                self.session_id, factory.call_type, emit=self.send_event, dump=self.dump,
                server_track_id=self.server_track_id,
            )
        except DuplicateSession as e:
            self.send_event(ev.Error(trackId=self.session_id, timestamp=ev.now_ms(factory.clock),
                                     sender="command", error=str(e), code=409))
            self._close(4009, "duplicate session id")
            return
        self.session.connector = factory.connector_for(self.session, self)
        self.session.when_ended().addCallback(lambda _: self._session_ended())
        if self.ping_seconds > 0:
            self._pinger = task.LoopingCall(self._ping)
            self._pinger.clock = factory.clock
            self._pinger.start(self.ping_seconds, now=False)
        log.info("call {id} opened on {path}", id=self.session_id, path=factory.path)

    def onMessage(self, payload, isBinary):
        if self.session is None:
            return
        if isBinary:
            self.session.connector.binary_received(payload)
        else:
            self.session.receive_frame(payload)

    def onClose(self, wasClean, code, reason):
        self._stop_pinger()
        if self.session is not None:
            self.session.end("caller", initiator="caller")

    # -- outbound ---------------------------------------------------------------------------------

    def send_event(self, event: ev.Event) -> None:
        if self.state == WebSocketServerProtocol.STATE_OPEN:
            self.sendMessage(event.to_json().encode("utf-8"), isBinary=False)

    def send_audio(self, payload: bytes) -> None:
        if self.state == WebSocketServerProtocol.STATE_OPEN:
            self.sendMessage(payload, isBinary=True)

    def _ping(self):
        if self.state == WebSocketServerProtocol.STATE_OPEN:
            self.sendPing(ev.rfc3339(self.factory.clock.seconds()).encode())

    def _stop_pinger(self):
        if self._pinger is not None and self._pinger.running:
            self._pinger.stop()

    def _close(self, code: int, reason: Optional[str] = None) -> None:
        """Our end of the socket: stop pinging and send a close frame unless one came or went already."""
        self._stop_pinger()
        if self.state == WebSocketServerProtocol.STATE_OPEN:
            self.sendClose(code=code, reason=reason)

    def _session_ended(self):
        self._close(1000)


class CallEndpointFactory(WebSocketServerFactory):
    """The factory of one endpoint; ``connectors`` builds the per-call-type glue."""

    protocol = CallProtocol

    def __init__(self, manager, call_type: str, connector_factory, path: str, clock=None):
        super().__init__()
        self.manager = manager
        self.call_type = call_type
        self.connector_factory = connector_factory
        self.path = path
        self.clock = clock or manager.clock
        # a busy client gets time to answer our close frame: an abort after the
        # default 1 s would reset the connection and lose the last events (hangup, end)
        self.setProtocolOptions(maxMessagePayloadSize=MAX_FRAME_BYTES,
                                maxFramePayloadSize=MAX_FRAME_BYTES, closeHandshakeTimeout=10)

    def connector_for(self, session, protocol):
        return self.connector_factory(session, protocol)


def endpoint_resource(manager, call_type: str, connector_factory, path: str) -> WebSocketResource:
    return WebSocketResource(CallEndpointFactory(manager, call_type, connector_factory, path))
