"""Playbooks end to end through the real daemon: a /call WebSocket client speaks flite audio, the bot
greets, pocketsphinx hears the words, the LLM (a local fake OpenAI server started here, or the built-in
offline echo) answers, and the reply comes back as TTS audio and addHistory events."""

import json
import os

import numpy as np
import treq
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.client import HTTPConnectionPool

from tests.helpers import free_port, spawn_daemon, speak_into_call, write_config
from tests.wsclient import connect, send_json

SENTENCE = "I would like to check the status of my order."


class FakeOpenAI(resource.Resource):
    """POST /v1/chat/completions: records every request body and streams the next scripted reply."""

    isLeaf = True

    def __init__(self, *replies):
        super().__init__()
        self.replies = list(replies)
        self.requests = []

    def render_POST(self, request):
        self.requests.append({"auth": request.getHeader("authorization"), "body": json.loads(request.content.read())})
        request.setHeader(b"content-type", b"text/event-stream")
        # the last reply repeats: a preemptive request cancelled mid-turn must not use up the scripted answer
        text = (self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]) if self.replies else "OK."
        for word in text.split(" "):
            chunk = {"choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}]}
            request.write(f"data: {json.dumps(chunk)}\n\n".encode())
        request.write(b"data: [DONE]\n\n")
        request.finish()
        return server.NOT_DONE_YET


def wait_until(client, predicate, timeout=30.0):
    """Fires with the first event matching ``predicate`` (already received or yet to come)."""
    d = defer.Deferred()

    def check(elapsed=0.0):
        for event in client.events:
            if predicate(event):
                d.callback(event)
                return
        if elapsed > timeout:
            d.errback(AssertionError(f"no matching event; got {[e['event'] for e in client.events]}"))
            return
        reactor.callLater(0.05, check, elapsed + 0.05)

    check()
    return d


def is_event(name, **fields):
    return lambda e: e["event"] == name and all(e.get(k) == v for k, v in fields.items())


class PlaybookEndToEndTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        self.playbook_dir = os.path.join(self.root, "playbook")
        os.makedirs(self.playbook_dir)
        self.port = free_port()
        conf = write_config(self, f'''
addr = "127.0.0.1"
udp_port = {free_port()}
http_addr = "127.0.0.1:{self.port}"
media_cache_path = "{self.root}/cache"
playbook_dir = "{self.playbook_dir}"
[recording]
path = "{self.root}/rec"
''')
        self.daemon = spawn_daemon(self, conf)
        return self.daemon.wait_for("activecall ready")

    @defer.inlineCallbacks
    def test_llm_playbook_greets_hears_and_answers(self):
        llm = FakeOpenAI("Your order has shipped and arrives tomorrow. Goodbye! <hangup/>")
        listening = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server.Site(llm))
        self.addCleanup(listening.stopListening)
        with open(os.path.join(self.playbook_dir, "shop.md"), "w") as f:
            f.write(f"""---
llm:
  provider: openai
  baseUrl: http://127.0.0.1:{listening.getHost().port}/v1
  apiKey: sk-e2e
  model: e2e-model
greeting: "Hello, this is the shop. How can I help you?"
asr: {{provider: pocketsphinx}}
vad: {{type: webrtcvad}}
tts: {{provider: flite}}
---
You are the shop's phone assistant.
""")
        proto, client = yield connect(self, self.port, "/call", "id=e2e-llm")
        send_json(proto, {"command": "invite", "option": {"codec": "pcm", "playbook": "shop.md"}})
        yield client.wait_event("answer")
        greeting_end = yield wait_until(client, is_event("trackEnd", playId="greeting"))
        self.assertGreater(greeting_end["duration"], 1000)
        greeting_frames = len(client.audio)
        self.assertGreaterEqual(greeting_frames, greeting_end["duration"] // 20 - 1)
        self.assertEqual(llm.requests, [])  # a greeting, not an LLM turn

        yield speak_into_call(proto, SENTENCE)
        final = yield client.wait_event("asrFinal")
        reply_end = yield wait_until(client, is_event("trackEnd", playId="llm-1"))
        # preemptive replies (on by default): requests started on partials that changed were cancelled;
        # the last one is the reply that was spoken (asked on the partial the final confirmed, or asked again)
        self.assertGreaterEqual(len(llm.requests), 1)
        request = llm.requests[-1]
        self.assertEqual(request["auth"], "Bearer sk-e2e")
        self.assertEqual(request["body"]["model"], "e2e-model")
        self.assertTrue(request["body"]["stream"])
        messages = request["body"]["messages"]
        self.assertEqual(messages[0]["role"], "system")
        self.assertIn("shop's phone assistant", messages[0]["content"])
        self.assertEqual(messages[-1], {"role": "user", "content": final["text"]})
        self.assertIn("order", final["text"])
        # semantic end of turn is on by default for playbooks: Smart Turn judged the sentence complete
        verdicts = [e for e in client.events if e["event"] == "eou"]
        self.assertTrue(verdicts and verdicts[-1]["completed"] and "probability" in verdicts[-1], verdicts)
        self.assertIn("eou.smart_turn", [e["key"] for e in client.events if e["event"] == "metrics"])

        history = [(e["speaker"], e["text"]) for e in client.events if e["event"] == "addHistory"]
        self.assertEqual(history, [
            ("assistant", "Hello, this is the shop. How can I help you?"),
            ("user", final["text"]),
            ("assistant", "Your order has shipped and arrives tomorrow. Goodbye!"),
        ])
        self.assertTrue(all(e.get("sender") == "llm" for e in client.events if e["event"] == "addHistory"))
        self.assertGreater(reply_end["duration"], 1500)
        pcm = np.frombuffer(b"".join(client.audio[greeting_frames:]), dtype="<i2")
        self.assertGreater(np.abs(pcm).mean(), 100)  # the reply was spoken
        metrics = [e["key"] for e in client.events if e["event"] == "metrics"]
        self.assertIn("llm_call_start", metrics)
        self.assertIn("llm_response", metrics)
        code = yield client.closed  # <hangup/>: the call ends once the reply has played
        self.assertEqual(code, 1000)

    @defer.inlineCallbacks
    def test_echo_playbook_from_the_run_api_talks_offline(self):
        content = """---
llm: {provider: echo}
greeting: "Echo test. Say something."
asr: {provider: pocketsphinx}
vad: {type: webrtcvad}
tts: {provider: flite}
---
Diagnostics line.
"""
        response = yield treq.post(f"http://127.0.0.1:{self.port}/api/playbook/run", json={"content": content},
                                   pool=HTTPConnectionPool(reactor, persistent=False))
        session_id = (yield response.json())["session_id"]
        proto, client = yield connect(self, self.port, "/call", f"id={session_id}")
        send_json(proto, {"command": "invite", "option": {"codec": "pcm"}})
        yield wait_until(client, is_event("trackEnd", playId="greeting"))
        yield speak_into_call(proto, SENTENCE)
        final = yield client.wait_event("asrFinal")
        said = yield wait_until(client, lambda e: e["event"] == "addHistory" and e["text"].startswith("You said"))
        self.assertIn(final["text"].rstrip("."), said["text"])
        yield wait_until(client, is_event("trackEnd", playId="llm-1"))
        send_json(proto, {"command": "hangup"})
        yield client.closed

    @defer.inlineCallbacks
    def test_playbook_without_speech_blocks_hears_with_the_defaults(self):
        """No asr/vad/tts in the playbook: the call still listens and speaks, with the defaults for its
        language (English: the offline pair), and says which in a ``metrics`` event."""
        from activecall.speech import defaults
        with open(os.path.join(self.playbook_dir, "plain.md"), "w") as f:
            f.write('---\nllm: {provider: echo}\ngreeting: "Echo test. Say something."\n---\nDiagnostics.\n')
        proto, client = yield connect(self, self.port, "/call", "id=e2e-defaults")
        send_json(proto, {"command": "invite", "option": {"codec": "pcm", "playbook": "plain.md"}})
        yield client.wait_event("answer")
        providers = yield wait_until(client, is_event("metrics", key="speech.providers"))
        self.assertEqual(providers["data"], {"vad": "silero", "asr": defaults.offline_asr("en")["provider"],
                                             "tts": defaults.offline_tts("en")["provider"], "language": "en"})
        yield wait_until(client, is_event("trackEnd", playId="greeting"))
        yield speak_into_call(proto, SENTENCE)
        final = yield client.wait_event("asrFinal")
        self.assertIn("order", final["text"].lower())
        yield wait_until(client, lambda e: e["event"] == "addHistory" and e["text"].startswith("You said"))
        send_json(proto, {"command": "hangup"})
        yield client.closed

    @defer.inlineCallbacks
    def test_mandarin_playbook_uses_the_chinese_defaults(self):
        """``language: zh`` and no provider named: no offline Chinese recogniser is installed here, so the
        guide's cloud default (aliyun) hears the caller (a local server speaking its protocol answers in
        Chinese); the echo reply is spoken by the offline Mandarin voice (espeak-ng cmn)."""
        from tests.cloud_helpers import WsServer

        def vendor(conn, payload, is_binary):
            task_id = conn.texts[0]["header"]["task_id"]

            def send(name, payload):
                conn.send_json({"header": {"task_id": task_id, "event": name, "attributes": {}},
                                "payload": payload})
            if not is_binary and conn.texts[-1]["header"]["action"] == "run-task":
                send("task-started", {})
            elif is_binary and len(conn.audio) >= 32000 and not getattr(conn, "answered", False):
                conn.answered = True
                send("result-generated", {"output": {"sentence": {
                    "begin_time": 0, "end_time": 1000, "text": "我想查询订单", "words": [],
                    "sentence_end": True}}, "usage": None})
            elif not is_binary and conn.texts[-1]["header"]["action"] == "finish-task":
                send("task-finished", {"output": {}, "usage": {"duration": 1}})

        srv = WsServer(self, vendor)
        with open(os.path.join(self.playbook_dir, "zh.md"), "w") as f:
            f.write(f'---\nlanguage: zh-CN\nllm: {{provider: echo}}\n'
                    f'asr: {{endpoint: "{srv.base}/api-ws/v1/inference", secretKey: sk-local}}\n---\n客服。\n')
        proto, client = yield connect(self, self.port, "/call", "id=e2e-zh")
        send_json(proto, {"command": "invite", "option": {"codec": "pcm", "playbook": "zh.md"}})
        yield client.wait_event("answer")
        providers = yield wait_until(client, is_event("metrics", key="speech.providers"))
        self.assertEqual(providers["data"], {"vad": "silero", "asr": "aliyun", "tts": "espeak", "language": "zh"})
        yield wait_until(client, is_event("trackEnd"))  # the echo's own greeting, spoken in Mandarin
        yield speak_into_call(proto, SENTENCE)
        final = yield client.wait_event("asrFinal")
        self.assertEqual(final["text"], "我想查询订单")
        [conn] = srv.connections
        self.assertEqual(conn.texts[0]["payload"]["parameters"]["language_hints"], ["zh"])
        heard = len(client.audio)
        yield wait_until(client, lambda e: e["event"] == "addHistory" and e["speaker"] == "assistant"
                         and "我想查询订单" in e["text"])
        ends = lambda: [e for e in client.events if e["event"] == "trackEnd"]  # noqa: E731
        yield wait_until(client, lambda e: len(ends()) >= 2)  # the greeting's, then the reply's
        pcm = np.frombuffer(b"".join(client.audio[heard:]), dtype="<i2")
        self.assertGreater(np.abs(pcm).mean(), 100)  # the Chinese reply was spoken
        send_json(proto, {"command": "hangup"})
        yield client.closed

    @defer.inlineCallbacks
    def test_a_missing_playbook_is_an_error_and_the_socket_closes(self):
        proto, client = yield connect(self, self.port, "/call", "id=e2e-missing")
        send_json(proto, {"command": "invite", "option": {"codec": "pcm", "playbook": "../secrets.md"}})
        error = yield client.wait_event("error")
        self.assertEqual(error["sender"], "playbook")
        self.assertNotIn("answer", [e["event"] for e in client.events])
        yield client.closed
