"""Server → client events of the WebSocket protocol (docs/api.md, "Events"), one frozen
dataclass each, plus the small wire machinery that commands.py shares.

Field names are the wire names (camelCase) so a reader can grep the protocol
document and the code for the same word.  Unset optional fields are ``None``
and are left *out* of the JSON, never sent as ``null``: existing clients of
the original test ``"field" in msg``.  Every ``timestamp`` is integer
milliseconds since the Unix epoch (``now_ms``).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, ClassVar, Optional, Union

from activecall import typed

# -- the wire machinery --------------------------------------------------------


class WireError(ValueError):
    """A JSON value that does not fit the expected shape; ``path`` names the field."""

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}" if path else reason)


def wire(name: str, **kw):
    """A field whose wire name is not a valid Python name (``from``)."""
    return field(metadata={"wire": name}, **kw)


def _wire_name(f: dataclasses.Field) -> str:
    return f.metadata.get("wire", f.name)


#: the field that keeps unknown keys of an option object, so they round-trip
OTHER_KEYS = "other_keys"


_WIRE_FIELDS: dict[type, tuple] = {}


def _wire_fields(cls) -> tuple:
    """``(attribute, wire name)`` per field of dataclass ``cls``, worked out once per class:
    ``to_wire`` runs for every event a call emits."""
    spec = _WIRE_FIELDS.get(cls)
    if spec is None:
        spec = _WIRE_FIELDS[cls] = tuple((f.name, _wire_name(f)) for f in dataclasses.fields(cls))
    return spec


_PLAIN = frozenset({str, int, float, bool, type(None)})


def to_wire(value: Any) -> Any:
    """A plain JSON value for ``value``; ``None`` fields of dataclasses are left out."""
    cls = type(value)
    if cls in _PLAIN:  # most values: answered before the dataclass check, which is the dear part
        return value
    if cls in _WIRE_FIELDS or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
        out: dict[str, Any] = {}
        tag = getattr(cls, "TAG_KEY", None)
        if tag:
            out[tag] = cls.TAG
        for name, wire_name in _wire_fields(cls):
            v = getattr(value, name)
            if name == OTHER_KEYS:
                for k, extra in (v or {}).items():
                    out.setdefault(k, extra)
                continue
            if v is None:
                continue
            out[wire_name] = to_wire(v)
        return out
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return rfc3339(value)
    if isinstance(value, dict):
        return {str(k): to_wire(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_wire(v) for v in value]
    return value


_kind = typed.kind


def _wire_keys(cls, f: dataclasses.Field) -> tuple:
    """A field's wire name, then the class's ``ALIASES`` for it (``apiKey`` for ``secretKey``)."""
    name = _wire_name(f)
    return (name,) + tuple(alias for alias, target in getattr(cls, "ALIASES", {}).items() if target == name)


#: JSON -> wire objects: strict types; ``null`` is the key left out; of two spellings the first wins;
#: unknown keys go to ``other_keys`` when the class has it (option objects round-trip into the CDR)
#: and are ignored otherwise (as the original does), the ``command``/``event`` tag among them.
WIRE = typed.Loader(error=WireError, unknown="keep", keys=_wire_keys, keep_field=OTHER_KEYS,
                    duplicates="first", none_is_missing=True)


def from_wire(tp, value: Any, path: str) -> Any:
    """Check and convert the JSON ``value`` into type ``tp`` (strict: no silent coercion)."""
    return WIRE.convert(tp, value, path)


def build_from_wire(cls, value: Any, path: str = ""):
    """Build dataclass ``cls`` from a JSON object; missing required fields and wrong types raise
    ``WireError`` (``typed.Loader.load`` with the ``WIRE`` policy)."""
    return WIRE.load(cls, value, path)


def json_text(value, **kwargs) -> str:
    """``json.dumps(value, ensure_ascii=False)`` that is always encodable as UTF-8: a lone surrogate
    (a SIP peer's non-UTF-8 byte in a Call-ID or display name, kept by the parser) becomes the
    JSON escape ``\\udcff`` instead of failing the write or the WebSocket frame."""
    text = json.dumps(value, ensure_ascii=False, **kwargs)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


class WireObject:
    """Mixin: ``to_dict()`` / ``to_json()`` with unset fields left out."""

    def to_dict(self) -> dict:
        return to_wire(self)

    def to_json(self) -> str:
        return json_text(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, value: dict, path: str = ""):
        return build_from_wire(cls, value, path)


# -- time ----------------------------------------------------------------------------


def now_ms(clock=None) -> int:
    """Integer milliseconds since the epoch from an ``IReactorTime`` (or the wall clock)."""
    if clock is None:
        from twisted.internet import reactor as clock
    return int(round(clock.seconds() * 1000))


def rfc3339(moment: Union[datetime, float]) -> str:
    """RFC 3339 UTC text (``2025-01-01T12:00:00.123456+00:00``) for a datetime or epoch seconds."""
    if not isinstance(moment, datetime):
        moment = datetime.fromtimestamp(moment, tz=timezone.utc)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat()


# -- hangup reasons ---------------------------------------------------------------------


class HangupReason(str, enum.Enum):
    """Clean reason strings for the ``hangup`` event and the CDR.

    The original sent Rust debug text (``"Some(ByCaller)"``); these are the
    words its ``hangup`` command already accepts.
    """

    CALLER = "caller"
    CALLEE = "callee"
    REFER = "refer"
    SYSTEM = "system"
    AUTOHANGUP = "autohangup"
    INACTIVITY = "inactivityTimeout"
    NO_ANSWER = "noAnswer"
    CANCELED = "canceled"
    REJECTED = "rejected"
    FAILED = "failed"
    SERVER_UNAVAILABLE = "serverUnavailable"
    ANSWER_MACHINE = "answerMachine"  # amd: a machine (without a voicemail to leave) or a fax answered


_REASON_WORDS = {r.value.lower(): r for r in HangupReason}
_REASON_WORDS.update({
    "bycaller": HangupReason.CALLER, "bycallee": HangupReason.CALLEE,
    "byrefer": HangupReason.REFER, "bysystem": HangupReason.SYSTEM,
    "inactivity": HangupReason.INACTIVITY, "cancelled": HangupReason.CANCELED,
})


def hangup_reason(text: Optional[str], initiator: Optional[str] = None) -> str:
    """The clean reason for a ``hangup`` command's ``reason``/``initiator``.

    Known words (any case, also the original's ``byCaller`` spelling) become the
    canonical string; ``initiator`` caller/callee/system wins as in the original;
    any other text is kept as the user wrote it; nothing at all means ``system``.
    """
    if initiator and initiator.strip().lower() in ("caller", "callee", "system"):
        return _REASON_WORDS[initiator.strip().lower()].value
    if not text or not text.strip():
        return HangupReason.SYSTEM.value
    known = _REASON_WORDS.get(re.sub(r"[\s_-]", "", text).lower())
    return known.value if known else text.strip()


# -- events ----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Event(WireObject):
    """Base of every event; ``TAG`` is the ``event`` value."""

    TAG_KEY: ClassVar[str] = "event"
    TAG: ClassVar[str] = ""


@dataclass(frozen=True, kw_only=True)
class Attendee(WireObject):
    """``from``/``to`` of a hangup event."""

    username: str = ""
    realm: str = ""
    source: str = ""


@dataclass(frozen=True, kw_only=True)
class Answer(Event):
    TAG: ClassVar[str] = "answer"
    trackId: str
    timestamp: int
    sdp: str = ""
    refer: bool = False


@dataclass(frozen=True, kw_only=True)
class Reject(Event):
    TAG: ClassVar[str] = "reject"
    trackId: str
    timestamp: int
    reason: str
    code: Optional[int] = None
    refer: Optional[bool] = None


@dataclass(frozen=True, kw_only=True)
class Ringing(Event):
    TAG: ClassVar[str] = "ringing"
    trackId: str
    timestamp: int
    earlyMedia: bool = False
    refer: bool = False


@dataclass(frozen=True, kw_only=True)
class Hangup(Event):
    """The call ended; sent for every call type (the original: SIP only), ``reason`` clean."""

    TAG: ClassVar[str] = "hangup"
    trackId: Optional[str] = None
    timestamp: int
    reason: Optional[str] = None
    initiator: Optional[str] = None
    startTime: str
    hangupTime: str
    answerTime: Optional[str] = None
    ringingTime: Optional[str] = None
    from_: Optional[Attendee] = wire("from", default=None)
    to: Optional[Attendee] = None
    extra: Optional[dict[str, Any]] = None
    refer: bool = False


@dataclass(frozen=True, kw_only=True)
class TrackStart(Event):
    TAG: ClassVar[str] = "trackStart"
    trackId: str
    timestamp: int
    playId: Optional[str] = None


@dataclass(frozen=True, kw_only=True)
class TrackEnd(Event):
    TAG: ClassVar[str] = "trackEnd"
    trackId: str
    timestamp: int
    duration: int = 0
    ssrc: int = 0
    playId: Optional[str] = None


@dataclass(frozen=True, kw_only=True)
class Interruption(Event):
    TAG: ClassVar[str] = "interruption"
    trackId: str
    timestamp: int
    playId: Optional[str] = None
    subtitle: Optional[str] = None
    position: Optional[int] = None
    totalDuration: int = 0
    current: int = 0


@dataclass(frozen=True, kw_only=True)
class Speaking(Event):
    TAG: ClassVar[str] = "speaking"
    trackId: str
    timestamp: int
    startTime: int
    isFiller: Optional[bool] = None
    confidence: Optional[float] = None


@dataclass(frozen=True, kw_only=True)
class Silence(Event):
    TAG: ClassVar[str] = "silence"
    trackId: str
    timestamp: int
    startTime: int
    duration: int


@dataclass(frozen=True, kw_only=True)
class _AsrResult(Event):
    """The fields shared by interim (asrDelta) and final (asrFinal) results."""

    trackId: str
    timestamp: int
    index: int
    startTime: Optional[int] = None
    endTime: Optional[int] = None
    text: str
    isFiller: Optional[bool] = None
    confidence: Optional[float] = None
    taskId: Optional[str] = None


@dataclass(frozen=True, kw_only=True)
class AsrDelta(_AsrResult):
    TAG: ClassVar[str] = "asrDelta"


@dataclass(frozen=True, kw_only=True)
class AsrFinal(_AsrResult):
    TAG: ClassVar[str] = "asrFinal"


@dataclass(frozen=True, kw_only=True)
class Transcript(Event):
    """Sent after each ``asrFinal``: the configuration guide's listeners wait for it."""

    TAG: ClassVar[str] = "transcript"
    trackId: str
    timestamp: int
    text: str
    index: Optional[int] = None


@dataclass(frozen=True, kw_only=True)
class Eou(Event):
    """The end-of-turn verdict.  ✱ ``probability`` (0..1) and ``inferenceMs``: the model's answer and how
    long it took; both left out when the silence ceiling ended the turn."""

    TAG: ClassVar[str] = "eou"
    trackId: str
    timestamp: int
    completed: bool
    interruptPoint: Optional[int] = None
    probability: Optional[float] = None
    inferenceMs: Optional[int] = None


@dataclass(frozen=True, kw_only=True)
class Dtmf(Event):
    TAG: ClassVar[str] = "dtmf"
    trackId: str
    timestamp: int
    digit: str


@dataclass(frozen=True, kw_only=True)
class Hold(Event):
    TAG: ClassVar[str] = "hold"
    trackId: str
    timestamp: int
    onHold: bool


@dataclass(frozen=True, kw_only=True)
class Inactivity(Event):
    TAG: ClassVar[str] = "inactivity"
    trackId: str
    timestamp: int


@dataclass(frozen=True, kw_only=True)
class Metrics(Event):
    TAG: ClassVar[str] = "metrics"
    timestamp: int
    key: str
    duration: int = 0
    data: Any = None


@dataclass(frozen=True, kw_only=True)
class Error(Event):
    """A failure the client can act on; ``sender`` says which part failed."""

    TAG: ClassVar[str] = "error"
    trackId: str
    timestamp: int
    sender: str
    error: str
    code: Optional[int] = None


@dataclass(frozen=True, kw_only=True)
class AddHistory(Event):
    TAG: ClassVar[str] = "addHistory"
    sender: Optional[str] = None
    timestamp: int
    speaker: str
    text: str


@dataclass(frozen=True, kw_only=True)
class FunctionCall(Event):
    TAG: ClassVar[str] = "functionCall"
    trackId: str
    callId: str
    name: str
    arguments: str
    timestamp: int


@dataclass(frozen=True, kw_only=True)
class Interrupt(Event):
    """Realtime-mode barge-in signal (the original lets clients see it too)."""

    TAG: ClassVar[str] = "interrupt"
    receiver: Optional[str] = None


@dataclass(frozen=True, kw_only=True)
class Message(Event):
    """✱ A SIP MESSAGE (RFC 3428) the other party sent in the call's dialog; ``body`` as UTF-8 text."""

    TAG: ClassVar[str] = "message"
    trackId: str
    timestamp: int
    body: str
    contentType: str


@dataclass(frozen=True, kw_only=True)
class End(Event):
    """The last event of every call: the configuration guide's listeners wait for it."""

    TAG: ClassVar[str] = "end"
    trackId: str
    timestamp: int
    reason: Optional[str] = None


@dataclass(frozen=True, kw_only=True)
class TransferRequest(Event):
    """The far end sent a SIP REFER (RFC 3515): answer with ``acceptTransfer`` or ``rejectTransfer``."""

    TAG: ClassVar[str] = "transferRequest"
    trackId: str
    timestamp: int
    referTo: str
    referredBy: Optional[str] = None
    replaces: Optional[str] = None


@dataclass(frozen=True, kw_only=True)
class AnswerMachineDetection(Event):
    """The ``amd`` verdict on an outbound call (the original's event, with ``result`` added)."""

    TAG: ClassVar[str] = "answerMachineDetection"
    trackId: str
    timestamp: int
    startTime: int
    endTime: int
    text: str = ""
    result: str = ""
    beep: Optional[bool] = None


@dataclass(frozen=True, kw_only=True)
class Bridged(Event):
    """This call's audio is now connected to (``peer`` set) or parted from (``active`` false) another call."""

    TAG: ClassVar[str] = "bridged"
    trackId: str
    timestamp: int
    peer: str
    active: bool = True


#: ``event`` tag -> class
EVENTS: dict[str, type] = {
    cls.TAG: cls
    for cls in (
        Answer, Reject, Ringing, Hangup, TrackStart, TrackEnd, Interruption, Speaking, Silence,
        AsrDelta, AsrFinal, Transcript, Eou, Dtmf, Hold, Inactivity, Metrics, Error, AddHistory,
        FunctionCall, Interrupt, Message, End,
        TransferRequest, AnswerMachineDetection, Bridged,
    )
}


def parse_event(text: Union[str, bytes]) -> Event:
    """An event from a JSON text frame (for test clients and tools)."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise WireError("", f"not JSON: {e}") from None
    if not isinstance(value, dict) or not isinstance(value.get("event"), str):
        raise WireError("event", "is required")
    cls = EVENTS.get(value["event"])
    if cls is None:
        raise WireError("event", f"unknown event {value['event']!r}")
    return cls.from_dict(value)
