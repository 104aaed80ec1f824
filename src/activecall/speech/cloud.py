"""What the cloud speech clients share: credentials, a WebSocket connection, streaming recognition, PCM bodies.

- ``credential``: an option value or its environment variable; missing, an
  ``OptionError`` naming both (never the value: keys stay out of messages and logs).
- ``connect_websocket``: an Autobahn client over a Twisted endpoint (TLS for
  ``wss``) on an injected reactor; a Deferred firing with the open protocol, or
  a ``SpeechError`` carrying the HTTP status of a refused upgrade.
- ``CloudRecognizer``: one vendor WebSocket per audio stream, opened on the
  first frame (audio is held until the vendor is ready), audio sent in
  fixed-size binary chunks, the vendor's sentence results turned into
  ``AsrResult``s, a clean end on ``close()``.  Each vendor module only says how
  to open the stream, what to send at its start and end, and how to read its
  messages.
- ``PcmBody``: a streamed HTTP body of s16le PCM pushed to a sink as it arrives.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Callable, Mapping, Optional

import numpy as np
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.util import parse_url
from twisted.internet import defer, protocol
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTCP
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from activecall.audio import SAMPLE_RATE, as_int16, parse_wav_header
from activecall.speech.asr.base import report_error
from activecall.speech.base import AsrOptions, AsrResult, OptionError, SpeechError, synthesis

log = Logger(namespace="activecall.speech.cloud")


def credential(value: Optional[str], variable: str, option: str, provider: str,
               env: Mapping[str, str] = os.environ) -> str:
    """``value`` or ``env[variable]``; the error names the option and the variable, not the value."""
    found = value or env.get(variable)
    if not found:
        raise OptionError(f"provider {provider!r} needs {option} in its options or the environment "
                          f"variable {variable}")
    return found


def network_of(reactor):
    """The reactor to open connections on: ``reactor`` itself unless it is only a clock (tests)."""
    if reactor is not None and IReactorTCP.providedBy(reactor):
        return reactor
    from twisted.internet import reactor as global_reactor
    return global_reactor


def flag(value: str, key: str):
    """An ``extra`` string as the JSON value a vendor expects: true/false, an int, a float, or the text."""
    low = value.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def seconds(extra: Mapping[str, str], key: str, default: float, where: str) -> float:
    try:
        return float(extra.get(key, default))
    except ValueError:
        raise OptionError(f"{where}.extra.{key}: seconds expected, got {extra[key]!r}") from None


# -- WebSocket ----------------------------------------------------------------------------------


class _ClientProtocol(WebSocketClientProtocol):
    def onOpen(self):
        self.factory.opened(self)

    def onMessage(self, payload, isBinary):
        self.factory.handler.ws_message(payload, isBinary)

    def onClose(self, wasClean, code, reason):
        self.factory.closed(self, wasClean, code, reason)


class _ClientFactory(WebSocketClientFactory):
    protocol = _ClientProtocol

    def __init__(self, url, headers, handler, ready: defer.Deferred):
        super().__init__(url, headers=headers)
        self.handler = handler
        self.ready = ready
        self.is_open = False

    def opened(self, proto) -> None:
        self.is_open = True
        ready, self.ready = self.ready, None
        if ready is not None:
            ready.callback(proto)

    def closed(self, proto, was_clean, code, reason) -> None:
        ready, self.ready = self.ready, None
        if ready is not None:  # never opened: the upgrade was refused or the connection dropped
            ready.errback(SpeechError(f"WebSocket handshake failed: {reason or code}"))
        elif self.is_open:
            self.handler.ws_closed(was_clean, code, reason)


def connect_websocket(reactor, url: str, headers: dict, handler, timeout: float = 10.0) -> defer.Deferred:
    """Open ``url``; a Deferred of the protocol once the upgrade succeeded.

    ``handler`` gets ``ws_message(payload, is_binary)`` and, once open,
    ``ws_closed(was_clean, code, reason)``.  Cancelling drops the attempt.
    """
    secure, host, port, _resource, _path, _params = parse_url(url)
    state = {"proto": None}

    def cancel(_):
        factory.ready = None
        if state["proto"] is not None and state["proto"].transport is not None:
            state["proto"].transport.abortConnection()
        elif not connecting.called:
            connecting.cancel()

    ready = defer.Deferred(cancel)
    factory = _ClientFactory(url, headers, handler, ready)
    factory.setProtocolOptions(openHandshakeTimeout=timeout, closeHandshakeTimeout=5)
    endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    if secure:
        from twisted.internet.ssl import optionsForClientTLS
        endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
    connecting = endpoint.connect(factory)

    def connected(proto):
        state["proto"] = proto

    def not_connected(f):
        if factory.ready is not None:
            factory.ready = None
            if f.check(defer.CancelledError):
                ready.errback(f)
            else:
                ready.errback(SpeechError(f"cannot connect to {host}:{port}: {f.getErrorMessage()}"))

    connecting.addCallbacks(connected, not_connected)
    return ready


# -- streaming recognition ------------------------------------------------------------------------


class CloudRecognizer:
    """One vendor WebSocket per stream; subclasses fill in the vendor protocol.

    Subclass hooks: ``_request() -> (url, headers)``, ``_on_open()`` (call
    ``_ready()`` when audio may flow), ``_on_message(payload, is_binary)``,
    ``_send_end()`` (then call ``_finished()`` when the vendor confirms).
    Errors go to the log as ``SpeechError``, to ``on_error`` (the call's ``error``
    event), and stop this stream's recognition.
    """

    on_error = None  # set by the call: callable(message)

    name = "cloud"
    chunk_ms = 100  # audio per binary message
    backlog_ms = 15000  # audio held while connecting; older audio is dropped beyond this

    def __init__(self, options: AsrOptions, on_result: Callable[[AsrResult], None], reactor=None,
                 network=None, **_):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.network = network or network_of(reactor)
        self.options = options
        self.on_result = on_result
        self.connect_timeout = seconds(options.extra, "connect_timeout", 10, "asr")
        self.close_timeout = seconds(options.extra, "close_timeout", 10, "asr")
        self.state = "idle"  # idle, connecting, starting, open, closing, done, failed
        self.closed = False
        self.error: Optional[SpeechError] = None
        self._ws = None
        self._connecting: Optional[defer.Deferred] = None
        self._pending = bytearray()
        self._fed = 0
        self._times: deque = deque()  # (samples fed up to here, reactor.seconds() then)
        self._answered: set = set()
        self._last_end_ms = 0
        self._closers: list[defer.Deferred] = []
        self._timer = None
        self._gone = False  # the socket is closed
        self.sent_bytes = 0

    # -- the IStreamingRecognizer surface -------------------------------------------------------

    def feed(self, pcm) -> None:
        if self.closed or self.state in ("done", "failed"):
            return
        pcm = as_int16(pcm)
        self._fed += pcm.size
        now = self.reactor.seconds()
        self._times.append((self._fed, now))
        while len(self._times) > 1 and now - self._times[0][1] > 300:
            self._times.popleft()
        self._pending += pcm.astype("<i2").tobytes()
        if self.state == "idle":
            self._connect()
        if self.state == "open":
            self._flush()
        else:
            excess = len(self._pending) - self.backlog_ms * SAMPLE_RATE // 1000 * 2
            if excess > 0:
                del self._pending[:excess]

    def end_utterance(self) -> None:
        """The session's VAD heard the end of speech; vendors that can be told so override this."""

    def close(self) -> defer.Deferred:
        """Send the rest, end the vendor stream; fires once its last result was delivered."""
        d = defer.Deferred()
        if self.state in ("idle", "done", "failed"):
            self.closed = True
            if self.state == "idle":
                self.state = "done"
            d.callback(None)
            return d
        self._closers.append(d)
        if not self.closed:
            self.closed = True
            if self.state == "open":
                self._end()
        return d

    # -- the connection --------------------------------------------------------------------------

    def _connect(self) -> None:
        self.state = "connecting"
        url, headers = self._request()
        self._connecting = connect_websocket(self.network, url, headers, self, timeout=self.connect_timeout)
        self._connecting.addCallbacks(self._opened, self._fail)

    def _opened(self, ws) -> None:
        self._connecting = None
        self._ws = ws
        self.state = "starting"
        self._on_open()

    def _ready(self) -> None:
        """The vendor accepts audio now."""
        if self.state != "starting":
            return
        self.state = "open"
        self._flush()
        if self.closed:
            self._end()

    def _can_send(self) -> bool:
        """False once a close frame came or went: Autobahn refuses to send then."""
        from autobahn.websocket.protocol import WebSocketProtocol
        return self._ws is not None and not self._gone and self._ws.state == WebSocketProtocol.STATE_OPEN

    def _flush(self, everything: bool = False) -> None:
        size = self.chunk_ms * SAMPLE_RATE // 1000 * 2
        if not self._can_send():
            return
        while len(self._pending) >= size or (everything and self._pending):
            chunk = bytes(self._pending[:size])
            del self._pending[:size]
            self._ws.sendMessage(chunk, isBinary=True)
            self.sent_bytes += len(chunk)
            self._audio_sent()

    def _audio_sent(self) -> None:
        """Hook: audio just went out (keep-alive bookkeeping)."""

    def _send_json(self, obj) -> None:
        import json
        if not self._can_send():
            return
        self._ws.sendMessage(json.dumps(obj, ensure_ascii=False).encode("utf-8"), isBinary=False)

    def _end(self) -> None:
        self._flush(everything=True)
        self.state = "closing"
        self._timer = self.reactor.callLater(self.close_timeout, self._close_timed_out)
        self._send_end()

    def _close_timed_out(self) -> None:
        self._timer = None
        self._fail(SpeechError(f"{self.name}: no end of stream from the service within {self.close_timeout:g} s"))

    def _finished(self) -> None:
        """The vendor confirmed the end of the stream: close the socket; closers fire when it is gone."""
        if self.state in ("done", "failed"):
            return
        self.state = "done"
        self._stop()
        if self._ws is not None and not self._gone:
            self._ws.sendClose(1000)
        else:
            self._release()

    def _fail(self, reason) -> None:
        if self.state in ("done", "failed"):
            return
        failure = reason if isinstance(reason, Failure) else Failure(reason)
        if failure.check(defer.CancelledError):
            failure = Failure(SpeechError(f"{self.name}: connection attempt cancelled"))
        elif not failure.check(SpeechError):
            failure = Failure(SpeechError(f"{self.name}: {failure.getErrorMessage()}"))
        self.error = failure.value
        self.state = "failed"
        self._stop()
        log.failure("asr {name} failed", failure, name=self.name)
        message = str(failure.value)
        report_error(self, message if message.startswith(self.name) else f"{self.name}: {message}")
        if self._connecting is not None:
            connecting, self._connecting = self._connecting, None
            connecting.cancel()
            self._release()
        elif self._ws is not None and not self._gone:
            self._ws.dropConnection(abort=True)
        else:
            self._release()

    def _stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _release(self) -> None:
        self._ws = None
        closers, self._closers = self._closers, []
        for d in closers:
            d.callback(None)

    # the handler interface of connect_websocket
    def ws_message(self, payload: bytes, is_binary: bool) -> None:
        if self.state in ("done", "failed"):
            return
        try:
            self._on_message(payload, is_binary)
        except SpeechError as e:
            self._fail(e)
        except Exception:
            self._fail(Failure())

    def ws_closed(self, was_clean: bool, code, reason) -> None:
        self._gone = True
        if self.state not in ("done", "failed"):
            self._closed_by_peer(was_clean, code, reason)
        if self.state not in ("done", "failed"):
            self._fail(SpeechError(f"{self.name}: the service closed the connection ({code}: {reason})"))
        self._release()

    def _closed_by_peer(self, was_clean: bool, code, reason) -> None:
        """Hook: the vendor closed the socket before we were done (some end streams that way)."""

    # -- results ------------------------------------------------------------------------------------

    def _fed_at(self, ms: int) -> Optional[float]:
        """``reactor.seconds()`` when the sample at stream time ``ms`` was fed."""
        sample = ms * SAMPLE_RATE // 1000
        for end, when in self._times:
            if end > sample:
                return when
        return self._times[-1][1] if self._times else None

    def _result(self, index: int, text: str, final: bool, start_ms: Optional[int], end_ms: Optional[int],
                confidence: Optional[float] = None) -> None:
        if start_ms is None:
            start_ms = self._last_end_ms
        ttfb = None
        if index not in self._answered:
            self._answered.add(index)
            fed = self._fed_at(start_ms)
            if fed is not None:
                ttfb = max(0, int(round((self.reactor.seconds() - fed) * 1000)))
        if final and end_ms is not None:
            self._last_end_ms = end_ms
        result = AsrResult(index=index, text=text, final=final, start_ms=start_ms, end_ms=end_ms,
                           ttfb_ms=ttfb, confidence=confidence)
        try:
            self.on_result(result)
        except Exception:
            log.failure("ASR result handler failed on {result!r}", result=result)

    # -- vendor hooks ----------------------------------------------------------------------------------

    def _request(self) -> tuple[str, dict]:
        raise NotImplementedError

    def _on_open(self) -> None:
        self._ready()

    def _on_message(self, payload: bytes, is_binary: bool) -> None:
        raise NotImplementedError

    def _send_end(self) -> None:
        raise NotImplementedError


# -- streamed PCM bodies ----------------------------------------------------------------------------


class PcmBody(protocol.Protocol):
    """An HTTP response body of s16le PCM: whole samples to ``sink`` as they arrive (``convert`` may resample).

    ``convert`` may have ``flush()``, called at the end of the body for its last samples.
    ``done`` fires with the sample count; cancelling it aborts the transfer
    and nothing more reaches the sink.  A RIFF header at the start is
    skipped, for services that wrap raw PCM in a streaming WAV.
    """

    def __init__(self, sink, convert=None):
        self.sink = sink
        self.done = defer.Deferred(self._abort)
        self.convert = convert
        self.buffer = b""
        self.header_checked = False
        self.samples = 0

    def _abort(self, _) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        data = self.buffer + data
        if not self.header_checked:
            if len(data) < 44 and b"RIFF".startswith(data[:4]):
                self.buffer = data
                return
            self.header_checked = True
            if data[:4] == b"RIFF":
                fmt = parse_wav_header(data)
                if fmt is None:
                    self.header_checked = False
                    self.buffer = data
                    return
                data = data[fmt.data_offset:]
        cut = len(data) - len(data) % 2
        self.buffer = data[cut:]
        if cut:
            self.push(np.frombuffer(data[:cut], dtype="<i2").astype(np.int16))

    def push(self, pcm: np.ndarray) -> None:
        if self.convert is not None:
            pcm = self.convert(pcm)
        if pcm.size:
            self.samples += pcm.size
            self.sink(pcm)

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        if self.done.called:  # cancelled: the transfer was aborted
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            flush = getattr(self.convert, "flush", None)
            if flush is not None:  # a resampler's delay line still holds the last milliseconds
                tail = flush()
                if tail.size:
                    self.samples += tail.size
                    self.sink(tail)
            self.done.callback(self.samples)
        else:
            self.done.errback(SpeechError(f"audio stream broke off: {reason.getErrorMessage()}"))


def post_streaming_pcm(http, url: str, headers: dict, body: bytes, sink, describe_error, convert=None,
                       timeout: float = 30) -> defer.Deferred:
    """POST and push the PCM body to ``sink`` as it streams; a Deferred of the sample count.

    A non-200 answer fails with ``describe_error(status, body)``.  Cancelling
    aborts the request or the transfer (``base.synthesis``); no chunk reaches
    the sink afterwards.
    """

    @defer.inlineCallbacks
    def run(deliver):
        try:
            response = yield http.post(url, headers=headers, data=body, timeout=timeout)
            if response.code != 200:
                content = yield response.content()
                raise SpeechError(describe_error(response.code, content))
            stream = PcmBody(deliver, convert)
            response.deliverBody(stream)
            samples = yield stream.done
        except SpeechError:
            raise
        except Exception:
            raise SpeechError(f"request failed: {Failure().getErrorMessage()}") from None
        return samples

    return synthesis(run, sink)


def json_error_text(status: int, content: bytes, *keys: str) -> str:
    """``HTTP <status>: <message>`` with the vendor's message from the first JSON key present."""
    import json
    message = None
    try:
        doc = json.loads(content)
        for key in keys:
            value = doc
            for part in key.split("."):
                value = value[part]
            if value:
                message = str(value)
                break
    except (ValueError, KeyError, TypeError, IndexError):
        pass
    if message is None:
        message = content[:200].decode("utf-8", "replace").strip() or "no message"
    return f"HTTP {status}: {message}"
