"""The RtpTicker: all RTP legs of a media clock ticked together over real loopback sockets —
one clock subscriber, a failing leg dropped without the others noticing, a flood bounded per
tick, stale packets discarded at start, packet metrics counted per tick.

Real sockets, because what is tested is the kernel's side as much as ours: the readiness poll
(epoll) and the C loops read descriptors, sockets connect to their streaming remote and disconnect
again.  Time is a ``task.Clock``; datagrams the test sends are waited for synchronously before the
tick that should read them (``settle``: ``select`` on the receiving sockets, bounded by
``MIN_WAIT``), never by a reactor delay."""

import select
import socket

import numpy as np
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from activecall.media.clock import MediaClock
from activecall.media.rtp import PortPool, RtpPacket
from activecall.media.rtp_leg import MAX_READS_PER_TICK, RtpLeg
from activecall.media import rtp_ticker
from activecall.media.rtp_ticker import RtpTicker
from activecall.metrics import Metrics
from activecall.testing import FakeMediaSession
from tests.helpers import MIN_WAIT, free_port


class ToneSession(FakeMediaSession):
    def __init__(self, name, fail=False):
        super().__init__(name, frame=np.full(320, 1000, dtype=np.int16), fail=fail)


def offer(port):
    return ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n")


class RtpTickerTests(unittest.TestCase):
    def setUp(self):
        base = free_port()
        base -= base % 2
        self.pool = PortPool(reactor, base, base + 40, interface="127.0.0.1")
        self.clock = task.Clock()
        self.media_clock = MediaClock(self.clock)
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.peer.bind(("127.0.0.1", 0))
        self.peer.setblocking(False)
        self.addCleanup(self.peer.close)
        self._pending = []

    def leg(self, session, metrics=None):
        leg = RtpLeg(session, self.media_clock, self.clock, host="127.0.0.1", codecs=("pcmu",), metrics=metrics)
        leg.allocate(self.pool)
        leg.answer(offer(self.peer.getsockname()[1]))
        self.addCleanup(leg.close)
        return leg

    def drain_peer(self, at_least=0):
        """What the peer received: the first ``at_least`` datagrams waited for (synchronously, bounded
        by ``MIN_WAIT``), then whatever else is queued."""
        got = []
        self.peer.settimeout(MIN_WAIT)
        try:
            while len(got) < at_least:
                got.append(self.peer.recvfrom(2048))
        finally:
            self.peer.setblocking(False)
        while True:
            try:
                got.append(self.peer.recvfrom(2048))
            except BlockingIOError:
                return got

    def send_to(self, leg, count, seq=1):
        for i in range(count):
            self.peer.sendto(RtpPacket(0, seq + i, 160 * (seq + i), 99, b"\xff" * 160).serialize(),
                             ("127.0.0.1", leg.local_port))
        self.sent_to(leg)

    def sent_to(self, leg):
        """The test sent ``leg`` datagrams that the next tick must find queued (see ``settle``)."""
        if hasattr(leg.ports.rtp, "fileno"):  # (a stand-in without one: the test names the real socket)
            self._pending.append(leg.ports.rtp)

    def settle(self, *socks):
        """Wait until every socket sent to since the last settle (and ``socks``) has its datagrams
        queued: a synchronous ``select``, which returns as soon as they are there.  A burst to one
        socket is waited for by its first datagram; loopback delivers a burst in order."""
        pending, self._pending = self._pending, []
        for sock in {id(s): s for s in pending + list(socks)}.values():
            readable, _, _ = select.select([sock], [], [], MIN_WAIT)
            if not readable:
                self.fail(f"nothing arrived on {sock.getsockname()} in {MIN_WAIT} s")
        return defer.succeed(None)

    @defer.inlineCallbacks
    def streaming_leg(self):
        """A started leg whose remote has sent it media: its socket is connected to the remote."""
        leg = self.leg(ToneSession("s"))
        leg.start()
        self.send_to(leg, 2)
        yield self.settle()
        self.clock.advance(0.02)
        self.assertTrue(leg.connected)
        return leg

    def reinvite_elsewhere(self, leg):
        """Re-INVITE ``leg`` to a new address and check that its next packet goes there; the leg's
        (connected, source_filtered, _may_connect) right after the re-INVITE."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
            other.bind(("127.0.0.1", 0))
            other.settimeout(MIN_WAIT)
            leg.reoffer(offer(other.getsockname()[1]))
            state = (leg.connected, leg.source_filtered, leg._may_connect)
            self.clock.advance(0.02)
            _, addr = other.recvfrom(2048)
            self.assertEqual(addr, ("127.0.0.1", leg.local_port))
        return state

    def test_one_clock_subscriber_for_all_legs_and_none_when_idle(self):
        legs = [self.leg(ToneSession(f"s{i}")) for i in range(3)]
        for leg in legs:
            leg.start()
        ticker = RtpTicker.of(self.media_clock, self.clock)
        self.assertEqual(self.media_clock._subscribers, [ticker])
        self.assertEqual(len(self.media_clock), 3)  # /health counts legs, not subscribers
        self.clock.advance(0.02)
        self.assertEqual([leg.packets_out for leg in legs], [1, 1, 1])
        self.assertEqual(len(self.drain_peer(3)), 3)
        for leg in legs:
            leg.close()
        self.assertEqual((self.media_clock._subscribers, len(self.media_clock)), ([], 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])  # an idle daemon runs no media timer

    def test_a_failing_leg_is_dropped_and_the_others_carry_on(self):
        good = self.leg(ToneSession("good"))
        bad = self.leg(ToneSession("bad", fail=True))
        good.start()
        bad.start()
        self.clock.advance(0.02)
        self.clock.advance(0.02)
        ticker = RtpTicker.of(self.media_clock, self.clock)
        self.assertEqual((ticker.legs, ticker.failures), ([good], 1))
        self.assertEqual((good.packets_out, bad.packets_out), (2, 0))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    @defer.inlineCallbacks
    def test_a_flood_is_read_a_bounded_amount_per_tick(self):
        leg = self.leg(ToneSession("s"))
        leg.start()
        self.send_to(leg, 3 * MAX_READS_PER_TICK)
        yield self.settle()
        self.clock.advance(0.02)
        self.assertEqual(leg.packets_in, MAX_READS_PER_TICK)
        self.clock.advance(0.02)
        self.assertEqual(leg.packets_in, 2 * MAX_READS_PER_TICK)

    @defer.inlineCallbacks
    def test_packets_queued_before_start_are_stale_and_discarded(self):
        session = ToneSession("s")
        leg = self.leg(session)
        self.send_to(leg, 10)
        yield self.settle()
        leg.start()
        self.send_to(leg, 2, seq=100)
        yield self.settle()
        self.clock.advance(0.02)
        self.assertEqual(leg.packets_in, 2)

    @defer.inlineCallbacks
    def test_audio_and_metrics_both_ways(self):
        metrics = Metrics()
        legs = [self.leg(ToneSession(f"s{i}"), metrics=metrics) for i in range(2)]
        for leg in legs:
            leg.start()
        for k in range(6):
            for leg in legs:
                self.send_to(leg, 1, seq=10 + k)
            yield self.settle()
            self.clock.advance(0.02)
        got = self.drain_peer(12)
        self.assertEqual(len(got), 12)
        self.assertTrue(all(len(data) == 172 for data, _ in got))
        for leg in legs:  # the jitter buffer primes on 2 frames, then plays one per tick
            self.assertGreaterEqual(len(leg.session.received), 4)
            self.assertTrue(all(f.dtype == np.int16 and f.size == 320 for f in leg.session.received))

        def value(direction):
            return metrics.registry.get_sample_value("activecall_rtp_packets_total", {"direction": direction})
        self.assertEqual((value("in"), value("out")), (12.0, 12.0))

    @defer.inlineCallbacks
    def test_only_sockets_with_data_are_read(self):
        """The readiness poll: a quiet leg's socket costs no recvfrom, a busy one is read dry."""
        quiet, busy = self.leg(ToneSession("quiet")), self.leg(ToneSession("busy"))
        quiet.start()
        busy.start()
        calls = {"quiet": 0, "busy": 0}
        for leg, name in ((quiet, "quiet"), (busy, "busy")):
            real = leg.ports.rtp

            class Counting:
                def __init__(self, sock, name):
                    self.sock, self.name = sock, name

                def recvfrom(self, size):
                    calls[self.name] += 1
                    return self.sock.recvfrom(size)

                def __getattr__(self, attr):
                    return getattr(self.sock, attr)
            leg.ports.rtp = Counting(real, name)
            self.addCleanup(setattr, leg.ports, "rtp", real)
        self.send_to(busy, 3)
        yield self.settle()
        self.clock.advance(0.02)
        self.assertEqual((quiet.packets_in, busy.packets_in), (0, 3))
        self.assertEqual(calls, {"quiet": 0, "busy": 3})

    @defer.inlineCallbacks
    def test_a_descriptor_reused_by_a_new_leg_is_still_read(self):
        """A leg whose socket closed before it left the ticker must not unregister the
        descriptor a newer leg now owns."""
        old = self.leg(ToneSession("old"))
        old.start()
        ticker = RtpTicker.of(self.media_clock, self.clock)
        fd = old.rtp_fileno()
        old.ports.rtp.close()  # the descriptor is free while the old leg is still in the ticker
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.assertEqual(sock.fileno(), fd)
        sock.close()
        new = self.leg(ToneSession("new"))
        new.start()
        self.assertEqual(new.rtp_fileno(), fd)
        old.ports.rtp = None
        old.close()
        self.assertEqual(ticker.legs, [new])
        self.send_to(new, 2)
        yield self.settle()
        self.clock.advance(0.02)
        self.assertEqual(new.packets_in, 2)

    @defer.inlineCallbacks
    def test_a_leg_without_a_descriptor_is_read_until_empty(self):
        leg = self.leg(ToneSession("s"))
        real = leg.ports.rtp

        class NoFileno:
            def recvfrom(self, size):
                return real.recvfrom(size)

            def sendto(self, data, addr):
                return real.sendto(data, addr)
        leg.ports.rtp = NoFileno()
        self.addCleanup(setattr, leg.ports, "rtp", real)
        leg.start()
        self.assertEqual(RtpTicker.of(self.media_clock, self.clock)._fd_of, {})
        self.send_to(leg, 4)
        yield self.settle(real)
        self.clock.advance(0.02)
        self.assertEqual(leg.packets_in, 4)

    @defer.inlineCallbacks
    def test_the_socket_is_connected_to_the_streaming_remote(self):
        """Once the negotiated remote streams, the leg's socket is connected to it: the kernel
        drops strangers' datagrams and the leg sends and receives without addresses."""
        leg = self.leg(ToneSession("s"))
        leg.start()
        self.assertFalse(leg.connected)
        self.send_to(leg, 2)
        yield self.settle()
        self.clock.advance(0.02)
        self.assertTrue(leg.connected and leg.source_filtered)
        self.assertEqual(leg.ports.rtp.getpeername(), self.peer.getsockname())
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
            stranger.sendto(RtpPacket(0, 50, 8000, 4321, b"\x00" * 160).serialize(), ("127.0.0.1", leg.local_port))
            self.send_to(leg, 1, seq=3)
            yield self.settle()
            self.clock.advance(0.02)
        self.assertEqual((leg.packets_in, leg.remote_ssrc), (3, 99))
        self.drain_peer(leg.packets_out)
        self.clock.advance(0.02)
        self.assertEqual([addr for _, addr in self.drain_peer(1)], [("127.0.0.1", leg.local_port)])

    @defer.inlineCallbacks
    def test_what_queued_before_the_connect_is_still_checked(self):
        """A stranger's datagram queued behind the first packet from the remote arrived before the
        kernel filtered: it is read with its source and ignored, and only then is the source trusted."""
        leg = self.leg(ToneSession("s"))
        leg.start()
        self.send_to(leg, 1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
            stranger.sendto(RtpPacket(0, 50, 8000, 4321, b"\x00" * 160).serialize(), ("127.0.0.1", leg.local_port))
            yield self.settle()
            self.clock.advance(0.02)
        self.assertEqual((leg.packets_in, leg.strangers, leg.remote_ssrc), (1, 1, 99))
        self.assertTrue(leg.source_filtered)

    @defer.inlineCallbacks
    def test_a_quiet_source_or_a_new_remote_lets_the_socket_go(self):
        """Latching must be able to follow a NAT rebinding, and a re-INVITE may move the remote:
        either dissolves the connection, and the socket takes datagrams from anyone again."""
        leg = yield self.streaming_leg()
        self.clock.advance(1.0)  # quiet for longer than LATCH_QUIET_SECONDS (one late tick, re-anchored)
        for _ in range(25):  # every leg's RTCP housekeeping runs within 25 ticks
            self.clock.advance(0.02)
        self.assertEqual((leg.connected, leg.source_filtered), (False, False))
        with self.assertRaises(OSError):
            leg.ports.rtp.getpeername()
        self.send_to(leg, 2, seq=3)
        yield self.settle()
        self.clock.advance(0.02)
        self.assertTrue(leg.connected)
        self.assertFalse(self.reinvite_elsewhere(leg)[0])

    @defer.inlineCallbacks
    def test_play_out_that_would_run_into_the_next_deadline_waits_a_tick(self):
        """An overloaded tick stops playing inbound frames out before the next frame is due and
        plays them after the next tick's sends: none is lost, never more than one tick's frames
        are carried, and sending never waits."""
        self.patch(rtp_ticker, "RECEIVE_CHUNK", 1)
        played = []
        slow = {"frames": 0, "seconds": 0.0}
        clock = self.clock

        class SlowSession(ToneSession):
            def audio_in(self, pcm):  # the next few frames handed over take the core for a while
                played.append(self.id)
                if slow["frames"]:
                    slow["frames"] -= 1
                    clock.rightNow += slow["seconds"]
        legs = [self.leg(SlowSession(f"s{i}")) for i in range(4)]
        for leg in legs:
            leg.start()
            self.send_to(leg, 40)
        yield self.settle()
        ticker = RtpTicker.of(self.media_clock, self.clock)
        self.clock.advance(0.02)
        self.assertEqual(played, ["s0", "s1", "s2", "s3"])
        ticks0, out = ticker.ticks, [leg.packets_out for leg in legs]

        # the tick at 0.04 (next due at 0.06): s0, s1, s2 take 8 ms each, so s3's frame waits;
        # the next tick is due at once, sends, plays s3's carried frame, then its own four
        played.clear()
        slow.update(frames=3, seconds=0.008)
        self.clock.advance(0.02)
        self.assertEqual(played, ["s0", "s1", "s2", "s3", "s0", "s1", "s2", "s3"])
        self.assertEqual(ticker.receive_deferred, 1)

        # two frames of 30 ms: a tick plays s0 and carries three; the next, already late, still plays
        # every carried frame (none is lost), then carries all of its own, and so on until on time
        played.clear()
        ticks = ticker.ticks
        slow.update(frames=2, seconds=0.030)
        self.clock.advance(0.02)
        self.assertEqual(played[:4], ["s0", "s1", "s2", "s3"])
        self.assertLessEqual(len(ticker._carried), len(legs))
        for _ in range(5):
            self.clock.advance(0.02)
        self.assertEqual(ticker._carried, [])  # on time again: nothing left over
        self.assertGreater(ticker.receive_deferred, 1)
        self.assertEqual([played.count(f"s{i}") for i in range(4)], [ticker.ticks - ticks] * 4)  # one per tick
        self.assertEqual([leg.packets_out - n for leg, n in zip(legs, out)], [ticker.ticks - ticks0] * 4)

    @defer.inlineCallbacks
    def test_a_connected_leg_whose_peer_went_away_carries_on(self):
        """A connected UDP socket gets the peer's ICMP port-unreachable back as errors on send and
        receive: counted, never raised into the tick, never a busy loop on the readiness poll."""
        leg = self.leg(ToneSession("s"))
        other = self.leg(ToneSession("other"))
        leg.start()
        other.start()
        self.send_to(leg, 2)
        self.send_to(other, 2)
        yield self.settle()
        self.clock.advance(0.02)
        self.assertTrue(leg.connected)
        self.peer.close()  # the far end's port is closed now: every send draws an ICMP error
        sent = leg.packets_out
        for _ in range(10):
            self.clock.advance(0.02)
            yield self.settle()
        ticker = RtpTicker.of(self.media_clock, self.clock)
        self.assertEqual((ticker.legs, ticker.failures), ([leg, other], 0))
        # the error is reported once per ICMP, to the send or (through the poll) the read that follows
        self.assertGreaterEqual(leg.packets_out + leg.send_errors - sent, 10)
        self.assertGreaterEqual(leg.packets_out - sent, 5)
        self.assertEqual(self.flushLoggedErrors(), [])

    @defer.inlineCallbacks
    def test_steady_plain_rtp_takes_the_short_path_and_everything_else_the_general_one(self):
        """Once the socket filters the source, plain audio packets of the current SSRC skip
        ``datagram_received``; a new SSRC, telephone-events or RTCP still go through it."""
        leg = self.leg(ToneSession("s"))
        leg.start()
        general = []
        real = leg.datagram_received

        def counting(data, addr, on_rtcp_port=False, now=None):
            general.append(data)
            return real(data, addr, on_rtcp_port, now)
        leg.datagram_received = counting
        self.send_to(leg, 2)
        yield self.settle()
        self.clock.advance(0.02)
        self.assertEqual((len(general), leg.source_filtered), (2, True))  # before the source was trusted
        self.send_to(leg, 3, seq=3)
        yield self.settle()
        self.clock.advance(0.02)
        self.clock.advance(0.02)
        self.assertEqual((len(general), leg.packets_in, leg.stats.received), (2, 5, 5))
        self.assertEqual(len(leg.jitter) + leg.jitter.stats.played, 5)
        # a new SSRC (the peer restarted its stream): the general path resets statistics and buffer
        self.peer.sendto(RtpPacket(0, 900, 9000, 77, b"\xff" * 160).serialize(), ("127.0.0.1", leg.local_port))
        self.sent_to(leg)
        yield self.settle()
        self.clock.advance(0.02)
        self.assertEqual((len(general), leg.remote_ssrc, leg.stats.received), (3, 77, 1))

    @defer.inlineCallbacks
    def test_a_socket_that_cannot_be_disconnected_still_sends_where_the_sdp_says(self):
        """Should dissolving the association ever fail, the leg goes back to naming the destination
        of every packet (a re-INVITE's new address is honoured) and never connects again."""
        from activecall.media import rtp_leg

        def refuse(sock):
            raise OSError(95, "Operation not supported")
        self.patch(rtp_leg, "disconnect_udp", refuse)
        leg = yield self.streaming_leg()
        self.assertEqual(self.reinvite_elsewhere(leg), (False, False, False))
        self.assertEqual(leg.send_errors, 0)

    @defer.inlineCallbacks
    def test_a_late_tick_reads_one_packet_per_socket(self):
        """After a stall every socket holds a backlog: a tick already past its deadline reads one
        packet from each (the stream's own rate) and leaves the rest for ticks with time to spare."""
        legs = [self.leg(ToneSession(f"s{i}")) for i in range(3)]
        for leg in legs:
            leg.start()
        ticker = RtpTicker.of(self.media_clock, self.clock)
        self.clock.advance(0.02)  # nothing queued yet
        reads = {}
        slow = {"reads": 6}
        clock = self.clock
        for leg in legs:
            real = leg.read_one

            def read_one(now, real=real):
                reads[ticker.ticks] = reads.get(ticker.ticks, 0) + 1
                if slow["reads"]:
                    slow["reads"] -= 1
                    clock.rightNow += 0.005  # each of the next six reads takes 5 ms
                return real(now)
            leg.read_one = read_one
        for leg in legs:
            self.send_to(leg, 5)
        yield self.settle()
        tick = ticker.ticks + 1
        self.clock.advance(0.02)  # due at 0.04, next at 0.06: round 1 ends at 0.055, round 2 at 0.07
        self.assertEqual(reads[tick], 6)  # two rounds; the third would start past the deadline
        for _ in range(5):
            self.clock.advance(0.02)
        self.assertEqual(sum(leg.packets_in for leg in legs), 15)  # the backlog read later, nothing lost

    @defer.inlineCallbacks
    def test_a_late_tick_reads_trusted_sockets_one_packet_each(self):
        """The same rule in the C loop, for legs whose sockets filter the source: a tick whose
        sends ran past the next frame's deadline reads one packet per socket."""
        clock, slow, seen = self.clock, {"armed": False}, []
        legs = []

        class SlowTick(ToneSession):
            def tick(self):
                if self.id == "s0":  # what the legs had taken when each tick began
                    seen.append([leg.packets_in for leg in legs])
                if slow["armed"] and self.id == "s0":  # this tick's send phase overruns its frame
                    slow["armed"] = False
                    clock.rightNow += 0.025
                return super().tick()
        for i in range(3):
            leg = self.leg(SlowTick(f"s{i}"))
            leg.start()
            self.send_to(leg, 2)
            legs.append(leg)
        yield self.settle()
        self.clock.advance(0.02)
        self.clock.advance(0.02)
        self.assertTrue(all(leg.source_filtered for leg in legs))
        for leg in legs:
            self.send_to(leg, 6, seq=3)
        yield self.settle()
        slow["armed"] = True
        seen.clear()
        self.clock.advance(0.02)  # the slow tick, then at once the one it made late
        self.assertEqual(seen[:2], [[2, 2, 2], [3, 3, 3]])  # the slow tick read one packet per socket
        self.assertEqual([leg.packets_in for leg in legs], [2 + 6] * 3)  # the backlog read later, nothing lost

    @defer.inlineCallbacks
    def test_a_leg_failing_inside_the_native_loops_is_dropped_with_its_error(self):
        """An exception from a leg's Python side, called by the C read or play-out loop, reaches
        the ticker's failure handler with its traceback; the other legs carry on."""
        reader, player, good = (self.leg(ToneSession(name)) for name in ("reader", "player", "good"))
        for leg in (reader, player, good):
            leg.start()
            self.send_to(leg, 2)
        yield self.settle()
        self.clock.advance(0.02)
        self.clock.advance(0.02)
        self.assertTrue(reader.source_filtered and player.source_filtered)

        def broken_general_path(data, now):
            raise RuntimeError("general path broke")
        reader._received_from_remote = broken_general_path
        self.peer.sendto(RtpPacket(0, 3, 480, 1234, b"\xff" * 160).serialize(),  # a new SSRC: general path
                         ("127.0.0.1", reader.local_port))
        self.sent_to(reader)

        def broken_decoder(pt):
            raise ValueError("no decoder today")
        player._decoders.clear()
        player._decoder = broken_decoder
        self.send_to(player, 2, seq=3)
        self.send_to(good, 2, seq=3)
        yield self.settle()
        self.clock.advance(0.02)
        ticker = RtpTicker.of(self.media_clock, self.clock)
        self.assertEqual((ticker.legs, ticker.failures), ([good], 2))
        errors = self.flushLoggedErrors(RuntimeError, ValueError)
        self.assertEqual(sorted(str(e.value) for e in errors), ["general path broke", "no decoder today"])
        self.assertTrue(all(e.tb is not None or e.frames for e in errors))
        received = len(good.session.received)
        self.clock.advance(0.02)
        self.assertEqual(len(good.session.received), received + 1)

    def test_the_descriptor_is_forgotten_before_the_socket_closes(self):
        leg = self.leg(ToneSession("s"))
        self.assertEqual(leg._rtp_fd, leg.ports.rtp.fileno())
        leg.close()
        self.assertEqual(leg._rtp_fd, -1)

    def test_a_leg_in_a_reference_cycle_is_collected(self):
        import gc
        import weakref
        session = ToneSession("s")
        leg = self.leg(session)
        leg.start()
        session.leg = leg  # session <-> leg, as a real call's objects are
        leg.close()
        ref = weakref.ref(leg)
        self._cleanups = [c for c in self._cleanups if getattr(c[0], "__self__", None) is not leg]
        del leg, session
        gc.collect()
        self.assertIsNone(ref())

    @defer.inlineCallbacks
    def test_garbage_from_the_trusted_source_is_dropped_and_the_leg_carries_on(self):
        """Whatever the remote sends once its source is trusted (the C read loop's short path
        only takes well-formed plain RTP of the current stream) never fails the leg."""
        import random
        leg = yield self.streaming_leg()
        self.send_to(leg, 1, seq=3)
        yield self.settle()
        self.clock.advance(0.02)
        self.assertTrue(leg.source_filtered)
        rng = random.Random(7)
        header = RtpPacket(0, 4, 640, 99, b"").serialize()
        garbage = [b"", b"\x80", header, header[:11], b"\x80\xc8" + bytes(30),  # empty, short, no payload, RTCP SR
                   b"\x90" + header[1:] + b"\x00\x01\x00\x09",  # extension header cut short
                   b"\xa0" + header[1:] + b"\xff" * 4,  # padding longer than the packet
                   b"\x40" + header[1:] + b"\x00" * 160,  # RTP version 1
                   header + b"\x00" * 3000]  # larger than any read buffer
        garbage += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))) for _ in range(200)]
        for k, data in enumerate(garbage):
            self.peer.sendto(data, ("127.0.0.1", leg.local_port))
            self.sent_to(leg)
            if k % 16 == 15:
                yield self.settle()
                self.clock.advance(0.02)
        yield self.settle()
        for _ in range(20):
            self.clock.advance(0.02)
        ticker = RtpTicker.of(self.media_clock, self.clock)
        self.assertEqual((ticker.legs, ticker.failures), ([leg], 0))
        self.assertEqual(self.flushLoggedErrors(), [])
        before = leg.packets_in
        self.send_to(leg, 3, seq=5)  # the real stream goes on
        yield self.settle()
        self.clock.advance(0.02)
        self.assertGreaterEqual(leg.packets_in, before + 3)
