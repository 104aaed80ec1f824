"""Logging through twisted.logger: a level filter, stdout and an optional file.

The observer built here is installed as the twistd application's
``ILogObserver`` component, so ``twistd`` uses it instead of its default
(``log_file`` replaces ``--logfile``).
"""

from __future__ import annotations

import math
import sys
from typing import IO, Optional

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
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


class _LevelPredicate(LogLevelFilterPredicate):
    """``LogLevelFilterPredicate`` that remembers each namespace's level: the stock one splits
    and re-joins the namespace for every event, including the debug events it then drops."""

    def __init__(self, defaultLogLevel=LogLevel.info):
        self._memo: dict = {}
        super().__init__(defaultLogLevel)

    def logLevelForNamespace(self, namespace):
        level = self._memo.get(namespace)
        if level is None:
            level = self._memo[namespace] = super().logLevelForNamespace(namespace)
        return level

    def setLogLevelForNamespace(self, namespace, level):
        self._memo.clear()
        super().setLogLevelForNamespace(namespace, level)

    def clearLogLevels(self):
        self._memo.clear()
        super().clearLogLevels()


class _SecondsFormatter:
    """twisted.logger's ``formatTime`` for the RFC 3339 prefix, computed once per second (it
    resolves the local zone and formats a datetime for every line)."""

    def __init__(self):
        self._second = None
        self._text = ""

    def __call__(self, when):
        if when is None:
            return formatTime(when)
        second = math.floor(when)
        if second != self._second:
            self._text = formatTime(second, timeFormatRFC3339)
            self._second = second
        return self._text


def text_file_observer(out: IO[str]) -> FileLogObserver:
    """``textFileLogObserver(out)`` with the cached time prefix: one write + flush per line."""
    format_time = _SecondsFormatter()
    return FileLogObserver(out, lambda event: formatEventAsClassicLogText(event, formatTime=format_time))


def open_log_file(path: str) -> IO[str]:
    """Open ``log_file`` for appending, line-buffered so a crash loses no line."""
    return open(path, "a", buffering=1, encoding="utf-8")


def make_observer(level: str, log_file: Optional[str] = None, stream: Optional[IO[str]] = None):
    """A level-filtered observer writing to ``stream`` (stdout) and ``log_file``."""
    outputs = [text_file_observer(stream or sys.stdout)]
    if log_file:
        outputs.append(text_file_observer(open_log_file(log_file)))
    predicate = _LevelPredicate(defaultLogLevel=LEVELS[level])
    return FilteringLogObserver(FanOut(outputs), [predicate])


__all__ = ["LEVELS", "make_observer", "formatEventAsClassicLogText"]
