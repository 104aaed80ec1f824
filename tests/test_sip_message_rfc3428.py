"""SIP MESSAGE (RFC 3428) through the whole daemon, against sipp:

- in a call's dialog: sipp's MESSAGE reaches the client as a ``message`` event, the client's
  ``sendMessage`` command reaches sipp (which checks the body); a MESSAGE on a call with no dialog
  is an ``error``;
- outside any dialog: no handler that takes messages -> 405 (with Allow, without MESSAGE); a webhook
  handler gets ``{"event": "message", …}`` and its 2xx becomes our 200.
"""

import json
import os

from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web import resource, server

from activecall.sip.call_events import IncomingMessage
from tests.test_sip_calls import DaemonCase, _later
from tests.test_sip_integration import SCENARIOS, port_bound, sipp, sipp_result, udp_port, when
from tests.wsclient import connect, send_json


def scenario_with(testcase, name: str, **values) -> str:
    with open(os.path.join(SCENARIOS, name)) as f:
        text = f.read()
    for key, value in values.items():
        text = text.replace("{" + key + "}", str(value))
    path = os.path.abspath(testcase.mktemp() + ".xml")
    with open(path, "w") as f:
        f.write(text)
    return path


class InDialogTests(DaemonCase):
    @defer.inlineCallbacks
    def test_message_both_ways_in_a_call(self):
        yield self.start("")
        uas_port = udp_port()
        uas = sipp(self, "-p", str(uas_port), "-mp", str(udp_port() // 2 * 2), scenario="uas_message.xml")
        yield when(port_bound(uas_port), 15, "sipp uas to bind")
        proto, client = yield connect(self, self.http_port, "/call/sip", "id=msg1")
        send_json(proto, {"command": "invite", "option": {"callee": f"sip:bob@127.0.0.1:{uas_port}"}})
        yield client.wait_event("answer")
        message = yield client.wait_event("message")
        self.assertEqual(message["body"].strip(), "hello from sipp")
        self.assertEqual(message["contentType"], "text/plain;charset=UTF-8")
        self.assertEqual(message["trackId"], "msg1")
        send_json(proto, {"command": "sendMessage", "body": "hello from the bot \u2603"})
        # sipp answers 200 only if the body arrived; then we hang up
        for _ in range(100):
            if "the bot said" in uas.output or uas.ended.called:
                break
            yield _later(0.05)
        send_json(proto, {"command": "hangup"})
        yield client.wait_event("end")
        yield sipp_result(uas, timeout=15)
        self.assertEqual([e for e in client.events if e["event"] == "error"], [])

    @defer.inlineCallbacks
    def test_send_message_needs_a_sip_dialog(self):
        yield self.start("")
        proto, client = yield connect(self, self.http_port, "/call", "id=msg2")
        send_json(proto, {"command": "invite", "option": {}})
        yield client.wait_event("answer")
        send_json(proto, {"command": "sendMessage", "body": "x"})
        error = yield client.wait_event("error")
        self.assertIn("sendMessage is not supported on a webSocket call", error["error"])


class OutOfDialogTests(DaemonCase):
    @defer.inlineCallbacks
    def test_no_message_handler_is_405(self):
        yield self.start("")  # no [handler]
        uac = sipp(self, f"127.0.0.1:{self.sip_port}", "-p", str(udp_port()),
                   scenario=scenario_with(self, "uac_message.xml", STATUS=405))
        yield sipp_result(uac, timeout=15)

    @defer.inlineCallbacks
    def test_webhook_gets_the_message(self):
        posts = []

        class Hook(resource.Resource):
            isLeaf = True

            def render_POST(self, request):
                posts.append(json.loads(request.content.read()))
                return b"{}"

        port = reactor.listenTCP(0, server.Site(Hook()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        yield self.start(f'[handler]\ntype = "webhook"\nurl = "http://127.0.0.1:{port.getHost().port}/hook"\n')
        uac = sipp(self, f"127.0.0.1:{self.sip_port}", "-p", str(udp_port()), "-s", "agent",
                   scenario=scenario_with(self, "uac_message.xml", STATUS=200))
        yield sipp_result(uac, timeout=15)
        [post] = posts
        self.assertEqual(post["event"], "message")
        self.assertEqual(post["body"].strip(), "pager mode hello")
        self.assertEqual(post["contentType"], "text/plain")
        self.assertTrue(post["caller"].startswith("sip:alice@"))
        self.assertTrue(post["callee"].startswith("sip:agent@"))


class HandlerTests(unittest.TestCase):
    def test_playbook_router_takes_no_messages(self):
        from activecall.call.sip_call import SipCalls

        calls = SipCalls.__new__(SipCalls)
        calls.handler = object()  # a handler without on_message (the playbook router)
        self.assertEqual(calls.on_message(IncomingMessage("sip:a@x", "sip:b@y", "c", b"hi", "text/plain")), 405)
