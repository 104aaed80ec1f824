"""SDP bodies as the calls handle them in offer/answer (RFC 3264) when no media engine answers:
the content type, the audio stream's direction and whether it is a hold, the same body with another
direction, and a minimal PCMU offer.  Parsing and negotiation are ``sdp.py``'s.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from activecall.sip import sdp
from activecall.sip.digits import is_number
from activecall.sip.message import generate_tag

SDP = "application/sdp"


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


__all__ = [
    "SDP", "sdp_direction", "with_direction", "mirror_direction", "minimal_offer",
]
