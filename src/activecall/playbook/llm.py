"""An OpenAI-compatible chat completions client, streamed over SSE with treq.

Works with any server speaking the protocol (OpenAI, DashScope compatible mode, Ollama, vLLM, llama.cpp):
POST ``{baseUrl}/chat/completions`` with ``stream: true``, content deltas handed to a callback the moment
they arrive.  The returned Deferred can be cancelled at once (barge-in) and every way a request can go
wrong -- no response in time, a silent stream, an HTTP error, a broken or truncated stream -- ends in one
``LLMError`` whose message the runner can log and act on.  The API key is sent, never logged or shown.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from treq.client import HTTPClient
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from activecall.httpclient import default_http_client
from activecall.playbook.front_matter import DEFAULT_BASE_URL, DEFAULT_MODEL

log = Logger()

#: Most of an error body worth keeping in a message.
MAX_ERROR_BODY = 500


class LLMError(Exception):
    """The LLM request failed; ``status`` is the HTTP status when there was one."""

    def __init__(self, message: str, status: Optional[int] = None):
        self.message = message
        self.status = status
        super().__init__(message)


@dataclass(frozen=True)
class LLMSettings:
    base_url: str = DEFAULT_BASE_URL
    api_key: Optional[str] = field(default=None, repr=False)
    model: str = DEFAULT_MODEL
    temperature: Optional[float] = None
    max_tokens: Optional[int] = None
    connect_timeout: float = 10.0  # seconds until the response headers
    idle_timeout: float = 30.0  # seconds without a byte of the body

    @classmethod
    def from_values(
        cls,
        base_url: Optional[str] = None,
        api_key: Optional[str] = None,
        model: Optional[str] = None,
        environ: Optional[Mapping[str, str]] = None,
        **kw: Any,
    ) -> "LLMSettings":
        """Given values, else OPENAI_BASE_URL / OPENAI_API_KEY / OPENAI_MODEL, else the defaults."""
        env = os.environ if environ is None else environ
        return cls(
            base_url=base_url or env.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL,
            api_key=api_key or env.get("OPENAI_API_KEY") or None,
            model=model or env.get("OPENAI_MODEL") or DEFAULT_MODEL,
            **kw,
        )

    @classmethod
    def from_playbook(cls, llm, environ: Optional[Mapping[str, str]] = None) -> "LLMSettings":
        """From a playbook's ``LlmConfig`` (timeouts there are in milliseconds)."""
        return cls.from_values(
            llm.base_url,
            llm.api_key,
            llm.model,
            environ,
            temperature=llm.temperature,
            max_tokens=llm.max_tokens,
            connect_timeout=llm.connect_timeout_ms / 1000.0,
            idle_timeout=llm.idle_timeout_ms / 1000.0,
        )


def chat_url(base_url: str) -> str:
    """``{base}/chat/completions``, unless the URL already ends with it."""
    base = base_url.rstrip("/")
    return base if base.endswith("/chat/completions") else base + "/chat/completions"


def request_body(
    settings: LLMSettings, messages: Sequence[Mapping[str, Any]], stream: bool, tools: Optional[Sequence] = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"model": settings.model, "messages": [dict(m) for m in messages]}
    if stream:
        body["stream"] = True
    if settings.temperature is not None:
        body["temperature"] = settings.temperature
    if settings.max_tokens is not None:
        body["max_tokens"] = settings.max_tokens
    if tools:
        body["tools"] = list(tools)
    return body


# -- server-sent events ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SSEEvent:
    data: str
    event: str = "message"
    id: Optional[str] = None


class SSEParser:
    """Incremental ``text/event-stream`` parser (WHATWG rules): any line ending, comments, multi-line data,
    events and lines split anywhere across chunks."""

    def __init__(self) -> None:
        self._partial = b""
        self._data: list[str] = []
        self._event = ""
        self._id: Optional[str] = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        buf = self._partial + chunk
        start = 0
        while True:
            cr, lf = buf.find(b"\r", start), buf.find(b"\n", start)
            ends = [i for i in (cr, lf) if i != -1]
            if not ends:
                break
            end = min(ends)
            if buf[end : end + 1] == b"\r":
                if end + 1 == len(buf):
                    break  # a CR at the end of the chunk may be half of a CRLF
                step = 2 if buf[end + 1 : end + 2] == b"\n" else 1
            else:
                step = 1
            event = self._line(buf[start:end].decode("utf-8", "replace"))
            if event is not None:
                events.append(event)
            start = end + step
        self._partial = buf[start:]
        return events

    def close(self) -> list[SSEEvent]:
        """At end of stream: an event whose blank line never came is still delivered."""
        events = self.feed(b"\n") if self._partial else []
        if self._data:
            events.append(self._dispatch())
        return events

    def _line(self, line: str) -> Optional[SSEEvent]:
        if line == "":
            return self._dispatch() if self._data else self._reset()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            self._id = value
        return None

    def _reset(self) -> None:
        self._data, self._event = [], ""

    def _dispatch(self) -> SSEEvent:
        event = SSEEvent("\n".join(self._data), self._event or "message", self._id)
        self._reset()
        return event


# -- replies --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    id: Optional[str]
    name: str
    arguments: str  # JSON text, as the server sent it


@dataclass(frozen=True)
class LLMReply:
    content: str
    reasoning: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    finish_reason: Optional[str] = None


def _error_message(body: bytes) -> str:
    text = body[:MAX_ERROR_BODY].decode("utf-8", "replace").strip()
    try:
        data = json.loads(body)
    except ValueError:
        return text or "(empty body)"
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:MAX_ERROR_BODY]
        if isinstance(err, str):
            return err[:MAX_ERROR_BODY]
    return text


class _Call(protocol.Protocol):
    """One request: timers, the body, the result.  ``result`` is the Deferred handed to the caller."""

    def __init__(
        self, clock: IReactorTime, settings: LLMSettings, streaming: bool, on_delta: Optional[Callable[[str], Any]]
    ):
        self.clock = clock
        self.settings = settings
        self.streaming = streaming
        self.on_delta = on_delta
        self.result: defer.Deferred = defer.Deferred(canceller=self._cancel)
        self.request: Optional[defer.Deferred] = None
        self.timer = None
        self.status: Optional[int] = None
        self.done = False
        self.sse = SSEParser()
        self.body = b""
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.tools: dict[int, dict[str, Any]] = {}
        self.finish_reason: Optional[str] = None

    # timers

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self.timer = self.clock.callLater(seconds, self._timed_out, what, seconds)

    def _disarm(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _timed_out(self, what: str, seconds: float) -> None:
        self.timer = None
        self._fail(LLMError(f"LLM {what} timed out after {seconds:g} s"))

    # outcome

    def _abort(self) -> None:
        self._disarm()
        if self.transport is not None:
            self.transport.stopProducing()
        elif self.request is not None:  # also when paused on the connection: cancel reaches the Agent
            self.request.cancel()

    def _cancel(self, _d) -> None:
        """Barge-in: stop reading now; the caller's Deferred fails with CancelledError."""
        if not self.done:
            self.done = True
            self._abort()

    def _fail(self, error: LLMError) -> None:
        if self.done:
            return
        self.done = True
        self._abort()
        self.result.errback(error)

    def _succeed(self) -> None:
        if self.done:
            return
        self.done = True
        self._disarm()
        calls = tuple(
            ToolCall(t.get("id"), t.get("name", ""), t.get("arguments", "")) for _, t in sorted(self.tools.items())
        )
        self.result.callback(LLMReply("".join(self.content), "".join(self.reasoning), calls, self.finish_reason))

    # response

    def start(self, request: defer.Deferred) -> None:
        self.request = request
        self._arm(self.settings.connect_timeout, "response")
        request.addCallbacks(self._got_response, self._request_failed)

    def _request_failed(self, failure) -> None:
        if not self.done:
            self._fail(LLMError(f"LLM request failed: {failure.getErrorMessage() or failure.type.__name__}"))

    def _got_response(self, response) -> None:
        if self.done:
            response.deliverBody(protocol.Protocol())  # discard; the pool does not keep the connection
            return
        self.status = response.code
        self._arm(self.settings.idle_timeout, "stream")
        content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0].decode("latin-1").lower()
        if self.status == 200 and self.streaming and "application/json" in content_type:
            self.streaming = False  # the server answered in one piece: read it as a non-streaming reply
        response.deliverBody(self)

    def dataReceived(self, data: bytes) -> None:
        if self.done:
            return
        self._arm(self.settings.idle_timeout, "stream")
        if self.status != 200 or not self.streaming:
            if len(self.body) < 4 * 1024 * 1024:
                self.body += data
            return
        for event in self.sse.feed(data):
            self._event(event)
            if self.done:
                return

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        if self.done:
            return
        clean = reason.check(ResponseDone, PotentialDataLoss) is not None
        if self.status != 200:
            self._fail(LLMError(f"LLM HTTP {self.status}: {_error_message(self.body)}", self.status))
        elif not self.streaming:
            if clean:
                self._whole_body()
            else:
                self._fail(LLMError(f"LLM response broken: {reason.getErrorMessage()}"))
        else:
            for event in self.sse.close():
                self._event(event)
            if self.done:
                return
            if clean and self.finish_reason is not None:
                self._succeed()  # some servers end without [DONE]
            elif clean:
                self._fail(LLMError("LLM stream ended before [DONE]"))
            else:
                self._fail(LLMError(f"LLM stream broken: {reason.getErrorMessage()}"))

    def _whole_body(self) -> None:
        try:
            data = json.loads(self.body)
            choice = data["choices"][0]
            message = choice.get("message") or {}
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            self._fail(LLMError(f"LLM reply is not a chat completion: {_error_message(self.body)}"))
            return
        self.content.append(message.get("content") or "")
        self.reasoning.append(message.get("reasoning_content") or "")
        for i, call in enumerate(message.get("tool_calls") or []):
            fn = call.get("function") or {}
            self.tools[i] = {"id": call.get("id"), "name": fn.get("name", ""), "arguments": fn.get("arguments", "")}
        self.finish_reason = choice.get("finish_reason")
        if self.on_delta is not None and self.content[-1]:
            self._deliver(self.content[-1])
        self._succeed()

    def _event(self, event: SSEEvent) -> None:
        if event.data.strip() == "[DONE]":
            self._succeed()
            return
        try:
            data = json.loads(event.data)
        except ValueError:
            log.debug("ignoring a non-JSON SSE event: {data!r}", data=event.data[:200])
            return
        if not isinstance(data, dict):
            return
        if data.get("error"):
            self._fail(LLMError(f"LLM stream error: {_error_message(event.data.encode())}"))
            return
        for choice in data.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                self.reasoning.append(delta["reasoning_content"])
            for call in delta.get("tool_calls") or []:
                slot = self.tools.setdefault(call.get("index", 0), {"id": None, "name": "", "arguments": ""})
                fn = call.get("function") or {}
                slot["id"] = call.get("id") or slot["id"]
                slot["name"] += fn.get("name") or ""
                slot["arguments"] += fn.get("arguments") or ""
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
            if delta.get("content"):
                self.content.append(delta["content"])
                self._deliver(delta["content"])

    def _deliver(self, text: str) -> None:
        try:
            self.on_delta(text)
        except Exception:
            log.failure("LLM delta callback failed")


@implementer(IBodyProducer)
class _BytesProducer:
    """The request body, written at once: the request is then fully sent, so cancelling it aborts the
    connection straight away (a cooperative producer would leave it half-transmitted)."""

    def __init__(self, body: bytes):
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer):
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


class LLMClient:
    """Chat completions against one OpenAI-compatible endpoint.

    ``http`` is a treq ``HTTPClient`` (default: one over a non-persistent pool on the global reactor);
    ``clock`` runs the timeouts (tests pass ``task.Clock``).
    """

    def __init__(self, settings: LLMSettings, http: Optional[HTTPClient] = None, clock: Optional[IReactorTime] = None):
        from twisted.internet import reactor

        self.settings = settings
        self.clock = clock if clock is not None else reactor
        if http is None:
            http = default_http_client(reactor)
        self.http = http
        self.url = chat_url(settings.base_url)

    def stream(
        self, messages: Sequence[Mapping[str, Any]], on_delta: Callable[[str], Any], tools: Optional[Sequence] = None
    ) -> defer.Deferred:
        """Stream a reply: ``on_delta(text)`` per content delta; fires with an ``LLMReply``.

        ``.cancel()`` stops it at once (CancelledError); failures are ``LLMError``.
        """
        return self._call(messages, True, on_delta, tools)

    def complete(self, messages: Sequence[Mapping[str, Any]], tools: Optional[Sequence] = None) -> defer.Deferred:
        """A non-streaming reply (summaries, tool re-asks): fires with an ``LLMReply``."""
        return self._call(messages, False, None, tools)

    def _call(self, messages, streaming: bool, on_delta, tools) -> defer.Deferred:
        call = _Call(self.clock, self.settings, streaming, on_delta)
        accept = "text/event-stream" if streaming else "application/json"
        headers = {"Content-Type": ["application/json"], "Accept": [accept]}
        if self.settings.api_key:
            headers["Authorization"] = [f"Bearer {self.settings.api_key}"]
        body = json.dumps(request_body(self.settings, messages, streaming, tools)).encode("utf-8")
        log.debug(
            "LLM request to {url} (model {model}, {n} messages)", url=self.url, model=self.settings.model, n=len(messages)
        )
        call.start(self.http.request("POST", self.url, data=_BytesProducer(body), headers=headers, unbuffered=True))
        return call.result
