"""RTP/RTCP wire format, stream bookkeeping, RFC 3550 receive statistics, and the port pool on real sockets."""

import socket
import struct

from twisted.internet import defer, protocol, reactor, task
from twisted.trial import unittest

from activecall.media import rtp


class RtpPacketTests(unittest.TestCase):
    def test_minimal_header_bytes(self):
        p = rtp.RtpPacket(payload_type=0, sequence=0x1234, timestamp=0xDECAFBAD, ssrc=0xCAFEBABE, payload=b"\xab" * 4)
        self.assertEqual(p.serialize(), bytes.fromhex("80001234decafbadcafebabe") + b"\xab" * 4)
        self.assertEqual(rtp.RtpPacket.parse(p.serialize()), p)

    def test_marker_csrc_extension_padding_round_trip(self):
        p = rtp.RtpPacket(payload_type=101, sequence=65535, timestamp=1, ssrc=2, payload=b"hello", marker=True,
                          csrcs=(7, 8), extension=(0xBEDE, b"\x10\xff\x00\x00"), padding=3)
        data = p.serialize()
        self.assertEqual(data[0], 0x80 | 0x20 | 0x10 | 2)
        self.assertEqual(data[1], 0x80 | 101)
        self.assertEqual(data[-3:], b"\x00\x00\x03")
        self.assertEqual(rtp.RtpPacket.parse(data), p)

    def test_malformed_packets(self):
        good = rtp.RtpPacket(0, 1, 2, 3, b"x").serialize()
        for bad in (good[:11], b"\x40" + good[1:], b"\x82" + good[1:12], b"\x90" + good[1:12] + b"\x00",
                    b"\x90" + good[1:12] + b"\xbe\xde\x00\x05", b"\xa0" + good[1:12] + b"\x00",
                    b"\xa0" + good[1:12] + b"\x09"):
            self.assertRaises(rtp.RtpError, rtp.RtpPacket.parse, bad)

    def test_rtcp_demux(self):
        self.assertTrue(rtp.is_rtcp(bytes([0x80, 200])))
        self.assertTrue(rtp.is_rtcp(bytes([0x81, 203])))
        self.assertFalse(rtp.is_rtcp(bytes([0x80, 0])))
        self.assertFalse(rtp.is_rtcp(bytes([0x80, 0x80 | 101])))  # marker + PT 101 = 229


class RtcpTests(unittest.TestCase):
    def test_compound_sr_sdes_round_trip(self):
        block = rtp.ReportBlock(ssrc=9, fraction_lost=25, cumulative_lost=-3, highest_sequence=70000, jitter=80,
                                last_sr=0x12345678, delay_since_last_sr=65536)
        packets = [rtp.SenderReport(1, rtp.ntp_timestamp(1700000000.5), 160, 10, 1600, (block,)),
                   rtp.SourceDescription.cname(1, "bot@activecall"),
                   rtp.Bye((1,), b"call ended")]
        data = rtp.serialize_rtcp(packets)
        self.assertEqual(len(data) % 4, 0)
        self.assertEqual(rtp.parse_rtcp(data), packets)

    def test_sr_header_and_length(self):
        data = rtp.SenderReport(0xCAFEBABE, 0, 0, 0, 0).serialize()
        self.assertEqual(data[:4], bytes([0x80, 200, 0, 6]))
        self.assertEqual(len(data), 28)

    def test_receiver_report_and_bye_without_reason(self):
        packets = [rtp.ReceiverReport(5), rtp.Bye((5, 6))]
        data = rtp.serialize_rtcp(packets)
        self.assertEqual(data[:4], bytes([0x80, 201, 0, 1]))
        self.assertEqual(rtp.parse_rtcp(data), packets)

    def test_sdes_item_lengths_pad_to_words(self):
        for name in ("a", "ab", "abc", "abcd", "abcde"):
            data = rtp.SourceDescription.cname(3, name).serialize()
            self.assertEqual(len(data) % 4, 0)
            self.assertEqual(rtp.parse_rtcp(data)[0].chunks[0].items, ((1, name.encode()),))

    def test_unknown_types_are_kept(self):
        app = rtp.UnknownRtcp(204, 1, b"\x00\x00\x00\x01name")
        self.assertEqual(rtp.parse_rtcp(app.serialize()), [app])

    def test_malformed_rtcp(self):
        sr = rtp.SenderReport(1, 0, 0, 0, 0).serialize()
        for bad in (b"\x80", sr[:-4], sr + b"\x80", b"\x40" + sr[1:], bytes([0x81, 201, 0, 1, 0, 0, 0, 1])):
            self.assertRaises(rtp.RtpError, rtp.parse_rtcp, bad)

    def test_ntp_conversion(self):
        ntp = rtp.ntp_timestamp(0.5)
        self.assertEqual(ntp >> 32, 2208988800)
        self.assertEqual(ntp & 0xFFFFFFFF, 1 << 31)
        self.assertEqual(rtp.ntp_middle(ntp), ((2208988800 & 0xFFFF) << 16) | 0x8000)


class StreamTests(unittest.TestCase):
    def test_sequence_and_timestamp_advance_and_wrap(self):
        s = rtp.RtpStream(payload_type=0, clock_rate=8000, ssrc=42, sequence=65534, timestamp=0xFFFFFF00)
        packets = [s.next_packet(b"\x00" * 160, 160) for _ in range(3)]
        self.assertEqual([p.sequence for p in packets], [65534, 65535, 0])
        self.assertEqual([p.timestamp for p in packets], [0xFFFFFF00, 0xFFFFFFA0, 0x40])
        self.assertEqual([p.marker for p in packets], [True, False, False])  # the first packet is marked
        self.assertEqual((s.packet_count, s.octet_count), (3, 480))

    def test_skip_marks_the_next_packet(self):
        s = rtp.RtpStream(payload_type=8, clock_rate=8000, sequence=0, timestamp=0)
        s.next_packet(b"x", 160)
        s.skip(800)
        p = s.next_packet(b"x", 160)
        self.assertTrue(p.marker)
        self.assertEqual((p.sequence, p.timestamp), (1, 960))

    def test_explicit_timestamp_and_payload_type(self):
        s = rtp.RtpStream(payload_type=0, clock_rate=8000, sequence=0, timestamp=1000)
        p = s.next_packet(b"\x05\x0a\x00\xa0", 160, payload_type=101, timestamp=500)
        self.assertEqual((p.payload_type, p.timestamp), (101, 500))
        self.assertEqual(s.timestamp, 1160)

    def test_the_audio_header_is_next_header_without_options(self):
        """The tick's written-out header gives the same bytes and bookkeeping as the general one,
        across the first (marked) packet, a skip and the sequence and timestamp wrap."""
        streams = [rtp.RtpStream(payload_type=8, clock_rate=8000, ssrc=9, sequence=65534, timestamp=0xFFFFFF00)
                   for _ in range(2)]
        general, audio = [], []
        for k in range(5):
            if k == 3:
                for s in streams:
                    s.skip(320)
            general.append(streams[0].next_header(160, 160))
            audio.append(streams[1].next_audio_header(160, 160))
        self.assertEqual(audio, general)
        self.assertEqual(streams[1], streams[0])  # sequence, timestamp, counts: the dataclass's fields
        self.assertEqual([rtp.RtpPacket.parse(h + b"x").marker for h in audio], [True, False, False, True, False])

    def test_random_start_values(self):
        a, b = rtp.RtpStream(0, 8000), rtp.RtpStream(0, 8000)
        self.assertNotEqual((a.ssrc, a.sequence, a.timestamp), (b.ssrc, b.sequence, b.timestamp))

    def test_fields_wrap_like_the_wire(self):
        s = rtp.RtpStream(payload_type=0, clock_rate=8000, ssrc=-1, sequence=0x1FFFF, timestamp=1 << 32)
        self.assertEqual((s.ssrc, s.sequence, s.timestamp), (0xFFFFFFFF, 0xFFFF, 0))
        s.sequence = 65536 + 3
        self.assertEqual(s.sequence, 3)
        self.assertRaises(TypeError, setattr, s, "timestamp", 1.5)
        self.assertRaises(ValueError, s.next_header, -1, 160)
        self.assertRaises(ValueError, s.next_audio_header, -1, 160)
        self.assertNotEqual(s, rtp.RtpStream(0, 8000))
        self.assertRaises(TypeError, hash, s)  # mutable, compared by value: unhashable, as the dataclass was

    def test_sender_report(self):
        s = rtp.RtpStream(payload_type=0, clock_rate=8000, ssrc=7, sequence=0, timestamp=0)
        s.next_packet(b"x" * 160, 160)
        sr = s.sender_report(1000.0)
        self.assertEqual((sr.ssrc, sr.rtp_timestamp, sr.packet_count, sr.octet_count), (7, 160, 1, 160))


class ReceiveStatsTests(unittest.TestCase):
    def feed(self, stats, seqs, jitter=0.0):
        for i, seq in enumerate(seqs):
            stats.update(seq & 0xFFFF, seq * 160, seq * 0.02 + (jitter if i % 2 else 0))

    def test_loss_and_fraction_across_wrap(self):
        stats = rtp.ReceiveStats(ssrc=1, clock_rate=8000)
        seqs = [s for s in range(65530, 65530 + 100) if s not in (65535, 65536, 65540)]
        self.feed(stats, seqs)
        self.assertEqual(stats.expected, 100)
        self.assertEqual(stats.lost, 3)
        block = stats.report_block(now=0)
        self.assertEqual(block.highest_sequence, 65536 + (65629 & 0xFFFF))
        self.assertEqual(block.cumulative_lost, 3)
        self.assertEqual(block.fraction_lost, (3 << 8) // 100)
        # the next interval has no loss
        self.feed(stats, range(65630, 65640))
        self.assertEqual(stats.report_block(now=0).fraction_lost, 0)

    def test_duplicates_and_reordering(self):
        stats = rtp.ReceiveStats(ssrc=1, clock_rate=8000)
        self.feed(stats, [10, 12, 11, 12, 13])
        self.assertEqual(stats.expected, 4)
        self.assertEqual(stats.lost, -1)  # a duplicate, as RFC 3550 counts it
        self.assertEqual(stats.max_seq, 13)

    def test_jitter_estimate(self):
        steady = rtp.ReceiveStats(ssrc=1, clock_rate=8000)
        self.feed(steady, range(200))
        self.assertAlmostEqual(steady.jitter, 0, delta=1e-6)
        noisy = rtp.ReceiveStats(ssrc=1, clock_rate=8000)
        self.feed(noisy, range(200), jitter=0.010)  # every other packet 10 ms late
        self.assertAlmostEqual(noisy.jitter_seconds, 0.010, delta=0.001)

    def test_restart_after_big_jump_needs_two_packets(self):
        stats = rtp.ReceiveStats(ssrc=1, clock_rate=8000)
        self.feed(stats, range(100, 110))
        self.assertFalse(stats.update(30000, 0, 1.0))
        self.assertTrue(stats.update(30001, 160, 1.02))
        self.assertEqual((stats.base_seq, stats.expected, stats.received), (30001, 1, 1))

    def test_sequence_numbers_are_checked(self):
        stats = rtp.ReceiveStats(ssrc=1, clock_rate=8000)
        self.assertRaises(ValueError, stats.update, 65536, 0, 0.0)
        self.assertRaises(ValueError, rtp.ReceiveStats, 1, 0)
        self.assertIsNone(stats.max_seq)
        self.assertEqual((stats.expected, stats.lost), (0, 0))

    def test_dlsr(self):
        stats = rtp.ReceiveStats(ssrc=1, clock_rate=8000)
        stats.sender_report_received(rtp.SenderReport(1, rtp.ntp_timestamp(100.0), 0, 0, 0), arrival=10.0)
        block = stats.report_block(now=10.5)
        self.assertEqual(block.delay_since_last_sr, 32768)
        self.assertEqual(block.last_sr, rtp.ntp_middle(rtp.ntp_timestamp(100.0)))


def free_range(pairs):
    """An even port range nobody listens on right now (found by binding and releasing)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    base = s.getsockname()[1]
    s.close()
    base = min(base, 60000) & ~1
    return base, base + 2 * pairs - 1


class PortPoolTests(unittest.TestCase):
    def setUp(self):
        self.pairs = []
        self.blockers = []

    def tearDown(self):
        for b in self.blockers:
            b.close()
        return defer.gatherResults([p.close() for p in self.pairs])

    def allocate(self, pool, rtcp=True):
        pair = pool.allocate(rtcp=rtcp)
        self.pairs.append(pair)
        return pair

    def test_even_ports_with_rtcp_on_plus_one(self):
        start, end = free_range(4)
        pool = rtp.PortPool(reactor, start + 1, end, "127.0.0.1")  # an odd start rounds up
        pair = self.allocate(pool)
        self.assertEqual(pair.rtp_port % 2, 0)
        self.assertEqual(pair.rtp.getsockname(), ("127.0.0.1", pair.rtp_port))
        self.assertEqual(pair.rtcp.getsockname(), ("127.0.0.1", pair.rtp_port + 1))
        self.assertFalse(pair.rtp.getblocking())  # read by the media tick, never blocking it

    def test_datagrams_reach_the_sockets(self):
        start, end = free_range(2)
        pool = rtp.PortPool(reactor, start, end, "127.0.0.1")
        pair = self.allocate(pool)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.blockers.append(s)
        s.sendto(b"rtp", ("127.0.0.1", pair.rtp_port))
        s.sendto(b"rtcp", ("127.0.0.1", pair.rtcp_port))
        pair.rtp.settimeout(2)
        pair.rtcp.settimeout(2)
        self.assertEqual((pair.rtp.recv(100), pair.rtcp.recv(100)), (b"rtp", b"rtcp"))

    def test_close_releases_at_once_and_is_idempotent(self):
        start, end = free_range(1)
        pool = rtp.PortPool(reactor, start, end, "127.0.0.1")
        pair = pool.allocate()
        rtp_sock = pair.rtp
        d = pair.close()
        self.assertEqual(self.successResultOf(d), None)
        self.assertEqual(rtp_sock.fileno(), -1)
        self.assertEqual(pool.in_use, 0)
        pair.close()
        self.assertEqual(pool.in_use, 0)
        again = self.allocate(pool)  # the port is free for us and for other processes
        self.assertEqual(again.rtp_port, start)

    def test_busy_ports_are_skipped(self):
        start, end = free_range(3)
        for port in (start, start + 3):  # the first pair's RTP, the second pair's RTCP
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", port))
            self.blockers.append(s)
        pool = rtp.PortPool(reactor, start, end, "127.0.0.1")
        self.assertEqual(self.allocate(pool).rtp_port, start + 4)

    def test_exhaustion_is_a_clear_error_and_release_frees(self):
        start, end = free_range(2)
        pool = rtp.PortPool(reactor, start, end, "127.0.0.1")
        first = self.allocate(pool)
        self.allocate(pool, rtcp=False)  # muxed: the +1 port stays reserved with the pair
        self.assertEqual(pool.in_use, 2)
        with self.assertRaises(rtp.PortsExhausted) as caught:
            pool.allocate()
        self.assertIn(f"{start}..{end}", str(caught.exception))
        d = first.close()
        self.assertEqual(pool.in_use, 1)

        def again(_):
            self.assertEqual(self.allocate(pool).rtp_port, first.rtp_port)
        return d.addCallback(again)

    def test_round_robin_does_not_reuse_at_once(self):
        start, end = free_range(3)
        pool = rtp.PortPool(reactor, start, end, "127.0.0.1")
        a = self.allocate(pool)
        d = a.close()

        def next_one(_):
            self.assertEqual(self.allocate(pool).rtp_port, start + 2)
        return d.addCallback(next_one)

    def test_empty_range_is_refused(self):
        self.assertRaises(ValueError, rtp.PortPool, reactor, 5001, 5001)
