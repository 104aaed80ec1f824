"""REST routes over a real local HTTP server: shapes of docs/api.md's REST routes, both list
and kill routes, path traversal refused, pending playbooks, records, token."""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone

from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from activecall.call.cdr import CallDetailRecord, LocalCdrWriter
from activecall.call.handlers import PendingPlaybook, PendingPlaybooks
from activecall.config import CallRecord, Config, IceServer, Recording
from activecall.protocol.commands import CallOption
from activecall.web import rest


class FakeCalls:
    """Stands in for the session registry."""

    def __init__(self):
        self.calls = {
            "s.1": rest.CallSummary(id="s.1", callType="webSocket",
                                    option=CallOption.from_dict({"codec": "pcm", "tts": {"apiKey": "SECRET"}}),
                                    startTime="2025-01-01T00:00:01+00:00"),
            "s.2": rest.CallSummary(id="s.2", callType="sip", locked=True),
        }
        self.killed = []
        self.slow = defer.Deferred()

    def list(self):
        return list(self.calls.values())

    def kill(self, call_id):
        self.killed.append(call_id)
        if call_id == "slow":
            return self.slow
        return self.calls.pop(call_id, None) is not None


class RestTestBase(unittest.TestCase):
    token = None

    def setUp(self):
        base = os.path.abspath(self.mktemp())
        self.playbooks = os.path.join(base, "playbook")
        self.recorders = os.path.join(base, "recorders")
        self.cdr_root = os.path.join(base, "cdr")
        for d in (self.playbooks, self.recorders):
            os.makedirs(d)
        with open(os.path.join(self.playbooks, "hello.md"), "w") as f:
            f.write("---\nllm: {}\n---\n# Hello\n")
        with open(os.path.join(base, "secret.md"), "w") as f:
            f.write("outside")
        self.config = Config(playbook_dir=self.playbooks, recording=Recording(path=self.recorders),
                             callrecord=CallRecord(type="local", root=self.cdr_root), http_token=self.token,
                             ice_servers=self.ice_servers())
        self.calls = FakeCalls()
        self.clock = task.Clock()
        self.pending = PendingPlaybooks(self.clock, ttl=60)
        self.root = resource.Resource()
        self.root.putChild(b"health", rest.IceServers(()))  # stands in for the open /health
        ids = iter(f"s.id{i}" for i in range(100))
        self.api = rest.install_api(self.root, self.config, self.calls, self.pending, new_id=lambda: next(ids))
        port = reactor.listenTCP(0, server.Site(self.root), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}".encode()
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, pool=pool)

    def ice_servers(self):
        return ()

    @defer.inlineCallbacks
    def fetch(self, method: bytes, path: bytes, body: bytes = None, headers=None):
        """(code, content-type, body bytes) of a raw request; the path is sent as given."""
        from twisted.web.client import FileBodyProducer
        from io import BytesIO

        producer = FileBodyProducer(BytesIO(body)) if body is not None else None
        response = yield self.agent.request(method, self.base + path, Headers(headers or {}), producer)
        content = yield readBody(response)
        ctype = (response.headers.getRawHeaders(b"content-type") or [b""])[0].decode()
        return response.code, ctype, content

    @defer.inlineCallbacks
    def get_json(self, path: bytes, method=b"GET", body=None, headers=None, code=200):
        status, ctype, content = yield self.fetch(method, path, body, headers)
        self.assertEqual(status, code, content)
        self.assertEqual(ctype, "application/json")
        return json.loads(content)


class CallRoutesTests(RestTestBase):
    @defer.inlineCallbacks
    def test_list_has_the_originals_shape_with_option_redacted(self):
        doc = yield self.get_json(b"/list")
        self.assertEqual(doc, {"active_calls": [
            {"id": "s.1", "callType": "webSocket", "cs.option": {"codec": "pcm", "tts": {"apiKey": "***"}},
             "ringTime": None, "startTime": "2025-01-01T00:00:01+00:00"},
            {"id": "s.2", "callType": "sip", "status": "locked"},
        ]})

    @defer.inlineCallbacks
    def test_call_lists_is_the_same_data_as_the_docs_shape(self):
        listed = yield self.get_json(b"/list")
        docs = yield self.get_json(b"/call/lists")
        self.assertEqual(docs, {"calls": listed["active_calls"]})

    @defer.inlineCallbacks
    def test_get_kill_answers_a_status_object(self):
        self.assertEqual((yield self.get_json(b"/kill/s.1")), {"status": "killed", "id": "s.1"})
        self.assertEqual((yield self.get_json(b"/kill/s.1")), {"status": "not_found", "id": "s.1"})
        self.assertEqual(self.calls.killed, ["s.1", "s.1"])
        self.assertEqual((yield self.get_json(b"/kill/", code=400)), {"error": "missing call id"})

    @defer.inlineCallbacks
    def test_post_call_kill_answers_true_or_false(self):
        self.assertIs((yield self.get_json(b"/call/kill/s.1", method=b"POST")), True)
        self.assertIs((yield self.get_json(b"/call/kill/s.1", method=b"POST", code=404)), False)

    @defer.inlineCallbacks
    def test_kill_may_answer_later_and_ids_are_url_decoded(self):
        d = self.get_json(b"/kill/slow")
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertFalse(d.called)
        self.calls.slow.callback(True)
        self.assertEqual((yield d), {"status": "killed", "id": "slow"})
        yield self.get_json(b"/kill/cid%40host-1")
        self.assertEqual(self.calls.killed[-1], "cid@host-1")

    @defer.inlineCallbacks
    def test_call_websocket_slot(self):
        code, _, _ = yield self.fetch(b"GET", b"/call")
        self.assertEqual(code, 404)

        class FakeWebSocket(resource.Resource):
            isLeaf = True

            def render(self, request):
                return b"upgrade"

        self.api.call.websocket = FakeWebSocket()
        self.api.call.putChild(b"sip", FakeWebSocket())
        self.assertEqual((yield self.fetch(b"GET", b"/call"))[2], b"upgrade")
        self.assertEqual((yield self.fetch(b"GET", b"/call/sip?id=x"))[2], b"upgrade")


class IceServersTests(RestTestBase):
    @defer.inlineCallbacks
    def test_default_stun_entry(self):
        self.assertEqual((yield self.get_json(b"/iceservers")), [
            {"urls": ["stun:stun.l.google.com:19302"], "username": None, "credential": None,
             "credential_type": "password"}])


class ConfiguredIceServersTests(RestTestBase):
    def ice_servers(self):
        return (IceServer(urls=("stun:stun.example.com:3478",)),
                IceServer(urls=("turn:turn.example.com:3478",), username="u", credential="p"))

    @defer.inlineCallbacks
    def test_configured_servers(self):
        self.assertEqual((yield self.get_json(b"/iceservers")), [
            {"urls": ["stun:stun.example.com:3478"], "username": None, "credential": None,
             "credential_type": "password"},
            {"urls": ["turn:turn.example.com:3478"], "username": "u", "credential": "p",
             "credential_type": "password"}])


class PlaybookTests(RestTestBase):
    @defer.inlineCallbacks
    def test_list(self):
        os.utime(os.path.join(self.playbooks, "hello.md"), (0, 86400))
        with open(os.path.join(self.playbooks, "notes.txt"), "w") as f:
            f.write("not a playbook")
        self.assertEqual((yield self.get_json(b"/api/playbooks")),
                         [{"name": "hello.md", "updated": "1970-01-02T00:00:00+00:00"}])

    @defer.inlineCallbacks
    def test_get_and_save(self):
        code, ctype, body = yield self.fetch(b"GET", b"/api/playbooks/hello.md")
        self.assertEqual((code, body), (200, b"---\nllm: {}\n---\n# Hello\n"))
        self.assertTrue(ctype.startswith("text/markdown"))
        code, _, body = yield self.fetch(b"POST", b"/api/playbooks/new.md", b"# New\n")
        self.assertEqual((code, body), (200, b""))
        with open(os.path.join(self.playbooks, "new.md"), "rb") as f:
            self.assertEqual(f.read(), b"# New\n")
        self.assertEqual((yield self.fetch(b"GET", b"/api/playbooks/missing.md"))[::2], (404, b"Playbook not found"))

    @defer.inlineCallbacks
    def test_traversal_is_refused(self):
        for path in (b"/api/playbooks/..", b"/api/playbooks/..%2Fsecret.md", b"/api/playbooks/a%5Cb.md",
                     b"/api/playbooks/%2Fetc%2Fpasswd", b"/api/playbooks/x%00.md", b"/api/playbooks/sub/x.md",
                     b"/api/playbooks/.hidden"):
            for method, body in ((b"GET", None), (b"POST", b"pwned")):
                code, _, content = yield self.fetch(method, path, body)
                self.assertEqual((code, content), (400, b"Invalid filename"), (method, path))
        self.assertEqual(sorted(os.listdir(self.playbooks)), ["hello.md"])
        with open(os.path.join(os.path.dirname(self.playbooks), "secret.md")) as f:
            self.assertEqual(f.read(), "outside")

    @defer.inlineCallbacks
    def test_save_failure_is_500(self):
        os.makedirs(os.path.join(self.playbooks, "taken.md"))  # a directory: the rename fails, even for root
        code, _, body = yield self.fetch(b"POST", b"/api/playbooks/taken.md", b"x")
        self.assertEqual(code, 500)
        self.assertIn(b"Cannot save playbook", body)
        self.assertEqual(sorted(os.listdir(self.playbooks)), ["hello.md", "taken.md"])  # no temp left

    @defer.inlineCallbacks
    def test_run_stores_a_pending_playbook_with_expiry(self):
        doc = yield self.get_json(b"/api/playbook/run", b"POST", json.dumps({"playbook": "hello.md", "type": "sip",
                                                                             "to": "x"}).encode())
        self.assertEqual(doc, {"session_id": "s.id0"})
        doc = yield self.get_json(b"/api/playbook/run", b"POST", b'{"content": "---\\nllm: {}\\n---\\n# x"}')
        self.assertEqual(doc, {"session_id": "s.id1"})
        self.assertEqual(self.pending.take("s.id0"), PendingPlaybook(name="hello.md"))
        self.clock.advance(61)
        self.assertIsNone(self.pending.take("s.id1"))

    @defer.inlineCallbacks
    def test_run_errors(self):
        table = [
            (b"{", 400, "malformed JSON"),
            (b"[]", 400, "expected"),
            (b'{"playbook": "../secret.md"}', 400, "Invalid filename"),
            (b'{"playbook": "nope.md"}', 404, "Playbook not found"),
            (b'{"content": 5}', 400, "content"),
            (b"{}", 400, "playbook"),
        ]
        for body, code, fragment in table:
            doc = yield self.get_json(b"/api/playbook/run", b"POST", body, code=code)
            self.assertIn(fragment, doc["error"], body)
        self.assertEqual(len(self.pending), 0)


class RecordsTests(RestTestBase):
    @defer.inlineCallbacks
    def test_dumps_and_cdrs_newest_first(self):
        old = os.path.join(self.recorders, "s.old.events.jsonl")
        with open(old, "w") as f:
            f.write("{}\n")
        os.utime(old, (1000, 1000))
        start = datetime(2025, 5, 6, 7, 8, 9, tzinfo=timezone.utc)
        writer = LocalCdrWriter(self.cdr_root, tz=timezone.utc, run=lambda f, *a: defer.maybeDeferred(f, *a))
        yield writer.write(CallDetailRecord(callType="sip", callId="c.answered", startTime=start,
                                            answerTime=start + timedelta(seconds=3),
                                            endTime=start + timedelta(seconds=45), hangupReason="caller"))
        yield writer.write(CallDetailRecord(callType="sip", callId="c.missed", startTime=start - timedelta(hours=1),
                                            endTime=start - timedelta(hours=1) + timedelta(seconds=20),
                                            hangupReason="canceled", statusCode=487))
        self.assertEqual((yield self.get_json(b"/api/records")), [
            {"id": "c.answered", "date": "2025-05-06T07:08:09+00:00", "duration": "42s", "status": "completed"},
            {"id": "c.missed", "date": "2025-05-06T06:08:09+00:00", "duration": "20s", "status": "canceled"},
            {"id": "s.old", "date": "1970-01-01T00:16:40+00:00", "duration": "0s", "status": "completed"},
        ])


class TokenTests(RestTestBase):
    token = "let-me-in"

    @defer.inlineCallbacks
    def test_every_api_route_needs_the_token(self):
        for method, path in ((b"GET", b"/list"), (b"GET", b"/call/lists"), (b"GET", b"/kill/s.1"),
                             (b"POST", b"/call/kill/s.1"), (b"GET", b"/iceservers"), (b"GET", b"/api/playbooks"),
                             (b"GET", b"/api/playbooks/hello.md"), (b"POST", b"/api/playbook/run"),
                             (b"GET", b"/api/records"), (b"GET", b"/call"), (b"GET", b"/list?token=wrong")):
            code, ctype, body = yield self.fetch(method, path)
            self.assertEqual(code, 401, path)
            self.assertEqual(json.loads(body), {"error": "unauthorized"})
        code, _, _ = yield self.fetch(b"GET", b"/list", headers={b"authorization": [b"Bearer wrong"]})
        self.assertEqual(code, 401)
        self.assertEqual(self.calls.killed, [])

    @defer.inlineCallbacks
    def test_bearer_header_or_query_token(self):
        yield self.get_json(b"/list", headers={b"authorization": [b"Bearer let-me-in"]})
        yield self.get_json(b"/api/playbooks?token=let-me-in")
        self.assertEqual((yield self.get_json(b"/kill/s.1?token=let-me-in")), {"status": "killed", "id": "s.1"})

    @defer.inlineCallbacks
    def test_health_stays_open(self):
        code, _, _ = yield self.fetch(b"GET", b"/health")
        self.assertEqual(code, 200)

    def test_authorized_helper(self):
        from twisted.web.test.requesthelper import DummyRequest

        request = DummyRequest([b""])
        self.assertTrue(rest.authorized(request, None))
        self.assertFalse(rest.authorized(request, "t"))
        request.requestHeaders.setRawHeaders(b"authorization", [b"bearer t"])
        self.assertTrue(rest.authorized(request, "t"))


class SessionTableTests(unittest.TestCase):
    def test_adapts_the_service_dict(self):
        class Session:
            killed = 0

            def summary(self):
                return rest.CallSummary(id="s.9", callType="sip")

            def kill(self):
                self.killed += 1
                return defer.succeed(None)

        session = Session()
        table = rest.SessionTable({"s.9": session})
        self.assertEqual([c.id for c in table.list()], ["s.9"])
        self.assertIs(table.kill("nope"), False)
        self.assertIs(self.successResultOf(table.kill("s.9")), True)
        self.assertEqual(session.killed, 1)
