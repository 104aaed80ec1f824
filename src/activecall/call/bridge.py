"""The ``refer`` command: a B2BUA transfer, as the original does it.

The call (any type: WebSocket, WebRTC, SIP) stays where it is; a new outbound
SIP leg dials the ``callee`` with ``X-Referred-To`` / ``X-Referred-From`` /
``X-Referred-Id``, music on hold (``options.moh``) plays while it rings, and
when it answers the two are bridged through 16 kHz PCM: the caller's audio is
sent on the new leg, the callee's audio becomes the call's server-side track.
No answer within ``options.timeout`` (30 s) → ``reject{code 408, refer: true}``.
When the referred leg ends, ``autoHangup`` (default true) ends the call with
reason ``refer``.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from activecall.media.rtp import PortsExhausted
from activecall.media.rtp_leg import IMediaSession, MediaNegotiationError, RtpLeg
from activecall.media.tracks import PcmBuffer, Track
from activecall.protocol import commands as cmd
from activecall.protocol import events as ev

log = Logger(namespace="activecall.call.bridge")


class BridgeTrack(Track):
    """The referred party's voice as the call's server-side track; ends with the bridge."""

    kind = "bridge"

    def __init__(self, track_id: str):
        super().__init__(track_id, play_id=None)
        self.buffer = PcmBuffer()
        self.closed = False

    def _pull(self):
        return self.buffer.pop_frame()

    def _exhausted(self) -> bool:
        return self.closed


@implementer(IMediaSession)
class ReferredParty:
    """What the referred leg's RtpLeg sees as its 'session': it sends the caller's audio
    and hands the callee's audio to the bridge track."""

    def __init__(self, parent, track: BridgeTrack):
        self.parent = parent
        self.id = parent.id + ":refer"
        self.track = track
        self.to_callee = PcmBuffer()

    def tick(self):
        return self.to_callee.pop_frame()

    def audio_in(self, pcm) -> None:
        self.track.buffer.push(pcm)
        if len(self.track.buffer) > 16000:  # never let a stalled bridge grow without bound
            self.track.buffer.clear()

    def emit(self, event) -> None:
        if event.TAG == "dtmf":
            self.parent.emit(event)

    def now(self) -> int:
        return self.parent.now()


class Refer:
    """One refer attempt on ``session``."""

    def __init__(self, session, command: cmd.Refer, sip_calls):
        self.session = session
        self.command = command
        self.options = command.options or cmd.ReferOption()
        self.sip_calls = sip_calls
        self.call = None
        self.rtp: Optional[RtpLeg] = None
        self.track = BridgeTrack(session.playback.track_id)
        self.party = ReferredParty(session, self.track)
        self._timer = None
        self.bridged = False

    def start(self) -> None:
        s = self.session
        s.playback.stop_current(interrupted=True)
        if self.options.moh:
            s.playback.play(self.options.moh, self.options.moh)
        try:
            self.rtp = RtpLeg(self.party, self.sip_calls.media_clock, self.sip_calls.reactor,
                              host=self.sip_calls.config.rtp_bind_ip or self.sip_calls.ua.transport.advertised_host,
                              external_ip=self.sip_calls.config.external_ip, codecs=self.sip_calls.config.codecs,
                              latching=self.sip_calls.config.enable_rtp_latching)
            self.rtp.allocate(self.sip_calls.pool)
        except PortsExhausted as e:
            self._failed(503, str(e))
            return
        original = s.option
        headers = {
            "X-Referred-To": (original.callee if original and original.callee else s.extras.get("callee", "")),
            "X-Referred-From": (original.caller if original and original.caller else s.extras.get("caller", "")),
            "X-Referred-Id": s.id,
        }
        sip = self.options.sip
        if sip is not None and sip.headers:
            headers.update(sip.headers)
        callee = self.command.callee
        if not callee.startswith(("sip:", "sips:")):
            callee = "sip:" + callee
        call_id = self.options.callId or f"ref-{s.id}"
        try:
            self.call = self.sip_calls.ua.place_call(
                callee, self.rtp.offer().encode(), caller=self.command.caller or None,
                headers={k: v for k, v in headers.items() if v}, call_id=call_id)
        except Exception as e:
            self._failed(400, f"cannot call {callee}: {e}")
            return
        timeout = self.options.timeout or cmd.ReferOption.DEFAULT_TIMEOUT
        self._timer = self.sip_calls.reactor.callLater(timeout, self._timed_out)
        self.call.when_answered().addCallbacks(self._answered, self._not_answered)
        self.call.when_ended().addCallback(self._leg_ended)
        s.audio_sinks.append(self._to_callee)
        s.when_ended().addCallback(lambda _: self.stop())

    def _to_callee(self, pcm) -> None:
        if self.bridged:
            self.party.to_callee.push(pcm)

    def _timed_out(self) -> None:
        self._timer = None
        if self.call is not None and not self.call.is_ended:
            self.call.hangup()  # CANCEL
        self._failed(408, "Timeout when refer")

    def _answered(self, response) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        try:
            self.rtp.apply_answer(self.call.remote_sdp)
        except MediaNegotiationError as e:
            self.call.hangup()
            self._failed(488, str(e))
            return
        self.rtp.start()
        self.bridged = True
        s = self.session
        s.playback.start_track(self.track)  # MOH stops; trackStart{B}; trackEnd when the bridge ends
        s.emit(ev.Answer(trackId=s.playback.track_id, timestamp=s.now(),
                         sdp=self.call.remote_sdp.decode("utf-8", "replace"), refer=True))

    def _not_answered(self, failure) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self.session.state.value == "ended":
            return None
        code = getattr(failure.value, "status", 500)
        if code == 487 and self._timer is None:
            return None  # our own CANCEL after the timeout, already reported
        self._failed(code, getattr(failure.value, "reason", "") or failure.getErrorMessage())
        return None

    def _failed(self, code: int, reason: str) -> None:
        s = self.session
        s.playback.stop_current(interrupted=True)
        s.emit(ev.Reject(trackId=s.playback.track_id, timestamp=s.now(), reason=reason, code=code, refer=True))
        self._release()

    def _leg_ended(self, ended) -> None:
        was_bridged = self.bridged
        self._release()
        if was_bridged and self.session.state.value != "ended":
            auto = True if self.options.autoHangup is None else self.options.autoHangup
            if auto:
                self.session.end("refer", initiator="callee")

    def _release(self) -> None:
        self.bridged = False
        self.track.closed = True
        if self._to_callee in self.session.audio_sinks:
            self.session.audio_sinks.remove(self._to_callee)
        if self.rtp is not None:
            rtp, self.rtp = self.rtp, None
            rtp.close()

    def stop(self) -> defer.Deferred:
        """The call ended: hang the referred leg up too."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self.call is not None and not self.call.is_ended:
            d = self.call.hangup()
        else:
            d = defer.succeed(None)
        self._release()
        return d


def start_refer(session, command: cmd.Refer, sip_calls) -> Optional[Refer]:
    if sip_calls is None:
        session.error("refer", "refer needs SIP (the daemon has no SIP user agent)")
        return None
    refer = Refer(session, command, sip_calls)
    session.refer = refer
    refer.start()
    return refer
