"""Aliyun DashScope: paraformer realtime ASR and CosyVoice TTS against a local server speaking the DashScope
WebSocket protocol (run-task / task-started / result-generated / finish-task / task-finished / task-failed)."""

from __future__ import annotations

import numpy as np
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import defer, task
from twisted.trial import unittest

from activecall.speech import registry
from activecall.speech.base import OptionError, SpeechError
from activecall.speech.testing import frames
from tests.cloud_helpers import WsServer, tone

KEY = "sk-dashscope-secret"
PATH = "/api-ws/v1/inference"


def event(conn, name, payload=None, **header):
    task_id = conn.texts[0]["header"]["task_id"]
    conn.send_json({"header": {"task_id": task_id, "event": name, "attributes": {}, **header},
                    "payload": payload if payload is not None else {}})


def sentence(conn, text, begin, end=None, sentence_end=False, **more):
    event(conn, "result-generated", {"output": {"sentence": {
        "begin_time": begin, "end_time": end, "text": text, "words": [], "sentence_end": sentence_end,
        **more}}, "usage": None})


class ParaformerTests(unittest.TestCase):
    timeout = 20

    def make(self, on_message, refuse=None, **options):
        srv = WsServer(self, on_message, refuse=refuse)
        self.clock = task.Clock()
        got = []
        opts = {"provider": "aliyun", "endpoint": srv.base, "secretKey": KEY, **options}
        asr = registry.create_recognizer(opts, got.append, reactor=self.clock)
        return srv, asr, got

    def feed(self, asr, pcm):
        for f in frames(pcm):
            self.clock.advance(0.02)
            asr.feed(f)

    @defer.inlineCallbacks
    def test_task_protocol_field_by_field(self):
        audio = tone(0.6)

        def vendor(conn, payload, is_binary):
            if not is_binary and conn.texts[-1]["header"]["action"] == "run-task":
                self.audio_before_start = len(conn.audio)
                event(conn, "task-started")
            elif is_binary and len(conn.audio) == 3200:
                sentence(conn, "你好", 100)
                sentence(conn, "", 100, heartbeat=True)
                sentence(conn, "你好世界", 100, 520, sentence_end=True)
            elif not is_binary and conn.texts[-1]["header"]["action"] == "finish-task":
                sentence(conn, "再见", 600, 600, sentence_end=True)
                event(conn, "task-finished", {"output": {}, "usage": {"duration": 1}})

        srv, asr, got = self.make(vendor, language="zh", modelType="paraformer-realtime-8k-v2",
                                  extra={"max_sentence_silence": "800", "disfluency_removal_enabled": "true",
                                         "vocabulary_id": "vocab-123", "close_timeout": "3"})
        self.feed(asr, audio)
        yield asr.close()

        [conn] = srv.connections
        self.assertEqual(conn.path, PATH)
        self.assertEqual(conn.headers["authorization"], f"bearer {KEY}")
        self.assertEqual(self.audio_before_start, 0, "no audio before task-started")
        run, finish = conn.texts
        task_id = run["header"]["task_id"]
        self.assertRegex(task_id, "^[0-9a-f]{32}$")
        self.assertEqual(run, {
            "header": {"action": "run-task", "task_id": task_id, "streaming": "duplex"},
            "payload": {"task_group": "audio", "task": "asr", "function": "recognition",
                        "model": "paraformer-realtime-8k-v2",
                        "parameters": {"format": "pcm", "sample_rate": 16000, "language_hints": ["zh"],
                                       "max_sentence_silence": 800, "disfluency_removal_enabled": True,
                                       "vocabulary_id": "vocab-123"},
                        "input": {}}})
        self.assertEqual(finish, {"header": {"action": "finish-task", "task_id": task_id, "streaming": "duplex"},
                                  "payload": {"input": {}}})
        self.assertEqual(bytes(conn.audio), audio.astype("<i2").tobytes())
        self.assertEqual([size for binary, size in conn.frames if binary], [3200] * 6)
        self.assertEqual(conn.close_code, 1000)

        self.assertEqual([(r.index, r.text, r.final, r.start_ms, r.end_ms) for r in got], [
            (0, "你好", False, 100, None), (0, "你好世界", True, 100, 520), (1, "再见", True, 600, 600)])
        # the answers came with the clock at 0.6 s; the audio at 100 ms had been fed at 0.12 s
        self.assertEqual(got[0].ttfb_ms, 480)
        self.assertIsNone(got[1].ttfb_ms)

    @defer.inlineCallbacks
    def test_guide_keys_model_and_zh_cn_kept(self):
        """``model`` (the guide's key) is the task's model; ``zh-CN`` reaches language_hints unchanged."""
        def vendor(conn, payload, is_binary):
            if not is_binary and conn.texts[-1]["header"]["action"] == "run-task":
                event(conn, "task-started")
            elif not is_binary and conn.texts[-1]["header"]["action"] == "finish-task":
                event(conn, "task-finished", {"output": {}, "usage": {"duration": 1}})

        srv, asr, got = self.make(vendor, language="zh-CN", model="paraformer-realtime-v1")
        self.feed(asr, tone(0.2))
        yield asr.close()
        [conn] = srv.connections
        run = conn.texts[0]["payload"]
        self.assertEqual(run["model"], "paraformer-realtime-v1")
        self.assertEqual(run["parameters"], {"format": "pcm", "sample_rate": 16000, "language_hints": ["zh-CN"]})

    @defer.inlineCallbacks
    def test_task_failed_is_logged_with_code_and_message(self):
        def vendor(conn, payload, is_binary):
            if not is_binary:
                event(conn, "task-failed", error_code="InvalidParameter",
                      error_message="Model not found (paraformer-x)!")

        srv, asr, got = self.make(vendor, modelType="paraformer-x")
        self.feed(asr, tone(0.2))
        conn = yield srv.next_connection()
        yield conn.closed
        yield asr.close()
        self.assertEqual(got, [])
        [failure] = self.flushLoggedErrors(SpeechError)
        self.assertEqual(str(failure.value),
                         "aliyun task failed: InvalidParameter: Model not found (paraformer-x)!")

    @defer.inlineCallbacks
    def test_refused_key(self):
        def refuse(conn):
            raise ConnectionDeny(401, "Unauthorized")

        srv, asr, got = self.make(lambda *a: None, refuse=refuse)
        self.feed(asr, tone(0.1))
        yield asr.close()
        [failure] = self.flushLoggedErrors(SpeechError)
        self.assertIn("[401]", str(failure.value))
        self.assertNotIn(KEY, str(failure.value))

    @defer.inlineCallbacks
    def test_no_task_finished_times_out_on_the_clock(self):
        def vendor(conn, payload, is_binary):
            if not is_binary and len(conn.texts) == 1:
                event(conn, "task-started")

        srv, asr, got = self.make(vendor, extra={"close_timeout": "2"})
        self.feed(asr, tone(0.1))
        conn = yield srv.next_connection()
        closing = asr.close()
        yield conn.wait_for(lambda c: len(c.texts) == 2)
        self.assertNoResult(closing)
        self.clock.advance(2)
        yield closing
        [failure] = self.flushLoggedErrors(SpeechError)
        self.assertIn("no end of stream from the service within 2 s", str(failure.value))

    def test_missing_key_and_defaults(self):
        e = self.assertRaises(OptionError, registry.create_recognizer, {"provider": "aliyun"}, list.append, env={})
        self.assertIn("DASHSCOPE_API_KEY", str(e))
        asr = registry.create_recognizer({"provider": "aliyun"}, list.append, env={"DASHSCOPE_API_KEY": "k"})
        self.assertEqual(asr._request(), ("wss://dashscope.aliyuncs.com/api-ws/v1/inference",
                                          {"Authorization": "bearer k"}))
        self.assertEqual(asr.run_task()["payload"]["model"], "paraformer-realtime-v2")
        self.assertEqual(asr.run_task()["payload"]["parameters"], {"format": "pcm", "sample_rate": 16000})


class CosyVoiceTests(unittest.TestCase):
    timeout = 20

    def make(self, on_message, **options):
        srv = WsServer(self, on_message)
        opts = {"provider": "aliyun", "endpoint": srv.base + PATH, "secretKey": KEY, **options}
        return srv, registry.create_synthesizer(opts)

    @defer.inlineCallbacks
    def test_task_protocol_and_streamed_audio(self):
        audio = tone(0.5)
        data = audio.astype("<i2").tobytes()

        def vendor(conn, payload, is_binary):
            action = conn.texts[-1]["header"]["action"]
            if action == "run-task":
                event(conn, "task-started")
            elif action == "finish-task":
                for i in range(0, len(data), 3001):  # odd sizes: frames split samples
                    conn.send_binary(data[i:i + 3001])
                    event(conn, "result-generated", {"output": {"sentence": {"words": []}}})
                event(conn, "task-finished", {"output": {}, "usage": {"characters": 6}})

        srv, tts = self.make(vendor, speaker="longxiaochun", model="cosyvoice-v1", speed=1.5, volume=8,
                             extra={"pitch": "1.2"})
        chunks = []
        samples = yield tts.synthesize("你好，欢迎。", chunks.append)

        [conn] = srv.connections
        self.assertEqual(conn.path, PATH)
        self.assertEqual(conn.headers["authorization"], f"bearer {KEY}")
        run, cont, finish = conn.texts
        task_id = run["header"]["task_id"]
        self.assertEqual(run, {
            "header": {"action": "run-task", "task_id": task_id, "streaming": "duplex"},
            "payload": {"task_group": "audio", "task": "tts", "function": "SpeechSynthesizer",
                        "model": "cosyvoice-v1",
                        "parameters": {"text_type": "PlainText", "voice": "longxiaochun", "format": "pcm",
                                       "sample_rate": 16000, "volume": 80, "rate": 1.5, "pitch": 1.2},
                        "input": {}}})
        self.assertEqual(cont, {"header": {"action": "continue-task", "task_id": task_id, "streaming": "duplex"},
                                "payload": {"input": {"text": "你好，欢迎。"}}})
        self.assertEqual(finish["header"]["action"], "finish-task")
        self.assertEqual(conn.close_code, 1000)
        self.assertGreater(len(chunks), 2)
        np.testing.assert_array_equal(np.concatenate(chunks), audio)
        self.assertEqual(samples, audio.size)

    @defer.inlineCallbacks
    def test_guide_keys_voice_and_model(self):
        """``voice`` (the guide's key) is the task's voice, ``model`` its model."""
        def vendor(conn, payload, is_binary):
            action = conn.texts[-1]["header"]["action"]
            if action == "run-task":
                event(conn, "task-started")
            elif action == "finish-task":
                event(conn, "task-finished", {"output": {}, "usage": {"characters": 2}})

        srv, tts = self.make(vendor, voice="longwan", model="cosyvoice-v2", language="zh-CN")
        yield tts.synthesize("你好。", lambda pcm: None)
        [conn] = srv.connections
        payload = conn.texts[0]["payload"]
        self.assertEqual((payload["model"], payload["parameters"]["voice"]), ("cosyvoice-v2", "longwan"))

    @defer.inlineCallbacks
    def test_task_failed(self):
        def vendor(conn, payload, is_binary):
            event(conn, "task-failed", error_code="InvalidParameter", error_message="voice not found")

        srv, tts = self.make(vendor, speaker="nobody")
        e = yield self.assertFailure(tts.synthesize("hi", list.append), SpeechError)
        self.assertEqual(str(e), "aliyun task failed: InvalidParameter: voice not found")
        self.assertEqual(srv.connections[0].texts[0]["payload"]["parameters"]["voice"], "nobody")

    @defer.inlineCallbacks
    def test_cancel_drops_the_socket_and_the_rest(self):
        def vendor(conn, payload, is_binary):
            action = conn.texts[-1]["header"]["action"]
            if action == "run-task":
                event(conn, "task-started")
            elif action == "finish-task":
                conn.send_binary(tone(0.1).astype("<i2").tobytes())  # then nothing: a long synthesis

        srv, tts = self.make(vendor)
        chunks = []
        first = defer.Deferred()

        def sink(pcm):
            chunks.append(pcm)
            first.callback(None)

        d = tts.synthesize("a long text", sink)
        yield first
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        yield srv.connections[0].closed
        self.assertEqual(len(chunks), 1)

    @defer.inlineCallbacks
    def test_cancel_from_the_sink_mid_stream(self):
        def vendor(conn, payload, is_binary):
            action = conn.texts[-1]["header"]["action"]
            if action == "run-task":
                event(conn, "task-started")
            elif action == "finish-task":
                for _ in range(5):  # several frames in one burst: the client may read them in one go
                    conn.send_binary(tone(0.1).astype("<i2").tobytes())

        srv, tts = self.make(vendor)
        chunks = []

        def sink(pcm):
            chunks.append(pcm)
            d.cancel()

        d = tts.synthesize("a long text", sink)
        conn = yield srv.next_connection()
        yield conn.closed
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(len(chunks), 1)

    def test_defaults_and_option_errors(self):
        tts = registry.create_synthesizer({"provider": "aliyun"}, env={"DASHSCOPE_API_KEY": "k"})
        params = tts.run_task("t")["payload"]
        self.assertEqual((params["model"], params["parameters"]["voice"], params["parameters"]["volume"]),
                         ("cosyvoice-v2", "longyumi_v2", 50))
        e = self.assertRaises(OptionError, registry.create_synthesizer, {"provider": "aliyun"}, env={})
        self.assertIn("DASHSCOPE_API_KEY", str(e))
        self.assertRaises(OptionError, registry.create_synthesizer, {"provider": "aliyun", "speed": 3.0},
                          env={"DASHSCOPE_API_KEY": "k"})
