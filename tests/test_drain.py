"""Drain and overload protection in the real daemon (a subprocess): SIGTERM and ``POST /api/drain`` take the
node out of service (SIP 503 + Retry-After to INVITE and OPTIONS, ``/ready`` 503, ``/call*`` upgrades 503,
the PBX registration removed) while a live call goes on; the daemon exits 0 once idle, the call's CDR
written; a second SIGTERM stops at once with the call hung up; ``max_calls`` refuses what is over the cap."""

import glob
import json
import os
import signal
import uuid

import treq
from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

from activecall.sip.message import parse_message
from tests.helpers import MIN_WAIT, free_port, spawn_daemon, write_config
from tests.test_sip_integration import LOCAL, start_kamailio, udp_port, when
from tests.wsclient import connect, send_json

UPGRADE = {"Connection": ["Upgrade"], "Upgrade": ["websocket"], "Sec-WebSocket-Version": ["13"],
           "Sec-WebSocket-Key": ["dGhlIHNhbXBsZSBub25jZQ=="]}


def later(seconds):
    d = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


class _OneShot(protocol.DatagramProtocol):
    def __init__(self):
        self.response = defer.Deferred()

    def datagramReceived(self, data, addr):
        message = parse_message(data)
        if getattr(message, "status", 0) >= 200 and not self.response.called:
            self.response.callback(message)


@defer.inlineCallbacks
def sip_request(method: str, port: int):
    """One out-of-dialog ``method`` (OPTIONS, INVITE without an offer) to the daemon; its final response."""
    shot = _OneShot()
    listening = reactor.listenUDP(0, shot, interface=LOCAL)
    here = listening.getHost().port
    call_id = uuid.uuid4().hex
    text = (f"{method} sip:bot@{LOCAL}:{port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {LOCAL}:{here};branch=z9hG4bK-{call_id};rport\r\n"
            f"From: <sip:probe@{LOCAL}>;tag=t{call_id[:8]}\r\nTo: <sip:bot@{LOCAL}>\r\n"
            f"Call-ID: {call_id}\r\nCSeq: 1 {method}\r\nContact: <sip:probe@{LOCAL}:{here}>\r\n"
            f"Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n")
    try:
        shot.transport.write(text.encode(), (LOCAL, port))
        response = yield when(shot.response, 10, f"the answer to {method}")
    finally:
        yield listening.stopListening()
    return response


class DrainTests(unittest.TestCase):
    timeout = 120

    def start(self, *extra, **kw):
        self.root = os.path.abspath(self.mktemp())
        self.sip_port, self.http_port = udp_port(), free_port()
        base = free_port() // 2 * 2
        lines = [f'addr = "{LOCAL}"', f"udp_port = {self.sip_port}", "tcp_port = 0",
                 f'http_addr = "{LOCAL}:{self.http_port}"', f"rtp_start_port = {base}", f"rtp_end_port = {base + 20}",
                 f'media_cache_path = "{self.root}/cache"', *extra,
                 "[callrecord]", 'type = "local"', f'root = "{self.root}/cdr"', ""]
        self.base = f"http://{LOCAL}:{self.http_port}"
        self.daemon = spawn_daemon(self, write_config(self, "\n".join(lines)))
        return self.daemon.wait_for("activecall ready", timeout=60)

    @defer.inlineCallbacks
    def ws_call(self, call_id):
        proto, client = yield connect(self, self.http_port, "/call", f"id={call_id}&ping=0")
        send_json(proto, {"command": "invite", "option": {"codec": "pcm"}})
        yield client.wait_event("answer")
        return proto, client

    @defer.inlineCallbacks
    def get(self, path, **kw):
        response = yield treq.get(self.base + path, persistent=False, **kw)
        body = yield response.content()
        return response, body

    @defer.inlineCallbacks
    def until_ready_is(self, code):
        """Poll /ready until it answers ``code`` (a bound on a hang, not a speed requirement)."""
        deadline = reactor.seconds() + MIN_WAIT
        while True:
            response, body = yield self.get("/ready")
            if response.code == code:
                return json.loads(body)
            if reactor.seconds() > deadline:
                raise AssertionError(f"/ready stayed {response.code}: {body!r}\n{self.daemon.output[-2000:]}")
            yield later(0.05)

    def cdrs(self):
        records = []
        for path in glob.glob(os.path.join(self.root, "cdr", "*", "*.json")):
            with open(path) as f:
                records.append(json.load(f))
        return records

    @defer.inlineCallbacks
    def test_sigterm_drains_a_live_call_then_exits_0(self):
        kamailio, kport = yield start_kamailio(self)
        yield self.start("graceful_shutdown_timeout = \"60s\"", "[[register_users]]",
                         f'server = "{LOCAL}:{kport}"', 'username = "alice"', "expires = 60",
                         "[register_users.credential]", 'username = "alice"', 'password = "secret"')
        yield self.daemon.wait_for("registered alice@", timeout=15)
        self.assertEqual((yield self.until_ready_is(200))["state"], "serving")
        self.assertEqual((yield sip_request("OPTIONS", self.sip_port)).status, 200)
        proto, client = yield self.ws_call("live-1")

        self.daemon.signal("TERM")
        ready = yield self.until_ready_is(503)
        self.assertEqual((ready["state"], ready["reason"]), ("draining", "draining"))
        response, body = yield self.get("/health")
        self.assertEqual(response.code, 200)  # liveness: still alive
        health = json.loads(body)
        self.assertEqual((health["state"], health["ready"], health["active_calls"]), ("draining", False, 1))
        # SIP: 503 + Retry-After (graceful_shutdown_timeout) to a new INVITE and to OPTIONS
        for method in ("OPTIONS", "INVITE"):
            refused = yield sip_request(method, self.sip_port)
            self.assertEqual((refused.status, refused.headers.get("Retry-After")), (503, "60"), method)
        # a new WebSocket session is refused at the upgrade, before anything of it exists
        response, body = yield self.get("/call?id=late", headers=UPGRADE)
        self.assertEqual(response.code, 503)
        self.assertEqual(json.loads(body)["reason"], "draining")
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["60"])
        # the PBX registration is removed while the daemon still runs
        yield self.daemon.wait_for("unregistered alice@", timeout=15)
        self.assertIsNone(self.daemon.exit_code)
        response, body = yield self.get("/metrics")
        text = body.decode()
        self.assertIn('activecall_refused_total{reason="draining",request="invite"} 1.0', text)
        self.assertIn('activecall_refused_total{reason="draining",request="options"} 1.0', text)
        self.assertIn('activecall_refused_total{reason="draining",request="websocket"} 1.0', text)
        self.assertIn("activecall_draining 1.0", text)

        # the live call goes on: it still gets answers to its commands
        send_json(proto, {"command": "history", "speaker": "user", "text": "still here"})
        self.assertEqual((yield client.wait_event("addHistory"))["text"], "still here")
        send_json(proto, {"command": "hangup", "reason": "done"})
        yield client.wait_event("hangup")
        code = yield when(self.daemon.ended, 30, "the daemon to exit once idle")
        self.assertEqual(code, 0, self.daemon.output[-3000:])
        self.assertIn("drained: no call left", self.daemon.output)
        self.assertNotIn("SIGTERM again", self.daemon.output)
        self.assertEqual([c["callId"] for c in self.cdrs()], ["live-1"])

    @defer.inlineCallbacks
    def test_a_second_sigterm_stops_at_once_with_the_call_hung_up(self):
        yield self.start('graceful_shutdown_timeout = "60s"')
        proto, client = yield self.ws_call("live-2")
        self.daemon.signal("TERM")
        yield self.until_ready_is(503)
        self.daemon.signal("TERM")
        hangup = yield client.wait_event("hangup")
        self.assertEqual(hangup.get("reason"), "system")
        code = yield when(self.daemon.ended, 30, "the daemon to exit")
        self.assertEqual(code, 0, self.daemon.output[-3000:])
        self.assertIn("SIGTERM again: stopping now", self.daemon.output)
        self.assertEqual([c["callId"] for c in self.cdrs()], ["live-2"])

    @defer.inlineCallbacks
    def test_api_drain_needs_the_token(self):
        yield self.start('http_token = "s3cret"')
        response = yield treq.post(self.base + "/api/drain", persistent=False)
        self.assertEqual(response.code, 401)
        yield response.content()
        self.assertEqual((yield self.until_ready_is(200))["state"], "serving")
        response = yield treq.post(self.base + "/api/drain", headers={"Authorization": ["Bearer s3cret"]},
                                   persistent=False)
        self.assertEqual(response.code, 202)
        self.assertEqual((yield response.json())["state"], "draining")
        code = yield when(self.daemon.ended, 30, "the idle daemon to exit after POST /api/drain")
        self.assertEqual(code, 0, self.daemon.output[-3000:])

    @defer.inlineCallbacks
    def test_max_calls(self):
        yield self.start("max_calls = 1")
        proto, client = yield self.ws_call("first")
        ready = yield self.until_ready_is(503)
        self.assertEqual((ready["reason"], ready["load"], ready["max_calls"]), ("max_calls", 1, 1))
        response, body = yield self.get("/call?id=second", headers=UPGRADE)
        self.assertEqual((response.code, json.loads(body)["reason"]), (503, "max_calls"))
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["5"])
        refused = yield sip_request("INVITE", self.sip_port)
        self.assertEqual((refused.status, refused.reason, refused.headers.get("Retry-After")),
                         (503, "Too Many Calls", "5"))
        self.assertEqual((yield sip_request("OPTIONS", self.sip_port)).status, 503)
        response, body = yield self.get("/metrics")
        self.assertIn('activecall_refused_total{reason="max_calls",request="websocket"} 1.0', body.decode())
        send_json(proto, {"command": "hangup"})
        yield client.wait_event("hangup")
        self.assertTrue((yield self.until_ready_is(200))["ready"])
        self.assertEqual((yield sip_request("OPTIONS", self.sip_port)).status, 200)
        yield self.ws_call("third")  # a place is free again

    @defer.inlineCallbacks
    def test_an_event_loop_that_keeps_running_late_trips_the_lag_guard(self):
        """The daemon is stopped (SIGSTOP) again and again, 300 ms at a time: each time it runs again its
        lag timer is far past a 50 ms limit, so /ready says overload; once it is left alone, the lag
        decays and /ready says 200 again.  One long stop alone would not trip it (tests/test_admission)."""
        yield self.start('max_event_loop_lag = "50ms"')
        yield self.until_ready_is(200)
        stalling = [True]

        @defer.inlineCallbacks
        def stall():
            while stalling[0]:
                self.daemon.signal("STOP")
                yield later(0.3)
                self.daemon.signal(signal.SIGCONT)
                yield later(0.05)

        stalls = stall()

        def stop_stalling():
            stalling[0] = False
            return stalls

        self.addCleanup(stop_stalling)
        overloaded = yield self.until_ready_is(503)
        self.assertEqual((overloaded["reason"], overloaded["overloaded"]), ("overload", True))
        self.assertGreater(overloaded["event_loop_lag_ms"], 50)
        yield stop_stalling()
        yield self.daemon.wait_for(r"event loop \d+ ms late \(max_event_loop_lag 50 ms\): refusing new calls")
        self.assertFalse((yield self.until_ready_is(200))["overloaded"])
        yield self.daemon.wait_for("event loop on time again")
