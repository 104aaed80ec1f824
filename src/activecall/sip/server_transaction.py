"""SIP server transactions (RFC 3261 §17.2): INVITE (timers G, H, I, and L in the
RFC 6026 Accepted state) and non-INVITE (timer J), and ``TwoXXRetransmitter``, the UAS's
retransmission of a 2xx to INVITE until the ACK (§13.3.1.4).

``TransactionLayer`` (``transaction.py``) creates the server transactions for the
requests it receives.
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from activecall.sip.message import Request, Response, SIPParseError, Target, generate_tag, make_response
from activecall.sip.transaction_base import (
    T1,
    T2,
    State,
    Timers,
    Transaction,
    TransactionTimeout,
    TransportError,
    server_key,
)

log = Logger(namespace="activecall.sip.transaction")


# -- server transactions -------------------------------------------------------------------


class ServerTransaction(Transaction):
    """A request we received; the TU answers with ``respond`` or ``send_response``."""

    def __init__(self, layer, request, source: Target):
        super().__init__(layer, request, source)
        self.key = server_key(request)
        self.last_response: Optional[Response] = None
        self.to_tag: Optional[str] = None

    @property
    def source(self) -> Target:
        return self.target

    def respond(self, status: int, reason: Optional[str] = None, headers=(), body: bytes = b"",
                to_tag: Optional[str] = None) -> Response:
        """Build and send a response with one To-tag for the whole transaction."""
        if to_tag is not None:
            self.to_tag = to_tag
        elif self.to_tag is None and status > 100:
            self.to_tag = generate_tag()
        # once lingering the request is gone; the final response carries the same Via, From,
        # To, Call-ID and CSeq (and this response is refused by the state machine anyway)
        answered = self.request if self.request is not None else self.last_response
        response = make_response(answered, status, reason, self.to_tag, headers, body)
        self.send_response(response)
        return response

    def send_response(self, response: Response) -> None:
        if self.state is State.TERMINATED:
            log.warn("{txn}: response {status} after termination, not sent", txn=self, status=response.status)
            return
        try:
            tag = response.to.tag
        except SIPParseError:
            tag = None
        if tag and response.status > 100:
            self.to_tag = tag
        self._respond(response)

    def _transmit(self, response: Response) -> None:
        self.last_response = response
        self.layer._send_response(self, response, self.source)

    @property
    def final_sent(self) -> bool:
        return self.last_response is not None and self.last_response.status >= 200

    def transport_error(self, failure: Failure) -> None:
        log.warn("{txn}: could not send response: {err}", txn=self, err=failure.getErrorMessage())
        self.layer.tu.server_transaction_failed(self, TransportError(failure.getErrorMessage()))
        self._terminate()

    def _respond(self, response: Response) -> None:
        raise NotImplementedError

    def receive_request(self, request: Request) -> None:
        raise NotImplementedError


class InviteServerTransaction(ServerTransaction):
    """RFC 3261 §17.2.1 (timers G, H, I) with the RFC 6026 Accepted state (timer L).

    A 2xx is sent once here; retransmitting it until the ACK is the TU's job
    (``TwoXXRetransmitter``) because the ACK for a 2xx is its own transaction.
    """

    def start(self) -> None:
        self.state = State.PROCEEDING

    def _respond(self, response: Response) -> None:
        if self.state is not State.PROCEEDING:
            if self.state is State.ACCEPTED and 200 <= response.status < 300:
                self._transmit(response)  # the TU retransmitting its 2xx
                return
            log.warn("{txn}: {status} in state {state} not sent", txn=self,
                     status=response.status, state=self.state.value)
            return
        self._transmit(response)
        if response.status < 200 or self.state is State.TERMINATED:
            return
        if response.status < 300:
            self.state = State.ACCEPTED
            self._linger()  # timer L
            return
        self.state = State.COMPLETED
        if not self.reliable:
            self._arm_g(self.layer.t1)
        self.timers.start("H", 64 * self.layer.t1, self._timer_h)

    def _arm_g(self, interval: float) -> None:
        def fire():
            if self.state is State.COMPLETED:
                self.layer._send_response(self, self.last_response, self.source)
                self._arm_g(min(2 * interval, self.layer.t2))

        self.timers.start("G", interval, fire)

    def _timer_h(self) -> None:
        if self.state is State.COMPLETED:
            self.layer.tu.server_transaction_failed(self, TransactionTimeout("no ACK for the final response"))
            self._terminate()

    def receive_request(self, request: Request) -> None:
        if request.method == "ACK":
            if self.state is State.COMPLETED:
                self.state = State.CONFIRMED
                self.timers.stop("G")
                self.timers.stop("H")
                if self.reliable:
                    self._terminate()
                else:
                    self.timers.start("I", self.layer.t4, self._terminate)
            elif self.state is State.ACCEPTED:
                self.layer.tu.ack_received(request, self.source)
            return
        # a retransmitted INVITE
        if self.state in (State.PROCEEDING, State.COMPLETED) and self.last_response is not None:
            self.layer._send_response(self, self.last_response, self.source)


class NonInviteServerTransaction(ServerTransaction):
    """RFC 3261 §17.2.2 (timer J)."""

    def start(self) -> None:
        self.state = State.TRYING

    def _respond(self, response: Response) -> None:
        if self.state not in (State.TRYING, State.PROCEEDING):
            log.warn("{txn}: second final response {status} not sent", txn=self, status=response.status)
            return
        self._transmit(response)
        if self.state is State.TERMINATED:
            return  # the send failed
        if response.status < 200:
            self.state = State.PROCEEDING
            return
        self.state = State.COMPLETED
        if self.reliable:
            self._terminate()
        else:
            self._linger()  # timer J

    def receive_request(self, request: Request) -> None:
        if self.state in (State.PROCEEDING, State.COMPLETED) and self.last_response is not None:
            self.layer._send_response(self, self.last_response, self.source)


# -- 2xx retransmission (RFC 3261 §13.3.1.4) ------------------------------------------------------


class TwoXXRetransmitter:
    """Resends a 2xx to INVITE at T1, 2*T1, ... capped at T2 until ACK or 64*T1.

    ``done`` fires with None when ``ack_received`` is called, or fails with
    ``TransactionTimeout`` (the UAS then ends the dialog with BYE).  Over a
    reliable transport nothing is resent, but the ACK is still awaited.
    """

    def __init__(self, reactor: IReactorTime, send: Callable[[], object], reliable: bool,
                 t1: float = T1, t2: float = T2):
        self.timers = Timers(reactor)
        self.send = send
        self.reliable = reliable
        self.t1, self.t2 = t1, t2
        self.retransmissions = 0
        self.done: defer.Deferred = defer.Deferred()

    def start(self) -> "TwoXXRetransmitter":
        if not self.reliable:
            self._arm(self.t1)
        self.timers.start("timeout", 64 * self.t1, self._timeout)
        return self

    def _arm(self, interval: float) -> None:
        def fire():
            self.retransmissions += 1
            self.send()
            self._arm(min(2 * interval, self.t2))

        self.timers.start("retransmit", interval, fire)

    def _timeout(self) -> None:
        self.timers.stop_all()
        if not self.done.called:
            self.done.errback(Failure(TransactionTimeout("no ACK for 2xx")))

    def ack_received(self) -> None:
        self.timers.stop_all()
        if not self.done.called:
            self.done.callback(None)

    def stop(self) -> None:
        """Give up quietly (the call ended some other way)."""
        self.timers.stop_all()


__all__ = [
    "ServerTransaction", "InviteServerTransaction", "NonInviteServerTransaction", "TwoXXRetransmitter",
]
