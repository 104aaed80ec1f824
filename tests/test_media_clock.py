"""The shared media clock under task.Clock: absolute deadlines, owed frames, no drift."""

from twisted.internet import task
from twisted.trial import unittest

from activecall.media.clock import MediaClock


class MediaClockTests(unittest.TestCase):
    def setUp(self):
        self.reactor = task.Clock()
        self.clock = MediaClock(self.reactor)
        self.calls = []

    def sub(self):
        self.calls.append(self.reactor.seconds())

    def test_ticks_every_20ms_and_stops_without_subscribers(self):
        self.clock.add(self.sub)
        for _ in range(5):
            self.reactor.advance(0.02)
        self.assertEqual(len(self.calls), 5)
        self.clock.remove(self.sub)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.reactor.advance(1)
        self.assertEqual(len(self.calls), 5)

    def test_late_wakeup_delivers_the_owed_frames(self):
        self.clock.add(self.sub)
        self.reactor.advance(0.02)
        self.reactor.advance(0.065)  # late: 3 frames owed at 0.08
        self.assertEqual(len(self.calls), 4)
        self.assertEqual(self.clock.late_ticks, 1)
        # the next deadline is still on the grid (0.10), not 20 ms after the late wake-up
        self.assertAlmostEqual(self.reactor.getDelayedCalls()[0].getTime(), 0.10)

    def test_no_drift_over_ten_thousand_ticks(self):
        self.clock.add(self.sub)
        for _ in range(10000):
            # the reactor wakes up a little late every time
            self.reactor.advance(0.0203)
            call = self.reactor.getDelayedCalls()[0]
            self.reactor.advance(max(0, call.getTime() - self.reactor.seconds()))
        expected = int(self.reactor.seconds() / 0.02 + 1e-9)
        self.assertEqual(self.clock.ticks, expected)
        self.assertEqual(len(self.calls), expected)

    def test_stall_reanchors_instead_of_bursting(self):
        self.clock.add(self.sub)
        self.reactor.advance(5.0)
        self.assertEqual(len(self.calls), 1)
        self.assertEqual(self.clock.reanchors, 1)
        self.reactor.advance(0.0201)
        self.assertEqual(len(self.calls), 2)

    def test_many_subscribers_share_one_timer(self):
        subs = [lambda i=i: self.calls.append(i) for i in range(100)]
        for s in subs:
            self.clock.add(s)
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        self.reactor.advance(0.02)
        self.assertEqual(sorted(self.calls), list(range(100)))

    def test_failing_subscriber_is_removed(self):
        def bad():
            raise RuntimeError("boom")

        self.clock.add(bad)
        self.clock.add(self.sub)
        self.reactor.advance(0.02)
        self.assertEqual(len(self.clock), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.reactor.advance(0.02)
        self.assertEqual(len(self.calls), 2)

    def test_subscribers_added_and_removed_inside_a_tick_share_the_one_timer(self):
        order = []

        def late_joiner():
            order.append("b")

        def starter():
            order.append("a")
            if order == ["a"]:
                self.clock.add(late_joiner)  # a leg started from inside a tick

        self.clock.add(starter)
        self.reactor.advance(0.02)
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        self.reactor.advance(0.02)
        self.assertEqual(order, ["a", "a", "b"])

        def leaver():
            self.clock.remove(starter)
            self.clock.remove(late_joiner)
            self.clock.remove(leaver)

        self.clock.add(leaver)
        self.reactor.advance(0.02)
        self.assertEqual(len(self.clock), 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        # it starts again cleanly afterwards
        self.clock.add(self.sub)
        self.reactor.advance(0.02)
        self.assertEqual(len(self.calls), 1)
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
