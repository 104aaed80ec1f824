"""The media half of one SIP call: a bound RTP/RTCP port pair and everything
that flows through it.

Inbound: RTP (SRTP-unprotected when SDES was agreed) from the negotiated
remote, or from a new address when latching is on (symmetric RTP behind NAT);
packets from strangers are dropped (by the kernel, once the socket is connected
to a remote that streams: ``_connect``).  telephone-event packets on any
negotiated PT become one ``dtmf`` event per key press; audio goes through the
adaptive jitter buffer and, on each media-clock tick, is decoded to 16 kHz
and handed to the session (silence while the peer holds the call).

Outbound: on each tick the session's bot frame (or a queued RFC 4733 digit) is
encoded and sent.

The sockets are not reactor ports: ``RtpTicker`` (one per media clock) reads
every leg's socket, decodes, asks every session for its frame, encodes and
sends, all legs together once per 20 ms, with G.711 coded for all legs in one
matrix product.  That is what lets one core carry hundreds of legs (see
docs/benchmarks.md); a packet waits in the kernel at most one tick, which the
jitter buffer absorbs anyway.  Unlike the original, which sent nothing while nothing
played, we send silence so NAT bindings and the peer's RTP timeout stay
happy.  RTCP SR every ~5 s (to port+1, or muxed) and a BYE at the end.
"""

from __future__ import annotations

import struct
from typing import Optional

import numpy as np
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import Attribute, Interface

from activecall.backlink import back_link
from activecall.audio import FRAME_SAMPLES
from activecall.media import codecs as codec_mod
from activecall.media._rtpcore import RtpLegCore
from activecall.media.dtmf import DtmfReceiver, DtmfSender
from activecall.media.jitter import JitterBuffer
from activecall.media.rtp import (
    CAN_DISCONNECT_UDP, Bye, ReceiveStats, ReportBlock, RtpError, RtpPacket, RtpStream, SourceDescription,
    disconnect_udp, parse_rtcp, random_ssrc, serialize_rtcp,
)
from activecall.media.rtp_ticker import RtpTicker
from activecall.media.srtp import (
    NoAcceptableCrypto, SrtpContext, SrtpError, answer_crypto, match_answer, offer_keys,
)
from activecall.protocol import events as ev
from activecall.sip import sdp as sdp_mod

log = Logger(namespace="activecall.media.rtp")

RTCP_INTERVAL = 5.0
LATCH_QUIET_SECONDS = 0.5
SILENCE = np.zeros(FRAME_SAMPLES, dtype=np.int16)
MAX_READS_PER_TICK = 16  # a flood cannot hold the tick: the rest waits in (or overflows) the kernel buffer
_HEADER = struct.Struct("!xBHII")  # M+PT, sequence, timestamp, SSRC of a plain 12-byte RTP header
_QUIET_ERRORS = (BlockingIOError, InterruptedError, ConnectionRefusedError)
#: what ``sendto`` raises for a destination it cannot use: OSError (unreachable, wrong family,
#: a name that does not resolve), OverflowError (a port above 65535), TypeError/ValueError (a
#: host that is not text, a NUL in it, "encoding of hostname failed").  Negotiation refuses such
#: SDP (sip/sdp.py ``usable_address``/``usable_port``); this is the second line of defence.
_SEND_ERRORS = (OSError, OverflowError, TypeError, ValueError)


class IMediaSession(Interface):
    """What a leg needs of the call it carries (an ``RtpLeg``, and the call layer's WebSocket and WebRTC
    legs): the bot's frames out, the caller's frames and DTMF in.  Provided by ``CallSession``, a bridged
    refer's ``ReferredParty`` and ``testing.FakeMediaSession``."""

    id = Attribute("The call's id (for log lines and events).")

    def tick():
        """The bot's 16 kHz int16 frame due now, or None when nothing plays (the leg sends silence)."""

    def audio_in(pcm):
        """One 16 kHz int16 frame of the caller's audio."""

    def emit(event):
        """An event of the call (``dtmf``)."""

    def now():
        """The call's clock in milliseconds (events' ``timestamp``)."""


class MediaNegotiationError(Exception):
    """The remote SDP cannot be used (no common codec, SRTP mismatch): answer 488."""

    status = 488


class RtpLeg(RtpLegCore):
    """One call's RTP session.  ``allocate`` binds ports; ``offer``/``answer``
    negotiate; ``start`` joins the media clock; ``close`` releases everything.

    The state the media tick touches for every packet (the socket's
    descriptor, the flags and counters, the stream, statistics and jitter
    buffer) lives in the C base ``RtpLegCore``, whose loops do the steady
    state of sending and receiving (``_rtpcore.c``); everything else is here."""

    #: the call's session; weak once the call has ended (activecall/backlink.py)
    session = back_link()

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
        self._silence = SILENCE  # a concealed gap's frame
        self.jitter: Optional[JitterBuffer] = None
        self.stats: Optional[ReceiveStats] = None
        self.remote_ssrc: Optional[int] = None
        self.dtmf_in = DtmfReceiver(())
        self.dtmf_out: Optional[DtmfSender] = None
        self.on_hold = False
        self.running = False
        self._next_report_at = 0.0
        self.packets_in = 0
        self.packets_out = 0
        self.strangers = 0
        self.send_errors = 0
        self._heard_remote_at: Optional[float] = None
        #: the RTP socket is connected to ``remote_rtp`` (see ``_connect``)
        self.connected = False
        #: connected, and everything queued before the connect has been read: ``recv`` needs no address check
        self.source_filtered = False
        self._may_connect = CAN_DISCONNECT_UDP
        self._dtmf_pts = frozenset()
        self._receive_pts: frozenset = frozenset()
        self._dtmf_pt = None
        self._plain_audio_pts: frozenset = frozenset()  # audio PTs read_one may take the fast path for
        self._step = 0  # the encoder's RTP timestamp units per frame
        self._sending = False  # the negotiated direction lets us send media
        self._ticker: Optional[RtpTicker] = None
        self._m_out = metrics.rtp_packets.labels(direction="out") if metrics is not None else None

    # -- set-up ---------------------------------------------------------------------------------

    def allocate(self, pool) -> None:
        """Bind an RTP/RTCP port pair (raises PortsExhausted)."""
        self.ports = pool.allocate(rtcp=True)
        self._rtp_fd = self.rtp_fileno()  # the C loops' handle on the socket, -1 again before it closes

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
        remote = tuple(negotiated.remote_rtp) if negotiated.remote_rtp else None
        if self.connected and remote != self.remote_rtp:
            self._disconnect()
        self.remote_rtp = remote
        self.remote_rtcp = tuple(negotiated.remote_rtcp) if negotiated.remote_rtcp else None
        send = negotiated.send_codec
        if self.encoder is None or self.encoder.payload_type != send.payload_type:
            self.encoder = codec_mod.create_for_payload(send.payload_type, send.encoding, send.clock_rate)
            self.stream = RtpStream(send.payload_type, self.encoder.clock_rate, ssrc=self.ssrc)
            self.jitter = JitterBuffer(clock_rate=self.encoder.clock_rate)
        self._receive_pts = negotiated.receive_payload_types  # a property that builds a set: once, not per packet
        self._step = self.encoder.timestamp_step  # per-tick values the hot path would otherwise look up each time
        self._sending = negotiated.local_direction not in ("recvonly", "inactive")
        self.dtmf_in = DtmfReceiver(f.payload_type for f in negotiated.dtmf)
        self._dtmf_pts = self.dtmf_in.payload_types
        # read_one's fast path: plain RTP only (SRTP packets must be unprotected first)
        self._plain_audio_pts = frozenset() if self.srtp is not None else self._receive_pts - self._dtmf_pts
        pt = negotiated.dtmf_payload_type
        self.dtmf_out = DtmfSender(clock_rate=self.encoder.clock_rate) if pt is not None else None
        self._dtmf_pt = pt

    def start(self) -> None:
        """Join the media clock (through its ``RtpTicker``) and start RTCP reports.

        Whatever queued on the socket before now is stale (nobody was playing
        it) and is discarded, so the call does not start a second behind."""
        if self.running:
            return
        self.running = True
        self._discard_queued()
        self._next_report_at = self.reactor.seconds() + RTCP_INTERVAL
        self._ticker = RtpTicker.of(self.media_clock, self.reactor, self.metrics)
        self._ticker.add(self)

    def _discard_queued(self) -> None:
        sock = self.ports.rtp if self.ports is not None else None
        for _ in range(4 * MAX_READS_PER_TICK):
            try:
                sock.recvfrom(2048)
            except (OSError, AttributeError):
                return

    # -- inbound (called by the ticker) ---------------------------------------------------------

    def read(self, now: float) -> int:
        """Read what arrived on the RTP socket since the last tick; the number of RTP packets taken."""
        sock = self.ports.rtp if self.ports is not None else None
        if sock is None:
            return 0
        taken = 0
        for _ in range(MAX_READS_PER_TICK):
            try:
                data, addr = sock.recvfrom(2048)
            except _QUIET_ERRORS:
                break
            except OSError as e:
                log.debug("RTP socket read failed: {e}", e=e)
                break
            try:
                taken += self.datagram_received(data, addr, False, now)
            except Exception:
                log.failure("RTP packet from {addr} could not be handled", addr=addr)
        return taken

    def read_one(self, now: float) -> int:
        """One datagram from the RTP socket, which the ticker's readiness poll says is readable;
        the number of RTP packets taken (0 or 1).  A source-filtered leg is read by the ticker's
        C loop instead (``_rtpcore.read_ready``), which hands what it does not take itself to
        ``_received_from_remote``."""
        sock = self.ports.rtp if self.ports is not None else None
        if sock is None:
            return 0
        try:
            data, addr = sock.recvfrom(2048)
        except _QUIET_ERRORS:
            return 0
        except OSError as e:
            self._read_failed(e)
            return 0
        try:
            taken = self.datagram_received(data, addr, False, now)
        except Exception:
            log.failure("RTP packet from {addr} could not be handled", addr=addr)
            return 0
        if taken and not self.connected and self._may_connect:
            self._connect()
        return taken

    def _received_from_remote(self, data: bytes, now: float) -> int:
        """A datagram the kernel let through from ``remote_rtp`` that the C loop's short path did
        not take (a new SSRC, telephone-event, RTCP, SRTP, header extensions): the general path."""
        try:
            return self.datagram_received(data, self.remote_rtp, False, now)
        except Exception:
            log.failure("RTP packet from {addr} could not be handled", addr=self.remote_rtp)
            return 0

    def _read_failed(self, e: OSError) -> None:
        log.debug("RTP socket read failed: {e}", e=e)

    def _connect(self) -> None:
        """Connect the RTP socket to ``remote_rtp``, which just sent us media.

        From then on the kernel drops strangers' datagrams and the hot path can
        ``send``/``recv`` without an address (cheaper per leg and tick:
        docs/media.md, "Connected sockets").  What queued before the connect may still come
        from anyone, so reads keep checking the source until the ticker has seen
        the socket empty (``queue_checked``).  ``rtcp_tick`` dissolves the
        association when the source goes quiet, so latching can follow a NAT
        rebinding."""
        try:
            self.ports.rtp.connect(self.remote_rtp)
        except (OSError, AttributeError, TypeError, ValueError) as e:
            self._may_connect = False  # not a real socket, or one that cannot: stay unconnected
            log.debug("RTP socket stays unconnected: {e}", e=e)
            return
        self.connected = True
        if self._ticker is not None:
            self._ticker.check_queue(self)

    def queue_checked(self) -> None:
        """The ticker saw the connected socket empty: all that comes now is from ``remote_rtp``."""
        if self.connected:
            self.source_filtered = True

    def _disconnect(self) -> None:
        """Receive from anyone again (a quiet source, a new remote address)."""
        self.connected = self.source_filtered = False
        sock = self.ports.rtp if self.ports is not None else None
        if sock is None:
            return
        try:
            disconnect_udp(sock)
        except OSError as e:
            # still associated in the kernel: we send with sendto (which names its destination) and
            # check sources from now on, but only the old peer's datagrams can arrive
            self._may_connect = False
            log.warn("RTP socket could not be disconnected ({e}); it only hears {addr} from now on, "
                     "so latching cannot follow a new source", e=e, addr=self.remote_rtp)

    def rtp_fileno(self) -> int:
        """The RTP socket's descriptor for the ticker's readiness poll; -1 when there is none."""
        sock = self.ports.rtp if self.ports is not None else None
        try:
            return sock.fileno() if sock is not None else -1
        except (AttributeError, OSError, ValueError):
            return -1

    def rtcp_tick(self, now: float) -> None:
        """RTCP housekeeping, which the ticker does for each leg every 0.5 s (reports are rare):
        read the RTCP socket, and send our sender report once ``RTCP_INTERVAL`` has passed."""
        if self.connected and self.latching and (
                self._heard_remote_at is None or now - self._heard_remote_at >= LATCH_QUIET_SECONDS):
            self._disconnect()  # gone quiet: let a rebinding NAT's new address through for latching
        if self.running and now >= self._next_report_at:
            self._next_report_at = now + RTCP_INTERVAL
            try:
                self._send_report()
            except Exception:
                log.failure("RTCP report failed")
        sock = self.ports.rtcp if self.ports is not None else None
        if sock is None:
            return
        for _ in range(MAX_READS_PER_TICK):
            try:
                data, addr = sock.recvfrom(2048)
            except OSError:
                return
            try:
                self._rtcp_received(data, addr)
            except Exception:
                log.failure("RTCP packet from {addr} could not be handled", addr=addr)

    def datagram_received(self, data: bytes, addr, on_rtcp_port: bool = False, now: Optional[float] = None) -> int:
        """One datagram from the RTP (or RTCP) port; 1 when it was an RTP packet we accepted, else 0."""
        if on_rtcp_port or (len(data) > 1 and 192 <= data[1] <= 223):  # RFC 5761: RTCP on a muxed port
            self._rtcp_received(data, addr)
            return 0
        negotiated = self.negotiated
        if negotiated is None:
            return 0
        if now is None:
            now = self.reactor.seconds()
        if len(addr) > 2:
            addr = addr[:2]  # IPv6: (host, port, flowinfo, scope)
        remote = self.remote_rtp
        if addr != remote and not self._may_latch(now):
            self.strangers += 1
            return 0
        if self.srtp is not None:
            try:
                data = self.srtp.unprotect(data)
            except SrtpError:
                self.strangers += 1
                return 0
        if len(data) >= 12 and data[0] == 0x80:  # version 2, no padding, extension or CSRCs: the usual case
            b1, seq, timestamp, ssrc = _HEADER.unpack_from(data)
            pt, marker, payload = b1 & 0x7F, bool(b1 & 0x80), data[12:]
        else:
            try:
                packet = RtpPacket.parse(data)
            except RtpError:
                return 0
            pt, marker, payload = packet.payload_type, packet.marker, packet.payload
            seq, timestamp, ssrc = packet.sequence, packet.timestamp, packet.ssrc
        if pt not in self._receive_pts:
            self.strangers += 1
            return 0
        self._heard_remote_at = now
        if addr != remote:
            log.info("RTP latching: {old} -> {new}", old=remote, new=addr)
            self.remote_rtp = addr
            if self.remote_rtcp is not None:  # (a source port of 65535 has no port + 1: RTCP muxed)
                self.remote_rtcp = (addr[0], addr[1] + 1) if addr[1] < 65535 else addr
        if ssrc != self.remote_ssrc:
            self.remote_ssrc = ssrc  # a new source (or the first): start over cleanly
            self.stats = ReceiveStats(ssrc, self.encoder.clock_rate)
            if self.jitter is not None:
                self.jitter.reset()
        self.packets_in += 1
        self.stats.update(seq, timestamp, now)
        if pt in self._dtmf_pts:
            digit = self.dtmf_in.receive(pt, payload, timestamp)
            if digit is not None:
                self.session.emit(ev.Dtmf(trackId=self.session.id, timestamp=self.session.now(), digit=digit))
            return 1
        self.jitter.push(seq, timestamp, payload, now, payload_type=pt, marker=marker)
        return 1

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

    def play_inbound(self, pcm) -> None:
        """Hand a decoded frame to the session (silence while the peer holds the call)."""
        if self.on_hold:
            pcm = np.zeros_like(pcm)  # hold: the caller's line is silent, processors still run
        self.session.audio_in(pcm)

    # -- outbound (called by the ticker) --------------------------------------------------------

    def next_outbound(self):
        """The 16 kHz frame to encode and send this tick, or None when nothing is owed as audio
        (an RFC 4733 packet went instead, we must not send, or the stream is not set up)."""
        if self.stream is None or self.remote_rtp is None:
            return None
        step = self._step
        if self.dtmf_out is not None and self.dtmf_out.busy:
            frame = self.dtmf_out.tick(self.stream.timestamp)
            if frame is not None:
                header = self.stream.next_header(len(frame.payload), step, marker=frame.marker,
                                                 payload_type=self._dtmf_pt, timestamp=frame.timestamp)
                self._send(header + frame.payload)
                return None
        pcm = self.session.tick()
        if not self._sending:
            self.stream.skip(step)
            return None
        return SILENCE if pcm is None else pcm

    def send_audio(self, payload: bytes) -> bool:
        """Send this tick's encoded audio; False when the packet could not be sent.  The ticker's
        C loop (``_rtpcore.send_audio``) sends the steady state (plain RTP on a connected socket)
        itself and calls this for the rest (SRTP, an unconnected socket)."""
        return self._send(self.stream.next_header(len(payload), self._step) + payload, count=False)

    def _send(self, data: bytes, count: bool = True) -> bool:
        if self.srtp is not None:
            data = self.srtp.protect(data)
        sock = self.ports.rtp if self.ports is not None else None
        if sock is None:
            return False
        try:
            if self.connected:
                sock.send(data)
            else:
                sock.sendto(data, self.remote_rtp)
        except _SEND_ERRORS as e:
            return self._send_failed(e)
        self.packets_out += 1
        if count and self._m_out is not None:
            self._m_out.inc()
        return True

    def _send_failed(self, e: Exception) -> bool:
        """A packet could not be sent (also called by the C loop): counted in ``send_errors`` and
        ``activecall_errors{kind="rtp_send"}``, logged once per leg, never raised to the reactor."""
        self.send_errors += 1
        if self.metrics is not None:
            try:
                self.metrics.errors.labels(kind="rtp_send").inc()
            except Exception:
                pass
        if self.send_errors == 1:
            log.info("RTP send to {addr} failed: {e} (later failures are counted, not logged)",
                     addr=self.remote_rtp, e=e)
        return False

    def on_tick(self) -> None:
        """One leg alone through one tick (the ticker batches this across legs; kept for single use)."""
        self.read(self.reactor.seconds())
        job = self.pop_inbound()
        if job is not None:
            decoder, data = job
            if decoder is None:
                self.play_inbound(data)
            else:
                try:
                    pcm = decoder.decode(data)
                except Exception:
                    pcm = None
                if pcm is not None:
                    self.play_inbound(pcm)
        pcm = self.next_outbound()
        if pcm is not None:
            if self.send_audio(self.encoder.encode(pcm)) and self._m_out is not None:
                self._m_out.inc()

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
            sock, target = self.ports.rtp, self.remote_rtp
        else:
            sock, target = self.ports.rtcp or self.ports.rtp, self.remote_rtcp
        if sock is not None:
            try:
                sock.sendto(data, target)
            except _SEND_ERRORS as e:
                log.debug("RTCP send to {addr} failed: {e}", addr=target, e=e)

    def _send_report(self) -> None:
        sr = self.stream.sender_report(self.reactor.seconds(), self._report_blocks())
        self._send_rtcp([sr, SourceDescription.cname(self.ssrc, "activecall")])

    # -- teardown --------------------------------------------------------------------------------

    def _close_codecs(self) -> None:
        """Codec state shared between legs (the G.711 resamplers' history rows) goes back now, not when
        the garbage collector finds the leg (a session is in reference cycles until then)."""
        for codec in (self.encoder, *self._decoders.values()):
            if codec is not None:
                codec.close()
        self._decoders.clear()

    def close(self) -> defer.Deferred:
        """Leave the clock, send RTCP BYE, release the ports (idempotent)."""
        if self.running:
            self.running = False
            if self._ticker is not None:
                self._ticker.remove(self)
            if self.stream is not None:
                try:
                    self._send_rtcp([self.stream.sender_report(self.reactor.seconds()),
                                     Bye((self.ssrc,), b"call ended")])
                except Exception:
                    log.failure("RTCP BYE failed")
        self._close_codecs()
        if self.ports is not None:
            ports, self.ports = self.ports, None
            self._rtp_fd = -1  # before the descriptor is closed (and could be reused)
            self.connected = self.source_filtered = False
            return ports.close()
        return defer.succeed(None)
