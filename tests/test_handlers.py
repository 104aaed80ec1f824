"""Invite handlers: playbook routing (table-driven, the guide's own rules),
header capture, safe playbook paths, and the webhook contract against a real
local twisted.web server (method, headers, body; 500, down, slow, decisions)."""

from __future__ import annotations

import json
import os

from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from twisted.web import resource, server

from activecall.call import handlers as h
from activecall.config import PlaybookHandler, Rule, WebhookHandler
from activecall.playbook.start import check_configured_playbook
from tests.helpers import free_port

OFFER = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n"


def make_invite(caller="sip:+12125551234@carrier.example", callee="sip:support@pbx.example", extra_headers=()):
    headers = (
        ("Via", "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK1"),
        ("From", f"<{caller}>;tag=ft1"),
        ("To", f"<{callee}>"),
        ("Call-ID", "cid-1"),
        ("CSeq", "1 INVITE"),
        ("Content-Type", "application/sdp"),
        ("Content-Length", str(len(OFFER))),
    ) + tuple(extra_headers)
    return h.IncomingInvite(caller=caller, callee=callee, headers=headers, offer=OFFER,
                            dialog_id="cid-1-tt1-ft1", call_id="cid-1", from_tag="ft1", to_tag="tt1")


# the configuration guide's example, verbatim
GUIDE = PlaybookHandler(default="default.md", rules=(
    Rule(caller=r"^\+1\d{10}$", callee=r"^sip:support@.*", playbook="support.md"),
    Rule(caller=r"^\+86\d+", playbook="chinese.md"),
    Rule(callee=r"^sip:sales@.*", playbook="sales.md"),
))


class PureHelperTests(unittest.TestCase):
    def test_uri_user(self):
        table = [
            ("sip:+12125551234@carrier.example", "+12125551234"),
            ('"Bob" <sip:bob@h.example;transport=udp>;tag=x', "bob"),
            ("sips:alice:pw@h", "alice"),
            ("sip:+1212;npdi@h", "+1212"),
            ("tel:+8613800000000;phone-context=x", "+8613800000000"),
            ("sip:h.example", ""),
        ]
        for uri, want in table:
            self.assertEqual(h.uri_user(uri), want, uri)

    def test_custom_headers_are_captured_standard_ones_not(self):
        headers = make_invite().headers + (
            ("X-Tenant-ID", "t-42"), ("x-tenant-id", "t-43"), ("P-Asserted-Identity", "<sip:a@b>"),
            ("User-Agent", "sipp"), ("l", "0"), ("Authorization", "Digest x"),
        )
        self.assertEqual(h.custom_headers(headers),
                         {"X-Tenant-ID": "t-42, t-43", "P-Asserted-Identity": "<sip:a@b>"})

    def test_filter_extras_case_insensitive(self):
        extras = {"X-Tenant-ID": "1", "X-Other": "2", "caller": "c"}
        self.assertEqual(h.filter_extras(extras, ["x-tenant-id"]), {"X-Tenant-ID": "1"})
        self.assertEqual(h.filter_extras(extras, None), extras)


class RoutingTests(unittest.TestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.dir, "team"))
        for name in ("default.md", "support.md", "chinese.md", "sales.md", "team/night.md"):
            with open(os.path.join(self.dir, name), "w") as f:
                f.write("---\n---\n# hi\n")

    def test_the_guides_rules(self):
        router = h.PlaybookRouter(GUIDE, self.dir)
        table = [
            # caller, callee -> playbook
            ("sip:+12125551234@carrier.example", "sip:support@pbx.example", "support.md"),  # the ⚠ case
            ("+12125551234", "sip:support@pbx.example", "support.md"),
            ('"NY" <sip:+12125551234@carrier.example>', "sip:support@pbx.example", "support.md"),
            ("sip:+121255512345@carrier.example", "sip:support@pbx.example", "default.md"),  # 11 digits
            ("sip:+12125551234@carrier.example", "sip:sales@pbx.example", "sales.md"),  # rule 1 needs both
            ("sip:+8613800000000@cn.example", "sip:support@pbx.example", "chinese.md"),
            ("sip:+8613800000000@cn.example", "sip:sales@pbx.example", "chinese.md"),  # first match wins
            ("sip:alice@example.com", "sip:sales@pbx.example", "sales.md"),
            ("sip:alice@example.com", "sip:bob@pbx.example", "default.md"),
        ]
        for caller, callee, want in table:
            self.assertEqual(router.choose(caller, callee), want, (caller, callee))

    def test_route_gives_path_and_extras(self):
        router = h.PlaybookRouter(GUIDE, self.dir)
        decision = router.route(make_invite(extra_headers=(("X-Tenant-ID", "t1"),)))
        self.assertEqual(decision, h.RouteToPlaybook(
            name="support.md", path=os.path.join(os.path.realpath(self.dir), "support.md"),
            extras={"X-Tenant-ID": "t1", "caller": "sip:+12125551234@carrier.example",
                    "callee": "sip:support@pbx.example"}))

    @defer.inlineCallbacks
    def test_no_rule_and_no_default_rejects(self):
        router = h.PlaybookRouter(PlaybookHandler(rules=(Rule(callee="^sip:x@", playbook="sales.md"),)), self.dir)
        decision = yield router.on_invite(make_invite())
        self.assertEqual(decision, h.Reject(503, "no matching playbook"))

    def test_missing_file_is_playbook_not_found(self):
        router = h.PlaybookRouter(PlaybookHandler(default="gone.md"), self.dir)
        self.assertEqual(router.route(make_invite()), h.Reject(503, "Playbook Not Found"))

    def test_traversal_is_refused(self):
        """Relative names leave ``playbook_dir`` neither from the configuration nor from the API;
        an absolute path is refused from the API (a webhook's answer)."""
        secret = os.path.join(os.path.dirname(self.dir), "secret.md")
        with open(secret, "w") as f:
            f.write("x")
        for name in ("../secret.md", "team/../../secret.md", "a\\b.md", "x\x00.md", ""):
            router = h.PlaybookRouter(PlaybookHandler(default=name), self.dir)
            self.assertEqual(router.route(make_invite()), h.Reject(503, "Playbook Not Found"), name)
            if name:
                self.assertRaises(h.PlaybookNameError, h.resolve_playbook, self.dir, name)
                self.assertRaises(h.PlaybookNameError, h.resolve_configured_playbook, self.dir, name)
        for name in ("../secret.md", secret, "/etc/passwd", "team/../../secret.md"):
            body = json.dumps({"action": "accept", "playbook": name}).encode()
            self.assertEqual(h.webhook_decision(body, make_invite(), self.dir),
                             h.Reject(503, "Playbook Not Found"), name)
            self.assertRaises(h.PlaybookNameError, h.resolve_playbook, self.dir, name)

    def test_a_configured_absolute_path_is_used_as_written(self):
        """``default = "/etc/activecall/playbooks/sales.md"``: the operator's file, outside
        ``playbook_dir``; the same path from a webhook's answer is refused."""
        elsewhere = os.path.abspath(self.mktemp())
        os.makedirs(elsewhere)
        sales = os.path.join(elsewhere, "sales.md")
        with open(sales, "w") as f:
            f.write("---\n---\n# hi\n")
        config = PlaybookHandler(default=sales, rules=(Rule(callee="^sip:vip@", playbook=sales),))
        router = h.PlaybookRouter(config, self.dir)
        for callee in ("sip:vip@pbx.example", "sip:support@pbx.example"):
            decision = router.route(make_invite(callee=callee))
            self.assertEqual((decision.name, decision.path), (sales, sales), callee)
        body = json.dumps({"action": "accept", "playbook": sales}).encode()
        self.assertEqual(h.webhook_decision(body, make_invite(), self.dir), h.Reject(503, "Playbook Not Found"))
        # relative configured names are under playbook_dir, as the API's are
        self.assertEqual(h.resolve_configured_playbook(self.dir, "team/night.md"),
                         h.resolve_playbook(self.dir, "team/night.md"))
        self.assertEqual(h.resolve_configured_playbook(self.dir, "/x/../y/./z.md"), "/y/z.md")
        # a configured file deleted after start-up: the call gets 503, as before
        os.remove(sales)
        self.assertEqual(router.route(make_invite()), h.Reject(503, "Playbook Not Found"))

    def test_configured_source_for_the_cli_call(self):
        self.assertEqual(h.configured_source(self.dir, "/abs/x.md"), h.PlaybookFile("/abs/x.md"))
        self.assertEqual(h.configured_source(self.dir, "sales.md"),
                         h.PlaybookFile(os.path.join(os.path.realpath(self.dir), "sales.md")))
        self.assertEqual(h.configured_source(self.dir, "---\n---\nx"), "---\n---\nx")
        self.assertEqual(h.configured_source(self.dir, "../x.md"), "../x.md")  # the runner refuses it


class ConfiguredPlaybookCheckTests(unittest.TestCase):
    """``check_configured_playbook``: what start-up runs on every configured playbook."""

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def write(self, path, text):
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_good_playbooks_pass_and_give_their_warnings(self):
        self.write(os.path.join(self.dir, "ok.md"), "---\nllm: {provider: echo}\n---\nx\n")
        self.assertEqual(check_configured_playbook(self.dir, "ok.md"), [])
        elsewhere = self.write(os.path.abspath(self.mktemp() + ".md"),
                               "---\nllm: {provider: echo}\nmadeUpKey: 1\n---\nx\n")
        [warning] = check_configured_playbook(self.dir, elsewhere)
        self.assertIn("madeUpKey", warning)
        self.assertEqual(check_configured_playbook(self.dir, "---\nllm: {provider: echo}\n---\nx"), [])

    def test_problems_name_the_file(self):
        bad = self.write(os.path.join(self.dir, "bad.md"), "---\nllm: [\n---\nx\n")
        os.makedirs(os.path.join(self.dir, "dir.md"))
        table = [
            ("/nonexistent/x.md", "^/nonexistent/x.md: no such file$"),
            ("gone.md", f"^{os.path.realpath(self.dir)}/gone.md: no such file$"),
            ("dir.md", "dir.md: not a file$"),
            ("bad.md", f"^{bad}:2: invalid YAML"),
            ("../x.md", "invalid playbook name '../x.md'.*absolute path"),
            ("---\nllm: [\n---\n", "<inline playbook>:2: invalid YAML"),
        ]
        for name, pattern in table:
            with self.assertRaises(ValueError) as cm:
                check_configured_playbook(self.dir, name)
            self.assertRegex(str(cm.exception), pattern, name)
            self.assertNotIn("\n", str(cm.exception))

    def test_symlink_out_of_the_directory_is_refused(self):
        outside = os.path.abspath(self.mktemp())
        os.makedirs(outside)
        os.symlink(outside, os.path.join(self.dir, "link"))
        self.assertRaises(h.PlaybookNameError, h.resolve_playbook, self.dir, "link/x.md")

    def test_a_file_symlink_is_followed_inside_and_refused_outside(self):
        secret = os.path.abspath(self.mktemp())
        with open(secret, "w") as f:
            f.write("x")
        os.symlink(secret, os.path.join(self.dir, "out.md"))
        self.assertRaises(h.PlaybookNameError, h.resolve_playbook, self.dir, "out.md")
        os.symlink("sales.md", os.path.join(self.dir, "alias.md"))
        self.assertEqual(h.resolve_playbook(self.dir, "alias.md"),
                         os.path.join(os.path.realpath(self.dir), "sales.md"))

    def test_a_playbook_directory_reached_through_a_symlink(self):
        link = os.path.abspath(self.mktemp())
        os.symlink(self.dir, link)
        self.assertEqual(h.resolve_playbook(link, "team/night.md"),
                         os.path.join(os.path.realpath(self.dir), "team", "night.md"))

    def test_subfolders_prefix_and_inline_content(self):
        self.assertEqual(h.resolve_playbook(self.dir, "team/night.md"),
                         os.path.join(os.path.realpath(self.dir), "team", "night.md"))
        self.assertEqual(h.resolve_playbook(self.dir, "config/playbook/sales.md"),
                         os.path.join(os.path.realpath(self.dir), "sales.md"))
        inline = "---\nllm: {}\n---\n# scene"
        decision = h.PlaybookRouter(PlaybookHandler(default=inline), self.dir).route(make_invite())
        self.assertEqual((decision.name, decision.content, decision.path), ("<inline>", inline, None))

    def test_invalid_regex_fails_construction(self):
        bad = PlaybookHandler(rules=(Rule(caller="(", playbook="x.md"),))  # the loader would refuse it
        with self.assertRaises(ValueError) as cm:
            h.PlaybookRouter(bad, self.dir)
        self.assertIn("invalid caller regex", str(cm.exception))

    def test_handler_for(self):
        self.assertIsNone(h.handler_for(None, self.dir))
        self.assertIsInstance(h.handler_for(GUIDE, self.dir), h.PlaybookRouter)
        self.assertIsInstance(h.handler_for(WebhookHandler(url="http://127.0.0.1:1/x"), self.dir, reactor),
                              h.WebhookInviteHandler)


class Webhook(resource.Resource):
    """A webhook receiver: records requests; answers ``code``/``body``, or hangs."""

    isLeaf = True

    def __init__(self, code=200, body=b"", hang=False):
        super().__init__()
        self.code, self.body, self.hang = code, body, hang
        self.requests = []
        self.arrived = defer.Deferred()
        self.hanging = []

    def render(self, request):
        self.requests.append({
            "method": request.method.decode(), "path": request.path.decode(),
            "headers": {k.decode().lower(): [v.decode() for v in vs]
                        for k, vs in request.requestHeaders.getAllRawHeaders()},
            "body": request.content.read(),
        })
        if self.hang:
            self.hanging.append(request.notifyFinish())
        if not self.arrived.called:
            self.arrived.callback(None)
        if self.hang:
            return server.NOT_DONE_YET
        request.setResponseCode(self.code)
        return self.body


class WebhookTests(unittest.TestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        with open(os.path.join(self.dir, "x.md"), "w") as f:
            f.write("---\n---\n")

    def serve(self, hook) -> str:
        port = reactor.listenTCP(0, server.Site(hook), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}"

    def handler(self, clock=None, **kw):
        return h.WebhookInviteHandler(WebhookHandler(**kw), self.dir, reactor=reactor, clock=clock)

    @defer.inlineCallbacks
    def test_post_body_and_headers_field_by_field(self):
        hook = Webhook()
        base = self.serve(hook)
        handler = self.handler(url=base + "/invite", headers=(("X-Test-Header", "yes"), ("X-Multi", "a")))
        invite = make_invite(extra_headers=(("X-Tenant-ID", "t1"),))
        decision = yield handler.on_invite(invite)
        self.assertEqual(decision, h.Pending("cid-1-tt1-ft1"))
        req = hook.requests[0]
        self.assertEqual(req["method"], "POST")
        self.assertEqual(req["path"], "/invite")
        self.assertEqual(req["headers"]["content-type"], ["application/json"])
        self.assertEqual(req["headers"]["x-test-header"], ["yes"])
        body = json.loads(req["body"])
        self.assertEqual(body["dialogId"], "cid-1-tt1-ft1")
        self.assertEqual(body["event"], "invite")
        self.assertEqual(body["caller"], "sip:+12125551234@carrier.example")
        self.assertEqual(body["callee"], "sip:support@pbx.example")
        self.assertEqual(body["offer"], OFFER)
        self.assertIn("Content-Type: application/sdp", body["headers"])
        self.assertIn("X-Tenant-ID: t1", body["headers"])
        self.assertEqual(body["headers"][0], "Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK1")
        self.assertEqual((body["call_id"], body["from_tag"], body["to_tag"]), ("cid-1", "ft1", "tt1"))
        self.assertRegex(body["createdAt"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+00:00$")
        self.assertEqual(set(body), {"dialogId", "createdAt", "caller", "callee", "event", "headers", "offer",
                                     "call_id", "from_tag", "to_tag"})

    @defer.inlineCallbacks
    def test_method_and_round_robin(self):
        hook = Webhook()
        base = self.serve(hook)
        handler = self.handler(urls=(base + "/a", base + "/b"), method="PUT")
        for _ in range(3):
            yield handler.on_invite(make_invite())
        self.assertEqual([r["path"] for r in hook.requests], ["/a", "/b", "/a"])
        self.assertEqual({r["method"] for r in hook.requests}, {"PUT"})

    @defer.inlineCallbacks
    def test_non_2xx_rejects_503(self):
        hook = Webhook(code=500)
        handler = self.handler(url=self.serve(hook) + "/invite")
        decision = yield handler.on_invite(make_invite())
        self.assertEqual(decision.code, 503)
        self.assertTrue(decision.reason.startswith("Failed to process invite: "), decision.reason)
        self.assertIn("HTTP 500", decision.reason)

    @defer.inlineCallbacks
    def test_unreachable_rejects_quickly(self):
        """A refused connection rejects at once, not at the timeout: the timeout runs on a Clock that never
        advances, so only the connection error can answer (no wall-clock bar)."""
        handler = self.handler(clock=task.Clock(), url=f"http://127.0.0.1:{free_port()}/invite", timeout=5.0)
        decision = yield handler.on_invite(make_invite())
        self.assertEqual(decision.code, 503)
        self.assertTrue(decision.reason.startswith("Failed to process invite: webhook http://127.0.0.1:"))
        self.assertNotIn("did not answer within", decision.reason)

    @defer.inlineCallbacks
    def test_hanging_server_rejects_at_the_timeout(self):
        hook = Webhook(hang=True)
        clock = task.Clock()
        handler = self.handler(clock=clock, url=self.serve(hook) + "/invite", timeout=2.5)
        d = handler.on_invite(make_invite())
        yield hook.arrived
        clock.advance(2.4)
        self.assertFalse(d.called)
        clock.advance(0.2)
        decision = yield d
        self.assertEqual(decision, h.Reject(503, "Failed to process invite: webhook "
                                                 f"{handler.urls[0]} did not answer within 2.5s"))
        # the cancelled request closed its connection; wait until the server saw it
        yield defer.DeferredList(hook.hanging, consumeErrors=True)

    @defer.inlineCallbacks
    def test_json_decisions_in_a_2xx_body(self):
        table = [
            (b'{"action":"accept","playbook":"x.md"}', "route"),
            (b'{"action":"accept","playbook":"missing.md"}', h.Reject(503, "Playbook Not Found")),
            (b'{"action":"accept","playbook":"../x.md"}', h.Reject(503, "Playbook Not Found")),
            (b'{"action":"reject","code":486}', h.Reject(486, "Rejected by webhook")),
            (b'{"action":"reject","code":486,"reason":"Busy"}', h.Reject(486, "Busy")),
            (b'{"action":"reject","code":"bad"}', h.Reject(603, "Rejected by webhook")),
            (b'{"action":"accept"}', h.Pending("cid-1-tt1-ft1")),
            (b'{"ok":true}', h.Pending("cid-1-tt1-ft1")),
            (b"not json", h.Pending("cid-1-tt1-ft1")),
        ]
        for body, want in table:
            hook = Webhook(code=200, body=body)
            decision = yield self.handler(url=self.serve(hook) + "/i").on_invite(
                make_invite(extra_headers=(("X-Tenant-ID", "t1"),)))
            if want == "route":
                self.assertIsInstance(decision, h.RouteToPlaybook)
                self.assertEqual(decision.path, os.path.join(os.path.realpath(self.dir), "x.md"))
                self.assertEqual(decision.extras["X-Tenant-ID"], "t1")
            else:
                self.assertEqual(decision, want, body)


class PendingPlaybooksTests(unittest.TestCase):
    def test_take_once_and_expiry(self):
        clock = task.Clock()
        pending = h.PendingPlaybooks(clock, ttl=60)
        pending.add("s.1", h.PendingPlaybook(name="x.md"))
        pending.add("s.2", h.PendingPlaybook(content="---\n"))
        self.assertIn("s.1", pending)
        self.assertEqual(pending.take("s.1"), h.PendingPlaybook(name="x.md"))
        self.assertIsNone(pending.take("s.1"))
        clock.advance(61)
        self.assertIsNone(pending.take("s.2"))
        self.assertEqual(len(pending), 0)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_replacing_and_clear_cancel_timers(self):
        clock = task.Clock()
        pending = h.PendingPlaybooks(clock, ttl=60)
        pending.add("s.1", h.PendingPlaybook(name="a.md"))
        clock.advance(50)
        pending.add("s.1", h.PendingPlaybook(name="b.md"))
        clock.advance(20)  # the first timer would have fired by now
        self.assertEqual(pending.take("s.1").name, "b.md")
        pending.add("s.3", h.PendingPlaybook(name="c.md"))
        pending.clear()
        self.assertEqual(clock.getDelayedCalls(), [])
