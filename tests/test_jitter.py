"""The adaptive jitter buffer: reorder, wraparound, late drop, concealment, adaptation."""

import random
import sys

from twisted.trial import unittest

from activecall.media.jitter import JB_CAPACITY, JitterBuffer, seq_delta

FRAME = 0.02


def feed(jb, seqs, start_seq=0, start_ts=0, arrival=lambda i: i * FRAME):
    """Push packets for frame indices ``seqs`` (seq/ts derived from the index)."""
    for i in seqs:
        jb.push((start_seq + i) & 0xFFFF, (start_ts + 160 * i) & 0xFFFFFFFF, bytes([i & 0xFF]), arrival(i))


def drain(jb, n):
    return [jb.pop() for _ in range(n)]


class SeqDeltaTests(unittest.TestCase):
    def test_wraparound(self):
        self.assertEqual(seq_delta(1, 65535), 2)
        self.assertEqual(seq_delta(65535, 1), -2)
        self.assertEqual(seq_delta(100, 90), 10)
        self.assertEqual(seq_delta(0, 0x8000), -0x8000)


class JitterBufferTests(unittest.TestCase):
    def test_primes_to_target_then_plays_in_order(self):
        jb = JitterBuffer(initial_depth=2)
        jb.push(0, 0, b"a", 0.0)
        self.assertIsNone(jb.pop())
        jb.push(1, 160, b"b", 0.02)
        self.assertEqual([f.payload for f in drain(jb, 2)], [b"a", b"b"])
        self.assertEqual(jb.stats.played, 2)

    def test_reorders(self):
        jb = JitterBuffer(min_depth=3, max_depth=3)
        for seq in (2, 0, 1):
            jb.push(seq, seq * 160, bytes([seq]), 0.04)
        self.assertEqual([f.seq for f in drain(jb, 3)], [0, 1, 2])

    def test_sequence_wraparound(self):
        jb = JitterBuffer(initial_depth=2)
        frames = []
        for i in range(10):
            feed(jb, [i], start_seq=65532, start_ts=0xFFFFFF00)
            f = jb.pop()
            if f is not None:
                frames.append(f)
        self.assertEqual(frames[-1].timestamp, (0xFFFFFF00 + 160 * 8) & 0xFFFFFFFF)
        frames = frames[:8]
        self.assertEqual([f.seq for f in frames], [65532, 65533, 65534, 65535, 0, 1, 2, 3])
        self.assertFalse(any(f.concealed for f in frames))

    def test_reordered_across_wrap(self):
        jb = JitterBuffer(initial_depth=4)
        for seq in (65535, 1, 0, 65534):
            jb.push(seq, 0, b"", 0.0)
        self.assertEqual([f.seq for f in drain(jb, 4)], [65534, 65535, 0, 1])

    def test_gap_is_concealed_and_late_packet_dropped(self):
        jb = JitterBuffer(initial_depth=2)
        feed(jb, [0, 1, 3])
        out = drain(jb, 4)
        self.assertEqual([(f.seq, f.concealed) for f in out[:3]], [(0, False), (1, False), (2, True)])
        self.assertEqual(out[2].payload, b"")
        self.assertEqual(out[2].timestamp, 320)  # the missing frame's timestamp
        self.assertEqual((out[3].seq, out[3].concealed), (3, False))
        self.assertFalse(jb.push(2, 320, b"late", 0.1))
        self.assertEqual(jb.stats.late, 1)
        self.assertEqual(jb.stats.concealed, 1)

    def test_duplicates_dropped(self):
        jb = JitterBuffer()
        self.assertTrue(jb.push(5, 0, b"x", 0))
        self.assertFalse(jb.push(5, 0, b"x", 0))
        self.assertEqual(jb.stats.duplicates, 1)

    def test_underrun_conceals_then_rebuffers(self):
        jb = JitterBuffer(initial_depth=1, rebuffer_after=3)
        feed(jb, [0])
        self.assertFalse(jb.pop().concealed)
        self.assertTrue(jb.pop().concealed)
        self.assertTrue(jb.pop().concealed)
        self.assertIsNone(jb.pop())  # third empty pop: priming again
        self.assertFalse(jb.playing)
        feed(jb, [50])
        self.assertEqual(jb.pop().seq, 50)

    def test_target_grows_with_jitter_and_shrinks_back(self):
        jb = JitterBuffer(min_depth=1, max_depth=15, initial_depth=1)
        rng = random.Random(4)
        feed(jb, range(500), arrival=lambda i: i * FRAME + rng.uniform(0, 0.08))
        high = jb.target
        self.assertGreaterEqual(high, 4)
        self.assertLessEqual(high, 15)
        self.assertGreater(jb.jitter, 0.01)
        feed(jb, range(500, 1500), arrival=lambda i: i * FRAME)
        self.assertLessEqual(jb.target, 2)
        self.assertLess(jb.jitter, 0.001)

    def test_smooth_stream_needs_no_depth(self):
        jb = JitterBuffer(initial_depth=1)
        feed(jb, range(100))
        self.assertEqual(jb.target, 1)

    def test_burst_is_shed_down_to_target(self):
        jb = JitterBuffer(initial_depth=1, max_depth=15)
        feed(jb, range(10), arrival=lambda i: 0.0)  # ten frames at once
        first = jb.pop()
        self.assertEqual(jb.stats.shed, 1)  # one frame per pop, not the whole burst at once
        for _ in range(3):
            jb.pop()
        self.assertLessEqual(len(jb), jb.target + jb.shed_slack)
        self.assertGreater(jb.stats.shed, 1)
        self.assertFalse(first.concealed)
        # playback continues in order after the shed frames
        rest = [f.seq for f in drain(jb, len(jb))]
        self.assertEqual(rest, sorted(rest))

    def test_sequence_restart_resets(self):
        jb = JitterBuffer(initial_depth=1)
        feed(jb, range(3))
        drain(jb, 3)
        jb.push(30000, 999, b"new", 1.0)
        self.assertEqual(jb.stats.resets, 1)
        f = jb.pop()
        self.assertEqual((f.seq, f.payload), (30000, b"new"))

    def test_flush_discards_everything(self):
        jb = JitterBuffer(initial_depth=1)
        feed(jb, range(5))
        jb.pop()
        jb.flush()
        self.assertEqual(len(jb), 0)
        self.assertIsNone(jb.pop())
        feed(jb, [10])
        self.assertEqual(jb.pop().seq, 10)

    def test_random_reordering_delivers_every_packet_in_order(self):
        jb = JitterBuffer(initial_depth=6, min_depth=6, max_depth=6)
        rng = random.Random(1)
        order = list(range(1000))
        for k in range(0, 1000, 5):  # shuffle within windows of 5
            window = order[k:k + 5]
            rng.shuffle(window)
            order[k:k + 5] = window
        out = []
        for n, i in enumerate(order):
            jb.push(i & 0xFFFF, 160 * i, b"", n * FRAME)
            f = jb.pop()
            if f is not None:
                out.append(f)
        out += [f for f in drain(jb, len(jb)) if f is not None]
        self.assertEqual([f.seq for f in out], list(range(len(out))))
        self.assertFalse(any(f.concealed for f in out))
        self.assertEqual(jb.stats.late, 0)


class JitterBufferLimitsTests(unittest.TestCase):
    """What the C buffer adds to the behaviour above: a bounded size and checked arguments."""

    def test_a_burst_past_the_capacity_sheds_the_oldest(self):
        jb = JitterBuffer(initial_depth=2)
        feed(jb, range(JB_CAPACITY + 16), arrival=lambda i: 0.0)
        self.assertEqual((len(jb), jb.stats.shed), (JB_CAPACITY, 16))
        jb.push(3, 480, b"old", 0.0)  # older than everything held, in a full buffer: it is the one to go
        self.assertEqual((len(jb), jb.stats.shed), (JB_CAPACITY, 17))
        self.assertEqual(jb.pop().seq, 17)  # the oldest held was 16; a pop of a too-deep buffer sheds one more

    def test_a_full_buffer_that_plays_moves_its_play_out_point(self):
        jb = JitterBuffer(initial_depth=1)
        feed(jb, [0])
        self.assertEqual(jb.pop().seq, 0)
        feed(jb, range(1, JB_CAPACITY + 5), arrival=lambda i: 0.0)
        self.assertEqual(len(jb), JB_CAPACITY)
        self.assertEqual(jb.pop().seq, 6)  # 1..4 went to make room, 5 was shed by the pop: never a gap

    def test_frames_are_tuples_with_field_names(self):
        jb = JitterBuffer(initial_depth=1)
        jb.push(7, 1120, b"p", 0.0, payload_type=8, marker=True)
        frame = jb.pop()
        self.assertEqual(frame, (7, 1120, b"p", 8, False, True))
        self.assertEqual((frame.seq, frame.payload_type, frame.marker), (7, 8, True))
        gap = jb.pop()
        self.assertEqual((gap.seq, gap.timestamp, gap.payload, gap.payload_type, gap.concealed), (8, 1280, b"", -1, True))

    def test_bad_arguments_are_refused(self):
        self.assertRaises(ValueError, JitterBuffer, max_depth=JB_CAPACITY)
        self.assertRaises(ValueError, JitterBuffer, min_depth=0)
        self.assertRaises(ValueError, JitterBuffer, clock_rate=0)
        jb = JitterBuffer()
        self.assertRaises(ValueError, jb.push, 65536, 0, b"", 0.0)
        self.assertRaises(TypeError, jb.push, "1", 0, b"", 0.0)
        self.assertEqual(len(jb), 0)

    def test_payloads_are_released(self):
        """Every reference the buffer takes is given back: played, shed, flushed or reset."""
        payload = bytes(range(160))
        before = sys.getrefcount(payload)
        jb = JitterBuffer(initial_depth=3)
        for i in range(2000):
            jb.push(i & 0xFFFF, 160 * i, payload, i * FRAME if i % 7 else 0.0)
            if i % 3:
                jb.pop()
            if i % 500 == 499:
                jb.flush()
        feed(jb, range(5000, 5000 + JB_CAPACITY + 3), arrival=lambda i: 0.0)  # (a reset: a jump)
        for i in range(90):
            jb.push(i, 0, payload, 0.0)
        frames = [jb.pop() for _ in range(5)]
        del frames
        jb.reset()
        self.assertEqual(sys.getrefcount(payload), before)
        for i in range(10):
            jb.push(i, 0, payload, 0.0)
        del jb
        self.assertEqual(sys.getrefcount(payload), before)
