"""The ``refer`` command (B2BUA) through the real daemon: a /call WebSocket
caller bridged to a SIP callee (sipp's uas echoing RTP), audio both ways,
X-Referred-* headers, the 408 timeout, autoHangup when the callee hangs up."""

import os

import numpy as np
from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests.helpers import MIN_WAIT, free_port, spawn_daemon, loopback_config
from tests.test_sip_integration import LOCAL, LoopbackUA, port_bound, sipp, sipp_result, udp_port, when
from tests.wsclient import connect, send_json


class ReferTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def start(self):
        root = os.path.abspath(self.mktemp())
        self.http_port = free_port()
        conf = loopback_config(self, root, self.http_port)
        self.daemon = spawn_daemon(self, conf)
        yield self.daemon.wait_for("activecall ready")
        proto, client = yield connect(self, self.http_port, "/call", "id=r1&ping=0")
        send_json(proto, {"command": "invite", "option": {"codec": "pcm", "caller": "sip:alice@example.com",
                                                          "callee": "sip:agent@example.com"}})
        yield client.wait_event("answer")
        return proto, client

    @defer.inlineCallbacks
    def test_bridge_to_sip_callee_audio_both_ways(self):
        uas_port = udp_port()
        uas = sipp(self, "-p", str(uas_port), "-mp", str(udp_port() // 2 * 2), "-rtp_echo", builtin="uas")
        yield when(port_bound(uas_port), 15, "sipp uas to bind")
        proto, client = yield self.start()
        send_json(proto, {"command": "refer", "caller": "sip:agent@example.com",
                          "callee": f"sip:bob@{LOCAL}:{uas_port}"})
        answer = yield client.wait_event("answer", refer=True)
        self.assertEqual(answer["trackId"], "server-side-track")
        # the caller talks: a 600 Hz tone goes out on the referred leg, sipp echoes it back
        t = np.arange(16000) / 16000
        tone = (np.sin(2 * np.pi * 600 * t) * 6000).astype("<i2")
        for i in range(0, tone.size, 320):
            proto.sendMessage(tone[i:i + 320].tobytes(), isBinary=True)
            yield _later(0.02)
        # wait for half a second of it to have come back (how soon depends on load; a bound, not a bar)
        deadline = reactor.seconds() + MIN_WAIT
        while sum(len(frame) for frame in client.audio) < 16000 and reactor.seconds() < deadline:
            yield _later(0.05)
        audio = np.frombuffer(b"".join(client.audio), dtype="<i2")
        self.assertGreaterEqual(audio.size, 8000, "no bridged audio came back")
        spectrum = np.abs(np.fft.rfft(audio.astype(float)))
        self.assertAlmostEqual(np.argmax(spectrum) * 16000 / audio.size, 600, delta=20)
        send_json(proto, {"command": "hangup"})
        yield client.wait_event("end")
        yield sipp_result(uas, timeout=15)  # sipp got our BYE on the referred leg

    @defer.inlineCallbacks
    def test_referred_headers_timeout_408(self):
        peer = LoopbackUA(self)
        peer.ring_only()
        proto, client = yield self.start()
        send_json(proto, {"command": "refer", "caller": "sip:agent@example.com",
                          "callee": f"sip:bob@{LOCAL}:{peer.port}", "options": {"timeout": 1}})
        reject = yield client.wait_event("reject", refer=True)
        self.assertEqual(reject["code"], 408)
        self.assertEqual(reject["reason"], "Timeout when refer")
        invite = peer.calls[0].invite
        self.assertEqual(invite.headers.get("X-Referred-Id"), "r1")
        self.assertEqual(invite.headers.get("X-Referred-To"), "sip:agent@example.com")
        self.assertEqual(invite.headers.get("X-Referred-From"), "sip:alice@example.com")
        yield when(peer.calls[0].when_ended(), 5, "the CANCEL of the referred leg")
        self.assertEqual(peer.calls[0].end.reason, "cancelled")
        # the call itself goes on
        send_json(proto, {"command": "history", "speaker": "a", "text": "still here"})
        yield client.wait_event("addHistory")

    @defer.inlineCallbacks
    def test_callee_hangup_ends_the_call_with_auto_hangup(self):
        peer = LoopbackUA(self)
        peer.answer_calls()
        proto, client = yield self.start()
        send_json(proto, {"command": "refer", "caller": "sip:agent@example.com",
                          "callee": f"sip:bob@{LOCAL}:{peer.port}"})
        yield client.wait_event("answer", refer=True)
        yield _later(0.2)
        yield peer.calls[0].hangup()
        hangup = yield client.wait_event("hangup")
        self.assertEqual(hangup["reason"], "refer")


def _later(seconds):
    from twisted.internet import reactor

    d = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d
