"""SIP messages (RFC 3261 §7, §20, §25): parse bytes into objects and back.

Hand-written because no maintained SIP library exists for Twisted.  These are
pure functions and plain classes: no I/O, no reactor.  Parsing is defensive:
whatever bytes arrive, ``parse_message`` either returns a ``Request`` /
``Response`` or raises ``SIPParseError``, which says whether enough of the
request was understood to answer it with a 400.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import secrets
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Union

from activecall.sip.digits import is_number

SIP_VERSION = "SIP/2.0"
#: RFC 3261 §8.1.1.7: every branch we create starts with this.
BRANCH_MAGIC = "z9hG4bK"
#: a datagram larger than this is not worth parsing; streams cap one message.
MAX_MESSAGE_SIZE = 65535

#: compact form (RFC 3261 §7.3.3, RFC 3515, RFC 3891, RFC 4028 ...) -> full name
COMPACT_FORMS = {
    "i": "Call-ID",
    "m": "Contact",
    "f": "From",
    "t": "To",
    "v": "Via",
    "l": "Content-Length",
    "c": "Content-Type",
    "k": "Supported",
    "s": "Subject",
    "e": "Content-Encoding",
    "o": "Event",
    "u": "Allow-Events",
    "r": "Refer-To",
    "b": "Referred-By",
    "x": "Session-Expires",
    "a": "Accept-Contact",
    "j": "Reject-Contact",
    "d": "Request-Disposition",
    "y": "Identity",
    "n": "Identity-Info",
}

#: lower-case name -> canonical spelling used when serialising
_CANONICAL = {
    name.lower(): name
    for name in (
        "Accept", "Accept-Encoding", "Accept-Language", "Alert-Info", "Allow", "Allow-Events",
        "Authentication-Info", "Authorization", "Call-ID", "Call-Info", "Contact",
        "Content-Disposition", "Content-Encoding", "Content-Language", "Content-Length",
        "Content-Type", "CSeq", "Date", "Error-Info", "Event", "Expires", "From", "In-Reply-To",
        "Max-Forwards", "Min-Expires", "MIME-Version", "Organization", "P-Asserted-Identity",
        "Priority", "Proxy-Authenticate", "Proxy-Authorization", "Proxy-Require", "RAck",
        "Reason", "Record-Route", "Refer-To", "Referred-By", "Reply-To", "Require",
        "Retry-After", "Route", "RSeq", "Server", "Session-Expires", "Subject",
        "Subscription-State", "Supported", "Timestamp", "To", "Unsupported", "User-Agent",
        "Via", "Warning", "WWW-Authenticate", "Replaces", "Privacy", "Identity",
        "Identity-Info", "Accept-Contact", "Reject-Contact", "Request-Disposition", "Min-SE",
    )
}

#: headers whose value is a comma-separated list (RFC 3261 §7.3.1); split on parse
LIST_HEADERS = frozenset(
    h.lower()
    for h in (
        "Via", "Route", "Record-Route", "Contact", "Allow", "Supported", "Require",
        "Proxy-Require", "Unsupported", "Accept", "Accept-Encoding", "Accept-Language",
        "Content-Encoding", "Content-Language", "Allow-Events", "In-Reply-To", "Warning",
        "Call-Info", "Alert-Info", "Error-Info", "Reply-To", "P-Asserted-Identity", "Privacy",
    )
)

#: headers without which no response can be formed (RFC 3261 §8.1.1)
MANDATORY = ("via", "from", "to", "call-id", "cseq")

#: headers a request may carry once only (RFC 3261 §7.3.1, §20; RFC 4475 §3.3.8 multi01)
SINGLE_VALUED = ("from", "to", "call-id", "cseq", "max-forwards", "expires")

#: the methods defined by RFC 3261 and its extensions (3262, 3265, 3311, 3428, 3515, 3903, 6086);
#: a request with any other method is answered 501 by a UAS, 405 for one of these it does not allow
KNOWN_METHODS = frozenset((
    "INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "PRACK", "SUBSCRIBE", "NOTIFY",
    "PUBLISH", "INFO", "REFER", "MESSAGE", "UPDATE",
))

#: URI schemes we parse into parts; any other well-formed scheme is kept opaque (RFC 3261 §19.1,
#: RFC 4475 §3.3.2-3.3.4): parsed, echoed, never routed to
STRUCTURED_SCHEMES = ("sip", "sips", "tel")

#: largest delta-seconds (Expires, expires=) and Max-Forwards (RFC 3261 §20.19, §20.22, RFC 4475 §3.1.2.4)
MAX_DELTA_SECONDS = 2**32 - 1
MAX_MAX_FORWARDS = 255

REASON_PHRASES = {
    100: "Trying", 180: "Ringing", 181: "Call Is Being Forwarded", 182: "Queued",
    183: "Session Progress", 199: "Early Dialog Terminated",
    200: "OK", 202: "Accepted", 204: "No Notification",
    300: "Multiple Choices", 301: "Moved Permanently", 302: "Moved Temporarily",
    305: "Use Proxy", 380: "Alternative Service",
    400: "Bad Request", 401: "Unauthorized", 402: "Payment Required", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 406: "Not Acceptable",
    407: "Proxy Authentication Required", 408: "Request Timeout", 410: "Gone",
    413: "Request Entity Too Large", 414: "Request-URI Too Long", 415: "Unsupported Media Type",
    416: "Unsupported URI Scheme", 420: "Bad Extension", 421: "Extension Required",
    422: "Session Interval Too Small", 423: "Interval Too Brief",
    480: "Temporarily Unavailable", 481: "Call/Transaction Does Not Exist",
    482: "Loop Detected", 483: "Too Many Hops", 484: "Address Incomplete", 485: "Ambiguous",
    486: "Busy Here", 487: "Request Terminated", 488: "Not Acceptable Here",
    489: "Bad Event", 491: "Request Pending", 493: "Undecipherable",
    500: "Server Internal Error", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Server Time-out", 505: "Version Not Supported",
    513: "Message Too Large",
    600: "Busy Everywhere", 603: "Decline", 604: "Does Not Exist Anywhere", 606: "Not Acceptable",
}

_TOKEN_RE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9\-._]+")
_DNS_LABEL_RE = re.compile(r"[A-Za-z0-9_-]{1,63}", re.ASCII)
# RFC 3261 §25.1 characters allowed unescaped in the user and password parts
_USER_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!~*'()&=+$,;?/")
_PASSWORD_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!~*'()&=+$,")


class SIPParseError(ValueError):
    """A malformed message.  ``can_respond``: a 400 can be built from ``partial``."""

    def __init__(self, reason: str, can_respond: bool = False, partial: Optional["Request"] = None):
        super().__init__(reason)
        self.reason = reason
        self.can_respond = can_respond and partial is not None
        self.partial = partial


# -- small lexical helpers -----------------------------------------------------


def canonical_name(name: str) -> str:
    """The long, conventionally spelt form of a header name (``i`` -> ``Call-ID``)."""
    low = name.strip().lower()
    if low in COMPACT_FORMS:
        return COMPACT_FORMS[low]
    return _CANONICAL.get(low, name.strip())


def split_outside_quotes(text: str, sep: str) -> list[str]:
    """Split on ``sep`` where it is outside double quotes and ``<...>``."""
    if '"' not in text and "<" not in text:  # nothing to protect: the usual case
        return text.split(sep)
    parts, current = [], []
    in_quotes = escaped = False
    depth = 0
    for ch in text:
        if in_quotes:
            current.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_quotes = False
            continue
        if ch == '"':
            in_quotes = True
        elif ch == "<":
            depth += 1
        elif ch == ">" and depth:
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return parts


def unquote(value: str) -> str:
    """``"a \\"b\\""`` -> ``a "b"``; an unquoted value is returned stripped."""
    value = value.strip()
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def quote(value: str) -> str:
    """A quoted-string: \\ and " escaped, and control characters too (a quoted-pair, RFC 3261
    §25.1: a display name may hold a NUL, RFC 4475 §3.1.1.2); CR and LF, which no quoted-pair
    can carry, become spaces."""
    return '"' + _QUOTE_ESCAPES.sub(_quote_one, value) + '"'


_QUOTE_ESCAPES = re.compile(r"[\\\"\x00-\x08\x0a-\x1f\x7f]")  # HT is qdtext


def _quote_one(m: "re.Match") -> str:
    ch = m.group(0)
    return " " if ch in "\r\n" else "\\" + ch


def _unescape(text: str) -> str:
    """Decode %-escapes; a stray ``%`` is an error, as RFC 3261 §25.1 says."""
    if "%" not in text:
        return text
    out = bytearray()
    i = 0
    raw = text.encode("utf-8")
    while i < len(raw):
        b = raw[i]
        if b == 0x25:  # '%'
            hexpart = raw[i + 1:i + 3]
            if len(hexpart) != 2 or not all(c in b"0123456789abcdefABCDEF" for c in hexpart):
                raise SIPParseError(f"bad %-escape in {text!r}")
            out.append(int(hexpart, 16))
            i += 3
        else:
            out.append(b)
            i += 1
    return out.decode("utf-8", "replace")


def _escape(text: str, safe: set) -> str:
    return "".join(
        ch if ch in safe else "".join(f"%{b:02X}" for b in ch.encode("utf-8")) for ch in text
    )


def parse_params(text: str) -> dict[str, Optional[str]]:
    """``;a=1;lr;b="x;y"`` -> {"a": "1", "lr": None, "b": '"x;y"'} (names lower-cased)."""
    params: dict[str, Optional[str]] = {}
    for piece in split_outside_quotes(text, ";"):
        piece = piece.strip()
        if not piece:
            continue
        name, eq, value = piece.partition("=")
        name = name.strip().lower()
        if not name or not _TOKEN_RE.fullmatch(name):
            raise SIPParseError(f"bad parameter {piece!r}")
        params[name] = value.strip() if eq else None
    return params


def format_params(params: dict[str, Optional[str]]) -> str:
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params.items())


def _parse_host(text: str) -> str:
    """A hostname, IPv4 address or ``[IPv6]`` reference (brackets kept off)."""
    if text.startswith("["):
        if not text.endswith("]"):
            raise SIPParseError(f"bad IPv6 reference {text!r}")
        inner = text[1:-1]
        try:
            return str(ipaddress.IPv6Address(inner))
        except ValueError:
            raise SIPParseError(f"bad IPv6 address {inner!r}") from None
    if not text or not _HOSTNAME_RE.fullmatch(text):
        raise SIPParseError(f"bad host {text[:80]!r}")
    if not dns_name_fits(text):
        raise SIPParseError(f"host name too long {text[:80]!r}")
    return text


def dns_name_fits(name: str) -> bool:
    """RFC 1035 §2.3.4: at most 253 characters, labels of 1 to 63 letters, digits, ``-`` or ``_`` (SRV).

    No longer name exists, and getaddrinfo's IDNA step raises for one: inside Twisted's
    resolver that is an "Unhandled error in Deferred" and a send that never completes.
    """
    labels = (name[:-1] if name.endswith(".") else name).split(".")  # one trailing dot: a rooted name
    return len(name) <= 253 and all(_DNS_LABEL_RE.fullmatch(label) for label in labels)


def format_host(host: str) -> str:
    """Bracket an IPv6 literal for use in a URI or Via."""
    return f"[{host}]" if ":" in host else host


@functools.lru_cache(maxsize=1024)
def _parse_hostport(text: str) -> tuple[str, Optional[int]]:
    """``(host, port)`` of ``host[:port]``; remembered (a few peers' addresses come in every message:
    the checks below showed in a call's profile); bad text raises each time (errors are not kept)."""
    return _parse_hostport_uncached(text)


def _parse_hostport_uncached(text: str) -> tuple[str, Optional[int]]:
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise SIPParseError(f"bad IPv6 reference {text!r}")
        host, rest = _parse_host(text[:end + 1]), text[end + 1:]
    else:
        host_text, colon, port_text = text.partition(":")
        host, rest = _parse_host(host_text), colon + port_text
    port = None
    if rest:
        if not rest.startswith(":") or not is_number(rest[1:]) or len(rest) > 6:
            raise SIPParseError(f"bad port in {text!r}")
        port = int(rest[1:])
        if port > 65535:
            raise SIPParseError(f"port out of range in {text!r}")
    return host, port


# -- URIs -----------------------------------------------------------------------


@dataclass
class URI:
    """A sip:, sips: or tel: URI (RFC 3261 §19.1, RFC 3966).

    ``user`` and ``password`` hold decoded text; ``params`` have lower-case
    names and raw values (``None`` for a flag such as ``lr``).
    """

    scheme: str = "sip"
    user: Optional[str] = None
    host: str = ""
    port: Optional[int] = None
    password: Optional[str] = None
    params: dict = field(default_factory=dict)
    headers: dict = field(default_factory=dict)
    #: everything after ``scheme:`` of a URI in a scheme we do not parse (``isbn:2983792873``)
    opaque: Optional[str] = None

    @property
    def transport(self) -> Optional[str]:
        value = self.params.get("transport")
        return value.upper() if value else None

    @property
    def structured(self) -> bool:
        """sip:, sips: or tel: (parsed into parts); False for an opaque URI of another scheme."""
        return self.opaque is None

    def __str__(self) -> str:
        if self.opaque is not None:
            return f"{self.scheme}:{self.opaque}"
        if self.scheme == "tel":
            return f"tel:{self.user or ''}{format_params(self.params)}"
        out = [self.scheme, ":"]
        if self.user is not None:
            out.append(_escape(self.user, _USER_SAFE))
            if self.password is not None:
                out.append(":" + _escape(self.password, _PASSWORD_SAFE))
            out.append("@")
        out.append(format_host(self.host))
        if self.port is not None:
            out.append(f":{self.port}")
        out.append(format_params(self.params))
        if self.headers:
            out.append("?" + "&".join(f"{k}={v}" for k, v in self.headers.items()))
        return "".join(out)

    def copy(self, **changes) -> "URI":
        if not changes:
            return URI(self.scheme, self.user, self.host, self.port, self.password, dict(self.params),
                       dict(self.headers), self.opaque)
        values = dict(
            scheme=self.scheme, user=self.user, host=self.host, port=self.port,
            password=self.password, params=dict(self.params), headers=dict(self.headers),
            opaque=self.opaque,
        )
        values.update(changes)
        return URI(**values)


_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+\-.]*")
# RFC 3986 characters (unreserved, reserved, %): what an absoluteURI may hold
_OPAQUE_RE = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")


def parse_uri(text: str) -> URI:
    """Parse a URI: sip:/sips:/tel: into parts, any other scheme kept opaque.

    Raises ``SIPParseError`` for what is no URI at all (no scheme, a bad scheme,
    spaces, control or non-ASCII characters).
    """
    text = text.strip()
    scheme, colon, rest = text.partition(":")
    if not colon or not _SCHEME_RE.fullmatch(scheme):
        raise SIPParseError(f"bad URI {text[:80]!r}")
    scheme = scheme.lower()
    if scheme not in STRUCTURED_SCHEMES:
        if not _OPAQUE_RE.fullmatch(rest):
            raise SIPParseError(f"bad {scheme}: URI {text[:80]!r}")
        return URI(scheme=scheme, host="", opaque=rest)
    if not rest.isascii() or not rest.isprintable() or " " in rest:
        raise SIPParseError(f"bad characters in URI {text[:80]!r}")
    if scheme == "tel":
        number, _, params = rest.partition(";")
        if not number:
            raise SIPParseError(f"empty tel URI {text!r}")
        return URI(scheme="tel", user=_unescape(number), params=parse_params(params))
    user = password = None
    # the user part may hold ? ; / , (RFC 3261 §25.1 user-unreserved) but never an unescaped @,
    # which the host, parameters and headers cannot hold either: the first @ ends the userinfo
    if "@" in rest:
        userinfo, _, rest = rest.partition("@")
        user_text, has_pw, pw_text = userinfo.partition(":")
        user = _unescape(user_text)
        password = _unescape(pw_text) if has_pw else None
    rest, _, header_text = rest.partition("?")
    hostport, _, param_text = rest.partition(";")
    host, port = _parse_hostport(hostport)
    headers = {}
    if header_text:
        for pair in header_text.split("&"):
            name, _, value = pair.partition("=")
            headers[name] = value
    return URI(scheme, user, host, port, password, parse_params(param_text), headers)


# -- name-addr / addr-spec (From, To, Contact, Route, Refer-To ...) --------------------


@dataclass
class Address:
    """``"Display" <uri>;params`` (name-addr) or ``uri;params`` (addr-spec).

    ``wildcard`` is the ``Contact: *`` of a REGISTER that removes all bindings.
    """

    uri: Optional[URI] = None
    display_name: Optional[str] = None
    params: dict = field(default_factory=dict)
    wildcard: bool = False

    @property
    def tag(self) -> Optional[str]:
        return self.params.get("tag")

    def __str__(self) -> str:
        if self.wildcard:
            return "*"
        name = ""
        if self.display_name:
            name = quote(self.display_name) + " "
        return f"{name}<{self.uri}>{format_params(self.params)}"

    def copy(self, **changes) -> "Address":
        if not changes:
            return Address(self.uri.copy() if self.uri else None, self.display_name, dict(self.params),
                           self.wildcard)
        values = dict(
            uri=self.uri.copy() if self.uri else None, display_name=self.display_name,
            params=dict(self.params), wildcard=self.wildcard,
        )
        values.update(changes)
        return Address(**values)


def parse_address(text: str) -> Address:
    """Parse name-addr or addr-spec with header parameters (RFC 3261 §20.10)."""
    text = text.strip()
    if text == "*":
        return Address(wildcard=True)
    display = None
    if "<" in text:
        if text.startswith('"'):
            m = re.match(r'"((?:[^"\\]|\\.)*)"\s*', text)
            if not m:
                raise SIPParseError(f"unterminated quoted display name in {text!r}")
            display = re.sub(r"\\(.)", r"\1", m.group(1))
            text = text[m.end():]
        lt = text.find("<")
        gt = text.find(">", lt)
        if lt < 0 or gt < 0:
            raise SIPParseError(f"unbalanced <> in address {text!r}")
        if lt > 0 and display is None:
            display = text[:lt].strip() or None
            if display and _DISPLAY_SEPARATORS.search(display):
                # RFC 3261 §25.1: an unquoted display-name is tokens and LWS (RFC 4475 §3.1.2.15)
                raise SIPParseError(f"unquoted display name with separators in {text!r}")
        elif text[:lt].strip():
            raise SIPParseError(f"junk before <> in address {text!r}")
        inner = text[lt + 1:gt]
        if inner != inner.strip():
            raise SIPParseError(f"spaces inside <> in address {text!r}")  # RFC 4475 §3.1.2.14
        uri = parse_uri(inner)
        tail = text[gt + 1:].strip()
        if tail and not tail.startswith(";"):
            raise SIPParseError(f"junk after <> in address {text!r}")
        return Address(uri, display, parse_params(tail))
    uri_text, _, param_text = text.partition(";")
    if "?" in uri_text or "," in uri_text:
        # a URI with headers or a comma must be a name-addr (RFC 3261 §20.10, RFC 4475 §3.1.2.13)
        raise SIPParseError(f"addr-spec with ? or , outside <> in {text!r}")
    return Address(parse_uri(uri_text), None, parse_params(param_text))


# separators (RFC 3261 §25.1) other than SP/HT, which an unquoted display-name cannot hold
_DISPLAY_SEPARATORS = re.compile(r'[()<>@,;:\\"/\[\]?={}]')


# -- Via ------------------------------------------------------------------------------


@dataclass
class Via:
    """One Via entry: ``SIP/2.0/UDP host:port;branch=z9hG4bK...;rport;received=ip``."""

    transport: str = "UDP"
    host: str = ""
    port: Optional[int] = None
    params: dict = field(default_factory=dict)

    @property
    def branch(self) -> Optional[str]:
        return self.params.get("branch")

    @property
    def received(self) -> Optional[str]:
        return self.params.get("received")

    @property
    def rport(self) -> Optional[int]:
        """The ``rport`` value filled in by the server (None when absent or empty)."""
        value = self.params.get("rport")
        return int(value) if value and is_number(value) else None

    @property
    def wants_rport(self) -> bool:
        return "rport" in self.params

    @property
    def sent_by(self) -> tuple[str, int]:
        """(host, port) with the default port of the transport filled in."""
        return self.host.lower(), self.port or default_port(self.transport)

    def __str__(self) -> str:
        port = f":{self.port}" if self.port is not None else ""
        return f"SIP/2.0/{self.transport} {format_host(self.host)}{port}{format_params(self.params)}"

    def copy(self) -> "Via":
        return Via(self.transport, self.host, self.port, dict(self.params))


def default_port(transport: str) -> int:
    return 5061 if transport.upper() in ("TLS", "WSS") else 5060


def parse_via(text: str) -> Via:
    # sent-protocol: SIP / protocol-version / transport; a version other than 2.0 is the start
    # line's business (505, RFC 4475 §3.1.2.16), the Via still routes the answer
    m = re.match(r"\s*SIP\s*/\s*\d+\.\d+\s*/\s*([A-Za-z0-9\-]+)\s+", text, re.IGNORECASE | re.ASCII)
    if not m:
        raise SIPParseError(f"bad Via {text!r}")
    rest = text[m.end():]
    hostport, _, param_text = rest.partition(";")
    host, port = _parse_hostport(hostport)
    return Via(m.group(1).upper(), host, port, parse_params(param_text))


# -- CSeq ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CSeq:
    seq: int
    method: str

    def __str__(self) -> str:
        return f"{self.seq} {self.method}"


def parse_cseq(text: str) -> CSeq:
    parts = text.split()
    if len(parts) != 2 or not is_number(parts[0]) or len(parts[0]) > 10:
        raise SIPParseError(f"bad CSeq {text!r}")
    seq = int(parts[0])
    if seq >= 2**31 or not _TOKEN_RE.fullmatch(parts[1]):
        raise SIPParseError(f"bad CSeq {text!r}")
    return CSeq(seq, parts[1].upper())


# -- headers ---------------------------------------------------------------------------


class Headers:
    """Ordered header list with case-insensitive lookups by long or compact name.

    List-valued headers (Via, Contact, Route ...) are kept one value per entry,
    so ``get_all("Via")`` is the list of Via values whether they arrived on one
    line or many.  Each entry keeps its lower-cased canonical name beside it, so
    a lookup compares strings instead of lower-casing every header it passes.
    """

    def __init__(self, items: Iterable[tuple[str, str]] = ()):
        self._items: list[tuple[str, str, str]] = []  # (name, value, lower-cased name)
        for name, value in items:
            self.add(name, value)

    def add(self, name: str, value: str) -> None:
        name = canonical_name(name)
        if "\r" in value or "\n" in value:
            raise ValueError(f"header {name} value contains a line break")
        self._items.append((name, str(value), _lower_key(name)))

    def get(self, name: str, default: Optional[str] = None) -> Optional[str]:
        key = _lookup_key(name)
        for _, v, k in self._items:
            if k == key:
                return v
        return default

    def get_all(self, name: str) -> list[str]:
        key = _lookup_key(name)
        return [v for _, v, k in self._items if k == key]

    def set(self, name: str, value: str) -> None:
        """Replace every value of ``name`` with one, at the first one's position."""
        name = canonical_name(name)
        key = _lower_key(name)
        for i, item in enumerate(self._items):
            if item[2] == key:
                self._items = self._items[:i] + [(name, str(value), key)] + [
                    item for item in self._items[i + 1:] if item[2] != key
                ]
                return
        self.add(name, value)

    def prepend(self, name: str, value: str) -> None:
        name = canonical_name(name)
        self._items.insert(0, (name, str(value), _lower_key(name)))

    def remove(self, name: str) -> None:
        key = _lookup_key(name)
        self._items = [item for item in self._items if item[2] != key]

    def remove_first(self, name: str) -> None:
        key = _lookup_key(name)
        for i, item in enumerate(self._items):
            if item[2] == key:
                del self._items[i]
                return

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter([(n, v) for n, v, _ in self._items])

    def __len__(self) -> int:
        return len(self._items)

    def copy(self) -> "Headers":
        h = Headers()
        h._items = list(self._items)
        return h

    def __repr__(self) -> str:
        return f"Headers({[(n, v) for n, v, _ in self._items]!r})"


_LOWER_KEYS: dict[str, str] = {}
_LOOKUP_KEYS: dict[str, str] = {}


def _lower_key(canonical: str) -> str:
    key = _LOWER_KEYS.get(canonical)
    if key is None:
        key = canonical.lower()
        if len(_LOWER_KEYS) < 1024:  # header names from the wire: bounded
            _LOWER_KEYS[canonical] = key
    return key


def _lookup_key(name: str) -> str:
    """``canonical_name(name).lower()``, memoised for the names the code asks for."""
    key = _LOOKUP_KEYS.get(name)
    if key is None:
        key = canonical_name(name).lower()
        if len(_LOOKUP_KEYS) < 1024:
            _LOOKUP_KEYS[name] = key
    return key


class _ParseCache:
    """Parsed header values by their text, for the typed views of ``Message``.

    A call's messages repeat the same From, To, Call-ID and Via texts, and the
    stack reads ``top_via``/``from_``/``to`` several times per message.  Each view
    still returns its own copy (callers edit Via params and Address tags), so the
    cache changes how much parsing is done, never what a caller sees.  Failures
    are not cached: a bad value raises on every access as before.
    """

    def __init__(self, parse, immutable: bool = False, limit: int = 4096):
        self._parse = parse
        self._immutable = immutable
        self._limit = limit
        self._parsed: dict = {}

    def __call__(self, text: str):
        parsed = self._parsed.get(text)
        if parsed is None:
            parsed = self._parse(text)
            if len(self._parsed) >= self._limit:
                self._parsed.clear()
            self._parsed[text] = parsed
        return parsed if self._immutable else parsed.copy()

    def check(self, text: str) -> None:
        """Parse ``text`` (raising ``SIPParseError`` if it is bad) and keep the result."""
        if text not in self._parsed:
            self(text)


_cached_cseq = _ParseCache(parse_cseq, immutable=True)
_cached_via = _ParseCache(parse_via)
_cached_address = _ParseCache(parse_address)


# -- messages -----------------------------------------------------------------------------


class Message:
    """What requests and responses share: headers, body and typed accessors."""

    headers: Headers
    body: bytes

    # typed views: looked up on each access, so edits to ``headers`` always show; the
    # parsing behind them is shared by value text (``_ParseCache``), each access a fresh copy
    @property
    def call_id(self) -> Optional[str]:
        return self.headers.get("Call-ID")

    @property
    def cseq(self) -> CSeq:
        return _cached_cseq(self.headers.get("CSeq") or "")

    @property
    def vias(self) -> list[Via]:
        return [_cached_via(v) for v in self.headers.get_all("Via")]

    @property
    def top_via(self) -> Via:
        value = self.headers.get("Via")
        if value is None:
            raise SIPParseError("no Via")
        return _cached_via(value)

    @property
    def from_(self) -> Address:
        return _cached_address(self.headers.get("From") or "")

    @property
    def to(self) -> Address:
        return _cached_address(self.headers.get("To") or "")

    @property
    def contacts(self) -> list[Address]:
        return [_cached_address(v) for v in self.headers.get_all("Contact")]

    @property
    def content_type(self) -> Optional[str]:
        value = self.headers.get("Content-Type")
        return value.split(";")[0].strip().lower() if value else None

    def _head_lines(self) -> list[str]:
        lines = [f"{n}: {v}" for n, v in self.headers if n != "Content-Length"]
        lines.append(f"Content-Length: {len(self.body)}")
        return lines

    def to_bytes(self) -> bytes:
        """Serialise; Content-Length is always recomputed from the body."""
        head = "\r\n".join([self.start_line()] + self._head_lines())
        return head.encode("utf-8", WIRE_ERRORS) + b"\r\n\r\n" + self.body

    def start_line(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def __bytes__(self) -> bytes:
        return self.to_bytes()


class Request(Message):
    def __init__(self, method: str, uri: Union[URI, str], headers: Optional[Headers] = None,
                 body: bytes = b"", version: str = SIP_VERSION):
        self.method = method.upper()
        self.uri = parse_uri(uri) if isinstance(uri, str) else uri
        self.headers = headers if headers is not None else Headers()
        self.body = body
        self.version = version

    def start_line(self) -> str:
        return f"{self.method} {self.uri} {self.version}"

    def copy(self) -> "Request":
        """An independent copy: editing its headers or URI leaves this one alone."""
        return Request(self.method, self.uri.copy(), self.headers.copy(), self.body, self.version)

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.uri} call-id={self.call_id!r}>"


class Response(Message):
    def __init__(self, status: int, reason: Optional[str] = None, headers: Optional[Headers] = None,
                 body: bytes = b"", version: str = SIP_VERSION):
        self.status = status
        self.reason = REASON_PHRASES.get(status, "Unknown") if reason is None else reason
        self.headers = headers if headers is not None else Headers()
        self.body = body
        self.version = version

    @property
    def is_provisional(self) -> bool:
        return self.status < 200

    def start_line(self) -> str:
        return f"{self.version} {self.status} {self.reason}"

    def copy(self) -> "Response":
        return Response(self.status, self.reason, self.headers.copy(), self.body, self.version)

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason} call-id={self.call_id!r}>"


# -- parsing ------------------------------------------------------------------------------------


#: how the wire's bytes become text and back: a byte that is not UTF-8 becomes a lone surrogate
#: (U+DC80-U+DCFF) and turns back into the same byte when serialised, so a response echoes a
#: request's Via, From, To and Call-ID byte for byte; such text is never ASCII, so a
#: Request-URI or a URI in From/To/Contact holding one is refused like any non-ASCII URI
WIRE_ERRORS = "surrogateescape"


def _decode(data: bytes) -> str:
    return data.decode("utf-8", WIRE_ERRORS)


def _head_end(data: bytes, start: int = 0) -> Optional[tuple[int, int]]:
    """(end of head, start of body) at the first empty line at or after ``start``, or None.

    The earliest of CRLF CRLF and LF LF wins: a head with bare LF line ends may
    be followed by a body (SDP) that contains CRLF CRLF.
    """
    found = [(idx, idx + len(sep)) for sep in (b"\r\n\r\n", b"\n\n") if (idx := data.find(sep, start)) >= 0]
    return min(found) if found else None


def split_head(data: bytes) -> tuple[bytes, bytes]:
    """(head, body) split at the first empty line; tolerates bare LF line ends."""
    bounds = _head_end(data)
    if bounds is None:
        raise SIPParseError("no empty line after the headers")
    return data[:bounds[0]], data[bounds[1]:]


#: linear white space around header values (RFC 3261 §25.1), once the line ends are gone
_LWS = " \t"


def unfold(head: str) -> list[str]:
    """Header lines with continuation lines (leading SP/HT) joined (RFC 3261 §7.3.1)."""
    if "\n " not in head and "\n\t" not in head:  # no continuation lines: the usual case
        return head.replace("\r\n", "\n").split("\n")
    lines: list[str] = []
    for line in re.split(r"\r?\n", head):
        if line[:1] in (" ", "\t") and lines:
            lines[-1] = lines[-1].rstrip(_LWS) + " " + line.strip(_LWS)
        else:
            lines.append(line)
    return lines


_REQUEST_LINE = re.compile(r"([A-Za-z0-9\-.!%*_+`'~]+) (\S+) (SIP/\d+\.\d+)", re.ASCII)
# what is meant as a Request-Line but is not one: extra or trailing whitespace, LWS in the
# Request-URI (RFC 4475 §3.1.2.8-3.1.2.10) -- answered 400 once the headers are read
_LOOSE_REQUEST_LINE = re.compile(r"([A-Za-z0-9\-.!%*_+`'~]+)[ \t]+\S.*[ \t](SIP/\d+\.\d+)[ \t]*", re.ASCII)
_STATUS_LINE = re.compile(r"(SIP/\d\.\d) ([1-6]\d\d)(?: (.*))?", re.ASCII)


def parse_message(data: bytes, stream: bool = False) -> Union[Request, Response]:
    """Parse one whole message.  Raises only ``SIPParseError``.

    ``stream``: the bytes were framed by Content-Length already (TCP/TLS), so a
    shorter body is an error rather than a truncated datagram.

    A request parses even when its method is unknown, its Request-URI has a
    scheme other than sip/sips/tel (``uri.opaque``) or its version is not 2.0:
    those are answered 501, 416 and 505 by the transaction user and layer.

    Every malformed input is refused deliberately with ``SIPParseError``; there is no catch-all that
    turns an internal error into one (that hid bugs as malformed input).  The transport still guards the
    reactor against a parser bug (``TransportManager._incoming``).
    """
    if len(data) > MAX_MESSAGE_SIZE:
        raise SIPParseError("message too large")
    data = data.lstrip(b"\r\n")
    if not data:
        raise SIPParseError("empty message")
    head, body = split_head(data)
    lines = unfold(_decode(head))
    start = lines[0]
    if "\r" in start:
        raise SIPParseError("stray CR in the start line")
    msg: Union[Request, Response]
    start_error = None
    m = _REQUEST_LINE.fullmatch(start)
    if m:
        uri_text = m.group(2)
        msg = Request(m.group(1), URI(), Headers(), b"", version=m.group(3))
    elif (m := _LOOSE_REQUEST_LINE.fullmatch(start)) is not None:
        uri_text = None
        msg = Request(m.group(1), URI(), Headers(), b"", version=m.group(2))
        start_error = "malformed Request-Line (extra whitespace)"
    else:
        m = _STATUS_LINE.fullmatch(start)
        if not m:
            raise SIPParseError(f"bad start line {start[:80]!r}")
        if m.group(1) != SIP_VERSION:
            raise SIPParseError(f"unsupported version {m.group(1)}")
        msg = Response(int(m.group(2)), (m.group(3) or "").strip(), Headers(), b"")
        uri_text = None
    items = msg.headers._items
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            if not line.strip():
                continue
            raise _fail(msg, f"bad header line {line[:80]!r}")
        spec = _header_spec(name)
        if spec is None or "\r" in value:
            raise _fail(msg, f"bad header line {line[:80]!r}")
        canonical, key, is_list = spec
        value = value.strip(_LWS)  # SP/HT only: str.strip() also eats \x1c-\x1f, part of a value
        if is_list and ("," in value):
            for item in split_outside_quotes(value, ","):
                item = item.strip(_LWS)
                if item:
                    items.append((canonical, item, key))
        elif value or not is_list:
            items.append((canonical, value, key))
    headers = msg.headers
    if isinstance(msg, Request):
        _check_request(msg, uri_text, start_error)
    else:
        # a response is matched by Via and CSeq and read by From/To: all must be there and parse
        values = {}
        for key in MANDATORY:
            value = headers.get(key)
            if value is None:
                raise SIPParseError(f"missing {canonical_name(key)} header")
            values[key] = value
        _cached_cseq(values["cseq"])
        _cached_address.check(values["from"])
        _cached_address.check(values["to"])
        for via in headers.get_all("Via"):
            _cached_via.check(via)
    msg.body = _body(msg, body, stream)
    return msg


def _check_request(msg: "Request", uri_text: Optional[str], start_error: Optional[str]) -> None:
    """Everything that makes a parsed request malformed (400), in the order it is best reported.

    Raised through ``_fail``: answerable once the top Via parses and CSeq is there
    (RFC 4475 §3.3.1 insuf: a 400 even without From, To, Call-ID).
    """
    headers = msg.headers
    if headers.get("via") is None:
        raise SIPParseError("missing Via header")
    _cached_via.check(headers.get("via"))  # no usable Via: nothing can be answered
    if start_error:
        raise _fail(msg, start_error)
    counts: dict[str, int] = {}  # one pass over the headers for both checks (every request pays for them)
    for _, _, key in headers._items:
        counts[key] = counts.get(key, 0) + 1
    for key in MANDATORY:
        if key not in counts:
            raise _fail(msg, f"missing {canonical_name(key)} header")
    for key in SINGLE_VALUED:
        if counts.get(key, 0) > 1:
            raise _fail(msg, f"more than one {canonical_name(key)} header")
    try:
        cseq = _cached_cseq(headers.get("cseq"))
    except SIPParseError as e:
        raise _fail(msg, str(e)) from None
    if not uri_text.isascii() or not uri_text.isprintable():
        raise _fail(msg, "non-ASCII or control characters in the Request-URI")
    try:
        msg.uri = parse_uri(uri_text)
    except SIPParseError as e:
        raise _fail(msg, f"bad Request-URI: {e}") from None
    if msg.uri.headers:
        raise _fail(msg, "headers in the Request-URI")  # RFC 3261 §19.1.1, RFC 4475 §3.1.2.11
    if cseq.method != msg.method and msg.method in KNOWN_METHODS:
        # an unknown method with a mismatched CSeq is left to the 501 (RFC 4475 §3.1.2.18)
        raise _fail(msg, "CSeq method does not match the request method")
    try:
        _cached_address.check(headers.get("from"))
        _cached_address.check(headers.get("to"))
        for via in headers.get_all("Via"):
            _cached_via.check(via)
        for contact in headers.get_all("Contact"):
            _cached_address.check(contact)
        # a dialog's route set and the next hop come from these (RFC 3261 §12.1.1, §16.12): a
        # bad one is refused here, not when our BYE is built from it much later
        for name in ("Record-Route", "Route"):
            for route in headers.get_all(name):
                if _cached_address(route).uri is None:
                    raise SIPParseError(f"bad {name} {route[:40]!r}")
    except SIPParseError as e:
        raise _fail(msg, str(e)) from None
    problem = _scalar_problem(msg)
    if problem:
        raise _fail(msg, problem)


def _scalar_problem(msg: "Request") -> Optional[str]:
    """Out-of-range Max-Forwards, Expires, Contact expires (RFC 4475 §3.1.2.4 scalar02)."""
    headers = msg.headers
    max_forwards = headers.get("Max-Forwards")
    if max_forwards is not None:
        if not is_number(max_forwards) or len(max_forwards) > 10 or int(max_forwards) > MAX_MAX_FORWARDS:
            return f"bad Max-Forwards {max_forwards[:20]!r}"
    expires = headers.get("Expires")
    # RFC 2543 allowed an HTTP date here; a number must be delta-seconds
    if expires is not None and (expires.lstrip("+-").isdigit() or not expires):
        if not is_number(expires) or len(expires) > 10 or int(expires) > MAX_DELTA_SECONDS:
            return f"bad Expires {expires[:20]!r}"
    for contact in headers.get_all("Contact"):
        value = _cached_address(contact).params.get("expires")
        if value is not None and (not is_number(value) or len(value) > 10 or int(value) > MAX_DELTA_SECONDS):
            return f"bad Contact expires {value[:20]!r}"
    return None


_HEADER_SPECS: dict[str, Optional[tuple[str, str, bool]]] = {}


def _header_spec(raw_name: str) -> Optional[tuple[str, str, bool]]:
    """(canonical name, lower-cased key, list-valued?) for a header name as it came off the
    wire, or None for a name that is no token.  Memoised: a peer sends the same few names."""
    spec = _HEADER_SPECS.get(raw_name, False)
    if spec is False:
        name = raw_name.strip()
        if not _TOKEN_RE.fullmatch(name):
            spec = None
        else:
            canonical = canonical_name(name)
            key = canonical.lower()
            spec = (canonical, key, name.lower() in LIST_HEADERS or key in LIST_HEADERS)
        if len(_HEADER_SPECS) < 1024:
            _HEADER_SPECS[raw_name] = spec
    return spec


def _fail(msg: Union[Request, Response], reason: str) -> SIPParseError:
    """An error after the start line: answerable (400) if it is a request whose top Via parses
    and that has a CSeq to echo; From, To and Call-ID are echoed when there."""
    answerable = isinstance(msg, Request) and "cseq" in msg.headers
    if answerable:
        try:
            msg.top_via
        except SIPParseError:
            answerable = False
    return SIPParseError(reason, can_respond=answerable, partial=msg if answerable else None)


def _body(msg: Union[Request, Response], body: bytes, stream: bool) -> bytes:
    values = {v.strip() for v in msg.headers.get_all("Content-Length")}
    if len(values) > 1:
        raise _fail(msg, "conflicting Content-Length headers")
    length_text = values.pop() if values else None
    if length_text is None:
        if stream:
            raise _fail(msg, "no Content-Length on a stream transport")
        return body
    if not is_number(length_text) or len(length_text) > 9:
        raise _fail(msg, f"bad Content-Length {length_text[:20]!r}")
    length = int(length_text)
    if length > len(body):
        raise _fail(msg, f"Content-Length {length} but only {len(body)} body bytes")
    # RFC 3261 §18.3: extra datagram bytes after Content-Length are discarded
    return body[:length]


def message_length(buffer: bytes, searched: int = 0) -> Optional[int]:
    """Total length of the first message in a stream buffer once its head is complete.

    None while the blank line after the headers has not arrived; the body may
    still be arriving when a length is returned.  ``searched``: how many bytes
    an earlier call already scanned without finding the blank line, so a head
    dribbled in byte by byte costs linear, not quadratic, time.  Leading CRLFs
    (RFC 5626 keep-alives) must have been stripped by the caller.  Raises
    ``SIPParseError`` for an unusable Content-Length or an oversized message.
    """
    bounds = _head_end(buffer, max(0, searched - 3))
    if bounds is None:
        if len(buffer) > MAX_MESSAGE_SIZE:
            raise SIPParseError("header section too large")
        return None
    idx, head_end = bounds
    length: Optional[int] = None
    for line in unfold(_decode(buffer[:idx])):
        name, colon, value = line.partition(":")
        if colon and name.strip().lower() in ("content-length", "l"):
            value = value.strip()
            if not is_number(value) or len(value) > 9:
                raise SIPParseError(f"bad Content-Length {value[:20]!r}")
            if length is not None and int(value) != length:
                # which one frames the stream is anyone's guess: a smuggling attempt or a bug
                raise SIPParseError("conflicting Content-Length headers")
            length = int(value)
    length = length or 0
    if head_end + length > MAX_MESSAGE_SIZE:
        raise SIPParseError("message too large")
    return head_end + length


def frame_stream(buffer: bytes) -> Optional[int]:
    """Length of the first whole message in a stream buffer, or None if more is needed."""
    total = message_length(buffer)
    if total is None or len(buffer) < total:
        return None
    return total


# -- building ----------------------------------------------------------------------------------


def generate_tag() -> str:
    """A From/To tag: 32 random bits are enough for RFC 3261 §19.3; we use 64."""
    return secrets.token_hex(8)


def generate_branch() -> str:
    """A Via branch unique in space and time, with the RFC 3261 magic cookie."""
    return BRANCH_MAGIC + secrets.token_hex(10)


def generate_call_id(host: Optional[str] = None) -> str:
    value = secrets.token_hex(12)
    return f"{value}@{host}" if host else value


def reason_detail(text: str, limit: int = 100) -> str:
    """A parser complaint fit for a reason phrase or a Warning text: printable ASCII without
    quotes or backslashes, at most ``limit`` characters."""
    return "".join(ch for ch in text if 32 <= ord(ch) < 127 and ch not in '"\\')[:limit]


def bad_request_reason(text: str, limit: int = 60) -> str:
    """``Bad Request (<short reason>)`` for a 400."""
    detail = reason_detail(text, limit)
    return f"Bad Request ({detail})" if detail else "Bad Request"


def make_response(request: Request, status: int, reason: Optional[str] = None,
                  to_tag: Optional[str] = None, headers: Iterable[tuple[str, str]] = (),
                  body: bytes = b"") -> Response:
    """A response to ``request`` (RFC 3261 §8.2.6).

    Copies Via (all, in order), From, To, Call-ID and CSeq; adds ``to_tag`` to
    To when the request's To has none (never on 100 Trying, §8.2.6.2).
    Record-Route and Contact belong to the dialog layer.
    """
    response = Response(status, reason, Headers(), body)
    for via in request.headers.get_all("Via"):
        response.headers.add("Via", via)
    if "From" in request.headers:  # a 400 for a request without it (RFC 4475 §3.3.1) has none
        response.headers.add("From", request.headers.get("From"))
    to_value = request.headers.get("To")
    if to_value is not None and to_tag and status > 100:
        try:
            to_addr = parse_address(to_value)
            if to_addr.tag is None:
                to_addr.params["tag"] = to_tag
                to_value = str(to_addr)
        except SIPParseError:
            pass  # a 400 for a request with an unparsable To: echo it as it came
    if to_value is not None:
        response.headers.add("To", to_value)
    if "Call-ID" in request.headers:
        response.headers.add("Call-ID", request.headers.get("Call-ID"))
    response.headers.add("CSeq", request.headers.get("CSeq") or "")
    for name, value in headers:
        response.headers.add(name, value)
    return response


def make_request(method: str, uri: Union[URI, str], *, via: Via, from_: Address, to: Address,
                 call_id: str, cseq: int, contact: Optional[Address] = None,
                 max_forwards: int = 70, headers: Iterable[tuple[str, str]] = (),
                 body: bytes = b"", content_type: Optional[str] = None) -> Request:
    """A new request with the mandatory headers in the conventional order."""
    request = Request(method, uri, Headers(), body)
    h = request.headers
    h.add("Via", str(via))
    h.add("Max-Forwards", str(max_forwards))
    h.add("From", str(from_))
    h.add("To", str(to))
    h.add("Call-ID", call_id)
    h.add("CSeq", f"{cseq} {request.method}")
    if contact is not None:
        h.add("Contact", str(contact))
    for name, value in headers:
        h.add(name, value)
    if body and content_type:
        h.add("Content-Type", content_type)
    return request


def next_attempt(request: Request) -> Request:
    """``request`` ready to send again after a 401/407 (RFC 3261 §22.2) or a 491/503.

    Same Call-ID, From tag, To, body and headers; CSeq + 1 and a fresh branch
    on our top Via, so it is a new transaction.  Credentials are the caller's
    (``DigestClient.authorize`` on the copy).
    """
    retry = request.copy()
    cseq = retry.cseq
    retry.headers.set("CSeq", str(CSeq(cseq.seq + 1, cseq.method)))
    if "Via" in retry.headers:
        via = retry.top_via
        via.params["branch"] = generate_branch()
        retry.headers.remove_first("Via")
        retry.headers.prepend("Via", str(via))
    return retry


# -- addressing ------------------------------------------------------------------------------

RELIABLE_TRANSPORTS = frozenset(("TCP", "TLS", "WS", "WSS"))


@dataclass(frozen=True)
class Target:
    """Where a message goes to or came from: host, port and transport name."""

    host: str
    port: int
    transport: str = "UDP"
    #: a domain named without a port: its servers are found by DNS SRV (``sip/dns.py``) before sending
    srv: bool = field(default=False, compare=False)

    @property
    def reliable(self) -> bool:
        """TCP/TLS deliver or fail: no retransmission timers (RFC 3261 §17)."""
        return self.transport.upper() in RELIABLE_TRANSPORTS

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)


def target_for_uri(uri: URI, default_transport: str = "UDP") -> Target:
    """Where a request for ``uri`` goes (RFC 3263 §4, without NAPTR).

    ``maddr`` overrides the host; ``transport=`` picks the transport, a sips:
    URI means TLS; the port is the URI's or the transport's default.  A host
    name without a port is marked ``srv``: the transport looks its servers up
    in DNS SRV first (§4.2).
    """
    if uri.scheme not in ("sip", "sips"):
        raise SIPParseError(f"cannot route to a {uri.scheme}: URI")
    transport = uri.transport or ("TLS" if uri.scheme == "sips" else default_transport.upper())
    if uri.scheme == "sips" and transport == "TCP":
        transport = "TLS"  # sips over "tcp" means TLS (RFC 3261 §26.2.2)
    host = uri.params.get("maddr") or uri.host
    return Target(host, uri.port or default_port(transport), transport, srv=uri.port is None and not _is_ip(host))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def next_hop(request: Request, default_transport: str = "UDP") -> Target:
    """The first Route entry if there is one (loose routing), else the Request-URI."""
    routes = request.headers.get_all("Route")
    uri = parse_address(routes[0]).uri if routes else request.uri
    return target_for_uri(uri, default_transport)
