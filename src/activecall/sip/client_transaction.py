"""SIP client transactions (RFC 3261 §17.1): INVITE (timers A, B, D, and M in the
RFC 6026 Accepted state) and non-INVITE (timers E, F, K), and the requests a client builds from
an INVITE: the ACK for a non-2xx (§17.1.1.3) and CANCEL (§9.1).

``TransactionLayer.send_request`` (``transaction.py``) creates these.
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from activecall.sip.message import Headers, Request, Response
from activecall.sip.transaction_base import State, Transaction, TransactionTimeout, TransportError, client_key

log = Logger(namespace="activecall.sip.transaction")


# -- client transactions ----------------------------------------------------------------


class ClientTransaction(Transaction):
    """A request we sent: ``final`` fires with the final response (first one only).

    ``final`` fails with ``TransactionTimeout`` or ``TransportError``.
    ``on_provisional(response)`` is called for each 1xx passed up.
    """

    def __init__(self, layer, request, target, on_provisional=None):
        super().__init__(layer, request, target)
        self.key = client_key(request)
        self.final: defer.Deferred = defer.Deferred()
        self.on_provisional = on_provisional
        self.provisional_seen = False
        self.response: Optional[Response] = None
        #: set by TransactionLayer.cancel when the CANCEL waits for a provisional
        self._pending_cancel: Optional[Callable[[], None]] = None

    def start(self) -> None:
        raise NotImplementedError

    def _send(self) -> None:
        self.layer._send_request(self, self.request, self.target)

    def _provisional(self, response: Response) -> None:
        self.provisional_seen = True
        if self.on_provisional is not None:
            try:
                self.on_provisional(response)
            except Exception:
                log.failure("provisional response callback failed")
        if self._pending_cancel is not None:
            send_cancel, self._pending_cancel = self._pending_cancel, None
            send_cancel()

    def _final(self, response: Response) -> None:
        self.response = response
        if not self.final.called:
            self.final.callback(response)

    def _fail(self, error: Exception) -> None:
        if not self.final.called:
            self.final.errback(Failure(error))
        self._terminate()

    def transport_error(self, failure: Failure) -> None:
        if self.state in (State.CALLING, State.TRYING, State.PROCEEDING):
            self._fail(TransportError(str(failure.value)))
        else:
            self._terminate()

    def receive_response(self, response: Response) -> None:
        raise NotImplementedError


class InviteClientTransaction(ClientTransaction):
    """RFC 3261 §17.1.1 (timers A, B, D) with the RFC 6026 Accepted state (timer M)."""

    def start(self) -> None:
        self.state = State.CALLING
        if not self.reliable:
            self._arm_a(self.layer.t1)
        self.timers.start("B", 64 * self.layer.t1, self._timer_b)
        self._send()  # last: a synchronous send failure terminates us

    def _arm_a(self, interval: float) -> None:
        def fire():
            if self.state is State.CALLING:
                self._send()
                self._arm_a(interval * 2)

        self.timers.start("A", interval, fire)

    def _timer_b(self) -> None:
        if self.state is State.CALLING:
            self._fail(TransactionTimeout(f"no response to INVITE in {64 * self.layer.t1:g}s"))

    def receive_response(self, response: Response) -> None:
        status = response.status
        if self.state in (State.CALLING, State.PROCEEDING):
            if status < 200:
                self.state = State.PROCEEDING
                self.timers.stop("A")
                self.timers.stop("B")
                self._provisional(response)
            elif status < 300:
                self.state = State.ACCEPTED
                self.timers.stop_all()
                self.timers.start("M", 64 * self.layer.t1, self._terminate)
                self._pending_cancel = None
                self._final(response)
            else:
                self.state = State.COMPLETED
                self.timers.stop_all()
                self._pending_cancel = None
                self._send_ack(response)
                if self.reliable:
                    self._terminate()
                else:
                    self.timers.start("D", 32.0, self._terminate)
                self._final(response)  # last: the TU sees a settled transaction
        elif self.state is State.COMPLETED and status >= 300:
            self._send_ack(response)  # our ACK was lost: the final came again
        elif self.state is State.ACCEPTED and 200 <= status < 300:
            self.layer.tu.stray_response(response, self.target)  # the dialog re-ACKs

    def _send_ack(self, response: Response) -> None:
        self.layer._send_request(None, make_ack_for_non_2xx(self.request, response), self.target)


class NonInviteClientTransaction(ClientTransaction):
    """RFC 3261 §17.1.2 (timers E, F, K)."""

    def start(self) -> None:
        self.state = State.TRYING
        if not self.reliable:
            self._arm_e(self.layer.t1)
        self.timers.start("F", 64 * self.layer.t1, self._timer_f)
        self._send()  # last: a synchronous send failure terminates us

    def _arm_e(self, interval: float) -> None:
        def fire():
            if self.state in (State.TRYING, State.PROCEEDING):
                self._send()
                next_interval = self.layer.t2 if self.state is State.PROCEEDING else min(2 * interval, self.layer.t2)
                self._arm_e(next_interval)

        self.timers.start("E", interval, fire)

    def _timer_f(self) -> None:
        self._fail(TransactionTimeout(f"no final response to {self.method} in {64 * self.layer.t1:g}s"))

    def receive_response(self, response: Response) -> None:
        if self.state not in (State.TRYING, State.PROCEEDING):
            return  # retransmitted final: absorbed in Completed
        if response.status < 200:
            self.state = State.PROCEEDING  # Timer E continues, re-armed at T2 from now on
            self._provisional(response)
            return
        self.state = State.COMPLETED
        self.timers.stop_all()
        if self.reliable:
            self._terminate()
        else:
            self.timers.start("K", self.layer.t4, self._terminate)
        self._final(response)  # last: the TU sees a settled transaction


def make_ack_for_non_2xx(invite: Request, response: Response) -> Request:
    """The hop-by-hop ACK of RFC 3261 §17.1.1.3 (same branch as the INVITE)."""
    headers = Headers()
    headers.add("Via", invite.headers.get("Via"))
    for route in invite.headers.get_all("Route"):
        headers.add("Route", route)
    headers.add("Max-Forwards", "70")
    headers.add("From", invite.headers.get("From"))
    headers.add("To", response.headers.get("To"))
    headers.add("Call-ID", invite.headers.get("Call-ID"))
    headers.add("CSeq", f"{invite.cseq.seq} ACK")
    return Request("ACK", invite.uri.copy(), headers)


def make_cancel(invite: Request) -> Request:
    """CANCEL for ``invite`` (RFC 3261 §9.1): same top Via/branch, URI, tags, CSeq number."""
    headers = Headers()
    headers.add("Via", invite.headers.get("Via"))
    for route in invite.headers.get_all("Route"):
        headers.add("Route", route)
    headers.add("Max-Forwards", "70")
    headers.add("From", invite.headers.get("From"))
    headers.add("To", invite.headers.get("To"))
    headers.add("Call-ID", invite.headers.get("Call-ID"))
    headers.add("CSeq", f"{invite.cseq.seq} CANCEL")
    return Request("CANCEL", invite.uri.copy(), headers)


__all__ = [
    "ClientTransaction", "InviteClientTransaction", "NonInviteClientTransaction",
    "make_ack_for_non_2xx", "make_cancel",
]
