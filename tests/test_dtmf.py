"""RFC 4733: active-call's receive rules (docs/media.md), dynamic PTs, and the sender's packet sequence."""

import struct

from twisted.trial import unittest

from activecall.media import dtmf


def payload(event, duration, end=False, volume=10):
    return bytes([event, (0x80 if end else 0) | volume]) + struct.pack("!H", duration)


class ReceiverTests(unittest.TestCase):
    def test_one_digit_per_press_with_retransmits_and_end_packets(self):
        r = dtmf.DtmfReceiver([101])
        press = [payload(5, 160), payload(5, 320), payload(5, 480), payload(5, 640, True), payload(5, 640, True),
                 payload(5, 640, True)]
        self.assertEqual([r.receive(101, p) for p in press], ["5", None, None, None, None, None])

    def test_lower_duration_is_a_new_press(self):
        r = dtmf.DtmfReceiver([101])
        self.assertEqual(r.receive(101, payload(1, 800, True)), "1")
        self.assertIsNone(r.receive(101, payload(1, 800, True)))  # duplicate: same duration
        self.assertEqual(r.receive(101, payload(1, 160)), "1")  # smaller: pressed again, E bit not needed

    def test_different_event_is_a_new_press(self):
        r = dtmf.DtmfReceiver([101])
        self.assertEqual([r.receive(101, payload(e, 400)) for e in (1, 2, 2, 11)], ["1", "2", None, "#"])

    def test_ignored_packets(self):
        r = dtmf.DtmfReceiver([101, 0])
        self.assertIsNone(r.receive(101, payload(16, 160)))  # event > 15
        self.assertIsNone(r.receive(101, b"\x05\x0a\x00"))  # shorter than 4 bytes
        self.assertIsNone(r.receive(0, payload(5, 160)))  # PT < 96, even if someone listed it
        self.assertFalse(r.handles(0))
        self.assertIsNone(r.receive(102, payload(5, 160)))  # not a negotiated telephone-event PT
        self.assertEqual(r.receive(101, payload(5, 160)), "5")

    def test_any_negotiated_dynamic_pt(self):
        # the original only handled 101; we take what the SDP said
        r = dtmf.DtmfReceiver([96, 126])
        self.assertTrue(r.handles(96))
        self.assertEqual(r.receive(96, payload(10, 160)), "*")
        self.assertEqual(r.receive(126, payload(12, 160)), "A")
        self.assertEqual(r.receive(126, payload(15, 160)), "D")

    def test_new_timestamp_is_a_new_press(self):
        r = dtmf.DtmfReceiver([101])
        self.assertEqual(r.receive(101, payload(7, 320), timestamp=1000), "7")
        self.assertIsNone(r.receive(101, payload(7, 640, True), timestamp=1000))
        # next press of the same key; its first packets were lost so the duration did not go down
        self.assertEqual(r.receive(101, payload(7, 800), timestamp=5000), "7")

    def test_parse_flags(self):
        ev = dtmf.parse_payload(bytes([11, 0x80 | 0x3F, 0x01, 0x00]))
        self.assertEqual((ev.digit, ev.end, ev.volume, ev.duration), ("#", True, 63, 256))


class SenderTests(unittest.TestCase):
    def test_packet_sequence_for_one_digit(self):
        packets = dtmf.event_packets("9", duration_ms=100)
        events = [dtmf.parse_payload(p.payload) for p in packets]
        self.assertEqual([p.frame for p in packets], list(range(7)))
        self.assertEqual([p.marker for p in packets], [True] + [False] * 6)
        self.assertEqual([e.duration for e in events], [160, 320, 480, 640, 800, 800, 800])
        self.assertEqual([e.end for e in events], [False] * 4 + [True] * 3)
        self.assertEqual({e.event for e in events}, {9})

    def test_wideband_clock_and_very_short_press(self):
        packets = dtmf.event_packets("#", duration_ms=10, clock_rate=48000)
        self.assertEqual(len(packets), 3)
        self.assertTrue(packets[0].marker and packets[0].end)
        self.assertEqual(dtmf.parse_payload(packets[0].payload).duration, 960)

    def test_bad_digit(self):
        self.assertRaises(dtmf.DtmfError, dtmf.event_packets, "x")
        s = dtmf.DtmfSender()
        self.assertRaises(dtmf.DtmfError, s.send, "12x")
        self.assertFalse(s.busy)  # nothing was queued

    def test_sender_ticks_through_digits_with_a_gap(self):
        s = dtmf.DtmfSender(duration_ms=40, gap_ms=40)
        s.send("1a")
        out, ts = [], 0
        while s.busy and len(out) < 50:
            out.append(s.tick(ts))
            ts += 160
        # "1": 1 update + 3 ends at ts 0; 2 silent frames; "A": same at ts 960
        kinds = [None if f is None else (dtmf.parse_payload(f.payload).digit, f.timestamp, f.marker) for f in out]
        self.assertEqual(kinds, [("1", 0, True), ("1", 0, False), ("1", 0, False), ("1", 0, False), None, None,
                                 ("A", 960, True), ("A", 960, False), ("A", 960, False), ("A", 960, False),
                                 None, None])
        self.assertIsNone(s.tick(ts))

    def test_sent_packets_decode_as_one_press_each(self):
        s, r = dtmf.DtmfSender(duration_ms=60, gap_ms=20), dtmf.DtmfReceiver([101])
        s.send("1155")
        digits, ts = [], 0
        while s.busy:
            frame = s.tick(ts)
            if frame is not None:
                digit = r.receive(101, frame.payload, frame.timestamp)
                if digit:
                    digits.append(digit)
            ts += 160
        self.assertEqual("".join(digits), "1155")

    def test_clear_keeps_the_event_in_flight(self):
        s = dtmf.DtmfSender(duration_ms=40)
        s.send("12")
        s.tick(0)
        s.clear()
        rest = [s.tick(0) for _ in range(10)]
        sent = [dtmf.parse_payload(f.payload) for f in rest if f is not None]
        self.assertEqual({e.digit for e in sent}, {"1"})
        self.assertTrue(sent[-1].end)
