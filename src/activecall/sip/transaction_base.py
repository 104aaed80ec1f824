"""What client and server transactions share (RFC 3261 §17): the timer constants, the
exceptions a transaction fails with, ``State``, ``Timers``, the matching keys of
§17.1.3/§17.2.3 and the base class ``Transaction``.

The layer (``transaction.py``) and both kinds of transaction
(``client_transaction.py``, ``server_transaction.py``) import this module; it imports
none of them, so there is no import cycle.
"""

from __future__ import annotations

import enum
from typing import Callable, Optional

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from activecall.sip.message import BRANCH_MAGIC, Request, Target

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



__all__ = [
    "T1", "T2", "T4", "State", "Timers", "TransactionTimeout", "TransportError", "Transaction",
    "client_key", "server_key",
]
