"""A client of the OpenAI Realtime API (speech to speech over one WebSocket), on Twisted.

The wire protocol is the beta ``realtime=v1`` one the original's default model
speaks (``gpt-4o-realtime-preview-2024-10-01``): JSON text frames with a
``type``.  We send ``session.update``, ``input_audio_buffer.append`` (24 kHz
pcm16, base64, 100 ms per message), ``response.create``, ``response.cancel``,
``conversation.item.create`` (function results) and
``conversation.item.truncate`` (what the caller really heard before a
barge-in); we read the speech, transcription, audio, function-call, response
and error events and hand them to a ``RealtimeHandler``.  Audio crosses the
boundary at 16 kHz both ways (``Resampler`` up, ``From24k`` down).

Where it connects (``RealtimeSettings.from_option``):

- ``openai`` (default): ``wss://api.openai.com/v1/realtime?model=<model>``,
  ``Authorization: Bearer <key>``, ``OpenAI-Beta: realtime=v1``; ``endpoint``
  replaces ``wss://api.openai.com/v1`` (http(s) becomes ws(s)).
- ``azure``: ``wss://<endpoint>/openai/realtime?api-version=2024-10-01-preview
  &deployment=<model>``, header ``api-key``.
- anything else: the provider value itself is the ws(s) URL (the original's
  ``RealtimeType::Other``), or ``endpoint`` when the provider is a plain name;
  a key, when one is given, goes as a Bearer token.

The key comes from ``secretKey`` or ``OPENAI_API_KEY`` and never appears in a
message or a log line of ours.  Timers (connect, close) run on the injected
reactor.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional
from urllib.parse import urlencode, urlsplit, urlunsplit

import numpy as np
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from activecall.audio import SAMPLE_RATE, Resampler, as_int16
from activecall.speech.base import OptionError, SpeechError
from activecall.speech.cloud import connect_websocket, credential, network_of, seconds
from activecall.speech.openai_api import SERVICE_RATE, From24k

log = Logger(namespace="activecall.speech.realtime")

DEFAULT_MODEL = "gpt-4o-realtime-preview-2024-10-01"
DEFAULT_VOICE = "alloy"
DEFAULT_BASE = "wss://api.openai.com/v1"
AZURE_API_VERSION = "2024-10-01-preview"
DEFAULT_TURN_DETECTION = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                          "silence_duration_ms": 500}
DEFAULT_TRANSCRIPTION_MODEL = "whisper-1"
CHUNK_MS = 100  # audio per input_audio_buffer.append
BACKLOG_MS = 5000  # caller audio held while connecting; older audio is dropped beyond this

#: server event names of the GA protocol mapped to the beta ones we handle
_ALIASES = {
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
}


def _ws_url(url: str) -> str:
    """``http(s)://`` -> ``ws(s)://``; a bare host gets ``wss://``."""
    if "://" not in url:
        return "wss://" + url
    scheme, rest = url.split("://", 1)
    return {"http": "ws", "https": "wss"}.get(scheme.lower(), scheme.lower()) + "://" + rest


def _with_query(url: str, **params) -> str:
    parts = urlsplit(url)
    query = parts.query
    for key, value in params.items():
        if f"{key}=" not in query:
            query = (query + "&" if query else "") + urlencode({key: value})
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


def _plain(option) -> dict:
    if option is None:
        return {}
    if hasattr(option, "to_dict"):
        return option.to_dict()
    return dict(option)


@dataclass(frozen=True)
class RealtimeSettings:
    """Everything one connection needs, checked up front (bad options fail before any network)."""

    provider: str
    url: str
    headers: Mapping[str, str] = field(repr=False)
    model: str
    voice: str = DEFAULT_VOICE
    instructions: Optional[str] = None
    turn_detection: Any = None
    tools: tuple = ()
    transcription: Optional[dict] = None
    temperature: Optional[float] = None
    connect_timeout: float = 10.0
    close_timeout: float = 5.0
    builtin_tools: bool = True

    @classmethod
    def from_option(cls, option, env: Mapping[str, str] = os.environ) -> "RealtimeSettings":
        """From a ``RealtimeOption`` (or its JSON): raises ``OptionError`` naming the key."""
        o = _plain(option)
        extra = {str(k): v for k, v in (o.get("extra") or {}).items()}
        provider = str(o.get("provider") or "openai")
        model = str(o.get("model") or DEFAULT_MODEL)
        key = o.get("secretKey") or o.get("apiKey")
        endpoint = o.get("endpoint")
        kind = provider.lower()
        if kind == "openai":
            token = credential(key, "OPENAI_API_KEY", "secretKey", "realtime openai", env)
            parts = urlsplit(_ws_url(str(endpoint)) if endpoint else DEFAULT_BASE)
            path = parts.path.rstrip("/")
            if not path.endswith("/realtime"):
                path += "/realtime"
            url = _with_query(urlunsplit((parts.scheme, parts.netloc, path, parts.query, "")), model=model)
            headers = {"Authorization": f"Bearer {token}", "OpenAI-Beta": "realtime=v1"}
        elif kind == "azure":
            if not endpoint:
                raise OptionError("realtime.endpoint: provider 'azure' needs the resource endpoint "
                                  "(https://<resource>.openai.azure.com)")
            token = credential(key, "OPENAI_API_KEY", "secretKey", "realtime azure", env)
            base = _ws_url(str(endpoint)).rstrip("/")
            if not base.endswith("/openai/realtime"):
                base += "/openai/realtime"
            url = _with_query(base, **{"api-version": str(extra.get("api_version") or AZURE_API_VERSION),
                                       "deployment": model})
            headers = {"api-key": token}
        else:
            target = provider if "://" in provider else endpoint
            if not target:
                raise OptionError(f"realtime.provider: {provider!r} is neither openai, azure nor a ws(s):// URL "
                                  "(and no endpoint is given)")
            url = _ws_url(str(target))
            if not url.startswith(("ws://", "wss://")):
                raise OptionError(f"realtime.provider: {provider!r} is not a ws(s):// URL")
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            kind = "other"
        turn = o.get("turnDetection", None)
        if turn is None:
            turn = dict(DEFAULT_TURN_DETECTION)
        elif turn is False or (isinstance(turn, str) and turn.lower() in ("none", "null", "off", "false")):
            turn = None  # sent as null: no server VAD, the application commits turns itself
        elif not isinstance(turn, dict):
            raise OptionError(f"realtime.turnDetection: expected an object, got {type(turn).__name__}")
        tools = o.get("tools") or ()
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or not tool.get("name"):
                raise OptionError(f"realtime.tools[{i}]: expected a function definition with a name")
        transcription_model = str(extra.get("transcription_model") or DEFAULT_TRANSCRIPTION_MODEL)
        transcription = None
        if transcription_model.lower() not in ("none", "off", "false"):
            transcription = {"model": transcription_model}
            if extra.get("language"):
                transcription["language"] = str(extra["language"])
        temperature = None
        if extra.get("temperature") not in (None, ""):
            try:
                temperature = float(extra["temperature"])
            except (TypeError, ValueError):
                raise OptionError(f"realtime.extra.temperature: a number expected, got {extra['temperature']!r}") \
                    from None
        timeouts = {k: str(v) for k, v in extra.items() if k in ("connect_timeout", "close_timeout")}
        return cls(
            provider=kind, url=url, headers=headers, model=model,
            voice=str(extra.get("voice") or DEFAULT_VOICE),
            instructions=str(extra["instructions"]) if extra.get("instructions") else None,
            turn_detection=turn, tools=tuple(tools), transcription=transcription, temperature=temperature,
            connect_timeout=seconds(timeouts, "connect_timeout", 10, "realtime"),
            close_timeout=seconds(timeouts, "close_timeout", 5, "realtime"),
            builtin_tools=str(extra.get("builtin_tools", "true")).lower() not in ("false", "0", "no", "off"),
        )

    def session(self, instructions: Optional[str] = None, extra_tools=()) -> dict:
        """The ``session`` object of ``session.update``: the given tools first, then ``extra_tools``
        whose names the given ones do not already define (the application's definition wins)."""
        names = {t.get("name") for t in self.tools}
        tools = [dict(t) for t in self.tools] + [dict(t) for t in extra_tools if t.get("name") not in names]
        session = {
            "modalities": ["text", "audio"],
            "voice": self.voice,
            "input_audio_format": "pcm16",
            "output_audio_format": "pcm16",
            "input_audio_transcription": self.transcription,
            "turn_detection": self.turn_detection,
            "tools": tools,
            "tool_choice": "auto" if tools else "none",
        }
        text = instructions if instructions is not None else self.instructions
        if text:
            session["instructions"] = text
        if self.temperature is not None:
            session["temperature"] = self.temperature
        return session


class RealtimeHandler:
    """What a ``RealtimeClient`` tells its owner (no-ops here; override what you need).

    ``*_ms`` values are the service's milliseconds of caller audio since the session began.
    """

    def speech_started(self, audio_start_ms: Optional[int], item_id: Optional[str]) -> None:
        """The service's VAD heard the caller start (barge-in point)."""

    def speech_stopped(self, audio_end_ms: Optional[int], item_id: Optional[str]) -> None:
        """The caller stopped; the service commits the turn and (by default) answers."""

    def user_transcript(self, item_id: Optional[str], text: str) -> None:
        """The caller's turn, transcribed."""

    def response_started(self, response_id: str) -> None:
        """The model began a response."""

    def audio(self, response_id: str, item_id: Optional[str], pcm: np.ndarray) -> None:
        """Bot speech, 16 kHz int16, as it streams."""

    def audio_done(self, response_id: str, item_id: Optional[str]) -> None:
        """The audio of one output item is complete."""

    def transcript_delta(self, response_id: str, item_id: Optional[str], text: str) -> None:
        """A piece of what the bot says."""

    def transcript_done(self, response_id: str, item_id: Optional[str], text: str) -> None:
        """All of what the bot said in one output item."""

    def function_call(self, call_id: str, name: str, arguments: str) -> None:
        """The model calls a tool; answer with ``RealtimeClient.function_output``."""

    def response_done(self, response_id: str, status: Optional[str]) -> None:
        """A response ended (``completed``, ``cancelled``, ``incomplete``, ``failed``)."""

    def failed(self, message: str, fatal: bool, code: Optional[int] = None) -> None:
        """An error: ``fatal`` means the connection is gone (no reconnect)."""


class RealtimeClient:
    """One Realtime session over one WebSocket.

    ``connect()`` opens it and sends ``session.update``; events sent before the
    socket is open are queued in order, caller audio up to ``BACKLOG_MS``.
    """

    def __init__(self, settings: RealtimeSettings, handler: RealtimeHandler, reactor=None, network=None,
                 instructions: Optional[str] = None, extra_tools=()):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.network = network or network_of(reactor)
        self.settings = settings
        self.handler = handler
        self.instructions = instructions
        self.extra_tools = tuple(extra_tools)
        self.state = "idle"  # idle, connecting, open, closing, closed, failed
        self.session_id: Optional[str] = None
        self.response_id: Optional[str] = None  # the response in progress
        self.sent_audio_bytes = 0
        self._ws = None
        self._connecting: Optional[defer.Deferred] = None
        self._timer = None
        self._queue: list[dict] = []
        self._pending = bytearray()  # 24 kHz pcm16 not yet sent
        self._up = Resampler(SAMPLE_RATE, SERVICE_RATE)
        self._down: dict[str, From24k] = {}  # per response: its own delay line
        self._closers: list[defer.Deferred] = []
        self._opened: list[defer.Deferred] = []

    # -- the connection ---------------------------------------------------------------------------

    def connect(self) -> defer.Deferred:
        """Fires once the socket is open and ``session.update`` went out; fails with ``SpeechError``."""
        d = defer.Deferred()
        if self.state == "open":
            d.callback(self)
            return d
        if self.state in ("closing", "closed", "failed"):
            d.errback(SpeechError("realtime: the session is over"))
            return d
        self._opened.append(d)
        if self.state == "idle":
            self.state = "connecting"
            timeout = self.settings.connect_timeout
            self._timer = self.reactor.callLater(timeout, self._connect_timed_out)
            self._connecting = connect_websocket(self.network, self.settings.url, dict(self.settings.headers), self,
                                                 timeout=timeout)
            self._connecting.addCallbacks(self._on_open, self._on_connect_failed)
        return d

    def _connect_timed_out(self) -> None:
        self._timer = None
        host = urlsplit(self.settings.url).netloc
        self._fail(SpeechError(f"realtime: no connection to {host} within {self.settings.connect_timeout:g} s"))

    def _on_open(self, ws) -> None:
        self._connecting = None
        self._stop_timer()
        if self.state != "connecting":  # closed meanwhile
            ws.dropConnection(abort=True)
            return
        self._ws = ws
        self.state = "open"
        log.info("realtime session open ({provider}, model {model})", provider=self.settings.provider,
                 model=self.settings.model)
        self._send({"type": "session.update", "session": self.settings.session(self.instructions, self.extra_tools)})
        queued, self._queue = self._queue, []
        for event in queued:
            self._send(event)
        self._flush()
        opened, self._opened = self._opened, []
        for d in opened:
            d.callback(self)

    def _on_connect_failed(self, failure) -> None:
        self._connecting = None
        if self.state != "connecting":
            return
        self._fail(failure)

    def close(self) -> defer.Deferred:
        """End the session: a close frame, then the socket goes (aborted after ``close_timeout``)."""
        d = defer.Deferred()
        if self.state in ("idle", "closed", "failed"):
            self.state = "closed" if self.state == "idle" else self.state
            d.callback(None)
            return d
        self._closers.append(d)
        if self.state == "connecting":
            self.state = "closed"
            self._stop_timer()
            self._abandon_openers(SpeechError("realtime: closed before the connection was up"))
            if self._connecting is not None:
                connecting, self._connecting = self._connecting, None
                connecting.cancel()
            self._release()
        elif self.state == "open":
            self.state = "closing"
            self._timer = self.reactor.callLater(self.settings.close_timeout, self._close_timed_out)
            self._ws.sendClose(1000)
        return d

    def _close_timed_out(self) -> None:
        self._timer = None
        log.warn("realtime: the service did not close within {t:g} s; connection dropped",
                 t=self.settings.close_timeout)
        if self._ws is not None:
            pending = getattr(self._ws, "closeHandshakeTimeoutCall", None)
            if pending is not None:  # Autobahn's own wait for the same answer, on the global reactor
                pending.cancel()
                self._ws.closeHandshakeTimeoutCall = None
            self._ws.dropConnection(abort=True)
        else:
            self._release()

    def _fail(self, reason) -> None:
        if self.state in ("closed", "failed"):
            return
        failure = reason if isinstance(reason, Failure) else Failure(reason)
        if not failure.check(SpeechError):
            failure = Failure(SpeechError(f"realtime: {failure.getErrorMessage()}"))
        message = str(failure.value)
        if not message.startswith("realtime"):
            message = f"realtime: {message}"
        self.state = "failed"
        self._stop_timer()
        log.error("{message}", message=message)
        self._tell("failed", message, True, 500)
        self._abandon_openers(SpeechError(message))
        if self._connecting is not None:
            connecting, self._connecting = self._connecting, None
            connecting.cancel()
        if self._ws is not None and self._ws.transport is not None:
            self._ws.dropConnection(abort=True)
        else:
            self._release()

    def _abandon_openers(self, error: Exception) -> None:
        opened, self._opened = self._opened, []
        for d in opened:
            d.errback(error)

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _release(self) -> None:
        self._ws = None
        closers, self._closers = self._closers, []
        for d in closers:
            d.callback(None)

    # the handler interface of connect_websocket
    def ws_closed(self, was_clean: bool, code, reason) -> None:
        if self.state == "open":
            self._fail(SpeechError(f"realtime: the service closed the connection ({code}: {reason})"))
        elif self.state == "closing":
            self.state = "closed"
        self._stop_timer()
        self._release()

    # -- sending -------------------------------------------------------------------------------------

    def _can_send(self) -> bool:
        from autobahn.websocket.protocol import WebSocketProtocol
        return self._ws is not None and self.state == "open" and self._ws.state == WebSocketProtocol.STATE_OPEN

    def _send(self, event: dict) -> None:
        if self._can_send():
            self._ws.sendMessage(json.dumps(event, ensure_ascii=False).encode("utf-8"), isBinary=False)

    def send(self, event: dict) -> None:
        """Any client event; queued while connecting, dropped once the session is over."""
        if self.state in ("idle", "connecting"):
            self._queue.append(event)
        elif self.state == "open":
            self._send(event)

    def feed(self, pcm) -> None:
        """Caller audio, 16 kHz int16 frames of any length."""
        if self.state not in ("idle", "connecting", "open"):
            return
        up = self._up(as_int16(pcm))
        self._pending += up.astype("<i2").tobytes()
        if self.state == "open":
            self._flush()
        else:
            excess = len(self._pending) - BACKLOG_MS * SERVICE_RATE // 1000 * 2
            if excess > 0:
                del self._pending[:excess - excess % 2]

    def _flush(self) -> None:
        size = CHUNK_MS * SERVICE_RATE // 1000 * 2
        while len(self._pending) >= size and self._can_send():
            chunk = bytes(self._pending[:size])
            del self._pending[:size]
            self._send({"type": "input_audio_buffer.append", "audio": base64.b64encode(chunk).decode("ascii")})
            self.sent_audio_bytes += len(chunk)

    def update_session(self, instructions: Optional[str] = None, extra_tools=None) -> None:
        """A new ``session.update`` (a playbook's scene switch: new instructions, maybe other tools)."""
        if instructions is not None:
            self.instructions = instructions
        if extra_tools is not None:
            self.extra_tools = tuple(extra_tools)
        if self.state == "open":
            self._send({"type": "session.update",
                        "session": self.settings.session(self.instructions, self.extra_tools)})
        # before the socket is open the first session.update carries the new values anyway

    def create_response(self, instructions: Optional[str] = None) -> None:
        """Ask the model to speak now (a greeting, a follow-up, after a function result)."""
        event: dict = {"type": "response.create"}
        if instructions:
            event["response"] = {"instructions": instructions}
        self.send(event)

    def cancel_response(self) -> None:
        """Stop the response in progress, if there is one (the service refuses a cancel without one)."""
        if self.response_id is not None:
            self.send({"type": "response.cancel"})

    def truncate(self, item_id: str, audio_end_ms: int) -> None:
        """The caller heard ``item_id`` only up to ``audio_end_ms``: the model forgets the rest."""
        self.send({"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0,
                   "audio_end_ms": max(0, int(audio_end_ms))})

    def function_output(self, call_id: str, output, respond: bool = True) -> None:
        """The result of a tool call; ``respond`` asks the model to go on speaking."""
        text = output if isinstance(output, str) else json.dumps(output, ensure_ascii=False)
        self.send({"type": "conversation.item.create",
                   "item": {"type": "function_call_output", "call_id": call_id, "output": text}})
        if respond:
            self.create_response()

    # -- receiving -----------------------------------------------------------------------------------

    def ws_message(self, payload: bytes, is_binary: bool) -> None:
        if self.state not in ("open", "closing"):
            return
        if is_binary:
            log.debug("realtime: binary frame of {n} bytes ignored", n=len(payload))
            return
        try:
            event = json.loads(payload)
            kind = event.get("type")
        except (ValueError, AttributeError):
            log.warn("realtime: a frame that is not a JSON object was ignored")
            return
        kind = _ALIASES.get(kind, kind)
        method = getattr(self, "_on_" + str(kind).replace(".", "_"), None)
        if method is None:
            return
        try:
            method(event)
        except Exception:
            log.failure("realtime: handling {kind} failed", kind=kind)

    def _tell(self, name: str, *args) -> None:
        try:
            getattr(self.handler, name)(*args)
        except Exception:
            log.failure("realtime handler {name} failed", name=name)

    def _on_session_created(self, event) -> None:
        self.session_id = (event.get("session") or {}).get("id")

    def _on_input_audio_buffer_speech_started(self, event) -> None:
        self._tell("speech_started", event.get("audio_start_ms"), event.get("item_id"))

    def _on_input_audio_buffer_speech_stopped(self, event) -> None:
        self._tell("speech_stopped", event.get("audio_end_ms"), event.get("item_id"))

    def _on_conversation_item_input_audio_transcription_completed(self, event) -> None:
        self._tell("user_transcript", event.get("item_id"), str(event.get("transcript") or "").strip())

    def _on_conversation_item_input_audio_transcription_failed(self, event) -> None:
        error = event.get("error") or {}
        self._tell("failed", f"realtime: transcription failed: {error.get('message') or 'no message'}", False, 500)

    def _on_response_created(self, event) -> None:
        self.response_id = (event.get("response") or {}).get("id") or "response"
        self._tell("response_started", self.response_id)

    def _response_of(self, event) -> str:
        return event.get("response_id") or self.response_id or "response"

    def _on_response_audio_delta(self, event) -> None:
        try:
            data = base64.b64decode(event.get("delta") or "", validate=True)
        except (binascii.Error, ValueError):
            self._tell("failed", "realtime: an audio delta that is not base64 was dropped", False, 500)
            return
        response = self._response_of(event)
        down = self._down.get(response)
        if down is None:
            down = self._down[response] = From24k()
        pcm = down(np.frombuffer(data[:len(data) - len(data) % 2], dtype="<i2"))
        if pcm.size:
            self._tell("audio", response, event.get("item_id"), pcm)

    def _on_response_audio_done(self, event) -> None:
        response = self._response_of(event)
        down = self._down.pop(response, None)
        if down is not None:
            tail = down.flush()
            if tail.size:
                self._tell("audio", response, event.get("item_id"), tail)
        self._tell("audio_done", response, event.get("item_id"))

    def _on_response_audio_transcript_delta(self, event) -> None:
        self._tell("transcript_delta", self._response_of(event), event.get("item_id"), str(event.get("delta") or ""))

    def _on_response_audio_transcript_done(self, event) -> None:
        self._tell("transcript_done", self._response_of(event), event.get("item_id"),
                   str(event.get("transcript") or ""))

    def _on_response_function_call_arguments_done(self, event) -> None:
        self._tell("function_call", str(event.get("call_id") or ""), str(event.get("name") or ""),
                   str(event.get("arguments") or "{}"))

    def _on_response_done(self, event) -> None:
        response = event.get("response") or {}
        rid = response.get("id") or self.response_id or "response"
        self._down.pop(rid, None)
        if self.response_id == rid or response.get("id") is None:
            self.response_id = None
        status = response.get("status")
        if status == "failed":
            details = (response.get("status_details") or {}).get("error") or {}
            self._tell("failed", f"realtime: the response failed: {details.get('message') or details or 'no reason'}",
                       False, 500)
        self._tell("response_done", rid, status)

    def _on_error(self, event) -> None:
        error = event.get("error") or {}
        code = error.get("code")
        if code == "response_cancel_not_active":
            return  # a cancel that crossed the response's end: nothing to report
        kind = error.get("type") or "error"
        message = error.get("message") or "no message"
        status = 400 if kind == "invalid_request_error" else 500
        self._tell("failed", f"realtime {kind}{f' ({code})' if code else ''}: {message}", False, status)

