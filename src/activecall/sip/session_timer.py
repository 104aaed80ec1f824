"""Session timers (RFC 4028): a dialog that nobody refreshes ends by itself.

Without them a call whose BYE was lost (a crashed phone, a NAT that dropped the binding, a kernel
that dropped the datagram under load) stays up until someone notices.  With them one side, the
*refresher*, sends a re-INVITE every half interval; if the other side sees no refresh before the
interval is nearly over, it sends BYE.  The original had none (PBXs asking for ``Require: timer``
got calls that never refreshed).

This module is the negotiation (pure) and ``SessionTimer``, the timer itself on an injected
``IReactorTime``; ``call.py`` wires them into calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from activecall.sip.digits import is_number
from activecall.sip.message import Message, SIPParseError, parse_params

#: the smallest interval we accept (RFC 4028 §4: at least 90 s; 422 below it)
MIN_SE = 90
#: the interval we ask for on our own INVITEs and grant when a peer supports timers but names none
DEFAULT_INTERVAL = 1800


class IntervalTooSmall(Exception):
    """The request's Session-Expires is below our Min-SE: answer 422 with ``Min-SE: min_se``."""

    def __init__(self, min_se: int):
        super().__init__(f"Session-Expires below {min_se}")
        self.min_se = min_se


@dataclass(frozen=True)
class Negotiated:
    """A session timer both sides know about: every ``interval`` seconds ``refresher`` refreshes."""

    interval: int
    refresher: str  # "uac" or "uas"

    def header(self) -> str:
        return f"{self.interval};refresher={self.refresher}"


def parse_session_expires(value: str) -> tuple[int, Optional[str]]:
    """``1800;refresher=uac`` -> (1800, "uac"); raises ``SIPParseError`` for anything else."""
    delta, _, params_text = value.partition(";")
    delta = delta.strip()
    if not is_number(delta) or len(delta) > 10:
        raise SIPParseError(f"bad Session-Expires {value[:40]!r}")
    refresher = parse_params(params_text).get("refresher")
    if refresher is not None:
        refresher = refresher.lower()
        if refresher not in ("uac", "uas"):
            raise SIPParseError(f"bad refresher in Session-Expires {value[:40]!r}")
    return int(delta), refresher


def supports_timer(message: Message) -> bool:
    tags = ",".join(message.headers.get_all("Supported") + message.headers.get_all("Require"))
    return "timer" in (t.strip().lower() for t in tags.split(","))


def negotiate_as_uas(request: Message, min_se: int = MIN_SE) -> Optional[Negotiated]:
    """What our 2xx to ``request`` (an INVITE or UPDATE) says, or None for no session timer.

    Raises ``IntervalTooSmall`` (send 422) and ``SIPParseError`` (send 400).  A caller that asks for a
    timer gets its interval; the refresher is the one it named, else itself when it supports timers
    (it then refreshes), else us (RFC 4028 §9).  A caller that asks for nothing gets no timer.
    """
    value = request.headers.get("Session-Expires")
    if value is None:
        return None
    interval, refresher = parse_session_expires(value)
    floor = max(min_se, _min_se_of(request))
    if interval < floor:
        raise IntervalTooSmall(floor)
    if refresher is None:
        refresher = "uac" if supports_timer(request) else "uas"
    return Negotiated(interval, refresher)


def negotiated_by_response(response: Message) -> Optional[Negotiated]:
    """The session timer a 2xx to our INVITE/UPDATE set (RFC 4028 §7.2), or None."""
    value = response.headers.get("Session-Expires")
    if value is None:
        return None
    interval, refresher = parse_session_expires(value)
    return Negotiated(interval, refresher or "uac")


def _min_se_of(message: Message) -> int:
    """The message's Min-SE (RFC 4028 §5), 0 when it has none; ``SIPParseError`` for a bad one."""
    raw = message.headers.get("Min-SE")
    if raw is None:
        return 0
    value = raw.partition(";")[0].strip()
    if not is_number(value) or len(value) > 10:
        raise SIPParseError(f"bad Min-SE {raw[:40]!r}")
    return int(value)


def request_headers(interval: int = DEFAULT_INTERVAL) -> list[tuple[str, str]]:
    """What our INVITEs (and refreshes) carry: we support timers and propose ``interval``."""
    return [("Session-Expires", str(interval)), ("Min-SE", str(MIN_SE))]


class SessionTimer:
    """One dialog's timer.  ``we_refresh``: ``refresh()`` every half interval; otherwise
    ``expired()`` when no refresh came by ``interval - min(32, interval / 3)`` (RFC 4028 §10).
    ``restart(negotiated)`` after every refresh, sent or received."""

    def __init__(self, clock, negotiated: Negotiated, we_refresh: bool,
                 refresh: Callable[[], None], expired: Callable[[], None]):
        self.clock = clock
        self.negotiated = negotiated
        self.we_refresh = we_refresh
        self._refresh = refresh
        self._expired = expired
        self._call = None
        self._arm()

    def _arm(self) -> None:
        interval = self.negotiated.interval
        if self.we_refresh:
            self._call = self.clock.callLater(interval / 2, self._fire, self._refresh)
        else:
            self._call = self.clock.callLater(interval - min(32, interval / 3), self._fire, self._expired)

    def _fire(self, action: Callable[[], None]) -> None:
        self._call = None
        action()

    def restart(self, negotiated: Negotiated, we_refresh: bool) -> None:
        self.cancel()
        self.negotiated = negotiated
        self.we_refresh = we_refresh
        self._arm()

    def retry_in(self, seconds: float) -> None:
        """Refresh again in ``seconds`` (the last attempt could not be made), terms unchanged."""
        self.cancel()
        self._call = self.clock.callLater(seconds, self._fire, self._refresh)

    def cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    @property
    def active(self) -> bool:
        return self._call is not None
