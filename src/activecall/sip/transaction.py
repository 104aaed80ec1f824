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
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from activecall.sip.client_transaction import (
    ClientTransaction,
    InviteClientTransaction,
    NonInviteClientTransaction,
    make_cancel,
)
from activecall.sip.message import (
    SIP_VERSION,
    Request,
    Response,
    SIPParseError,
    bad_request_reason,
    Target,
    generate_branch,
)
from activecall.sip.server_transaction import (
    InviteServerTransaction,
    NonInviteServerTransaction,
    ServerTransaction,
    TwoXXRetransmitter,
)
from activecall.sip.transaction_base import T1, T2, T4, State, Transaction, client_key, server_key

log = Logger(namespace="activecall.sip.transaction")


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


__all__ = ["ExpiryQueue", "TransactionUser", "TransactionLayer"]
