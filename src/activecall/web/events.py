"""Watching and driving a call without holding its control WebSocket (docs/api.md, "Event stream").

- ``GET /events/{id}``: Server-Sent Events (``text/event-stream``), one ``data:`` line per event with
  the same JSON as the WebSocket, ``id:`` its sequence number in the call; the events the call had
  already sent come first (``Last-Event-ID`` resumes after one); the stream ends after ``end``.
- ``POST /command/{id}``: one JSON command, exactly a WebSocket text frame; answered 202, or 400
  with the error that also goes out as an ``error`` event.  ``invite``/``accept`` on an id with no
  call opens a SIP call (an outbound ``invite``, or accepting an inbound call pending under that
  dialog id), as ``/call/sip`` would.
- ``/call/subscribe?id=…``: a WebSocket for another client: every event as a text frame (the
  backlog first), both sides' audio as binary frames of 16 kHz s16le with a one-byte prefix,
  ``0x00`` the bot, ``0x01`` the caller (the original's ``subscribe`` framing).

All three sit behind the ``http_token`` guard like the other routes.
"""

from __future__ import annotations

import json
from typing import Callable, Optional

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import task
from twisted.logger import Logger
from twisted.web import resource, server

from activecall.call.session import SUBSCRIBE_PREFIX as AUDIO_PREFIX
from activecall.protocol import commands as cmd
from activecall.web.rest import _segment, send_json
from activecall.web.site import send_refusal

log = Logger(namespace="activecall.events")

KEEPALIVE_SECONDS = 15
#: commands that may open a SIP call on an id with no call yet
OPENING_COMMANDS = ("invite", "accept", "ringing", "reject")


def _call_id(request) -> Optional[str]:
    if len(request.postpath) != 1:
        return None
    return _segment(request.postpath[0])


class EventStream(resource.Resource):
    """``GET /events/{id}``."""

    isLeaf = True

    def __init__(self, sessions: dict, clock, keepalive: float = KEEPALIVE_SECONDS):
        super().__init__()
        self.sessions = sessions
        self.clock = clock
        self.keepalive = keepalive

    def render_GET(self, request):
        call_id = _call_id(request)
        session = self.sessions.get(call_id) if call_id else None
        if session is None:
            return send_json(request, {"error": f"no active call {call_id!r}"}, 404)
        try:
            after = int((request.getHeader(b"last-event-id") or b"0").decode("ascii").strip() or 0)
        except ValueError:
            after = 0
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")  # a proxy must not hold the stream back
        _SseWatcher(request, session, after, self.clock, self.keepalive)
        return server.NOT_DONE_YET


class _SseWatcher:
    """One SSE client of one call."""

    def __init__(self, request, session, after: int, clock, keepalive: float):
        self.request = request
        self.session = session
        self.open = True
        self.seq = after
        request.write(b"retry: 2000\n\n")
        for seq, event in list(session.event_log):
            if seq > after:
                self._send(seq, event)
        session.listeners.append(self.on_event)
        self.pinger = task.LoopingCall(self._ping)
        self.pinger.clock = clock
        self.pinger.start(keepalive, now=False)
        request.notifyFinish().addBoth(lambda _: self._closed())
        session.when_ended().addCallback(lambda _: self._finish())

    def on_event(self, event) -> None:
        log_entry = self.session.event_log[-1] if self.session.event_log else None
        seq = log_entry[0] if log_entry is not None and log_entry[1] is event else self.seq + 1
        self._send(seq, event)

    def _send(self, seq: int, event) -> None:
        if not self.open:
            return
        self.seq = seq
        self.request.write(b"id: %d\ndata: %s\n\n" % (seq, event.to_json().encode("utf-8")))

    def _ping(self) -> None:
        if self.open:
            self.request.write(b": keepalive\n\n")

    def _closed(self) -> None:
        self.open = False
        if self.pinger.running:
            self.pinger.stop()
        if self.on_event in self.session.listeners:
            self.session.listeners.remove(self.on_event)

    def _finish(self) -> None:
        if self.open:
            self._closed()
            self.request.finish()


class CommandPost(resource.Resource):
    """``POST /command/{id}``."""

    isLeaf = True

    def __init__(self, sessions: dict, open_sip_session: Optional[Callable] = None,
                 admit: Optional[Callable[[str], object]] = None):
        super().__init__()
        self.sessions = sessions
        self.open_sip_session = open_sip_session
        #: the daemon's admission check (activecall.admission): an ``invite`` that would place a new call
        #: is refused with 503 while the node drains, is full or overloaded, as ``POST /api/calls`` is
        self.admit = admit

    def render_POST(self, request):
        call_id = _call_id(request)
        if not call_id:
            return send_json(request, {"error": "POST /command/{id}"}, 404)
        body = request.content.read()
        parsed = cmd.decode_command(body)
        session = self.sessions.get(call_id)
        if session is None:
            opening = not isinstance(parsed, cmd.CommandError) and parsed.TAG in OPENING_COMMANDS
            if not opening or self.open_sip_session is None:
                return send_json(request, {"error": f"no active call {call_id!r}"}, 404)
            refusal = self.admit("originate") if self.admit is not None and parsed.TAG == "invite" else None
            if refusal is not None:
                return send_refusal(request, refusal)
            try:
                session = self.open_sip_session(call_id, parsed.TAG)
            except LookupError as e:  # accept/ringing/reject with nothing pending under that id
                return send_json(request, {"error": str(e)}, 404)
            except Exception as e:  # a duplicate id raced us
                return send_json(request, {"error": str(e)}, 409)
        session.receive_frame(body)
        if isinstance(parsed, cmd.CommandError):
            return send_json(request, {"error": parsed.message}, 400)
        return send_json(request, {"status": "accepted", "command": parsed.TAG, "id": session.id}, 202)


class SubscriberProtocol(WebSocketServerProtocol):
    """One watcher of one call: events as text, audio as prefixed binary frames."""

    session = None

    def onConnect(self, request):
        values = request.params.get("id") or [None]
        self.call_id = values[0]
        return None

    def onOpen(self):
        session = self.factory.sessions.get(self.call_id) if self.call_id else None
        if session is None:
            self.sendMessage(json.dumps({"event": "error", "trackId": self.call_id or "", "sender": "subscribe",
                                         "error": f"no active call {self.call_id!r}", "code": 404}).encode())
            self.sendClose(code=4004, reason="no such call")
            return
        self.session = session
        for _, event in list(session.event_log):
            self.on_event(event)
        session.listeners.append(self.on_event)
        session.audio_taps.append(self.on_audio)
        session.when_ended().addCallback(lambda _: self._ended())

    def on_event(self, event) -> None:
        if self.state == WebSocketServerProtocol.STATE_OPEN:
            self.sendMessage(event.to_json().encode("utf-8"), isBinary=False)

    def on_audio(self, channel: int, pcm) -> None:
        if self.state == WebSocketServerProtocol.STATE_OPEN:
            self.sendMessage(AUDIO_PREFIX[channel] + pcm.astype("<i2").tobytes(), isBinary=True)

    def _detach(self) -> None:
        if self.session is None:
            return
        if self.on_event in self.session.listeners:
            self.session.listeners.remove(self.on_event)
        if self.on_audio in self.session.audio_taps:
            self.session.audio_taps.remove(self.on_audio)

    def _ended(self) -> None:
        self._detach()
        if self.state == WebSocketServerProtocol.STATE_OPEN:
            self.sendClose(code=1000)

    def onClose(self, wasClean, code, reason):
        self._detach()


def subscribe_resource(sessions: dict) -> WebSocketResource:
    factory = WebSocketServerFactory()
    factory.protocol = SubscriberProtocol
    factory.sessions = sessions
    factory.setProtocolOptions(closeHandshakeTimeout=10)
    return WebSocketResource(factory)
