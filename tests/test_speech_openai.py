"""OpenAI ASR and TTS against a local twisted.web server that checks each request field by field."""

from __future__ import annotations

import io
import json

import numpy as np
from multipart import MultipartParser, parse_options_header
from treq.client import HTTPClient
from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.client import Agent, HTTPConnectionPool

from activecall.audio import parse_wav_header
from activecall.speech import registry
from activecall.speech.base import SpeechError
from activecall.speech.cache import TtsCache
from activecall.speech.testing import frames

KEY = "sk-test-123"


class Recorder(resource.Resource):
    """Answers every POST with ``answer(request, body)``; keeps what it received."""

    isLeaf = True

    def __init__(self, answer):
        super().__init__()
        self.answer = answer
        self.requests: list[dict] = []

    def render_POST(self, request):
        body = request.content.read()
        self.requests.append({
            "path": request.path.decode(),
            "headers": {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()},
            "body": body,
        })
        return self.answer(request, body)


class LocalServer:
    """A twisted.web site on 127.0.0.1 and a treq client that keeps no connection open afterwards."""

    def __init__(self, test: unittest.TestCase, answer):
        self.resource = Recorder(answer)
        self.port = reactor.listenTCP(0, server.Site(self.resource), interface="127.0.0.1")
        test.addCleanup(self.port.stopListening)
        self.base = f"http://127.0.0.1:{self.port.getHost().port}/v1"
        self.http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))

    @property
    def requests(self):
        return self.resource.requests


def multipart_fields(request: dict) -> dict:
    """name -> (filename, content type, raw bytes) of a multipart/form-data body."""
    ctype, params = parse_options_header(request["headers"]["content-type"])
    assert ctype == "multipart/form-data", ctype
    parser = MultipartParser(io.BytesIO(request["body"]), params["boundary"])
    return {p.name: (p.filename, p.content_type, p.raw) for p in parser}


def tone(seconds: float, rate: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (8000 * np.sin(2 * np.pi * freq * t)).astype(np.int16)


class OpenAIRecognizerTests(unittest.TestCase):
    timeout = 20  # a hung request fails the test instead of the run

    def make(self, answer, **options):
        srv = LocalServer(self, answer)
        results = []
        opts = {"provider": "openai", "endpoint": srv.base, "secretKey": KEY,
                "extra": {"endpointing": "external"}, **options}
        asr = registry.create_recognizer(opts, results.append, http=srv.http)
        return srv, asr, results

    @defer.inlineCallbacks
    def test_one_request_per_utterance_field_by_field(self):
        def answer(request, body):
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"text": f" utterance {len(srv.requests)} "}).encode()

        srv, asr, results = self.make(answer, language="en", modelType="gpt-4o-transcribe",
                                      extra={"endpointing": "external", "prompt": "billing"})
        first, second = tone(1.0, 16000), tone(0.5, 16000, 300)
        for f in frames(first):
            asr.feed(f)
        asr.end_utterance()
        for f in frames(second):
            asr.feed(f)
        yield asr.close()

        self.assertEqual([r.text for r in results], ["utterance 1", "utterance 2"])
        self.assertEqual([r.index for r in results], [0, 1])
        self.assertTrue(all(r.final for r in results))
        self.assertEqual((results[0].start_ms, results[0].end_ms), (0, 1000))
        self.assertEqual((results[1].start_ms, results[1].end_ms), (1000, 1500))
        self.assertIsNotNone(results[0].ttfb_ms)

        self.assertEqual(len(srv.requests), 2)
        req = srv.requests[0]
        self.assertEqual(req["path"], "/v1/audio/transcriptions")
        self.assertEqual(req["headers"]["authorization"], f"Bearer {KEY}")
        fields = multipart_fields(req)
        self.assertEqual(set(fields), {"file", "model", "language", "response_format", "prompt"})
        self.assertEqual(fields["model"][2], b"gpt-4o-transcribe")
        self.assertEqual(fields["language"][2], b"en")
        self.assertEqual(fields["response_format"][2], b"json")
        self.assertEqual(fields["prompt"][2], b"billing")
        filename, ctype, wav = fields["file"]
        self.assertEqual((filename, ctype), ("audio.wav", "audio/wav"))
        fmt = parse_wav_header(wav)
        self.assertEqual((fmt.sample_rate, fmt.channels, fmt.bits), (16000, 1, 16))
        np.testing.assert_array_equal(np.frombuffer(wav[fmt.data_offset:], dtype="<i2"), first)
        second_wav = multipart_fields(srv.requests[1])["file"][2]
        self.assertEqual(len(second_wav) - parse_wav_header(second_wav).data_offset, second.size * 2)

    @defer.inlineCallbacks
    def test_guide_snippet_model_and_zh_cn(self):
        """The guide's ``asr: {provider: openai, model: whisper-1, language: zh-CN}``: ``model`` is the
        request's model and ``zh-CN`` goes out as ISO-639-1 ``zh`` (the service refuses region tags)."""
        srv, asr, results = self.make(lambda request, body: b'{"text": "\xe4\xbd\xa0\xe5\xa5\xbd"}',
                                      model="whisper-1", language="zh-CN")
        for f in frames(tone(0.4, 16000)):
            asr.feed(f)
        yield asr.close()
        fields = multipart_fields(srv.requests[0])
        self.assertEqual(set(fields), {"file", "model", "language", "response_format"})
        self.assertEqual(fields["model"][2], b"whisper-1")
        self.assertEqual(fields["language"][2], b"zh")
        self.assertEqual([r.text for r in results], ["你好"])

    def test_language_tags_to_iso639_1(self):
        from activecall.speech.asr.openai import iso639_1
        self.assertEqual([iso639_1(t) for t in ("zh-CN", "zh_TW", "en-US", "EN", "cmn", "ja")],
                         ["zh", "zh", "en", "en", "zh", "ja"])

    @defer.inlineCallbacks
    def test_model_type_wins_over_model(self):
        srv, asr, results = self.make(lambda request, body: b'{"text": "ok"}', model="gpt-4o-transcribe",
                                      modelType="whisper-1")
        for f in frames(tone(0.4, 16000)):
            asr.feed(f)
        yield asr.close()
        self.assertEqual(multipart_fields(srv.requests[0])["model"][2], b"whisper-1")

    @defer.inlineCallbacks
    def test_defaults_leave_language_out(self):
        srv, asr, results = self.make(lambda request, body: b'{"text": "ok"}', language="auto")
        for f in frames(tone(0.4, 16000)):
            asr.feed(f)
        yield asr.close()
        fields = multipart_fields(srv.requests[0])
        self.assertEqual(fields["model"][2], b"whisper-1")
        self.assertNotIn("language", fields)
        self.assertEqual([r.text for r in results], ["ok"])

    @defer.inlineCallbacks
    def test_service_error_is_logged_with_its_message(self):
        def answer(request, body):
            request.setResponseCode(401)
            return json.dumps({"error": {"message": "Incorrect API key provided"}}).encode()

        srv, asr, results = self.make(answer)
        for f in frames(tone(0.4, 16000)):
            asr.feed(f)
        yield asr.close()
        self.assertEqual(results, [])
        [failure] = self.flushLoggedErrors(SpeechError)
        self.assertIn("HTTP 401: Incorrect API key provided", str(failure.value))

    def test_missing_key_names_the_variable(self):
        e = self.assertRaises(SpeechError, registry.create_recognizer, {"provider": "openai"}, list.append,
                              env={})
        self.assertIn("OPENAI_API_KEY", str(e))

    def test_key_from_environment(self):
        asr = registry.create_recognizer({"provider": "openai"}, list.append, env={"OPENAI_API_KEY": "sk-env"})
        self.assertEqual(asr.key, "sk-env")
        self.assertEqual(asr.url, "https://api.openai.com/v1/audio/transcriptions")


class OpenAISynthesizerTests(unittest.TestCase):
    timeout = 20

    def streaming_answer(self, pcm24k: np.ndarray, chunks: int = 4, finish: bool = True):
        """Sends ``pcm24k`` in ``chunks`` writes spread over reactor turns (a real stream)."""
        data = pcm24k.astype("<i2").tobytes()
        size = -(-len(data) // chunks) | 1  # odd: every chunk boundary but the last splits a sample

        def answer(request, body):
            request.setHeader(b"content-type", b"audio/pcm")
            parts = [data[i:i + size] for i in range(0, len(data), size)]
            self.disconnected = request.notifyFinish()

            def send(i=0):
                if i < len(parts):
                    request.write(parts[i])
                    self.pending = reactor.callLater(0.01, send, i + 1)
                elif finish:
                    request.finish()

            send()
            return server.NOT_DONE_YET

        return answer

    def make(self, answer, cache=None, **options):
        srv = LocalServer(self, answer)
        opts = {"provider": "openai", "endpoint": srv.base, "secretKey": KEY, **options}
        return srv, registry.create_synthesizer(opts, cache=cache, http=srv.http)

    @defer.inlineCallbacks
    def test_request_fields_and_streamed_resampled_audio(self):
        sent = tone(1.0, 24000)
        srv, tts = self.make(self.streaming_answer(sent), speaker="nova", model="tts-1", speed=1.25,
                             extra={"instructions": "calm"})
        chunks = []
        samples = yield tts.synthesize("Hello there.", chunks.append)

        req = srv.requests[0]
        self.assertEqual(req["path"], "/v1/audio/speech")
        self.assertEqual(req["headers"]["authorization"], f"Bearer {KEY}")
        self.assertEqual(req["headers"]["content-type"], "application/json")
        self.assertEqual(json.loads(req["body"]), {
            "model": "tts-1", "input": "Hello there.", "voice": "nova", "response_format": "pcm",
            "speed": 1.25, "instructions": "calm"})

        self.assertGreater(len(chunks), 2, "audio must reach the sink as it streams, not at the end")
        got = np.concatenate(chunks)
        self.assertEqual(samples, got.size)
        self.assertLessEqual(abs(got.size - 16000), 2)  # delay trimmed at the start, flushed at the end
        # still a 440 Hz tone at 16 kHz, no clicks where the chunks (and a split sample) met
        spectrum = np.abs(np.fft.rfft(got[400:15600].astype(np.float64)))
        self.assertAlmostEqual(np.argmax(spectrum) * 16000 / 15200, 440, delta=3)
        self.assertLess(np.max(np.abs(np.diff(got[400:15600].astype(np.int32)))), 8000 * 2 * np.pi * 440 / 16000 * 1.1)

    @defer.inlineCallbacks
    def test_guide_snippet_model_and_voice(self):
        """The guide's ``tts: {provider: openai, model: tts-1, voice: alloy}``, exactly that in the body."""
        srv, tts = self.make(self.streaming_answer(tone(0.1, 24000), chunks=1), model="tts-1", voice="echo",
                             language="zh-CN")
        yield tts.synthesize("你好。", lambda pcm: None)
        self.assertEqual(json.loads(srv.requests[0]["body"]),
                         {"model": "tts-1", "input": "你好。", "voice": "echo", "response_format": "pcm"})

    @defer.inlineCallbacks
    def test_defaults(self):
        srv, tts = self.make(self.streaming_answer(tone(0.1, 24000), chunks=1))
        yield tts.synthesize("Hi.", lambda pcm: None)
        self.assertEqual(json.loads(srv.requests[0]["body"]),
                         {"model": "gpt-4o-mini-tts", "input": "Hi.", "voice": "alloy", "response_format": "pcm"})

    @defer.inlineCallbacks
    def test_cancel_aborts_the_transfer(self):
        srv, tts = self.make(self.streaming_answer(tone(5.0, 24000), chunks=50, finish=False))
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
        # the server sees the connection go away
        yield self.assertFailure(self.disconnected, Exception)
        if self.pending.active():
            self.pending.cancel()
        self.assertEqual(len(chunks), received, "no audio after cancel")

    @defer.inlineCallbacks
    def test_service_error_names_status_and_message(self):
        def answer(request, body):
            request.setResponseCode(400)
            return json.dumps({"error": {"message": "voice 'x' not found"}}).encode()

        srv, tts = self.make(answer, speaker="x")
        e = yield self.assertFailure(tts.synthesize("Hi.", list.append), SpeechError)
        self.assertIn("HTTP 400: voice 'x' not found", str(e))

    @defer.inlineCallbacks
    def test_cache_makes_the_second_request_unnecessary(self):
        cache = TtsCache(self.mktemp())
        srv, tts = self.make(self.streaming_answer(tone(0.3, 24000), chunks=2), cache=cache)
        first, second = [], []
        yield tts.synthesize("Welcome back.", first.append)
        yield tts.synthesize("Welcome back.", second.append)
        self.assertEqual(len(srv.requests), 1)
        np.testing.assert_array_equal(np.concatenate(first), np.concatenate(second))

    def test_missing_key_names_the_variable(self):
        e = self.assertRaises(SpeechError, registry.create_synthesizer, {"provider": "openai"}, env={})
        self.assertIn("OPENAI_API_KEY", str(e))
