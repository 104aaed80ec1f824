"""A transfer the far end asks for: an inbound SIP REFER (RFC 3515) on a SIP call.

The SIP layer reports the REFER as ``TransferRequested`` (``sip/call.py``); here it becomes a
``transferRequest`` event to the call's client and its playbook, who answer with ``acceptTransfer`` /
``rejectTransfer``.  Nobody there to answer → declined at once (603); nobody answering within
``IncomingRefer.DEFAULT_DECISION_TIMEOUT`` (10 s) → declined (603).

Accepted: 202 and NOTIFY ``100 Trying``; a new INVITE goes to the Refer-To URI (with ``Referred-By``,
and ``Replaces`` when the Refer-To carried one), ``180 Ringing`` is NOTIFYed when it rings.  When it
answers: NOTIFY ``200 OK``, the call's media moves to the new dialog (the same session goes on: its
playbook, recording and events), and the old dialog is hung up (BYE).  When it fails or does not answer
within ``TRANSFER_TIMEOUT``: the final NOTIFY carries its status (408 on the timeout) and the call stays
on the old dialog.  Events: ``answer{refer: true}`` on success, ``reject{refer: true, code}`` on failure,
the same as the B2BUA ``refer`` command's.
"""

from __future__ import annotations

from typing import Optional

from twisted.logger import Logger

from activecall.backlink import WeakMethod
from activecall.media.rtp import PortsExhausted
from activecall.media.rtp_leg import MediaNegotiationError
from activecall.protocol import events as ev
from activecall.sip.call_events import CallStateError, Provisional

log = Logger(namespace="activecall.call.transfer")

#: seconds the Refer-To target may ring before the transfer fails with 408
TRANSFER_TIMEOUT = 30.0


def transfer_requested(session, refer, connector) -> None:
    """The SIP layer's ``TransferRequested``: tell the client and the playbook, or decline."""
    current = getattr(session, "inbound_transfer", None)
    if current is not None and not current.done:
        refer.decline(491, "a transfer is already in progress")
        return
    if connector.protocol is None and session.playbook_runner is None:
        return  # nobody can answer: the SIP layer declines it (603)
    session.inbound_transfer = InboundTransfer(session, refer, connector)
    refer.wait()
    session.emit(ev.TransferRequest(trackId=session.id, timestamp=session.now(), referTo=refer.target,
                                    referredBy=refer.referred_by, replaces=refer.replaces))


def accept(session, command) -> None:
    transfer = _pending(session, command)
    if transfer is not None:
        transfer.accept(command.headers or {})


def reject(session, command) -> None:
    transfer = _pending(session, command)
    if transfer is not None:
        transfer.reject(command.code or 603, command.reason)


def _pending(session, command):
    transfer = getattr(session, "inbound_transfer", None)
    if transfer is None or transfer.refer.decided:
        session.error(command.TAG, "no transfer request is waiting for an answer", code=481)
        return None
    return transfer


class InboundTransfer:
    """One REFER from the far end, from the request to its final NOTIFY."""

    def __init__(self, session, refer, connector):
        self.session = session
        self.refer = refer
        self.connector = connector
        self.call = None
        self.rtp = None
        self._timer = None
        self._rang = False
        self.done = False

    def reject(self, code: int, reason: Optional[str]) -> None:
        self.done = True
        try:
            self.refer.decline(code, reason)
        except CallStateError as e:
            self.session.error("rejectTransfer", str(e))

    def accept(self, headers: dict) -> None:
        s = self.session
        old = s.leg
        if old is None or getattr(old, "sip_call", None) is None or old.sip_call.is_ended:
            self.reject(481, "the call has no SIP dialog")
            return
        try:
            self.refer.accept()
        except CallStateError as e:
            s.error("acceptTransfer", str(e))
            return
        calls = self.connector.calls
        try:
            self.rtp = calls.new_rtp_leg(s)
        except PortsExhausted as e:
            self._failed(503, str(e))
            return
        extra = {"Referred-By": self.refer.referred_by or str(old.sip_call.dialog.remote_address)}
        if self.refer.replaces:
            extra["Replaces"] = self.refer.replaces
        extra.update(headers)
        option = s.option
        wants_srtp = calls.wants_srtp(option)
        caller = str(old.sip_call.dialog.local_address.uri)
        try:
            self.call = calls.ua.place_call(self.refer.target, self.rtp.offer(srtp=wants_srtp).encode(),
                                            caller=caller, headers=extra)
        except Exception as e:
            self._failed(400, f"cannot call {self.refer.target}: {e}")
            return
        log.info("call {id}: transfer to {target} (REFER) placed", id=s.id, target=self.refer.target)
        self._timer = calls.reactor.callLater(TRANSFER_TIMEOUT, self._timed_out)
        self.call.add_listener(self._progress)
        self.call.when_answered().addCallbacks(self._answered, self._not_answered)
        s.when_ended().addCallback(lambda _: self._session_ended())

    def _progress(self, event) -> None:
        if isinstance(event, Provisional) and not self._rang and not self.refer.finished:
            self._rang = True
            self.refer.progress(180, "Ringing")

    def _timed_out(self) -> None:
        self._timer = None
        if self.call is not None and not self.call.is_ended:
            self.call.hangup()  # CANCEL
        self._failed(408, "Request Timeout")

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _answered(self, _response) -> None:
        self._cancel_timer()
        s = self.session
        if s.state.value == "ended":
            self.call.hangup()
            return
        try:
            self.rtp.apply_answer(self.call.remote_sdp)
        except MediaNegotiationError as e:
            self.call.hangup()
            self._failed(488, str(e))
            return
        old = s.leg
        self.refer.progress(200, "OK")
        # the old dialog's BYE (ours, or the transferor's, which usually follows the NOTIFY) is no hang-up
        old.sip_call.remove_listener(self.connector._sip_event)
        old.closing = True
        old.rtp.close()  # one leg sends the session's audio at a time: stop the old one first
        if not old.sip_call.is_ended:
            d = old.sip_call.hangup()
            d.addErrback(lambda f: log.debug("BYE of the transferred dialog: {e}", e=f.getErrorMessage()))
        s.leg = type(old)(s, self.call, self.rtp)  # a SipLeg, like the one it replaces
        self.rtp.start()
        self.call.add_listener(WeakMethod(self.connector._sip_event))
        self.connector.inbound = None  # we placed the new dialog: its BYE is the callee's
        self.done = True
        s.extras["transferred_to"] = self.refer.target
        s.emit(ev.Answer(trackId=s.id, timestamp=s.now(),
                         sdp=self.call.remote_sdp.decode("utf-8", "replace"), refer=True))

    def _not_answered(self, failure) -> None:
        self._cancel_timer()
        if self.done:
            return None
        code = getattr(failure.value, "status", None) or 500
        reason = getattr(failure.value, "reason", None) or failure.getErrorMessage()
        self._failed(code, str(reason))
        return None

    def _failed(self, code: int, reason: str) -> None:
        if self.done:
            return
        self.done = True
        self._cancel_timer()
        if not self.refer.finished:
            self.refer.progress(code, reason)
        if self.rtp is not None:
            rtp, self.rtp = self.rtp, None
            rtp.close()
        s = self.session
        if s.state.value != "ended":
            s.emit(ev.Reject(trackId=s.id, timestamp=s.now(), reason=reason, code=code, refer=True))

    def _session_ended(self) -> None:
        if self.done:
            return
        self.done = True
        self._cancel_timer()
        if self.call is not None and not self.call.is_ended:
            self.call.hangup()
        if self.rtp is not None:
            rtp, self.rtp = self.rtp, None
            rtp.close()
