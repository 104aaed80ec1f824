"""A precise wake-up for the media clock: a Linux timerfd armed with absolute deadlines.

Why: the asyncio event loop sleeps in ``epoll_wait`` with a timeout in whole
milliseconds, rounded up, and Twisted's reactor on top of it keeps its own
timers in ``time.time()`` while asyncio's are ``time.monotonic()``; a wake-up a
hair before a Twisted timer is due therefore sleeps another whole millisecond.
That lateness went straight into every packet's send time (measured in
docs/media.md, "clock.py").  A timerfd becomes readable at its deadline (nanosecond resolution,
the kernel's timer slack of ~50 µs), so the poll that waits on it returns then,
whatever its own timeout says.

Python gains ``os.timerfd_create`` only in 3.13; this is the same three system
calls through ctypes.  ``PreciseTimer.available()`` is False elsewhere than
Linux, and on a reactor that cannot watch descriptors (``task.Clock`` in tests),
and the media clock then uses ``callLater``.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

from twisted.internet.interfaces import IReactorFDSet
from twisted.logger import Logger

log = Logger(namespace="activecall.media.clock")

_CLOCK_MONOTONIC = 1
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC
_TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        create, settime = libc.timerfd_create, libc.timerfd_settime
    except (OSError, AttributeError):  # pragma: no cover - a Linux without timerfd in its C library
        return None
    create.argtypes, create.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settime.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec), ctypes.c_void_p)
    settime.restype = ctypes.c_int
    return create, settime


_CALLS = _libc()


def _check(result: int) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return result


class PreciseTimer:
    """Calls ``callback`` once at an armed deadline (reactor seconds), woken by a timerfd.

    One timer at a time, like ``callLater``: ``arm`` replaces the pending
    deadline; ``cancel`` disarms it and stops watching the descriptor, so an
    idle clock costs the reactor nothing.  An ``IReadDescriptor``."""

    @staticmethod
    def available(reactor) -> bool:
        return _CALLS is not None and IReactorFDSet.providedBy(reactor)

    def __init__(self, reactor, callback):
        self.reactor = reactor
        self.callback = callback
        self._fd = _check(_CALLS[0](_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC))
        self._spec = _Itimerspec()
        self._armed = False
        self._watching = False

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "MediaClock"

    def active(self) -> bool:
        return self._armed

    def arm(self, deadline: float) -> None:
        """Fire at ``deadline`` in the reactor's seconds (now, if it has passed)."""
        target = time.monotonic() + (deadline - self.reactor.seconds())
        seconds = int(target)
        nanoseconds = max(1, int((target - seconds) * 1e9))  # zero would disarm the timer
        value = self._spec.it_value
        value.tv_sec, value.tv_nsec = seconds, min(nanoseconds, 999_999_999)
        _check(_CALLS[1](self._fd, _TFD_TIMER_ABSTIME, ctypes.byref(self._spec), None))
        self._armed = True
        if not self._watching:
            self._watching = True
            self.reactor.addReader(self)

    def cancel(self) -> None:
        self._armed = False
        value = self._spec.it_value
        value.tv_sec = value.tv_nsec = 0
        if self._fd >= 0:
            _check(_CALLS[1](self._fd, 0, ctypes.byref(self._spec), None))
        if self._watching:
            self._watching = False
            self.reactor.removeReader(self)

    def close(self) -> None:
        self.cancel()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def doRead(self):
        try:
            os.read(self._fd, 8)  # the expiration count; reading it re-arms readiness
        except BlockingIOError:
            return None  # woken for nothing (re-armed after it became readable)
        if self._armed:
            self._armed = False
            self.callback()
        return None

    def connectionLost(self, reason) -> None:
        self._watching = False
