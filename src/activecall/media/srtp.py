"""SDES-SRTP (RFC 4568 keys in ``a=crypto``, RFC 3711 packets) with pylibsrtp.

The cryptography is libsrtp's (bundled by pylibsrtp, also used by aiortc); this
module only handles the SDP side — making our ``a=crypto`` line with a fresh
key, reading the peer's, picking a suite from an offer — and wraps the two
libsrtp sessions a leg needs: outbound with our key, inbound with theirs.

Suites: AES_CM_128_HMAC_SHA1_80 and AES_CM_128_HMAC_SHA1_32 (the 32-bit tag
applies to SRTP only; SRTCP keeps an 80-bit tag, RFC 4568 §6.2.2 — libsrtp does
the same).  Lines with an MKI or with session parameters we do not implement
(UNENCRYPTED_SRTP, KDR, ...) are not acceptable, as RFC 4568 §6.3 requires.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import pylibsrtp

from activecall.sip.sdp import Crypto

AES_CM_128_HMAC_SHA1_80 = "AES_CM_128_HMAC_SHA1_80"
AES_CM_128_HMAC_SHA1_32 = "AES_CM_128_HMAC_SHA1_32"

#: suite name -> (libsrtp profile, SRTP auth tag length)
SUITES = {
    AES_CM_128_HMAC_SHA1_80: (pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80, 10),
    AES_CM_128_HMAC_SHA1_32: (pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_32, 4),
}
#: what we offer, in preference order
DEFAULT_SUITES = (AES_CM_128_HMAC_SHA1_80, AES_CM_128_HMAC_SHA1_32)
KEY_LENGTH = 30  # 16-byte master key + 14-byte master salt


class SrtpError(Exception):
    """A packet failed authentication/replay checks, or a key line is unusable."""


class NoAcceptableCrypto(SrtpError):
    """An SRTP offer (or answer) has no crypto line we can use: answer 488 / end the call."""

    status = 488


@dataclass(frozen=True)
class SdesKey:
    """One side's keying: suite + 30 bytes of master key and salt."""

    suite: str
    key: bytes
    tag: int = 1

    def crypto(self) -> Crypto:
        """The ``a=crypto`` line carrying this key."""
        return Crypto(self.tag, self.suite, "inline:" + base64.b64encode(self.key).decode("ascii"))


def new_key(suite: str = AES_CM_128_HMAC_SHA1_80, tag: int = 1) -> SdesKey:
    """A fresh random key for ``suite``."""
    if suite not in SUITES:
        raise ValueError(f"unsupported SRTP suite {suite!r} (supported: {', '.join(SUITES)})")
    return SdesKey(suite, os.urandom(KEY_LENGTH), tag)


def offer_keys(suites: Sequence[str] = DEFAULT_SUITES) -> tuple[SdesKey, ...]:
    """One fresh key per suite, tagged 1..n, for an RTP/SAVP offer."""
    return tuple(new_key(s, tag=i) for i, s in enumerate(suites, 1))


def parse_key(crypto: Crypto) -> SdesKey:
    """The key in a peer's ``a=crypto`` line; ``SrtpError`` says why it is unusable."""
    if crypto.suite not in SUITES:
        raise SrtpError(f"unsupported SRTP suite {crypto.suite!r}")
    if crypto.session_params:
        raise SrtpError(f"unsupported session parameters {' '.join(crypto.session_params)!r}")
    params = crypto.key_params.split(";")
    if len(params) != 1:
        raise SrtpError("multiple master keys are not supported")
    method, _, info = params[0].partition(":")
    if method != "inline":
        raise SrtpError(f"key method {method!r} is not inline")
    fields = info.split("|")
    try:
        key = base64.b64decode(fields[0], validate=True)
    except (binascii.Error, ValueError):
        raise SrtpError("the inline key is not base64") from None
    if len(key) != KEY_LENGTH:
        raise SrtpError(f"the inline key is {len(key)} bytes, not {KEY_LENGTH}")
    for extra in fields[1:]:
        if ":" in extra:
            raise SrtpError("MKI is not supported")
        # a lifetime (2^n or decimal) is accepted: we never send 2^31 packets on one key
    return SdesKey(crypto.suite, key, crypto.tag)


def choose_crypto(offered: Sequence[Crypto], suites: Sequence[str] = DEFAULT_SUITES) -> Optional[SdesKey]:
    """The first offered line (the offerer's preference order) we can use, or None."""
    for line in offered:
        if line.suite not in suites:
            continue
        try:
            return parse_key(line)
        except SrtpError:
            continue
    return None


def answer_crypto(offered: Sequence[Crypto], suites: Sequence[str] = DEFAULT_SUITES) -> tuple[SdesKey, SdesKey]:
    """``(theirs, ours)`` for answering an SRTP offer: our key uses their tag and suite.

    Raises ``NoAcceptableCrypto`` (→ 488) when no line is usable.
    """
    theirs = choose_crypto(offered, suites)
    if theirs is None:
        names = ", ".join(c.suite for c in offered) or "none"
        raise NoAcceptableCrypto(f"no acceptable SRTP crypto suite in the offer (offered: {names})")
    return theirs, new_key(theirs.suite, theirs.tag)


def match_answer(ours: Sequence[SdesKey], answered: Sequence[Crypto]) -> tuple[SdesKey, SdesKey]:
    """``(ours, theirs)`` for the peer's answer to our SRTP offer: the answer's line
    must name one of our tags with the same suite.  ``NoAcceptableCrypto`` otherwise."""
    by_tag = {k.tag: k for k in ours}
    for line in answered:
        mine = by_tag.get(line.tag)
        if mine is None or mine.suite != line.suite:
            continue
        try:
            return mine, parse_key(line)
        except SrtpError:
            continue
    raise NoAcceptableCrypto("the answer has no a=crypto line matching our offer")


def _session(key: SdesKey, inbound: bool) -> pylibsrtp.Session:
    profile, _ = SUITES[key.suite]
    policy = pylibsrtp.Policy(
        key=key.key,
        ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND if inbound else pylibsrtp.Policy.SSRC_ANY_OUTBOUND,
        srtp_profile=profile,
    )
    return pylibsrtp.Session(policy=policy)


class SrtpContext:
    """The two directions of one SDES-SRTP leg (both RTP and RTCP)."""

    def __init__(self, local: SdesKey, remote: SdesKey):
        self.local = local
        self.remote = remote
        self._out = _session(local, inbound=False)
        self._in = _session(remote, inbound=True)

    def protect(self, rtp: bytes) -> bytes:
        return self._call(self._out.protect, rtp)

    def unprotect(self, srtp: bytes) -> bytes:
        return self._call(self._in.unprotect, srtp)

    def protect_rtcp(self, rtcp: bytes) -> bytes:
        return self._call(self._out.protect_rtcp, rtcp)

    def unprotect_rtcp(self, srtcp: bytes) -> bytes:
        return self._call(self._in.unprotect_rtcp, srtcp)

    @staticmethod
    def _call(fn, data: bytes) -> bytes:
        try:
            return fn(data)
        except pylibsrtp.Error as e:
            raise SrtpError(str(e)) from None
