"""The OpenAI Realtime client against a local Autobahn server speaking the Realtime protocol (beta, realtime=v1):
what we send (URL, headers, session.update, 24 kHz audio in 100 ms base64 chunks, function results, cancel,
truncate, close), how the server's events reach the handler (16 kHz audio), errors, timeouts on task.Clock."""

from __future__ import annotations

import base64

import numpy as np
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import defer, protocol, reactor, task
from twisted.trial import unittest

from activecall.speech.base import OptionError
from activecall.speech.realtime_openai import (
    DEFAULT_MODEL, DEFAULT_TURN_DETECTION, RealtimeClient, RealtimeHandler, RealtimeSettings,
)
from activecall.speech.testing import frames
from tests.cloud_helpers import WsServer, tone

KEY = "sk-realtime-secret"


def dominant_hz(pcm: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float64)))
    return float(np.argmax(spectrum) * rate / pcm.size)


def b64(pcm: np.ndarray) -> str:
    return base64.b64encode(pcm.astype("<i2").tobytes()).decode()


def appended(conn) -> bytes:
    return b"".join(base64.b64decode(t["audio"]) for t in conn.texts if t["type"] == "input_audio_buffer.append")


class Recorder(RealtimeHandler):
    """Every handler call as (name, args), and Deferreds waiting for a name."""

    def __init__(self):
        self.calls = []
        self.pcm = []
        self._waiting = []

    def _record(self, name, *args):
        self.calls.append((name, *args))
        for entry in list(self._waiting):
            if entry[0] == name:
                self._waiting.remove(entry)
                entry[1].callback((name, *args))

    def wait(self, name) -> defer.Deferred:
        for call in self.calls:
            if call[0] == name:
                return defer.succeed(call)
        d = defer.Deferred()
        self._waiting.append((name, d))
        return d

    def names(self):
        return [c[0] for c in self.calls]

    def speech_started(self, *a): self._record("speech_started", *a)
    def speech_stopped(self, *a): self._record("speech_stopped", *a)
    def user_transcript(self, *a): self._record("user_transcript", *a)
    def response_started(self, *a): self._record("response_started", *a)
    def audio_done(self, *a): self._record("audio_done", *a)
    def transcript_delta(self, *a): self._record("transcript_delta", *a)
    def transcript_done(self, *a): self._record("transcript_done", *a)
    def function_call(self, *a): self._record("function_call", *a)
    def response_done(self, *a): self._record("response_done", *a)
    def failed(self, *a): self._record("failed", *a)

    def audio(self, response_id, item_id, pcm):
        self.pcm.append(pcm)
        self._record("audio", response_id, item_id, pcm.size)


class SettingsTests(unittest.TestCase):
    def test_openai_defaults(self):
        s = RealtimeSettings.from_option({"secretKey": KEY})
        self.assertEqual(s.url, f"wss://api.openai.com/v1/realtime?model={DEFAULT_MODEL}")
        self.assertEqual(dict(s.headers), {"Authorization": f"Bearer {KEY}", "OpenAI-Beta": "realtime=v1"})
        session = s.session()
        self.assertEqual(session["voice"], "alloy")
        self.assertEqual(session["turn_detection"], DEFAULT_TURN_DETECTION)
        self.assertEqual(DEFAULT_TURN_DETECTION, {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                                                  "silence_duration_ms": 500})
        self.assertEqual((session["input_audio_format"], session["output_audio_format"]), ("pcm16", "pcm16"))
        self.assertEqual(session["input_audio_transcription"], {"model": "whisper-1"})
        self.assertNotIn("instructions", session)
        self.assertEqual((session["tools"], session["tool_choice"]), ([], "none"))
        self.assertNotIn(KEY, repr(s))

    def test_key_from_the_environment_and_missing_key(self):
        s = RealtimeSettings.from_option({"model": "gpt-realtime"}, env={"OPENAI_API_KEY": "env-key"})
        self.assertEqual(s.headers["Authorization"], "Bearer env-key")
        self.assertTrue(s.url.endswith("/v1/realtime?model=gpt-realtime"))
        with self.assertRaises(OptionError) as e:
            RealtimeSettings.from_option({}, env={})
        self.assertIn("OPENAI_API_KEY", str(e.exception))

    def test_endpoints(self):
        s = RealtimeSettings.from_option({"endpoint": "https://proxy.example/v1", "apiKey": KEY})
        self.assertEqual(s.url, f"wss://proxy.example/v1/realtime?model={DEFAULT_MODEL}")
        s = RealtimeSettings.from_option({"endpoint": "ws://127.0.0.1:9/v1/realtime?model=m1", "secretKey": KEY})
        self.assertEqual(s.url, "ws://127.0.0.1:9/v1/realtime?model=m1")
        s = RealtimeSettings.from_option({"provider": "azure", "endpoint": "https://res.openai.azure.com",
                                          "model": "my-deploy", "secretKey": KEY})
        self.assertEqual(s.url, "wss://res.openai.azure.com/openai/realtime?api-version=2024-10-01-preview"
                                "&deployment=my-deploy")
        self.assertEqual(dict(s.headers), {"api-key": KEY})
        with self.assertRaises(OptionError) as e:
            RealtimeSettings.from_option({"provider": "azure", "secretKey": KEY})
        self.assertIn("realtime.endpoint", str(e.exception))
        s = RealtimeSettings.from_option({"provider": "wss://rt.example/ws?x=1"}, env={})
        self.assertEqual((s.provider, s.url, dict(s.headers)), ("other", "wss://rt.example/ws?x=1", {}))
        s = RealtimeSettings.from_option({"provider": "selfhosted", "endpoint": "ws://h:1/rt", "secretKey": KEY})
        self.assertEqual((s.url, s.headers["Authorization"]), ("ws://h:1/rt", f"Bearer {KEY}"))
        with self.assertRaises(OptionError):
            RealtimeSettings.from_option({"provider": "selfhosted"}, env={})

    def test_extra_turn_detection_and_tools(self):
        app_tool = {"type": "function", "name": "lookup_order", "parameters": {"type": "object"}}
        mine = {"type": "function", "name": "hangup_call", "description": "application's own"}
        s = RealtimeSettings.from_option({
            "secretKey": KEY, "turnDetection": {"type": "semantic_vad"}, "tools": [app_tool, mine],
            "extra": {"instructions": "Be brief.", "voice": "verse", "transcription_model": "gpt-4o-transcribe",
                      "language": "en", "temperature": "0.7"}})
        builtin = {"type": "function", "name": "hangup_call", "description": "built in"}
        other = {"type": "function", "name": "transfer_call"}
        session = s.session(extra_tools=[builtin, other])
        self.assertEqual(session["instructions"], "Be brief.")
        self.assertEqual(session["voice"], "verse")
        self.assertEqual(session["turn_detection"], {"type": "semantic_vad"})
        self.assertEqual(session["input_audio_transcription"], {"model": "gpt-4o-transcribe", "language": "en"})
        self.assertEqual(session["temperature"], 0.7)
        self.assertEqual(session["tools"], [app_tool, mine, other])  # the application's definition wins
        self.assertEqual(session["tool_choice"], "auto")
        self.assertEqual(s.session("Scene two.")["instructions"], "Scene two.")
        off = RealtimeSettings.from_option({"secretKey": KEY, "turnDetection": "none",
                                            "extra": {"transcription_model": "none"}})
        self.assertIsNone(off.session()["turn_detection"])
        self.assertIsNone(off.session()["input_audio_transcription"])
        for bad, where in (({"turnDetection": 3}, "turnDetection"), ({"tools": [{"x": 1}]}, "tools[0]"),
                           ({"extra": {"temperature": "hot"}}, "temperature"),
                           ({"extra": {"connect_timeout": "soon"}}, "connect_timeout")):
            with self.assertRaises(OptionError) as e:
                RealtimeSettings.from_option({"secretKey": KEY, **bad})
            self.assertIn(where, str(e.exception))


class ClientTests(unittest.TestCase):
    timeout = 20

    def make(self, on_message=lambda conn, payload, is_binary: None, refuse=None, **option):
        srv = WsServer(self, on_message, refuse=refuse,
                       on_open=lambda conn: conn.send_json({"type": "session.created", "session": {"id": "sess_1"}}))
        self.clock = task.Clock()
        handler = Recorder()
        settings = RealtimeSettings.from_option({"endpoint": srv.base, "secretKey": KEY, **option})
        client = RealtimeClient(settings, handler, reactor=self.clock, instructions="You are a test.",
                                extra_tools=[{"type": "function", "name": "hangup_call"}])
        self.addCleanup(client.close)
        return srv, client, handler

    @defer.inlineCallbacks
    def test_request_session_update_and_audio_in_100ms_chunks_at_24k(self):
        srv, client, handler = self.make(model="gpt-4o-realtime-preview", extra={"voice": "echo"})
        accepted = srv.next_connection()
        audio = tone(1.0)
        yield client.connect()
        conn = yield accepted
        self.assertEqual(conn.path, "/realtime")
        self.assertEqual(conn.query, {"model": "gpt-4o-realtime-preview"})
        self.assertEqual(conn.headers["authorization"], f"Bearer {KEY}")
        self.assertEqual(conn.headers["openai-beta"], "realtime=v1")
        for f in frames(audio):
            client.feed(f)
        yield conn.wait_for(lambda c: len(c.texts) >= 11)
        update = conn.texts[0]
        self.assertEqual(update["type"], "session.update")
        self.assertEqual(update["session"]["instructions"], "You are a test.")
        self.assertEqual(update["session"]["voice"], "echo")
        self.assertEqual(update["session"]["turn_detection"], DEFAULT_TURN_DETECTION)
        self.assertEqual(update["session"]["tools"], [{"type": "function", "name": "hangup_call"}])
        appends = [t for t in conn.texts if t["type"] == "input_audio_buffer.append"]
        self.assertEqual(len(appends), 10)
        self.assertTrue(all(len(base64.b64decode(t["audio"])) == 4800 for t in appends))  # 100 ms at 24 kHz
        sent = np.frombuffer(appended(conn), dtype="<i2")
        self.assertEqual(sent.size, 24000)
        self.assertLessEqual(abs(dominant_hz(sent[2400:], 24000) - 440), 5)
        self.assertLessEqual(abs(float(np.abs(sent[2400:]).max()) - 8000), 400)
        self.assertTrue(all(not binary for binary, _ in conn.frames))
        self.assertEqual(client.session_id, "sess_1")

    @defer.inlineCallbacks
    def test_server_events_reach_the_handler_and_audio_comes_out_at_16k(self):
        reply = tone(0.6, rate=24000, freq=300)

        def vendor(conn, payload, is_binary):
            if conn.texts[-1]["type"] == "session.update":
                conn.send_json({"type": "input_audio_buffer.speech_started", "audio_start_ms": 120,
                                "item_id": "item_u1"})
                conn.send_json({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 900,
                                "item_id": "item_u1"})
                conn.send_json({"type": "input_audio_buffer.committed", "item_id": "item_u1"})
                conn.send_json({"type": "conversation.item.input_audio_transcription.completed",
                                "item_id": "item_u1", "content_index": 0, "transcript": " Where is my order? "})
                conn.send_json({"type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}})
                for part in np.array_split(reply, 3):
                    conn.send_json({"type": "response.audio.delta", "response_id": "resp_1", "item_id": "item_b1",
                                    "output_index": 0, "content_index": 0, "delta": b64(part)})
                conn.send_json({"type": "response.audio_transcript.delta", "response_id": "resp_1",
                                "item_id": "item_b1", "delta": "It has "})
                conn.send_json({"type": "response.audio_transcript.delta", "response_id": "resp_1",
                                "item_id": "item_b1", "delta": "shipped."})
                conn.send_json({"type": "response.audio.done", "response_id": "resp_1", "item_id": "item_b1"})
                conn.send_json({"type": "response.audio_transcript.done", "response_id": "resp_1",
                                "item_id": "item_b1", "transcript": "It has shipped."})
                conn.send_json({"type": "response.function_call_arguments.done", "response_id": "resp_1",
                                "item_id": "item_f1", "call_id": "call_7", "name": "hangup_call",
                                "arguments": "{\"reason\":\"done\"}"})
                conn.send_json({"type": "response.done", "response": {"id": "resp_1", "status": "completed"}})

        srv, client, handler = self.make(vendor)
        yield client.connect()
        yield handler.wait("response_done")
        self.assertEqual(handler.names()[:3], ["speech_started", "speech_stopped", "user_transcript"])
        self.assertEqual(handler.calls[0], ("speech_started", 120, "item_u1"))
        self.assertEqual(handler.calls[1], ("speech_stopped", 900, "item_u1"))
        self.assertEqual(handler.calls[2], ("user_transcript", "item_u1", "Where is my order?"))
        self.assertIn(("response_started", "resp_1"), handler.calls)
        self.assertIn(("transcript_done", "resp_1", "item_b1", "It has shipped."), handler.calls)
        self.assertIn(("function_call", "call_7", "hangup_call", "{\"reason\":\"done\"}"), handler.calls)
        self.assertEqual(handler.calls[-1], ("response_done", "resp_1", "completed"))
        self.assertIsNone(client.response_id)
        out = np.concatenate(handler.pcm)
        self.assertLessEqual(abs(out.size - 0.6 * 16000), 16)  # 24 kHz in, 16 kHz out, delay removed
        self.assertLessEqual(abs(dominant_hz(out[800:-800], 16000) - 300), 5)
        self.assertLess(handler.names().index("audio"), handler.names().index("audio_done"))

    @defer.inlineCallbacks
    def test_function_output_cancel_truncate_and_queued_events(self):
        srv, client, handler = self.make()
        client.create_response("Greet the caller.")  # before the socket is open: queued
        accepted = srv.next_connection()
        yield client.connect()
        conn = yield accepted
        client.cancel_response()  # no response in progress: nothing sent
        client.ws_message(b'{"type":"response.created","response":{"id":"resp_2"}}', False)
        client.cancel_response()
        client.truncate("item_b2", 1234.6)
        client.function_output("call_1", {"status": "ok"})
        client.function_output("call_2", "plain", respond=False)
        client.update_session(instructions="Now scene two.")
        yield conn.wait_for(lambda c: len(c.texts) >= 8)
        kinds = [t["type"] for t in conn.texts]
        self.assertEqual(kinds, ["session.update", "response.create", "response.cancel",
                                 "conversation.item.truncate", "conversation.item.create", "response.create",
                                 "conversation.item.create", "session.update"])
        self.assertEqual(conn.texts[1], {"type": "response.create", "response": {"instructions": "Greet the caller."}})
        self.assertEqual(conn.texts[3], {"type": "conversation.item.truncate", "item_id": "item_b2",
                                         "content_index": 0, "audio_end_ms": 1234})
        self.assertEqual(conn.texts[4], {"type": "conversation.item.create", "item": {
            "type": "function_call_output", "call_id": "call_1", "output": "{\"status\": \"ok\"}"}})
        self.assertEqual(conn.texts[6]["item"]["output"], "plain")
        self.assertEqual(conn.texts[7]["session"]["instructions"], "Now scene two.")
        self.assertEqual(conn.texts[7]["session"]["tools"], [{"type": "function", "name": "hangup_call"}])

    @defer.inlineCallbacks
    def test_audio_fed_while_connecting_is_sent_after_the_session_update(self):
        srv, client, handler = self.make()
        accepted = srv.next_connection()
        opened = client.connect()
        for f in frames(tone(0.3)):
            client.feed(f)
        yield opened
        conn = yield accepted
        yield conn.wait_for(lambda c: len(appended(c)) >= 14400)
        self.assertEqual(conn.texts[0]["type"], "session.update")
        self.assertEqual(len(appended(conn)), 0.3 * 24000 * 2)

    @defer.inlineCallbacks
    def test_error_events_are_reported_and_the_session_goes_on(self):
        def vendor(conn, payload, is_binary):
            if conn.texts[-1]["type"] == "session.update":
                conn.send_json({"type": "error", "event_id": "e1", "error": {
                    "type": "invalid_request_error", "code": "invalid_value", "message": "Invalid voice 'x'.",
                    "param": "session.voice"}})
                conn.send_json({"type": "error", "error": {"type": "invalid_request_error",
                                                           "code": "response_cancel_not_active",
                                                           "message": "no active response"}})
                conn.send_json({"type": "error", "error": {"type": "server_error", "message": "overloaded"}})
                conn.send_json({"type": "conversation.item.input_audio_transcription.failed", "item_id": "i",
                                "error": {"message": "audio too short"}})
                conn.send_json({"type": "response.done", "response": {"id": "r9", "status": "failed",
                                "status_details": {"error": {"message": "rate limited"}}}})

        srv, client, handler = self.make(vendor)
        yield client.connect()
        yield handler.wait("response_done")
        failures = [c[1:] for c in handler.calls if c[0] == "failed"]
        self.assertEqual(failures, [
            ("realtime invalid_request_error (invalid_value): Invalid voice 'x'.", False, 400),
            ("realtime server_error: overloaded", False, 500),
            ("realtime: transcription failed: audio too short", False, 500),
            ("realtime: the response failed: rate limited", False, 500),
        ])
        self.assertEqual(client.state, "open")

    @defer.inlineCallbacks
    def test_refused_upgrade_is_a_fatal_error_without_the_key(self):
        def refuse(conn):
            raise ConnectionDeny(401, "Incorrect API key provided")

        srv, client, handler = self.make(refuse=refuse)
        with self.assertRaises(Exception) as e:
            yield client.connect()
        (name, message, fatal, code), = handler.calls
        self.assertEqual((name, fatal, code), ("failed", True, 500))
        self.assertIn("realtime", message)
        self.assertIn("401", message)
        self.assertNotIn(KEY, message)
        self.assertEqual(str(e.exception), message)
        self.assertEqual(client.state, "failed")
        client.feed(np.zeros(320, dtype=np.int16))  # ignored, no error
        yield client.close()

    @defer.inlineCallbacks
    def test_the_service_closing_the_socket_is_fatal(self):
        def vendor(conn, payload, is_binary):
            conn.close(1011, "internal error")

        srv, client, handler = self.make(vendor)
        yield client.connect()
        call = yield handler.wait("failed")
        self.assertEqual(call[1:], ("realtime: the service closed the connection (1011: internal error)", True, 500))

    @defer.inlineCallbacks
    def test_close_sends_a_close_frame(self):
        srv, client, handler = self.make()
        accepted = srv.next_connection()
        yield client.connect()
        conn = yield accepted
        yield client.close()
        code = yield conn.closed
        self.assertEqual(code, 1000)
        self.assertEqual(client.state, "closed")
        self.assertEqual(handler.calls, [])


class _Silent(protocol.Protocol):
    """Accepts TCP and never answers the WebSocket upgrade."""

    def connectionMade(self):
        self.factory.connections.append(self)


class TimeoutTests(unittest.TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def test_connect_timeout_on_the_injected_clock(self):
        factory = protocol.ServerFactory()
        factory.protocol = _Silent
        factory.connections = []
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        clock = task.Clock()
        handler = Recorder()
        settings = RealtimeSettings.from_option({"endpoint": f"ws://127.0.0.1:{port.getHost().port}",
                                                 "secretKey": KEY, "extra": {"connect_timeout": "3"}})
        client = RealtimeClient(settings, handler, reactor=clock)
        d = client.connect()
        failures = []
        d.addErrback(failures.append)
        while not factory.connections:  # the TCP connection is up, the upgrade unanswered
            yield task.deferLater(reactor, 0.01, lambda: None)
        clock.advance(2.9)
        self.assertEqual(handler.calls, [])
        clock.advance(0.2)
        self.assertEqual(len(failures), 1)
        self.assertEqual(handler.calls, [("failed", f"realtime: no connection to 127.0.0.1:{port.getHost().port} "
                                                    "within 3 s", True, 500)])
        for proto in factory.connections:
            proto.transport.loseConnection()
        yield client.close()

    @defer.inlineCallbacks
    def test_close_timeout_drops_the_connection(self):
        srv = WsServer(self, lambda *a: None)
        accepted = srv.next_connection()
        clock = task.Clock()
        client = RealtimeClient(RealtimeSettings.from_option({"endpoint": srv.base, "secretKey": KEY}),
                                Recorder(), reactor=clock)
        yield client.connect()
        conn = yield accepted
        conn.proto.transport.pauseProducing()  # the server never reads our close frame
        closed = client.close()
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertFalse(closed.called)
        clock.advance(5)
        yield closed
        conn.proto.transport.resumeProducing()
        yield conn.closed
