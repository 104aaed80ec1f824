"""Tencent Cloud realtime ASR (signed WebSocket URL) and TextToVoice (TC3-HMAC-SHA256) against local servers
that verify the signatures with their own code and answer like Tencent."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import datetime, timezone

import numpy as np
from twisted.internet import defer, task
from twisted.trial import unittest
from twisted.web import server

from activecall.speech import registry
from activecall.speech.base import OptionError, SpeechError
from activecall.speech.testing import frames
from activecall.speech.tts.tencent import tencent_speed
from tests.cloud_helpers import HttpServer, WsServer, tone

APP_ID, SECRET_ID, SECRET_KEY = "1250000000", "AKIDexample", "secret/key+with=odd chars"


def asr_signature_ok(conn) -> bool:
    """Tencent's documented check: base64 HMAC-SHA1 over host + path + '?' + sorted params sans signature."""
    params = dict(conn.query)
    given = params.pop("signature")
    text = conn.headers["host"] + conn.path + "?" + "&".join(f"{k}={params[k]}" for k in sorted(params))
    expected = base64.b64encode(hmac.new(SECRET_KEY.encode(), text.encode(), hashlib.sha1).digest()).decode()
    return hmac.compare_digest(given, expected)


def result(conn, index, slice_type, text, start, end):
    conn.send_json({"code": 0, "message": "success", "voice_id": conn.query["voice_id"],
                    "message_id": f"{conn.query['voice_id']}_{index}_{slice_type}",
                    "result": {"slice_type": slice_type, "index": index, "start_time": start, "end_time": end,
                               "voice_text_str": text, "word_size": 0, "word_list": []}})


class TencentRecognizerTests(unittest.TestCase):
    timeout = 20

    def make(self, on_open, on_message, **options):
        srv = WsServer(self, on_message, on_open=on_open)
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        got = []
        opts = {"provider": "tencent", "endpoint": srv.base, "appId": APP_ID, "secretId": SECRET_ID,
                "secretKey": SECRET_KEY, **options}
        asr = registry.create_recognizer(opts, got.append, reactor=self.clock)
        return srv, asr, got

    def feed(self, asr, pcm):
        for f in frames(pcm):
            self.clock.advance(0.02)
            asr.feed(f)

    @defer.inlineCallbacks
    def test_signed_url_slices_and_end(self):
        audio = tone(0.4)

        def on_open(conn):
            conn.send_json({"code": 0, "message": "success", "voice_id": conn.query["voice_id"]})

        def vendor(conn, payload, is_binary):
            if is_binary and len(conn.audio) == 1280:
                result(conn, 0, 0, "实时", 40, 200)
                result(conn, 0, 1, "实时语音", 40, 300)
                result(conn, 0, 2, "实时语音识别。", 40, 360)
            elif not is_binary and conn.texts[-1] == {"type": "end"}:
                result(conn, 1, 2, "好的。", 380, 400)
                conn.send_json({"code": 0, "message": "success", "voice_id": conn.query["voice_id"],
                                "message_id": "x", "final": 1})

        srv, asr, got = self.make(on_open, vendor, modelType="16k_en",
                                  extra={"vad_silence_time": "800", "hotword_id": "hw-1"})
        self.feed(asr, audio)
        yield asr.close()

        [conn] = srv.connections
        self.assertEqual(conn.path, f"/asr/v2/{APP_ID}")
        self.assertTrue(asr_signature_ok(conn), "signature does not verify")
        q = conn.query
        self.assertEqual(set(q), {"secretid", "timestamp", "expired", "nonce", "engine_model_type", "voice_id",
                                  "voice_format", "needvad", "vad_silence_time", "hotword_id", "signature"})
        self.assertEqual((q["secretid"], q["engine_model_type"], q["voice_format"], q["needvad"]),
                         (SECRET_ID, "16k_en", "1", "1"))
        self.assertEqual((q["vad_silence_time"], q["hotword_id"]), ("800", "hw-1"))
        self.assertEqual(int(q["timestamp"]), int(self.clock.seconds()))
        self.assertEqual(int(q["expired"]) - int(q["timestamp"]), 86400)
        self.assertTrue(1 <= int(q["nonce"]) <= 9999999999)
        self.assertEqual([size for binary, size in conn.frames if binary], [1280] * 10)  # 40 ms frames
        self.assertEqual(bytes(conn.audio), audio.astype("<i2").tobytes())
        self.assertEqual(conn.texts, [{"type": "end"}])
        self.assertEqual(conn.close_code, 1000)
        self.assertNotIn(SECRET_KEY, json.dumps(conn.query) + json.dumps(conn.headers))

        self.assertEqual([(r.index, r.text, r.final, r.start_ms, r.end_ms) for r in got], [
            (0, "实时", False, 40, 200), (0, "实时语音", False, 40, 300), (0, "实时语音识别。", True, 40, 360),
            (1, "好的。", True, 380, 400)])
        self.assertEqual(got[0].ttfb_ms, 340)  # 40 ms of audio was fed at +0.06 s, answers came at +0.4 s

    @defer.inlineCallbacks
    def test_guide_key_model_is_engine_model_type(self):
        def on_open(conn):
            conn.send_json({"code": 0, "message": "success", "voice_id": conn.query["voice_id"]})

        def vendor(conn, payload, is_binary):
            if not is_binary and conn.texts[-1] == {"type": "end"}:
                conn.send_json({"code": 0, "message": "success", "voice_id": conn.query["voice_id"],
                                "message_id": "x", "final": 1})

        srv, asr, got = self.make(on_open, vendor, model="16k_zh_large", language="zh-CN")
        self.feed(asr, tone(0.2))
        yield asr.close()
        [conn] = srv.connections
        self.assertEqual(conn.query["engine_model_type"], "16k_zh_large")

    @defer.inlineCallbacks
    def test_error_code_is_logged(self):
        def on_open(conn):
            conn.send_json({"code": 4002, "message": "鉴权失败", "voice_id": conn.query["voice_id"]})
            conn.close(1000)

        srv, asr, got = self.make(on_open, lambda *a: None)
        self.feed(asr, tone(0.1))
        conn = yield srv.next_connection()
        yield conn.closed
        yield asr.close()
        self.assertEqual(got, [])
        self.assertEqual(len(conn.audio), 0, "no audio before the service said yes")
        [failure] = self.flushLoggedErrors(SpeechError)
        self.assertEqual(str(failure.value), "tencent asr error 4002: 鉴权失败")

    def test_credentials_from_environment_and_errors(self):
        env = {"TENCENT_APPID": "1", "TENCENT_SECRET_ID": "id", "TENCENT_SECRET_KEY": "key"}
        asr = registry.create_recognizer({"provider": "tencent"}, list.append, env=env)
        url, headers = asr._request()
        self.assertTrue(url.startswith("wss://asr.cloud.tencent.com/asr/v2/1?engine_model_type=16k_zh_en&"))
        for missing, name in (("TENCENT_APPID", "appId"), ("TENCENT_SECRET_ID", "secretId"),
                              ("TENCENT_SECRET_KEY", "secretKey")):
            partial = {k: v for k, v in env.items() if k != missing}
            e = self.assertRaises(OptionError, registry.create_recognizer, {"provider": "tencent"}, list.append,
                                  env=partial)
            self.assertIn(missing, str(e))
            self.assertIn(name, str(e))


def tc3_expected(headers: dict, body: bytes, secret_key: str) -> str:
    """Tencent's TC3-HMAC-SHA256 steps, recomputed from what the server received."""
    ts = int(headers["x-tc-timestamp"])
    date = datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d")
    canonical = (f"POST\n/\n\ncontent-type:{headers['content-type']}\nhost:{headers['host']}\n"
                 f"x-tc-action:{headers['x-tc-action'].lower()}\n\ncontent-type;host;x-tc-action\n"
                 + hashlib.sha256(body).hexdigest())
    to_sign = f"TC3-HMAC-SHA256\n{ts}\n{date}/tts/tc3_request\n" + hashlib.sha256(canonical.encode()).hexdigest()

    def h(key, msg):
        return hmac.new(key, msg.encode(), hashlib.sha256).digest()

    key = h(h(h(("TC3" + secret_key).encode(), date), "tts"), "tc3_request")
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


class TencentSynthesizerTests(unittest.TestCase):
    timeout = 20

    def make(self, secret_key=SECRET_KEY, **options):
        self.audio = {}

        def answer(request, body):
            request.setHeader(b"content-type", b"application/json")
            req = srv.requests[-1]
            auth = req["headers"]["authorization"]
            date = datetime.fromtimestamp(int(req["headers"]["x-tc-timestamp"]), timezone.utc).strftime("%Y-%m-%d")
            expected = (f"TC3-HMAC-SHA256 Credential={SECRET_ID}/{date}/tts/tc3_request, "
                        f"SignedHeaders=content-type;host;x-tc-action, "
                        f"Signature={tc3_expected(req['headers'], body, SECRET_KEY)}")
            if auth != expected:
                return json.dumps({"Response": {"Error": {"Code": "AuthFailure.SignatureFailure",
                                                          "Message": "The provided credentials could not be "
                                                                     "validated."},
                                                "RequestId": "r"}}).encode()
            doc = json.loads(body)
            pcm = tone(0.1 * len(doc["Text"]) / 10, freq=300 + 10 * len(srv.requests))
            self.audio[doc["Text"]] = pcm
            return json.dumps({"Response": {"Audio": base64.b64encode(pcm.astype("<i2").tobytes()).decode(),
                                            "SessionId": doc["SessionId"], "Subtitles": [],
                                            "RequestId": "r"}}).encode()

        srv = HttpServer(self, answer)
        self.clock = task.Clock()
        self.clock.advance(1_700_000_123)
        opts = {"provider": "tencent", "endpoint": srv.base, "secretKey": secret_key,
                "extra": {"secretId": SECRET_ID, **options.pop("extra", {})}, **options}
        return srv, registry.create_synthesizer(opts, http=srv.http, reactor=self.clock)

    @defer.inlineCallbacks
    def test_signed_request_per_sentence_and_audio(self):
        srv, tts = self.make(speaker="101002", speed=1.2, volume=8, language="en-US",
                             extra={"region": "ap-guangzhou"})
        chunks = []
        text = "Hello there. How are you today?"
        samples = yield tts.synthesize(text, chunks.append)

        self.assertEqual(len(srv.requests), 2)
        req = srv.requests[0]
        self.assertEqual((req["method"], req["path"]), ("POST", "/"))
        h = req["headers"]
        self.assertEqual((h["x-tc-action"], h["x-tc-version"], h["x-tc-region"], h["x-tc-timestamp"]),
                         ("TextToVoice", "2019-08-23", "ap-guangzhou", "1700000123"))
        self.assertEqual(h["content-type"], "application/json; charset=utf-8")
        self.assertEqual(h["host"], srv.base.split("//")[1])
        body = json.loads(req["body"])
        self.assertRegex(body.pop("SessionId"), "^[0-9a-f-]{36}$")
        self.assertEqual(body, {"Text": "Hello there.", "VoiceType": 101002, "Codec": "pcm", "SampleRate": 16000,
                                "Speed": 1.0, "Volume": 6, "ModelType": 1, "PrimaryLanguage": 2})
        self.assertEqual(json.loads(srv.requests[1]["body"])["Text"], "How are you today?")
        self.assertNotIn(SECRET_KEY, json.dumps(h))
        expected = np.concatenate([self.audio["Hello there."], self.audio["How are you today?"]])
        np.testing.assert_array_equal(np.concatenate(chunks), expected)
        self.assertEqual(samples, expected.size)

    @defer.inlineCallbacks
    def test_guide_keys_voice_and_zh_cn(self):
        """``voice`` (the guide's key) is the VoiceType; ``zh-CN`` is Chinese (PrimaryLanguage 1)."""
        srv, tts = self.make(voice="101010", language="zh-CN")
        yield tts.synthesize("你好。", lambda pcm: None)
        body = json.loads(srv.requests[0]["body"])
        self.assertEqual((body["VoiceType"], body["PrimaryLanguage"]), (101010, 1))

    @defer.inlineCallbacks
    def test_defaults(self):
        srv, tts = self.make()
        yield tts.synthesize("你好。", lambda pcm: None)
        body = json.loads(srv.requests[0]["body"])
        self.assertEqual((body["VoiceType"], body["Speed"], body["Volume"]), (101001, 0.0, 0))
        self.assertNotIn("PrimaryLanguage", body)
        self.assertNotIn("x-tc-region", srv.requests[0]["headers"])

    @defer.inlineCallbacks
    def test_wrong_key_gets_tencents_error(self):
        srv, tts = self.make(secret_key="not-the-key")
        e = yield self.assertFailure(tts.synthesize("Hi.", list.append), SpeechError)
        self.assertEqual(str(e), "tencent tts failed: AuthFailure.SignatureFailure: The provided credentials "
                                 "could not be validated.")
        self.assertNotIn("not-the-key", str(e))

    def test_speed_scale_and_option_errors(self):
        self.assertEqual([tencent_speed(r) for r in (0.6, 0.8, 1.0, 1.2, 1.5, 2.5, 1.1)],
                         [-2, -1, 0, 1, 2, 6, 0.5])
        env = {"TENCENT_SECRET_ID": "id", "TENCENT_SECRET_KEY": "k"}
        tts = registry.create_synthesizer({"provider": "tencent_basic"}, env=env)
        self.assertEqual(tts.url, "https://tts.tencentcloudapi.com/")
        e = self.assertRaises(OptionError, registry.create_synthesizer, {"provider": "tencent"},
                              env={"TENCENT_SECRET_KEY": "k"})
        self.assertIn("TENCENT_SECRET_ID", str(e))
        self.assertRaises(OptionError, registry.create_synthesizer, {"provider": "tencent", "speaker": "alice"},
                          env=env)
        self.assertRaises(OptionError, registry.create_synthesizer, {"provider": "tencent", "speed": 3.0}, env=env)

    @defer.inlineCallbacks
    def test_cancel_between_sentences_aborts_the_request_and_the_rest(self):
        first = tone(0.3)
        held = defer.Deferred()

        def answer(request, body):
            request.setHeader(b"content-type", b"application/json")
            if len(srv.requests) == 1:
                return json.dumps({"Response": {"Audio": base64.b64encode(first.astype("<i2").tobytes()).decode(),
                                                "RequestId": "r"}}).encode()
            self.disconnected = request.notifyFinish()  # the second sentence: held open
            held.callback(None)
            return server.NOT_DONE_YET

        srv = HttpServer(self, answer)
        tts = registry.create_synthesizer(
            {"provider": "tencent", "endpoint": srv.base, "secretKey": SECRET_KEY, "extra": {"secretId": SECRET_ID}},
            http=srv.http, reactor=task.Clock())
        chunks = []
        d = tts.synthesize("Hello there. How are you today? Fine, thanks.", chunks.append)
        yield held
        np.testing.assert_array_equal(np.concatenate(chunks), first)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        yield self.assertFailure(self.disconnected, Exception)  # the request in flight was aborted
        self.assertEqual(sum(c.size for c in chunks), first.size)
        self.assertEqual(len(srv.requests), 2)  # and the third sentence never asked for
