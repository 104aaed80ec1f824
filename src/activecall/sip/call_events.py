"""What a SIP call reports and raises: the events its listeners get (``SipCall.add_listener``),
``CallStateError`` / ``CallFailed``, and the request bodies that become events (INFO DTMF, NOTIFY sipfrag).

Events (frozen dataclasses): ``Provisional``, ``Established``, ``SdpUpdated``, ``HoldChanged``, ``Dtmf``,
``TransferRequested``, ``TransferProgress``, ``ForkEnded``, ``Ended``, ``MessageReceived``; and
``IncomingMessage``, an out-of-dialog MESSAGE for the user agent's ``message_handler``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Union

from activecall.sip.digits import is_number


@dataclass(frozen=True)
class Provisional:
    """Outbound: 180/183 from the callee; ``sdp`` is early media (183 with a body)."""

    status: int
    reason: str
    sdp: Optional[bytes] = None


@dataclass(frozen=True)
class Established:
    """The dialog is confirmed (ACK received / sent); ``remote_sdp`` is the peer's session."""

    remote_sdp: bytes


@dataclass(frozen=True)
class SdpUpdated:
    """The peer sent a new session description (183, 200, re-INVITE, UPDATE)."""

    sdp: bytes


@dataclass(frozen=True)
class HoldChanged:
    """The peer put the call on hold (sendonly / inactive / c=0.0.0.0) or resumed it."""

    on_hold: bool
    direction: str


@dataclass(frozen=True)
class Dtmf:
    """A digit from SIP INFO (``Signal=``)."""

    digit: str
    duration: Optional[int] = None


@dataclass(frozen=True)
class MessageReceived:
    """A SIP MESSAGE (RFC 3428) the peer sent in the call's dialog (answered 200 already)."""

    body: bytes
    content_type: str


@dataclass(frozen=True)
class IncomingMessage:
    """A SIP MESSAGE outside any dialog (RFC 3428 pager mode), for the user agent's ``message_handler``."""

    from_uri: str
    to_uri: str
    call_id: str
    body: bytes
    content_type: str
    headers: tuple = ()

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


@dataclass(frozen=True)
class TransferRequested:
    """The peer sent REFER: call ``refer.accept()`` or ``refer.decline()`` in the listener."""

    refer: "IncomingRefer"


@dataclass(frozen=True)
class TransferProgress:
    """NOTIFY progress of a REFER we sent (the sipfrag status line)."""

    status: int
    reason: str


@dataclass(frozen=True)
class ForkEnded:
    """Another fork of our INVITE answered too: its dialog was ACKed and ended with a BYE, which got
    ``status`` (408/503 when it went unanswered or could not be sent)."""

    tag: str
    status: int


@dataclass(frozen=True)
class Ended:
    """The call is over.  ``reason``: local, remote, cancelled, rejected, timeout, failed, no-ack, session-expired."""

    reason: str
    status: Optional[int] = None
    by: str = "local"
    detail: str = ""


CallEvent = Union[Provisional, Established, SdpUpdated, HoldChanged, Dtmf, TransferRequested,
                  TransferProgress, ForkEnded, Ended, MessageReceived]


class CallStateError(Exception):
    """An action that the call's state does not allow (answering twice, ringing after BYE)."""


class CallFailed(Exception):
    """An outbound call or request got a final failure: ``status`` (408 on timeout, 503 unsendable)."""

    def __init__(self, status: int, reason: str = ""):
        super().__init__(f"{status} {reason}".strip())
        self.status = status
        self.reason = reason


# -- request bodies that become events ------------------------------------------------------------


def parse_dtmf_info(body: bytes, content_type: Optional[str]) -> Optional[Dtmf]:
    """``Signal=5`` / ``Duration=160`` (application/dtmf-relay) or a bare digit (application/dtmf)."""
    text = body.decode("utf-8", "replace").strip()
    if not text:
        return None
    if content_type == "application/dtmf" and re.fullmatch(r"[0-9A-Da-d*#]|1[0-6]", text):
        return Dtmf(_digit(text))
    fields = {}
    for line in text.splitlines():
        key, eq, value = line.partition("=")
        if eq:
            fields[key.strip().lower()] = value.strip()
    signal = fields.get("signal")
    if not signal or not re.fullmatch(r"[0-9A-Da-d*#]|1[0-6]", signal):
        return None
    duration = fields.get("duration")
    return Dtmf(_digit(signal), int(duration) if duration and is_number(duration) else None)


def _digit(signal: str) -> str:
    """RFC 4733 event numbers 10–15 as the digits they stand for."""
    return {"10": "*", "11": "#", "12": "A", "13": "B", "14": "C", "15": "D", "16": "!"}.get(signal, signal.upper())


def parse_sipfrag(body: bytes) -> Optional[tuple[int, str]]:
    """``SIP/2.0 180 Ringing`` (RFC 3420) -> (180, "Ringing")."""
    first = body.decode("utf-8", "replace").strip().splitlines()[:1]
    m = re.match(r"SIP/2\.0\s+(\d{3})\s*(.*)", first[0]) if first else None
    return (int(m.group(1)), m.group(2).strip()) if m else None


__all__ = [
    "Provisional", "Established", "SdpUpdated", "HoldChanged", "Dtmf", "TransferRequested", "TransferProgress",
    "ForkEnded", "Ended", "CallEvent", "CallStateError", "CallFailed", "parse_dtmf_info", "parse_sipfrag",
]
