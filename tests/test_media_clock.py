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


class PreciseWakeUpTests(unittest.TestCase):
    """On the real reactor (Linux) the clock wakes through a timerfd armed with absolute deadlines;
    how precisely is measured by bench/bench_rtp_legs.py, not asserted here."""

    def setUp(self):
        from twisted.internet import reactor

        from activecall.media.timerfd import PreciseTimer
        if not PreciseTimer.available(reactor):
            raise unittest.SkipTest("no timerfd on this platform")
        self.reactor = reactor

    def test_ticks_on_the_grid_through_the_timerfd_and_leaves_nothing_behind(self):
        from twisted.internet import defer

        clock = MediaClock(self.reactor)
        self.addCleanup(clock.close)
        seen, done = [], defer.Deferred()

        def sub():
            seen.append(self.reactor.seconds())
            if len(seen) == 10:
                clock.remove(sub)
                done.callback(None)
        clock.add(sub)
        self.assertIsNotNone(clock._timer)
        self.assertIn(clock._timer, self.reactor.getReaders())
        self.assertEqual(self.reactor.getDelayedCalls(), [])  # no reactor timer for the media clock

        def check(_):
            self.assertEqual(clock.ticks, 10)
            deadlines = [clock._start + (k + 1) * clock.interval for k in range(10)]
            self.assertTrue(all(t >= d - 0.001 for t, d in zip(seen, deadlines)))  # on the grid, never early
            self.assertNotIn(clock._timer, self.reactor.getReaders())  # idle: nothing watched
            self.assertFalse(clock._timer.active())
        return done.addCallback(check)

    def test_a_clock_without_subscribers_can_start_again_and_close(self):
        from twisted.internet import defer

        from tests.helpers import MIN_WAIT

        clock = MediaClock(self.reactor)
        ticks = []
        first = defer.Deferred()

        def sub():
            ticks.append(1)
            if not first.called:
                first.callback(None)
        clock.add(sub)
        d = first.addTimeout(MIN_WAIT, self.reactor)  # the first tick, however long the reactor takes

        def stop(_):
            self.assertGreater(len(ticks), 0)
            fd = clock._timer.fileno()
            clock.close()
            self.assertIsNone(clock._timer)
            self.assertEqual(len(clock), 0)
            import os
            self.assertRaises(OSError, os.fstat, fd)  # the descriptor is closed
        return d.addCallback(stop)

    def test_task_clock_and_precise_false_use_reactor_timers(self):
        self.assertFalse(MediaClock(task.Clock())._precise)
        self.assertFalse(MediaClock(self.reactor, precise=False)._precise)
