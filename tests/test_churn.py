"""Churn: many concurrent WebSocket and SIP calls opened and closed for a while
leave nothing behind — no calls in /list, no RTP ports, no legs on the media clock."""

import os
import random

import treq
from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests.helpers import free_port, spawn_daemon, write_config
from tests.test_sip_integration import LOCAL, port_bound, sipp, udp_port, when
from tests.wsclient import connect, send_json

DURATION = 20.0
CONCURRENT_WS = 50


def later(seconds):
    d = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


class ChurnTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_calls_churn_without_leaks(self):
        root = os.path.abspath(self.mktemp())
        uas_port = udp_port()
        sipp(self, "-p", str(uas_port), "-mp", str(udp_port() // 2 * 2), "-m", "100000", "-timeout", "90s", builtin="uas")
        yield when(port_bound(uas_port), 15, "sipp uas")
        http_port = free_port()
        base = free_port() // 2 * 2
        conf = write_config(self, f'''
addr = "127.0.0.1"
udp_port = {udp_port()}
tcp_port = 0
http_addr = "127.0.0.1:{http_port}"
rtp_start_port = {base}
rtp_end_port = {base + 99}
media_cache_path = "{root}/cache"
[recording]
path = "{root}/rec"
''')
        daemon = spawn_daemon(self, conf)
        yield daemon.wait_for("activecall ready")
        deadline = reactor.seconds() + DURATION
        stats = {"ws": 0, "sip": 0}

        @defer.inlineCallbacks
        def ws_caller(n):
            while reactor.seconds() < deadline:
                call_id = f"w{n}-{stats['ws']}"
                proto, client = yield connect(self, http_port, "/call", f"id={call_id}&ping=0")
                stats["ws"] += 1
                send_json(proto, {"command": "invite", "option": {"codec": random.choice(["pcm", "pcmu"])}})
                yield client.wait_event("answer")
                proto.sendMessage(b"\x00" * 640, isBinary=True)
                yield later(random.uniform(0.05, 0.4))
                if random.random() < 0.5:
                    send_json(proto, {"command": "hangup"})
                    yield client.wait_event("end")
                else:
                    proto.sendClose()  # the client just goes away
                yield client.closed

        @defer.inlineCallbacks
        def sip_caller(n):
            while reactor.seconds() < deadline:
                proto, client = yield connect(self, http_port, "/call/sip", f"id=s{n}-{stats['sip']}&ping=0")
                stats["sip"] += 1
                send_json(proto, {"command": "invite", "option": {"callee": f"sip:bob@{LOCAL}:{uas_port}"}})
                yield client.wait_event("answer")
                yield later(random.uniform(0.05, 0.3))
                send_json(proto, {"command": "hangup"})
                yield client.wait_event("end")
                yield client.closed

        yield defer.gatherResults([ws_caller(i) for i in range(CONCURRENT_WS)]
                                  + [sip_caller(i) for i in range(5)], consumeErrors=True)
        yield later(0.5)
        health = yield (yield treq.get(f"http://127.0.0.1:{http_port}/health", persistent=False)).json()
        listed = yield (yield treq.get(f"http://127.0.0.1:{http_port}/list", persistent=False)).json()
        self.assertGreater(stats["ws"], CONCURRENT_WS * 5, stats)
        self.assertGreater(stats["sip"], 10, stats)
        self.assertEqual(listed["active_calls"], [])
        self.assertEqual(health["active_calls"], 0)
        self.assertEqual(health["rtp_ports_in_use"], 0)
        self.assertEqual(health["media_clock_legs"], 0)
        daemon.signal("TERM")
        self.assertEqual((yield daemon.ended), 0)
