"""The SIP user agent (RFC 3261 §8, §12–§15): inbound and outbound calls on
top of the transaction layer.

``UserAgent`` is the transaction user: every new request, every ACK for a 2xx
and every stray response comes to it.  It answers what needs no call
(out-of-dialog OPTIONS, 481 for unknown dialogs), turns a new INVITE into an
``InboundCall`` handed to ``invite_handler``, and places ``OutboundCall``s.
A call is a small state machine around one dialog: it sends 1xx/2xx/BYE/
CANCEL/re-INVITE/REFER/INFO and reports what the peer does as events
(``Provisional``, ``Established``, ``HoldChanged``, ``Dtmf``, ``TransferRequested``,
``TransferProgress``, ``SdpUpdated``, ``Ended``) to its listeners.  Media is not
here: SDP bodies go in and out as bytes.
"""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from activecall.sip import sdp
from activecall.sip.auth import DigestClient
from activecall.sip import session_timer
from activecall.sip.dialog import Dialog, DialogId, DialogState, DialogTable, response_dialog_id
from activecall.sip.digits import is_number
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
    next_attempt,
    next_hop,
    parse_address,
    parse_uri,
    quote,
)
from activecall.sip.transaction import (
    ExpiryQueue,
    InviteServerTransaction,
    ServerTransaction,
    TransactionLayer,
    TransactionTimeout,
    TransactionUser,
    TransportError,
)

log = Logger(namespace="activecall.sip.useragent")

ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE, REFER, NOTIFY, MESSAGE, PRACK"
_ALLOWED = frozenset(m.strip() for m in ALLOW.split(","))
#: Request-URI schemes we serve; any other is answered 416 (RFC 3261 §8.2.2.1)
URI_SCHEMES = ("sip", "sips", "tel")
ACCEPT = "application/sdp, application/dtmf-relay, message/sipfrag"
#: option tags we implement: session timers (RFC 4028) and reliable provisional responses (RFC 3262);
#: not replaces
SUPPORTED = "timer, 100rel"
SDP = "application/sdp"


# -- events a call reports -----------------------------------------------------------------


@dataclass(frozen=True)
class Provisional:
    """Outbound: 180/183 from the callee; ``sdp`` is early media (183 with a body)."""

    status: int
    reason: str
    sdp: Optional[bytes] = None


@dataclass(frozen=True)
class Established:
    """The dialog is confirmed (ACK received / sent); ``remote_sdp`` is the peer's session."""

    remote_sdp: bytes


@dataclass(frozen=True)
class SdpUpdated:
    """The peer sent a new session description (183, 200, re-INVITE, UPDATE)."""

    sdp: bytes


@dataclass(frozen=True)
class HoldChanged:
    """The peer put the call on hold (sendonly / inactive / c=0.0.0.0) or resumed it."""

    on_hold: bool
    direction: str


@dataclass(frozen=True)
class Dtmf:
    """A digit from SIP INFO (``Signal=``)."""

    digit: str
    duration: Optional[int] = None


@dataclass(frozen=True)
class TransferRequested:
    """The peer sent REFER: call ``refer.accept()`` or ``refer.decline()`` in the listener."""

    refer: "IncomingRefer"


@dataclass(frozen=True)
class TransferProgress:
    """NOTIFY progress of a REFER we sent (the sipfrag status line)."""

    status: int
    reason: str


@dataclass(frozen=True)
class ForkEnded:
    """Another fork of our INVITE answered too: its dialog was ACKed and ended with a BYE, which got
    ``status`` (408/503 when it went unanswered or could not be sent)."""

    tag: str
    status: int


@dataclass(frozen=True)
class Ended:
    """The call is over.  ``reason``: local, remote, cancelled, rejected, timeout, failed, no-ack, session-expired."""

    reason: str
    status: Optional[int] = None
    by: str = "local"
    detail: str = ""


CallEvent = Union[Provisional, Established, SdpUpdated, HoldChanged, Dtmf, TransferRequested,
                  TransferProgress, ForkEnded, Ended]


class CallStateError(Exception):
    """An action that the call's state does not allow (answering twice, ringing after BYE)."""


class CallFailed(Exception):
    """An outbound call or request got a final failure: ``status`` (408 on timeout, 503 unsendable)."""

    def __init__(self, status: int, reason: str = ""):
        super().__init__(f"{status} {reason}".strip())
        self.status = status
        self.reason = reason


# -- small pure helpers ---------------------------------------------------------------------------


def reason_header(code: int, text: Optional[str]) -> Optional[str]:
    """RFC 3326 ``Reason`` value; text that already is one (``SIP;cause=…``, ``Q.850;…``) is kept."""
    if not text:
        return None
    if re.match(r"\s*(SIP|Q\.850)\s*;", text, re.IGNORECASE):
        return text
    clean = "".join(ch for ch in text if ch.isprintable())
    return f"SIP;cause={code};text={quote(clean)}"


def sdp_direction(body: bytes) -> tuple[str, bool]:
    """(direction of the first audio stream, is it a hold?) per RFC 3264 §5.1 / §8.4.

    Hold is ``sendonly``, ``inactive`` or a ``c=`` of 0.0.0.0 (media level, else
    session).  Raises ``SDPParseError`` / ``NegotiationError`` for an unusable body.
    """
    session = sdp.parse(body)
    _, media = sdp.audio_media(session)
    return sdp.media_direction(session, media), sdp.is_hold(session, media)


def with_direction(body: bytes, direction: str) -> bytes:
    """``body`` with its audio stream set to ``direction`` and the o= version bumped (RFC 3264 §8)."""
    session = sdp.parse(body)
    index, media = sdp.audio_media(session)
    streams = list(session.media)
    streams[index] = dataclasses.replace(media, direction=direction)
    origin = session.origin
    if is_number(origin.session_version):
        origin = dataclasses.replace(origin, session_version=str(int(origin.session_version) + 1))
    return dataclasses.replace(session, origin=origin, direction=None, media=tuple(streams)).to_bytes()


mirror_direction = sdp.mirror_direction


def minimal_offer(host: str, port: int, session_id: Optional[int] = None) -> bytes:
    """A PCMU + telephone-event offer for calls placed before a media engine is attached."""
    sid = session_id if session_id is not None else int.from_bytes(generate_tag()[:8].encode(), "big") % 10**9
    return (
        "v=0\r\n"
        f"o=- {sid} {sid} IN IP4 {host}\r\n"
        "s=activecall\r\n"
        f"c=IN IP4 {host}\r\n"
        "t=0 0\r\n"
        f"m=audio {port} RTP/AVP 0 101\r\n"
        "a=rtpmap:0 PCMU/8000\r\n"
        "a=rtpmap:101 telephone-event/8000\r\n"
        "a=fmtp:101 0-15\r\n"
        "a=ptime:20\r\n"
        "a=sendrecv\r\n"
    ).encode()


def parse_dtmf_info(body: bytes, content_type: Optional[str]) -> Optional[Dtmf]:
    """``Signal=5`` / ``Duration=160`` (application/dtmf-relay) or a bare digit (application/dtmf)."""
    text = body.decode("utf-8", "replace").strip()
    if not text:
        return None
    if content_type == "application/dtmf" and re.fullmatch(r"[0-9A-Da-d*#]|1[0-6]", text):
        return Dtmf(_digit(text))
    fields = {}
    for line in text.splitlines():
        key, eq, value = line.partition("=")
        if eq:
            fields[key.strip().lower()] = value.strip()
    signal = fields.get("signal")
    if not signal or not re.fullmatch(r"[0-9A-Da-d*#]|1[0-6]", signal):
        return None
    duration = fields.get("duration")
    return Dtmf(_digit(signal), int(duration) if duration and is_number(duration) else None)


def _digit(signal: str) -> str:
    """RFC 4733 event numbers 10–15 as the digits they stand for."""
    return {"10": "*", "11": "#", "12": "A", "13": "B", "14": "C", "15": "D", "16": "!"}.get(signal, signal.upper())


def parse_sipfrag(body: bytes) -> Optional[tuple[int, str]]:
    """``SIP/2.0 180 Ringing`` (RFC 3420) -> (180, "Ringing")."""
    first = body.decode("utf-8", "replace").strip().splitlines()[:1]
    m = re.match(r"SIP/2\.0\s+(\d{3})\s*(.*)", first[0]) if first else None
    return (int(m.group(1)), m.group(2).strip()) if m else None


def _python_template(rewrite: str) -> str:
    """``$1`` / ``${1}`` (the original's regex crate syntax) as Python's ``\\g<1>``; ``\\1`` stays."""
    out = re.sub(r"\$\{(\w+)\}|\$(\d+)", lambda m: f"\\g<{m.group(1) or m.group(2)}>", rewrite.replace("$$", "\0"))
    return out.replace("\0", "$")


def apply_rewrites(uri: str, rewrites: Sequence) -> str:
    """Each matching ``[[rewrites]]`` rule in order, chained; the first match of each is replaced."""
    for rule in rewrites:
        try:
            pattern = re.compile(rule.match)
        except re.error:
            log.warn("rewrite rule {match!r} is not a valid regex; skipped", match=rule.match)
            continue
        if pattern.search(uri):
            uri = pattern.sub(_python_template(rule.rewrite), uri, count=1)
    return uri


def server_host(server: str) -> str:
    """``sip:pbx.example.com:5060;transport=udp`` -> ``pbx.example.com`` (lower case)."""
    rest = re.sub(r"^sips?:", "", server.strip(), flags=re.IGNORECASE).split(";", 1)[0]
    rest = rest.rsplit("@", 1)[-1]
    if rest.startswith("["):
        return rest[1:rest.find("]")].lower()
    return rest.split(":", 1)[0].lower()


def credentials_for(target: URI, register_users: Sequence):
    """The credential of the first enabled ``[[register_users]]`` entry whose server host is the target's."""
    host = target.host.lower()
    for user in register_users:
        if user.disabled or user.credential is None:
            continue
        if server_host(user.server) == host:
            return user.credential
    return None


# -- calls ---------------------------------------------------------------------------------------


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
            self.ua.respond(txn, 200)
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
        if not refer.decided:
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

    After accepting, ``progress(status, reason)`` sends NOTIFY sipfrag updates;
    a final status (>= 200) ends the implicit subscription.
    """

    def __init__(self, call: SipCall, request: Request, txn: ServerTransaction):
        self.call = call
        self.request = request
        self.txn = txn
        self.refer_to = parse_address(request.headers.get("Refer-To")).uri
        referred = request.headers.get("Referred-By")
        self.referred_by = referred
        self.decided = False
        self.accepted = False
        self._finished = False

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

    def progress(self, status: int, reason: Optional[str] = None) -> defer.Deferred:
        """NOTIFY the referrer with ``SIP/2.0 <status> <reason>``."""
        from activecall.sip.message import REASON_PHRASES

        if not self.accepted or self._finished:
            return defer.fail(CallStateError("no active REFER subscription"))
        final = status >= 200
        self._finished = final
        state = "terminated;reason=noresource" if final else "active;expires=60"
        body = f"SIP/2.0 {status} {reason or REASON_PHRASES.get(status, '')}\r\n".encode()
        d = self.call.send_request("NOTIFY", headers=[("Event", "refer"), ("Subscription-State", state)],
                                   body=body, content_type="message/sipfrag;version=2.0")
        d.addErrback(lambda f: log.info("REFER NOTIFY failed: {err}", err=f.getErrorMessage()))
        return d


def _sips_requested(request: Request) -> bool:
    """RFC 3261 §12.1.1: a UAS's Contact must be a SIPS URI when the request's Request-URI, or its top
    Record-Route (else its Contact), is one.  Otherwise ours is ``sip:...;transport=tls``: libre (baresip 1.0)
    cannot even send its ACK to a ``sips:`` target."""
    if request.uri.scheme == "sips":
        return True
    try:
        record_route = request.headers.get_all("Record-Route")
        peer = parse_address(record_route[0]) if record_route else (request.contacts or [None])[0]
    except SIPParseError:
        return False
    return peer is not None and peer.uri is not None and peer.uri.scheme == "sips"


class _ReliableProvisional:
    """A reliable provisional response of ours (RFC 3262) waiting for its PRACK."""

    __slots__ = ("rseq", "response", "sent_at", "timer")

    def __init__(self, rseq: int, response: Response, sent_at: float):
        self.rseq, self.response, self.sent_at, self.timer = rseq, response, sent_at, None

    def stop(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


class InboundCall(SipCall):
    """An INVITE we received.  The invite handler calls ``ringing``, ``answer`` or ``reject``.

    States: pending → ringing → answering (2xx sent) → confirmed (ACK) →
    terminating → ended.  Pending past ``accept_timeout`` gets a final 480.
    """

    direction = "inbound"

    def __init__(self, ua: "UserAgent", invite: Request, txn: InviteServerTransaction):
        super().__init__(ua)
        self.invite = invite
        self.txn = txn
        transport = txn.source.transport
        contact = Address(parse_uri(ua.transport.contact_uri(transport=transport)))
        if contact.uri.scheme == "sips" and not _sips_requested(invite):
            contact.uri.scheme = "sip"  # keeps ;transport=tls
        self.dialog = Dialog.as_uas(invite, generate_tag(), contact, transport=transport)
        self.offer = invite.body if invite.content_type in (None, SDP) else b""
        self.remote_sdp = self.offer
        self.state = "pending"
        self.final_response: Optional[Response] = None
        self._retransmitter = None
        self._answered: list[defer.Deferred] = []
        #: the session timer our 2xx will set (RFC 4028), from the INVITE's Session-Expires
        self.timer_terms: Optional[session_timer.Negotiated] = None
        #: RFC 3262: the caller requires reliable provisional responses (we send them only then)
        self.reliable_provisionals = "100rel" in option_tags(invite, "Require")
        self._answer_queued = False
        self._rseq = random.randint(1, 2**30)
        self._unacked: Optional[_ReliableProvisional] = None  # the one awaiting its PRACK
        self._after_prack: list[Callable[[], None]] = []  # what waits for that PRACK
        self._accept_timer = ua.reactor.callLater(ua.config.accept_timeout, self._accept_timeout)

    @property
    def call_id(self) -> str:
        return self.invite.call_id or ""

    @property
    def caller(self) -> str:
        """The From URI."""
        return str(self.invite.from_.uri)

    @property
    def callee(self) -> str:
        """The To URI."""
        return str(self.invite.to.uri)

    def incoming_invite(self):
        """The handlers' view of this INVITE (activecall.call.handlers.IncomingInvite)."""
        from activecall.call.handlers import IncomingInvite

        return IncomingInvite(
            caller=self.caller, callee=self.callee, headers=tuple(self.invite.headers),
            offer=self.offer.decode("utf-8", "replace"), dialog_id=self.dialog_id, call_id=self.call_id,
            from_tag=self.dialog.remote_tag, to_tag=self.dialog.local_tag,
        )

    def _dialog_headers(self) -> list[tuple[str, str]]:
        """Contact and the Record-Route copy every dialog-creating response needs (RFC 3261 §12.1.1)."""
        return ([("Record-Route", rr) for rr in self.invite.headers.get_all("Record-Route")]
                + [("Contact", str(self.dialog.local_contact))])

    def ringing(self, early_media_sdp: Optional[bytes] = None) -> None:
        """180 Ringing, or 183 Session Progress with ``early_media_sdp``."""
        if self.state not in ("pending", "ringing"):
            raise CallStateError(f"ringing in state {self.state}")
        headers = self._dialog_headers()
        if early_media_sdp:
            headers.append(("Content-Type", SDP))
            self.local_sdp = early_media_sdp
        self._send_provisional(183 if early_media_sdp else 180, headers, early_media_sdp or b"")
        self.state = "ringing"

    # -- reliable provisional responses (RFC 3262) --

    def _send_provisional(self, status: int, headers: list, body: bytes) -> None:
        if not self.reliable_provisionals:
            self.ua.respond(self.txn, status, headers=headers, body=body, to_tag=self.dialog.local_tag)
            return
        if self._unacked is not None:  # one unacknowledged reliable provisional at a time (§3)
            self._after_prack.append(lambda: self._send_provisional(status, headers, body))
            return
        self._rseq += 1
        response = self.ua.respond(self.txn, status, headers=headers + [("Require", "100rel"),
                                                                         ("RSeq", str(self._rseq))],
                                   body=body, to_tag=self.dialog.local_tag)
        self._unacked = _ReliableProvisional(self._rseq, response, self.ua.reactor.seconds())
        self._retransmit_provisional(self.ua.layer.t1, 0.0)

    def _retransmit_provisional(self, interval: float, elapsed: float) -> None:
        """Resend at T1, 2·T1, 4·T1 … after the first sending, on deadlines from that moment (§3)."""
        limit = 64 * self.ua.layer.t1
        due = min(elapsed + interval, limit)
        unacked = self._unacked

        def fire():
            if self._unacked is not unacked or self.state not in ("pending", "ringing"):
                return
            if due >= limit:  # no PRACK for 64*T1: reject the INVITE with a 5xx
                log.info("no PRACK for our reliable {status} on {id}: 504", status=unacked.response.status,
                         id=self.dialog_id)
                self._unacked = None
                self._after_prack = []
                self.reject(504, "no PRACK for a reliable provisional response")
                return
            self.txn.send_response(unacked.response)
            self._retransmit_provisional(interval * 2, due)

        unacked.timer = self.ua.reactor.callLater(max(0.0, unacked.sent_at + due - self.ua.reactor.seconds()), fire)

    def _stop_provisionals(self) -> None:
        if self._unacked is not None:
            self._unacked.stop()
        self._unacked = None
        self._after_prack = []

    def _prack(self, request: Request, txn: ServerTransaction) -> None:
        if not self.reliable_provisionals:
            super()._prack(request, txn)
            return
        rack = (request.headers.get("RAck") or "").split()
        unacked = self._unacked
        if (unacked is None or len(rack) != 3 or rack[0] != str(unacked.rseq)
                or rack[1] != str(self.invite.cseq.seq) or rack[2].upper() != "INVITE"):
            self.ua.respond(txn, 481, "No Matching Provisional Response")
            return
        unacked.stop()
        self._unacked = None
        self.ua.respond(txn, 200)
        while self._after_prack and self._unacked is None and self.state in ("pending", "ringing"):
            self._after_prack.pop(0)()

    def answer(self, sdp: bytes) -> defer.Deferred:
        """200 OK with ``sdp``, resent until the ACK.  Fires with the ACK; fails ``CallFailed(408)`` without one.

        After a reliable provisional the 200 waits for its PRACK (RFC 3262 §3: its SDP must be settled)."""
        if self.state not in ("pending", "ringing") or self._answer_queued:
            return defer.fail(CallStateError(f"answer in state {self.state}"))
        if self._unacked is not None:
            self._cancel_accept_timer()  # decided: only the PRACK is awaited (64*T1 bounds that)
            self._answer_queued = True
            d: defer.Deferred = defer.Deferred()
            self._answered.append(d)

            def send():
                self._answer_queued = False
                waiting, self._answered = self._answered, []
                self.answer(sdp)
                self._answered[:0] = waiting

            self._after_prack.append(send)
            return d
        self._cancel_accept_timer()
        self.local_sdp = sdp
        headers = self._dialog_headers() + list(self.ua.capabilities()) + timer_headers(self.timer_terms)
        headers.append(("Content-Type", SDP))
        self.final_response = self.ua.respond(self.txn, 200, headers=headers, body=sdp, to_tag=self.dialog.local_tag)
        self.state = "answering"
        if self.timer_terms is not None:  # the caller is the INVITE's "uac"
            self._start_session_timer(self.timer_terms, we_refresh=self.timer_terms.refresher == "uas")
        self._retransmitter = self.ua.layer.retransmit_2xx(self.txn, self.final_response)
        self._retransmitter.done.addCallbacks(lambda _: None, self._no_ack)
        d: defer.Deferred = defer.Deferred()
        self._answered.append(d)
        return d

    def reject(self, code: int = 603, reason: Optional[str] = None) -> None:
        """A final non-2xx with ``Reason`` (RFC 3326) when ``reason`` is given."""
        if self.state not in ("pending", "ringing"):
            raise CallStateError(f"reject in state {self.state}")
        if code < 300:
            raise ValueError(f"reject needs a 3xx-6xx code, not {code}")
        self._cancel_accept_timer()
        value = reason_header(code, reason)
        self.ua.respond(self.txn, code, headers=[("Reason", value)] if value else (), to_tag=self.dialog.local_tag)
        self._end("rejected", code, "local", reason or "")

    def hangup(self, headers: Iterable[tuple[str, str]] = ()) -> defer.Deferred:
        """Before the answer: 603 Decline.  After: BYE (the ACK need not have arrived, RFC 3261 §15)."""
        if self.end is None and self.state in ("pending", "ringing"):
            self.reject(603)
            return self.when_ended()
        return super().hangup(headers)

    def _cancel_accept_timer(self) -> None:
        if self._accept_timer is not None and self._accept_timer.active():
            self._accept_timer.cancel()
        self._accept_timer = None

    def _accept_timeout(self) -> None:
        self._accept_timer = None
        if self.state in ("pending", "ringing"):
            # the original sent nothing here and left the caller hanging
            timeout = self.ua.config.accept_timeout
            log.info("inbound call {id} not accepted within {t:g}s: 480", id=self.dialog_id, t=timeout)
            self.ua.respond(self.txn, 480, headers=[("Reason", reason_header(480, "accept timeout"))],
                            to_tag=self.dialog.local_tag)
            self._end("timeout", 480, "local", f"not accepted within {timeout:g}s")

    def _ack_received(self, ack: Request) -> None:
        if self.state == "answering" and ack.cseq.seq == self.invite.cseq.seq:
            if self._retransmitter is not None:
                self._retransmitter.ack_received()
            self.dialog.confirm()
            self.state = "confirmed"
            if ack.body:  # delayed offer: the ACK carries the answer
                self.remote_sdp = ack.body
            self._emit(Established(self.remote_sdp))
            waiters, self._answered = self._answered, []
            for d in waiters:
                d.callback(ack)
            return
        super()._ack_received(ack)

    def _no_ack(self, failure: Failure) -> None:
        failure.trap(TransactionTimeout)
        if self.state != "answering":
            return
        log.warn("no ACK for our 200 on {id}: ending the call with BYE", id=self.dialog_id)
        waiters, self._answered = self._answered, []
        for d in waiters:
            d.errback(Failure(CallFailed(408, "no ACK for the 200 OK")))
        self.send_request("BYE").addErrback(lambda f: None)
        self._end("no-ack", 408, "remote", "no ACK for the 200 OK")

    def _cancelled(self) -> None:
        """The caller sent CANCEL: 487 (sent by us, with our tag) and an ``Ended``."""
        self._cancel_accept_timer()
        if self.state in ("pending", "ringing"):
            self.ua.respond(self.txn, 487, to_tag=self.dialog.local_tag)
            self._end("cancelled", 487, "remote")

    def _remote_bye(self) -> None:
        if self.state in ("pending", "ringing"):
            self._cancel_accept_timer()
            self.ua.respond(self.txn, 487, to_tag=self.dialog.local_tag)
        if self._retransmitter is not None:
            self._retransmitter.stop()
        super()._remote_bye()

    def _end(self, *args, **kwargs) -> None:
        self._cancel_accept_timer()
        self._stop_provisionals()
        if self._retransmitter is not None and self.state != "answering":
            self._retransmitter.stop()
        super()._end(*args, **kwargs)
        if self._answer_queued:  # the 200 was waiting for a PRACK and will never go out
            self._answer_queued = False
            waiters, self._answered = self._answered, []
            for d in waiters:
                d.errback(Failure(CallFailed(self.end.status or 487, "the call ended before it was answered")))


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


# -- the user agent --------------------------------------------------------------------------------


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
            # the original dropped these; PBXs use them as keep-alives
            self.respond(txn, 200, headers=self.capabilities())
        elif method in ("NOTIFY", "MESSAGE"):
            self.respond(txn, 200)  # e.g. Asterisk's out-of-dialog keep-alive NOTIFY
        else:  # BYE, INFO, UPDATE, PRACK, REFER outside any dialog
            self.respond(txn, 481)

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
        call = OutboundCall(self, invite, target, digest)
        self.calls.append(call)
        return call.start()


__all__ = [
    "UserAgent", "TransactionLayerService", "InboundCall", "OutboundCall", "SipCall", "IncomingRefer", "CallStateError", "CallFailed",
    "Provisional", "Established", "SdpUpdated", "HoldChanged", "Dtmf", "TransferRequested", "TransferProgress",
    "Ended", "reject_without_handler", "apply_rewrites", "credentials_for", "sdp_direction", "with_direction",
    "mirror_direction", "minimal_offer", "parse_dtmf_info", "parse_sipfrag", "reason_header",
]
