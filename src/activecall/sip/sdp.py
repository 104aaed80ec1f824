"""SDP (RFC 4566) as frozen dataclasses, and RFC 3264 offer/answer as pure functions.

Parsing keeps what a telephony leg needs as typed fields (``c=``, ``o=``,
``m=``, rtpmap/fmtp, rtcp, rtcp-mux, ptime, direction, crypto) and every other
line and attribute verbatim, in order, so an SDP survives a parse/build round
trip.  Negotiation never touches sockets: it maps an offer (or our offer plus
the peer's answer) and our configured codec list to a ``Negotiated`` value
that the RTP leg acts on.  The rules, and where they come from, are in
docs/media.md; each rule has its test in tests/test_sdp.py.
"""

from __future__ import annotations

import ipaddress
import math
import time
from dataclasses import dataclass, replace
from typing import Iterable, Optional, Sequence

from activecall.sip.digits import is_number as _is_number

__all__ = [
    "SDPParseError", "NegotiationError", "Origin", "Connection", "RtpMap", "Crypto", "RtcpAttribute",
    "MediaDescription", "SessionDescription", "CodecSpec", "PayloadFormat", "Negotiated", "CODEC_SPECS",
    "STATIC_PAYLOAD_TYPES", "parse", "build_offer", "build_answer", "negotiate_as_answerer",
    "negotiate_as_offerer", "mirror_direction", "is_hold", "is_webrtc", "audio_media", "usable_port",
    "usable_address", "MAX_PAYLOAD_TYPE",
]

DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")
PLAIN_PROTO = "RTP/AVP"
SDES_PROTO = "RTP/SAVP"
SECURE_PROTOS = ("RTP/SAVP", "RTP/SAVPF", "UDP/TLS/RTP/SAVP", "UDP/TLS/RTP/SAVPF")


class SDPParseError(ValueError):
    """An SDP body we cannot make sense of (the leg answers 400/488)."""


class NegotiationError(ValueError):
    """The offer or answer cannot be satisfied (the leg answers 488 / ends the call)."""


#: RTP payload types are 7 bits (RFC 3550 §5.1)
MAX_PAYLOAD_TYPE = 127


def _shown(value, limit: int = 40) -> str:
    """A peer's value quoted in an error (and so in a 488 reason or a log): ASCII, bounded."""
    text = repr(str(value)).encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= limit else text[:limit] + "..."


def usable_port(port) -> bool:
    """A port we can send to: 1..65535 (0 is a rejected or disabled stream, RFC 3264 §5.1)."""
    return isinstance(port, int) and 0 < port <= 65535


def usable_address(address: str) -> bool:
    """A connection address the RTP path can send to as it is: an IPv4 or IPv6 literal.

    RFC 4566 also allows a host name in ``c=``; the media path sends with ``sendto`` and
    resolving a name there would block the reactor on every packet, and negotiation is kept
    free of I/O, so a name is refused like any other unusable address (the offer gets 488).
    """
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


# -- wire objects ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Origin:
    username: str = "-"
    session_id: str = "0"
    session_version: str = "0"
    nettype: str = "IN"
    addrtype: str = "IP4"
    address: str = "0.0.0.0"

    def __str__(self) -> str:
        return (f"{self.username} {self.session_id} {self.session_version} "
                f"{self.nettype} {self.addrtype} {self.address}")


@dataclass(frozen=True)
class Connection:
    address: str
    nettype: str = "IN"
    addrtype: str = "IP4"

    def __str__(self) -> str:
        return f"{self.nettype} {self.addrtype} {self.address}"

    @property
    def is_null(self) -> bool:
        """``c=IN IP4 0.0.0.0`` is the RFC 2543 way to put a call on hold."""
        return self.address in ("0.0.0.0", "::")


@dataclass(frozen=True)
class RtpMap:
    payload_type: int
    encoding: str
    clock_rate: int
    channels: int = 1

    def __str__(self) -> str:
        tail = f"/{self.channels}" if self.channels != 1 else ""
        return f"{self.payload_type} {self.encoding}/{self.clock_rate}{tail}"


@dataclass(frozen=True)
class Crypto:
    """An RFC 4568 ``a=crypto:<tag> <suite> <key-params> [<session-params>]`` line."""

    tag: int
    suite: str
    key_params: str
    session_params: tuple = ()

    def __str__(self) -> str:
        return " ".join([str(self.tag), self.suite, self.key_params, *self.session_params])


@dataclass(frozen=True)
class RtcpAttribute:
    """RFC 3605 ``a=rtcp:<port> [IN IP4 <addr>]``."""

    port: int
    connection: Optional[Connection] = None

    def __str__(self) -> str:
        return f"{self.port} {self.connection}" if self.connection else str(self.port)


@dataclass(frozen=True)
class MediaDescription:
    media: str
    port: int
    proto: str
    formats: tuple  # payload types as strings, in m= order
    connection: Optional[Connection] = None
    rtpmaps: tuple = ()  # RtpMap, in m= order
    fmtps: tuple = ()  # (pt, params) pairs
    direction: Optional[str] = None
    rtcp: Optional[RtcpAttribute] = None
    rtcp_mux: bool = False
    ptime: Optional[int] = None
    crypto: tuple = ()  # Crypto
    attributes: tuple = ()  # other (name, value-or-None), in order
    other_lines: tuple = ()  # (type, value) for i=, b=, k=

    @property
    def payload_types(self) -> tuple:
        """The formats that are RTP payload types (0..127; anything else is not one we can use)."""
        return tuple(int(f) for f in self.formats
                     if _is_number(f) and len(f) <= 3 and int(f) <= MAX_PAYLOAD_TYPE)

    def rtpmap(self, pt: int) -> Optional[RtpMap]:
        for m in self.rtpmaps:
            if m.payload_type == pt:
                return m
        return None

    def fmtp(self, pt: int) -> Optional[str]:
        for p, params in self.fmtps:
            if p == pt:
                return params
        return None

    def attribute(self, name: str) -> Optional[str]:
        """The value of the first other attribute called ``name`` ('' for a flag), or None."""
        for n, v in self.attributes:
            if n == name:
                return v if v is not None else ""
        return None


@dataclass(frozen=True)
class SessionDescription:
    origin: Origin
    session_name: str = "-"
    connection: Optional[Connection] = None
    times: tuple = ("0 0",)
    direction: Optional[str] = None
    attributes: tuple = ()
    media: tuple = ()  # MediaDescription
    version: int = 0
    other_lines: tuple = ()  # (type, value) for i=, u=, e=, p=, b=, z=, k=, r=

    def __str__(self) -> str:
        return self.to_text()

    def to_text(self) -> str:
        lines = [f"v={self.version}", f"o={self.origin}", f"s={self.session_name}"]
        lines += [f"{t}={v}" for t, v in self.other_lines if t in "iuep"]
        if self.connection is not None:
            lines.append(f"c={self.connection}")
        lines += [f"{t}={v}" for t, v in self.other_lines if t == "b"]
        for t in self.times:
            lines.append(f"t={t}")
        lines += [f"{t}={v}" for t, v in self.other_lines if t in "rzk"]
        lines += _attribute_lines(self.attributes)
        if self.direction:
            lines.append(f"a={self.direction}")
        for m in self.media:
            lines += _media_lines(m)
        return "\r\n".join(lines) + "\r\n"

    def to_bytes(self) -> bytes:
        return self.to_text().encode("utf-8")


def _attribute_lines(attributes) -> list:
    return [f"a={n}" if v is None else f"a={n}:{v}" for n, v in attributes]


def _media_lines(m: MediaDescription) -> list:
    lines = [f"m={m.media} {m.port} {m.proto} {' '.join(m.formats)}"]
    lines += [f"{t}={v}" for t, v in m.other_lines if t == "i"]
    if m.connection is not None:
        lines.append(f"c={m.connection}")
    lines += [f"{t}={v}" for t, v in m.other_lines if t in "bk"]
    for pt in m.payload_types:
        rtpmap = m.rtpmap(pt)
        if rtpmap is not None:
            lines.append(f"a=rtpmap:{rtpmap}")
        params = m.fmtp(pt)
        if params is not None:
            lines.append(f"a=fmtp:{pt} {params}")
    if m.rtcp is not None:
        lines.append(f"a=rtcp:{m.rtcp}")
    if m.rtcp_mux:
        lines.append("a=rtcp-mux")
    if m.ptime is not None:
        lines.append(f"a=ptime:{m.ptime}")
    lines += [f"a=crypto:{c}" for c in m.crypto]
    lines += _attribute_lines(m.attributes)
    if m.direction:
        lines.append(f"a={m.direction}")
    return lines


# -- parsing --------------------------------------------------------------------------------


def _parse_connection(value: str) -> Connection:
    parts = value.split()
    if len(parts) != 3:
        raise SDPParseError(f"bad c= line {_shown(value)}")
    address = parts[2].split("/")[0]  # drop multicast TTL / count
    return Connection(address=address, nettype=parts[0], addrtype=parts[1])


def _parse_crypto(value: str) -> Crypto:
    parts = value.split()
    if len(parts) < 3 or not _is_number(parts[0]):
        raise SDPParseError(f"bad a=crypto line {_shown(value)}")
    return Crypto(tag=int(parts[0]), suite=parts[1], key_params=parts[2], session_params=tuple(parts[3:]))


def _parse_rtpmap(value: str) -> RtpMap:
    try:
        pt, rest = value.split(None, 1)
        pieces = rest.strip().split("/")
        channels = pieces[2] if len(pieces) > 2 and pieces[2] else "1"
        if not (_is_number(pt) and _is_number(pieces[1]) and _is_number(channels)):
            raise ValueError(value)
        return RtpMap(int(pt), pieces[0], int(pieces[1]), int(channels))
    except (ValueError, IndexError):
        raise SDPParseError(f"bad a=rtpmap line {_shown(value)}") from None


class _MediaBuilder:
    """Collects one m= section's lines before it is frozen."""

    def __init__(self, value: str):
        parts = value.split()
        if len(parts) < 3:
            raise SDPParseError(f"bad m= line {_shown(value)}")
        port = parts[1].split("/")[0]
        if not _is_number(port) or len(port) > 10:
            raise SDPParseError(f"bad port in m= line {_shown(value)}")
        port = int(port)  # a number, but maybe > 65535: refused when the stream is used (usable_port)
        self.fields = dict(media=parts[0], port=port, proto=parts[2], formats=tuple(parts[3:]))
        self.rtpmaps, self.fmtps, self.crypto, self.attributes, self.other = [], [], [], [], []

    def add_attribute(self, name: str, value: Optional[str]) -> None:
        if name == "rtpmap" and value:
            self.rtpmaps.append(_parse_rtpmap(value))
        elif name == "fmtp" and value:
            pt, _, params = value.partition(" ")
            if _is_number(pt):
                self.fmtps.append((int(pt), params.strip()))
            else:
                self.attributes.append((name, value))
        elif name in DIRECTIONS and value is None:
            self.fields["direction"] = name
        elif name == "rtcp-mux":
            self.fields["rtcp_mux"] = True
        elif name == "rtcp" and value:
            parts = value.split()
            if not _is_number(parts[0]) or len(parts[0]) > 10:
                raise SDPParseError(f"bad a=rtcp line {_shown(value)}")
            conn = _parse_connection(" ".join(parts[1:4])) if len(parts) >= 4 else None
            self.fields["rtcp"] = RtcpAttribute(int(parts[0]), conn)
        elif name == "ptime" and value:
            try:
                ptime_ms = float(value)  # RFC 4566 says ms; "20.0" is seen in the wild
            except ValueError:
                raise SDPParseError(f"bad a=ptime line {_shown(value)}") from None
            # inf, nan, 1e400 (float() takes them all; int() of them raises) are ignored like 0
            ptime = int(ptime_ms) if math.isfinite(ptime_ms) and 0 < ptime_ms <= 1000 else 0
            if 0 < ptime <= 1000:  # anything else is ignored (we send 20 ms), not trusted
                self.fields["ptime"] = ptime
        elif name == "crypto" and value:
            self.crypto.append(_parse_crypto(value))
        else:
            self.attributes.append((name, value))

    def build(self) -> MediaDescription:
        return MediaDescription(rtpmaps=tuple(self.rtpmaps), fmtps=tuple(self.fmtps), crypto=tuple(self.crypto),
                                attributes=tuple(self.attributes), other_lines=tuple(self.other), **self.fields)


def parse(data) -> SessionDescription:
    """Parse an SDP body (bytes or str); lenient about line endings and unknown lines."""
    text = data.decode("utf-8", "replace") if isinstance(data, (bytes, bytearray)) else str(data)
    session: dict = {}
    times, attributes, other = [], [], []
    media: list = []
    current: Optional[_MediaBuilder] = None
    for raw in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        line = raw.strip()
        if not line:
            continue
        if len(line) < 2 or line[1] != "=":
            raise SDPParseError(f"bad SDP line {_shown(line)}")
        kind, value = line[0], line[2:].strip()
        if kind == "m":
            if current is not None:
                media.append(current.build())
            current = _MediaBuilder(value)
        elif kind == "a":
            name, sep, attr_value = value.partition(":")
            attr = attr_value if sep else None
            if current is not None:
                current.add_attribute(name, attr)
            elif name in DIRECTIONS and attr is None:
                session["direction"] = name
            else:
                attributes.append((name, attr))
        elif kind == "c":
            if current is not None:
                current.fields["connection"] = _parse_connection(value)
            else:
                session["connection"] = _parse_connection(value)
        elif current is not None:
            current.other.append((kind, value))
        elif kind == "v":
            session["version"] = int(value) if _is_number(value) and len(value) < 10 else 0
        elif kind == "o":
            parts = value.split()
            if len(parts) != 6:
                raise SDPParseError(f"bad o= line {_shown(value)}")
            session["origin"] = Origin(*parts)
        elif kind == "s":
            session["session_name"] = value or "-"
        elif kind == "t":
            times.append(value)
        else:
            other.append((kind, value))
    if current is not None:
        media.append(current.build())
    if "origin" not in session:
        raise SDPParseError("SDP without an o= line")
    return SessionDescription(times=tuple(times) or ("0 0",), attributes=tuple(attributes), media=tuple(media),
                              other_lines=tuple(other), **session)


# -- codecs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CodecSpec:
    """How one configured codec name appears in SDP when we offer it."""

    name: str  # the config name: pcmu, pcma, g722, opus, l16, telephone_event
    encoding: str
    clock_rate: int
    channels: int = 1
    payload_type: int = 0
    fmtp: Optional[str] = None

    @property
    def rtpmap(self) -> RtpMap:
        return RtpMap(self.payload_type, self.encoding, self.clock_rate, self.channels)


CODEC_SPECS = {
    "pcmu": CodecSpec("pcmu", "PCMU", 8000, 1, 0),
    "pcma": CodecSpec("pcma", "PCMA", 8000, 1, 8),
    "g722": CodecSpec("g722", "G722", 8000, 1, 9),
    "opus": CodecSpec("opus", "opus", 48000, 2, 111, "minptime=10;useinbandfec=1"),
    "l16": CodecSpec("l16", "L16", 16000, 1, 96),
    "telephone_event": CodecSpec("telephone_event", "telephone-event", 8000, 1, 101, "0-16"),
}

#: RFC 3551 static payload types we understand when an offer omits the rtpmap.
STATIC_PAYLOAD_TYPES = {
    0: RtpMap(0, "PCMU", 8000),
    8: RtpMap(8, "PCMA", 8000),
    9: RtpMap(9, "G722", 8000),
    18: RtpMap(18, "G729", 8000),
}

_ENCODING_NAMES = {"pcmu": "pcmu", "pcma": "pcma", "g722": "g722", "opus": "opus", "l16": "l16",
                   "telephone-event": "telephone_event"}

_COMMON_RATES = frozenset({8000, 16000, 32000, 44100, 48000})
#: the RTP clock rates (and channel counts) at which we can use each codec; an rtpmap with
#: anything else (``PCMU/0``, ``L16/1``, ``opus/48000/9``) is a format we do not know
_USABLE_RATES = {"pcmu": {8000}, "pcma": {8000}, "g722": {8000}, "opus": {48000},
                 "l16": _COMMON_RATES, "telephone_event": _COMMON_RATES}
_USABLE_CHANNELS = {"opus": {1, 2}}


def _usable_rtpmap(name: Optional[str], rtpmap: RtpMap) -> bool:
    return (rtpmap.clock_rate in _USABLE_RATES.get(name, ())
            and rtpmap.channels in _USABLE_CHANNELS.get(name, {1}))


@dataclass(frozen=True)
class PayloadFormat:
    """One payload type of a media line, resolved to our codec name (None: unknown to us)."""

    payload_type: int
    name: Optional[str]
    encoding: str
    clock_rate: int
    channels: int = 1
    fmtp: Optional[str] = None

    @property
    def is_dtmf(self) -> bool:
        return self.name == "telephone_event"


def payload_formats(m: MediaDescription) -> tuple:
    """Every payload type of ``m`` in m= order, static ones resolved without an rtpmap."""
    out = []
    for pt in m.payload_types:
        rtpmap = m.rtpmap(pt) or STATIC_PAYLOAD_TYPES.get(pt)
        if rtpmap is None:
            out.append(PayloadFormat(pt, None, "", 0, 1, m.fmtp(pt)))
            continue
        name = _ENCODING_NAMES.get(rtpmap.encoding.lower())
        if name is not None and not _usable_rtpmap(name, rtpmap):
            name = None  # a codec we know at a rate or channel count we cannot use: not accepted
        out.append(PayloadFormat(pt, name, rtpmap.encoding, rtpmap.clock_rate, rtpmap.channels, m.fmtp(pt)))
    return tuple(out)


# -- negotiation ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Negotiated:
    """What the RTP leg needs from one offer/answer exchange."""

    send_codec: PayloadFormat
    codecs: tuple  # every accepted audio PayloadFormat (what we may receive)
    dtmf: tuple  # accepted telephone-event PayloadFormats (receive on any of them)
    remote_rtp: tuple  # (host, port)
    remote_rtcp: Optional[tuple]  # (host, port); None with rtcp-mux
    rtcp_mux: bool
    local_direction: str  # what we do: sendrecv / sendonly / recvonly / inactive
    remote_direction: str
    on_hold: bool
    ptime: int = 20
    proto: str = PLAIN_PROTO
    remote_crypto: tuple = ()  # the peer's a=crypto lines for the audio stream

    @property
    def dtmf_payload_type(self) -> Optional[int]:
        """The telephone-event PT to send with (matching the send codec's clock if possible)."""
        for f in self.dtmf:
            if f.clock_rate == self.send_codec.clock_rate:
                return f.payload_type
        return self.dtmf[0].payload_type if self.dtmf else None

    @property
    def receive_payload_types(self) -> frozenset:
        return frozenset(f.payload_type for f in self.codecs + self.dtmf)


def audio_media(sdp: SessionDescription) -> tuple:
    """(index, media) of the first usable audio stream (port != 0)."""
    for i, m in enumerate(sdp.media):
        if m.media == "audio" and m.port != 0:
            return i, m
    raise NegotiationError("no audio stream in the SDP")


def media_direction(sdp: SessionDescription, m: MediaDescription) -> str:
    """The effective direction: media level, else session level, else sendrecv (RFC 3264 §5.1)."""
    return m.direction or sdp.direction or "sendrecv"


def mirror_direction(direction: str) -> str:
    """Our answer direction for an offered one (RFC 3264 §6.1)."""
    return {"sendonly": "recvonly", "recvonly": "sendonly", "inactive": "inactive"}.get(direction, "sendrecv")


def is_hold(sdp: SessionDescription, m: Optional[MediaDescription] = None) -> bool:
    """sendonly, inactive, or c=0.0.0.0 (media, else session level) means the peer holds the call."""
    if m is None:
        _, m = audio_media(sdp)
    connection = m.connection or sdp.connection
    if connection is not None and connection.is_null:
        return True
    return media_direction(sdp, m) in ("sendonly", "inactive")


def is_webrtc(sdp: SessionDescription) -> bool:
    """ICE credentials and a DTLS fingerprint: a SIP-over-WebRTC offer for the aiortc leg."""
    def has(name):
        return any(n == name for n, _ in sdp.attributes) or any(m.attribute(name) is not None for m in sdp.media)
    return (has("ice-ufrag") and has("ice-pwd")) and has("fingerprint")


def remote_addresses(sdp: SessionDescription, m: MediaDescription) -> tuple:
    """(rtp address, rtcp address or None when muxed); RTCP is port+1 unless a=rtcp / a=rtcp-mux."""
    connection = m.connection or sdp.connection
    if connection is None:
        raise NegotiationError("no c= line at media or session level")
    _check_target(connection.address, m.port, "media")
    rtp = (connection.address, m.port)
    if m.rtcp_mux:
        return rtp, None
    if m.rtcp is not None:
        host = m.rtcp.connection.address if m.rtcp.connection else connection.address
        _check_target(host, m.rtcp.port, "RTCP")
        return rtp, (host, m.rtcp.port)
    _check_target(connection.address, m.port + 1, "RTCP (the media port + 1)")
    return rtp, (connection.address, m.port + 1)


def _check_target(address: str, port: int, what: str) -> None:
    """Refuse (NegotiationError: 488 / the call ends) what the RTP path could not send to."""
    if not usable_address(address):
        raise NegotiationError(f"unusable {what} address {_shown(address)}: an IP address is needed")
    if not usable_port(port):
        raise NegotiationError(f"unusable {what} port {_shown(port)}: 1-65535 is needed")


def _accepted(formats: Iterable[PayloadFormat], codecs: Sequence[str]) -> tuple:
    """The formats (in their order) whose codec is in our list; DTMF only at a kept audio clock rate."""
    wanted = set(codecs)
    audio = [f for f in formats if f.name in wanted and not f.is_dtmf]
    clocks = {f.clock_rate for f in audio}
    dtmf = [f for f in formats if f.is_dtmf and f.name in wanted]
    dtmf = [f for f in dtmf if f.clock_rate in clocks] or dtmf[:1]
    keep = {f.payload_type for f in audio + dtmf}
    return tuple(f for f in formats if f.payload_type in keep)


def negotiate_as_answerer(offer: SessionDescription, codecs: Sequence[str]) -> Negotiated:
    """Negotiate an incoming offer: keep the offer's order; send with the first offered audio codec we know."""
    _, m = audio_media(offer)
    kept = _accepted(payload_formats(m), codecs)
    audio = tuple(f for f in kept if not f.is_dtmf)
    if not audio:
        offered = _shown(" ".join(m.formats), 60)
        raise NegotiationError(f"no common audio codec (offered {offered}; ours {', '.join(codecs)})")
    rtp, rtcp = remote_addresses(offer, m)
    remote_direction = media_direction(offer, m)
    return Negotiated(
        send_codec=audio[0], codecs=audio, dtmf=tuple(f for f in kept if f.is_dtmf), remote_rtp=rtp,
        remote_rtcp=rtcp, rtcp_mux=m.rtcp_mux, local_direction=mirror_direction(remote_direction),
        remote_direction=remote_direction, on_hold=is_hold(offer, m), ptime=m.ptime or 20, proto=m.proto,
        remote_crypto=m.crypto)


def negotiate_as_offerer(answer: SessionDescription, codecs: Sequence[str],
                         offered_direction: str = "sendrecv") -> Negotiated:
    """Apply the peer's answer to our offer: send with the first of *our* codecs present in the answer."""
    _, m = audio_media(answer)
    formats = payload_formats(m)
    audio = tuple(f for f in formats if f.name is not None and not f.is_dtmf)
    send = next((f for name in codecs for f in audio if f.name == name), None)
    if send is None:
        # the original falls back to the first non-DTMF PT; we can only send what we can encode
        raise NegotiationError(f"the answer holds no codec we offered ({_shown(' '.join(m.formats), 60)})")
    rtp, rtcp = remote_addresses(answer, m)
    remote_direction = media_direction(answer, m)
    local = offered_direction
    if remote_direction == "inactive" or offered_direction == "inactive":
        local = "inactive"
    elif remote_direction == "recvonly":
        local = "sendonly" if offered_direction in ("sendrecv", "sendonly") else "inactive"
    elif remote_direction == "sendonly":
        local = "recvonly" if offered_direction in ("sendrecv", "recvonly") else "inactive"
    return Negotiated(
        send_codec=send, codecs=tuple(f for f in audio if f.name in codecs),
        dtmf=tuple(f for f in formats if f.is_dtmf), remote_rtp=rtp, remote_rtcp=rtcp, rtcp_mux=m.rtcp_mux,
        local_direction=local, remote_direction=remote_direction, on_hold=is_hold(answer, m),
        ptime=m.ptime or 20, proto=m.proto, remote_crypto=m.crypto)


def _addrtype(address: str) -> str:
    return "IP6" if ":" in address else "IP4"


def _origin(address: str, session_id: Optional[int], session_version: Optional[int]) -> Origin:
    sid = int(time.time()) if session_id is None else session_id
    version = sid + 1 if session_version is None else session_version
    return Origin("-", str(sid), str(version), "IN", _addrtype(address), address)


def build_offer(codecs: Sequence[str], address: str, port: int, *, external_ip: Optional[str] = None,
                direction: str = "sendrecv", rtcp_mux: bool = True, ptime: Optional[int] = None,
                crypto: Sequence[Crypto] = (), ssrc: Optional[int] = None, cname: Optional[str] = None,
                session_id: Optional[int] = None, session_version: Optional[int] = None) -> SessionDescription:
    """Our offer: one audio stream listing ``codecs`` in configured order (RTP/SAVP when ``crypto``)."""
    specs = [CODEC_SPECS[name] for name in codecs if name in CODEC_SPECS]
    if not any(s.name != "telephone_event" for s in specs):
        raise NegotiationError("no audio codec to offer")
    public = external_ip or address
    attrs = [("mid", "0")]
    if ssrc is not None:
        attrs.append(("ssrc", f"{ssrc} cname:{cname or 'activecall'}"))
    media = MediaDescription(
        media="audio", port=port, proto=SDES_PROTO if crypto else PLAIN_PROTO,
        formats=tuple(str(s.payload_type) for s in specs), rtpmaps=tuple(s.rtpmap for s in specs),
        fmtps=tuple((s.payload_type, s.fmtp) for s in specs if s.fmtp), direction=direction, rtcp_mux=rtcp_mux,
        ptime=ptime, crypto=tuple(crypto), attributes=tuple(attrs))
    return SessionDescription(origin=_origin(public, session_id, session_version),
                              connection=Connection(public, addrtype=_addrtype(public)), media=(media,))


def build_answer(offer: SessionDescription, codecs: Sequence[str], address: str, port: int, *,
                 external_ip: Optional[str] = None, crypto: Sequence[Crypto] = (), direction: Optional[str] = None,
                 ssrc: Optional[int] = None, cname: Optional[str] = None, session_id: Optional[int] = None,
                 session_version: Optional[int] = None) -> tuple:
    """(answer SDP, Negotiated) for ``offer``: its codecs we share, in its order, other streams rejected.

    ``direction`` overrides the mirrored one (e.g. we hold: sendonly).  An SRTP
    offer needs ``crypto`` (our a=crypto answer line); without it the offer is
    refused with NegotiationError, as is a plain offer answered with crypto.
    """
    index, m = audio_media(offer)
    negotiated = negotiate_as_answerer(offer, codecs)
    secure = m.proto in SECURE_PROTOS
    if secure and not crypto:
        raise NegotiationError(f"the offer needs SRTP ({m.proto}) and no crypto suite was agreed")
    if crypto and not secure:
        raise NegotiationError("crypto attributes for a plain RTP offer")
    keep = negotiated.receive_payload_types
    pts = [pt for pt in m.payload_types if pt in keep]
    local_direction = direction or negotiated.local_direction
    public = external_ip or address
    attrs = [(n, v) for n, v in m.attributes if n == "mid"]
    if ssrc is not None:
        attrs.append(("ssrc", f"{ssrc} cname:{cname or 'activecall'}"))
    audio = MediaDescription(
        media="audio", port=port, proto=m.proto, formats=tuple(str(pt) for pt in pts),
        rtpmaps=tuple(m.rtpmap(pt) or STATIC_PAYLOAD_TYPES[pt] for pt in pts),
        fmtps=tuple((pt, p) for pt, p in m.fmtps if pt in keep), direction=local_direction,
        rtcp_mux=m.rtcp_mux, ptime=m.ptime, crypto=tuple(crypto), attributes=tuple(attrs))
    media = []
    for i, other in enumerate(offer.media):
        if i == index:
            media.append(audio)
        else:  # RFC 3264 §6: one m= line per offered stream; a refused one has port 0
            media.append(MediaDescription(media=other.media, port=0, proto=other.proto, formats=other.formats[:1]))
    answer = SessionDescription(origin=_origin(public, session_id, session_version),
                                connection=Connection(public, addrtype=_addrtype(public)), media=tuple(media))
    return answer, replace(negotiated, local_direction=local_direction)
