"""The SSE event stream and the command route in-process (``web/events.py``), on task.Clock with
twisted.web's DummyRequest: backlog, ``Last-Event-ID``, keep-alives, the end of the stream, a client
that goes away, commands and their errors.  The same routes through the daemon: tests/test_media_pass.py."""

import json

from twisted.internet import task
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web import server
from twisted.web.test.requesthelper import DummyRequest

from activecall.call.session import CallSession
from activecall.protocol import commands as cmd
from activecall.web.events import CommandPost, EventStream


def sse_events(request):
    text = b"".join(request.written).decode()
    ids = [int(line[4:]) for line in text.splitlines() if line.startswith("id: ")]
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    return ids, events, text


class EventStreamTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.sent = []
        self.session = CallSession("c1", "webSocket", clock=self.clock, emit=self.sent.append, dump=False)
        self.session.option = cmd.CallOption()
        self.sessions = {"c1": self.session}
        self.stream = EventStream(self.sessions, self.clock, keepalive=15)
        self.own_listeners = list(self.session.listeners)  # the session's own (barge-in), not the stream's

    def get(self, last_id=None):
        request = DummyRequest([b"c1"])
        if last_id is not None:
            request.requestHeaders.setRawHeaders(b"last-event-id", [str(last_id).encode()])
        self.assertEqual(self.stream.render_GET(request), server.NOT_DONE_YET)
        return request

    def test_backlog_live_events_keepalive_and_the_end(self):
        self.session.answered()  # trackStart, answer: before anyone watches
        request = self.get()
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"), [b"text/event-stream; charset=utf-8"])
        self.session.receive_frame('{"command":"history","speaker":"user","text":"hi"}')
        self.clock.advance(15)
        ids, events, text = sse_events(request)
        self.assertEqual([e["event"] for e in events], ["trackStart", "answer", "addHistory"])
        self.assertEqual(ids, [1, 2, 3])
        self.assertIn(": keepalive", text)
        self.assertEqual(events, [json.loads(e.to_json()) for e in self.sent])  # the WebSocket's JSON
        self.assertFalse(request.finished)
        self.session.end("caller")
        ids, events, _ = sse_events(request)
        self.assertEqual(events[-1]["event"], "end")
        self.assertEqual(ids, list(range(1, len(ids) + 1)))
        self.assertTrue(request.finished)
        self.assertEqual(self.session.listeners, self.own_listeners)

    def test_last_event_id_resumes_after_it(self):
        self.session.answered()
        self.session.receive_frame('{"command":"history","speaker":"user","text":"hi"}')
        ids, events, _ = sse_events(self.get(last_id=2))
        self.assertEqual(ids, [3])
        self.assertEqual(events[0]["event"], "addHistory")

    def test_a_client_that_goes_away_is_forgotten(self):
        request = self.get()
        request.processingFailed(Failure(ConnectionLost()))  # the connection drops: notifyFinish errbacks
        self.assertEqual(self.session.listeners, self.own_listeners)
        self.session.answered()  # nothing is written any more
        self.clock.advance(30)
        self.assertEqual(sse_events(request)[1], [])

    def test_unknown_call_is_404(self):
        request = DummyRequest([b"nobody"])
        body = self.stream.render_GET(request)
        self.assertEqual(request.responseCode, 404)
        self.assertIn("no active call", json.loads(body)["error"])


class CommandPostTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.sent = []
        self.session = CallSession("c1", "webSocket", clock=self.clock, emit=self.sent.append, dump=False)
        self.opened = []

        def open_sip_session(call_id, tag):
            if tag != "invite":
                raise LookupError(f"no active or pending call {call_id!r}")
            self.opened.append((call_id, tag))
            session = CallSession(call_id, "sip", clock=self.clock, emit=self.sent.append, dump=False)
            return session

        self.route = CommandPost({"c1": self.session}, open_sip_session)

    def post(self, call_id, body):
        request = DummyRequest([call_id.encode()])
        request.method = b"POST"
        from io import BytesIO

        request.content = BytesIO(body)
        answer = self.route.render_POST(request)
        return request.responseCode or 200, json.loads(answer)

    def test_a_command_is_handled_like_a_websocket_frame(self):
        code, body = self.post("c1", b'{"command":"history","speaker":"user","text":"hi"}')
        self.assertEqual((code, body["status"], body["command"]), (202, "accepted", "history"))
        self.assertEqual(self.sent[-1].TAG, "addHistory")

    def test_a_bad_frame_is_400_and_an_error_event(self):
        code, body = self.post("c1", b'{"command":"tts"}')
        self.assertEqual(code, 400)
        self.assertIn("tts: field text: is required", body["error"])
        self.assertEqual((self.sent[-1].TAG, self.sent[-1].sender), ("error", "command"))

    def test_unknown_ids(self):
        self.assertEqual(self.post("x", b'{"command":"hangup"}')[0], 404)
        self.assertEqual(self.post("x", b'{"command":"accept","option":{}}')[0], 404)
        self.assertEqual(self.opened, [])
        code, body = self.post("x", b'{"command":"invite","option":{}}')
        self.assertEqual((code, self.opened), (202, [("x", "invite")]))

    def test_an_invite_is_refused_while_the_node_does_not_admit_calls(self):
        """``invite`` for a new id goes through the admission check, as ``POST /api/calls`` does."""
        from activecall.admission import Refusal

        refusals = {"originate": Refusal("draining", 10, "Draining")}
        self.route.admit = refusals.get
        code, body = self.post("x", b'{"command":"invite","option":{}}')
        self.assertEqual((code, body["reason"], self.opened), (503, "draining", []))
        self.assertEqual(self.post("c1", b'{"command":"history","speaker":"user","text":"hi"}')[0], 202)
