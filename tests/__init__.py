"""activecall's Trial tests.

One workaround for Twisted itself lives here, because it must be in place before any test runs in a
``trial -j`` worker: after every test, a worker fires the reactor's "shutdown" event
(``TrialSuite._bail``), whose ``crash`` trigger calls ``loop.stop()`` on an asyncio loop that is *not*
running. asyncio remembers that request, so the next ``run_forever`` — the next test's first wait —
returns after one iteration, trial reports a ``KeyboardInterrupt`` in that test and the worker dies.
Stopping a loop that is not running has nothing to stop, so the patched ``crash`` skips it. The
reactor registered its bound ``crash`` as a trigger when trial installed it, so that entry is swapped too.
"""

import sys

from twisted.internet import asyncioreactor

_asyncio_crash = asyncioreactor.AsyncioSelectorReactor.crash


def _crash_running_loop_only(self):
    super(asyncioreactor.AsyncioSelectorReactor, self).crash()
    if self._asyncioEventloop.is_running():
        self._asyncioEventloop.stop()


asyncioreactor.AsyncioSelectorReactor.crash = _crash_running_loop_only

_reactor = sys.modules.get("twisted.internet.reactor")  # never install one just by importing tests
if isinstance(_reactor, asyncioreactor.AsyncioSelectorReactor):
    _shutdown = _reactor._eventTriggers.get("shutdown")
    if _shutdown is not None:
        _shutdown.during = [
            (_reactor.crash if getattr(c, "__func__", None) is _asyncio_crash else c, args, kwargs)
            for c, args, kwargs in _shutdown.during]
