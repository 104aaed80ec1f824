"""SIP transactions (RFC 3261 §17, with the RFC 6026 Accepted state).

A transaction owns retransmission and timeouts for one request and its
responses.  Every timer runs on an injected ``IReactorTime`` so tests drive
them with ``task.Clock``.  ``TransactionLayer`` sits between the transport
(which hands it every parsed message) and the transaction user (TU: dialogs,
registration, the user agent), which sees only what is new:

* new requests, each with its server transaction to answer on;
* ACKs for 2xx and responses no client transaction consumes (2xx
  retransmissions, forked 2xx), because those belong to dialogs;
* for requests it sends: a Deferred for the final response plus a callback
  for provisional responses.

The transport object given to the layer needs two methods, both returning
``None`` or a Deferred that fails when the message could not be sent:
``send_request(request, target)`` and ``send_response(response, source)``.
It may also offer ``local_via(transport) -> Via`` used to stamp our Via on
requests the TU sends without one.
"""

from __future__ import annotations

import collections
import enum
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from activecall.sip.message import (
    BRANCH_MAGIC,
    SIP_VERSION,
    Headers,
    Request,
    Response,
    SIPParseError,
    bad_request_reason,
    Target,
    generate_branch,
    generate_tag,
    make_response,
)

log = Logger(namespace="activecall.sip.transaction")

T1 = 0.5
T2 = 4.0
T4 = 5.0


class TransactionTimeout(Exception):
    """No final response in time (Timer B / F): the TU treats it as a 408."""


class TransportError(Exception):
    """The request could not be sent (RFC 3261 §8.1.3.1: treat as a 503)."""


class State(enum.Enum):
    CALLING = "calling"
    TRYING = "trying"
    PROCEEDING = "proceeding"
    ACCEPTED = "accepted"
    COMPLETED = "completed"
    CONFIRMED = "confirmed"
    TERMINATED = "terminated"


class Timers:
    """Named one-shot timers on an injected reactor."""

    def __init__(self, reactor: IReactorTime):
        self.reactor = reactor
        self._calls: dict[str, IDelayedCall] = {}

    def start(self, name: str, delay: float, fn: Callable[[], None]) -> None:
        self.stop(name)

        def fire():
            self._calls.pop(name, None)
            fn()

        self._calls[name] = self.reactor.callLater(delay, fire)

    def stop(self, name: str) -> None:
        call = self._calls.pop(name, None)
        if call is not None and call.active():
            call.cancel()

    def stop_all(self) -> None:
        for name in list(self._calls):
            self.stop(name)

    def __contains__(self, name: str) -> bool:
        return name in self._calls


class ExpiryQueue:
    """Many long timers of the same length in one DelayedCall.

    A transaction lingers 64*T1 (32 s) after its final response to absorb retransmissions;
    at 300 calls/s a DelayedCall (with its bound methods and closure) per lingering
    transaction kept ~10 000 of each alive, for every full garbage collection to scan.  Here
    an entry is one small list in a deque: entries expire in the order they were added,
    which is their deadline order because every entry of a queue has the same delay (were
    the clock to step back, an entry expires with the one before it, a little late).
    """

    def __init__(self, reactor: IReactorTime, on_expired: Callable[[Any], None]):
        self.reactor = reactor
        self.on_expired = on_expired
        self._entries: collections.deque = collections.deque()
        self._call: Optional[IDelayedCall] = None

    def add(self, delay: float, item) -> list:
        """``on_expired(item)`` in ``delay`` seconds; returns the handle for ``cancel``."""
        deadline = self.reactor.seconds() + delay
        if self._entries and deadline < self._entries[-1][0]:
            deadline = self._entries[-1][0]
        entry = [deadline, item]
        self._entries.append(entry)
        if self._call is None:
            self._schedule()
        return entry

    def cancel(self, entry: list) -> None:
        entry[1] = None
        if self._entries and self._entries[0] is entry:
            # the DelayedCall moves to the next live entry (none left: no DelayedCall pending)
            if self._call is not None and self._call.active():
                self._call.cancel()
            self._schedule()

    def clear(self) -> None:
        for entry in self._entries:
            entry[1] = None
        self._entries.clear()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def __len__(self) -> int:
        return sum(1 for entry in self._entries if entry[1] is not None)

    def _schedule(self) -> None:
        entries = self._entries
        while entries and entries[0][1] is None:
            entries.popleft()
        if not entries:
            self._call = None
            return
        self._call = self.reactor.callLater(max(0.0, entries[0][0] - self.reactor.seconds()), self._fire)

    def _fire(self) -> None:
        self._call = None
        now = self.reactor.seconds() + 1e-9  # the DelayedCall's time may round just below a deadline
        entries = self._entries
        while entries and entries[0][0] <= now:
            entry = entries.popleft()
            item, entry[1] = entry[1], None
            if item is not None:
                try:
                    self.on_expired(item)
                except Exception:
                    log.failure("an expiring timer failed")
        if self._call is None:  # on_expired may have cancelled the head, which reschedules
            self._schedule()


# -- keys (RFC 3261 §17.1.3, §17.2.3) -----------------------------------------------


def client_key(msg) -> tuple:
    """A response (or our request) -> (branch, CSeq method)."""
    return (msg.top_via.branch or "", msg.cseq.method)


def server_key(request: Request) -> tuple:
    """A request -> (branch, sent-by host, sent-by port, method); ACK matches INVITE.

    Requests without the magic cookie (RFC 2543 peers) fall back to Call-ID,
    From-tag, CSeq number and the whole top Via.
    """
    via = request.top_via
    method = "INVITE" if request.method == "ACK" else request.method
    branch = via.branch or ""
    if branch.startswith(BRANCH_MAGIC):
        host, port = via.sent_by
        return (branch, host, port, method)
    return ("rfc2543", request.call_id, request.from_.tag, request.cseq.seq, str(via), method)


# -- base -----------------------------------------------------------------------------


class Transaction:
    """What client and server transactions share: state, timers, the layer."""

    def __init__(self, layer: "TransactionLayer", request: Request, target: Target):
        self.layer = layer
        self.request: Optional[Request] = request
        self.method = request.method
        self.target = target
        self.timers = Timers(layer.reactor)
        self.state: Optional[State] = None
        self._terminated: Optional[defer.Deferred] = None
        self._lingering = None  # this transaction's entry in the layer's expiry queue, once it lingers

    @property
    def terminated(self) -> defer.Deferred:
        """Fires (with None) when the transaction ends, for whatever reason."""
        if self._terminated is None:
            self._terminated = defer.Deferred()
            if self.state is State.TERMINATED:
                self._terminated.callback(None)
        return self._terminated

    @property
    def reliable(self) -> bool:
        return self.target.reliable

    def _linger(self) -> None:
        """Terminate in 64*T1 (timers J and L), on the layer's shared expiry queue.

        The request is no longer needed (a lingering server transaction only absorbs
        retransmissions and resends its last response): dropped, so that ~10 000 lingering
        transactions do not keep ~10 000 parsed requests for the garbage collector to scan."""
        self._lingering = self.layer._lingering.add(64 * self.layer.t1, self)
        self.request = None

    def _terminate(self) -> None:
        if self.state is State.TERMINATED:
            return
        self.state = State.TERMINATED
        self.timers.stop_all()
        lingering = self._lingering
        if lingering is not None:
            self.layer._lingering.cancel(lingering)
            self._lingering = None
        self.layer._forget(self)
        if self._terminated is not None:
            self._terminated.callback(None)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.method} {self.key[0]} {self.state and self.state.value}>"


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


# -- the transaction user and the layer ------------------------------------------------------


class TransactionUser:
    """What the layer calls upwards.  Subclass and override; defaults log and answer."""

    def request_received(self, request: Request, transaction: ServerTransaction) -> None:
        """A new request (not a retransmission, not an ACK, not a CANCEL)."""
        log.info("no TU for {method}: 501", method=request.method)
        transaction.respond(501)

    def ack_received(self, ack: Request, source: Target) -> None:
        """An ACK matching no server transaction: the ACK for a 2xx (its dialog's)."""

    def stray_response(self, response: Response, source: Target) -> None:
        """A response no client transaction consumes (2xx retransmission, forked 2xx)."""
        log.debug("stray response {status} dropped", status=response.status)

    def cancel_received(self, cancel: Request, invite: InviteServerTransaction) -> None:
        """A CANCEL for a pending INVITE (already answered 200).  The layer sends 487
        to the INVITE after this returns unless the TU sent a final response itself."""

    def server_transaction_failed(self, transaction: ServerTransaction, error: Exception) -> None:
        """Timer H fired (no ACK for a non-2xx) or a response could not be sent."""
        log.info("{txn} failed: {error}", txn=transaction, error=error)


class TransactionLayer:
    """Matches messages to transactions, creates new ones, reports the rest to the TU."""

    def __init__(self, transport, tu: Optional[TransactionUser] = None,
                 reactor: Optional[IReactorTime] = None, t1: float = T1, t2: float = T2,
                 t4: float = T4, auto_trying: bool = True):
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.transport = transport
        self.tu = tu or TransactionUser()
        self.reactor = reactor
        self.t1, self.t2, self.t4 = t1, t2, t4
        #: send 100 Trying as soon as an INVITE arrives (RFC 3261 §17.2.1)
        self.auto_trying = auto_trying
        self.client_transactions: dict[tuple, ClientTransaction] = {}
        self.server_transactions: dict[tuple, ServerTransaction] = {}
        #: server transactions in their last 64*T1 (timers J and L)
        self._lingering = ExpiryQueue(reactor, Transaction._terminate)

    # -- sending (the TU's entry points) --

    def send_request(self, request: Request, target: Target,
                     on_provisional: Optional[Callable[[Response], None]] = None) -> ClientTransaction:
        """Start a client transaction; see ``ClientTransaction.final``.

        A request without Via gets ours (``transport.local_via``); a Via
        without branch gets a fresh one.  ACK is not a transaction: use
        ``send_ack``.
        """
        if request.method == "ACK":
            raise ValueError("ACK is not sent in a transaction; use send_ack")
        self._ensure_via(request, target)
        cls = InviteClientTransaction if request.method == "INVITE" else NonInviteClientTransaction
        txn = cls(self, request, target, on_provisional)
        if txn.key in self.client_transactions:
            raise ValueError(f"a transaction with branch {txn.key[0]} already exists")
        self.client_transactions[txn.key] = txn
        txn.start()
        return txn

    def send_ack(self, ack: Request, target: Target) -> None:
        """Send an ACK for a 2xx (a transaction of its own, never retransmitted)."""
        self._ensure_via(ack, target)
        self._send_request(None, ack, target)

    def cancel(self, invite: InviteClientTransaction) -> defer.Deferred:
        """CANCEL a pending INVITE (RFC 3261 §9.1).

        Fires with the CANCEL's final response, or with None when there is
        nothing to cancel any more (the INVITE already has a final response).
        The CANCEL waits for the first provisional response if none came yet.
        """
        result: defer.Deferred = defer.Deferred()
        if invite.state not in (State.CALLING, State.PROCEEDING):
            result.callback(None)
            return result

        sent = []

        def send_cancel():
            sent.append(True)
            txn = self.send_request(make_cancel(invite.request), invite.target)
            txn.final.chainDeferred(result)

        def invite_ended(outcome):
            if not sent and not result.called:
                result.callback(None)  # final response before any provisional: nothing to cancel
            return outcome

        if invite.provisional_seen:
            send_cancel()
        else:
            invite._pending_cancel = send_cancel
            invite.final.addBoth(invite_ended)
        return result

    def retransmit_2xx(self, transaction: InviteServerTransaction, response: Response) -> TwoXXRetransmitter:
        """Keep resending ``response`` (already sent once) until the TU reports the ACK."""
        return TwoXXRetransmitter(
            self.reactor, lambda: self._send_response(None, response, transaction.source), transaction.reliable,
            self.t1, self.t2,
        ).start()

    # -- receiving (the transport's entry point) --

    def message_received(self, msg, source_addr: tuple, transport: str = "UDP") -> None:
        """Every parsed message from the transport comes in here."""
        source = Target(source_addr[0], source_addr[1], transport.upper())
        try:
            if isinstance(msg, Response):
                self._response_received(msg, source)
            else:
                self._request_received(msg, source)
        except SIPParseError as e:
            report = getattr(self.transport, "report_malformed", None)
            if report is not None:  # counted and logged rate-limited (sip/transport.py)
                report("invalid", source_addr, transport, e.reason)
            else:
                log.info("dropping message from {source}: {reason}", source=source, reason=e.reason)

    def _response_received(self, response: Response, source: Target) -> None:
        if len(response.headers.get_all("Via")) != 1:
            # RFC 3261 §8.1.3.3: a UAC discards a response with more than one Via (RFC 4475 §3.3.10)
            log.info("dropping {status} from {source}: {n} Vias", status=response.status, source=source,
                     n=len(response.headers.get_all("Via")))
            return
        txn = self.client_transactions.get(client_key(response))
        if txn is None:
            self.tu.stray_response(response, source)
        else:
            txn.receive_response(response)

    def _request_received(self, request: Request, source: Target) -> None:
        key = server_key(request)
        txn = self.server_transactions.get(key)
        if txn is not None:
            txn.receive_request(request)  # a retransmission, or the ACK for a non-2xx
            return
        if request.method == "ACK":
            if request.version == SIP_VERSION:
                self.tu.ack_received(request, source)
            return  # an ACK is never answered
        cls = InviteServerTransaction if request.method == "INVITE" else NonInviteServerTransaction
        txn = cls(self, request, source)
        self.server_transactions[key] = txn
        txn.start()
        if request.version != SIP_VERSION:
            txn.respond(505)  # RFC 3261 §8.2 / RFC 4475 §3.1.2.16
            return
        if request.method == "CANCEL":
            self._cancel_received(request, txn)
            return
        if request.method == "INVITE" and self.auto_trying:
            txn.respond(100)
        try:
            self.tu.request_received(request, txn)
        except SIPParseError as e:
            # a header the parser does not check (Refer-To, Session-Expires, ...) read by the TU:
            # the request is malformed, answered 400 with a short reason; not logged
            # per request, the transport's rate-limited log is for what cannot be parsed at all
            if not txn.final_sent:
                txn.respond(400, bad_request_reason(e.reason))
        except Exception:
            log.failure("TU failed on {method}", method=request.method)
            if not txn.final_sent:
                txn.respond(500)

    def find_invite_for_cancel(self, cancel: Request) -> Optional[InviteServerTransaction]:
        """The INVITE server transaction a CANCEL refers to (RFC 3261 §9.2)."""
        key = server_key(cancel)
        txn = self.server_transactions.get(key[:-1] + ("INVITE",))
        return txn if isinstance(txn, InviteServerTransaction) else None

    def _cancel_received(self, cancel: Request, txn: ServerTransaction) -> None:
        invite = self.find_invite_for_cancel(cancel)
        if invite is None:
            # a CANCEL for a non-INVITE we know has no effect but is answered 200 (RFC 3261 §9.2)
            key = server_key(cancel)[:-1]
            known = any(k[:-1] == key and k[-1] not in ("CANCEL", "INVITE") and t is not txn
                        for k, t in self.server_transactions.items())
            txn.respond(200 if known else 481)
            return
        txn.respond(200, to_tag=invite.to_tag)
        if invite.state is not State.PROCEEDING:
            return  # already answered: the CANCEL has no effect
        try:
            self.tu.cancel_received(cancel, invite)
        except Exception:
            log.failure("TU failed on CANCEL")
        if invite.state is State.PROCEEDING:
            invite.respond(487)

    def stop(self) -> None:
        """Drop every transaction and its timers (daemon shutdown, tests).

        Pending client transactions fail with ``CancelledError``.
        """
        for table in (self.client_transactions, self.server_transactions):
            for txn in list(table.values()):
                if isinstance(txn, ClientTransaction) and not txn.final.called:
                    txn._fail(defer.CancelledError("transaction layer stopped"))
                txn._terminate()
        self._lingering.clear()

    # -- internals --

    def _ensure_via(self, request: Request, target: Target) -> None:
        if "Via" not in request.headers:
            via = self.transport.local_via(target.transport)
            request.headers.prepend("Via", str(via))
        via = request.top_via
        if not via.branch:
            via.params["branch"] = generate_branch()
            request.headers.remove_first("Via")
            request.headers.prepend("Via", str(via))

    def _send_request(self, txn: Optional[ClientTransaction], request: Request, target: Target) -> None:
        self._guard(txn, lambda: self.transport.send_request(request, target))

    def _send_response(self, txn: Optional[ServerTransaction], response: Response, source: Target) -> None:
        self._guard(txn, lambda: self.transport.send_response(response, source))

    def _guard(self, txn: Optional[Transaction], send: Callable[[], object]) -> None:
        """Send, routing a synchronous or asynchronous failure to the transaction."""

        def failed(failure: Failure):
            if txn is not None:
                txn.transport_error(failure)
            else:
                log.info("send failed: {err}", err=failure.getErrorMessage())

        try:
            result = send()
        except Exception:
            failed(Failure())
            return
        if isinstance(result, defer.Deferred):
            result.addErrback(failed)

    def _forget(self, txn: Transaction) -> None:
        table = self.client_transactions if isinstance(txn, ClientTransaction) else self.server_transactions
        if table.get(txn.key) is txn:
            del table[txn.key]


__all__ = [
    "T1", "T2", "T4", "State", "Timers", "ExpiryQueue", "TransactionTimeout", "TransportError",
    "ClientTransaction", "InviteClientTransaction", "NonInviteClientTransaction",
    "ServerTransaction", "InviteServerTransaction", "NonInviteServerTransaction",
    "TwoXXRetransmitter", "TransactionUser", "TransactionLayer", "client_key", "server_key",
    "make_ack_for_non_2xx", "make_cancel",
]
