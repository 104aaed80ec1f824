"""Churn: many concurrent WebSocket and SIP calls opened and closed leave nothing
behind — no calls in /list, no RTP ports, no legs on the media clock.

A fixed number of calls, not as many as fit in a time (a count that would depend on
the machine's speed); each call's length is random (a seeded generator; which call draws which
length follows the scheduling)."""

import os
import random

import treq
from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests.helpers import MIN_WAIT, free_port, spawn_daemon, loopback_config
from tests.test_sip_integration import LOCAL, port_bound, sipp, udp_port, when
from tests.wsclient import connect, send_json

CONCURRENT_WS = 50
WS_CALLS_EACH = 6  # 300 WebSocket calls, 50 at a time
CONCURRENT_SIP = 5
SIP_CALLS_EACH = 3


def later(seconds):
    d = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


class ChurnTests(unittest.TestCase):
    timeout = 240

    @defer.inlineCallbacks
    def test_calls_churn_without_leaks(self):
        root = os.path.abspath(self.mktemp())
        uas_port = udp_port()
        sipp(self, "-p", str(uas_port), "-mp", str(udp_port() // 2 * 2), "-m", "100000", "-timeout", "90s", builtin="uas")
        yield when(port_bound(uas_port), 15, "sipp uas")
        http_port = free_port()
        conf = loopback_config(self, root, http_port, rtp_ports=99)
        daemon = spawn_daemon(self, conf)
        yield daemon.wait_for("activecall ready")
        stats = {"ws": 0, "sip": 0}
        rng = random.Random(18)

        @defer.inlineCallbacks
        def ws_caller(n):
            for _ in range(WS_CALLS_EACH):
                call_id = f"w{n}-{stats['ws']}"
                proto, client = yield connect(self, http_port, "/call", f"id={call_id}&ping=0")
                stats["ws"] += 1
                send_json(proto, {"command": "invite", "option": {"codec": rng.choice(["pcm", "pcmu"])}})
                yield client.wait_event("answer")
                proto.sendMessage(b"\x00" * 640, isBinary=True)
                yield later(rng.uniform(0.05, 0.4))
                if rng.random() < 0.5:
                    send_json(proto, {"command": "hangup"})
                    yield client.wait_event("end")
                else:
                    proto.sendClose()  # the client just goes away
                yield client.closed

        @defer.inlineCallbacks
        def sip_caller(n):
            for _ in range(SIP_CALLS_EACH):
                proto, client = yield connect(self, http_port, "/call/sip", f"id=s{n}-{stats['sip']}&ping=0")
                stats["sip"] += 1
                send_json(proto, {"command": "invite", "option": {"callee": f"sip:bob@{LOCAL}:{uas_port}"}})
                yield client.wait_event("answer")
                yield later(rng.uniform(0.05, 0.3))
                send_json(proto, {"command": "hangup"})
                yield client.wait_event("end")
                yield client.closed

        yield defer.gatherResults([ws_caller(i) for i in range(CONCURRENT_WS)]
                                  + [sip_caller(i) for i in range(CONCURRENT_SIP)], consumeErrors=True)
        self.assertEqual(stats, {"ws": CONCURRENT_WS * WS_CALLS_EACH, "sip": CONCURRENT_SIP * SIP_CALLS_EACH})
        # the last calls' teardown (a client that just went away, a BYE's transaction) may still be
        # running: wait until the daemon reports it idle; a leak never gets there and fails the wait
        deadline = reactor.seconds() + MIN_WAIT
        while True:
            health = yield (yield treq.get(f"http://127.0.0.1:{http_port}/health", persistent=False)).json()
            idle = (health["active_calls"], health["rtp_ports_in_use"], health["media_clock_legs"]) == (0, 0, 0)
            if idle or reactor.seconds() > deadline:
                break
            yield later(0.2)
        listed = yield (yield treq.get(f"http://127.0.0.1:{http_port}/list", persistent=False)).json()
        self.assertEqual(listed["active_calls"], [])
        self.assertEqual(health["active_calls"], 0)
        self.assertEqual(health["rtp_ports_in_use"], 0)
        self.assertEqual(health["media_clock_legs"], 0)
        daemon.signal("TERM")
        self.assertEqual((yield daemon.ended), 0)
