"""``/call/webrtc``: the caller is a browser; media goes over WebRTC (aiortc).

aiortc is asyncio code; it runs inside the daemon's reactor because the
daemon runs Twisted's asyncio reactor (``--reactor=asyncio``), and every
coroutine is bridged with ``Deferred.fromFuture(asyncio.ensure_future(...))``.

Flow: ``invite`` with the browser's offer in ``option.offer`` (the original's
name) or ``option.sdp`` (the configuration guide's) -> the answer is built with
ICE gathering finished -> ``answer`` event carrying that SDP.  The leg then
moves audio both ways:

* in: aiortc ``AudioFrame`` (48 kHz opus, 8 kHz G.711, 16 kHz G.722) ->
  16 kHz mono int16 (PyAV resampler) -> 20 ms frames -> ``session.audio_in``;
* out: the shared media clock asks ``session.tick()`` for the bot's frame every
  20 ms (silence when nothing plays) and hands it to ``BotAudioTrack``, whose
  ``recv()`` aiortc's sender awaits — so the clock paces the RTP stream;
* keys the browser presses (RFC 4733, ``webrtc/dtmf.py``) become ``dtmf`` events.

Peer connections must be closed before the reactor stops or aiortc's decoder
thread keeps the process alive: ``PeerConnections`` (a child service plus a
``before shutdown`` trigger) closes every one that is still open.
"""

from __future__ import annotations

import asyncio
import fractions
from collections import deque
from typing import Optional

import av
import numpy as np
from aiortc import (RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCRtpSender,
                    RTCSessionDescription)
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from activecall.audio import FRAME_SAMPLES, SAMPLE_RATE
from activecall.call.interfaces import ICallConnector, ICallLeg, ITransferConnector
from activecall.call.manager import start_playbook
from activecall.config import parse_duration
from activecall.protocol import commands as cmd
from activecall.protocol import events as ev
from activecall.webrtc import dtmf
from activecall.webrtc.candidates import advertise_external_ip, strip_ipv6_candidates

log = Logger(namespace="activecall.webrtc")

#: outbound frames buffered for the sender (100 ms); older ones are dropped when it lags
MAX_QUEUED_FRAMES = 5
DEFAULT_HANDSHAKE_SECONDS = 30.0
#: ``option.codec`` -> aiortc MIME type (None: the browser's order, opus first)
CODEC_MIME = {"opus": "audio/opus", "pcmu": "audio/PCMU", "pcma": "audio/PCMA", "g722": "audio/G722"}


class WebRTCUnavailable(RuntimeError):
    """aiortc needs Twisted's asyncio reactor."""


def as_deferred(coro) -> defer.Deferred:
    """Run an asyncio coroutine on the reactor's loop; its result as a Deferred."""
    return defer.Deferred.fromFuture(asyncio.ensure_future(coro))


def check_asyncio_reactor(reactor) -> None:
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor

    if not isinstance(reactor, AsyncioSelectorReactor):
        raise WebRTCUnavailable("WebRTC calls need the asyncio reactor (run twistd --reactor=asyncio)")


def rtc_configuration(ice_servers) -> RTCConfiguration:
    """``[[ice_servers]]`` for aiortc.  None configured: host candidates only (aiortc's own default
    would query Google's STUN server, which stalls gathering on a machine without internet)."""
    servers = [RTCIceServer(urls=list(s.urls), username=s.username, credential=s.credential)
               for s in ice_servers]
    return RTCConfiguration(iceServers=servers)


def codec_preferences(name: Optional[str]):
    """aiortc codec capabilities with ``name`` first; None when the browser's order is fine."""
    if name is None or name.lower() in ("", "pcm"):
        return None
    mime = CODEC_MIME.get(name.lower())
    if mime is None:
        raise ValueError(f"codec {name!r} is not available on WebRTC (opus, pcmu, pcma, g722)")
    capabilities = RTCRtpSender.getCapabilities("audio").codecs
    first = [c for c in capabilities if c.mimeType.lower() == mime.lower()]
    return first + [c for c in capabilities if c not in first]


def handshake_seconds(option: cmd.CallOption) -> float:
    if option.handshakeTimeout is None:
        return DEFAULT_HANDSHAKE_SECONDS
    try:
        return parse_duration(option.handshakeTimeout) or DEFAULT_HANDSHAKE_SECONDS
    except ValueError:
        return DEFAULT_HANDSHAKE_SECONDS


def pcm_frame(pcm: np.ndarray, pts: int) -> av.AudioFrame:
    """A 16 kHz mono s16 ``AudioFrame`` for aiortc's encoders (they resample as they need)."""
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm, dtype=np.int16).reshape(1, -1),
                                       format="s16", layout="mono")
    frame.sample_rate = SAMPLE_RATE
    frame.pts = pts
    frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
    return frame


class BotAudioTrack(MediaStreamTrack):
    """The server-side track as aiortc sees it: frames pushed by the media clock."""

    kind = "audio"

    def __init__(self):
        super().__init__()
        self._frames: deque = deque()
        self._waiter: Optional[asyncio.Future] = None
        self._pts = 0
        self.frames_sent = 0
        self.frames_dropped = 0

    def push(self, pcm: np.ndarray) -> None:
        frame = pcm_frame(pcm, self._pts)
        self._pts += pcm.size
        if len(self._frames) >= MAX_QUEUED_FRAMES:
            self._frames.popleft()
            self.frames_dropped += 1
        self._frames.append(frame)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def recv(self):
        while not self._frames:
            if self.readyState != "live":
                raise MediaStreamError
            self._waiter = asyncio.get_event_loop().create_future()
            await self._waiter
        self.frames_sent += 1
        return self._frames.popleft()

    def stop(self):
        super().stop()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class FrameChunker:
    """Resamples whatever aiortc decodes to 16 kHz mono int16 and cuts 20 ms frames."""

    def __init__(self):
        self.resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        self._pending = np.zeros(0, dtype=np.int16)

    def feed(self, frame) -> list[np.ndarray]:
        parts = [self._pending]
        for out in self.resampler.resample(frame):
            parts.append(out.to_ndarray().reshape(-1).astype(np.int16, copy=False))
        data = np.concatenate(parts)
        whole = data.size - data.size % FRAME_SAMPLES
        self._pending = data[whole:].copy()
        return [data[i:i + FRAME_SAMPLES] for i in range(0, whole, FRAME_SAMPLES)]


@implementer(ICallLeg)
class WebRTCLeg:
    """One browser peer connection bound to one call session."""

    #: aiortc negotiates and decodes the codec itself; the session is handed 16 kHz audio either way
    codec = None

    def __init__(self, session, media_clock, config, registry: Optional["PeerConnections"] = None,
                 reactor=None):
        self.session = session
        self.media_clock = media_clock
        self.config = config
        self.registry = registry
        self.reactor = reactor if reactor is not None else session.clock
        self.pc = RTCPeerConnection(rtc_configuration(config.ice_servers if config is not None else ()))
        self.track = BotAudioTrack()
        self.chunker = FrameChunker()
        self.frames_in = 0
        self.connected = False
        self._ticking = False
        self._pumps: list[asyncio.Task] = []
        self._handshake = None
        self._closing: Optional[defer.Deferred] = None
        self.pc.on("track", self._on_track)
        self.pc.on("connectionstatechange", self._on_state)
        if registry is not None:
            registry.add(self)

    # -- negotiation ------------------------------------------------------------------------------

    def negotiate(self, offer: str, option: cmd.CallOption) -> defer.Deferred:
        """Deferred answer SDP (candidates gathered, IPv6 stripped, external_ip added)."""
        return as_deferred(self._negotiate(offer, option))

    async def _negotiate(self, offer: str, option: cmd.CallOption) -> str:
        ipv6 = bool(option.enableIpv6)
        if not ipv6:
            offer = strip_ipv6_candidates(offer)
        preferences = codec_preferences(option.codec)
        transceiver = self.pc.addTransceiver(self.track, direction="sendrecv")
        if preferences is not None:
            transceiver.setCodecPreferences(preferences)
        dtmf.watch(self.pc, self._dtmf)
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        await self.pc.setLocalDescription(await self.pc.createAnswer())  # gathers every candidate
        sdp = self.pc.localDescription.sdp
        if not ipv6:
            sdp = strip_ipv6_candidates(sdp)
        external = self.config.external_ip if self.config is not None else None
        if external:
            sdp = advertise_external_ip(sdp, external)
        self._handshake = self.reactor.callLater(handshake_seconds(option), self._handshake_expired)
        return sdp

    def _handshake_expired(self) -> None:
        self._handshake = None
        if not self.connected:
            log.warn("call {id}: WebRTC did not connect in time", id=self.session.id)
            self.session.error("webrtc", "the WebRTC connection was not established in time (handshakeTimeout)")
            self.session.end("failed", initiator="system")

    # -- state ------------------------------------------------------------------------------------

    def _on_state(self) -> None:
        state = self.pc.connectionState
        log.info("call {id}: WebRTC {state}", id=self.session.id, state=state)
        if state == "connected" and not self.connected:
            self.connected = True
            if self._handshake is not None and self._handshake.active():
                self._handshake.cancel()
            self._handshake = None
            # the bot's audio starts flowing only now, so a greeting is not spent before anyone hears it
            self.media_clock.add(self.on_tick)
            self._ticking = True
        elif state == "failed":
            self.session.error("webrtc", "the WebRTC connection failed")
            self.session.end("failed", initiator="system")
        elif state == "closed" and self._closing is None:
            self.session.end("caller", initiator="caller")  # the browser closed its peer connection

    # -- media ------------------------------------------------------------------------------------

    def _on_track(self, track) -> None:
        if track.kind == "audio":
            self._pumps.append(asyncio.ensure_future(self._pump(track)))

    async def _pump(self, track) -> None:
        """Caller audio: every decoded frame, as 20 ms 16 kHz frames, into the session."""
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            try:
                for pcm in self.chunker.feed(frame):
                    self.frames_in += 1
                    self.session.audio_in(pcm)
            except Exception:
                log.failure("call {id}: inbound WebRTC audio failed", id=self.session.id)

    def _dtmf(self, digit: str) -> None:
        """A key the browser pressed (``RTCDTMFSender.insertDTMF``), once per press."""
        self.session.emit(ev.Dtmf(trackId=self.session.id, timestamp=self.session.now(), digit=digit))

    def on_tick(self) -> None:
        """Media clock: the bot's frame (or silence) for the browser."""
        frame = self.session.tick()
        self.track.push(frame if frame is not None else np.zeros(FRAME_SAMPLES, dtype=np.int16))

    # -- teardown ---------------------------------------------------------------------------------

    def close(self) -> defer.Deferred:
        """Close the peer connection once; every caller gets a Deferred firing when it is closed."""
        if self._closing is None:
            if self._ticking:
                self.media_clock.remove(self.on_tick)
                self._ticking = False
            if self._handshake is not None and self._handshake.active():
                self._handshake.cancel()
            self.track.stop()
            self._closing = as_deferred(self.pc.close())
            self._closing.addErrback(lambda f: log.failure("closing a peer connection failed", f))
            if self.registry is not None:
                self._closing.addBoth(lambda _: self.registry.discard(self))
        d = defer.Deferred()
        self._closing.addBoth(lambda r: (d.callback(None), r)[1])
        return d


@implementer(ICallConnector, ITransferConnector)
class WebRTCConnector:
    """The call-type glue for ``/call/webrtc``: ``invite`` answers the browser's offer."""

    def __init__(self, session, protocol, media_clock, config, registry=None, reactor=None):
        from activecall.call.websocket_call import start_pending_playbook

        self.session = session
        self.protocol = protocol
        self.media_clock = media_clock
        self.config = config
        self.registry = registry
        self.reactor = reactor
        self._warned_binary = False
        start_pending_playbook(session)

    def binary_received(self, payload: bytes) -> None:
        if not self._warned_binary:
            self._warned_binary = True
            self.session.error("webrtc", "binary frames are ignored on /call/webrtc: audio goes over WebRTC")

    def invite(self, command: cmd.Invite):
        session = self.session
        if session.leg is not None:
            session.error("command", "the call is already started")
            return None
        option = command.option.merged_over(session.option)
        offer = option.sdp_offer
        if not offer or not offer.strip():
            session.error("invite", "option.offer (or option.sdp) must hold the browser's SDP offer", code=400)
            return None
        try:
            check_asyncio_reactor(self.reactor if self.reactor is not None else _default_reactor())
            codec_preferences(option.codec)
        except (ValueError, WebRTCUnavailable) as e:
            session.error("invite", str(e), code=400)
            return None
        session.option = option
        if option.playbook and session.playbook_runner is None:
            if start_playbook(session, option.playbook) is None:
                return None  # refused: error{sender: "playbook"} sent, the call is ending
        leg = WebRTCLeg(session, self.media_clock, self.config, self.registry, reactor=self.reactor)
        session.leg = leg
        d = leg.negotiate(offer, session.option)

        def answered(sdp):
            if session.leg is leg and not session._ending:
                session.answered(sdp)

        def failed(failure):
            log.warn("call {id}: WebRTC negotiation failed: {e}", id=session.id, e=failure.getErrorMessage())
            session.error("invite", f"cannot answer the WebRTC offer: {failure.getErrorMessage()}", code=400)
            return session.end("failed", initiator="system")

        d.addCallbacks(answered, failed)
        return d

    def refer(self, command: cmd.Refer) -> None:
        """Bridge this browser call to a SIP callee (the original's B2BUA refer): the caller's audio
        reaches the callee through the session's audio sinks, the callee's voice becomes the
        server-side track this leg already plays."""
        from activecall.call.bridge import start_refer

        manager = self.session.manager
        start_refer(self.session, command, manager.sip_calls if manager is not None else None)

    def accept(self, command: cmd.Accept) -> None:
        self.session.error("command", "accept is for a pending inbound SIP call (use /call/sip)")


def _default_reactor():
    from twisted.internet import reactor

    return reactor


class PeerConnections(service.Service):
    """Every open WebRTC leg, so none outlives the reactor (aiortc would hang the exit).

    As a child service it closes what is left once the calls have ended; its
    ``before shutdown`` trigger also closes them if the service tree's grace
    period ran out first.
    """

    name = "webrtc"

    def __init__(self, reactor, grace: float = 10.0):
        self.reactor = reactor
        self.grace = grace
        self.legs: set = set()
        self._trigger = None

    def add(self, leg) -> None:
        self.legs.add(leg)

    def discard(self, leg) -> None:
        self.legs.discard(leg)

    def __len__(self) -> int:
        return len(self.legs)

    def close_all(self) -> defer.Deferred:
        return defer.DeferredList([leg.close() for leg in list(self.legs)], consumeErrors=True)

    def startService(self):
        service.Service.startService(self)
        adder = getattr(self.reactor, "addSystemEventTrigger", None)
        if adder is not None:
            self._trigger = adder("before", "shutdown", self._before_shutdown)

    def stopService(self):
        service.Service.stopService(self)
        return self.close_all()

    def _before_shutdown(self):
        """Wait for the legs to close with their calls; force the rest after the grace period."""
        self._trigger = None
        if not self.legs:
            return None
        waits = []
        for leg in list(self.legs):
            d = defer.Deferred()
            leg.session.when_ended().addBoth(lambda _, d=d: d.callback(None) if not d.called else None)
            waits.append(d)
        d = defer.DeferredList(waits, consumeErrors=True)  # a timeout cancels the waits: no unhandled errors
        d.addTimeout(self.grace, self.reactor)
        d.addErrback(lambda f: f.trap(defer.TimeoutError, defer.CancelledError))
        d.addCallback(lambda _: self.close_all())
        return d
