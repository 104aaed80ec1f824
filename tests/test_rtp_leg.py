"""Two RTP legs talking: offer/answer, audio both ways, RFC 4733 DTMF once per press, SDES-SRTP,
hold silence, strangers, latching, port release, RTCP.

``RtpLegTests`` run the legs over an in-memory datagram network (``activecall.testing.MemoryUdpNetwork``)
on a ``task.Clock``, ticked by hand: a packet is waiting at the far end when its send returns, so nothing
waits on the reactor or the kernel.  ``LoopbackIntegrationTests`` run two legs over real loopback UDP (the
kernel, the ticker's readiness poll and C loops, a socket connected to its streaming remote)."""

import select
import socket
from contextlib import closing

import numpy as np
from twisted.internet import reactor, task
from twisted.trial import unittest

from activecall.media.rtp import PortPool, PortsExhausted, RtpPacket, parse_rtcp
from activecall.media.rtp_leg import MediaNegotiationError, RtpLeg
from activecall.media.rtp_ticker import RTCP_POLL_TICKS
from activecall.testing import FakeMediaSession as FakeSession
from activecall.testing import ManualMediaClock, MemoryUdpNetwork
from tests.helpers import MIN_WAIT, free_port


def dominant_hz(pcm):
    spectrum = np.abs(np.fft.rfft(pcm.astype(float)))
    return np.argmax(spectrum) * 16000 / len(pcm)


def strangers_then_latching(test, s, arrived=lambda leg: None):
    """A stranger ``s`` is ignored by a leg without latching and, with latching, while the real source
    streams; once that source went quiet, the leg follows the stranger (a NAT rebinding).  ``arrived``
    waits until a datagram sent to a leg is there to read (a no-op on the in-memory network)."""
    a, b = test.call(b_kw={"latching": False})
    packet = RtpPacket(0, 1, 1, 1234, b"\xff" * 160).serialize()
    s.sendto(packet, ("127.0.0.1", b.local_port))
    test.run_ticks(2)
    # dropped: by b's own check, or by the kernel once b's socket is connected to a
    test.assertTrue(b.strangers >= 1 or b.source_filtered)
    test.assertNotEqual(b.remote_ssrc, 1234)
    test.assertEqual(b.remote_rtp, ("127.0.0.1", a.local_port))
    # with latching, a new source is ignored while the real one streams ...
    before = a.remote_rtp
    s.sendto(packet, ("127.0.0.1", a.local_port))
    test.run_ticks(2)
    test.assertEqual(a.remote_rtp, before)
    # ... and followed once the old one went quiet (a NAT rebinding)
    b.close()
    test.run_ticks(1)  # b's last packets, still queued on a's socket, are read now
    test.clock.advance(1.0)
    # a's socket was connected to b (the kernel filtered strangers): the quiet source lets
    # it go at a's next RTCP housekeeping, every RTCP_POLL_TICKS ticks
    test.run_ticks(RTCP_POLL_TICKS)
    test.assertFalse(a.connected)
    s.sendto(packet, ("127.0.0.1", a.local_port))
    arrived(a)
    test.run_ticks(2)
    test.assertEqual(a.remote_rtp, s.getsockname())


class RtpLegTests(unittest.TestCase):
    def setUp(self):
        self.net = MemoryUdpNetwork()
        self.pool = self.net.pool(40000, 40040)
        self.ticker = ManualMediaClock()
        self.clock = task.Clock()

    def leg(self, session, **kw):
        leg = RtpLeg(session, self.ticker, self.clock, host="127.0.0.1", **kw)
        leg.allocate(self.pool)
        self.addCleanup(leg.close)
        return leg

    def run_ticks(self, n):
        """Tick every leg n times (each tick's packets are at the far end when it is read)."""
        self.ticker.tick(n)

    def call(self, a_kw=None, b_kw=None, srtp=False, codecs_b=None):
        self.alice = FakeSession("alice", freq=440)
        self.bob = FakeSession("bob", freq=1000)
        a = self.leg(self.alice, **(a_kw or {}))
        b = self.leg(self.bob, **(b_kw or {}))
        if codecs_b:
            b.codecs = codecs_b
        offer = a.offer(srtp=srtp)
        answer = b.answer(offer)
        a.apply_answer(answer)
        a.start()
        b.start()
        self.run_ticks(25)
        return a, b

    def test_audio_both_ways_pcmu(self):
        a, b = self.call()
        self.assertEqual(a.encoder.name, "pcmu")
        got_bob = np.concatenate(self.bob.received)
        got_alice = np.concatenate(self.alice.received)
        self.assertAlmostEqual(dominant_hz(got_bob[-3200:]), 440, delta=10)
        self.assertAlmostEqual(dominant_hz(got_alice[-3200:]), 1000, delta=10)
        self.assertGreater(a.packets_out, 20)
        self.assertEqual(b.strangers, 0)

    def test_close_gives_the_g711_history_rows_back_without_the_garbage_collector(self):
        """A closed leg's G.711 resampler rows are free again at once (the session holding the leg is
        in reference cycles until the collector runs: its rows would stay taken, and the shared bank
        grow, until then)."""
        import gc
        from activecall.media import codecs as codec_mod
        gc.disable()
        self.addCleanup(gc.enable)
        a, b = self.call()
        self.assertEqual(a.encoder.name, "pcmu")
        rows = {(codec_mod._DOWN_BANK, c.downsampler.row) for c in (a.encoder, *a._decoders.values())}
        rows |= {(codec_mod._UP_BANK, c.upsampler.row) for c in (a.encoder, *a._decoders.values())}
        a.close()
        for bank, row in rows:
            self.assertIn(row, bank._free)
            self.assertFalse(np.any(bank.matrix[row] != 0))
        a.close()  # idempotent: no row is given back twice
        for bank, row in rows:
            self.assertEqual(bank._free.count(row), 1)
        a.encoder.encode(np.zeros(320, np.int16))  # a late frame codes from silence, touching no row

    def test_answer_keeps_offer_order_and_g722(self):
        a, b = self.call(a_kw={"codecs": ("g722", "pcmu", "telephone_event")})
        self.assertEqual(b.encoder.name, "g722")
        self.assertAlmostEqual(dominant_hz(np.concatenate(self.bob.received)[-3200:]), 440, delta=10)

    def test_dtmf_each_digit_once(self):
        a, b = self.call()
        a.send_dtmf("15#")
        self.run_ticks(40)
        digits = [e.digit for e in self.bob.events if e.TAG == "dtmf"]
        self.assertEqual(digits, ["1", "5", "#"])

    def test_srtp_audio(self):
        a, b = self.call(srtp=True)
        self.assertIsNotNone(a.srtp)
        self.assertIsNotNone(b.srtp)
        self.assertAlmostEqual(dominant_hz(np.concatenate(self.bob.received)[-3200:]), 440, delta=10)

    def test_plain_answer_to_mandatory_srtp_offer_is_refused(self):
        a = self.leg(FakeSession("a"))
        b = self.leg(FakeSession("b"))
        offer = a.offer(srtp=True)
        plain = b.answer(offer.replace("RTP/SAVP", "RTP/AVP").replace("a=crypto", "a=x-crypto"))
        self.assertRaises(MediaNegotiationError, a.apply_answer, plain)
        self.assertRaises(MediaNegotiationError, b.answer, a.offer(srtp=False), srtp_required=True)

    def test_no_common_codec_is_488(self):
        a = self.leg(FakeSession("a"), codecs=("opus",))
        b = self.leg(FakeSession("b"), codecs=("pcma",))
        with self.assertRaises(MediaNegotiationError) as cm:
            b.answer(a.offer())
        self.assertEqual(cm.exception.status, 488)

    def test_unusable_sdp_is_488_at_negotiation(self):
        """Ports above 65535 and addresses that are not IP literals never reach the send path."""
        a = self.leg(FakeSession("a"))
        b = self.leg(FakeSession("b"))
        offer = a.offer()
        for bad in (offer.replace(f"m=audio {a.local_port} ", "m=audio 70000 "),
                    offer.replace("c=IN IP4 127.0.0.1", "c=IN IP4 no-such-host.invalid"),
                    offer.replace("c=IN IP4 127.0.0.1", "c=IN IP4 300.1.2.3")):
            with self.assertRaises(MediaNegotiationError) as cm:
                b.answer(bad)
            self.assertEqual(cm.exception.status, 488)
            self.assertRaises(MediaNegotiationError, a.apply_answer, bad)  # as an answer to our offer
            self.assertIsNone(b.remote_rtp)
        answer = b.answer(offer)
        a.apply_answer(answer)
        bad_reoffer = offer.replace(f"m=audio {a.local_port} ", "m=audio 99999 ")
        self.assertRaises(MediaNegotiationError, b.reoffer, bad_reoffer)
        self.assertEqual(b.remote_rtp, ("127.0.0.1", a.local_port))  # the call keeps its media

    def test_the_send_path_never_raises_on_a_bad_destination(self):
        """Defence in depth: a destination that got past negotiation anyway (or a latched one)
        fails sends quietly: counted, logged once per leg, the leg keeps running."""
        from twisted.logger import globalLogPublisher

        from activecall.metrics import Metrics

        metrics = Metrics()
        lines = []
        globalLogPublisher.addObserver(lines.append)
        self.addCleanup(globalLogPublisher.removeObserver, lines.append)
        a, b = self.call(a_kw={"metrics": metrics})
        for destination in (("127.0.0.1", 70000), ("bad\x00host", 5000), ("h\udcff", 5000), (None, 5000)):
            if a.connected:
                a._disconnect()
            a.remote_rtp = destination
            a.remote_rtcp = destination
            before = a.send_errors
            self.run_ticks(3)
            self.assertGreater(a.send_errors, before, destination)
            a._send_rtcp([])  # RTCP too
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertTrue(a.running)
        failures = [e for e in lines if "RTP send to" in e.get("log_format", "")]
        self.assertEqual(len(failures), 1)
        self.assertEqual(metrics.registry.get_sample_value("activecall_errors_total", {"kind": "rtp_send"}),
                         a.send_errors)

    def test_hold_silences_inbound(self):
        a, b = self.call()
        hold = a.offer().replace("a=sendrecv", "a=sendonly")
        answer, on_hold = b.reoffer(hold)
        self.assertTrue(on_hold)
        self.assertIn("a=recvonly", answer)
        self.bob.received.clear()
        sent, stamp = b.packets_out, b.stream.timestamp
        self.run_ticks(10)
        self.assertTrue(all(not f.any() for f in self.bob.received))
        # recvonly: b sends nothing, its timestamp runs on, and its next packet will be marked
        self.assertEqual(b.packets_out, sent)
        self.assertGreaterEqual((b.stream.timestamp - stamp) % (1 << 32), 10 * 160)
        self.assertTrue(b.stream._marker_next)
        answer, on_hold = b.reoffer(a.offer())
        self.assertFalse(on_hold)
        self.run_ticks(3)
        self.assertGreater(b.packets_out, sent)

    def test_strangers_ignored_without_latching_and_followed_with_it(self):
        with closing(self.net.socket()) as s:
            strangers_then_latching(self, s)

    def test_rtcp_report_and_bye(self):
        a, b = self.call()
        got = []
        orig = b._rtcp_received
        b._rtcp_received = lambda data, addr: (got.append(parse_rtcp(data)), orig(data, addr))
        self.clock.advance(5)
        # RTCP is the ticker's job every 25 ticks per leg (0.5 s): a sends its report within 25
        # ticks once 5 s passed, b reads its RTCP socket within the next 25
        self.run_ticks(50)
        self.assertTrue(any(type(p).__name__ == "SenderReport" for ps in got for p in ps))
        a.close()
        self.run_ticks(25)
        self.assertTrue(any(type(p).__name__ == "Bye" for ps in got for p in ps))

    def test_ports_released_and_exhaustion(self):
        small = self.net.pool(self.pool.start, self.pool.start + 3)
        legs = []
        for _ in range(2):
            leg = RtpLeg(FakeSession("x"), self.ticker, self.clock, host="127.0.0.1")
            leg.allocate(small)
            legs.append(leg)
        extra = RtpLeg(FakeSession("y"), self.ticker, self.clock, host="127.0.0.1")
        self.assertRaises(PortsExhausted, extra.allocate, small)
        legs[0].close()
        extra.allocate(small)
        legs.append(extra)
        for leg in legs[1:]:
            leg.close()


class LoopbackIntegrationTests(unittest.TestCase):
    """Two legs over real loopback UDP through the ticker's readiness poll and C loops, their sockets
    connected to each other once both stream (the kernel then drops strangers' datagrams).

    Each tick sends one packet per leg; after it, a packet its peer has not taken yet is waited for
    synchronously (``select`` on the peer's socket, bounded by ``MIN_WAIT``: an event, never a speed
    bar), so the next tick reads it whatever the kernel's delivery took."""

    def setUp(self):
        base = free_port()
        base -= base % 2
        self.pool = PortPool(reactor, base, base + 40, interface="127.0.0.1")
        self.ticker = ManualMediaClock()
        self.clock = task.Clock()
        self.legs = []

    def leg(self, session, **kw):
        leg = RtpLeg(session, self.ticker, self.clock, host="127.0.0.1", **kw)
        leg.allocate(self.pool)
        self.addCleanup(leg.close)
        self.legs.append(leg)
        return leg

    def wait_readable(self, sock):
        readable, _, _ = select.select([sock], [], [], MIN_WAIT)
        if not readable:
            self.fail(f"nothing arrived on {sock.getsockname()} in {MIN_WAIT} s")

    def run_ticks(self, n):
        a, b = self.legs
        for _ in range(n):
            self.ticker.tick()
            for sender, receiver in ((a, b), (b, a)):
                if receiver.ports is not None and receiver.packets_in < sender.packets_out:
                    self.wait_readable(receiver.ports.rtp)

    def call(self, a_kw=None, b_kw=None):
        self.alice = FakeSession("alice", freq=440)
        self.bob = FakeSession("bob", freq=1000)
        a = self.leg(self.alice, **(a_kw or {}))
        b = self.leg(self.bob, **(b_kw or {}))
        a.apply_answer(b.answer(a.offer()))
        a.start()
        b.start()
        self.run_ticks(25)
        return a, b

    def test_audio_both_ways_pcmu_over_loopback_udp(self):
        a, b = self.call()
        self.assertEqual(a.encoder.name, "pcmu")
        self.assertTrue(a.connected and b.connected)
        got_bob = np.concatenate(self.bob.received)
        got_alice = np.concatenate(self.alice.received)
        self.assertAlmostEqual(dominant_hz(got_bob[-3200:]), 440, delta=10)
        self.assertAlmostEqual(dominant_hz(got_alice[-3200:]), 1000, delta=10)
        self.assertGreater(a.packets_out, 20)
        self.assertEqual(b.strangers, 0)

    def test_strangers_filtered_by_the_kernel_and_latching_after_a_quiet_source_over_loopback_udp(self):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            strangers_then_latching(self, s, arrived=lambda leg: self.wait_readable(leg.ports.rtp))
