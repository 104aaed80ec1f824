"""Local stand-ins for the speech vendors: a twisted.web HTTP server and an Autobahn WebSocket server.

Both listen on 127.0.0.1:0, record every request (path, query, headers,
body / frames) for field-by-field checks, and answer through a function the
test supplies, the way the vendor would.  Waiting is by Deferreds that fire
when the server has seen what the test waits for; nothing sleeps.
"""

from __future__ import annotations

import io
import json
from typing import Callable, Optional
from urllib.parse import parse_qs, urlsplit

import numpy as np
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from treq.client import HTTPClient
from twisted.internet import defer, reactor
from twisted.web import resource, server
from twisted.web.client import Agent, HTTPConnectionPool


def tone(seconds: float, rate: int = 16000, freq: float = 440.0, level: int = 8000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (level * np.sin(2 * np.pi * freq * t)).astype(np.int16)


# -- HTTP -----------------------------------------------------------------------------------------


class _Recorder(resource.Resource):
    isLeaf = True

    def __init__(self, answer):
        super().__init__()
        self.answer = answer
        self.requests: list[dict] = []

    def render(self, request):
        body = request.content.read()
        uri = request.uri.decode()
        self.requests.append({
            "method": request.method.decode(),
            "path": request.path.decode(),
            "query": {k: v[0] for k, v in parse_qs(urlsplit(uri).query, keep_blank_values=True).items()},
            "headers": {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()},
            "body": body,
        })
        return self.answer(request, body)


class HttpServer:
    """A twisted.web site and a treq client without persistent connections (nothing left open)."""

    def __init__(self, test, answer: Callable):
        self.resource = _Recorder(answer)
        self.port = reactor.listenTCP(0, server.Site(self.resource), interface="127.0.0.1")
        test.addCleanup(self.port.stopListening)
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"
        self.http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))

    @property
    def requests(self) -> list[dict]:
        return self.resource.requests


def streamed(test, data: bytes, chunks: int = 4, finish: bool = True, content_type: bytes = b"audio/pcm"):
    """An ``answer`` writing ``data`` in ``chunks`` writes over reactor turns; ``test.disconnected`` /
    ``test.pending`` let a cancel test watch the connection go away."""
    size = -(-len(data) // chunks) | 1  # odd: chunk boundaries split samples

    def answer(request, body):
        request.setHeader(b"content-type", content_type)
        parts = [data[i:i + size] for i in range(0, len(data), size)]
        test.disconnected = request.notifyFinish()

        def send(i=0):
            if i < len(parts):
                request.write(parts[i])
                test.pending = reactor.callLater(0.005, send, i + 1)
            elif finish:
                request.finish()

        send()
        return server.NOT_DONE_YET

    return answer


class FakeTranscriber:
    """A deterministic recogniser for a daemon under test: an OpenAI-compatible
    ``POST /v1/audio/transcriptions`` (the ``openai`` ASR provider, which uploads each utterance its VAD
    cut as a 16 kHz WAV).

    For tests of the plumbing around ASR on a real-time path (a browser's capture, RTP paced by sipp):
    the audio that reaches the daemon differs from run to run there, so a real recogniser's words
    would too.  An upload with at least ``min_speech_ms`` of sound (20 ms frames above ``level`` RMS)
    is answered ``text``, at most ``answers`` times (None: always); anything else is answered "" (no
    ``asrFinal``).  Every upload is kept as int16 PCM in ``uploads``; ``answered`` fires with the
    first answered one.  Use ``asr_option`` in the call's or playbook's options.
    """

    def __init__(self, test, text: str, min_speech_ms: int = 300, level: float = 300.0,
                 answers: Optional[int] = None):
        self.text = text
        self.min_speech_ms = min_speech_ms
        self.level = level
        self.answers = answers
        self.uploads: list[np.ndarray] = []
        self.answered_uploads: list[np.ndarray] = []
        self.answered = defer.Deferred()
        self.server = HttpServer(test, self._answer)
        self.endpoint = self.server.base + "/v1"

    @property
    def asr_option(self) -> dict:
        return {"provider": "openai", "endpoint": self.endpoint, "secretKey": "sk-fake-transcriber"}

    def speech_ms(self, pcm: np.ndarray) -> int:
        from tests.helpers import loud_ms

        return loud_ms(pcm, self.level)

    def _answer(self, request, body):
        import wave

        from multipart import MultipartParser, parse_options_header

        _, params = parse_options_header(request.getHeader("content-type") or "")
        parts = {p.name: p.raw for p in MultipartParser(io.BytesIO(body), params["boundary"])}
        with wave.open(io.BytesIO(parts["file"])) as w:
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.int16)
        self.uploads.append(pcm)
        text = ""
        if self.speech_ms(pcm) >= self.min_speech_ms and (
                self.answers is None or len(self.answered_uploads) < self.answers):
            text = self.text
            self.answered_uploads.append(pcm)
            if not self.answered.called:
                self.answered.callback(pcm)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"text": text}).encode()


# -- WebSocket ----------------------------------------------------------------------------------------


class Connection:
    """One client connection as the server saw it."""

    def __init__(self, proto, request):
        self.proto = proto
        self.path = request.path
        self.query = {k: v[0] for k, v in request.params.items()}
        self.headers = dict(request.headers)  # lower-case names
        self.texts: list = []  # parsed JSON text frames, in order
        self.frames: list[tuple[bool, int]] = []  # (is_binary, size) of every message, in order
        self.audio = bytearray()
        self.closed = defer.Deferred()
        self.close_code = None
        self._waiters: list[tuple[Callable, defer.Deferred]] = []

    def send_json(self, obj) -> None:
        self.proto.sendMessage(json.dumps(obj, ensure_ascii=False).encode("utf-8"), isBinary=False)

    def send_binary(self, data: bytes) -> None:
        self.proto.sendMessage(data, isBinary=True)

    def close(self, code: int = 1000, reason: Optional[str] = None) -> None:
        """A close frame with any code (vendors use 1008/1011, which Autobahn's ``sendClose`` refuses)."""
        self.proto.sendCloseFrame(code, reason.encode("utf-8") if reason else None, isReply=False)

    def wait_for(self, predicate: Callable[["Connection"], bool]) -> defer.Deferred:
        """Fires once ``predicate(self)`` holds (checked after every message)."""
        d = defer.Deferred()
        if predicate(self):
            d.callback(self)
        else:
            self._waiters.append((predicate, d))
        return d

    def _check(self) -> None:
        waiting, self._waiters = self._waiters, []
        for predicate, d in waiting:
            if predicate(self):
                d.callback(self)
            else:
                self._waiters.append((predicate, d))


class _VendorProtocol(WebSocketServerProtocol):
    def onConnect(self, request):
        self.conn = Connection(self, request)
        self.factory.server.connections.append(self.conn)
        self.factory.server.new_connection(self.conn)
        refuse = self.factory.server.refuse
        if refuse is not None:
            refuse(self.conn)  # may raise ConnectionDeny: the HTTP status the client sees
        return None

    def onOpen(self):
        self.factory.server.opened(self.conn)

    def onMessage(self, payload, isBinary):
        conn = self.conn
        conn.frames.append((isBinary, len(payload)))
        if isBinary:
            conn.audio += payload
        else:
            conn.texts.append(json.loads(payload))
        self.factory.server.on_message(conn, payload, isBinary)
        conn._check()

    def onClose(self, wasClean, code, reason):
        conn = getattr(self, "conn", None)
        if conn is not None and not conn.closed.called:
            conn.close_code = code
            conn.closed.callback(code)


class WsServer:
    """An Autobahn server on 127.0.0.1; ``on_message(conn, payload, is_binary)`` plays the vendor."""

    def __init__(self, test, on_message: Callable, on_open: Callable = lambda conn: None,
                 refuse: Optional[Callable] = None):
        self.on_message = on_message
        self.on_open = on_open
        self.refuse = refuse
        self.connections: list[Connection] = []
        self._new: list[defer.Deferred] = []
        factory = WebSocketServerFactory("ws://127.0.0.1")
        factory.protocol = _VendorProtocol
        # no close-handshake timer: when a client aborts instead of answering our close frame, Autobahn
        # would leave that timer pending on the reactor after the test
        factory.setProtocolOptions(closeHandshakeTimeout=0)
        factory.server = self
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.base = f"ws://127.0.0.1:{self.port.getHost().port}"
        test.addCleanup(self.stop)

    def new_connection(self, conn) -> None:
        waiting, self._new = self._new, []
        for d in waiting:
            d.callback(conn)

    def opened(self, conn) -> None:
        self.on_open(conn)

    def next_connection(self) -> defer.Deferred:
        d = defer.Deferred()
        self._new.append(d)
        return d

    @defer.inlineCallbacks
    def stop(self):
        for conn in self.connections:
            if not conn.closed.called:
                conn.proto.dropConnection(abort=True)
        for conn in self.connections:
            yield conn.closed
        yield self.port.stopListening()
