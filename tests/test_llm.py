"""LLM client against a real local twisted.web server speaking (and mis-speaking) OpenAI SSE."""

import json

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial import unittest
from twisted.web import resource, server

from activecall.playbook import llm
from activecall.playbook.llm import LLMClient, LLMError, LLMSettings, SSEEvent, SSEParser

KEY = "sk-secret-test-key"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def chunk(content=None, finish=None, **delta):
    if content is not None:
        delta["content"] = content
    return "data: " + json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"


class ScriptedLLM(resource.Resource):
    """POST /v1/chat/completions: records each request, then plays ``script`` -- a list of steps:
    bytes/str to write, ("delay", seconds), "hang" (stop here, keep the connection), "cut" (drop the
    connection mid-stream), "end" (finish the response)."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.requests = []
        self.script = []
        self.status = 200
        self.content_type = b"text/event-stream"
        self.received = defer.Deferred()
        self.closed = defer.Deferred()
        self.pending = []

    def render_POST(self, request):
        self.requests.append(
            {
                "path": request.path,
                "headers": {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()},
                "body": json.loads(request.content.read()),
            }
        )
        request.setResponseCode(self.status)
        request.setHeader(b"content-type", self.content_type)
        request.notifyFinish().addBoth(lambda _: self.closed.called or self.closed.callback("closed"))
        self._play(request, list(self.script))
        if not self.received.called:
            self.received.callback(None)
        return server.NOT_DONE_YET

    def _play(self, request, steps):
        while steps:
            step = steps.pop(0)
            if isinstance(step, tuple) and step[0] == "delay":
                self.pending.append(reactor.callLater(step[1], self._play, request, steps))
                return
            if step == "hang":
                return
            if step == "cut":
                request.transport.abortConnection()
                return
            if step == "end":
                request.finish()
                return
            request.write(step.encode() if isinstance(step, str) else step)


class ServerTestCase(unittest.TestCase):
    def setUp(self):
        self.llm = ScriptedLLM()
        site = server.Site(self.llm)
        site.displayTracebacks = False
        d = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)

        def listening(port):
            self.port = port
            self.addCleanup(port.stopListening)
            self.addCleanup(lambda: [c.cancel() for c in self.llm.pending if c.active()])
            self.base_url = f"http://127.0.0.1:{port.getHost().port}/v1"

        return d.addCallback(listening)

    def client(self, clock=None, **kw):
        settings = LLMSettings(base_url=self.base_url, api_key=KEY, model="test-model", **kw)
        return LLMClient(settings, clock=clock)


class StreamTests(ServerTestCase):
    @defer.inlineCallbacks
    def test_streams_deltas_and_sends_request(self):
        first = chunk(role="assistant", content="Hel")
        self.llm.script = [
            ": keep-alive comment\n\n",
            first[:20],
            ("delay", 0.01),
            first[20:].replace("\n\n", "\r\n\r\n"),
            chunk("lo! ", reasoning_content="thinking"),
            ("delay", 0.01),
            chunk("How are you?", finish="stop"),
            "data: [DONE]\n\n",
            "end",
        ]
        deltas = []
        reply = yield self.client(temperature=0.3, max_tokens=50).stream(MESSAGES, deltas.append)
        self.assertEqual(deltas, ["Hel", "lo! ", "How are you?"])
        self.assertEqual(reply, llm.LLMReply("Hello! How are you?", "thinking", (), "stop"))
        [req] = self.llm.requests
        self.assertEqual(req["path"], b"/v1/chat/completions")
        self.assertEqual(req["headers"]["authorization"], f"Bearer {KEY}")
        self.assertEqual(req["headers"]["content-type"], "application/json")
        body = req["body"]
        self.assertEqual(body["model"], "test-model")
        self.assertEqual(body["messages"], MESSAGES)
        self.assertIs(body["stream"], True)
        self.assertEqual((body["temperature"], body["max_tokens"]), (0.3, 50))
        self.assertNotIn("tools", body)

    @defer.inlineCallbacks
    def test_optional_fields_omitted_without_key(self):
        self.llm.script = [chunk("ok", finish="stop"), "data: [DONE]\n\n", "end"]
        client = LLMClient(LLMSettings(base_url=self.base_url + "/chat/completions", model="m"))
        yield client.stream(MESSAGES, lambda t: None)
        [req] = self.llm.requests
        self.assertEqual(req["path"], b"/v1/chat/completions")
        self.assertNotIn("authorization", req["headers"])
        self.assertEqual(sorted(req["body"]), ["messages", "model", "stream"])

    @defer.inlineCallbacks
    def test_tool_calls_accumulate(self):
        tools = [{"type": "function", "function": {"name": "hangup", "parameters": {"type": "object"}}}]
        call = lambda **kw: {"index": 0, **kw}  # noqa: E731
        self.llm.script = [
            chunk(tool_calls=[call(id="c1", function={"name": "hang", "arguments": ""})]),
            chunk(tool_calls=[call(function={"name": "up", "arguments": '{"reason":'})]),
            chunk(tool_calls=[call(function={"arguments": ' "bye"}'})], finish="tool_calls"),
            "data: [DONE]\n\n",
            "end",
        ]
        reply = yield self.client().stream(MESSAGES, lambda t: None, tools=tools)
        self.assertEqual(reply.tool_calls, (llm.ToolCall("c1", "hangup", '{"reason": "bye"}'),))
        self.assertEqual(self.llm.requests[0]["body"]["tools"], tools)

    @defer.inlineCallbacks
    def test_end_without_done_after_finish_reason(self):
        self.llm.script = [chunk("Bye.", finish="stop"), "end"]
        reply = yield self.client().stream(MESSAGES, lambda t: None)
        self.assertEqual(reply.content, "Bye.")

    @defer.inlineCallbacks
    def test_end_without_done_or_finish_is_error(self):
        self.llm.script = [chunk("Half a"), "end"]
        d = self.client().stream(MESSAGES, lambda t: None)
        e = yield self.assertFailure(d, LLMError)
        self.assertIn("before [DONE]", str(e))

    @defer.inlineCallbacks
    def test_json_answer_to_stream_request(self):
        self.llm.content_type = b"application/json"
        self.llm.script = [json.dumps({"choices": [{"message": {"content": "Whole."}, "finish_reason": "stop"}]}), "end"]
        deltas = []
        reply = yield self.client().stream(MESSAGES, deltas.append)
        self.assertEqual((reply.content, deltas), ("Whole.", ["Whole."]))

    @defer.inlineCallbacks
    def test_callback_error_does_not_break_stream(self):
        self.llm.script = [chunk("a"), chunk("b", finish="stop"), "data: [DONE]\n\n", "end"]

        def explode(text):
            raise RuntimeError("bug in caller")

        reply = yield self.client().stream(MESSAGES, explode)
        self.assertEqual(reply.content, "ab")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)


class FailureTests(ServerTestCase):
    @defer.inlineCallbacks
    def test_http_500(self):
        self.llm.status = 500
        self.llm.content_type = b"application/json"
        self.llm.script = [json.dumps({"error": {"message": "model overloaded"}}), "end"]
        e = yield self.assertFailure(self.client().stream(MESSAGES, lambda t: None), LLMError)
        self.assertEqual(e.status, 500)
        self.assertIn("model overloaded", str(e))
        self.assertNotIn(KEY, str(e))

    @defer.inlineCallbacks
    def test_http_401_plain_text(self):
        self.llm.status = 401
        self.llm.content_type = b"text/plain"
        self.llm.script = ["bad key", "end"]
        e = yield self.assertFailure(self.client().complete(MESSAGES), LLMError)
        self.assertEqual((e.status, e.message), (401, "LLM HTTP 401: bad key"))

    @defer.inlineCallbacks
    def test_error_event_mid_stream(self):
        self.llm.script = [chunk("Hi"), 'data: {"error": {"message": "context too long"}}\n\n', "hang"]
        e = yield self.assertFailure(self.client().stream(MESSAGES, lambda t: None), LLMError)
        self.assertIn("context too long", str(e))

    @defer.inlineCallbacks
    def test_cut_stream(self):
        self.llm.script = [chunk("Hel"), ("delay", 0.01), 'data: {"choi', "cut"]
        deltas = []
        e = yield self.assertFailure(self.client().stream(MESSAGES, deltas.append), LLMError)
        self.assertEqual(deltas, ["Hel"])
        self.assertIn("broken", str(e))

    @defer.inlineCallbacks
    def test_connection_refused(self):
        client = LLMClient(LLMSettings(base_url="http://127.0.0.1:1/v1", api_key=KEY))
        e = yield self.assertFailure(client.stream(MESSAGES, lambda t: None), LLMError)
        self.assertIn("request failed", str(e))
        self.assertNotIn(KEY, str(e))

    @defer.inlineCallbacks
    def test_response_timeout(self):
        clock = task.Clock()
        self.llm.script = ["hang"]  # headers are never flushed without a body write
        d = self.client(clock=clock, connect_timeout=5).stream(MESSAGES, lambda t: None)
        yield self.llm.received
        clock.advance(4.9)
        self.assertNoResult(d)
        clock.advance(0.2)
        e = yield self.assertFailure(d, LLMError)
        self.assertIn("response timed out after 5 s", str(e))
        yield self.llm.closed  # the connection was dropped

    @defer.inlineCallbacks
    def test_idle_timeout(self):
        clock = task.Clock()
        got_first = defer.Deferred()
        self.llm.script = [chunk("Hi"), "hang"]
        d = self.client(clock=clock, idle_timeout=2).stream(MESSAGES, lambda t: got_first.called or got_first.callback(t))
        yield got_first
        clock.advance(1.9)
        self.assertNoResult(d)
        clock.advance(0.2)
        e = yield self.assertFailure(d, LLMError)
        self.assertIn("stream timed out after 2 s", str(e))
        yield self.llm.closed

    @defer.inlineCallbacks
    def test_cancel_at_once(self):
        clock = task.Clock()
        got_first = defer.Deferred()
        deltas = []

        def on_delta(text):
            deltas.append(text)
            if not got_first.called:
                got_first.callback(None)

        self.llm.script = [chunk("Hi"), ("delay", 0.05), chunk(" there"), "hang"]
        d = self.client(clock=clock).stream(MESSAGES, on_delta)
        yield got_first
        d.cancel()
        yield self.assertFailure(d, defer.CancelledError)
        yield self.llm.closed
        self.assertEqual(deltas, ["Hi"])
        self.assertEqual(clock.getDelayedCalls(), [])  # no timer left behind

    @defer.inlineCallbacks
    def test_cancel_before_response(self):
        clock = task.Clock()
        self.llm.script = ["hang"]
        d = self.client(clock=clock).stream(MESSAGES, lambda t: None)
        yield self.llm.received
        d.cancel()
        yield self.assertFailure(d, defer.CancelledError)
        self.assertEqual(clock.getDelayedCalls(), [])


class CompleteTests(ServerTestCase):
    @defer.inlineCallbacks
    def test_non_streaming(self):
        self.llm.content_type = b"application/json"
        answer = {"choices": [{"message": {"role": "assistant", "content": "Summary."}, "finish_reason": "stop"}]}
        self.llm.script = [json.dumps(answer), "end"]
        reply = yield self.client().complete(MESSAGES)
        self.assertEqual(reply.content, "Summary.")
        self.assertNotIn("stream", self.llm.requests[0]["body"])

    @defer.inlineCallbacks
    def test_not_a_completion(self):
        self.llm.content_type = b"application/json"
        self.llm.script = ['{"weird": true}', "end"]
        e = yield self.assertFailure(self.client().complete(MESSAGES), LLMError)
        self.assertIn("not a chat completion", str(e))


class SettingsTests(unittest.TestCase):
    def test_env_fallbacks(self):
        env = {"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": "http://o/v1", "OPENAI_MODEL": "m"}
        self.assertEqual(LLMSettings.from_values(environ=env), LLMSettings("http://o/v1", "k", "m"))
        self.assertEqual(LLMSettings.from_values("http://x", "k2", "m2", environ=env), LLMSettings("http://x", "k2", "m2"))
        bare = LLMSettings.from_values(environ={})
        self.assertEqual((bare.base_url, bare.model, bare.api_key), (llm.DEFAULT_BASE_URL, llm.DEFAULT_MODEL, None))
        self.assertNotIn("k2", repr(LLMSettings.from_values("http://x", "k2", "m2", environ={})))

    def test_from_playbook(self):
        from activecall.playbook.parser import parse_playbook

        pb = parse_playbook("---\nllm:\n  apiKey: k\n  temperature: 0.5\n  idleTimeoutMs: 1500\n---\n", environ={})
        settings = LLMSettings.from_playbook(pb.config.llm, environ={})
        self.assertEqual((settings.api_key, settings.temperature, settings.idle_timeout), ("k", 0.5, 1.5))

    def test_chat_url(self):
        self.assertEqual(llm.chat_url("http://h/v1"), "http://h/v1/chat/completions")
        self.assertEqual(llm.chat_url("http://h/v1/"), "http://h/v1/chat/completions")
        self.assertEqual(llm.chat_url("http://h/v1/chat/completions"), "http://h/v1/chat/completions")


class SSEParserTests(unittest.TestCase):
    STREAM = b": hello\r\ndata: one\r\n\r\nevent: note\ndata: two\ndata: lines\nid: 7\n\ndata:three\r\rdata\n\n"
    EXPECTED = [SSEEvent("one"), SSEEvent("two\nlines", "note", "7"), SSEEvent("three", "message", "7"), SSEEvent("", "message", "7")]

    def test_whole(self):
        parser = SSEParser()
        self.assertEqual(parser.feed(self.STREAM) + parser.close(), self.EXPECTED)

    def test_split_at_every_byte(self):
        for i in range(len(self.STREAM) + 1):
            parser = SSEParser()
            events = parser.feed(self.STREAM[:i]) + parser.feed(self.STREAM[i:]) + parser.close()
            self.assertEqual(events, self.EXPECTED, i)
        parser = SSEParser()
        events = [e for b in range(len(self.STREAM)) for e in parser.feed(self.STREAM[b : b + 1])]
        self.assertEqual(events + parser.close(), self.EXPECTED)

    def test_unterminated_event_delivered_at_close(self):
        parser = SSEParser()
        self.assertEqual(parser.feed(b"data: [DONE]"), [])
        self.assertEqual(parser.close(), [SSEEvent("[DONE]")])

    def test_utf8_split_inside_character(self):
        data = "data: 你好\n\n".encode()
        parser = SSEParser()
        self.assertEqual(parser.feed(data[:8]) + parser.feed(data[8:]), [SSEEvent("你好")])
