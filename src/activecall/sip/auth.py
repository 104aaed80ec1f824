"""Digest authentication for SIP (RFC 3261 §22, RFC 2617, RFC 7616, RFC 8760).

The maths and the header syntax are pure functions.  ``DigestClient`` is the
one small piece of state a UAC needs: nonce counts per nonce and which realms
it has already answered, so a wrong password ends in a clear failure instead of
an endless 401 loop, while ``stale=true`` is retried transparently.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from typing import Optional

from activecall.sip.message import Request, Response, quote, split_outside_quotes, unquote

#: algorithm name (upper case) -> hash function; the -SESS forms share the hash
HASHES = {
    "MD5": hashlib.md5,
    "SHA-256": hashlib.sha256,
    "SHA-512-256": lambda data=b"": hashlib.new("sha512_256", data),
}
#: preference when a server offers several challenges (strongest first)
PREFERENCE = ("SHA-512-256", "SHA-256", "MD5")


class AuthError(ValueError):
    """An unusable challenge or Authorization header."""


@dataclass
class Challenge:
    """One ``WWW-Authenticate`` / ``Proxy-Authenticate`` digest challenge."""

    realm: str
    nonce: str
    algorithm: str = "MD5"
    qop: tuple = ()
    opaque: Optional[str] = None
    stale: bool = False
    domain: Optional[str] = None
    #: True for Proxy-Authenticate (answered with Proxy-Authorization)
    proxy: bool = False

    @property
    def base_algorithm(self) -> str:
        return self.algorithm.upper().removesuffix("-SESS")

    @property
    def supported(self) -> bool:
        return self.base_algorithm in HASHES and (not self.qop or bool({"auth", "auth-int"} & set(self.qop)))

    def __str__(self) -> str:
        parts = [f"realm={quote(self.realm)}", f"nonce={quote(self.nonce)}"]
        if self.opaque is not None:
            parts.append(f"opaque={quote(self.opaque)}")
        parts.append(f"algorithm={self.algorithm}")
        if self.qop:
            parts.append(f"qop={quote(','.join(self.qop))}")
        if self.stale:
            parts.append("stale=true")
        return "Digest " + ", ".join(parts)


@dataclass
class Authorization:
    """The fields of an ``Authorization`` / ``Proxy-Authorization`` header."""

    username: str
    realm: str
    nonce: str
    uri: str
    response: str
    algorithm: str = "MD5"
    qop: Optional[str] = None
    nc: Optional[str] = None
    cnonce: Optional[str] = None
    opaque: Optional[str] = None
    extra: dict = field(default_factory=dict)

    def __str__(self) -> str:
        parts = [
            f"username={quote(self.username)}", f"realm={quote(self.realm)}",
            f"nonce={quote(self.nonce)}", f"uri={quote(self.uri)}",
            f"response={quote(self.response)}", f"algorithm={self.algorithm}",
        ]
        if self.qop:
            parts += [f"qop={self.qop}", f"nc={self.nc}", f"cnonce={quote(self.cnonce or '')}"]
        if self.opaque is not None:
            parts.append(f"opaque={quote(self.opaque)}")
        return "Digest " + ", ".join(parts)


def _parse_digest_params(value: str) -> dict[str, str]:
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "digest":
        raise AuthError(f"not a Digest header: {value[:40]!r}")
    params = {}
    for item in split_outside_quotes(rest, ","):
        name, eq, val = item.strip().partition("=")
        if not item.strip():
            continue
        if not eq:
            raise AuthError(f"bad digest parameter {item.strip()!r}")
        params[name.strip().lower()] = unquote(val)
    return params


def parse_challenge(value: str, proxy: bool = False) -> Challenge:
    """Parse one digest challenge header value.

    The algorithm keeps the server's spelling (``MD5-sess``): it is compared
    case-insensitively here but echoed verbatim, as some registrars compare it
    byte for byte.
    """
    p = _parse_digest_params(value)
    if "realm" not in p or "nonce" not in p:
        raise AuthError("challenge without realm or nonce")
    qop = tuple(q.strip().lower() for q in p.get("qop", "").split(",") if q.strip())
    return Challenge(
        realm=p["realm"], nonce=p["nonce"], algorithm=p.get("algorithm", "MD5").strip(),
        qop=qop, opaque=p.get("opaque"), stale=p.get("stale", "").lower() == "true",
        domain=p.get("domain"), proxy=proxy,
    )


def challenges_in(response: Response) -> list[Challenge]:
    """Every parseable digest challenge of a 401/407, in header order."""
    found = []
    for name, proxy in (("WWW-Authenticate", False), ("Proxy-Authenticate", True)):
        for value in response.headers.get_all(name):
            try:
                found.append(parse_challenge(value, proxy))
            except AuthError:
                continue  # e.g. a Basic or Bearer challenge next to the digest one
    return found


def choose_challenge(challenges: list[Challenge]) -> Optional[Challenge]:
    """The strongest supported challenge per realm order (RFC 7616 §3.7)."""
    usable = [c for c in challenges if c.supported]
    usable.sort(key=lambda c: PREFERENCE.index(c.base_algorithm))
    return usable[0] if usable else None


def parse_authorization(value: str) -> Authorization:
    p = _parse_digest_params(value)
    try:
        return Authorization(
            username=p.pop("username"), realm=p.pop("realm"), nonce=p.pop("nonce"),
            uri=p.pop("uri"), response=p.pop("response"),
            algorithm=p.pop("algorithm", "MD5").strip(), qop=p.pop("qop", None),
            nc=p.pop("nc", None), cnonce=p.pop("cnonce", None), opaque=p.pop("opaque", None),
            extra=p,
        )
    except KeyError as e:
        raise AuthError(f"Authorization without {e.args[0]}") from None


# -- the maths ----------------------------------------------------------------------


def _h(algorithm: str, data: bytes) -> str:
    base = algorithm.upper().removesuffix("-SESS")
    if base not in HASHES:
        raise AuthError(f"unsupported digest algorithm {algorithm}")
    return HASHES[base](data).hexdigest()


def digest_response(
    *, algorithm: str, username: str, realm: str, password: str, method: str, uri: str,
    nonce: str, qop: Optional[str] = None, nc: Optional[str] = None,
    cnonce: Optional[str] = None, body: bytes = b"",
) -> str:
    """The ``response`` value (RFC 7616 §3.4.1; RFC 2617 §3.2.2 without qop)."""

    def h(text: str) -> str:
        return _h(algorithm, text.encode("utf-8"))

    ha1 = h(f"{username}:{realm}:{password}")
    if algorithm.upper().endswith("-SESS"):
        ha1 = h(f"{ha1}:{nonce}:{cnonce}")
    a2 = f"{method}:{uri}"
    if qop == "auth-int":
        a2 += ":" + _h(algorithm, body)
    ha2 = h(a2)
    if qop:
        return h(f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")
    return h(f"{ha1}:{nonce}:{ha2}")


def make_cnonce() -> str:
    return secrets.token_hex(8)


def build_authorization(
    challenge: Challenge, username: str, password: str, method: str, uri: str,
    nc: int = 1, cnonce: Optional[str] = None, body: bytes = b"",
) -> Authorization:
    """Answer ``challenge``: qop=auth preferred, auth-int if that is all it offers."""
    qop = None
    if challenge.qop:
        qop = "auth" if "auth" in challenge.qop else "auth-int"
    needs_cnonce = qop or challenge.algorithm.upper().endswith("-SESS")
    cnonce = (cnonce or make_cnonce()) if needs_cnonce else None
    nc_text = f"{nc:08x}" if qop else None
    response = digest_response(
        algorithm=challenge.algorithm, username=username, realm=challenge.realm,
        password=password, method=method, uri=uri, nonce=challenge.nonce, qop=qop,
        nc=nc_text, cnonce=cnonce, body=body,
    )
    return Authorization(
        username=username, realm=challenge.realm, nonce=challenge.nonce, uri=uri,
        response=response, algorithm=challenge.algorithm, qop=qop, nc=nc_text,
        cnonce=cnonce, opaque=challenge.opaque,
    )


def verify_authorization(auth: Authorization, password: str, method: str, body: bytes = b"") -> bool:
    """Server side: is ``auth`` right for ``password``?  (Nonce freshness is the caller's.)"""
    try:
        expected = digest_response(
            algorithm=auth.algorithm, username=auth.username, realm=auth.realm, password=password,
            method=method, uri=auth.uri, nonce=auth.nonce, qop=auth.qop, nc=auth.nc,
            cnonce=auth.cnonce, body=body,
        )
    except AuthError:
        return False
    return hmac.compare_digest(expected, auth.response.lower())


def make_challenge(realm: str, algorithm: str = "MD5", qop: tuple = ("auth",), stale: bool = False,
                   nonce: Optional[str] = None, opaque: Optional[str] = None) -> Challenge:
    """A fresh challenge for a server (or a test peer) to send."""
    return Challenge(realm=realm, nonce=nonce or secrets.token_urlsafe(24), algorithm=algorithm,
                     qop=tuple(qop), opaque=opaque, stale=stale)


# -- client state -----------------------------------------------------------------------


class DigestClient:
    """Answers 401/407 for one set of credentials across the requests of a UA.

    ``authorize`` returns False when retrying is pointless: no supported
    challenge, or a realm we already answered challenges us again without
    ``stale=true`` (the password is wrong).  The caller must send the request
    again with a new branch and CSeq + 1.
    """

    def __init__(self, username: str, password: str, realm: Optional[str] = None):
        self.username = username
        self.password = password
        #: when set, only challenges from this realm are answered
        self.realm = realm
        self._nonce_counts: dict[str, int] = {}
        self._answered: dict[tuple[bool, str], str] = {}  # (proxy, realm) -> nonce
        self.last_error: Optional[str] = None

    def next_nc(self, nonce: str) -> int:
        """1 for a nonce we have not used yet, then 2, 3, ... (RFC 7616 §3.4)."""
        count = self._nonce_counts.pop(nonce, 0) + 1
        self._nonce_counts[nonce] = count  # re-inserted: the dict is oldest-first
        while len(self._nonce_counts) > 32:  # a server never goes back to old nonces
            del self._nonce_counts[next(iter(self._nonce_counts))]
        return count

    def authorize(self, request: Request, challenge_response: Response) -> bool:
        """Add (or replace) the Authorization header of ``request`` for this challenge."""
        challenges = challenges_in(challenge_response)
        if self.realm is not None:
            challenges = [c for c in challenges if c.realm == self.realm] or challenges
        challenge = choose_challenge(challenges)
        if challenge is None:
            self.last_error = "no supported digest challenge"
            return False
        key = (challenge.proxy, challenge.realm)
        if key in self._answered and not challenge.stale:
            self.last_error = f"credentials for {self.username!r} rejected by realm {challenge.realm!r}"
            return False
        auth = build_authorization(
            challenge, self.username, self.password, request.method, str(request.uri),
            nc=self.next_nc(challenge.nonce), body=request.body,
        )
        self._answered[key] = challenge.nonce
        header = "Proxy-Authorization" if challenge.proxy else "Authorization"
        request.headers.remove(header)
        request.headers.add(header, str(auth))
        self.last_error = None
        return True

    def accepted(self) -> None:
        """A request got past authentication: the next challenge is a new round."""
        self._answered.clear()

    def authorize_again(self, request: Request, challenge: Challenge) -> None:
        """Pre-emptively answer a known challenge on a new request (nc increments)."""
        auth = build_authorization(
            challenge, self.username, self.password, request.method, str(request.uri),
            nc=self.next_nc(challenge.nonce), body=request.body,
        )
        header = "Proxy-Authorization" if challenge.proxy else "Authorization"
        request.headers.remove(header)
        request.headers.add(header, str(auth))
