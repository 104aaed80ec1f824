"""The media half of one SIP call: a bound RTP/RTCP port pair and everything
that flows through it.

Inbound: RTP (SRTP-unprotected when SDES was agreed) from the negotiated
remote, or from a new address when latching is on (symmetric RTP behind NAT);
packets from strangers are dropped.  telephone-event packets on any
negotiated PT become one ``dtmf`` event per key press; audio goes through the
adaptive jitter buffer and, on each media-clock tick, is decoded to 16 kHz
and handed to the session (silence while the peer holds the call).

Outbound: on each tick the session's bot frame (or a queued RFC 4733 digit) is
encoded and sent.  Unlike the original, which sent nothing while nothing
played, we send silence so NAT bindings and the peer's RTP timeout stay
happy.  RTCP SR every 5 s (to port+1, or muxed) and a BYE at the end.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from twisted.internet import defer, protocol, task
from twisted.logger import Logger

from activecall.api import events as ev
from activecall.media import codecs as codec_mod
from activecall.media.dtmf import DtmfReceiver, DtmfSender
from activecall.media.jitter import JitterBuffer
from activecall.media.rtp import (
    Bye, ReceiveStats, ReportBlock, RtpError, RtpPacket, RtpStream, SourceDescription, is_rtcp,
    parse_rtcp, random_ssrc, serialize_rtcp,
)
from activecall.media.srtp import (
    NoAcceptableCrypto, SrtpContext, SrtpError, answer_crypto, match_answer, offer_keys,
)
from activecall.media.tracks import FRAME_SAMPLES
from activecall.sip import sdp as sdp_mod

log = Logger(namespace="activecall.media.rtp")

RTCP_INTERVAL = 5.0
LATCH_QUIET_SECONDS = 0.5
SILENCE = np.zeros(FRAME_SAMPLES, dtype=np.int16)


class MediaNegotiationError(Exception):
    """The remote SDP cannot be used (no common codec, SRTP mismatch): answer 488."""

    status = 488


class _Receiver(protocol.DatagramProtocol):
    noisy = False  # no "Starting protocol" log line per port, per call

    def __init__(self, leg: "RtpLeg", rtcp: bool):
        self.leg = leg
        self.rtcp = rtcp

    def datagramReceived(self, data, addr):
        try:
            self.leg.datagram_received(data, addr, self.rtcp)
        except Exception:
            log.failure("RTP packet from {addr} could not be handled", addr=addr)


class RtpLeg:
    """One call's RTP session.  ``allocate`` binds ports; ``offer``/``answer``
    negotiate; ``start`` joins the media clock; ``close`` releases everything."""

    def __init__(self, session, media_clock, reactor, *, host: str, external_ip: Optional[str] = None,
                 codecs=("pcmu", "pcma", "g722", "opus", "telephone_event"), latching: bool = True,
                 metrics=None):
        self.session = session
        self.media_clock = media_clock
        self.reactor = reactor
        self.host = host
        self.external_ip = external_ip
        self.codecs = tuple(codecs)
        self.latching = latching
        self.metrics = metrics
        self.ports = None
        self.ssrc = random_ssrc()
        self.negotiated: Optional[sdp_mod.Negotiated] = None
        self.remote_rtp = None
        self.remote_rtcp = None
        self.srtp: Optional[SrtpContext] = None
        self._offered_keys = ()
        self.stream: Optional[RtpStream] = None
        self.encoder = None
        self._decoders: dict[int, object] = {}
        self.jitter: Optional[JitterBuffer] = None
        self.stats: Optional[ReceiveStats] = None
        self.remote_ssrc: Optional[int] = None
        self.dtmf_in = DtmfReceiver(())
        self.dtmf_out: Optional[DtmfSender] = None
        self.on_hold = False
        self.running = False
        self._rtcp_loop = None
        self.packets_in = 0
        self.packets_out = 0
        self.strangers = 0
        self._heard_remote_at: Optional[float] = None

    # -- set-up ---------------------------------------------------------------------------------

    def allocate(self, pool) -> None:
        """Bind an RTP/RTCP port pair (raises PortsExhausted)."""
        self.ports = pool.allocate(lambda: _Receiver(self, False), lambda: _Receiver(self, True))

    @property
    def local_port(self) -> int:
        return self.ports.rtp_port

    def offer(self, srtp: bool = False) -> str:
        """Our SDP offer (RTP/SAVP with two a=crypto keys when ``srtp``)."""
        self._offered_keys = offer_keys() if srtp else ()
        offer = sdp_mod.build_offer(
            self.codecs, self.host, self.local_port, external_ip=self.external_ip,
            crypto=[k.crypto() for k in self._offered_keys], ssrc=self.ssrc, ptime=20)
        return offer.to_text()

    def apply_answer(self, answer_text) -> None:
        """Configure from the peer's answer to our offer (raises MediaNegotiationError)."""
        try:
            answer = sdp_mod.parse(answer_text)
            negotiated = sdp_mod.negotiate_as_offerer(answer, self.codecs)
            if self._offered_keys:
                if not negotiated.remote_crypto:
                    raise MediaNegotiationError("we required SRTP and the answer is plain RTP")
                ours, theirs = match_answer(self._offered_keys, negotiated.remote_crypto)
                self.srtp = SrtpContext(ours, theirs)
            elif negotiated.remote_crypto:
                raise MediaNegotiationError("the answer carries a=crypto for our plain RTP offer")
        except (sdp_mod.SDPParseError, sdp_mod.NegotiationError, NoAcceptableCrypto) as e:
            raise MediaNegotiationError(str(e)) from None
        self._configure(negotiated)

    def answer(self, offer_text, srtp_required: bool = False) -> str:
        """Our answer to the peer's offer (raises MediaNegotiationError → 488)."""
        try:
            offer = sdp_mod.parse(offer_text)
            _, m = sdp_mod.audio_media(offer)
            keys = ()
            if m.proto in sdp_mod.SECURE_PROTOS:
                theirs, ours = answer_crypto(m.crypto)
                keys = (ours,)
                self.srtp = SrtpContext(ours, theirs)
            elif srtp_required:
                raise MediaNegotiationError("SRTP is required for this call and the offer is plain RTP")
            answer, negotiated = sdp_mod.build_answer(
                offer, self.codecs, self.host, self.local_port, external_ip=self.external_ip,
                crypto=[k.crypto() for k in keys], ssrc=self.ssrc)
        except (sdp_mod.SDPParseError, sdp_mod.NegotiationError, NoAcceptableCrypto) as e:
            raise MediaNegotiationError(str(e)) from None
        self._configure(negotiated)
        return answer.to_text()

    def reoffer(self, offer_text) -> tuple[str, bool]:
        """A re-INVITE/UPDATE from the peer: (our answer, on_hold).  Hold → inbound silence."""
        offer = sdp_mod.parse(offer_text)
        try:
            answer, negotiated = sdp_mod.build_answer(
                offer, self.codecs, self.host, self.local_port, external_ip=self.external_ip,
                crypto=[self.srtp.local.crypto()] if self.srtp else [], ssrc=self.ssrc)
        except sdp_mod.NegotiationError as e:
            raise MediaNegotiationError(str(e)) from None
        self._configure(negotiated)
        return answer.to_text(), negotiated.on_hold

    def _configure(self, negotiated: sdp_mod.Negotiated) -> None:
        self.negotiated = negotiated
        self.on_hold = negotiated.on_hold
        self.remote_rtp = negotiated.remote_rtp
        self.remote_rtcp = negotiated.remote_rtcp
        send = negotiated.send_codec
        if self.encoder is None or self.encoder.payload_type != send.payload_type:
            self.encoder = codec_mod.create_for_payload(send.payload_type, send.encoding, send.clock_rate)
            self.stream = RtpStream(send.payload_type, self.encoder.clock_rate, ssrc=self.ssrc)
            self.jitter = JitterBuffer(clock_rate=self.encoder.clock_rate)
        self.dtmf_in = DtmfReceiver(f.payload_type for f in negotiated.dtmf)
        pt = negotiated.dtmf_payload_type
        self.dtmf_out = DtmfSender(clock_rate=self.encoder.clock_rate) if pt is not None else None
        self._dtmf_pt = pt

    def start(self) -> None:
        """Join the media clock and start RTCP reports."""
        if self.running:
            return
        self.running = True
        self.media_clock.add(self.on_tick)
        self._rtcp_loop = task.LoopingCall(self._send_report)
        self._rtcp_loop.clock = self.reactor
        self._rtcp_loop.start(RTCP_INTERVAL, now=False)

    # -- inbound ---------------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr, on_rtcp_port: bool) -> None:
        if on_rtcp_port or is_rtcp(data):
            self._rtcp_received(data, addr)
            return
        if self.negotiated is None:
            return
        now = self.reactor.seconds()
        if tuple(addr) != tuple(self.remote_rtp) and not self._may_latch(now):
            self.strangers += 1
            return
        if self.srtp is not None:
            try:
                data = self.srtp.unprotect(data)
            except SrtpError:
                self.strangers += 1
                return
        try:
            packet = RtpPacket.parse(data)
        except RtpError:
            return
        pt = packet.payload_type
        if pt not in self.negotiated.receive_payload_types:
            self.strangers += 1
            return
        if tuple(addr) == tuple(self.remote_rtp):
            self._heard_remote_at = now
        else:
            log.info("RTP latching: {old} -> {new}", old=self.remote_rtp, new=addr)
            self._heard_remote_at = now
            self.remote_rtp = tuple(addr)
            if self.remote_rtcp is not None:
                self.remote_rtcp = (addr[0], addr[1] + 1)
        if packet.ssrc != self.remote_ssrc:
            self.remote_ssrc = packet.ssrc  # a new source (or the first): start over cleanly
            self.stats = ReceiveStats(packet.ssrc, self.encoder.clock_rate)
            if self.jitter is not None:
                self.jitter.reset()
        self.packets_in += 1
        if self.metrics is not None:
            self.metrics.rtp_packets.labels(direction="in").inc()
        self.stats.update(packet.sequence, packet.timestamp, self.reactor.seconds())
        if self.dtmf_in.handles(pt):
            digit = self.dtmf_in.receive(pt, packet.payload)
            if digit is not None:
                self.session.emit(ev.Dtmf(trackId=self.session.id, timestamp=self.session.now(), digit=digit))
            return
        self.jitter.push(packet.sequence, packet.timestamp, packet.payload, self.reactor.seconds(),
                         payload_type=pt, marker=packet.marker)

    def _may_latch(self, now: float) -> bool:
        """Symmetric RTP: follow a new source address when nothing came from the
        negotiated one yet (NAT: the SDP shows a private address) or when the
        current source has gone quiet (a NAT rebinding) — never while it streams,
        so a stranger cannot hijack a live call."""
        if not self.latching:
            return False
        return self._heard_remote_at is None or now - self._heard_remote_at >= LATCH_QUIET_SECONDS

    def _rtcp_received(self, data: bytes, addr) -> None:
        if self.srtp is not None:
            try:
                data = self.srtp.unprotect_rtcp(data)
            except SrtpError:
                return
        try:
            packets = parse_rtcp(data)
        except (ValueError, RtpError):
            return
        for p in packets:
            if isinstance(p, Bye):
                log.debug("RTCP BYE from {addr}", addr=addr)

    def _decoder(self, pt: int):
        decoder = self._decoders.get(pt)
        if decoder is None:
            fmt = next((f for f in self.negotiated.codecs if f.payload_type == pt), None)
            if fmt is None:
                return None
            decoder = codec_mod.create_for_payload(pt, fmt.encoding, fmt.clock_rate)
            self._decoders[pt] = decoder
        return decoder

    # -- the media tick --------------------------------------------------------------------------

    def on_tick(self) -> None:
        self._play_inbound()
        self._send_outbound()

    def _play_inbound(self) -> None:
        if self.jitter is None:
            return
        frame = self.jitter.pop()
        if frame is None:
            return
        if frame.concealed:
            pcm = SILENCE
        else:
            decoder = self._decoder(frame.payload_type)
            if decoder is None:
                return
            try:
                pcm = decoder.decode(frame.payload)
            except Exception:
                log.debug("undecodable RTP payload (PT {pt})", pt=frame.payload_type)
                return
        if self.on_hold:
            pcm = np.zeros_like(pcm)  # hold: the caller's line is silent, processors still run
        self.session.audio_in(pcm)

    def _send_outbound(self) -> None:
        if self.stream is None or self.remote_rtp is None:
            return
        step = self.encoder.timestamp_step
        if self.dtmf_out is not None and self.dtmf_out.busy:
            frame = self.dtmf_out.tick(self.stream.timestamp)
            if frame is not None:
                packet = self.stream.next_packet(frame.payload, step, marker=frame.marker,
                                                 payload_type=self._dtmf_pt, timestamp=frame.timestamp)
                self._send(packet)
                return
        pcm = self.session.tick()
        if self.negotiated.local_direction in ("recvonly", "inactive"):
            self.stream.skip(step)
            return
        payload = self.encoder.encode(SILENCE if pcm is None else pcm)
        self._send(self.stream.next_packet(payload, step))

    def _send(self, packet: RtpPacket) -> None:
        data = packet.serialize()
        if self.srtp is not None:
            data = self.srtp.protect(data)
        if self.ports is not None and self.ports.rtp is not None:
            self.ports.rtp.write(data, self.remote_rtp)
            self.packets_out += 1
            if self.metrics is not None:
                self.metrics.rtp_packets.labels(direction="out").inc()

    def send_dtmf(self, digits: str, duration_ms: Optional[int] = None) -> None:
        """Queue RFC 4733 digits (raises ValueError when no telephone-event was negotiated)."""
        if self.dtmf_out is None:
            raise ValueError("the peer did not negotiate telephone-event (RFC 4733)")
        self.dtmf_out.send(digits, duration_ms)

    def flush(self) -> None:
        """Barge-in or re-INVITE: drop buffered inbound audio."""
        if self.jitter is not None:
            self.jitter.flush()

    # -- RTCP ------------------------------------------------------------------------------------

    def _report_blocks(self):
        if self.stats is None or self.stats.max_seq is None:
            return ()
        s = self.stats
        return (ReportBlock(ssrc=s.ssrc, fraction_lost=0, cumulative_lost=max(0, s.lost),
                            highest_sequence=s.extended_max, jitter=int(s.jitter)),)

    def _send_rtcp(self, packets) -> None:
        if self.remote_rtp is None or self.ports is None or self.stream is None:
            return
        data = serialize_rtcp(packets)
        if self.srtp is not None:
            data = self.srtp.protect_rtcp(data)
        if self.remote_rtcp is None:  # rtcp-mux
            port, target = self.ports.rtp, self.remote_rtp
        else:
            port, target = self.ports.rtcp or self.ports.rtp, self.remote_rtcp
        if port is not None:
            port.write(data, target)

    def _send_report(self) -> None:
        sr = self.stream.sender_report(self.reactor.seconds(), self._report_blocks())
        self._send_rtcp([sr, SourceDescription.cname(self.ssrc, "activecall")])

    # -- teardown --------------------------------------------------------------------------------

    def close(self) -> defer.Deferred:
        """Leave the clock, send RTCP BYE, release the ports (idempotent)."""
        if self.running:
            self.running = False
            self.media_clock.remove(self.on_tick)
            if self._rtcp_loop is not None and self._rtcp_loop.running:
                self._rtcp_loop.stop()
            if self.stream is not None:
                try:
                    self._send_rtcp([self.stream.sender_report(self.reactor.seconds()),
                                     Bye((self.ssrc,), b"call ended")])
                except Exception:
                    log.failure("RTCP BYE failed")
        if self.ports is not None:
            ports, self.ports = self.ports, None
            return ports.close()
        return defer.succeed(None)
