"""A small Autobahn WebSocket client for tests: collects events and audio,
waits for events with Deferreds."""

import json

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint

from tests.helpers import MIN_WAIT, generous


class Client(WebSocketClientProtocol):
    def onOpen(self):
        self.factory.opened.callback(self)

    def onMessage(self, payload, isBinary):
        if isBinary:
            self.factory.audio.append(payload)
        else:
            event = json.loads(payload)
            self.factory.events.append(event)
            for matches, d in list(self.factory.waiting):
                if matches(event):
                    self.factory.waiting.remove((matches, d))
                    d.callback(event)

    def onPing(self, payload):
        self.factory.pings.append(payload)
        super().onPing(payload)

    def onClose(self, wasClean, code, reason):
        self.factory.close_info = (wasClean, code, reason)
        if not self.factory.closed.called:
            self.factory.closed.callback(code)


class ClientFactory(WebSocketClientFactory):
    protocol = Client

    def __init__(self, url):
        super().__init__(url)
        self.opened = defer.Deferred()
        self.closed = defer.Deferred()
        self.events = []
        self.audio = []
        self.pings = []
        self.waiting = []

    def wait_event(self, name, timeout=MIN_WAIT, **fields):
        """The first event ``name`` whose fields match ``fields`` (already seen or to come); fails after
        ``timeout`` seconds (at least ``MIN_WAIT``: a bound on a hang, not a speed requirement)."""

        def matches(event):
            return event["event"] == name and all(event.get(k) == v for k, v in fields.items())

        for event in self.events:
            if matches(event):
                return defer.succeed(event)
        d = defer.Deferred()
        self.waiting.append((matches, d))
        d.addTimeout(generous(timeout), reactor)
        return d


@defer.inlineCallbacks
def connect(testcase, port: int, path: str = "/call", query: str = ""):
    """Open ``ws://127.0.0.1:port/path?query``; returns (protocol, factory)."""
    factory = ClientFactory(f"ws://127.0.0.1:{port}{path}" + (f"?{query}" if query else ""))
    proto = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    yield factory.opened
    testcase.addCleanup(lambda: proto.transport.loseConnection() if proto.transport.connected else None)
    return proto, factory


def send_json(proto, obj) -> None:
    proto.sendMessage(obj.encode() if isinstance(obj, str) else json.dumps(obj).encode())
