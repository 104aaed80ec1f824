"""The SIP user agent (RFC 3261 §8, §12–§15): request routing on top of the transaction layer.

``UserAgent`` is the transaction user: every new request, every ACK for a 2xx
and every stray response comes to it.  It answers what needs no call
(out-of-dialog OPTIONS, 481 for unknown dialogs), turns a new INVITE into an
``InboundCall`` (``uas.py``) handed to ``invite_handler``, places ``OutboundCall``s
(``uac.py``) and hands each in-dialog request to its call (``call.py``), whose
events are in ``call_events.py``.  Media is not here: SDP bodies go in and out as bytes.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional, Union

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from activecall.sip import session_timer
from activecall.sip.auth import DigestClient
from activecall.sip.call import ACCEPT, ALLOW, SUPPORTED, SipCall
from activecall.sip.call_events import IncomingMessage
from activecall.sip.dialog import Dialog, DialogId, DialogTable, response_dialog_id
from activecall.sip.message import (
    BRANCH_MAGIC,
    KNOWN_METHODS,
    URI,
    Address,
    Request,
    Response,
    SIPParseError,
    Target,
    bad_request_reason,
    generate_call_id,
    generate_tag,
    make_request,
    next_hop,
    parse_address,
    parse_uri,
)
from activecall.sip.policy import apply_rewrites, apply_trunk_rules, credentials_for
from activecall.sip.sdp_offer import SDP
from activecall.sip.server_transaction import InviteServerTransaction, ServerTransaction
from activecall.sip.transaction import ExpiryQueue, TransactionLayer, TransactionUser
from activecall.sip.uac import OutboundCall, end_fork
from activecall.sip.uas import InboundCall

log = Logger(namespace="activecall.sip.useragent")  # one namespace for the user agent and its calls

_ALLOWED = frozenset(m.strip() for m in ALLOW.split(","))
#: what a 405 to an out-of-dialog MESSAGE lists (MESSAGE works only in a call's dialog then)
ALLOW_OUTSIDE_DIALOG = ", ".join(m.strip() for m in ALLOW.split(",") if m.strip() != "MESSAGE")
#: Request-URI schemes we serve; any other is answered 416 (RFC 3261 §8.2.2.1)
URI_SCHEMES = ("sip", "sips", "tel")


def _unacceptable_invite(request: Request) -> Optional[tuple[int, list[tuple[str, str]]]]:
    """(status, headers) for a new INVITE we cannot take because of its body or Accept.

    RFC 3261 §8.2.3: a body we do not understand (not SDP, not multipart, not marked
    ``handling=optional``) → 415 with our Accept (RFC 4475 §3.3.6 invut). §21.4.7: an
    Accept that rules SDP out leaves us no answer or offer to send → 406 with a 399
    Warning (RFC 4475 §3.3.15 sdp01).
    """
    content_type = request.content_type
    disposition = (request.headers.get("Content-Disposition") or "").lower().replace(" ", "")
    if (request.body and content_type not in (None, SDP) and not content_type.startswith("multipart/")
            and "handling=optional" not in disposition):
        return 415, [("Accept", SDP)]
    accepts = request.headers.get_all("Accept")
    if accepts:
        kinds = {value.split(";")[0].strip().lower() for value in accepts}
        if not kinds & {SDP, "application/*", "*/*"}:
            return 406, [("Warning", '399 activecall "Accept excludes application/sdp"')]
    return None


def unsupported_requirements(request: Request) -> list[str]:
    """The option tags of ``Require`` we do not implement (``timer`` is the one we do), in order."""
    supported = {t.strip().lower() for t in SUPPORTED.split(",") if t.strip()}
    tags = []
    for value in request.headers.get_all("Require"):
        for tag in value.split(","):
            tag = tag.strip()
            if tag and tag.lower() not in supported and tag not in tags:
                tags.append(tag)
    return tags


class TransactionLayerService(service.Service):
    """Drops every transaction and its timers on shutdown: added after the transports, so it
    stops just before them, once calls have ended and accounts have unregistered."""

    name = "sip-transactions"

    def __init__(self, layer: TransactionLayer):
        self.layer = layer

    def stopService(self):
        super().stopService()
        self.layer.stop()


def reject_without_handler(call: InboundCall) -> None:
    """The default invite handler: 503, as the original does when no ``[handler]`` is configured."""
    call.reject(503, "No invite handler configured")


class _EndedInvite:
    """What an ended outbound call leaves for 64*T1, so 2xx responses to its INVITE that come
    late are still dealt with (RFC 3261 §13.2.2.4): its own dialog's 2xx again gets the ACK
    we sent (that ACK was lost), another fork's is ACKed and ended with a BYE."""

    __slots__ = ("invite", "transport", "remote_tag", "acks", "fork_acks")

    def __init__(self, call: "OutboundCall"):
        self.invite = call.invite
        self.transport = call.target.transport
        self.remote_tag = call.dialog.remote_tag if call.dialog is not None else None
        self.acks = call._acks
        self.fork_acks = call._fork_acks

    def late_2xx(self, ua, response: Response) -> None:
        if self.remote_tag is not None and response.to.tag == self.remote_tag:
            sent = self.acks.get(response.cseq.seq)
            if sent is not None:
                ua.layer.send_ack(*sent)
            return
        end_fork(ua, self.invite, self.transport, self.fork_acks, response)


class _EndedOrigin:
    """What ``UserAgent._new_invite`` needs of an ended inbound call: its INVITE's CSeq number
    and its final response."""

    __slots__ = ("cseq", "final_response")

    def __init__(self, cseq: int, final_response):
        self.cseq = cseq
        self.final_response = final_response


class UserAgent(service.Service, TransactionUser):
    """Routes SIP requests to calls and answers the rest; owns the transaction layer.

    ``invite_handler(call: InboundCall)`` decides each new inbound call (it
    may return a Deferred; a failure rejects the call with 503).  The daemon
    replaces it once sessions exist: ``service.user_agent.invite_handler = f``.
    """

    name = "sip-useragent"

    def __init__(self, config, transport, reactor: Optional[IReactorTime] = None,
                 invite_handler: Optional[Callable[[InboundCall], object]] = None,
                 layer: Optional[TransactionLayer] = None, shutdown_timeout: float = 5.0):
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.transport = transport
        self.reactor = reactor
        self.layer = layer or TransactionLayer(transport, self, reactor=reactor)
        self.layer.tu = self
        self.invite_handler = invite_handler or reject_without_handler
        #: ``admit(request)`` -> None or a refusal (``activecall.admission.Refusal``: ``retry_after``,
        #: ``text``) for a new INVITE (``"invite"``) or an out-of-dialog OPTIONS (``"options"``): a
        #: draining, full or overloaded daemon answers both 503 before any call exists
        self.admit: Callable[[str], Any] = lambda request: None
        #: ``message_handler(IncomingMessage) -> status or Deferred[status]`` answers out-of-dialog MESSAGEs
        #: (RFC 3428); None: 405, nobody here takes messages
        self.message_handler: Optional[Callable[[IncomingMessage], object]] = None
        self.shutdown_timeout = shutdown_timeout
        self.dialogs = DialogTable()
        self._owners: dict[DialogId, SipCall] = {}
        #: calls not yet ended (inbound and outbound)
        self.calls: list[SipCall] = []
        #: (Call-ID, From tag) -> inbound call (an ``_EndedOrigin`` once it has ended), to recognise
        #: INVITE retransmissions after the 2xx
        self._inbound_origins: dict[tuple, Any] = {}
        self._pending: dict[InviteServerTransaction, InboundCall] = {}
        #: ended calls' origins, forgotten 64*T1 after the call ends
        self._forget_later = ExpiryQueue(reactor, self._forget_origin)
        #: (Call-ID, From tag, CSeq) of an ended outbound call's INVITE -> ``_EndedInvite``, for 64*T1
        self._ended_invites: dict[tuple, _EndedInvite] = {}
        self._forget_invites_later = ExpiryQueue(reactor, self._forget_invite)

    # -- service --

    def stopService(self) -> defer.Deferred:
        """Hang up every call (BYE / CANCEL / 503) and wait for them, a bounded time.

        The transaction layer keeps running (unregistering still needs it);
        ``TransactionLayerService`` stops it just before the transports close.
        """
        super().stopService()
        waits = []
        for call in list(self.calls):
            try:
                if isinstance(call, InboundCall) and call.state in ("pending", "ringing"):
                    call.reject(503, "shutting down")
                elif call.state in ("confirmed", "answering", "calling", "ringing"):
                    call.hangup()
                waits.append(call.when_ended())
            except Exception:
                log.failure("hanging up {call!r} on shutdown", call=call)
        d = defer.gatherResults(waits, consumeErrors=True)
        d.addTimeout(self.shutdown_timeout, self.reactor)

        def finished(result):
            if isinstance(result, Failure):
                log.warn("calls did not end within {t}s of shutdown", t=self.shutdown_timeout)
            self._forget_later.clear()
            self._forget_invites_later.clear()

        return d.addBoth(finished)

    # -- helpers shared by calls --

    def common_headers(self) -> list[tuple[str, str]]:
        return [("User-Agent", self.config.useragent)]

    def capabilities(self) -> list[tuple[str, str]]:
        return [("Allow", ALLOW), ("Accept", ACCEPT), ("Supported", SUPPORTED)]

    def respond(self, txn: ServerTransaction, status: int, reason: Optional[str] = None,
                headers: Iterable[tuple[str, str]] = (), body: bytes = b"", to_tag: Optional[str] = None) -> Response:
        """``txn.respond`` with our Server header."""
        return txn.respond(status, reason, headers=list(headers) + [("Server", self.config.useragent)],
                           body=body, to_tag=to_tag)

    def _add_dialog(self, dialog: Dialog, call: SipCall) -> None:
        self.dialogs.add(dialog)
        self._owners[dialog.id] = call

    def _forget_dialog(self, dialog: Dialog) -> None:
        self.dialogs.remove(dialog)
        if dialog.id in self._owners:
            del self._owners[dialog.id]

    def _call_ended(self, call: SipCall) -> None:
        if call in self.calls:
            self.calls.remove(call)
        if call.dialog is not None:
            self._forget_dialog(call.dialog)
        if isinstance(call, InboundCall):
            self._pending.pop(call.txn, None)
            key = (call.call_id, call.dialog.remote_tag)
            if self._inbound_origins.get(key) is call:
                # remembered a little longer, so a late INVITE retransmission is still recognised:
                # only what that needs, not the call (which would keep its session, leg and
                # codecs alive for 32 s: at 300 calls/s, 10 000 calls for every full GC to scan)
                self._inbound_origins[key] = _EndedOrigin(call.invite.cseq.seq, call.final_response)
                self._forget_later.add(64 * self.layer.t1, key)
        elif isinstance(call, OutboundCall):
            key = (call.call_id, call.invite.from_.tag, call.invite.cseq.seq)
            if key not in self._ended_invites:
                self._ended_invites[key] = _EndedInvite(call)
                self._forget_invites_later.add(64 * self.layer.t1, key)

    def _forget_invite(self, key: tuple) -> None:
        self._ended_invites.pop(key, None)

    def _forget_origin(self, key: tuple) -> None:
        if isinstance(self._inbound_origins.get(key), _EndedOrigin):
            del self._inbound_origins[key]

    def call_for_dialog(self, dialog_id: str) -> Optional[SipCall]:
        """The live call whose public dialog id is ``dialog_id``."""
        for call in self.calls:
            if call.dialog_id == dialog_id:
                return call
        return None

    # -- TransactionUser --

    def request_received(self, request: Request, txn: ServerTransaction) -> None:
        # RFC 3261 §8.2 in its order: method (§8.2.1), Request-URI (§8.2.2.1), Require (§8.2.2.3)
        if request.method not in _ALLOWED:
            if request.method in KNOWN_METHODS:
                self.respond(txn, 405, headers=[("Allow", ALLOW)])  # REGISTER, SUBSCRIBE, PUBLISH
            else:
                self.respond(txn, 501, headers=[("Allow", ALLOW)])  # RFC 3261 §21.5.2
            return
        if request.uri.scheme not in URI_SCHEMES:
            self.respond(txn, 416)  # RFC 4475 §3.3.2, §3.3.3
            return
        unsupported = unsupported_requirements(request)
        if unsupported:  # RFC 3261 §8.2.2.3 (CANCEL and ACK never reach here)
            self.respond(txn, 420, headers=[("Unsupported", ", ".join(unsupported))])
            return
        if request.to.tag:
            self._in_dialog(request, txn)
            return
        method = request.method
        if method == "INVITE":
            self._new_invite(request, txn)
        elif method == "OPTIONS":
            # the original dropped these; PBXs use them as keep-alives, proxies (kamailio's
            # dispatcher) as the probe that tells them whether to send this node calls
            refusal = self.admit("options")
            if refusal is not None:
                self._refuse(txn, refusal)
            else:
                self.respond(txn, 200, headers=self.capabilities())
        elif method == "NOTIFY":
            self.respond(txn, 200)  # e.g. Asterisk's out-of-dialog keep-alive NOTIFY
        elif method == "MESSAGE":
            self._message(request, txn)
        else:  # BYE, INFO, UPDATE, PRACK, REFER outside any dialog
            self.respond(txn, 481)

    def _message(self, request: Request, txn: ServerTransaction) -> None:
        """An out-of-dialog MESSAGE: ``message_handler`` decides the status (RFC 3428 §7: 200 delivered,
        202 accepted for later); without one, 405 (the original answered 200 and dropped it)."""
        handler = self.message_handler
        if handler is None:
            self.respond(txn, 405, "No Message Handler", headers=[("Allow", ALLOW_OUTSIDE_DIALOG)])
            return
        message = IncomingMessage(
            from_uri=str(request.from_.uri), to_uri=str(request.to.uri), call_id=request.call_id,
            body=request.body or b"", content_type=request.headers.get("Content-Type") or "text/plain",
            headers=tuple(request.headers))
        d = defer.maybeDeferred(handler, message)

        def failed(failure):
            log.failure("the MESSAGE handler failed", failure)
            return 500

        def answer(status):
            status = int(status or 200)
            headers = [("Allow", ALLOW_OUTSIDE_DIALOG)] if status == 405 else []
            self.respond(txn, status, "No Message Handler" if status == 405 else None, headers=headers)

        d.addErrback(failed)
        d.addCallback(answer)

    def _in_dialog(self, request: Request, txn: ServerTransaction) -> None:
        dialog = self.dialogs.for_request(request)
        call = self._owners.get(dialog.id) if dialog is not None else None
        if call is None or call.is_ended:
            self.respond(txn, 481)
            return
        if not dialog.accept_remote_cseq(request):
            self.respond(txn, 500, "CSeq Out Of Order")
            return
        call._in_dialog_request(request, txn)

    def _new_invite(self, request: Request, txn: InviteServerTransaction) -> None:
        origin = (request.call_id, request.from_.tag)
        known = self._inbound_origins.get(origin)
        known_cseq = None if known is None else (
            known.cseq if isinstance(known, _EndedOrigin) else known.invite.cseq.seq)
        if known is not None and known_cseq == request.cseq.seq:
            if known.final_response is not None and known.final_response.status < 300:
                # the INVITE again after our 2xx (its transaction is gone): the same 2xx again
                txn.send_response(known.final_response)
            else:
                self.respond(txn, 482)  # a merged request (RFC 3261 §8.2.2.2)
            return
        if not request.contacts and (request.top_via.branch or "").startswith(BRANCH_MAGIC):
            # RFC 3261 §8.1.1.8; an RFC 2543 INVITE (no magic cookie) may lack it: its From
            # is the remote target then (RFC 4475 §3.4.1)
            self.respond(txn, 400, "Missing Contact")
            return
        refusal = _unacceptable_invite(request)
        if refusal is not None:
            self.respond(txn, refusal[0], headers=refusal[1])
            return
        refused = self.admit("invite")  # draining, full or overloaded: before any call state exists
        if refused is not None:
            self._refuse(txn, refused)
            return
        try:
            terms = session_timer.negotiate_as_uas(request)
            call = InboundCall(self, request, txn)
        except session_timer.IntervalTooSmall as e:
            self.respond(txn, 422, headers=[("Min-SE", str(e.min_se))])
            return
        except SIPParseError as e:
            self.respond(txn, 400, bad_request_reason(e.reason))
            return
        call.timer_terms = terms
        self.calls.append(call)
        self._add_dialog(call.dialog, call)
        self._inbound_origins[origin] = call
        self._pending[txn] = call
        log.debug("inbound call {id} from {caller} to {callee}", id=call.dialog_id, caller=call.caller,
                  callee=call.callee)
        try:
            result = self.invite_handler(call)
        except Exception as e:
            log.failure("invite handler failed")
            self._handler_failed(call, e)
            return
        if isinstance(result, defer.Deferred):
            result.addErrback(lambda f: (log.failure("invite handler failed", f),
                                         self._handler_failed(call, f.value)))

    def _refuse(self, txn: ServerTransaction, refusal) -> None:
        """503 with ``Retry-After`` (RFC 3261 §21.5.4): a proxy tries the next node."""
        self.respond(txn, 503, refusal.text, headers=[("Retry-After", str(refusal.retry_after))])

    def _handler_failed(self, call: InboundCall, error: Exception) -> None:
        if call.state in ("pending", "ringing"):
            call.reject(503, f"Failed to process invite: {error}")

    def ack_received(self, ack: Request, source: Target) -> None:
        dialog = self.dialogs.for_request(ack)
        call = self._owners.get(dialog.id) if dialog is not None else None
        if call is not None:
            call._ack_received(ack)

    def stray_response(self, response: Response, source: Target) -> None:
        try:
            if response.cseq.method != "INVITE" or not 200 <= response.status < 300:
                return
            call = self._owners.get(response_dialog_id(response))
            if call is None:
                forked = self._outbound_call_for(response)
                if forked is not None:
                    forked._forked_2xx(response)
                    return
                ended = self._ended_invites.get((response.call_id, response.from_.tag, response.cseq.seq))
                if ended is not None:  # the call is over; its INVITE's 2xx still needs an ACK
                    ended.late_2xx(self, response)
                return
        except SIPParseError:
            return
        call._retransmitted_2xx(response)

    def _outbound_call_for(self, response: Response) -> Optional["OutboundCall"]:
        """The live call whose INVITE ``response`` answers, whatever dialog it is in (a fork's 2xx)."""
        call_id, from_tag = response.call_id, response.from_.tag
        for call in self.calls:
            if (isinstance(call, OutboundCall) and call.call_id == call_id
                    and call.invite.from_.tag == from_tag and call.invite.cseq.seq == response.cseq.seq):
                return call
        return None

    def cancel_received(self, cancel: Request, invite: InviteServerTransaction) -> None:
        call = self._pending.get(invite)
        if call is not None:
            call._cancelled()

    def server_transaction_failed(self, transaction: ServerTransaction, error: Exception) -> None:
        log.info("{txn} failed: {error}", txn=transaction, error=error)

    # -- outbound --

    def place_call(self, target_uri: str, sdp_offer: bytes, caller: Optional[str] = None,
                   headers: Union[Mapping[str, str], Iterable[tuple[str, str]]] = (),
                   credentials=None, call_id: Optional[str] = None) -> OutboundCall:
        """INVITE ``target_uri`` (after ``[[rewrites]]``) and return the call at once.

        ``credentials`` (anything with ``username``/``password``/``realm``)
        default to the matching ``[[register_users]]`` entry's.  Raises
        ``SIPParseError`` for a target that is no SIP URI.
        """
        rewritten = apply_rewrites(target_uri, self.config.rewrites)
        if rewritten != target_uri:
            log.info("rewrote call target {old} to {new}", old=target_uri, new=rewritten)
        uri = parse_uri(rewritten)
        target = next_hop(Request("INVITE", uri))
        if credentials is None:
            credentials = credentials_for(uri, self.config.register_users)
        digest = None
        if credentials is not None and credentials.password:
            digest = DigestClient(credentials.username, credentials.password, getattr(credentials, "realm", None))
        if caller:
            from_uri = parse_address(caller).uri
        elif credentials is not None and credentials.username:
            from_uri = URI("sip", credentials.username, uri.host, uri.port)
        else:
            from_uri = URI("sip", "activecall", self.transport.advertised_host)
        extra = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
        if not any(name.lower() in ("session-expires", "x") for name, _ in extra):
            extra = session_timer.request_headers() + extra  # RFC 4028: we offer to refresh
        contact = Address(parse_uri(self.transport.contact_uri(from_uri.user, target.transport)))
        invite = make_request(
            "INVITE", uri, via=self.transport.local_via(target.transport),
            from_=Address(from_uri, params={"tag": generate_tag()}), to=Address(uri.copy()),
            call_id=call_id or generate_call_id(), cseq=1, contact=contact,
            headers=self.common_headers() + self.capabilities() + extra,
            body=sdp_offer, content_type=SDP if sdp_offer else None,
        )
        apply_trunk_rules(invite, getattr(self.config, "trunk_rules", ()))
        call = OutboundCall(self, invite, target, digest)
        self.calls.append(call)
        return call.start()


__all__ = [
    "UserAgent", "TransactionLayerService", "reject_without_handler", "unsupported_requirements",
]
