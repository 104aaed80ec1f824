"""POST /api/calls: outbound SIP calls over REST (the guide's per-call
``sip.enableSrtp``), seen in /list, ended by /kill; a plain answer to our
mandatory SRTP offer ends the call cleanly."""

import json
import os

import treq
from twisted.internet import defer
from twisted.trial import unittest

from tests.helpers import free_port, spawn_daemon, write_config
from tests.test_sip_integration import LOCAL, port_bound, sipp, sipp_result, udp_port, when


class OriginateTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def start(self):
        root = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(root, "pb"))
        with open(os.path.join(root, "pb", "hello.md"), "w") as f:
            f.write("---\nllm:\n  provider: echo\n  greeting: \"Hello from activecall.\"\ntts:\n  provider: flite\n---\nBe brief.\n")
        self.http = f"http://127.0.0.1:{free_port()}"
        base = free_port() // 2 * 2
        conf = write_config(self, f'''
addr = "127.0.0.1"
udp_port = {udp_port()}
tcp_port = 0
http_addr = "{self.http[7:]}"
http_token = "sekret"
log_level = "debug"  # the events of calls without a WebSocket are logged at debug
rtp_start_port = {base}
rtp_end_port = {base + 20}
media_cache_path = "{root}/cache"
playbook_dir = "{root}/pb"
[recording]
path = "{root}/rec"
[callrecord]
root = "{root}/cdr"
''')
        self.root = root
        self.daemon = spawn_daemon(self, conf)
        yield self.daemon.wait_for("activecall ready")

    def post(self, body, token="sekret"):
        return treq.post(self.http + "/api/calls", json.dumps(body).encode(),
                         headers={"Authorization": f"Bearer {token}"}, persistent=False)

    @defer.inlineCallbacks
    def test_originate_list_kill(self):
        uas_port = udp_port()
        uas = sipp(self, "-p", str(uas_port), "-mp", str(udp_port() // 2 * 2), builtin="uas")
        yield when(port_bound(uas_port), 15, "sipp uas")
        yield self.start()
        resp = yield self.post({"callee": "x"}, token="wrong")
        self.assertEqual(resp.code, 401)
        yield resp.content()
        resp = yield self.post({"nocallee": 1})
        self.assertEqual(resp.code, 400)
        yield resp.content()
        resp = yield self.post({"callee": f"sip:bob@{LOCAL}:{uas_port}", "playbook": "hello.md",
                                "sip": {"enableSrtp": False}})
        self.assertEqual(resp.code, 201)
        session_id = (yield resp.json())["session_id"]
        yield self.daemon.wait_for(r'answer: \{"event":"answer"')
        listed = yield (yield treq.get(self.http + "/list?token=sekret", persistent=False)).json()
        self.assertEqual([c["id"] for c in listed["active_calls"]], [session_id])
        self.assertEqual(listed["active_calls"][0]["callType"], "sip")
        killed = yield (yield treq.get(self.http + f"/kill/{session_id}?token=sekret", persistent=False)).json()
        self.assertEqual(killed["status"], "killed")
        yield sipp_result(uas, timeout=15)  # our BYE reached sipp
        listed = yield (yield treq.get(self.http + "/list?token=sekret", persistent=False)).json()
        self.assertEqual(listed["active_calls"], [])

    @defer.inlineCallbacks
    def test_srtp_required_but_answered_plain_ends_cleanly(self):
        uas_port = udp_port()
        uas = sipp(self, "-p", str(uas_port), "-mp", str(udp_port() // 2 * 2), "-trace_msg", builtin="uas")
        yield when(port_bound(uas_port), 15, "sipp uas")
        yield self.start()
        resp = yield self.post({"callee": f"sip:bob@{LOCAL}:{uas_port}", "sip": {"enableSrtp": True}})
        self.assertEqual(resp.code, 201)
        yield resp.content()
        yield self.daemon.wait_for(r"we required SRTP and the answer is plain RTP")
        yield self.daemon.wait_for(r'hangup: \{"event":"hangup"')
        yield sipp_result(uas, timeout=15)  # and got a BYE for the unusable answer
        trace = ""
        for name in os.listdir(uas.workdir):
            if name.endswith("_messages.log"):
                with open(os.path.join(uas.workdir, name)) as f:
                    trace += f.read()
        self.assertIn("m=audio", trace)
        self.assertIn("RTP/SAVP", trace)  # what sipp received: our SDES offer
        self.assertIn("a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:", trace)
