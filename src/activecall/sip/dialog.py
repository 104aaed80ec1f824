"""SIP dialogs (RFC 3261 §12): the state two user agents share for one call.

A dialog is named by Call-ID, our tag and the peer's tag.  It remembers what
every in-dialog request needs: the route set (from Record-Route), the remote
target (from Contact), both CSeq counters and the From/To addresses.  Pure
state and message building: no I/O, no timers — the user agent sends what
this builds.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterable, Optional

from activecall.sip.message import (
    BRANCH_MAGIC,
    URI,
    Address,
    Request,
    Response,
    SIPParseError,
    Target,
    Via,
    make_request,
    next_hop,
    parse_address,
)


class DialogState(enum.Enum):
    EARLY = "early"
    CONFIRMED = "confirmed"
    TERMINATED = "terminated"


@dataclass(frozen=True)
class DialogId:
    """(Call-ID, local tag, remote tag); ``str()`` is the public ``dialogId``."""

    call_id: str
    local_tag: str
    remote_tag: str

    def __str__(self) -> str:
        # the dialog id active-call clients use (docs/sip.md): "<Call-ID>-<our tag>-<their tag>", the session id clients use
        return f"{self.call_id}-{self.local_tag}-{self.remote_tag}"


def request_dialog_id(request: Request) -> DialogId:
    """The id of the dialog a request we received belongs to (our tag is in To)."""
    return DialogId(request.call_id or "", request.to.tag or "", request.from_.tag or "")


def response_dialog_id(response: Response) -> DialogId:
    """The id of the dialog a response to our request belongs to (our tag is in From)."""
    return DialogId(response.call_id or "", response.from_.tag or "", response.to.tag or "")


class Dialog:
    """One dialog.  Build with ``as_uas`` / ``as_uac``; then ``create_request``.

    ``remote_cseq`` is None until the peer sends a request in the dialog
    (RFC 3261 §12.1.2: the UAC side starts with an empty remote sequence).
    """

    def __init__(self, call_id: str, local_tag: str, remote_tag: str, local_address: Address,
                 remote_address: Address, remote_target: URI, route_set: Iterable[str],
                 local_cseq: int, remote_cseq: Optional[int], local_contact: Address,
                 is_uac: bool, transport: str = "UDP", state: DialogState = DialogState.EARLY):
        self.call_id = call_id
        self.local_tag = local_tag
        self.remote_tag = remote_tag
        self.local_address = local_address
        self.remote_address = remote_address
        self.remote_target = remote_target
        self.route_set = list(route_set)
        self.local_cseq = local_cseq
        self.remote_cseq = remote_cseq
        self.local_contact = local_contact
        self.is_uac = is_uac
        self.transport = transport
        self.state = state

    @property
    def id(self) -> DialogId:
        return DialogId(self.call_id, self.local_tag, self.remote_tag)

    @classmethod
    def as_uas(cls, request: Request, local_tag: str, local_contact: Address, transport: str = "UDP") -> "Dialog":
        """The dialog an incoming INVITE (or REFER/SUBSCRIBE) creates (RFC 3261 §12.1.1)."""
        contacts = request.contacts
        if contacts and contacts[0].uri is not None:
            target = contacts[0].uri
        elif not (request.top_via.branch or "").startswith(BRANCH_MAGIC) and request.from_.uri is not None:
            target = request.from_.uri  # RFC 2543 had no mandatory Contact (RFC 4475 §3.4.1)
        else:
            raise SIPParseError(f"{request.method} without a usable Contact cannot create a dialog")
        local = request.to.copy()
        local.params["tag"] = local_tag
        return cls(
            call_id=request.call_id or "", local_tag=local_tag, remote_tag=request.from_.tag or "",
            local_address=local, remote_address=request.from_, remote_target=target,
            route_set=request.headers.get_all("Record-Route"), local_cseq=0,
            remote_cseq=request.cseq.seq, local_contact=local_contact, is_uac=False, transport=transport,
        )

    @classmethod
    def as_uac(cls, request: Request, response: Response, transport: str = "UDP") -> "Dialog":
        """The dialog a 1xx-with-tag or 2xx to our INVITE creates (RFC 3261 §12.1.2)."""
        contacts = response.contacts
        target = contacts[0].uri if contacts and contacts[0].uri is not None else request.uri
        state = DialogState.CONFIRMED if 200 <= response.status < 300 else DialogState.EARLY
        return cls(
            call_id=request.call_id or "", local_tag=request.from_.tag or "", remote_tag=response.to.tag or "",
            local_address=request.from_, remote_address=response.to, remote_target=target,
            route_set=list(reversed(response.headers.get_all("Record-Route"))),
            local_cseq=request.cseq.seq, remote_cseq=None,
            local_contact=request.contacts[0] if request.contacts else Address(request.uri), is_uac=True,
            transport=transport, state=state,
        )

    # -- updates ---------------------------------------------------------------------

    def confirm(self, response: Optional[Response] = None) -> None:
        """A 2xx arrived (UAC: take its route set and target) or the ACK did (UAS)."""
        if response is not None and self.is_uac and self.state is DialogState.EARLY:
            # RFC 3261 §12.1.2: the 2xx, not an earlier 1xx, fixes the route set
            self.route_set = list(reversed(response.headers.get_all("Record-Route")))
            self.refresh_target(response)
        self.state = DialogState.CONFIRMED

    def refresh_target(self, message) -> None:
        """A target refresh (re-INVITE, UPDATE or their 2xx) may move the peer's Contact."""
        try:
            contacts = message.contacts
        except SIPParseError:
            return
        if contacts and contacts[0].uri is not None:
            self.remote_target = contacts[0].uri

    def accept_remote_cseq(self, request: Request) -> bool:
        """RFC 3261 §12.2.2: a CSeq lower than the last one is out of order (answer 500).

        ACK and CANCEL carry the INVITE's number and are never counted.
        """
        if request.method in ("ACK", "CANCEL"):
            return True
        seq = request.cseq.seq
        if self.remote_cseq is not None and seq <= self.remote_cseq:
            return False
        self.remote_cseq = seq
        return True

    # -- building requests -----------------------------------------------------------

    def next_cseq(self) -> int:
        self.local_cseq += 1
        return self.local_cseq

    def create_request(self, method: str, headers: Iterable[tuple[str, str]] = (), body: bytes = b"",
                       content_type: Optional[str] = None, cseq: Optional[int] = None,
                       via: Optional[Via] = None) -> Request:
        """An in-dialog request (RFC 3261 §12.2.1.1) with a fresh CSeq (unless given).

        Loose routing when the first route has ``lr``; otherwise the strict
        routing of RFC 2543 (the first route becomes the Request-URI and the
        remote target goes last).  The transaction layer stamps our Via.
        """
        uri, routes = self.remote_target.copy(), list(self.route_set)
        if routes:
            first = parse_address(routes[0]).uri
            if first is not None and "lr" not in first.params:
                uri = first.copy()
                routes = routes[1:] + [str(Address(self.remote_target.copy()))]
        request = make_request(
            method, uri, via=via or Via(self.transport, "", None, {}), from_=self.local_address,
            to=self.remote_address, call_id=self.call_id,
            cseq=self.next_cseq() if cseq is None else cseq,
            contact=self.local_contact if method in ("INVITE", "UPDATE", "REFER", "SUBSCRIBE", "NOTIFY") else None,
            headers=[("Route", r) for r in routes] + list(headers), body=body, content_type=content_type,
        )
        if via is None:
            request.headers.remove("Via")  # the transaction layer adds ours
        return request

    def create_ack(self, invite_cseq: int, body: bytes = b"", content_type: Optional[str] = None) -> Request:
        """The ACK for a 2xx: its own transaction, same CSeq number as the INVITE."""
        return self.create_request("ACK", body=body, content_type=content_type, cseq=invite_cseq)

    def target_for(self, request: Request) -> Target:
        """Where an in-dialog request goes: the first Route, else the Request-URI."""
        return next_hop(request, self.transport)

    def __repr__(self) -> str:
        return f"<Dialog {self.id} {self.state.value} {'uac' if self.is_uac else 'uas'}>"


class DialogTable:
    """Dialogs by id; lookups from either side of a message."""

    def __init__(self):
        self._dialogs: dict[DialogId, Dialog] = {}

    def add(self, dialog: Dialog) -> None:
        self._dialogs[dialog.id] = dialog

    def remove(self, dialog: Dialog) -> None:
        if self._dialogs.get(dialog.id) is dialog:
            del self._dialogs[dialog.id]

    def get(self, dialog_id: DialogId) -> Optional[Dialog]:
        return self._dialogs.get(dialog_id)

    def for_request(self, request: Request) -> Optional[Dialog]:
        return self._dialogs.get(request_dialog_id(request))

    def for_response(self, response: Response) -> Optional[Dialog]:
        return self._dialogs.get(response_dialog_id(response))

    def __len__(self) -> int:
        return len(self._dialogs)

    def __iter__(self):
        return iter(list(self._dialogs.values()))


__all__ = ["DialogState", "DialogId", "Dialog", "DialogTable", "request_dialog_id", "response_dialog_id"]
