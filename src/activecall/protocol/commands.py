"""Client → server commands of the WebSocket protocol (docs/api.md, "WebSocket commands"), one frozen
dataclass each, and ``CallOption`` with its nested option objects.

``parse_command`` turns one text frame into a command or raises
``CommandError``.  The original dropped bad frames silently; the session sends
``CommandError.to_event`` back as an ``error`` event instead and keeps the
socket open.  Unknown extra keys on a command are ignored; unknown keys inside
option objects are kept in ``other_keys`` so they round-trip into the CDR.
Secrets in options are replaced by ``redact`` before logs and CDRs see them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Optional, Union

from activecall.protocol import events
from activecall.protocol.events import WireError, WireObject

#: Text frames longer than this are refused (a base64 ``tts`` of ~30 s of 16 kHz PCM fits).
MAX_COMMAND_BYTES = 1024 * 1024


def _non_negative(value):
    if value < 0:
        raise ValueError(f"must not be negative, got {value}")
    return value


def _sip_code(value):
    if not 100 <= value <= 699:
        raise ValueError(f"{value} is not a SIP status code (100..699)")
    return value


_DTMF_DIGITS = re.compile(r"[0-9*#A-Da-d]+")


def _dtmf_digits(value: str) -> str:
    if not _DTMF_DIGITS.fullmatch(value):
        raise ValueError(f"{value!r} is not a string of DTMF digits (0-9, *, #, A-D)")
    return value.upper()


def _checked(check, **kw):
    return field(metadata={"check": check}, **kw)


def _others():
    return field(default=None, compare=True, repr=False)


class _Option(WireObject):
    """An option object: its repr hides credentials, so logging one is safe."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({redact(self.to_dict())!r})"


def _option(cls):
    return dataclass(frozen=True, kw_only=True, repr=False)(cls)


# -- option objects ---------------------------------------------------------------------------
# Every field is optional and ``None`` means "not given": defaults belong to the
# consumer, so a second invite can tell "left out" from "set to the default".


@_option
class RecorderOption(_Option):
    recorderFile: Optional[str] = None
    samplerate: Optional[int] = None
    ptime: Optional[int] = _checked(_non_negative, default=None)
    format: Optional[str] = None
    other_keys: Optional[dict] = _others()


@_option
class VadOption(_Option):
    type: Optional[str] = None
    samplerate: Optional[int] = None
    speechPadding: Optional[int] = _checked(_non_negative, default=None)
    silencePadding: Optional[int] = _checked(_non_negative, default=None)
    ratio: Optional[float] = None
    voiceThreshold: Optional[float] = None
    maxBufferDurationSecs: Optional[int] = None
    silenceTimeout: Optional[int] = _checked(_non_negative, default=None)
    endpoint: Optional[str] = None
    secretKey: Optional[str] = None
    secretId: Optional[str] = None
    other_keys: Optional[dict] = _others()


@_option
class TranscriptionOption(_Option):
    provider: Optional[str] = None
    language: Optional[str] = None
    model: Optional[str] = None
    appId: Optional[str] = None
    secretId: Optional[str] = None
    secretKey: Optional[str] = None
    modelType: Optional[str] = None
    bufferSize: Optional[int] = None
    samplerate: Optional[int] = None
    endpoint: Optional[str] = None
    extra: Optional[dict[str, Any]] = None
    startWhenAnswer: Optional[bool] = None
    other_keys: Optional[dict] = _others()


@_option
class SynthesisOption(_Option):
    samplerate: Optional[int] = None
    provider: Optional[str] = None
    speed: Optional[float] = None
    appId: Optional[str] = None
    secretId: Optional[str] = None
    secretKey: Optional[str] = None
    volume: Optional[int] = None
    speaker: Optional[str] = None
    voice: Optional[str] = None
    codec: Optional[str] = None
    subtitle: Optional[bool] = None
    model: Optional[str] = None
    language: Optional[str] = None
    emotion: Optional[str] = None
    endpoint: Optional[str] = None
    extra: Optional[dict[str, Any]] = None
    maxConcurrentTasks: Optional[int] = None
    sessionId: Optional[str] = None
    cacheKey: Optional[str] = None
    other_keys: Optional[dict] = _others()

    def layered_over(self, base: Optional["SynthesisOption"]) -> "SynthesisOption":
        """This per-command option over the call-level one: set fields win."""
        return _layer(self, base)


@_option
class MediaPassOption(_Option):
    url: str
    inputSampleRate: int
    outputSampleRate: int
    packetSize: Optional[int] = None
    ptime: Optional[int] = None
    other_keys: Optional[dict] = _others()


@_option
class SipOption(_Option):
    """SIP credentials and headers.  Keys are snake_case as in the original
    (``hangup_headers``); ``enableSrtp`` is the configuration guide's per-call switch."""

    username: Optional[str] = None
    password: Optional[str] = None
    realm: Optional[str] = None
    contact: Optional[str] = None
    headers: Optional[dict[str, str]] = None
    hangup_headers: Optional[dict[str, str]] = None
    extract_headers: Optional[tuple[str, ...]] = None
    enableSrtp: Optional[bool] = None
    other_keys: Optional[dict] = _others()


@_option
class AmbianceOption(_Option):
    path: Optional[str] = None
    duckLevel: Optional[float] = None
    normalLevel: Optional[float] = None
    transitionSpeed: Optional[float] = None
    enabled: Optional[bool] = None
    other_keys: Optional[dict] = _others()


@_option
class InterruptionOption(_Option):
    """✱ Server-side barge-in for a ``/call`` client (docs/api.md, "Barge-in"); a playbook's
    ``interruption`` block has the same keys."""

    strategy: Optional[str] = None
    pauseOnVoice: Optional[bool] = None
    minSpeechMs: Optional[int] = _checked(_non_negative, default=None)
    falseInterruptionMs: Optional[int] = _checked(_non_negative, default=None)
    minWords: Optional[int] = _checked(_non_negative, default=None)
    backchannel: Optional[bool] = None
    fillerWordFilter: Optional[bool] = None
    volumeFadeMs: Optional[int] = _checked(_non_negative, default=None)
    ignoreFirstMs: Optional[int] = _checked(_non_negative, default=None)
    echoCancel: Optional[bool] = None
    other_keys: Optional[dict] = _others()


@_option
class EouOption(_Option):
    ALIASES: ClassVar[dict] = {"apiKey": "secretKey"}
    type: Optional[str] = None
    endpoint: Optional[str] = None
    secretKey: Optional[str] = None
    secretId: Optional[str] = None
    timeout: Optional[int] = _checked(_non_negative, default=None)
    extra: Optional[dict[str, Any]] = None
    threshold: Optional[float] = None  # ✱ with pauseMs: semantic end of turn (docs/speech.md)
    pauseMs: Optional[int] = _checked(_non_negative, default=None)
    earlyLook: Optional[bool] = None  # ✱ time the pause from the call VAD's speech end (docs/speech.md)
    earlyThreshold: Optional[float] = None  # ✱ the early look's bar (docs/speech.md, "End of turn")
    other_keys: Optional[dict] = _others()


@_option
class RealtimeOption(_Option):
    ALIASES: ClassVar[dict] = {"apiKey": "secretKey"}
    provider: Optional[str] = None
    model: Optional[str] = None
    secretKey: Optional[str] = None
    secretId: Optional[str] = None
    endpoint: Optional[str] = None
    turnDetection: Any = None
    tools: Optional[tuple[Any, ...]] = None
    extra: Optional[dict[str, Any]] = None
    other_keys: Optional[dict] = _others()


def _switch(cls, off: dict):
    """A section that may also be ``false`` (✱ the call does without it: ``off``) or ``true`` (✱ the
    section with every key left out: the defaults for the call's language, docs/api.md)."""

    def parse(value, where, loader):
        if value is False:
            return cls(**off)
        if value is True:
            return cls()
        return loader.convert(cls, value, where)

    return field(default=None, metadata={"parse": parse})


@_option
class CallOption(_Option):
    """``option`` of invite/accept.  ``sdp`` is the guide's spelling of ``offer``;
    ``sampleRate`` and ``playbook`` come from the guide's ``/call`` example."""

    caller: Optional[str] = None
    callee: Optional[str] = None
    offer: Optional[str] = None
    sdp: Optional[str] = None
    codec: Optional[str] = None
    sampleRate: Optional[int] = None
    playbook: Optional[str] = None
    denoise: Optional[bool] = None
    recorder: Optional[RecorderOption] = None
    vad: Optional[VadOption] = _switch(VadOption, {"type": "none"})
    asr: Optional[TranscriptionOption] = _switch(TranscriptionOption, {"provider": "none"})
    tts: Optional[SynthesisOption] = None
    #: ✱ the call's language: with no provider named, VAD, recogniser and voice for it (docs/api.md)
    language: Optional[str] = None
    mediaPass: Optional[MediaPassOption] = None
    #: seconds, or a duration string such as "30s" (the original's docs)
    handshakeTimeout: Optional[Union[int, float, str]] = None
    enableIpv6: Optional[bool] = None
    inactivityTimeout: Optional[int] = _checked(_non_negative, default=None)
    sip: Optional[SipOption] = None
    extra: Optional[dict[str, Any]] = None
    ambiance: Optional[AmbianceOption] = None
    eou: Optional[EouOption] = None
    interruption: Optional[InterruptionOption] = None  # ✱ server-side barge-in
    realtime: Optional[RealtimeOption] = None
    subscribe: Optional[bool] = None
    #: answering-machine detection on an outbound call: true, or the timers (call/amd.py)
    amd: Optional[Union[bool, dict[str, Any]]] = None
    other_keys: Optional[dict] = _others()

    @property
    def sdp_offer(self) -> Optional[str]:
        return self.offer if self.offer is not None else self.sdp

    #: what a later invite/accept inherits from an earlier option when it leaves them out
    INHERITED: ClassVar[tuple] = ("asr", "tts", "vad", "denoise", "recorder", "eou", "extra", "ambiance", "amd",
                                  "language")

    def merged_over(self, earlier: Optional["CallOption"]) -> "CallOption":
        """This option, taking INHERITED fields it leaves out from ``earlier`` (e.g. a playbook's)."""
        if earlier is None:
            return self
        changes = {
            name: getattr(earlier, name)
            for name in self.INHERITED
            if getattr(self, name) is None and getattr(earlier, name) is not None
        }
        return replace(self, **changes) if changes else self


def _layer(top, base):
    if base is None:
        return top
    changes = {}
    for name in top.__dataclass_fields__:
        if getattr(top, name) is None and getattr(base, name) is not None:
            changes[name] = getattr(base, name)
    return replace(top, **changes) if changes else top


@_option
class ReferOption(_Option):
    denoise: Optional[bool] = None
    timeout: Optional[int] = _checked(_non_negative, default=None)
    moh: Optional[str] = None
    asr: Optional[TranscriptionOption] = None
    autoHangup: Optional[bool] = None
    sip: Optional[SipOption] = None
    callId: Optional[str] = None
    pauseParentAsr: Optional[bool] = None
    other_keys: Optional[dict] = _others()

    DEFAULT_TIMEOUT: ClassVar[int] = 30


# -- commands -----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Command(WireObject):
    """Base of every command; ``TAG`` is the ``command`` value."""

    TAG_KEY: ClassVar[str] = "command"
    TAG: ClassVar[str] = ""


@dataclass(frozen=True, kw_only=True)
class Invite(Command):
    """Start the call (``start`` is the configuration guide's name for it)."""

    TAG: ClassVar[str] = "invite"
    option: CallOption


@dataclass(frozen=True, kw_only=True)
class Accept(Command):
    TAG: ClassVar[str] = "accept"
    option: CallOption


@dataclass(frozen=True, kw_only=True)
class Reject(Command):
    TAG: ClassVar[str] = "reject"
    reason: str
    code: Optional[int] = _checked(_sip_code, default=None)


@dataclass(frozen=True, kw_only=True)
class Ringing(Command):
    TAG: ClassVar[str] = "ringing"
    recorder: Optional[RecorderOption] = None
    earlyMedia: Optional[bool] = None
    ringtone: Optional[str] = None


@dataclass(frozen=True, kw_only=True)
class Tts(Command):
    TAG: ClassVar[str] = "tts"
    text: str
    speaker: Optional[str] = None
    playId: Optional[str] = None
    autoHangup: Optional[bool] = None
    streaming: bool = False
    endOfStream: bool = False
    option: Optional[SynthesisOption] = None
    #: milliseconds (the original's docs wrongly say seconds)
    waitInputTimeout: Optional[int] = _checked(_non_negative, default=None)
    base64: bool = False
    cacheKey: Optional[str] = None


@dataclass(frozen=True, kw_only=True)
class Play(Command):
    TAG: ClassVar[str] = "play"
    url: str
    playId: Optional[str] = None
    autoHangup: Optional[bool] = None
    waitInputTimeout: Optional[int] = _checked(_non_negative, default=None)

    @property
    def effective_play_id(self) -> str:
        return self.playId if self.playId is not None else self.url


@dataclass(frozen=True, kw_only=True)
class Interrupt(Command):
    TAG: ClassVar[str] = "interrupt"
    graceful: bool = False
    fadeOutMs: Optional[int] = _checked(_non_negative, default=None)


@dataclass(frozen=True, kw_only=True)
class Pause(Command):
    TAG: ClassVar[str] = "pause"


@dataclass(frozen=True, kw_only=True)
class Resume(Command):
    TAG: ClassVar[str] = "resume"


@dataclass(frozen=True, kw_only=True)
class PauseRecording(Command):
    """✱ Stop recording words (card numbers): the recording goes on as silence until ``resumeRecording``."""

    TAG: ClassVar[str] = "pauseRecording"


@dataclass(frozen=True, kw_only=True)
class ResumeRecording(Command):
    TAG: ClassVar[str] = "resumeRecording"


@dataclass(frozen=True, kw_only=True)
class Hangup(Command):
    TAG: ClassVar[str] = "hangup"
    reason: Optional[str] = None
    initiator: Optional[str] = None
    headers: Optional[dict[str, str]] = None

    @property
    def clean_reason(self) -> str:
        return events.hangup_reason(self.reason, self.initiator)


@dataclass(frozen=True, kw_only=True)
class Refer(Command):
    TAG: ClassVar[str] = "refer"
    caller: str
    callee: str
    options: Optional[ReferOption] = None


@dataclass(frozen=True, kw_only=True)
class Mute(Command):
    TAG: ClassVar[str] = "mute"
    trackId: Optional[str] = None


@dataclass(frozen=True, kw_only=True)
class Unmute(Command):
    TAG: ClassVar[str] = "unmute"
    trackId: Optional[str] = None


@dataclass(frozen=True, kw_only=True)
class History(Command):
    TAG: ClassVar[str] = "history"
    speaker: str
    text: str


@dataclass(frozen=True, kw_only=True)
class SendDtmf(Command):
    """RFC 4733 digits out on the call's RTP leg (documented by the original, never built).

    ``duration`` is each tone's length and ``interval`` the gap between tones, in ms.
    """

    TAG: ClassVar[str] = "sendDtmf"
    digits: str = _checked(_dtmf_digits)
    duration: Optional[int] = _checked(_non_negative, default=None)
    interval: Optional[int] = _checked(_non_negative, default=None)

    DEFAULT_DURATION: ClassVar[int] = 100
    DEFAULT_INTERVAL: ClassVar[int] = 50


@dataclass(frozen=True, kw_only=True)
class AcceptTransfer(Command):
    """Carry out the far end's REFER (the last ``transferRequest``)."""

    TAG: ClassVar[str] = "acceptTransfer"
    headers: Optional[dict[str, str]] = None


@dataclass(frozen=True, kw_only=True)
class RejectTransfer(Command):
    """Refuse the far end's REFER (603 unless ``code`` says otherwise)."""

    TAG: ClassVar[str] = "rejectTransfer"
    code: Optional[int] = _checked(_sip_code, default=None)
    reason: Optional[str] = None


@dataclass(frozen=True, kw_only=True)
class Bridge(Command):
    """Connect this call's audio both ways with the live call ``target`` (its session id)."""

    TAG: ClassVar[str] = "bridge"
    target: str


@dataclass(frozen=True, kw_only=True)
class WarmTransfer(Command):
    """Hold the caller (``moh``), call ``callee``, say ``summary`` to them only, then bridge the two
    (call/warm_transfer.py); ``timeout`` seconds to answer (30)."""

    TAG: ClassVar[str] = "warmTransfer"
    callee: str
    caller: Optional[str] = None
    summary: Optional[str] = None
    moh: Optional[str] = None
    timeout: Optional[int] = _checked(_non_negative, default=None)
    sip: Optional[SipOption] = None


@dataclass(frozen=True, kw_only=True)
class Unbridge(Command):
    """Part this call from the call it is bridged to."""

    TAG: ClassVar[str] = "unbridge"


@dataclass(frozen=True, kw_only=True)
class SendMessage(Command):
    """✱ A SIP MESSAGE (RFC 3428) in the call's dialog: ``body`` as text, ``contentType`` default
    ``text/plain;charset=UTF-8``, extra ``headers``."""

    TAG: ClassVar[str] = "sendMessage"
    body: str
    contentType: Optional[str] = None
    headers: Optional[dict[str, str]] = None

    DEFAULT_CONTENT_TYPE: ClassVar[str] = "text/plain;charset=UTF-8"


#: ``command`` tag -> class
COMMANDS: dict[str, type] = {
    cls.TAG: cls
    for cls in (Invite, Accept, Reject, Ringing, Tts, Play, Interrupt, Pause, Resume, Hangup, Refer,
                Mute, Unmute, History, SendDtmf, PauseRecording, ResumeRecording, SendMessage,
                AcceptTransfer, RejectTransfer, Bridge, Unbridge, WarmTransfer)
}
#: other names accepted for a command
COMMAND_ALIASES = {"start": "invite"}


class CommandError(Exception):
    """A frame that is not a valid command.  ``command`` is its tag when one was readable."""

    def __init__(self, message: str, command: Optional[str] = None):
        self.message = message
        self.command = command
        super().__init__(message)

    def to_event(self, track_id: str, timestamp: int) -> events.Error:
        """The ``error`` event the session sends back (``sender: "command"``, code 400)."""
        return events.Error(trackId=track_id, timestamp=timestamp, sender="command",
                            error=self.message, code=400)


def parse_command(frame: Union[str, bytes]) -> Command:
    """One WebSocket text frame -> a command; raises ``CommandError`` saying what is wrong."""
    size = len(frame.encode("utf-8") if isinstance(frame, str) else frame)
    if size > MAX_COMMAND_BYTES:
        raise CommandError(f"command frame of {size} bytes is larger than the limit of {MAX_COMMAND_BYTES}")
    try:
        value = json.loads(frame)
    except (ValueError, UnicodeDecodeError) as e:
        raise CommandError(f"malformed JSON: {e}") from None
    return command_from_dict(value)


def command_from_dict(value: Any) -> Command:
    """A decoded JSON value -> a command; raises ``CommandError``."""
    if not isinstance(value, dict):
        raise CommandError(f"a command must be a JSON object, got {events._kind(value)}")
    tag = value.get("command")
    if not isinstance(tag, str):
        raise CommandError('missing "command" (a string such as "invite", "tts", "hangup")')
    cls = COMMANDS.get(COMMAND_ALIASES.get(tag, tag))
    if cls is None:
        known = ", ".join(sorted(COMMANDS))
        raise CommandError(f"unknown command {tag!r} (known: {known})", command=tag)
    try:
        return cls.from_dict(value)
    except WireError as e:
        raise CommandError(f"{tag}: field {e.path}: {e.reason}" if e.path else f"{tag}: {e.reason}",
                           command=tag) from None


def decode_command(frame: Union[str, bytes]) -> Union[Command, CommandError]:
    """``parse_command`` as a value: the command, or the error to report."""
    try:
        return parse_command(frame)
    except CommandError as e:
        return e


# -- secrets --------------------------------------------------------------------------------------

REDACTED = "***"
_SECRET_SUFFIXES = (
    "password", "passwd", "secret", "secretkey", "secretid", "apikey", "token", "credential",
    "credentials", "accesskey", "privatekey", "authorization", "cookie",
)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)
_URL_SECRET_PARAM = re.compile(
    r"(?P<key>[?&](?:token|access_token|api_key|apikey|key|secret|password|sig|signature)=)[^&#\s]*",
    re.IGNORECASE,
)


def is_secret_key(name: str) -> bool:
    """True for keys whose values are credentials (``apiKey``, ``secretKey``, ``password``…)."""
    key = re.sub(r"[\s_\-.]", "", str(name)).lower()
    return key in ("pass", "pwd") or key.startswith(("secret", "password")) or key.endswith(_SECRET_SUFFIXES)


def redact(value: Any) -> Any:
    """A JSON value (or wire object) with every credential replaced by ``***``.

    For logs, the dump journal and CDRs: keys that name a secret lose their value,
    and URLs lose embedded ``user:pass@`` and ``?token=``-style parameters.
    """
    if isinstance(value, WireObject):
        value = value.to_dict()
    if isinstance(value, dict):
        return {k: (REDACTED if is_secret_key(k) and v not in (None, "") else redact(v))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str) and "://" in value:
        value = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", value)
        return _URL_SECRET_PARAM.sub(lambda m: f"{m.group('key')}{REDACTED}", value)
    return value
