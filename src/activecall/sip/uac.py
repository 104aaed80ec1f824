"""The calling side of a SIP call (RFC 3261 §13.2): ``OutboundCall``, an INVITE we send.

It follows the provisional responses (early media; PRACK for reliable ones, RFC 3262), answers a
digest challenge and a 422 (RFC 4028) once, ACKs the 2xx, CANCELs while ringing.  Forking
(§13.2.2.4): a 2xx from another fork is ACKed and its dialog ended with a BYE (``end_fork``).
``UserAgent.place_call`` builds the INVITE.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from activecall.sip import session_timer
from activecall.sip.auth import DigestClient
from activecall.sip.call import SipCall, option_tags
from activecall.sip.call_events import CallFailed, Established, ForkEnded, Provisional, SdpUpdated
from activecall.sip.dialog import Dialog
from activecall.sip.digits import is_number
from activecall.sip.message import Request, Response, SIPParseError, Target, next_attempt
from activecall.sip.sdp_offer import SDP
from activecall.sip.transaction_base import TransactionTimeout

log = Logger(namespace="activecall.sip.useragent")  # one namespace for the user agent and its calls


class OutboundCall(SipCall):
    """An INVITE we send.  ``when_answered()`` fires with the 2xx (after our ACK).

    Provisional responses come as ``Provisional`` events (183 with SDP = early
    media); 401/407 are answered once with digest credentials; ``hangup()``
    while ringing sends CANCEL, afterwards BYE with custom headers.
    """

    direction = "outbound"

    def __init__(self, ua: "UserAgent", invite: Request, target: Target, digest: Optional[DigestClient]):
        super().__init__(ua)
        self.invite = invite
        self.target = target
        self.digest = digest
        self.local_sdp = invite.body
        self.state = "calling"
        self.final_response: Optional[Response] = None
        self._txn = None
        self._answered: list[defer.Deferred] = []
        self._hangup_headers: Optional[list] = None
        self._authenticated = False
        self._interval_raised = False  # a 422 has been answered with a larger Session-Expires
        self._rseqs: dict[str, int] = {}  # RFC 3262: the last RSeq we PRACKed, per early dialog (To tag)
        #: other forks' 2xx (RFC 3261 §13.2.2.4): To-tag -> (ACK, target), resent if that 2xx comes again
        self._fork_acks: dict[str, tuple[Request, Target]] = {}

    @property
    def call_id(self) -> str:
        return self.invite.call_id or ""

    def when_answered(self) -> defer.Deferred:
        """Fires with the 2xx response; fails with ``CallFailed`` (status 487 after a CANCEL)."""
        if self.final_response is not None and 200 <= self.final_response.status < 300:
            return defer.succeed(self.final_response)
        if self.end is not None:
            return defer.fail(CallFailed(self.end.status or 500, self.end.detail or self.end.reason))
        d: defer.Deferred = defer.Deferred()
        self._answered.append(d)
        return d

    def start(self) -> "OutboundCall":
        log.info("calling {uri} (Call-ID {call_id})", uri=str(self.invite.uri), call_id=self.call_id)
        self._txn = self.ua.layer.send_request(self.invite, self.target, on_provisional=self._provisional)
        self._txn.final.addCallbacks(self._final, self._failed)
        return self

    def _provisional(self, response: Response) -> None:
        if response.status == 100 or self.end is not None:
            return
        if response.to.tag and (self.dialog is None or self.dialog.remote_tag != response.to.tag):
            if self.dialog is not None:
                self.ua._forget_dialog(self.dialog)
            self.dialog = Dialog.as_uac(self.invite, response, transport=self.target.transport)
            self.ua._add_dialog(self.dialog, self)
        if "100rel" in option_tags(response, "Require") and not self._prack_for(response):
            return  # a retransmission of a reliable provisional we have PRACKed, or one out of order
        sdp = response.body if response.body and response.content_type == SDP else None
        self.state = "ringing" if self.state == "calling" else self.state
        self._emit(Provisional(response.status, response.reason, sdp))
        if sdp is not None and sdp != self.remote_sdp:
            self.remote_sdp = sdp
            self._emit(SdpUpdated(sdp))

    def _prack_for(self, response: Response) -> bool:
        """PRACK a reliable provisional (RFC 3262 §4) the first time it comes, in RSeq order, in the
        early dialog it created; False for one to ignore (a retransmission, or RSeq out of order)."""
        rseq_text = (response.headers.get("RSeq") or "").strip()
        if not is_number(rseq_text) or len(rseq_text) > 10 or self.dialog is None:
            return False
        rseq = int(rseq_text)
        last = self._rseqs.get(self.dialog.remote_tag)
        if last is not None and rseq != last + 1:
            return False
        self._rseqs[self.dialog.remote_tag] = rseq
        headers = list(self.ua.common_headers()) + [("RAck", f"{rseq} {response.cseq.seq} INVITE")]
        prack = self.dialog.create_request("PRACK", headers=headers)
        self.ua.layer.send_request(prack, self.dialog.target_for(prack)).final.addErrback(
            lambda f: log.info("PRACK on {id} failed: {err}", id=self.dialog_id, err=f.getErrorMessage()))
        return True

    def _final(self, response: Response) -> None:
        status = response.status
        if 200 <= status < 300:
            self._established(response)
            return
        if status == 422 and self._hangup_headers is None and not self._interval_raised:
            # RFC 4028 §7.4: ask again with the interval the UAS wants
            try:
                min_se = session_timer._min_se_of(response)
            except SIPParseError:
                min_se = 0  # a 422 with a bad Min-SE: nothing to retry with, the call fails with it
            if min_se:
                retry = next_attempt(self.invite)
                retry.headers.set("Session-Expires", str(min_se))
                retry.headers.set("Min-SE", str(min_se))
                self._interval_raised = True
                log.info("422 for INVITE to {uri}: retrying with Session-Expires {se}", uri=str(self.invite.uri),
                         se=min_se)
                self.invite = retry
                self.start()
                return
        if status in (401, 407) and self.digest is not None and self._hangup_headers is None:
            retry = next_attempt(self.invite)
            if self.digest.authorize(retry, response):
                log.info("{status} for INVITE to {uri}: retrying with credentials of {user!r}", status=status,
                         uri=str(self.invite.uri), user=self.digest.username)
                self.invite = retry
                self.start()
                return
            log.warn("INVITE to {uri} failed: {err}", uri=str(self.invite.uri), err=self.digest.last_error)
        self.final_response = response
        if self.dialog is not None:
            self.ua._forget_dialog(self.dialog)
        cancelled = self._hangup_headers is not None and status == 487
        self._fail_answered(CallFailed(status, response.reason))
        self._end("cancelled" if cancelled else "rejected", status, "local" if cancelled else "remote",
                  response.reason)

    def _established(self, response: Response) -> None:
        self.final_response = response
        if self.dialog is not None and self.dialog.remote_tag == response.to.tag:
            self.dialog.confirm(response)
        else:
            if self.dialog is not None:
                self.ua._forget_dialog(self.dialog)
            self.dialog = Dialog.as_uac(self.invite, response, transport=self.target.transport)
            self.ua._add_dialog(self.dialog, self)
        if self.digest is not None:
            self.digest.accepted()
        self._send_ack(response)
        self.state = "confirmed"
        try:
            terms = session_timer.negotiated_by_response(response)
        except SIPParseError as e:
            log.info("ignoring the 2xx's Session-Expires on {id}: {err}", id=self.dialog_id, err=e)
            terms = None
        self._start_session_timer(terms, we_refresh=terms is not None and terms.refresher == "uac")
        if response.body:
            self.remote_sdp = response.body
            self._emit(SdpUpdated(response.body))
        self._emit(Established(self.remote_sdp))
        waiters, self._answered = self._answered, []
        for d in waiters:
            d.callback(response)
        if self._hangup_headers is not None:  # hung up while the 2xx was on its way: ACK, then BYE
            self._bye(self._hangup_headers)

    def _forked_2xx(self, response: Response) -> None:
        """A 2xx from another fork of our INVITE (RFC 3261 §13.2.2.4): the call keeps the answer it
        took; the other dialog is ACKed, then ended with a BYE (``end_fork``)."""
        end_fork(self.ua, self.invite, self.target.transport, self._fork_acks, response,
                 lambda tag, status: self._emit(ForkEnded(tag, status)))

    def _failed(self, failure: Failure) -> None:
        status = 408 if failure.check(TransactionTimeout) else 503
        if failure.check(defer.CancelledError):
            status = 503
        detail = failure.getErrorMessage()
        log.warn("INVITE to {uri} failed: {detail}", uri=str(self.invite.uri), detail=detail)
        if self.dialog is not None:
            self.ua._forget_dialog(self.dialog)
        self._fail_answered(CallFailed(status, detail))
        self._end("failed", status, "local", detail)

    def _fail_answered(self, error: CallFailed) -> None:
        waiters, self._answered = self._answered, []
        for d in waiters:
            d.errback(Failure(error))

    def hangup(self, headers: Iterable[tuple[str, str]] = ()) -> defer.Deferred:
        """While ringing: CANCEL (the INVITE then ends with 487).  Afterwards: BYE with ``headers``."""
        if self.end is not None:
            return self.when_ended()
        if self.state in ("calling", "ringing"):
            if self._hangup_headers is None:
                self._hangup_headers = list(headers)
                self.state = "cancelling"
                log.info("cancelling the call to {uri}", uri=str(self.invite.uri))
                self.ua.layer.cancel(self._txn).addErrback(
                    lambda f: log.info("CANCEL failed: {err}", err=f.getErrorMessage()))
            return self.when_ended()
        if self.state == "cancelling":
            return self.when_ended()
        return super().hangup(headers)


def end_fork(ua, invite: Request, transport, fork_acks: dict, response: Response,
             on_ended: Optional[Callable[[str, int], Any]] = None) -> None:
    """ACK a 2xx to ``invite`` from a dialog we do not keep, then end that dialog with a BYE
    (RFC 3261 §13.2.2.4).  The same 2xx again gets the same ACK (its UAS resends it until one
    arrives) and no second BYE; ``fork_acks`` (To tag -> the ACK sent) remembers them.
    ``on_ended(tag, status)`` gets the BYE's outcome."""
    tag = response.to.tag or ""
    sent = fork_acks.get(tag)
    if sent is not None:
        ua.layer.send_ack(*sent)
        return
    try:
        fork = Dialog.as_uac(invite, response, transport=transport)
    except SIPParseError as e:
        log.info("unusable 2xx from another fork of {uri}: {err}", uri=str(invite.uri), err=e)
        return
    ack = fork.create_ack(response.cseq.seq)
    target = fork.target_for(ack)
    fork_acks[tag] = (ack, target)
    ua.layer.send_ack(ack, target)
    log.info("2xx from another fork of {uri} (To tag {tag}): ACKed and ended with BYE",
             uri=str(invite.uri), tag=tag)
    bye = fork.create_request("BYE", headers=list(ua.common_headers()))

    def failed(failure):
        log.info("BYE to another fork failed: {err}", err=failure.getErrorMessage())
        return 408 if failure.check(TransactionTimeout) else 503

    d = ua.layer.send_request(bye, fork.target_for(bye)).final
    d.addCallbacks(lambda response: response.status, failed)
    if on_ended is not None:
        d.addCallback(lambda status: on_ended(tag, status))


__all__ = [
    "OutboundCall", "end_fork",
]
