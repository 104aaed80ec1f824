"""What inbound and outbound SIP calls share (RFC 3261 §12–§15, one dialog each): ``SipCall``.

A call is a small state machine around its dialog: it sends BYE / re-INVITE / REFER / INFO and
answers what the peer sends in the dialog (BYE, re-INVITE and UPDATE offers with hold detection,
INFO DTMF, PRACK, OPTIONS, REFER and its NOTIFYs), reporting it as events (``call_events.py``) to its
listeners.  It runs the dialog's session timer (RFC 4028) and blind transfers both ways (RFC 3515:
``transfer()`` sends REFER, ``IncomingRefer`` answers one).  ``ALLOW`` / ``ACCEPT`` / ``SUPPORTED`` say
what calls handle.  Each side's INVITE is in ``uas.py`` (``InboundCall``) and ``uac.py`` (``OutboundCall``).
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Optional

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from activecall.sip import sdp
from activecall.sip import session_timer
from activecall.sip.auth import DigestClient
from activecall.sip.call_events import (
    CallEvent,
    CallFailed,
    CallStateError,
    Ended,
    HoldChanged,
    MessageReceived,
    SdpUpdated,
    TransferProgress,
    TransferRequested,
    parse_dtmf_info,
    parse_sipfrag,
)
from activecall.sip.dialog import Dialog, DialogState
from activecall.sip.message import (
    Address,
    Request,
    Response,
    SIPParseError,
    Target,
    bad_request_reason,
    next_attempt,
    parse_address,
    parse_uri,
    quote,
)
from activecall.sip.policy import apply_trunk_rules
from activecall.sip.sdp_offer import SDP, mirror_direction, sdp_direction, with_direction
from activecall.sip.server_transaction import InviteServerTransaction, ServerTransaction
from activecall.sip.transaction_base import TransactionTimeout, TransportError

log = Logger(namespace="activecall.sip.useragent")  # one namespace for the user agent and its calls

ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE, REFER, NOTIFY, MESSAGE, PRACK"
ACCEPT = "application/sdp, application/dtmf-relay, message/sipfrag"
#: option tags we implement: session timers (RFC 4028) and reliable provisional responses (RFC 3262);
#: not replaces
SUPPORTED = "timer, 100rel"


def reason_header(code: int, text: Optional[str]) -> Optional[str]:
    """RFC 3326 ``Reason`` value; text that already is one (``SIP;cause=…``, ``Q.850;…``) is kept."""
    if not text:
        return None
    if re.match(r"\s*(SIP|Q\.850)\s*;", text, re.IGNORECASE):
        return text
    clean = "".join(ch for ch in text if ch.isprintable())
    return f"SIP;cause={code};text={quote(clean)}"


class SipCall:
    """What inbound and outbound calls share: the dialog, events, in-dialog requests."""

    direction = "?"

    def __init__(self, ua: "UserAgent"):
        self.ua = ua
        self.dialog: Optional[Dialog] = None
        self.state = "new"
        self.events: list = []
        self._listeners: list[Callable[[CallEvent], None]] = []
        self._ended_waiters: list[defer.Deferred] = []
        self.end: Optional[Ended] = None
        self.local_sdp = b""
        self.remote_sdp = b""
        self.on_hold = False
        #: called with a new offer (re-INVITE / UPDATE) and returns our answer; default: mirror the direction
        self.offer_answerer: Optional[Callable[[bytes], bytes]] = None
        self.digest: Optional[DigestClient] = None
        self._reinvite_2xx = None  # (cseq, TwoXXRetransmitter) for a re-INVITE we answered
        self._acks: dict[int, tuple[Request, Target]] = {}  # ACKs we sent, by CSeq: resent on 2xx retransmission
        self._outgoing_invite = False
        self._transfer: Optional[defer.Deferred] = None
        #: RFC 4028: the dialog's session timer once one is negotiated
        self.session_timer: Optional[session_timer.SessionTimer] = None

    # -- identity --

    @property
    def dialog_id(self) -> Optional[str]:
        """``<Call-ID>-<our tag>-<their tag>`` once the dialog exists."""
        return str(self.dialog.id) if self.dialog is not None else None

    @property
    def call_id(self) -> str:
        raise NotImplementedError

    # -- events --

    def add_listener(self, listener: Callable[[CallEvent], None]) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[CallEvent], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _emit(self, event) -> None:
        self.events.append(event)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.failure("call listener failed on {event!r}", event=event)

    def when_ended(self) -> defer.Deferred:
        """Fires with the ``Ended`` event (never fails)."""
        if self.end is not None:
            return defer.succeed(self.end)
        d: defer.Deferred = defer.Deferred()
        self._ended_waiters.append(d)
        return d

    @property
    def is_ended(self) -> bool:
        return self.end is not None

    def _end(self, reason: str, status: Optional[int] = None, by: str = "local", detail: str = "") -> None:
        if self.end is not None:
            return
        self.state = "ended"
        self.end = Ended(reason, status, by, detail)
        if self.session_timer is not None:
            self.session_timer.cancel()
        if self.dialog is not None:
            self.dialog.state = DialogState.TERMINATED
        if self._reinvite_2xx is not None:
            self._reinvite_2xx[1].stop()
        if self._transfer is not None and not self._transfer.called:
            self._transfer.errback(Failure(CallFailed(481, "call ended during the transfer")))
        self.ua._call_ended(self)
        log.debug("{direction} call {id} ended: {reason}{status} by {by}{detail}", direction=self.direction,
                   id=self.dialog_id or self.call_id, reason=reason, status=f" ({status})" if status else "",
                  by=by, detail=f": {detail}" if detail else "")
        self._emit(self.end)
        waiters, self._ended_waiters = self._ended_waiters, []
        for d in waiters:
            d.callback(self.end)

    # -- requests we send in the dialog --

    def send_request(self, method: str, headers: Iterable[tuple[str, str]] = (), body: bytes = b"",
                     content_type: Optional[str] = None) -> defer.Deferred:
        """Send an in-dialog request; fires with its final response (digest answered once).

        Fails with ``CallFailed`` (408 on timeout, 503 when unsendable).
        """
        if self.dialog is None:
            return defer.fail(CallStateError(f"{method}: no dialog yet"))
        request = self.dialog.create_request(method, headers=list(self.ua.common_headers()) + list(headers),
                                             body=body, content_type=content_type)
        if method == "REFER":
            apply_trunk_rules(request, getattr(self.ua.config, "trunk_rules", ()))
        return self._send_in_dialog(request)

    def _send_in_dialog(self, request: Request, retried: bool = False) -> defer.Deferred:
        txn = self.ua.layer.send_request(request, self.dialog.target_for(request))

        def got(response: Response):
            if response.status in (401, 407) and not retried and self.digest is not None:
                retry = next_attempt(request)
                retry.headers.set("CSeq", f"{self.dialog.next_cseq()} {request.method}")
                if self.digest.authorize(retry, response):
                    return self._send_in_dialog(retry, retried=True)
            if 200 <= response.status < 300 and self.digest is not None:
                self.digest.accepted()
            return response

        return txn.final.addCallbacks(got, _as_call_failed)

    def hangup(self, headers: Iterable[tuple[str, str]] = ()) -> defer.Deferred:
        """End the call: BYE (with ``headers``) when confirmed.  Fires with ``Ended``."""
        if self.end is not None:
            return self.when_ended()
        if self.dialog is None or self.state not in ("confirmed", "answering"):
            raise CallStateError(f"cannot hang up a {self.direction} call in state {self.state}")
        return self._bye(headers)

    def _bye(self, headers) -> defer.Deferred:
        self.state = "terminating"
        done = self.when_ended()
        d = self.send_request("BYE", headers=headers)

        def answered(response):
            self._end("local", 200 if response is None else response.status)

        def failed(failure):
            self._end("local", getattr(failure.value, "status", None), detail=failure.getErrorMessage())

        d.addCallbacks(answered, failed)
        return done

    def send_message(self, body: bytes, content_type: str = "text/plain;charset=UTF-8",
                     headers: Iterable[tuple[str, str]] = ()) -> defer.Deferred:
        """An in-dialog MESSAGE (RFC 3428); fires with the final response, fails with ``CallFailed`` on
        a non-2xx answer."""
        if self.state != "confirmed":
            return defer.fail(CallStateError(f"MESSAGE in state {self.state}"))
        d = self.send_request("MESSAGE", headers=headers, body=body, content_type=content_type)

        def answered(response):
            if not 200 <= response.status < 300:
                raise CallFailed(response.status, response.reason)
            return response

        return d.addCallback(answered)

    def send_dtmf_info(self, digit: str, duration: int = 160) -> defer.Deferred:
        """DTMF as SIP INFO (application/dtmf-relay)."""
        body = f"Signal={digit}\r\nDuration={duration}\r\n".encode()
        return self.send_request("INFO", body=body, content_type="application/dtmf-relay")

    def reinvite(self, sdp: bytes, headers: Iterable[tuple[str, str]] = ()) -> defer.Deferred:
        """Send a re-INVITE with a new offer; fires with the 2xx (ACKed) or fails with ``CallFailed``."""
        if self.state != "confirmed":
            return defer.fail(CallStateError(f"re-INVITE in state {self.state}"))
        if self._outgoing_invite:
            return defer.fail(CallStateError("a re-INVITE is already in progress"))
        self._outgoing_invite = True
        request = self.dialog.create_request("INVITE", headers=self.ua.common_headers() + list(headers), body=sdp,
                                             content_type=SDP)

        def done(response):
            self._outgoing_invite = False
            if 200 <= response.status < 300:
                self._send_ack(response)
                self.local_sdp = sdp
                self.dialog.refresh_target(response)
                if response.body:
                    self.remote_sdp = response.body
                    self._emit(SdpUpdated(response.body))
                return response
            raise CallFailed(response.status, response.reason)

        def failed(failure):
            self._outgoing_invite = False
            return failure

        return self._send_in_dialog(request).addCallbacks(done, failed)

    # -- session timers (RFC 4028) --

    def _start_session_timer(self, terms: Optional[session_timer.Negotiated], we_refresh: bool) -> None:
        """Arm (or re-arm after a refresh) the dialog's timer; ``terms`` None turns it off."""
        if terms is None:
            if self.session_timer is not None:
                self.session_timer.cancel()
                self.session_timer = None
            return
        if self.session_timer is None:
            self.session_timer = session_timer.SessionTimer(
                self.ua.reactor, terms, we_refresh, self._refresh_session, self._session_expired)
        else:
            self.session_timer.restart(terms, we_refresh)

    def _refresh_session(self) -> None:
        """Our turn: a re-INVITE with the SDP we last sent (RFC 4028 §7.4, §9)."""
        terms = self.session_timer.negotiated
        if self.state != "confirmed" or self._outgoing_invite or self._reinvite_2xx is not None:
            self.session_timer.retry_in(2.0)  # busy with another offer/answer; half the interval is left
            return
        headers = [("Session-Expires", f"{terms.interval};refresher=uac"), ("Supported", SUPPORTED)]

        def refreshed(response: Response):
            try:
                renewed = session_timer.negotiated_by_response(response)
            except SIPParseError:
                renewed = terms
            # we sent the refresh, so we are its "uac"
            self._start_session_timer(renewed, we_refresh=renewed is not None and renewed.refresher == "uac")

        def failed(failure: Failure):
            status = failure.value.status if failure.check(CallFailed) else 500
            if self.end is not None:
                return
            if status in (408, 481):  # RFC 4028 §10: the session is gone
                log.warn("session refresh on {id} failed ({status}): ending the call", id=self.dialog_id,
                         status=status)
                self.send_request("BYE").addErrback(lambda f: None)
                self._end("session-expired", status, "local", f"session refresh failed with {status}")
            elif self.session_timer is not None:
                # e.g. 491 glare, 500: the session is still up; try again soon enough to land before the
                # other side's deadline (interval - min(32, interval/3)), without hammering it
                self.session_timer.retry_in(max(2.0, terms.interval / 8))

        self.reinvite(self.local_sdp, headers=headers).addCallbacks(refreshed, failed)

    def _session_expired(self) -> None:
        """The peer was to refresh and did not (RFC 4028 §10): BYE."""
        if self.end is not None:
            return
        interval = self.session_timer.negotiated.interval
        log.warn("no session refresh on {id} within {t}s: ending the call with BYE", id=self.dialog_id, t=interval)
        self.send_request("BYE").addErrback(lambda f: None)
        self._end("session-expired", 408, "local", f"no session refresh within {interval}s")

    def _uas_timer_terms(self, request: Request, txn: ServerTransaction):
        """(usable, terms) for a request we answer: a too-small interval has been answered 422 with our
        Min-SE, an unparsable one 400 (``usable`` False)."""
        try:
            return True, session_timer.negotiate_as_uas(request)
        except session_timer.IntervalTooSmall as e:
            self.ua.respond(txn, 422, headers=[("Min-SE", str(e.min_se))])
        except SIPParseError as e:
            self.ua.respond(txn, 400, bad_request_reason(e.reason))
        return False, None

    def _send_ack(self, response: Response) -> None:
        ack = self.dialog.create_ack(response.cseq.seq)
        target = self.dialog.target_for(ack)
        self._acks[response.cseq.seq] = (ack, target)
        self.ua.layer.send_ack(ack, target)

    def transfer(self, target_uri: str, headers: Iterable[tuple[str, str]] = (),
                 timeout: float = 60.0) -> defer.Deferred:
        """Blind transfer (RFC 3515): REFER, then follow NOTIFY sipfrag progress.

        Fires with the final sipfrag status (200 = the transfer target
        answered), fails with ``CallFailed`` when the REFER is refused or
        no final NOTIFY comes within ``timeout`` (408).
        """
        if self.state != "confirmed":
            return defer.fail(CallStateError(f"REFER in state {self.state}"))
        if self._transfer is not None and not self._transfer.called:
            return defer.fail(CallStateError("a transfer is already in progress"))
        result: defer.Deferred = defer.Deferred()
        self._transfer = result
        refer_headers = [("Refer-To", str(Address(parse_uri(target_uri)))),
                         ("Referred-By", str(Address(self.dialog.local_address.uri)))] + list(headers)
        d = self.send_request("REFER", headers=refer_headers)

        def refer_answered(response):
            if response.status >= 300 and not result.called:
                result.errback(Failure(CallFailed(response.status, response.reason)))

        def refer_failed(failure):
            if not result.called:
                result.errback(failure)

        d.addCallbacks(refer_answered, refer_failed)

        def timed_out(failure, _timeout):
            failure.trap(defer.CancelledError)
            raise CallFailed(408, "no final NOTIFY for the REFER")

        result.addTimeout(timeout, self.ua.reactor, onTimeoutCancel=timed_out)
        return result

    # -- requests the peer sends in the dialog --

    def _in_dialog_request(self, request: Request, txn: ServerTransaction) -> None:
        method = request.method
        if method == "BYE":
            self.ua.respond(txn, 200)
            self._remote_bye()
        elif method in ("INVITE", "UPDATE"):
            self._remote_offer(request, txn)
        elif method == "INFO":
            self.ua.respond(txn, 200)
            dtmf = parse_dtmf_info(request.body, request.content_type)
            if dtmf is not None:
                self._emit(dtmf)
        elif method == "OPTIONS":
            self.ua.respond(txn, 200, headers=self.ua.capabilities())
        elif method == "REFER":
            self._remote_refer(request, txn)
        elif method == "NOTIFY":
            self._notify(request, txn)
        elif method == "PRACK":
            self._prack(request, txn)
        elif method == "MESSAGE":
            self.ua.respond(txn, 200)  # RFC 3428 §7: the 200 says it was delivered to the call
            self._emit(MessageReceived(request.body or b"", request.headers.get("Content-Type") or "text/plain"))
        else:
            self.ua.respond(txn, 501)

    def _remote_bye(self) -> None:
        self._end("remote", by="remote")

    def _prack(self, request: Request, txn: ServerTransaction) -> None:
        self.ua.respond(txn, 200)  # no reliable provisional of ours is waiting (as the original did)

    def _remote_offer(self, request: Request, txn: ServerTransaction) -> None:
        """re-INVITE / UPDATE: answer with the mirrored direction and report hold/resume."""
        if request.method == "INVITE" and (self._outgoing_invite or self._reinvite_2xx is not None):
            self.ua.respond(txn, 491)  # glare (RFC 3261 §14.2)
            return
        if self.state not in ("confirmed",) and not (request.method == "UPDATE" and self.state in ("ringing",
                                                                                                    "answering")):
            self.ua.respond(txn, 500, headers=[("Retry-After", "1")])
            return
        terms = None
        if request.headers.get("Session-Expires") is not None:
            usable, terms = self._uas_timer_terms(request, txn)
            if not usable:
                return
        self.dialog.refresh_target(request)
        if request.body and request.content_type in (None, SDP):
            try:
                answer = self._answer_offer(request.body)
            except (sdp.SDPParseError, sdp.NegotiationError) as e:
                log.info("unusable {method} offer on {id}: {err}", method=request.method, id=self.dialog_id, err=e)
                self.ua.respond(txn, 488, reason_phrase(488, e))
                return
        elif request.method == "INVITE":
            answer = self.local_sdp  # no offer: ours goes in the 2xx, the ACK answers it
        else:
            answer = b""  # an UPDATE without an offer (a session refresh): nothing to answer
        headers = [("Contact", str(self.dialog.local_contact))] + list(self.ua.capabilities())
        headers += timer_headers(terms)
        headers += [("Content-Type", SDP)] if answer else []
        response = self.ua.respond(txn, 200, headers=headers, body=answer)
        if terms is not None:  # a refresh: the peer is this request's "uac"
            self._start_session_timer(terms, we_refresh=terms.refresher == "uas")
        elif self.session_timer is not None:  # an offer without Session-Expires still shows the peer is there
            self.session_timer.restart(self.session_timer.negotiated, self.session_timer.we_refresh)
        if request.method == "INVITE" and isinstance(txn, InviteServerTransaction):
            retransmitter = self.ua.layer.retransmit_2xx(txn, response)
            self._reinvite_2xx = (request.cseq.seq, retransmitter)

            def finished(outcome):
                if self._reinvite_2xx is not None and self._reinvite_2xx[1] is retransmitter:
                    self._reinvite_2xx = None
                if isinstance(outcome, Failure):
                    outcome.trap(TransactionTimeout)
                    log.warn("no ACK for our 2xx to a re-INVITE on {id}", id=self.dialog_id)

            retransmitter.done.addBoth(finished)

    def _answer_offer(self, offer: bytes) -> bytes:
        direction, held = sdp_direction(offer)
        if self.offer_answerer is not None:
            answer = self.offer_answerer(offer)
        else:
            answer = with_direction(self.local_sdp, mirror_direction(direction)) if self.local_sdp else b""
        self.remote_sdp = offer
        self._emit(SdpUpdated(offer))
        if held != self.on_hold:
            self.on_hold = held
            self._emit(HoldChanged(held, direction))
        if answer:
            self.local_sdp = answer
        return answer

    def _ack_received(self, ack: Request) -> None:
        if self._reinvite_2xx is not None and ack.cseq.seq == self._reinvite_2xx[0]:
            retransmitter = self._reinvite_2xx[1]
            self._reinvite_2xx = None
            if ack.body:
                self.remote_sdp = ack.body
                self._emit(SdpUpdated(ack.body))
            retransmitter.ack_received()

    def _remote_refer(self, request: Request, txn: ServerTransaction) -> None:
        refer_to = request.headers.get("Refer-To")
        if not refer_to:
            self.ua.respond(txn, 400, "Missing Refer-To")
            return
        try:
            parse_address(refer_to)
        except SIPParseError:
            self.ua.respond(txn, 400, "Bad Refer-To")
            return
        refer = IncomingRefer(self, request, txn)
        self._emit(TransferRequested(refer))
        if not refer.decided and not refer.waiting:
            refer.decline()  # nobody took it: a transfer we will not carry out is declined

    def _notify(self, request: Request, txn: ServerTransaction) -> None:
        event = (request.headers.get("Event") or "").split(";")[0].strip().lower()
        if event != "refer" or self._transfer is None:
            self.ua.respond(txn, 481 if event == "refer" else 489)
            return
        self.ua.respond(txn, 200)
        frag = parse_sipfrag(request.body)
        if frag is None:
            return
        status, reason = frag
        self._emit(TransferProgress(status, reason))
        terminated = (request.headers.get("Subscription-State") or "").lower().startswith("terminated")
        if (status >= 200 or terminated) and not self._transfer.called:
            self._transfer.callback(status)

    # -- 2xx retransmissions for INVITEs we sent --

    def _retransmitted_2xx(self, response: Response) -> None:
        sent = self._acks.get(response.cseq.seq)
        if sent is not None:
            self.ua.layer.send_ack(*sent)


def option_tags(message, header: str) -> list[str]:
    """The option tags of every ``header`` (Require, Supported) value, lower-cased."""
    return [t.strip().lower() for v in message.headers.get_all(header) for t in v.split(",") if t.strip()]


def timer_headers(terms: Optional[session_timer.Negotiated]) -> list[tuple[str, str]]:
    """Session-Expires for a 2xx, with ``Require: timer`` when the UAC is to refresh (RFC 4028 §9)."""
    if terms is None:
        return []
    headers = [("Session-Expires", terms.header())]
    if terms.refresher == "uac":
        headers.append(("Require", "timer"))
    return headers


def reason_phrase(status: int, error: Exception) -> str:
    from activecall.sip.message import REASON_PHRASES

    text = "".join(ch for ch in str(error) if ch.isprintable())[:60]
    return f"{REASON_PHRASES.get(status, 'Error')} ({text})" if text else REASON_PHRASES.get(status, "Error")


def _as_call_failed(failure: Failure):
    if failure.check(TransactionTimeout):
        raise CallFailed(408, "Request Timeout")
    if failure.check(TransportError):
        raise CallFailed(503, failure.getErrorMessage())
    return failure


class IncomingRefer:
    """A REFER the peer sent: ``accept()`` (202 + NOTIFY 100) or ``decline(code)``.

    A listener that decides later (it asks a client or a playbook) calls ``wait(timeout)`` while the
    ``TransferRequested`` event is delivered; nobody deciding within ``timeout`` declines it (603).
    Otherwise an undecided REFER is declined at once.  After accepting, ``progress(status, reason)``
    sends NOTIFY sipfrag updates; a final status (>= 200) ends the implicit subscription.

    ``target`` is the Refer-To URI without its header part; ``replaces`` is the unescaped
    ``Replaces`` header carried in it (attended transfer, RFC 3891), ``referred_by`` the Referred-By value.
    """

    #: how long a REFER may wait for a decision (below the referrer's 32 s transaction timeout)
    DEFAULT_DECISION_TIMEOUT = 10.0

    def __init__(self, call: SipCall, request: Request, txn: ServerTransaction):
        from urllib.parse import unquote

        self.call = call
        self.request = request
        self.txn = txn
        self.refer_to = parse_address(request.headers.get("Refer-To")).uri
        self.referred_by = request.headers.get("Referred-By")
        headers = {k.lower(): unquote(v) for k, v in (self.refer_to.headers or {}).items()}
        self.replaces: Optional[str] = headers.get("replaces")
        self.target = str(self.refer_to.copy(headers={}))
        self.decided = False
        self.accepted = False
        self.waiting = False
        self._finished = False
        self._timer = None

    def wait(self, timeout: Optional[float] = None) -> None:
        """Keep the REFER unanswered for up to ``timeout`` seconds (the default when None) for a decision."""
        if self.decided or self.waiting:
            return
        self.waiting = True
        delay = self.DEFAULT_DECISION_TIMEOUT if timeout is None else timeout
        self._timer = self.call.ua.reactor.callLater(delay, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        if not self.decided:
            log.info("nobody decided on the REFER to {target} in time; declining", target=self.target)
            self.decline(603, "no decision on the transfer request")

    def accept(self) -> None:
        self._decide()
        self.accepted = True
        self.call.ua.respond(self.txn, 202)
        self.progress(100, "Trying")

    def decline(self, code: int = 603, reason: Optional[str] = None) -> None:
        self._decide()
        self.call.ua.respond(self.txn, code, headers=[("Reason", reason_header(code, reason))] if reason else ())

    def _decide(self) -> None:
        if self.decided:
            raise CallStateError("the REFER was already answered")
        self.decided = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    @property
    def finished(self) -> bool:
        """True once a final NOTIFY was sent (or the REFER was declined)."""
        return self._finished or (self.decided and not self.accepted)

    def progress(self, status: int, reason: Optional[str] = None) -> defer.Deferred:
        """NOTIFY the referrer with ``SIP/2.0 <status> <reason>``."""
        from activecall.sip.message import REASON_PHRASES

        if not self.accepted or self._finished:
            return defer.fail(CallStateError("no active REFER subscription"))
        if self.call.is_ended:
            self._finished = True
            return defer.fail(CallStateError("the REFER's dialog has ended"))
        final = status >= 200
        self._finished = final
        state = "terminated;reason=noresource" if final else "active;expires=60"
        body = f"SIP/2.0 {status} {reason or REASON_PHRASES.get(status, '')}\r\n".encode()
        d = self.call.send_request("NOTIFY", headers=[("Event", "refer"), ("Subscription-State", state)],
                                   body=body, content_type="message/sipfrag;version=2.0")
        d.addErrback(lambda f: log.info("REFER NOTIFY failed: {err}", err=f.getErrorMessage()))
        return d


__all__ = [
    "ALLOW", "ACCEPT", "SUPPORTED", "SipCall", "IncomingRefer", "reason_header", "option_tags", "timer_headers",
    "reason_phrase",
]
