"""The one shared media clock: every 20 ms, every active leg sends its due frame.

Ticks are scheduled against absolute deadlines (``start + n * 20 ms``) from
one ``IReactorTime``, never chained relative sleeps, so timing errors do not
accumulate.  A late wake-up calls each subscriber once per frame it owes
(bounded by ``max_catch_up``, beyond which the clock re-anchors rather than
bursting seconds of audio).  There is one clock per daemon, never one
``LoopingCall`` per call.

On a real reactor under Linux the clock wakes through a timerfd armed with the
absolute deadline (``timerfd.PreciseTimer``): the asyncio loop's own timers wait
in whole milliseconds, rounded up, which put 0-2 ms of jitter on every frame
sent.  Elsewhere, and on ``task.Clock`` in tests, it uses ``callLater``.
"""

from __future__ import annotations

from typing import Callable

from twisted.logger import Logger

from activecall.media.timerfd import PreciseTimer

log = Logger(namespace="activecall.media.clock")

FRAME_SECONDS = 0.020


class MediaClock:
    """Calls every subscriber once per 20 ms frame while it has subscribers."""

    def __init__(self, reactor, interval: float = FRAME_SECONDS, max_catch_up: int = 10,
                 precise: bool = True):
        self.reactor = reactor
        self.interval = interval
        self.max_catch_up = max_catch_up
        self._subscribers: list[Callable[[], None]] = []
        self._call = None
        self._start = 0.0
        self._ticking = False  # inside _tick: _call is None but a reschedule follows
        self.ticks = 0  # frames delivered since the clock (re)started
        self.late_ticks = 0  # wake-ups that owed more than one frame
        self.reanchors = 0
        self._timer = None  # the timerfd wake-up, made on first use when ``precise`` and available
        self._precise = precise and PreciseTimer.available(reactor)

    def add(self, subscriber: Callable[[], None]) -> None:
        self._subscribers.append(subscriber)
        if self._call is None and not self._ticking:
            self._start = self.reactor.seconds()
            self.ticks = 0
            self._schedule()

    def remove(self, subscriber: Callable[[], None]) -> None:
        try:
            self._subscribers.remove(subscriber)
        except ValueError:
            return
        if not self._subscribers:
            self._stop_timer()

    def _stop_timer(self) -> None:
        """No subscriber is left: nothing stays scheduled or watched (an idle daemon runs no timer)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._timer is not None:
            self._timer.cancel()

    def __len__(self) -> int:
        """Legs on the clock: a subscriber that carries several (``RtpTicker``) counts each."""
        return sum(len(s) if hasattr(s, "__len__") else 1 for s in self._subscribers)

    def next_deadline(self) -> float:
        """When the frame after the one being delivered is due, in reactor seconds: a subscriber
        with deferrable work (``RtpTicker``'s receive side) stops before it, so the next
        frame goes out on time."""
        return self._start + (self.ticks + 1) * self.interval

    def _schedule(self) -> None:
        if self._precise and self._timer is None:
            try:
                self._timer = PreciseTimer(self.reactor, self._tick)
            except OSError as e:  # out of descriptors, or a kernel without timerfd
                log.warn("media clock falls back to reactor timers: {e}", e=e)
                self._precise = False
        if self._precise:
            self._timer.arm(self.next_deadline())
            self._call = self._timer
        else:
            self._call = self.reactor.callLater(max(0.0, self.next_deadline() - self.reactor.seconds()), self._tick)

    def close(self) -> None:
        """Stop ticking and release the timerfd (daemon shutdown)."""
        self._subscribers.clear()
        self._stop_timer()
        if self._timer is not None:
            self._timer.close()
            self._timer = None

    def _tick(self) -> None:
        self._call = None
        now = self.reactor.seconds()
        owed = int((now - self._start) / self.interval + 1e-9) - self.ticks
        if owed > self.max_catch_up:
            # far behind (a stalled reactor): re-anchor instead of bursting audio
            self.reanchors += 1
            self._start = now - self.interval * (self.ticks + 1)
            owed = 1
        if owed > 1:
            self.late_ticks += 1
        self._ticking = True
        try:
            for _ in range(max(owed, 1)):
                self.ticks += 1
                for subscriber in list(self._subscribers):
                    try:
                        subscriber()
                    except Exception:
                        log.failure("a media clock subscriber failed; removed")
                        self.remove(subscriber)
        finally:
            self._ticking = False
        if self._subscribers and self._call is None:
            self._schedule()
        elif not self._subscribers:
            self._stop_timer()
