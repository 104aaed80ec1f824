"""Logging through twisted.logger: a level filter, stdout and an optional file.

The observer built here is installed as the twistd application's
``ILogObserver`` component, so ``twistd`` uses it instead of its default
(``log_file`` replaces ``--logfile``).

``SummaryLog`` is for what anyone on the network can cause (malformed SIP, garbage
datagrams): a bounded number of lines per interval, however much arrives.
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
    return FileLogObserver(out, lambda event: _encodable(formatEventAsClassicLogText(event, formatTime=format_time)))


def _encodable(text: Optional[str]) -> Optional[str]:
    """``text`` with lone surrogates (a peer's non-UTF-8 bytes, kept by the SIP parser's
    surrogateescape) as ``\\udcff`` escapes: a UTF-8 log file or stdout refuses them."""
    if text is None:
        return None
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


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


def shown(text, limit: int = 80) -> str:
    """A peer's text in a log line: printable ASCII (the rest escaped), at most ``limit`` characters,
    so hostile input can neither forge log lines nor make them long."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("latin-1")
    text = str(text)[: limit * 4].encode("ascii", "backslashreplace").decode("ascii")
    text = "".join(ch if 32 <= ord(ch) < 127 else f"\\x{ord(ch):02x}" for ch in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Tally:
    __slots__ = ("count", "sources", "more_sources", "example")

    def __init__(self):
        self.count = 0
        self.sources: set = set()
        self.more_sources = False
        self.example: Optional[tuple[str, str]] = None


class SummaryLog:
    """Rate-limited logging of events from untrusted peers, by reason: the first event of a
    reason is logged at once, the rest of that interval are counted and logged as one summary
    line at its end ("dropped 9999 malformed SIP messages (unparseable) from 3 sources in the
    last 60 s; e.g. from 192.0.2.1:5060: ..."), so a flood costs at most one line per reason
    per ``interval`` (plus the first).  A reason quiet for a whole interval is forgotten: its
    next event is logged at once again.

    ``clock`` is an ``IReactorTime`` (tests pass a ``task.Clock``).  At most ``max_sources``
    distinct sources are remembered per reason and interval, and at most ``max_reasons``
    reasons (callers pass a small fixed set; extra ones are folded into ``"other"``), so
    memory stays bounded too.  ``stop()`` logs what is pending and cancels the timer.
    """

    def __init__(self, logger, clock, what: str = "messages", interval: float = 60.0,
                 level: LogLevel = LogLevel.info, max_sources: int = 1000, max_reasons: int = 32):
        self.log = logger
        self.clock = clock
        self.what = what
        self.interval = interval
        self.level = level
        self.max_sources = max_sources
        self.max_reasons = max_reasons
        self._tallies: dict[str, _Tally] = {}
        self._call = None
        self.lines = 0  # lines logged (for tests and curiosity)

    def __call__(self, reason: str, source="", detail="") -> None:
        """One event: ``source`` (an address) and ``detail`` (the peer's text) are shown sanitised."""
        if reason not in self._tallies and len(self._tallies) >= self.max_reasons:
            reason = "other"
        source = _source_text(source)
        tally = self._tallies.get(reason)
        if tally is None:
            self._tallies[reason] = _Tally()
            self._emit("dropped {what} ({reason}) from {source}: {detail}; more of them are summarised "
                       "every {interval:g} s", what=self.what, reason=reason, source=source,
                       detail=shown(detail), interval=self.interval)
            self._schedule()
            return
        tally.count += 1
        if source not in tally.sources:
            if len(tally.sources) < self.max_sources:
                tally.sources.add(source)
            else:
                tally.more_sources = True
        if tally.example is None:
            tally.example = (source, shown(detail))

    def _schedule(self) -> None:
        if self._call is None:
            self._call = self.clock.callLater(self.interval, self._interval_ended)

    def _interval_ended(self) -> None:
        self._call = None
        self.flush()
        if self._tallies:
            self._schedule()

    def flush(self) -> None:
        """Log a summary for every reason with events since the last one; forget the quiet ones."""
        tallies, self._tallies = self._tallies, {}
        for reason, tally in tallies.items():
            if not tally.count:
                continue  # quiet for a whole interval: its next event is logged at once
            self._tallies[reason] = _Tally()
            source, detail = tally.example
            self._emit("dropped {count} {what} ({reason}) from {sources}{more} sources in the last {interval:g} s; "
                       "e.g. from {source}: {detail}", count=tally.count, what=self.what, reason=reason,
                       sources=len(tally.sources), more="+" if tally.more_sources else "",
                       interval=self.interval, source=source, detail=detail)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self.flush()
        self._tallies = {}

    def _emit(self, fmt: str, **fields) -> None:
        self.lines += 1
        self.log.emit(self.level, fmt, **fields)


def _source_text(source) -> str:
    if isinstance(source, tuple) and len(source) >= 2:
        host, port = source[0], source[1]
        host = shown(host, 64)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return shown(source, 80)


__all__ = ["LEVELS", "SummaryLog", "make_observer", "formatEventAsClassicLogText", "shown"]
