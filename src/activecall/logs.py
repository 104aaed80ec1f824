"""Logging through twisted.logger: a level filter, stdout and an optional file.

The observer built here is installed as the twistd application's
``ILogObserver`` component, so ``twistd`` uses it instead of its default
(``log_file`` replaces ``--logfile``).
"""

from __future__ import annotations

import sys
from typing import IO, Optional

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEventAsClassicLogText,
    textFileLogObserver,
)
from zope.interface import implementer

#: config names -> twisted levels (twisted has no "trace": it maps to debug)
LEVELS = {
    "trace": LogLevel.debug,
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "warning": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}


@implementer(ILogObserver)
class FanOut:
    """Send each event to several observers; one failing never stops the rest."""

    def __init__(self, observers):
        self.observers = list(observers)

    def __call__(self, event):
        for obs in self.observers:
            try:
                obs(event)
            except Exception:
                pass


def open_log_file(path: str) -> IO[str]:
    """Open ``log_file`` for appending, line-buffered so a crash loses no line."""
    return open(path, "a", buffering=1, encoding="utf-8")


def make_observer(level: str, log_file: Optional[str] = None, stream: Optional[IO[str]] = None):
    """A level-filtered observer writing to ``stream`` (stdout) and ``log_file``."""
    outputs = [textFileLogObserver(stream or sys.stdout)]
    if log_file:
        outputs.append(textFileLogObserver(open_log_file(log_file)))
    predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])
    return FilteringLogObserver(FanOut(outputs), [predicate])


__all__ = ["LEVELS", "make_observer", "formatEventAsClassicLogText"]
