"""The answering side of a SIP call (RFC 3261 §13.3): ``InboundCall``, an INVITE we received.

The invite handler rings it (180, or 183 with early media; reliably, with PRACK, when the caller
requires 100rel: RFC 3262), answers it (200 resent until the ACK) or rejects it; CANCEL and the
accept timeout end it too.  ``IncomingInvite`` is the INVITE as the invite handlers
(``call/handlers.py``) see it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from activecall.sip import session_timer
from activecall.sip.call import SipCall, option_tags, reason_header, timer_headers
from activecall.sip.call_events import CallFailed, CallStateError, Established
from activecall.sip.dialog import Dialog
from activecall.sip.message import Address, Request, Response, SIPParseError, generate_tag, parse_address, parse_uri
from activecall.sip.sdp_offer import SDP
from activecall.sip.server_transaction import InviteServerTransaction, ServerTransaction
from activecall.sip.transaction_base import TransactionTimeout

log = Logger(namespace="activecall.sip.useragent")  # one namespace for the user agent and its calls


@dataclass(frozen=True)
class IncomingInvite:
    """An inbound INVITE as the invite handlers (``call/handlers.py``) see it: ``InboundCall.incoming_invite()``."""

    caller: str  # From URI, e.g. sip:+12125551234@carrier.example
    callee: str  # To URI
    headers: tuple[tuple[str, str], ...]  # every header, in order, as received
    offer: str  # the SDP body ("" when none)
    dialog_id: str  # "<Call-ID>-<our to-tag>-<from-tag>"
    call_id: str = ""
    from_tag: str = ""
    to_tag: str = ""


def _sips_requested(request: Request) -> bool:
    """RFC 3261 §12.1.1: a UAS's Contact must be a SIPS URI when the request's Request-URI, or its top
    Record-Route (else its Contact), is one.  Otherwise ours is ``sip:...;transport=tls``: libre (baresip 1.0)
    cannot even send its ACK to a ``sips:`` target."""
    if request.uri.scheme == "sips":
        return True
    try:
        record_route = request.headers.get_all("Record-Route")
        peer = parse_address(record_route[0]) if record_route else (request.contacts or [None])[0]
    except SIPParseError:
        return False
    return peer is not None and peer.uri is not None and peer.uri.scheme == "sips"


class _ReliableProvisional:
    """A reliable provisional response of ours (RFC 3262) waiting for its PRACK."""

    __slots__ = ("rseq", "response", "sent_at", "timer")

    def __init__(self, rseq: int, response: Response, sent_at: float):
        self.rseq, self.response, self.sent_at, self.timer = rseq, response, sent_at, None

    def stop(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


class InboundCall(SipCall):
    """An INVITE we received.  The invite handler calls ``ringing``, ``answer`` or ``reject``.

    States: pending → ringing → answering (2xx sent) → confirmed (ACK) →
    terminating → ended.  Pending past ``accept_timeout`` gets a final 480.
    """

    direction = "inbound"

    def __init__(self, ua: "UserAgent", invite: Request, txn: InviteServerTransaction):
        super().__init__(ua)
        self.invite = invite
        self.txn = txn
        transport = txn.source.transport
        contact = Address(parse_uri(ua.transport.contact_uri(transport=transport)))
        if contact.uri.scheme == "sips" and not _sips_requested(invite):
            contact.uri.scheme = "sip"  # keeps ;transport=tls
        self.dialog = Dialog.as_uas(invite, generate_tag(), contact, transport=transport)
        self.offer = invite.body if invite.content_type in (None, SDP) else b""
        self.remote_sdp = self.offer
        self.state = "pending"
        self.final_response: Optional[Response] = None
        self._retransmitter = None
        self._answered: list[defer.Deferred] = []
        #: the session timer our 2xx will set (RFC 4028), from the INVITE's Session-Expires
        self.timer_terms: Optional[session_timer.Negotiated] = None
        #: RFC 3262: the caller requires reliable provisional responses (we send them only then)
        self.reliable_provisionals = "100rel" in option_tags(invite, "Require")
        self._answer_queued = False
        self._rseq = random.randint(1, 2**30)
        self._unacked: Optional[_ReliableProvisional] = None  # the one awaiting its PRACK
        self._after_prack: list[Callable[[], None]] = []  # what waits for that PRACK
        self._accept_timer = ua.reactor.callLater(ua.config.accept_timeout, self._accept_timeout)

    @property
    def call_id(self) -> str:
        return self.invite.call_id or ""

    @property
    def caller(self) -> str:
        """The From URI."""
        return str(self.invite.from_.uri)

    @property
    def callee(self) -> str:
        """The To URI."""
        return str(self.invite.to.uri)

    def incoming_invite(self) -> IncomingInvite:
        """The invite handlers' view of this INVITE."""
        return IncomingInvite(
            caller=self.caller, callee=self.callee, headers=tuple(self.invite.headers),
            offer=self.offer.decode("utf-8", "replace"), dialog_id=self.dialog_id, call_id=self.call_id,
            from_tag=self.dialog.remote_tag, to_tag=self.dialog.local_tag,
        )

    def _dialog_headers(self) -> list[tuple[str, str]]:
        """Contact and the Record-Route copy every dialog-creating response needs (RFC 3261 §12.1.1)."""
        return ([("Record-Route", rr) for rr in self.invite.headers.get_all("Record-Route")]
                + [("Contact", str(self.dialog.local_contact))])

    def ringing(self, early_media_sdp: Optional[bytes] = None) -> None:
        """180 Ringing, or 183 Session Progress with ``early_media_sdp``."""
        if self.state not in ("pending", "ringing"):
            raise CallStateError(f"ringing in state {self.state}")
        headers = self._dialog_headers()
        if early_media_sdp:
            headers.append(("Content-Type", SDP))
            self.local_sdp = early_media_sdp
        self._send_provisional(183 if early_media_sdp else 180, headers, early_media_sdp or b"")
        self.state = "ringing"

    # -- reliable provisional responses (RFC 3262) --

    def _send_provisional(self, status: int, headers: list, body: bytes) -> None:
        if not self.reliable_provisionals:
            self.ua.respond(self.txn, status, headers=headers, body=body, to_tag=self.dialog.local_tag)
            return
        if self._unacked is not None:  # one unacknowledged reliable provisional at a time (§3)
            self._after_prack.append(lambda: self._send_provisional(status, headers, body))
            return
        self._rseq += 1
        response = self.ua.respond(self.txn, status, headers=headers + [("Require", "100rel"),
                                                                         ("RSeq", str(self._rseq))],
                                   body=body, to_tag=self.dialog.local_tag)
        self._unacked = _ReliableProvisional(self._rseq, response, self.ua.reactor.seconds())
        self._retransmit_provisional(self.ua.layer.t1, 0.0)

    def _retransmit_provisional(self, interval: float, elapsed: float) -> None:
        """Resend at T1, 2·T1, 4·T1 … after the first sending, on deadlines from that moment (§3)."""
        limit = 64 * self.ua.layer.t1
        due = min(elapsed + interval, limit)
        unacked = self._unacked

        def fire():
            if self._unacked is not unacked or self.state not in ("pending", "ringing"):
                return
            if due >= limit:  # no PRACK for 64*T1: reject the INVITE with a 5xx
                log.info("no PRACK for our reliable {status} on {id}: 504", status=unacked.response.status,
                         id=self.dialog_id)
                self._unacked = None
                self._after_prack = []
                self.reject(504, "no PRACK for a reliable provisional response")
                return
            self.txn.send_response(unacked.response)
            self._retransmit_provisional(interval * 2, due)

        unacked.timer = self.ua.reactor.callLater(max(0.0, unacked.sent_at + due - self.ua.reactor.seconds()), fire)

    def _stop_provisionals(self) -> None:
        if self._unacked is not None:
            self._unacked.stop()
        self._unacked = None
        self._after_prack = []

    def _prack(self, request: Request, txn: ServerTransaction) -> None:
        if not self.reliable_provisionals:
            super()._prack(request, txn)
            return
        rack = (request.headers.get("RAck") or "").split()
        unacked = self._unacked
        if (unacked is None or len(rack) != 3 or rack[0] != str(unacked.rseq)
                or rack[1] != str(self.invite.cseq.seq) or rack[2].upper() != "INVITE"):
            self.ua.respond(txn, 481, "No Matching Provisional Response")
            return
        unacked.stop()
        self._unacked = None
        self.ua.respond(txn, 200)
        while self._after_prack and self._unacked is None and self.state in ("pending", "ringing"):
            self._after_prack.pop(0)()

    def answer(self, sdp: bytes) -> defer.Deferred:
        """200 OK with ``sdp``, resent until the ACK.  Fires with the ACK; fails ``CallFailed(408)`` without one.

        After a reliable provisional the 200 waits for its PRACK (RFC 3262 §3: its SDP must be settled)."""
        if self.state not in ("pending", "ringing") or self._answer_queued:
            return defer.fail(CallStateError(f"answer in state {self.state}"))
        if self._unacked is not None:
            self._cancel_accept_timer()  # decided: only the PRACK is awaited (64*T1 bounds that)
            self._answer_queued = True
            d: defer.Deferred = defer.Deferred()
            self._answered.append(d)

            def send():
                self._answer_queued = False
                waiting, self._answered = self._answered, []
                self.answer(sdp)
                self._answered[:0] = waiting

            self._after_prack.append(send)
            return d
        self._cancel_accept_timer()
        self.local_sdp = sdp
        headers = self._dialog_headers() + list(self.ua.capabilities()) + timer_headers(self.timer_terms)
        headers.append(("Content-Type", SDP))
        self.final_response = self.ua.respond(self.txn, 200, headers=headers, body=sdp, to_tag=self.dialog.local_tag)
        self.state = "answering"
        if self.timer_terms is not None:  # the caller is the INVITE's "uac"
            self._start_session_timer(self.timer_terms, we_refresh=self.timer_terms.refresher == "uas")
        self._retransmitter = self.ua.layer.retransmit_2xx(self.txn, self.final_response)
        self._retransmitter.done.addCallbacks(lambda _: None, self._no_ack)
        d: defer.Deferred = defer.Deferred()
        self._answered.append(d)
        return d

    def reject(self, code: int = 603, reason: Optional[str] = None) -> None:
        """A final non-2xx with ``Reason`` (RFC 3326) when ``reason`` is given."""
        if self.state not in ("pending", "ringing"):
            raise CallStateError(f"reject in state {self.state}")
        if code < 300:
            raise ValueError(f"reject needs a 3xx-6xx code, not {code}")
        self._cancel_accept_timer()
        value = reason_header(code, reason)
        self.ua.respond(self.txn, code, headers=[("Reason", value)] if value else (), to_tag=self.dialog.local_tag)
        self._end("rejected", code, "local", reason or "")

    def hangup(self, headers: Iterable[tuple[str, str]] = ()) -> defer.Deferred:
        """Before the answer: 603 Decline.  After: BYE (the ACK need not have arrived, RFC 3261 §15)."""
        if self.end is None and self.state in ("pending", "ringing"):
            self.reject(603)
            return self.when_ended()
        return super().hangup(headers)

    def _cancel_accept_timer(self) -> None:
        if self._accept_timer is not None and self._accept_timer.active():
            self._accept_timer.cancel()
        self._accept_timer = None

    def _accept_timeout(self) -> None:
        self._accept_timer = None
        if self.state in ("pending", "ringing"):
            # the original sent nothing here and left the caller hanging
            timeout = self.ua.config.accept_timeout
            log.info("inbound call {id} not accepted within {t:g}s: 480", id=self.dialog_id, t=timeout)
            self.ua.respond(self.txn, 480, headers=[("Reason", reason_header(480, "accept timeout"))],
                            to_tag=self.dialog.local_tag)
            self._end("timeout", 480, "local", f"not accepted within {timeout:g}s")

    def _ack_received(self, ack: Request) -> None:
        if self.state == "answering" and ack.cseq.seq == self.invite.cseq.seq:
            if self._retransmitter is not None:
                self._retransmitter.ack_received()
            self.dialog.confirm()
            self.state = "confirmed"
            if ack.body:  # delayed offer: the ACK carries the answer
                self.remote_sdp = ack.body
            self._emit(Established(self.remote_sdp))
            waiters, self._answered = self._answered, []
            for d in waiters:
                d.callback(ack)
            return
        super()._ack_received(ack)

    def _no_ack(self, failure: Failure) -> None:
        failure.trap(TransactionTimeout)
        if self.state != "answering":
            return
        log.warn("no ACK for our 200 on {id}: ending the call with BYE", id=self.dialog_id)
        waiters, self._answered = self._answered, []
        for d in waiters:
            d.errback(Failure(CallFailed(408, "no ACK for the 200 OK")))
        self.send_request("BYE").addErrback(lambda f: None)
        self._end("no-ack", 408, "remote", "no ACK for the 200 OK")

    def _cancelled(self) -> None:
        """The caller sent CANCEL: 487 (sent by us, with our tag) and an ``Ended``."""
        self._cancel_accept_timer()
        if self.state in ("pending", "ringing"):
            self.ua.respond(self.txn, 487, to_tag=self.dialog.local_tag)
            self._end("cancelled", 487, "remote")

    def _remote_bye(self) -> None:
        if self.state in ("pending", "ringing"):
            self._cancel_accept_timer()
            self.ua.respond(self.txn, 487, to_tag=self.dialog.local_tag)
        if self._retransmitter is not None:
            self._retransmitter.stop()
        super()._remote_bye()

    def _end(self, *args, **kwargs) -> None:
        self._cancel_accept_timer()
        self._stop_provisionals()
        if self._retransmitter is not None and self.state != "answering":
            self._retransmitter.stop()
        super()._end(*args, **kwargs)
        if self._answer_queued:  # the 200 was waiting for a PRACK and will never go out
            self._answer_queued = False
            waiters, self._answered = self._answered, []
            for d in waiters:
                d.errback(Failure(CallFailed(self.end.status or 487, "the call ended before it was answered")))


__all__ = [
    "IncomingInvite", "InboundCall",
]
