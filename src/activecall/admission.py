"""Whether this node takes a new call now: drain, ``max_calls`` and the event-loop-lag guard.

One ``Admission`` per daemon answers, before anything of a call exists, whether a new call (a SIP
INVITE, a WebSocket ``/call*`` upgrade, ``POST /api/calls``) may start, and whether the node should
look ready to a load balancer (out-of-dialog OPTIONS, ``GET /ready``).  A refusal says why and when to
come back (``Retry-After``); refusing early is what keeps a refused call from being half set up.

The lag guard measures the event loop itself: a timer due every ``interval`` seconds on the daemon's
clock notes how late it fired.  A reactor too busy to keep its timers is too busy to take a call (the
media clock of the calls it has would slip next).  Each sample counts for at most twice the limit and
the samples are smoothed, so one late wake-up, however long (a collection, a model loaded once, the
process stopped for a while), never trips the guard on its own; a loop that keeps running late does (two
samples in a row at twice the limit, more at less), and it clears at half the limit.
Base layer: imports nothing from activecall, so the SIP stack and the web layer can both use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger(namespace="activecall.admission")

#: ``Retry-After`` of an overloaded or full node (seconds): the caller's proxy tries another node now and
#: this one again soon
OVERLOAD_RETRY_AFTER = 5
#: the lag sampler's period (seconds) and the weight of the newest sample in the smoothed lag
LAG_INTERVAL = 0.1
LAG_SMOOTHING = 0.3

SERVING, DRAINING = "serving", "draining"


@dataclass(frozen=True)
class Refusal:
    """Why a new call is not taken: ``reason`` is ``draining``, ``max_calls`` or ``overload``."""

    reason: str
    retry_after: int
    #: the SIP reason phrase and the HTTP error text
    text: str


class LagMonitor:
    """How late the event loop runs: a timer every ``interval`` seconds on ``clock`` notes its lateness.

    ``last`` is the latest sample, ``lag`` the exponentially smoothed one (newest sample weighted
    ``smoothing``, and counted for at most ``cap`` seconds when a cap is given), both in seconds.
    ``on_sample(lag)`` is called after each sample."""

    def __init__(self, clock: IReactorTime, interval: float = LAG_INTERVAL, smoothing: float = LAG_SMOOTHING,
                 on_sample: Callable[[float], None] = lambda lag: None, cap: Optional[float] = None):
        self.clock = clock
        self.interval = interval
        self.smoothing = smoothing
        self.cap = cap
        self.on_sample = on_sample
        self.last = 0.0
        self.lag = 0.0
        self._due: Optional[float] = None
        self._call = None

    @property
    def running(self) -> bool:
        return self._call is not None

    def start(self) -> None:
        if self._call is None:
            self._schedule()

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _schedule(self) -> None:
        self._due = self.clock.seconds() + self.interval
        self._call = self.clock.callLater(self.interval, self._sample)

    def _sample(self) -> None:
        self.last = max(0.0, self.clock.seconds() - self._due)
        counted = self.last if self.cap is None else min(self.last, self.cap)
        self.lag += self.smoothing * (counted - self.lag)
        self._schedule()
        self.on_sample(self.lag)


class Admission:
    """The node's state (serving or draining) and the admission of new calls.

    ``load()`` is how many calls the node holds now (live sessions and inbound calls still pending);
    ``max_calls`` 0 means no cap; ``max_lag`` 0 switches the lag guard off.  ``refused(request, reason)``
    is called for every refusal (the daemon counts them in its metrics); ``check`` is cheap: it runs for
    every INVITE and OPTIONS."""

    def __init__(self, clock: IReactorTime, max_calls: int = 0, max_lag: float = 0.0,
                 load: Callable[[], int] = lambda: 0, drain_retry_after: float = 10.0,
                 refused: Callable[[str, str], None] = lambda request, reason: None,
                 lag_interval: float = LAG_INTERVAL):
        self.clock = clock
        self.max_calls = max_calls
        self.max_lag = max_lag
        self.load = load
        self.drain_retry_after = max(1, math.ceil(drain_retry_after))
        self.refused = refused
        self.state = SERVING
        self.overloaded = False
        self.lag_monitor = LagMonitor(clock, interval=lag_interval, on_sample=self._lag_sampled,
                                      cap=2 * max_lag if max_lag > 0 else None)

    # -- state ---------------------------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self.state == DRAINING

    def drain(self) -> None:
        self.state = DRAINING

    def start(self) -> None:
        """Start the lag guard (once the reactor runs: start-up's own work is not lag)."""
        if self.max_lag > 0:
            self.lag_monitor.start()

    def stop(self) -> None:
        self.lag_monitor.stop()

    def _lag_sampled(self, lag: float) -> None:
        if not self.overloaded and lag > self.max_lag:
            self.overloaded = True
            log.warn("event loop {ms:.0f} ms late (max_event_loop_lag {limit:.0f} ms): refusing new calls",
                     ms=lag * 1000, limit=self.max_lag * 1000)
        elif self.overloaded and lag < self.max_lag / 2:
            self.overloaded = False
            log.info("event loop on time again ({ms:.0f} ms late): taking new calls", ms=lag * 1000)

    # -- decisions -----------------------------------------------------------------------------------

    def status(self) -> Optional[Refusal]:
        """Why the node would refuse a new call now, or None: draining first, then full, then overloaded."""
        if self.draining:
            return Refusal("draining", self.drain_retry_after, "Draining")
        if self.max_calls and self.load() >= self.max_calls:
            return Refusal("max_calls", OVERLOAD_RETRY_AFTER, "Too Many Calls")
        if self.overloaded:
            return Refusal("overload", OVERLOAD_RETRY_AFTER, "Overloaded")
        return None

    def check(self, request: str) -> Optional[Refusal]:
        """Admit a new ``request`` (``invite``, ``options``, ``websocket``, ``originate``, ``ready``):
        None, or the refusal, counted."""
        refusal = self.status()
        if refusal is not None:
            self.refused(request, refusal.reason)
        return refusal

    def snapshot(self) -> dict:
        """What /health and /ready show."""
        return {
            "state": self.state,
            "load": self.load(),
            "max_calls": self.max_calls,
            "event_loop_lag_ms": round(self.lag_monitor.lag * 1000, 1),
            "overloaded": self.overloaded,
        }
