"""Deepgram ASR (streaming /v1/listen WebSocket) and TTS (/v1/speak) against local servers speaking their protocol."""

from __future__ import annotations

import json

import numpy as np
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import defer, task
from twisted.trial import unittest
from twisted.web import server

from activecall.speech import registry
from activecall.speech.base import OptionError, SpeechError
from activecall.speech.testing import frames
from tests.cloud_helpers import HttpServer, WsServer, streamed, tone

KEY = "dg-secret-key"


def results(transcript, start, duration, is_final=False, speech_final=False, **more):
    """A Deepgram ``Results`` message as the streaming API sends it."""
    return {"type": "Results", "channel_index": [0, 1], "duration": duration, "start": start,
            "is_final": is_final, "speech_final": speech_final,
            "channel": {"alternatives": [{"transcript": transcript, "confidence": 0.97, "words": []}]},
            "metadata": {"request_id": "r-1", "model_info": {"name": "2-general-nova"}}, **more}


class DeepgramRecognizerTests(unittest.TestCase):
    timeout = 20

    def make(self, on_message, refuse=None, **options):
        srv = WsServer(self, on_message, refuse=refuse)
        self.clock = task.Clock()
        got = []
        opts = {"provider": "deepgram", "endpoint": srv.base, "secretKey": KEY, **options}
        asr = registry.create_recognizer(opts, got.append, reactor=self.clock, network=None)
        return srv, asr, got

    def feed(self, asr, pcm):
        for f in frames(pcm):
            self.clock.advance(0.02)
            asr.feed(f)

    @defer.inlineCallbacks
    def test_stream_request_interims_finals_and_close(self):
        audio = tone(1.0)

        def vendor(conn, payload, is_binary):
            if is_binary and len(conn.audio) == len(audio) * 2 and not conn.texts:
                conn.send_json(results("hello", 0.2, 0.3))
                conn.send_json(results("hello world", 0.2, 0.5, is_final=True))
                conn.send_json(results("how are", 0.7, 0.2))
                conn.send_json(results("how are you", 0.7, 0.3, is_final=True, speech_final=True))
                conn.send_json({"type": "SpeechStarted", "channel": [0], "timestamp": 1.0})
            elif not is_binary and conn.texts[-1] == {"type": "CloseStream"}:
                conn.send_json(results("bye", 1.0, 0.0, is_final=True))  # flushed at CloseStream
                conn.send_json({"type": "Metadata", "request_id": "r-1", "duration": 1.0, "channels": 1})
                conn.close(1000)

        srv, asr, got = self.make(vendor, language="en-US", modelType="nova-3",
                                  extra={"endpointing": "300", "smart_format": "true"})
        self.feed(asr, audio)
        yield asr.close()

        [conn] = srv.connections
        self.assertEqual(conn.path, "/v1/listen")
        self.assertEqual(conn.query, {"encoding": "linear16", "sample_rate": "16000", "channels": "1",
                                      "interim_results": "true", "model": "nova-3", "language": "en-US",
                                      "endpointing": "300", "smart_format": "true"})
        self.assertEqual(conn.headers["authorization"], f"Token {KEY}")
        self.assertEqual(bytes(conn.audio), audio.astype("<i2").tobytes())
        binary_sizes = [size for binary, size in conn.frames if binary]
        self.assertEqual(binary_sizes, [3200] * 10)  # 100 ms per message
        self.assertEqual(conn.texts, [{"type": "CloseStream"}])
        self.assertEqual(conn.close_code, 1000)

        self.assertEqual([(r.index, r.text, r.final) for r in got], [
            (0, "hello", False), (0, "hello world", False), (0, "hello world how are", False),
            (0, "hello world how are you", True), (1, "bye", False), (1, "bye", True)])
        self.assertEqual((got[3].start_ms, got[3].end_ms), (200, 1000))
        self.assertEqual(got[3].confidence, 0.97)
        # ttfb: the clock stood at 1.0 s when the results came; sample 200 ms had been fed at 0.22 s
        self.assertEqual(got[0].ttfb_ms, 780)
        self.assertEqual([r.ttfb_ms is None for r in got], [False, True, True, True, False, True])

    @defer.inlineCallbacks
    def test_end_utterance_sends_finalize_and_utterance_end_closes_one(self):
        def vendor(conn, payload, is_binary):
            if is_binary:
                return
            kind = conn.texts[-1]["type"]
            if kind == "Finalize":
                conn.send_json(results("first", 0.0, 0.4, is_final=True, from_finalize=True))
            elif kind == "CloseStream":
                conn.send_json(results("second", 0.5, 0.3, is_final=True))
                conn.send_json({"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": 0.8})
                conn.close(1000)

        srv, asr, got = self.make(vendor)
        self.feed(asr, tone(0.4))
        conn = yield srv.next_connection()
        yield conn.wait_for(lambda c: len(c.audio) == 0.4 * 32000)
        asr.end_utterance()
        yield conn.wait_for(lambda c: c.texts)
        self.assertEqual(conn.texts, [{"type": "Finalize"}])
        self.feed(asr, tone(0.4))
        yield asr.close()
        self.assertEqual([(r.index, r.text, r.final) for r in got], [(0, "first", True), (1, "second", False),
                                                                    (1, "second", True)])
        self.assertEqual(conn.query["model"], "nova-2")
        self.assertNotIn("language", conn.query)

    @defer.inlineCallbacks
    def test_keepalive_when_no_audio_flows(self):
        def vendor(conn, payload, is_binary):
            if not is_binary and conn.texts[-1] == {"type": "CloseStream"}:
                conn.close(1000)

        srv, asr, got = self.make(vendor, extra={"keepalive": "4"})
        self.feed(asr, tone(0.1))
        conn = yield srv.next_connection()
        yield conn.wait_for(lambda c: len(c.audio) == 3200)
        self.clock.advance(4)  # audio went out during this period: nothing to do
        self.clock.advance(4)  # a whole period without audio
        yield conn.wait_for(lambda c: c.texts)
        self.assertEqual(conn.texts, [{"type": "KeepAlive"}])
        self.feed(asr, tone(0.1))
        self.clock.advance(4)
        yield conn.wait_for(lambda c: len(c.audio) == 6400)
        yield asr.close()
        self.assertEqual(conn.texts, [{"type": "KeepAlive"}, {"type": "CloseStream"}])

    @defer.inlineCallbacks
    def test_refused_key_is_a_logged_error_naming_the_status(self):
        def refuse(conn):
            raise ConnectionDeny(401, "Unauthorized")

        srv, asr, got = self.make(lambda *a: None, refuse=refuse)
        errors = []
        asr.on_error = errors.append  # what the call turns into error{sender:"asr"}
        self.feed(asr, tone(0.2))
        yield asr.close()
        self.assertEqual(got, [])
        [failure] = self.flushLoggedErrors(SpeechError)
        self.assertIn("401", str(failure.value))
        self.assertNotIn(KEY, str(failure.value))
        [error] = errors
        self.assertIn("401", error)
        self.assertTrue(error.startswith("deepgram"), error)
        self.assertNotIn(KEY, error)
        asr.feed(tone(0.1))  # ignored after the failure
        self.assertEqual(len(srv.connections), 1)

    @defer.inlineCallbacks
    def test_vendor_close_with_error_code(self):
        def vendor(conn, payload, is_binary):
            conn.close(1008, "DATA-0000: The payload cannot be decoded as audio.")

        srv, asr, got = self.make(vendor)
        self.feed(asr, tone(0.2))
        conn = yield srv.next_connection()
        yield conn.closed
        yield asr.close()
        [failure] = self.flushLoggedErrors(SpeechError)
        self.assertIn("1008", str(failure.value))
        self.assertIn("DATA-0000", str(failure.value))

    def test_missing_key_names_option_and_variable(self):
        e = self.assertRaises(OptionError, registry.create_recognizer, {"provider": "deepgram"}, list.append,
                              env={})
        self.assertIn("secretKey", str(e))
        self.assertIn("DEEPGRAM_API_KEY", str(e))

    def test_key_from_environment_and_default_endpoint(self):
        asr = registry.create_recognizer({"provider": "deepgram"}, list.append, env={"DEEPGRAM_API_KEY": "k"})
        url, headers = asr._request()
        self.assertTrue(url.startswith("wss://api.deepgram.com/v1/listen?encoding=linear16&"))
        self.assertEqual(headers, {"Authorization": "Token k"})


class DeepgramSynthesizerTests(unittest.TestCase):
    timeout = 20

    def make(self, answer, **options):
        srv = HttpServer(self, answer)
        opts = {"provider": "deepgram", "endpoint": srv.base, "secretKey": KEY, **options}
        return srv, registry.create_synthesizer(opts, http=srv.http)

    @defer.inlineCallbacks
    def test_request_fields_and_streamed_pcm(self):
        sent = tone(0.5)
        srv, tts = self.make(streamed(self, sent.astype("<i2").tobytes(), chunks=5), speaker="aura-luna-en")
        chunks = []
        samples = yield tts.synthesize("Good morning.", chunks.append)
        [req] = srv.requests
        self.assertEqual((req["method"], req["path"]), ("POST", "/v1/speak"))
        self.assertEqual(req["query"], {"model": "aura-luna-en", "encoding": "linear16", "sample_rate": "16000",
                                        "container": "none"})
        self.assertEqual(req["headers"]["authorization"], f"Token {KEY}")
        self.assertEqual(req["headers"]["content-type"], "application/json")
        self.assertEqual(json.loads(req["body"]), {"text": "Good morning."})
        self.assertGreater(len(chunks), 2, "audio must reach the sink as it streams")
        np.testing.assert_array_equal(np.concatenate(chunks), sent)
        self.assertEqual(samples, sent.size)

    @defer.inlineCallbacks
    def test_wav_container_is_skipped_and_long_text_split(self):
        from activecall.audio import wav_bytes
        sent = tone(0.2)
        srv, tts = self.make(streamed(self, wav_bytes(sent), chunks=3), model="aura-orion-en")
        text = " ".join(f"Sentence number {i} is here." for i in range(100))  # ~2900 characters
        chunks = []
        yield tts.synthesize(text, chunks.append)
        self.assertEqual(len(srv.requests), 2)
        parts = [json.loads(r["body"])["text"] for r in srv.requests]
        self.assertEqual(" ".join(parts), text)
        self.assertTrue(all(len(p) <= 2000 for p in parts))
        self.assertEqual(srv.requests[0]["query"]["model"], "aura-orion-en")
        np.testing.assert_array_equal(np.concatenate(chunks), np.concatenate([sent, sent]))

    @defer.inlineCallbacks
    def test_cancel_aborts_the_transfer(self):
        srv, tts = self.make(streamed(self, tone(5.0).astype("<i2").tobytes(), chunks=100, finish=False))
        chunks = []
        first = defer.Deferred()

        def sink(pcm):
            chunks.append(pcm)
            if not first.called:
                first.callback(None)

        d = tts.synthesize("A long story.", sink)
        yield first
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        received = len(chunks)
        yield self.assertFailure(self.disconnected, Exception)
        if self.pending.active():
            self.pending.cancel()
        self.assertEqual(len(chunks), received)

    @defer.inlineCallbacks
    def test_cancel_from_the_sink_stops_at_once(self):
        srv, tts = self.make(streamed(self, tone(5.0).astype("<i2").tobytes(), chunks=100, finish=False))
        chunks = []
        first = defer.Deferred()

        def sink(pcm):
            chunks.append(pcm)
            d.cancel()
            if not first.called:
                first.callback(None)

        d = tts.synthesize("A long story.", sink)
        yield first
        self.failureResultOf(d, defer.CancelledError)
        yield self.assertFailure(self.disconnected, Exception)
        if self.pending.active():
            self.pending.cancel()
        self.assertEqual(len(chunks), 1)

    @defer.inlineCallbacks
    def test_cancel_before_the_answer_is_a_cancel_not_an_error(self):
        # treq fails an aborted request with ResponseNeverReceived: the synthesis must still say CancelledError
        arrived = defer.Deferred()

        def answer(request, body):
            self.disconnected = request.notifyFinish()
            arrived.callback(None)
            return server.NOT_DONE_YET

        srv, tts = self.make(answer)
        d = tts.synthesize("Hello.", list.append)
        yield arrived
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        yield self.assertFailure(self.disconnected, Exception)

    @defer.inlineCallbacks
    def test_error_names_status_and_vendor_message(self):
        def answer(request, body):
            request.setResponseCode(401)
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"err_code": "INVALID_AUTH", "err_msg": "Invalid credentials.",
                               "request_id": "x"}).encode()

        srv, tts = self.make(answer)
        e = yield self.assertFailure(tts.synthesize("Hi.", list.append), SpeechError)
        self.assertEqual(str(e), "deepgram speak failed: HTTP 401: Invalid credentials.")

    def test_missing_key(self):
        e = self.assertRaises(OptionError, registry.create_synthesizer, {"provider": "deepgram"}, env={})
        self.assertIn("DEEPGRAM_API_KEY", str(e))
        tts = registry.create_synthesizer({"provider": "deepgram"}, env={"DEEPGRAM_API_KEY": "k"})
        self.assertTrue(tts.url.startswith("https://api.deepgram.com/v1/speak?model=aura-asteria-en&"))
