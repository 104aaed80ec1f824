"""Pure SDP text edits for the WebRTC leg: which ICE candidates the peers see.

aiortc gathers on every interface; the original removes IPv6 candidates
from the offer and the answer unless ``enableIpv6`` is true, and a daemon
behind a 1:1 NAT advertises ``external_ip``.  These work on the SDP text
because aiortc's own SDP objects are not meant to be edited between
``setLocalDescription`` and sending.
"""

from __future__ import annotations

import ipaddress
from typing import Optional


def _lines(sdp: str) -> list[str]:
    return [line for line in sdp.replace("\r\n", "\n").split("\n") if line]


def _join(lines: list[str]) -> str:
    return "\r\n".join(lines) + "\r\n"


def _candidate_address(line: str) -> Optional[str]:
    """The connection address of an ``a=candidate`` line (field 5)."""
    parts = line.split()
    return parts[4] if len(parts) >= 8 else None


def _is_ipv6(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).version == 6
    except ValueError:
        return False  # an mDNS name such as abcd.local: kept


def _is_ipv4(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).version == 4
    except ValueError:
        return False


def strip_ipv6_candidates(sdp: str) -> str:
    """The SDP without IPv6 ``a=candidate`` lines (mDNS and IPv4 ones kept)."""
    kept = []
    for line in _lines(sdp):
        if line.startswith("a=candidate:"):
            address = _candidate_address(line)
            if address is not None and _is_ipv6(address):
                continue
        kept.append(line)
    return _join(kept)


def advertise_external_ip(sdp: str, external_ip: str) -> str:
    """Add a server-reflexive candidate on ``external_ip`` for every IPv4 host
    candidate (same port: a 1:1 NAT), and put ``external_ip`` in ``c=``.

    The host candidates stay, so peers on the same network still connect
    directly; ICE picks whichever pair works.
    """
    out: list[str] = []
    extra_foundation = 0
    for line in _lines(sdp):
        if line.startswith("c=IN IP4 "):
            out.append(f"c=IN IP4 {external_ip}")
            continue
        out.append(line)
        if not line.startswith("a=candidate:"):
            continue
        parts = line[len("a=candidate:"):].split()
        if len(parts) < 8 or parts[6] != "typ" or parts[7] != "host":
            continue
        foundation, component, transport, priority, address, port = parts[:6]
        if not _is_ipv4(address) or address == external_ip:
            continue
        extra_foundation += 1
        # srflx type preference (100) is below host (126): local pairs are tried first
        srflx_priority = (100 << 24) + (int(priority) & 0xFFFFFF)
        out.append(
            f"a=candidate:x{extra_foundation}{foundation} {component} {transport} {srflx_priority} "
            f"{external_ip} {port} typ srflx raddr {address} rport {port}"
        )
    return _join(out)


def candidate_addresses(sdp: str) -> list[str]:
    """Every candidate address in the SDP (for logs and tests)."""
    return [a for a in (_candidate_address(line) for line in _lines(sdp) if line.startswith("a=candidate:"))
            if a is not None]
