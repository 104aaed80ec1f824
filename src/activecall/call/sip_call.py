"""SIP calls as sessions: the ``/call/sip`` connector and inbound routing.

Inbound INVITEs go to the configured handler (docs/api.md, "Inbound calls: invite handlers"):

- **webhook** → 2xx keeps the INVITE pending under its dialog id until a client
  opens ``/call/sip?id=<dialogId>`` and sends ``ringing``/``accept``/``reject``;
- **playbook** rules → the call is answered at once and the playbook runs,
  with no WebSocket (events go to the call's journal);
- no handler, no matching rule, handler failure → 503 with a ``Reason``.

Outbound: ``invite`` on ``/call/sip`` dials ``option.callee`` with our RTP
offer (SDES-SRTP when ``sip.enableSrtp``, else ``enable_srtp``).
"""

from __future__ import annotations

import dataclasses

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from activecall.backlink import WeakMethod, back_link
from activecall.call import handlers
from activecall.call.interfaces import (
    ICallConnector, ICallLeg, IDtmfConnector, IInboundConnector, IMessageConnector, ITransferConnector,
)
from activecall.call.manager import start_playbook
from activecall.media.rtp import PortsExhausted
from activecall.media.rtp_leg import MediaNegotiationError, RtpLeg
from activecall.protocol import commands as cmd
from activecall.protocol import events as ev
from activecall.sip import sdp as sdp_mod
from activecall.sip.call_events import (
    CallFailed, CallStateError, Dtmf, Ended, HoldChanged, MessageReceived, Provisional, SdpUpdated,
    TransferRequested,
)

log = Logger(namespace="activecall.call.sip")


def offer_codecs(preferred, configured) -> tuple:
    """The configured ``codecs`` with ``option.codec`` first: one name or a comma-separated list,
    in that order, then the rest as configured.  It orders the offer and does not restrict it, so
    a peer without the preferred codec still answers with another.  A name that is not configured
    raises ValueError naming the ones that are."""
    if not preferred:
        return tuple(configured)
    audio = [c for c in configured if c != "telephone_event"]
    wanted = []
    for name in str(preferred).split(","):
        key = name.strip().lower().replace("-", "_")
        if key not in audio:
            raise ValueError(f"codec {name.strip()!r} is not one of the configured codecs ({', '.join(audio)})")
        if key not in wanted:
            wanted.append(key)
    return tuple(wanted) + tuple(c for c in configured if c not in wanted)


def delayed_offer(call) -> bool:
    """True when the inbound INVITE carried no SDP offer (we offer in the 200, the ACK answers)."""
    return not (call.offer or b"").strip()


@implementer(ICallLeg)
class SipLeg:
    """The session's leg for a SIP call: the signalling dialog plus its RTP leg.
    Closing it hangs up (BYE/CANCEL with the call's hangup headers) and frees the ports."""

    #: the call's session; weak once the call has ended (activecall/backlink.py)
    session = back_link()

    def __init__(self, session, sip_call, rtp: RtpLeg):
        self.session = session
        self.sip_call = sip_call
        self.rtp = rtp
        self.closing = False
        if sip_call is not None:
            sip_call.offer_answerer = WeakMethod(self._answer_offer)  # the call's dialog is ours: no cycle

    @property
    def codec(self):
        """The RTP leg's negotiated encoder (None before the offer/answer)."""
        return self.rtp.encoder

    def _answer_offer(self, offer: bytes) -> bytes:
        """A re-INVITE/UPDATE offer from the peer: the RTP leg follows it (a new address, codec or
        direction: a PBX moving the media, a hold) and answers it; the SIP layer reports the hold.
        Without this the SIP layer would answer with our old SDP and the media would stay put."""
        try:
            answer, _ = self.rtp.reoffer(offer.decode("utf-8", "replace"))
        except MediaNegotiationError as e:
            raise sdp_mod.NegotiationError(str(e)) from None
        return answer.encode()

    @defer.inlineCallbacks
    def close(self):
        self.closing = True
        if self.sip_call is not None and not self.sip_call.is_ended:
            headers = list(self.session.hangup_headers.items())
            try:
                if self.sip_call.state in ("pending", "ringing") and hasattr(self.sip_call, "reject"):
                    # an inbound call not answered yet; an outbound one ringing is CANCELled by hangup()
                    self.sip_call.reject(487 if self.session.end_reason == "canceled" else 480,
                                         self.session.end_reason)
                else:
                    yield self.sip_call.hangup(headers=headers)
            except (CallStateError, CallFailed, Exception) as e:
                log.debug("hanging up {id}: {e}", id=self.session.id, e=e)
        yield self.rtp.close()


class SipCalls:
    """Everything SIP calls need from the daemon, and the pending inbound calls."""

    def __init__(self, config, user_agent, manager, media_clock, port_pool, reactor, metrics=None):
        self.config = config
        self.ua = user_agent
        self.manager = manager
        self.media_clock = media_clock
        self.pool = port_pool
        self.reactor = reactor
        self.metrics = metrics
        self.pending: dict[str, object] = {}  # dialog id -> InboundCall awaiting /call/sip
        self.handler = handlers.handler_for(config.handler, config.playbook_dir, reactor)

    def new_rtp_leg(self, session, codecs=None) -> RtpLeg:
        leg = RtpLeg(session, self.media_clock, self.reactor,
                     host=self.config.rtp_bind_ip or self.ua.transport.advertised_host,
                     external_ip=self.config.external_ip, codecs=codecs or self.config.codecs,
                     latching=self.config.enable_rtp_latching, metrics=self.metrics)
        leg.allocate(self.pool)
        return leg

    def wants_srtp(self, option) -> bool:
        """The seed's chain: per-call ``sip.enableSrtp`` > ``enable_srtp`` > plain RTP."""
        sip = option.sip if option is not None else None
        value = getattr(sip, "enableSrtp", None) if sip is not None else None
        if value is None and sip is not None and sip.other_keys:
            value = sip.other_keys.get("enableSrtp")
        return self.config.enable_srtp if value is None else bool(value)

    # -- inbound ------------------------------------------------------------------------------

    def on_message(self, message):
        """The UserAgent's out-of-dialog MESSAGE handler: the webhook handler posts it (2xx -> 200);
        other handlers take no messages (405)."""
        on_message = getattr(self.handler, "on_message", None)
        if on_message is None:
            return 405
        return on_message(message)

    def on_invite(self, call) -> None:
        """The UserAgent's invite handler."""
        if self.handler is None:
            call.reject(503, "No invite handler configured")
            return
        invite = call.incoming_invite()
        d = self.handler.on_invite(invite)
        d.addCallback(self._decided, call, invite)
        d.addErrback(lambda f: (log.failure("invite handler failed", f),
                                self._reject(call, 503, f"Failed to process invite: {f.getErrorMessage()}")))

    def _reject(self, call, code, reason):
        try:
            call.reject(code, reason)
        except CallStateError:
            pass

    def _decided(self, decision, call, invite) -> None:
        if call.is_ended:
            return
        if isinstance(decision, handlers.Reject):
            self._reject(call, decision.code, decision.reason)
        elif isinstance(decision, handlers.Pending):
            self.pending[decision.dialog_id] = call
            call.when_ended().addBoth(lambda _: self.pending.pop(decision.dialog_id, None))
            log.info("inbound call {id} pending for /call/sip", id=decision.dialog_id)
        elif isinstance(decision, handlers.RouteToPlaybook):
            self._answer_with_playbook(call, invite, decision)

    def _answer_with_playbook(self, call, invite, decision) -> None:
        session = self.manager.open_session(invite.dialog_id, "sip", emit=_log_event)
        session.extras.update({"caller": invite.caller, "callee": invite.callee, **decision.extras})
        connector = SipConnector(session, None, self)
        session.connector = connector
        # the router already resolved (and, for a webhook's answer, confined) the path: load it as is
        source = (decision.content if decision.content is not None
                  else handlers.PlaybookFile(decision.path) if decision.path else decision.name)
        if self.manager.start_playbook(session, source) is None:
            self._reject(call, 503, "Playbook Not Found")
            return
        connector.answer_inbound(call, session.option or cmd.CallOption())

    # -- originate (POST /api/calls) -------------------------------------------------------------

    def open_session(self, session_id: str, command: str = "invite"):
        """A SIP session with no WebSocket (``POST /command/{id}``) for its first ``command``: ``invite``
        dials; ``accept``/``ringing``/``reject`` act on the inbound call pending under that dialog id
        (LookupError when there is none: no session is left behind).  Events go to the journal and watchers."""
        if command != "invite" and session_id not in self.pending:
            raise LookupError(f"no active or pending call {session_id!r}")
        session = self.manager.open_session(session_id, "sip", emit=_log_event)
        session.connector = SipConnector(session, None, self)
        return session

    def originate(self, session_id: str, option: cmd.CallOption):
        """An outbound call with no WebSocket: its events go to the journal and the log."""
        session = self.manager.open_session(session_id, "sip", emit=_log_event)
        session.connector = SipConnector(session, None, self)
        if option.playbook:
            session.option = option
            if self.manager.start_playbook(session, option.playbook) is None:
                return session
            option = session.option
        session.handle(cmd.Invite(option=option))
        return session

    # -- --call ---------------------------------------------------------------------------------

    def place_cli_call(self, target_uri: str):
        """``--call SIP_URI``: dial once, with RTP media, running the ``--handler`` playbook."""
        import uuid

        from activecall.config import PlaybookHandler

        session = self.manager.open_session(f"c.{uuid.uuid4()}", "sip", emit=_log_event)
        session.connector = SipConnector(session, None, self)
        handler = self.config.handler
        if isinstance(handler, PlaybookHandler) and handler.default:
            source = handlers.configured_source(self.config.playbook_dir, handler.default)
            if self.manager.start_playbook(session, source) is None:
                return session
        option = session.option or cmd.CallOption()
        session.handle(cmd.Invite(option=dataclasses.replace(option, callee=target_uri)))
        return session

    # -- helpers used by the connector -----------------------------------------------------------

    def take_pending(self, dialog_id: str):
        return self.pending.pop(dialog_id, None)


def _log_event(event) -> None:
    """Calls without a WebSocket (--call, playbook routing): events go to the log, errors at
    info, the rest at debug (per-call lines at info cost CPU on busy routes; the session logs
    one summary line per call at info)."""
    if event.TAG == "error":
        log.info("{tag}: {event}", tag=event.TAG, event=_AsJson(event))
    elif event.TAG in ("answer", "reject", "hangup", "ringing", "asrFinal", "dtmf"):
        log.debug("{tag}: {event}", tag=event.TAG, event=_AsJson(event))


class _AsJson:
    """An event that is serialised only if a log line is actually written."""

    __slots__ = ("event",)

    def __init__(self, event):
        self.event = event

    def __format__(self, spec) -> str:
        return self.event.to_json()

    __str__ = __repr__ = lambda self: self.event.to_json()


@implementer(ICallConnector, IInboundConnector, ITransferConnector, IDtmfConnector, IMessageConnector)
class SipConnector:
    """The call-type glue for ``/call/sip`` sessions (and playbook-routed inbound calls)."""

    #: the call's session; weak once the call has ended (activecall/backlink.py)
    session = back_link()

    def __init__(self, session, protocol, calls: SipCalls):
        self.session = session
        self.protocol = protocol
        self.calls = calls
        self.inbound = None
        self.ringing_call = None

    def binary_received(self, payload: bytes) -> None:
        self.session.error("command", "binary audio is only accepted on /call")

    # -- inbound: ringing / accept / reject ------------------------------------------------------

    def _pending(self):
        if self.ringing_call is not None and not self.ringing_call.is_ended:
            return self.ringing_call
        call = self.calls.take_pending(self.session.id)
        self.ringing_call = call
        return call

    def ringing(self, command: cmd.Ringing) -> None:
        call = self._pending()
        if call is None:
            self.session.error("ringing", "no pending call", code=481)
            return
        early = None
        if (command.earlyMedia or command.ringtone) and delayed_offer(call):
            # early media needs an answer to the caller's offer (or a reliable 183 offer answered in a
            # PRACK, which we do not make): a plain 180, the caller hears its own ringback
            log.info("no early media for {id}: the INVITE carried no SDP offer", id=self.session.id)
        elif command.earlyMedia or command.ringtone:
            option = self.session.option or cmd.CallOption()
            try:
                leg = self._leg_for(call, option)
            except MediaNegotiationError:
                return
            try:
                early = leg.rtp.answer(call.offer, srtp_required=self.calls.wants_srtp(option)).encode()
            except MediaNegotiationError as e:  # the 200 will meet the same offer and get a 488
                log.info("no early media for {id}: {err}", id=self.session.id, err=e)
            else:
                leg.rtp.start()
        call.ringing(early_media_sdp=early)
        self.session.ringing()
        if command.ringtone:
            self.session.playback.play(command.ringtone, command.ringtone)

    def accept(self, command: cmd.Accept) -> None:
        call = self._pending()
        if call is None:
            s = self.session
            s.emit(ev.Reject(trackId=s.id, timestamp=s.now(), reason="no pending call", code=486))
            s.error("command", "accept: no pending call for this id", code=486)
            s.end("rejected", initiator="system", status_code=486)
            return
        option = command.option.merged_over(self.session.option)
        self.session.option = option
        if option.codec:
            self.session.error("option", "option 'codec' is not supported on an accept: the answer keeps "
                                         "the caller's offer order (RFC 3264); the call goes on without it", code=501)
        self.answer_inbound(call, option)
        if option.playbook:
            start_playbook(self.session, option.playbook)

    def reject(self, command: cmd.Reject) -> None:
        call = self._pending()
        if call is None:
            return
        try:
            call.reject(command.code or 603, command.reason)
        except CallStateError as e:
            self.session.error("reject", str(e))
        self.session.end("rejected", initiator="callee", status_code=command.code or 603)

    def _leg_for(self, call, option) -> SipLeg:
        s = self.session
        if isinstance(s.leg, SipLeg):
            return s.leg
        try:
            rtp = self.calls.new_rtp_leg(s)
        except PortsExhausted as e:
            call.reject(503, "No media ports available")
            s.error("accept", str(e), code=503)
            s.end("failed", initiator="system", status_code=503)
            raise MediaNegotiationError(str(e)) from None
        s.leg = SipLeg(s, call, rtp)
        call.add_listener(WeakMethod(self._sip_event))  # no cycle: the session holds the connector
        return s.leg

    def answer_inbound(self, call, option) -> None:
        """Answer ``call`` with our SDP; the session is answered when the ACK comes."""
        s = self.session
        self.inbound = call
        s.option = option
        s.extras.setdefault("caller", call.caller)
        s.extras.setdefault("callee", call.callee)
        if option.sip is not None and option.sip.hangup_headers:
            s.hangup_headers.update(option.sip.hangup_headers)
        if delayed_offer(call):
            self._answer_delayed_offer(call, option)
            return
        try:
            leg = self._leg_for(call, option)
            answer = leg.rtp.answer(call.offer, srtp_required=self.calls.wants_srtp(option)) \
                if leg.rtp.negotiated is None else None
        except MediaNegotiationError as e:
            if s.leg is not None and not call.is_ended:
                call.reject(488, str(e))
            s.error("accept", f"cannot answer: {e}", code=488)
            s.end("failed", initiator="system", status_code=488)
            return
        if answer is None:  # early media already negotiated
            answer = leg.rtp.answer(call.offer)
        d = call.answer(answer.encode())
        leg.rtp.start()
        d.addCallback(lambda _: s.answered(sdp=answer))
        d.addErrback(lambda f: s.end("failed", initiator="system", status_code=408))

    def _answer_delayed_offer(self, call, option) -> None:
        """An INVITE without SDP (RFC 3261 §13.2.1, "delayed offer", as some PBXs and gateways send):
        our 200 carries the offer and the ACK the answer.  An ACK without a usable answer ends the
        call with a BYE (§13.3.1.4), as a 488 would have before the 200."""
        s = self.session
        try:
            leg = self._leg_for(call, option)
        except MediaNegotiationError:
            return  # no ports: _leg_for rejected the call and ended the session
        offer = leg.rtp.offer(srtp=self.calls.wants_srtp(option))

        def acked(ack):
            body = ack.body or b""
            if s.state.value == "ended":
                return
            try:
                if not body.strip():
                    raise MediaNegotiationError("the ACK carried no SDP answer to our offer")
                leg.rtp.apply_answer(body.decode("utf-8", "replace"))
            except MediaNegotiationError as e:
                log.warn("call {id}: unusable answer to our offer in the ACK: {err}; ending it", id=s.id, err=e)
                s.error("accept", f"cannot use the caller's answer: {e}", code=488)
                s.end("failed", initiator="system", status_code=488)
                return
            leg.rtp.start()
            s.answered(sdp=body.decode("utf-8", "replace"))

        d = call.answer(offer.encode())
        d.addCallback(acked)
        d.addErrback(lambda f: s.end("failed", initiator="system", status_code=408))

    # -- outbound --------------------------------------------------------------------------------

    def invite(self, command: cmd.Invite) -> None:
        s = self.session
        option = command.option.merged_over(s.option)
        s.option = option
        if not option.callee:
            s.error("invite", "option.callee is required for an outbound SIP call", code=400)
            return
        callee = option.callee if option.callee.startswith(("sip:", "sips:")) else "sip:" + option.callee
        try:
            codecs = offer_codecs(option.codec, self.calls.config.codecs)
        except ValueError as e:
            s.error("invite", str(e), code=400)
            s.end("failed", initiator="system", status_code=400)
            return
        try:
            rtp = self.calls.new_rtp_leg(s, codecs)
        except PortsExhausted as e:
            s.error("invite", str(e), code=503)
            s.end("failed", initiator="system", status_code=503)
            return
        offer = rtp.offer(srtp=self.calls.wants_srtp(option))
        sip = option.sip
        headers = dict(sip.headers) if sip is not None and sip.headers else {}
        credentials = None
        if sip is not None and sip.username:
            from activecall.config import Credential

            credentials = Credential(username=sip.username, password=sip.password or "", realm=sip.realm)
        if sip is not None and sip.hangup_headers:
            s.hangup_headers.update(sip.hangup_headers)
        try:
            call = self.calls.ua.place_call(callee, offer.encode(), caller=option.caller, headers=headers,
                                            credentials=credentials, call_id=s.id)
        except Exception as e:
            rtp.close()
            s.error("invite", f"cannot call {callee}: {e}", code=400)
            s.end("failed", initiator="system", status_code=400)
            return
        s.extras.setdefault("callee", callee)
        s.leg = SipLeg(s, call, rtp)
        call.add_listener(WeakMethod(self._sip_event))  # no cycle: the session holds the connector
        call.when_answered().addCallbacks(self._outbound_answered, self._outbound_failed)

    def _outbound_answered(self, _):
        leg = self.session.leg
        try:
            leg.rtp.apply_answer(leg.sip_call.remote_sdp)
        except MediaNegotiationError as e:
            self.session.error("invite", f"unusable answer: {e}", code=488)
            self.session.end("failed", initiator="system", status_code=488)
            return
        leg.rtp.start()
        option = self.session.option
        if option is not None and option.amd is not None:
            from activecall.call import amd

            if amd.enabled(option.amd):
                amd.start_amd(self.session, option.amd)
        self.session.answered(sdp=leg.sip_call.remote_sdp.decode("utf-8", "replace"))

    def _outbound_failed(self, failure):
        s = self.session
        error = failure.value
        code = getattr(error, "status", None) or 500
        reason = getattr(error, "reason", None) or failure.getErrorMessage()
        if s.leg is not None and s.leg.closing:
            return None  # we hung up ourselves (CANCEL)
        s.emit(ev.Reject(trackId=s.id, timestamp=s.now(), reason=str(reason), code=code, refer=False))
        s.error("invite", f"call failed: {code} {reason}", code=code)
        s.end("rejected" if 400 <= code < 700 else "failed", initiator="callee", status_code=code)
        return None

    # -- events from the SIP dialog ----------------------------------------------------------------

    def _sip_event(self, event) -> None:
        s = self.session
        if isinstance(event, Provisional):
            s.ringing()
            s.emit(ev.Ringing(trackId=s.id, timestamp=s.now(), earlyMedia=event.sdp is not None))
            if event.sdp:
                try:
                    s.leg.rtp.apply_answer(event.sdp)
                    s.leg.rtp.start()
                except MediaNegotiationError as e:
                    log.warn("early media SDP unusable: {e}", e=e)
        elif isinstance(event, HoldChanged):
            s.leg.rtp.on_hold = event.on_hold
            s.emit(ev.Hold(trackId=s.id, timestamp=s.now(), onHold=event.on_hold))
        elif isinstance(event, Dtmf):
            s.emit(ev.Dtmf(trackId=s.id, timestamp=s.now(), digit=event.digit))
        elif isinstance(event, MessageReceived):
            s.emit(ev.Message(trackId=s.id, timestamp=s.now(), body=event.body.decode("utf-8", "replace"),
                              contentType=event.content_type))
        elif isinstance(event, SdpUpdated):
            pass  # the answer to our offer is applied when the call is answered
        elif isinstance(event, TransferRequested):
            from activecall.call.transfer import transfer_requested

            transfer_requested(s, event.refer, self)
        elif isinstance(event, Ended):
            if s.leg is not None and s.leg.closing:
                return
            if event.reason == "cancelled":
                s.end("canceled", initiator="caller", status_code=487)
            elif event.by == "remote":
                s.end("caller" if self.inbound is not None else "callee",
                      initiator="caller" if self.inbound is not None else "callee")
            elif s.state.value != "ended":
                s.end("failed" if event.reason in ("failed", "timeout", "no-ack", "session-expired") else "system",
                      initiator="system", status_code=event.status)

    # -- in call -----------------------------------------------------------------------------------

    def sendDtmf(self, command: cmd.SendDtmf) -> None:
        leg = self.session.leg
        if not isinstance(leg, SipLeg):
            self.session.error("command", "sendDtmf needs an answered SIP call")
            return
        try:
            leg.rtp.send_dtmf(command.digits, command.duration)
        except ValueError as e:
            self.session.error("command", str(e))

    def sendMessage(self, command: cmd.SendMessage) -> None:
        """An in-dialog MESSAGE; a refusal or timeout is ``error{sender:"sendMessage"}`` with its status."""
        leg = self.session.leg
        if not isinstance(leg, SipLeg) or leg.sip_call is None:
            self.session.error("command", "sendMessage needs an answered SIP call")
            return None
        try:
            body = command.body.encode("utf-8")
        except UnicodeEncodeError:
            body = command.body.encode("utf-8", "backslashreplace")
        d = leg.sip_call.send_message(body, command.contentType or cmd.SendMessage.DEFAULT_CONTENT_TYPE,
                                      headers=list((command.headers or {}).items()))
        d.addErrback(lambda f: self.session.error(
            "sendMessage", f"MESSAGE failed: {f.getErrorMessage()}", code=getattr(f.value, "status", None)))
        return None

    def refer(self, command: cmd.Refer) -> None:
        """The original's B2BUA transfer; ``options.mode = "sip"`` sends a real SIP REFER instead."""
        mode = (command.options.other_keys or {}).get("mode") if command.options is not None else None
        if mode != "sip":
            from activecall.call.bridge import start_refer

            start_refer(self.session, command, self.calls)
            return
        leg = self.session.leg
        if not isinstance(leg, SipLeg):
            self.session.error("command", "a SIP REFER needs an answered SIP call")
            return
        target = command.callee if command.callee.startswith(("sip:", "sips:")) else "sip:" + command.callee
        self.session.playback.stop_current(interrupted=True)
        d = leg.sip_call.transfer(target)
        d.addCallbacks(
            lambda _: self.session.end("refer", initiator="system"),
            lambda f: self.session.error("refer", f"transfer to {target} failed: {f.getErrorMessage()}"))
