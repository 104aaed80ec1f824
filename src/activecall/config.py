"""Configuration: a TOML file read into frozen dataclasses.

Key names and defaults are active-call's, as its configuration guide documents
them (docs/configuration.md lists every key and where we differ).  Every section is one dataclass whose field names are
the TOML key names.  Loading is strict: a wrong type, an unparsable address, a
port out of range, an invalid regex or an unknown key stops start-up with a
``ConfigError`` that names the file, the key and the reason.  A file with only
some keys is fine: defaults fill the rest.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from activecall import __version__, typed
from activecall.filenames import check_pattern

DEFAULT_USERAGENT = f"activecall/{__version__}"

#: Codec names accepted in ``codecs`` (case-insensitive) -> canonical name.
CODEC_ALIASES = {
    "pcmu": "pcmu",
    "pcma": "pcma",
    "g722": "g722",
    "opus": "opus",
    "l16": "l16",
    "telephone_event": "telephone_event",
    "telephone-event": "telephone_event",
    "dtmf": "telephone_event",
    "2833": "telephone_event",
}
#: Names the original accepts that activecall cannot carry; dropped with a warning.
UNSUPPORTED_CODECS = {"g729"}
DEFAULT_CODECS = ("pcmu", "pcma", "g722", "opus", "telephone_event")

LOG_LEVELS = ("trace", "debug", "info", "warn", "warning", "error", "critical")


class ConfigError(Exception):
    """A configuration problem, naming where it is and why."""

    def __init__(self, key: str, reason: str, source: str = "<config>"):
        self.key = key
        self.reason = reason
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        return f"{where}key '{self.key}': {self.reason}"


# -- value checks (pure functions: value -> normalised value, or ValueError) --


def check_ip(value: str) -> str:
    """An IPv4 or IPv6 address literal (no port)."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None


def check_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError(f"port {value} is out of range 1..65535")
    return value


def check_port_or_zero(value: int) -> int:
    """0 switches a listener off; anything else must be a valid port."""
    if value == 0:
        return 0
    return check_port(value)


def parse_hostport(
    value: str, default_port: Optional[int] = None, allow_zero: bool = False
) -> tuple[str, int]:
    """Split ``host:port`` / ``[v6]:port`` / ``host`` into (host, port)."""
    value = value.strip()
    if not value:
        raise ValueError("empty address")
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?", value)
    if m:
        host, port = m.group(1), m.group(2)
        check_ip(host)
    elif value.count(":") > 1:  # a bare IPv6 literal
        host, port = check_ip(value), None
    else:
        host, _, port = value.partition(":")
        port = port or None
        if not re.fullmatch(r"[A-Za-z0-9.\-_]+", host):
            raise ValueError(f"{value!r} is not host:port")
    if port is None:
        if default_port is None:
            raise ValueError(f"{value!r} has no port (expected host:port)")
        return host, default_port
    if not port.isdigit():
        raise ValueError(f"{value!r}: port {port!r} is not a number")
    return host, (check_port_or_zero if allow_zero else check_port)(int(port))


def check_listen_addr(value: str) -> str:
    """``IP:PORT`` for a listening socket (``0.0.0.0:8080``, ``[::]:8080``; port 0 = any free port)."""
    host, port = parse_hostport(value, allow_zero=True)
    check_ip(host)
    return value


def check_regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as e:
        raise ValueError(f"invalid regex {value!r}: {e}") from None
    return value


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)")


def parse_duration(value: Union[str, int, float]) -> float:
    """Seconds from a number or a humantime-like string (``60s``, ``1m30s``, ``500ms``)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as \"60s\", got a boolean")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    text = value.strip().replace(" ", "")
    if not text:
        raise ValueError("empty duration")
    pos, total = 0, 0.0
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for m in _DURATION_RE.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * scale[m.group(2)]
        pos = m.end()
    if pos != len(text):
        if re.fullmatch(r"\d+(\.\d+)?", text):
            return float(text)
        raise ValueError(f"{value!r} is not a duration (examples: \"60s\", \"1m30s\", \"500ms\")")
    return total


def check_duration(value) -> float:
    return parse_duration(value)


def check_count(value: int) -> int:
    """A count that may be 0 (0 = no limit)."""
    if value < 0:
        raise ValueError(f"{value} is negative (0 means no limit)")
    return value


def check_codecs(value: list) -> tuple:
    out = []
    for name in value:
        key = str(name).strip().lower()
        if key in UNSUPPORTED_CODECS:
            continue  # the original's g729: dropped, see load_config's warnings
        if key not in CODEC_ALIASES:
            known = ", ".join(sorted(set(CODEC_ALIASES)))
            raise ValueError(f"unknown codec {name!r} (known: {known})")
        canon = CODEC_ALIASES[key]
        if canon not in out:
            out.append(canon)
    if not any(c != "telephone_event" for c in out):
        raise ValueError("at least one audio codec is needed")
    return tuple(out)


def check_log_level(value: str) -> str:
    v = value.strip().lower()
    if v not in LOG_LEVELS:
        raise ValueError(f"{value!r} is not one of {', '.join(LOG_LEVELS)}")
    return v


def check_http_method(value: str) -> str:
    v = value.upper()
    if v not in ("GET", "POST", "PUT", "PATCH"):
        raise ValueError(f"{value!r} is not one of GET, POST, PUT, PATCH")
    return v


def check_http_url(value: str) -> str:
    if not re.match(r"https?://[^/\s]+", value):
        raise ValueError(f"{value!r} is not an http(s) URL")
    return value


def check_ice_url(value: str) -> str:
    if not re.match(r"(stun|stuns|turn|turns):\S+", value):
        raise ValueError(f"{value!r} is not a stun:/stuns:/turn:/turns: URL")
    return value


def check_sip_server(value: str) -> str:
    """``host[:port]`` with an optional ``sip:``/``sips:`` prefix."""
    rest = re.sub(r"^sips?:", "", value)
    rest = rest.split(";", 1)[0]
    parse_hostport(rest, default_port=5060)
    return value


def check_sip_uri(value: str) -> str:
    if not re.fullmatch(r"sips?:[^\s@]+(@[^\s]+)?", value):
        raise ValueError(f"{value!r} is not a SIP URI (expected sip:user@host[:port])")
    return value


def _checked(check, **kw):
    return field(metadata={"check": check}, **kw)


# -- the loader's rules: typed.py walks the sections; TOML's wording is here ----------------------------


def _value_kind(v) -> str:
    return {
        str: "a string", int: "an integer", float: "a number", bool: "a boolean",
        list: "an array", dict: "a table",
    }.get(type(v), type(v).__name__)


def _mismatch(hint, value, path: str) -> str:
    if hint is bool:
        return f"expected a boolean (true/false), got {_value_kind(value)}"
    if hint is int:
        return f"expected an integer, got {_value_kind(value)} {value!r}"
    if hint is float:
        return f"expected a number or duration, got {_value_kind(value)}"
    if hint is str:
        return f"expected a string, got {_value_kind(value)} {value!r}"
    if typing.get_origin(hint) is tuple:
        if dataclasses.is_dataclass(typing.get_args(hint)[0]):
            return f"expected an array of tables ([[{path}]]), got {_value_kind(value)}"
        return f"expected an array of strings, got {_value_kind(value)}"
    return f"expected a table, got {_value_kind(value)}"


def _strict_int(value):
    return value if isinstance(value, int) and not isinstance(value, bool) else typed.NO


def _number_or_duration(value):
    """Left as written: every float key is a duration, whose ``check`` reads strings too."""
    return value if isinstance(value, (int, float, str)) and not isinstance(value, bool) else typed.NO


def _headers(value, key, loader=None) -> tuple:
    """Headers as ``[[name, value], ...]`` or ``{name = value}`` -> tuple of pairs."""
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, list):
        pairs = []
        for i, item in enumerate(value):
            if not (isinstance(item, list) and len(item) == 2):
                raise ConfigError(f"{key}[{i}]", "expected a [name, value] pair")
            pairs.append(tuple(item))
    else:
        raise ConfigError(key, f"expected a table or an array of [name, value] pairs, got {_value_kind(value)}")
    for name, val in pairs:
        if not isinstance(name, str) or not isinstance(val, str):
            raise ConfigError(key, "header names and values must be strings")
        if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name) or "\n" in val or "\r" in val:
            raise ConfigError(key, f"invalid header {name!r}")
    return tuple((str(n), str(v)) for n, v in pairs)


def _headers_field():
    return field(default=(), metadata={"parse": _headers})


def _build_handler(table, key, loader):
    """``[handler]``: its ``type`` says which section it is."""
    if not isinstance(table, dict):
        raise ConfigError(key, f"expected a table, got {_value_kind(table)}")
    kind = table.get("type")
    if kind == "webhook":
        return loader.load(WebhookHandler, table, key)
    if kind == "playbook":
        return loader.load(PlaybookHandler, table, key)
    if kind is None:
        raise ConfigError(f"{key}.type", "is required: \"webhook\" or \"playbook\"")
    raise ConfigError(f"{key}.type", f"{kind!r} is not one of webhook, playbook")


#: TOML tables -> sections: strict types, every unknown key an error (CLI-only fields are no keys)
_LOADER = typed.Loader(
    error=ConfigError,
    mismatch=_mismatch,
    unknown="error",
    keys=lambda cls, f: f.metadata.get("toml_keys") or (f.name,),
    include=lambda f: f.init and not f.metadata.get("cli_only"),
    scalars={int: _strict_int, float: _number_or_duration},
)


# -- sections ----------------------------------------------------------------


@dataclass(frozen=True)
class IceServer:
    """One STUN/TURN server handed to WebRTC peers and served at /iceservers."""

    urls: tuple[str, ...] = _checked(lambda v: tuple(check_ice_url(u) for u in v), default=())
    username: Optional[str] = None
    credential: Optional[str] = None
    credential_type: str = _checked(
        lambda v: _one_of(v, ("password", "oauth")), default="password"
    )


def _one_of(value, choices):
    if value not in choices:
        raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
    return value


@dataclass(frozen=True)
class Rule:
    """A ``[[handler.rules]]`` entry: both present patterns must match."""

    playbook: str
    caller: Optional[str] = _checked(check_regex, default=None)
    callee: Optional[str] = _checked(check_regex, default=None)


@dataclass(frozen=True)
class WebhookHandler:
    """Inbound INVITEs are POSTed to ``url`` (or round-robin over ``urls``)."""

    type: str = "webhook"
    url: Optional[str] = _checked(check_http_url, default=None)
    urls: tuple[str, ...] = _checked(lambda v: tuple(check_http_url(u) for u in v), default=())
    method: str = _checked(check_http_method, default="POST")
    #: extra HTTP headers: ``[["X-Name", "value"], ...]`` or a table
    headers: tuple[tuple[str, str], ...] = _headers_field()
    timeout: float = _checked(check_duration, default=5.0)


@dataclass(frozen=True)
class PlaybookHandler:
    """Inbound INVITEs are routed to a playbook by regex rules on caller/callee."""

    type: str = "playbook"
    default: Optional[str] = None
    rules: tuple[Rule, ...] = ()


@dataclass(frozen=True)
class Credential:
    username: str = ""
    password: str = ""
    realm: Optional[str] = None

    def __repr__(self) -> str:  # never print the password
        return f"Credential(username={self.username!r}, password='***', realm={self.realm!r})"


@dataclass(frozen=True)
class RegisterUser:
    """An extension we register to a PBX (``[[register_users]]``)."""

    server: str = _checked(check_sip_server, default="")
    username: str = ""
    display_name: Optional[str] = None
    disabled: bool = False
    expires: int = _checked(lambda v: _positive(v, 30), default=3600)
    credential: Optional[Credential] = None


def _positive(value, minimum=1):
    if value < minimum:
        raise ValueError(f"must be at least {minimum}")
    return value


@dataclass(frozen=True)
class Recording:
    """``[recording]``: a stereo recording per call under ``path`` (``format`` wav or raw pcm, at
    ``samplerate``), named by ``filename_pattern`` (placeholders: ``filenames.PATTERN_FIELDS``)."""

    enabled: bool = False
    auto_start: bool = False
    path: str = "./config/recorders"
    filename_pattern: Optional[str] = _checked(check_pattern, default=None)
    format: str = _checked(lambda v: _one_of(v, ("wav", "pcm")), default="wav")
    samplerate: int = _checked(lambda v: _one_of(v, (8000, 16000, 24000, 32000, 48000)), default=16000)
    ptime: int = _checked(lambda v: _positive(v, 20), default=200)


def _level(value):
    if not 0.0 <= value <= 4.0:
        raise ValueError("must be between 0 and 4 (a linear gain)")
    return value


def _speed(value):
    if not 0.0 < value <= 1.0:
        raise ValueError("must be above 0 and at most 1 (gain change per 20 ms frame)")
    return value


@dataclass(frozen=True)
class Ambiance:
    """``[ambiance]``: defaults for a call's ``ambiance`` option (call/ambiance.py); camelCase keys as
    in the guide."""

    path: Optional[str] = None
    duckLevel: float = _checked(_level, default=0.1)
    normalLevel: float = _checked(_level, default=0.3)
    transitionSpeed: float = _checked(_speed, default=0.01)
    enabled: bool = True
#: ``[callrecord] vendor`` for ``type = "s3"``: the original's names (``a_w_s``/``g_c_p`` are its
#: spellings of aws/gcp, accepted too); azure is not S3-compatible and is refused by name
S3_VENDORS = ("aws", "gcp", "aliyun", "tencent", "minio", "digital_ocean")
_S3_VENDOR_ALIASES = {"a_w_s": "aws", "g_c_p": "gcp"}


def check_s3_vendor(value: str) -> str:
    value = _S3_VENDOR_ALIASES.get(value, value)
    if value == "azure":
        raise ValueError("'azure' is not S3-compatible (Azure Blob Storage has its own API); not supported")
    return _one_of(value, S3_VENDORS)


@dataclass(frozen=True)
class CallRecord:
    """``[callrecord]``: where CDRs go (``local`` directory, ``http`` upload or ``s3`` bucket)."""

    type: str = _checked(lambda v: _one_of(v, ("local", "http", "s3")), default="local")
    #: local: the directory; s3: the key prefix in the bucket
    root: str = "./config/cdr"
    url: Optional[str] = _checked(check_http_url, default=None)
    headers: tuple[tuple[str, str], ...] = _headers_field()
    with_media: bool = False
    #: unset: kept after an http upload, removed after an s3 one (each as the original behaves by default)
    keep_media_copy: Optional[bool] = None
    # s3 (the original's keys)
    vendor: str = _checked(check_s3_vendor, default="aws")
    bucket: str = ""
    region: str = ""
    access_key: str = ""
    secret_key: str = ""
    endpoint: Optional[str] = _checked(check_http_url, default=None)
    #: http and s3: records waiting for upload, kept across restarts (✱ not in the original)
    spool_dir: str = "./config/cdr-spool"


@dataclass(frozen=True)
class Rewrite:
    """Regex rewrite of an outbound target URI (``$1`` / ``\\1`` references)."""

    match: str = _checked(check_regex, default="")
    rewrite: str = ""


def check_sip_address(value: str) -> str:
    """A SIP URI or name-addr (``sip:…``, ``"Name" <sips:…>``); ``$1`` references are allowed in it."""
    text = value.strip()
    if not re.match(r"^(?:sips?:\S+|[^<]*<sips?:[^>]+>.*)$", text, re.IGNORECASE):
        raise ValueError(f"{value!r} is not a SIP URI or name-addr (sip:user@host, \"Name\" <sip:user@host>)")
    return text


def _trunk_methods(value) -> tuple:
    methods = tuple(str(m).upper() for m in value)
    for m in methods:
        if m not in ("INVITE", "REFER"):
            raise ValueError(f"{m!r} is not INVITE or REFER")
    return methods


@dataclass(frozen=True)
class TrunkRule:
    """``[[trunk_rules]]``: per-trunk rewriting of From / To / Contact on outgoing INVITE and REFER.

    ``match`` is a regex searched in the request URI (after ``[[rewrites]]``); the first matching rule
    applies.  ``from`` / ``to`` / ``contact`` replace those headers' address (a SIP URI or name-addr,
    ``$1``-style references to ``match``'s groups allowed; the From/To tags are kept)."""

    match: str = _checked(check_regex, default="")
    from_: Optional[str] = field(default=None, metadata={"toml_keys": ("from",), "check": check_sip_address})
    to: Optional[str] = _checked(check_sip_address, default=None)
    contact: Optional[str] = _checked(check_sip_address, default=None)
    methods: tuple[str, ...] = _checked(_trunk_methods, default=("INVITE", "REFER"))


@dataclass(frozen=True)
class Config:
    """The whole daemon configuration (top-level TOML keys)."""

    addr: str = _checked(check_ip, default="0.0.0.0")
    http_addr: str = _checked(check_listen_addr, default="0.0.0.0:8080")
    udp_port: int = _checked(check_port, default=25060)
    tcp_port: Optional[int] = _checked(check_port_or_zero, default=None)
    tls_port: Optional[int] = _checked(check_port_or_zero, default=None)
    tls_cert_file: Optional[str] = None
    tls_key_file: Optional[str] = None
    tls_ca_file: Optional[str] = None
    tls_verify_peer: bool = True
    enable_srtp: bool = False
    log_level: str = _checked(check_log_level, default="info")
    log_file: Optional[str] = None
    http_access_skip_paths: tuple[str, ...] = ()
    http_token: Optional[str] = None
    media_cache_path: str = "./config/mediacache"
    playbook_dir: str = "./config/playbook"
    external_ip: Optional[str] = _checked(check_ip, default=None)
    rtp_bind_ip: Optional[str] = _checked(check_ip, default=None)
    rtp_start_port: int = _checked(check_port, default=12000)
    rtp_end_port: int = _checked(check_port, default=42000)
    enable_rtp_latching: bool = True
    codecs: tuple[str, ...] = _checked(check_codecs, default=DEFAULT_CODECS)
    useragent: str = DEFAULT_USERAGENT
    accept_timeout: float = _checked(check_duration, default=60.0)
    graceful_shutdown: bool = True
    graceful_shutdown_timeout: float = _checked(check_duration, default=10.0)
    #: new calls refused (503) while this many are live; 0 = no cap (docs/scale-out.md)
    max_calls: int = _checked(check_count, default=0)
    #: new calls refused (503) while the event loop runs this late (smoothed); 0 = off
    max_event_loop_lag: float = _checked(check_duration, default=0.5)
    ice_servers: tuple[IceServer, ...] = ()
    handler: Optional[Union[WebhookHandler, PlaybookHandler]] = field(default=None, metadata={"parse": _build_handler})
    register_users: tuple[RegisterUser, ...] = ()
    recording: Recording = Recording()
    callrecord: Optional[CallRecord] = None
    ambiance: Optional[Ambiance] = None
    rewrites: tuple[Rewrite, ...] = ()
    trunk_rules: tuple[TrunkRule, ...] = ()

    # CLI-only settings (not TOML keys)
    call: Optional[str] = field(default=None, metadata={"cli_only": True})
    source: str = field(default="<defaults>", metadata={"cli_only": True})

    @property
    def http_host_port(self) -> tuple[str, int]:
        return parse_hostport(self.http_addr, allow_zero=True)

    @property
    def sip_tcp_port(self) -> int:
        """TCP SIP listener port: ``tcp_port``, defaulting to ``udp_port``; 0 = off."""
        return self.udp_port if self.tcp_port is None else self.tcp_port


def _validate(cfg: Config) -> list[str]:
    """Cross-key checks; returns warnings.  Raises ConfigError."""
    warnings: list[str] = []
    for i, rule in enumerate(cfg.trunk_rules):
        if not rule.match:
            raise ConfigError(f"trunk_rules[{i}].match", "is required (a regex on the request URI)")
        if rule.from_ is None and rule.to is None and rule.contact is None:
            raise ConfigError(f"trunk_rules[{i}]", "rewrites nothing: give from, to or contact")
    if cfg.rtp_end_port < cfg.rtp_start_port:
        raise ConfigError(
            "rtp_end_port",
            f"{cfg.rtp_end_port} is below rtp_start_port {cfg.rtp_start_port} (the range is inverted)",
        )
    if cfg.rtp_end_port - cfg.rtp_start_port + 1 < 4:
        raise ConfigError(
            "rtp_end_port",
            f"the RTP range {cfg.rtp_start_port}..{cfg.rtp_end_port} is too small "
            "(at least 4 ports: an RTP/RTCP pair for each of two legs)",
        )
    if cfg.tls_port:
        for key in ("tls_cert_file", "tls_key_file"):
            path = getattr(cfg, key)
            if not path:
                raise ConfigError(key, "is required when tls_port is set")
            if not os.path.isfile(path) or not os.access(path, os.R_OK):
                raise ConfigError(key, f"cannot read {path!r}")
        if cfg.tls_port == cfg.udp_port and cfg.sip_tcp_port == cfg.tls_port:
            raise ConfigError("tls_port", f"{cfg.tls_port} is already the TCP SIP port")
    if cfg.tls_ca_file and not os.access(cfg.tls_ca_file, os.R_OK):
        raise ConfigError("tls_ca_file", f"cannot read {cfg.tls_ca_file!r}")
    h = cfg.handler
    if isinstance(h, WebhookHandler) and not (h.url or h.urls):
        raise ConfigError("handler.url", "a webhook handler needs url or urls")
    if cfg.callrecord and cfg.callrecord.type == "http" and not cfg.callrecord.url:
        raise ConfigError("callrecord.url", "is required when type = \"http\"")
    if cfg.callrecord and cfg.callrecord.type == "s3":
        for key in ("bucket", "access_key", "secret_key"):
            if not getattr(cfg.callrecord, key).strip():
                raise ConfigError(f"callrecord.{key}", "is required when type = \"s3\"")
        if not cfg.callrecord.endpoint and cfg.callrecord.vendor not in ("aws", "gcp"):
            raise ConfigError("callrecord.endpoint",
                              f"is required for vendor {cfg.callrecord.vendor!r} (the store's http(s) URL)")
    for i, user in enumerate(cfg.register_users):
        if not user.server:
            raise ConfigError(f"register_users[{i}].server", "is required")
    if cfg.http_token is not None and not cfg.http_token.strip():
        raise ConfigError("http_token", "must not be empty (leave it out to disable)")
    return warnings


def configured_playbooks(cfg: Config, handler_flag: bool = False) -> list[tuple[str, str]]:
    """Every playbook the configuration names, as (key, name): ``handler.default`` (``--handler``
    when the flag set it) and each ``handler.rules[i].playbook``.  (``--call`` runs the default;
    a webhook handler names none: its playbooks come from its answers, like the API's.)"""
    h = cfg.handler
    if not isinstance(h, PlaybookHandler):
        return []
    out = []
    if h.default is not None:
        out.append(("--handler" if handler_flag else "handler.default", h.default))
    out += [(f"handler.rules[{i}].playbook", rule.playbook) for i, rule in enumerate(h.rules)]
    return out


#: ``check(playbook_dir, name) -> warnings``, raising ValueError(reason naming the file)
PlaybookCheck = typing.Callable[[str, str], list]


def _check_playbooks(cfg: Config, check: PlaybookCheck, handler_flag: bool) -> list[str]:
    warnings: list[str] = []
    for key, name in configured_playbooks(cfg, handler_flag):
        try:
            warnings += [f"{key}: {w}" for w in check(cfg.playbook_dir, name)]
        except ValueError as e:
            raise ConfigError(key, str(e)) from None
    return warnings


def load_config(path: Optional[str] = None, overrides: Optional[dict] = None,
                check_playbook: Optional[PlaybookCheck] = None) -> tuple[Config, list[str]]:
    """Read ``path`` (or defaults), apply CLI ``overrides``; return (config, warnings).

    ``check_playbook`` (tap.py gives ``call.handlers.check_configured_playbook``; this module
    imports neither the call layer nor the playbook parser) is run on every playbook the
    configuration names, so a missing or invalid one stops start-up naming its key and file.
    """
    source = path or "<defaults>"
    table: dict = {}
    warnings: list[str] = []
    if path:
        try:
            with open(path, "rb") as f:
                table = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError("--conf", f"file {path!r} does not exist", source="") from None
        except PermissionError:
            raise ConfigError("--conf", f"file {path!r} is not readable", source="") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("(syntax)", f"not valid TOML: {e}", source=path) from None
        for name in table.get("codecs", []) if isinstance(table.get("codecs"), list) else []:
            if str(name).lower() in UNSUPPORTED_CODECS:
                warnings.append(f"codecs: {name!r} is not supported by activecall and is ignored")
    try:
        cfg = _LOADER.load(Config, table)
        if overrides:
            cfg = apply_overrides(cfg, overrides)
        warnings += _validate(cfg)
        if check_playbook is not None:
            flag = str((overrides or {}).get("handler") or "").endswith(".md")
            warnings += _check_playbooks(cfg, check_playbook, handler_flag=flag)
    except ConfigError as e:
        e.source = "command line" if e.key.startswith("--") else source
        raise
    return dataclasses.replace(cfg, source=source), warnings


def apply_overrides(cfg: Config, opts: dict) -> Config:
    """Apply the command-line flags (``--http``, ``--sip``, ...) over the file."""
    changes: dict[str, Any] = {}
    if opts.get("http"):
        try:
            changes["http_addr"] = check_listen_addr(opts["http"])
        except ValueError as e:
            raise ConfigError("--http", str(e)) from None
    if opts.get("sip"):
        changes.update(_parse_sip_flag(opts["sip"]))
    if opts.get("external-ip"):
        try:
            changes["external_ip"] = check_ip(opts["external-ip"])
        except ValueError as e:
            raise ConfigError("--external-ip", str(e)) from None
    if opts.get("codecs"):
        try:
            names = [c for c in opts["codecs"].split(",") if c.strip()]
            changes["codecs"] = check_codecs(names)
        except ValueError as e:
            raise ConfigError("--codecs", str(e)) from None
    if opts.get("handler"):
        changes["handler"] = _parse_handler_flag(opts["handler"], cfg.handler)
    if opts.get("call"):
        try:
            changes["call"] = check_sip_uri(opts["call"])
        except ValueError as e:
            raise ConfigError("--call", str(e)) from None
    return dataclasses.replace(cfg, **changes)


def _parse_sip_flag(value: str) -> dict:
    """``--sip``: a bare port, ``ip:port``, or ``ip``."""
    value = value.strip()
    try:
        if value.isdigit():
            return {"udp_port": check_port(int(value))}
        try:
            return {"addr": check_ip(value.strip("[]"))}
        except ValueError:
            host, port = parse_hostport(value)
            return {"addr": check_ip(host), "udp_port": port}
    except ValueError as e:
        raise ConfigError("--sip", f"{value!r} is not a port, ip:port or ip ({e})") from None


def _parse_handler_flag(value: str, current):
    """``--handler``: an http(s) URL -> webhook; a ``*.md`` file -> default playbook."""
    if re.match(r"https?://", value):
        return WebhookHandler(url=check_http_url(value))
    if value.endswith(".md"):
        rules = current.rules if isinstance(current, PlaybookHandler) else ()
        return PlaybookHandler(default=value, rules=rules)
    raise ConfigError("--handler", f"{value!r} is neither an http(s) URL nor a .md playbook")


def redacted(cfg: Config) -> dict:
    """The configuration as a dict with secrets replaced, for logs and /health."""

    def walk(obj):
        if dataclasses.is_dataclass(obj):
            out = {}
            for f in dataclasses.fields(obj):
                v = getattr(obj, f.name)
                if f.name in ("password", "credential", "http_token", "secret_key", "access_key") and isinstance(v, str) and v:
                    v = "***"
                out[f.name] = walk(v)
            return out
        if isinstance(obj, tuple):
            return [walk(v) for v in obj]
        return obj

    return walk(cfg)
