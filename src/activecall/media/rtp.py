"""RTP and RTCP (RFC 3550) packets, stream bookkeeping, and the RTP port pool.

Packets are frozen dataclasses with ``parse``/``serialize``; statistics follow
RFC 3550 appendix A (extended sequence numbers, interarrival jitter, loss per
report interval) so an RR/SR report block can be built from them.  The port
pool is the only part that touches the network: it binds real UDP sockets
(non-blocking, read by the media tick), skipping ports other processes hold.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass
from typing import Optional

from twisted.internet import defer
from twisted.logger import Logger

from activecall.media import _rtpcore

log = Logger(namespace="activecall.media.rtp")

__all__ = [
    "RtpError", "RtpPacket", "ReportBlock", "SenderReport", "ReceiverReport", "SourceDescription", "SdesChunk",
    "Bye", "UnknownRtcp", "parse_rtcp", "serialize_rtcp", "is_rtcp", "RtpStream", "ReceiveStats",
    "ntp_timestamp", "ntp_middle", "PortsExhausted", "PortPair", "PortPool", "random_ssrc",
]

RTP_VERSION = 2
RTCP_SR, RTCP_RR, RTCP_SDES, RTCP_BYE, RTCP_APP = 200, 201, 202, 203, 204
SDES_CNAME = 1
NTP_EPOCH_OFFSET = 2208988800  # seconds from 1900 to 1970


class RtpError(ValueError):
    """A datagram that is not a well-formed RTP/RTCP packet (dropped by the leg)."""


def random_ssrc() -> int:
    return struct.unpack("!I", os.urandom(4))[0]


# -- RTP ------------------------------------------------------------------------------------




@dataclass(frozen=True)
class RtpPacket:
    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    payload: bytes = b""
    marker: bool = False
    csrcs: tuple = ()
    extension: Optional[tuple] = None  # (profile, data) with len(data) % 4 == 0
    padding: int = 0  # padding bytes (including the count byte) when serialised

    @classmethod
    def parse(cls, data: bytes) -> "RtpPacket":
        if len(data) < 12:
            raise RtpError(f"RTP packet too short ({len(data)} bytes)")
        b0, b1, seq, ts, ssrc = struct.unpack("!BBHII", data[:12])
        if b0 >> 6 != RTP_VERSION:
            raise RtpError(f"RTP version {b0 >> 6}")
        cc, pos, end = b0 & 0x0F, 12, len(data)
        if end < pos + 4 * cc:
            raise RtpError("RTP packet truncated in the CSRC list")
        csrcs = struct.unpack(f"!{cc}I", data[pos:pos + 4 * cc])
        pos += 4 * cc
        extension = None
        if b0 & 0x10:
            if end < pos + 4:
                raise RtpError("RTP packet truncated in the extension header")
            profile, words = struct.unpack("!HH", data[pos:pos + 4])
            if end < pos + 4 + 4 * words:
                raise RtpError("RTP packet truncated in the extension")
            extension = (profile, bytes(data[pos + 4:pos + 4 + 4 * words]))
            pos += 4 + 4 * words
        padding = 0
        if b0 & 0x20:
            padding = data[-1]
            if padding == 0 or pos + padding > end:
                raise RtpError("bad RTP padding length")
            end -= padding
        return cls(payload_type=b1 & 0x7F, sequence=seq, timestamp=ts, ssrc=ssrc, payload=bytes(data[pos:end]),
                   marker=bool(b1 & 0x80), csrcs=tuple(csrcs), extension=extension, padding=padding)

    def serialize(self) -> bytes:
        b0 = (RTP_VERSION << 6) | (0x20 if self.padding else 0) | (0x10 if self.extension else 0) | len(self.csrcs)
        b1 = (0x80 if self.marker else 0) | (self.payload_type & 0x7F)
        parts = [struct.pack("!BBHII", b0, b1, self.sequence & 0xFFFF, self.timestamp & 0xFFFFFFFF,
                             self.ssrc & 0xFFFFFFFF)]
        parts += [struct.pack("!I", c) for c in self.csrcs]
        if self.extension:
            profile, data = self.extension
            if len(data) % 4:
                raise RtpError("RTP header extension length must be a multiple of 4")
            parts.append(struct.pack("!HH", profile, len(data) // 4) + data)
        parts.append(self.payload)
        if self.padding:
            parts.append(b"\x00" * (self.padding - 1) + bytes([self.padding]))
        return b"".join(parts)


def is_rtcp(data: bytes) -> bool:
    """RFC 5761 demultiplexing on a muxed port: RTCP packet types 192-223 sit where RTP has M+PT."""
    return len(data) >= 2 and 192 <= data[1] <= 223


# -- RTCP -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportBlock:
    ssrc: int
    fraction_lost: int  # 0-255 (fixed point /256)
    cumulative_lost: int  # signed 24 bits
    highest_sequence: int  # extended
    jitter: int  # timestamp units
    last_sr: int = 0  # middle 32 bits of the last SR's NTP time
    delay_since_last_sr: int = 0  # 1/65536 s

    def serialize(self) -> bytes:
        lost = max(-0x800000, min(0x7FFFFF, self.cumulative_lost)) & 0xFFFFFF
        return struct.pack("!IIIIII", self.ssrc, (self.fraction_lost & 0xFF) << 24 | lost,
                           self.highest_sequence & 0xFFFFFFFF, self.jitter & 0xFFFFFFFF, self.last_sr,
                           self.delay_since_last_sr)

    @classmethod
    def parse(cls, data: bytes) -> "ReportBlock":
        ssrc, lost_word, highest, jitter, lsr, dlsr = struct.unpack("!IIIIII", data[:24])
        lost = lost_word & 0xFFFFFF
        if lost & 0x800000:
            lost -= 0x1000000
        return cls(ssrc, lost_word >> 24, lost, highest, jitter, lsr, dlsr)


def _header(count: int, packet_type: int, body_len: int) -> bytes:
    return struct.pack("!BBH", (RTP_VERSION << 6) | count, packet_type, (body_len + 4) // 4 - 1)


@dataclass(frozen=True)
class SenderReport:
    ssrc: int
    ntp_timestamp: int  # 64-bit NTP
    rtp_timestamp: int
    packet_count: int
    octet_count: int
    reports: tuple = ()

    def serialize(self) -> bytes:
        body = struct.pack("!IQIII", self.ssrc, self.ntp_timestamp, self.rtp_timestamp & 0xFFFFFFFF,
                           self.packet_count & 0xFFFFFFFF, self.octet_count & 0xFFFFFFFF)
        body += b"".join(r.serialize() for r in self.reports)
        return _header(len(self.reports), RTCP_SR, len(body)) + body


@dataclass(frozen=True)
class ReceiverReport:
    ssrc: int
    reports: tuple = ()

    def serialize(self) -> bytes:
        body = struct.pack("!I", self.ssrc) + b"".join(r.serialize() for r in self.reports)
        return _header(len(self.reports), RTCP_RR, len(body)) + body


@dataclass(frozen=True)
class SdesChunk:
    ssrc: int
    items: tuple = ()  # (item type, bytes)

    def serialize(self) -> bytes:
        data = struct.pack("!I", self.ssrc)
        for kind, value in self.items:
            data += bytes([kind, len(value)]) + value
        data += b"\x00"  # end of items, then pad to a 32-bit boundary
        return data + b"\x00" * (-len(data) % 4)


@dataclass(frozen=True)
class SourceDescription:
    chunks: tuple = ()

    def serialize(self) -> bytes:
        body = b"".join(c.serialize() for c in self.chunks)
        return _header(len(self.chunks), RTCP_SDES, len(body)) + body

    @classmethod
    def cname(cls, ssrc: int, cname: str) -> "SourceDescription":
        return cls((SdesChunk(ssrc, ((SDES_CNAME, cname.encode("utf-8")[:255]),)),))


@dataclass(frozen=True)
class Bye:
    ssrcs: tuple = ()
    reason: bytes = b""

    def serialize(self) -> bytes:
        body = b"".join(struct.pack("!I", s) for s in self.ssrcs)
        if self.reason:
            reason = bytes([len(self.reason[:255])]) + self.reason[:255]
            body += reason + b"\x00" * (-len(reason) % 4)
        return _header(len(self.ssrcs), RTCP_BYE, len(body)) + body


@dataclass(frozen=True)
class UnknownRtcp:
    packet_type: int
    count: int
    body: bytes

    def serialize(self) -> bytes:
        return _header(self.count, self.packet_type, len(self.body)) + self.body


def _parse_one(packet_type: int, count: int, body: bytes):
    if packet_type == RTCP_SR:
        if len(body) < 24 + 24 * count:
            raise RtpError("truncated RTCP SR")
        ssrc, ntp, rtp_ts, packets, octets = struct.unpack("!IQIII", body[:24])
        blocks = tuple(ReportBlock.parse(body[24 + 24 * i:48 + 24 * i]) for i in range(count))
        return SenderReport(ssrc, ntp, rtp_ts, packets, octets, blocks)
    if packet_type == RTCP_RR:
        if len(body) < 4 + 24 * count:
            raise RtpError("truncated RTCP RR")
        blocks = tuple(ReportBlock.parse(body[4 + 24 * i:28 + 24 * i]) for i in range(count))
        return ReceiverReport(struct.unpack("!I", body[:4])[0], blocks)
    if packet_type == RTCP_SDES:
        chunks, pos = [], 0
        for _ in range(count):
            if pos + 4 > len(body):
                raise RtpError("truncated RTCP SDES")
            ssrc, items = struct.unpack("!I", body[pos:pos + 4])[0], []
            pos += 4
            while pos < len(body) and body[pos] != 0:
                if pos + 2 > len(body) or pos + 2 + body[pos + 1] > len(body):
                    raise RtpError("truncated RTCP SDES item")
                items.append((body[pos], bytes(body[pos + 2:pos + 2 + body[pos + 1]])))
                pos += 2 + body[pos + 1]
            pos += 1
            pos += -pos % 4
            chunks.append(SdesChunk(ssrc, tuple(items)))
        return SourceDescription(tuple(chunks))
    if packet_type == RTCP_BYE:
        if len(body) < 4 * count:
            raise RtpError("truncated RTCP BYE")
        ssrcs = struct.unpack(f"!{count}I", body[:4 * count])
        reason = b""
        if len(body) > 4 * count:
            n = body[4 * count]
            reason = bytes(body[4 * count + 1:4 * count + 1 + n])
        return Bye(tuple(ssrcs), reason)
    return UnknownRtcp(packet_type, count, bytes(body))


def parse_rtcp(data: bytes) -> list:
    """Every packet of a (compound) RTCP datagram, in order."""
    packets, pos = [], 0
    if len(data) < 4:
        raise RtpError("RTCP packet too short")
    while pos < len(data):
        if len(data) - pos < 4:
            raise RtpError("trailing bytes after RTCP packet")
        b0, packet_type, words = struct.unpack("!BBH", data[pos:pos + 4])
        if b0 >> 6 != RTP_VERSION:
            raise RtpError(f"RTCP version {b0 >> 6}")
        end = pos + 4 * (words + 1)
        if end > len(data):
            raise RtpError("RTCP length beyond the datagram")
        body = data[pos + 4:end]
        if b0 & 0x20:  # padding, only legal on the last packet
            if not body or body[-1] > len(body):
                raise RtpError("bad RTCP padding")
            body = body[:-body[-1]]
        packets.append(_parse_one(packet_type, b0 & 0x1F, body))
        pos = end
    return packets


def serialize_rtcp(packets) -> bytes:
    """A compound RTCP datagram (RFC 3550 §6.1: start with SR or RR, include SDES CNAME)."""
    return b"".join(p.serialize() for p in packets)


# -- time -----------------------------------------------------------------------------------


def ntp_timestamp(unix_seconds: float) -> int:
    """64-bit NTP time for a Unix time."""
    seconds = int(unix_seconds)
    fraction = int((unix_seconds - seconds) * (1 << 32)) & 0xFFFFFFFF
    return ((seconds + NTP_EPOCH_OFFSET) & 0xFFFFFFFF) << 32 | fraction


def ntp_middle(ntp: int) -> int:
    """The middle 32 bits, as carried in LSR."""
    return (ntp >> 16) & 0xFFFFFFFF


# -- streams --------------------------------------------------------------------------------


class RtpStream(_rtpcore.RtpStream):
    """Our outgoing stream: sequence and timestamp bookkeeping and the counts an SR reports.

    Sequence numbers and timestamps start at random values (RFC 3550 §5.1);
    ``skip`` advances the timestamp over a pause and marks the next packet, as
    the original does when more than 50 ms passed between sends.  The
    bookkeeping and the headers (``next_header``, ``next_audio_header``) are
    C (``_rtpcore.c``): the media tick sends every leg's packet through them.
    """

    __slots__ = ()

    def __init__(self, payload_type: int, clock_rate: int, ssrc: Optional[int] = None,
                 sequence: Optional[int] = None, timestamp: Optional[int] = None):
        super().__init__(payload_type, clock_rate, random_ssrc() if ssrc is None else ssrc,
                         random_ssrc() & 0xFFFF if sequence is None else sequence,
                         random_ssrc() if timestamp is None else timestamp)

    def next_packet(self, payload: bytes, samples: int, *, marker: bool = False,
                    payload_type: Optional[int] = None, timestamp: Optional[int] = None) -> RtpPacket:
        """The packet for ``payload`` covering ``samples`` clock units; advances seq and timestamp.

        ``timestamp`` overrides the stream's (RFC 4733 events keep their start
        timestamp); the stream clock still advances by ``samples``.
        """
        header = self.next_header(len(payload), samples, marker=marker, payload_type=payload_type,
                                  timestamp=timestamp)
        return RtpPacket.parse(header + payload)

    def sender_report(self, unix_now: float, reports=()) -> SenderReport:
        return SenderReport(self.ssrc, ntp_timestamp(unix_now), self.timestamp, self.packet_count,
                            self.octet_count, tuple(reports))


class ReceiveStats(_rtpcore.ReceiveStats):
    """RFC 3550 A.1/A.3/A.8 receive statistics for one remote SSRC.

    ``update`` (sequence validity with the restart after a big jump, and the
    interarrival jitter) is C (``_rtpcore.c``); the reports are built here."""

    __slots__ = ()

    @property
    def extended_max(self) -> int:
        return self.cycles + (self.max_seq or 0)

    @property
    def expected(self) -> int:
        return 0 if self.max_seq is None else self.extended_max - self.base_seq + 1

    @property
    def lost(self) -> int:
        return self.expected - self.received

    @property
    def jitter_seconds(self) -> float:
        return self.jitter / self.clock_rate

    def sender_report_received(self, report: SenderReport, arrival: float) -> None:
        self.last_sr = ntp_middle(report.ntp_timestamp)
        self._last_sr_arrival = arrival

    def report_block(self, now: float) -> ReportBlock:
        """A report block for this source; starts a new loss interval."""
        expected_interval = self.expected - self.expected_prior
        received_interval = self.received - self.received_prior
        self.expected_prior, self.received_prior = self.expected, self.received
        lost_interval = expected_interval - received_interval
        fraction = 0 if expected_interval <= 0 or lost_interval <= 0 else (lost_interval << 8) // expected_interval
        dlsr = 0
        if self._last_sr_arrival is not None:
            dlsr = int((now - self._last_sr_arrival) * 65536) & 0xFFFFFFFF
        return ReportBlock(self.ssrc, min(fraction, 255), self.lost, self.extended_max, int(self.jitter),
                           self.last_sr, dlsr)


# -- ports ----------------------------------------------------------------------------------


class PortsExhausted(Exception):
    """No free RTP port pair in the configured range (the call is refused with 503/488)."""


@dataclass
class PortPair:
    """A bound RTP socket (even port) and, unless muxed, its RTCP socket (+1).

    Plain non-blocking sockets, not Twisted ports: the media tick reads them
    (``RtpTicker``), so a packet costs one ``recvfrom`` instead of a reactor
    dispatch, and binding or closing a pair is two system calls per call.
    """

    pool: "PortPool"
    rtp_port: int
    rtp: Optional[socket.socket]
    rtcp: Optional[socket.socket] = None

    @property
    def rtcp_port(self) -> int:
        return self.rtp_port + 1

    def close(self) -> defer.Deferred:
        """Close the sockets and give the ports back to the pool (idempotent; fires at once)."""
        socks, self.rtp, self.rtcp = [s for s in (self.rtp, self.rtcp) if s is not None], None, None
        if socks:
            for s in socks:
                s.close()
            self.pool._release(self.rtp_port)
        return defer.succeed(None)


#: UDP sockets can be connected to the far end and disconnected again (Linux: connect(2) with
#: AF_UNSPEC, which Python's socket module cannot express); elsewhere RTP sockets stay unconnected.
CAN_DISCONNECT_UDP = hasattr(_rtpcore, "disconnect_udp")


def disconnect_udp(sock) -> None:
    """Dissolve a UDP socket's association with its peer: it receives from anyone again.

    The bound address and port stay (they were bound explicitly)."""
    if not CAN_DISCONNECT_UDP:
        raise OSError("disconnecting a UDP socket is not supported on this platform")
    _rtpcore.disconnect_udp(sock)


class PortPool:
    """Even RTP ports with RTCP on +1 from ``start..end``, bound for real on ``interface``.

    Allocation walks the range round-robin from where it last stopped, so a
    just-released port is the last to be reused (late packets of the old call
    do not land in the new one).  A port another process holds is skipped.
    """

    def __init__(self, reactor, start: int, end: int, interface: str = ""):
        self.reactor = reactor  # kept for callers that hand it around; binding needs no reactor
        self.interface = interface or ""
        self.family = socket.AF_INET6 if ":" in self.interface else socket.AF_INET
        self.start = start + (start % 2)
        self.end = end
        if self.end - self.start < 1:
            raise ValueError(f"RTP port range {start}..{end} holds no even/odd pair")
        self._pairs = list(range(self.start, self.end, 2))
        self._pairs = [p for p in self._pairs if p + 1 <= self.end]
        self._cursor = 0
        self._in_use: set = set()

    @property
    def capacity(self) -> int:
        return len(self._pairs)

    @property
    def in_use(self) -> int:
        return len(self._in_use)

    def _bind(self, port: int) -> Optional[socket.socket]:
        sock = socket.socket(self.family, socket.SOCK_DGRAM)
        try:
            sock.bind((self.interface, port))
        except OSError:
            sock.close()
            return None
        sock.setblocking(False)
        return sock

    def allocate(self, rtcp: bool = True) -> PortPair:
        """Bind the next free pair: RTP on the even port and, with ``rtcp``, RTCP on +1.

        Without ``rtcp`` (rtcp-mux) the +1 port is still reserved, so pairs never overlap.
        Raises ``PortsExhausted`` when every pair is in use here or held by another process.
        """
        for _ in range(len(self._pairs)):
            port = self._pairs[self._cursor]
            self._cursor = (self._cursor + 1) % len(self._pairs)
            if port in self._in_use:
                continue
            rtp_sock = self._bind(port)
            if rtp_sock is None:
                continue
            rtcp_sock = None
            if rtcp:
                rtcp_sock = self._bind(port + 1)
                if rtcp_sock is None:
                    rtp_sock.close()
                    continue
            self._in_use.add(port)
            return PortPair(self, port, rtp_sock, rtcp_sock)
        log.warn("RTP port range {start}..{end} exhausted ({n} pairs in use)", start=self.start, end=self.end,
                 n=len(self._in_use))
        raise PortsExhausted(f"no free RTP port pair in {self.start}..{self.end} "
                             f"({len(self._in_use)} of {len(self._pairs)} in use here)")

    def _release(self, port: int) -> None:
        self._in_use.discard(port)
