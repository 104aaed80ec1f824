"""A warm transfer through the real daemon: a /call WebSocket caller is put on hold (a 440 Hz WAV as
music), the human (sipp's UAS, echoing RTP) is called and hears the summary (flite) alone, then the
two are bridged: the caller's 600 Hz tone comes back through the human's echo.  A human who declines
or does not answer: ``reject{refer: true}`` and the caller's call goes on."""

import os
import wave

import numpy as np
from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests.helpers import MIN_WAIT, free_port, spawn_daemon, loopback_config
from tests.test_sip_integration import LOCAL, LoopbackUA, port_bound, sipp, sipp_result, udp_port, when
from tests.wsclient import connect, send_json


def _later(seconds):
    d = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


def dominant(audio) -> float:
    spectrum = np.abs(np.fft.rfft(audio.astype(float)))
    return np.argmax(spectrum) * 16000 / audio.size


class WarmTransferTests(unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def start(self):
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        self.moh = os.path.join(root, "hold.wav")
        t = np.arange(16000) / 16000
        with wave.open(self.moh, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(16000)
            w.writeframes((np.sin(2 * np.pi * 440 * t) * 6000).astype("<i2").tobytes())
        self.http_port = free_port()
        conf = loopback_config(self, root, self.http_port)
        self.daemon = spawn_daemon(self, conf)
        yield self.daemon.wait_for("activecall ready")
        proto, client = yield connect(self, self.http_port, "/call", "id=w1&ping=0")
        send_json(proto, {"command": "invite", "option": {"codec": "pcm", "caller": "sip:alice@example.com",
                                                          "tts": {"provider": "flite"}}})
        yield client.wait_event("answer")
        return proto, client

    @defer.inlineCallbacks
    def test_hold_consult_then_bridge(self):
        uas_port = udp_port()
        human = sipp(self, "-p", str(uas_port), "-mp", str(udp_port() // 2 * 2), "-rtp_echo", builtin="uas")
        yield when(port_bound(uas_port), 15, "sipp uas to bind")
        proto, client = yield self.start()
        send_json(proto, {"command": "warmTransfer", "callee": f"sip:human@{LOCAL}:{uas_port}",
                          "summary": "Alice wants a refund for order one two three.", "moh": self.moh})
        yield client.wait_event("answer", refer=True)
        bridged = yield client.wait_event("bridged", active=True)
        self.assertEqual(bridged["peer"], "w1:consult")
        on_hold = np.frombuffer(b"".join(client.audio), dtype="<i2")
        # the caller heard the music while the human was called and briefed, and nothing else:
        # the summary was spoken on the human's leg only
        self.assertGreaterEqual(on_hold.size, 8000, "no hold music reached the caller")
        self.assertLess(abs(dominant(on_hold) - 440), 15)
        spectrum = np.abs(np.fft.rfft(on_hold.astype(float))) ** 2
        freqs = np.fft.rfftfreq(on_hold.size, 1 / 16000)
        near = spectrum[(freqs > 400) & (freqs < 480)].sum()
        self.assertGreater(near / spectrum.sum(), 0.9, "the caller heard something besides the music")
        before = len(client.audio)
        # bridged: the caller's tone goes to the human, whose echo comes back to the caller
        t = np.arange(16000) / 16000
        tone = (np.sin(2 * np.pi * 600 * t) * 6000).astype("<i2")
        for i in range(0, tone.size, 320):
            proto.sendMessage(tone[i:i + 320].tobytes(), isBinary=True)
            yield _later(0.02)
        deadline = reactor.seconds() + MIN_WAIT
        while sum(len(f) for f in client.audio[before:]) < 16000 and reactor.seconds() < deadline:
            yield _later(0.05)
        after = np.frombuffer(b"".join(client.audio[before:]), dtype="<i2")
        self.assertGreaterEqual(after.size, 8000, "no bridged audio came back")
        self.assertLess(abs(dominant(after) - 600), 20)
        send_json(proto, {"command": "hangup"})
        yield client.wait_event("end")
        yield sipp_result(human, timeout=15)  # the human's call got its BYE

    @defer.inlineCallbacks
    def test_no_answer_returns_to_the_caller(self):
        peer = LoopbackUA(self)
        peer.ring_only()
        proto, client = yield self.start()
        send_json(proto, {"command": "warmTransfer", "callee": f"sip:human@{LOCAL}:{peer.port}",
                          "summary": "hello", "moh": self.moh, "timeout": 1})
        yield client.wait_event("ringing", refer=True)
        reject = yield client.wait_event("reject", refer=True)
        self.assertEqual(reject["code"], 408)
        yield when(peer.calls[0].when_ended(), 5, "the CANCEL of the human's call")
        self.assertEqual(peer.calls[0].end.reason, "cancelled")
        send_json(proto, {"command": "history", "speaker": "a", "text": "still here"})
        yield client.wait_event("addHistory")
        self.assertEqual([e for e in client.events if e["event"] == "bridged"], [])

    @defer.inlineCallbacks
    def test_declined_returns_to_the_caller(self):
        peer = LoopbackUA(self)

        def decline(call):
            peer.calls.append(call)
            call.reject(486, "Busy Here")

        peer.ua.invite_handler = decline
        proto, client = yield self.start()
        send_json(proto, {"command": "warmTransfer", "callee": f"sip:human@{LOCAL}:{peer.port}", "moh": self.moh})
        reject = yield client.wait_event("reject", refer=True)
        self.assertEqual(reject["code"], 486)
        send_json(proto, {"command": "history", "speaker": "a", "text": "still here"})
        yield client.wait_event("addHistory")
