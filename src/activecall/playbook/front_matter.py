"""The playbook front matter: its sections as frozen dataclasses, and the rules for reading them.

``typed.Loader`` does the walk (``Context`` is its policy here, one per file); what is special to a
playbook lives on the fields (``parse`` hooks, ``required``) and the classes (``__post_load__``).

Both the documented and the original implementation's spellings are accepted (``followup: {timeout, max}``
and ``followUp: {timeout, maxCount}``, ``vad.provider`` and ``vad.type``, camelCase and snake_case keys,
``sip.bye_headers`` and ``sip.hangup_headers``, ...).  Unknown keys: a near-miss of a known key is an
error with a did-you-mean suggestion (a typo silently ignored is a behaviour silently lost); any other
unknown key is a warning, logged and kept in ``Playbook.warnings``, so playbooks may carry their own notes.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from twisted.logger import Logger

from activecall import typed

log = Logger()

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4-turbo"
DEFAULT_FALLBACK = "Sorry, I am having trouble answering right now. Please try again in a moment."
#: ``llm.provider`` values with a meaning of their own; every other value is an OpenAI-compatible server.
ECHO_PROVIDER = "echo"
AUTO_PROVIDER = "auto"

INTERRUPTION_STRATEGIES = ("both", "vad", "asr", "none")
RECORDER_FORMATS = ("wav", "pcm", "pcmu", "pcma", "g722")
DTMF_ACTIONS = ("goto", "transfer", "hangup")
DTMF_DIGITS = frozenset("0123456789*#ABCD")
FEATURES = (
    "intent_clarification",
    "emotion_resonance",
    "voice_emotion",
    "http_tool",
    "context_repair",
    "rolling_summary",
)

ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class PlaybookError(Exception):
    """A playbook that cannot be used, naming the file, the line and the key."""

    def __init__(self, reason: str, source: str = "<playbook>", line: Optional[int] = None, key: Optional[str] = None):
        self.reason = reason
        self.source = source
        self.line = line
        self.key = key
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.source + (f":{self.line}" if self.line else "")
        what = f"key '{self.key}': " if self.key else ""
        return f"{where}: {what}{self.reason}"


# -- the shapes ------------------------------------------------------------------------------------------


def _key(*names: str, default: Any = None, parse: Optional[Callable] = None, required: bool = False, **kw):
    """A field read from the YAML keys ``names`` (the first is the documented spelling)."""
    meta = {"keys": names, "parse": parse, "required": required}
    if "default_factory" in kw:
        return field(default_factory=kw.pop("default_factory"), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def _frozen_map(value: Optional[Mapping] = None) -> Mapping:
    return types.MappingProxyType(dict(value or {}))


@dataclass(frozen=True)
class AsrConfig:
    provider: Optional[str] = _key("provider")
    language: Optional[str] = _key("language")
    app_id: Optional[str] = _key("appId")
    secret_id: Optional[str] = _key("secretId")
    secret_key: Optional[str] = _key("secretKey", "apiKey", repr=False)
    model_type: Optional[str] = _key("modelType", "model")
    buffer_size: Optional[int] = _key("bufferSize")
    samplerate: Optional[int] = _key("samplerate", "sampleRate")
    endpoint: Optional[str] = _key("endpoint")
    extra: Mapping[str, str] = _key("extra", default_factory=_frozen_map)
    start_when_answer: Optional[bool] = _key("startWhenAnswer")


@dataclass(frozen=True)
class TtsConfig:
    provider: Optional[str] = _key("provider")
    samplerate: int = _key("samplerate", "sampleRate", default=16000)
    speed: float = _key("speed", default=1.0)
    volume: int = _key("volume", default=5)
    speaker: Optional[str] = _key("speaker", "voice")
    model: Optional[str] = _key("model")
    language: Optional[str] = _key("language")
    emotion: Optional[str] = _key("emotion")
    codec: str = _key("codec", default="pcm")
    subtitle: Optional[bool] = _key("subtitle")
    app_id: Optional[str] = _key("appId")
    secret_id: Optional[str] = _key("secretId")
    secret_key: Optional[str] = _key("secretKey", "apiKey", repr=False)
    endpoint: Optional[str] = _key("endpoint")
    extra: Mapping[str, str] = _key("extra", default_factory=_frozen_map)
    max_concurrent_tasks: Optional[int] = _key("maxConcurrentTasks")
    session_id: Optional[str] = _key("sessionId")


@dataclass(frozen=True)
class VadConfig:
    """``type`` is the original's selector; the docs write ``provider``: both are read."""

    type: str = _key("type", "provider", default="silero")
    samplerate: Optional[int] = _key("samplerate", "sampleRate")
    speech_padding: int = _key("speechPadding", default=250)
    silence_padding: int = _key("silencePadding", default=100)
    ratio: float = _key("ratio", default=0.5)
    voice_threshold: float = _key("voiceThreshold", default=0.5)
    max_buffer_duration_secs: int = _key("maxBufferDurationSecs", default=50)
    silence_timeout: Optional[int] = _key("silenceTimeout")
    endpoint: Optional[str] = _key("endpoint")
    secret_key: Optional[str] = _key("secretKey", "apiKey", repr=False)
    secret_id: Optional[str] = _key("secretId")


@dataclass(frozen=True)
class AmbianceConfig:
    path: Optional[str] = _key("path")
    duck_level: float = _key("duckLevel", default=0.1)
    normal_level: float = _key("normalLevel", default=0.3)
    transition_speed: float = _key("transitionSpeed", default=0.01)
    enabled: bool = _key("enabled", default=True)


def _recorder_format(value, path, ctx):
    value = ctx.convert(str, value, path).lower()
    if value not in RECORDER_FORMATS:
        raise ctx.error(path, f"must be one of {', '.join(RECORDER_FORMATS)}, not {value!r}")
    return value


@dataclass(frozen=True)
class RecorderConfig:
    recorder_file: Optional[str] = _key("recorderFile", "path", "file")
    samplerate: int = _key("samplerate", "sampleRate", default=16000)
    ptime: int = _key("ptime", default=200)
    format: Optional[str] = _key("format", parse=_recorder_format)


@dataclass(frozen=True)
class EouConfig:
    type: Optional[str] = _key("type", "provider")
    endpoint: Optional[str] = _key("endpoint")
    secret_key: Optional[str] = _key("secretKey", "apiKey", repr=False)
    secret_id: Optional[str] = _key("secretId")
    timeout: Optional[int] = _key("timeout")
    extra: Mapping[str, str] = _key("extra", default_factory=_frozen_map)
    threshold: Optional[float] = _key("threshold")
    pause_ms: Optional[int] = _key("pauseMs")
    early_look: Optional[bool] = _key("earlyLook")
    early_threshold: Optional[float] = _key("earlyThreshold")


@dataclass(frozen=True)
class RealtimeConfig:
    """``voice`` (documented) lands in ``extra['voice']``, where the original reads it."""

    provider: str = _key("provider", default="openai")
    model: Optional[str] = _key("model")
    secret_key: Optional[str] = _key("secretKey", "apiKey", repr=False)
    secret_id: Optional[str] = _key("secretId")
    endpoint: Optional[str] = _key("endpoint")
    turn_detection: Any = _key("turnDetection")
    tools: Any = _key("tools")
    extra: Mapping[str, str] = _key("extra", default_factory=_frozen_map)
    voice: Optional[str] = _key("voice")

    @classmethod
    def __post_load__(cls, values: dict, path: str, ctx) -> dict:
        if values.get("voice") and "voice" not in values.get("extra", {}):
            values["extra"] = _frozen_map({**values.get("extra", {}), "voice": values["voice"]})
        return values


def _features(value, path, ctx):
    names = ctx.convert(tuple[str, ...], value, path)
    for name in names:
        if name not in FEATURES:
            ctx.unknown_value(path, name, FEATURES)
    return names


@dataclass(frozen=True)
class LlmConfig:
    """The dialogue model.  ``provider: echo`` is the built-in no-LLM diagnostics mode (says back what it
    heard); ``provider: auto`` is echo unless an endpoint is configured (playbook or environment)."""

    provider: str = _key("provider", default="openai")
    model: Optional[str] = _key("model")
    base_url: Optional[str] = _key("baseUrl", "endpoint")
    api_key: Optional[str] = _key("apiKey", repr=False)
    prompt: Optional[str] = _key("prompt")
    greeting: Optional[str] = _key("greeting")
    language: str = _key("language", default="zh")
    features: tuple[str, ...] = _key("features", default=(), parse=_features)
    repair_window_ms: int = _key("repairWindowMs", default=3000)
    summary_limit: int = _key("summaryLimit", default=20)
    tool_instructions: Optional[str] = _key("toolInstructions")
    temperature: Optional[float] = _key("temperature")
    max_tokens: Optional[int] = _key("maxTokens")
    fallback: str = _key("fallback", "errorMessage", default=DEFAULT_FALLBACK)
    connect_timeout_ms: int = _key("connectTimeoutMs", default=10000)
    idle_timeout_ms: int = _key("idleTimeoutMs", "timeoutMs", default=30000)
    #: start the reply on a partial transcript that stopped changing, before the end of turn (docs/playbooks.md)
    preemptive: bool = _key("preemptive", default=True)
    preemptive_stable_ms: int = _key("preemptiveStableMs", default=150)
    #: ✱ a preemptive reply's first sentence is synthesised too (held, never played, until the turn is confirmed)
    preemptive_tts: bool = _key("preemptiveTts", default=True)

    @property
    def effective_provider(self) -> str:
        """``echo`` or ``openai`` (any OpenAI-compatible server), with ``auto`` resolved."""
        if self.provider == ECHO_PROVIDER:
            return ECHO_PROVIDER
        if self.provider == AUTO_PROVIDER:
            configured = self.api_key or self.base_url not in (None, DEFAULT_BASE_URL)
            return "openai" if configured else ECHO_PROVIDER
        return "openai"


def _strategy(value, path, ctx):
    value = ctx.convert(str, value, path).lower()
    if value not in INTERRUPTION_STRATEGIES:
        raise ctx.error(path, f"must be one of {', '.join(INTERRUPTION_STRATEGIES)}, not {value!r}")
    return value


@dataclass(frozen=True)
class InterruptionConfig:
    """Barge-in.  ``strategy`` defaults to ``both`` (the original requires it inside the block)."""

    strategy: str = _key("strategy", default="both", parse=_strategy)
    #: voice this long over the bot pauses it (call/barge_in.py; the original read but never used it)
    min_speech_ms: Optional[int] = _key("minSpeechMs")
    filler_word_filter: bool = _key("fillerWordFilter", default=False)
    volume_fade_ms: Optional[int] = _key("volumeFadeMs")
    ignore_first_ms: int = _key("ignoreFirstMs", default=800)
    # ✱ pause, then decide (docs/playbooks.md, "Interruption")
    pause_on_voice: bool = _key("pauseOnVoice", default=True)
    false_interruption_ms: Optional[int] = _key("falseInterruptionMs", "resumeAfterMs")
    min_words: int = _key("minWords", default=1)
    backchannel: bool = _key("backchannel", default=False)
    echo_cancel: bool = _key("echoCancel", default=True)

    def policy(self):
        """The call layer's ``InterruptionPolicy`` for these settings."""
        from activecall.call.barge_in import InterruptionPolicy

        values = {"strategy": self.strategy, "pause_on_voice": self.pause_on_voice,
                  "filler_word_filter": self.filler_word_filter, "ignore_first_ms": self.ignore_first_ms,
                  "min_words": self.min_words, "backchannel": self.backchannel, "echo_cancel": self.echo_cancel}
        for name in ("min_speech_ms", "volume_fade_ms", "false_interruption_ms"):
            if getattr(self, name) is not None:
                values[name] = max(0, int(getattr(self, name)))
        return InterruptionPolicy(**values)


@dataclass(frozen=True)
class WaitFillerConfig:
    """✱ Something short to say when the reply is slow to come (docs/playbooks.md, "Wait filler")."""

    after_ms: int = _key("afterMs", default=700)
    phrases: tuple[str, ...] = _key("phrases", default=("One moment.",))
    enabled: bool = _key("enabled", default=True)


@dataclass(frozen=True)
class FollowUpConfig:
    """Speak again after ``timeout`` ms of silence, at most ``max_count`` times, then hang up."""

    timeout: int = _key("timeout", required=True)
    max_count: int = _key("maxCount", "max", required=True)


@dataclass(frozen=True)
class DtmfAction:
    digit: str
    action: str
    scene: Optional[str] = None
    target: Optional[str] = None


def _pattern(value, path, ctx):
    value = ctx.convert(str, value, path)
    try:
        re.compile(value)
    except re.error as e:
        raise ctx.error(path, f"invalid regular expression: {e}") from None
    return value


@dataclass(frozen=True)
class ValidationConfig:
    pattern: str = _key("pattern", "regex", required=True, parse=_pattern)
    error_message: str = _key("errorMessage", default="Input format is incorrect")


def _finish_key(value, path, ctx):
    value = ctx.convert(str, value, path)
    if value not in ("#", "*"):
        raise ctx.error(path, f"must be '#' or '*', not {value!r}")
    return value


@dataclass(frozen=True)
class CollectorConfig:
    """A DTMF digit collector started by ``<collect type=…/>``; timeouts are in seconds."""

    description: str = _key("description", default="")
    digits: Optional[int] = _key("digits")
    min_digits: Optional[int] = _key("minDigits")
    max_digits: Optional[int] = _key("maxDigits")
    finish_key: Optional[str] = _key("finishKey", parse=_finish_key)
    timeout: float = _key("timeout", default=15)
    inter_digit_timeout: float = _key("interDigitTimeout", default=5)
    validation: Optional[ValidationConfig] = _key("validation")
    retry_times: int = _key("retryTimes", "retries", default=3)
    interruptible: bool = _key("interruptible", default=False)

    @classmethod
    def __post_load__(cls, values: dict, path: str, ctx) -> dict:
        low, high = values.get("min_digits"), values.get("max_digits")
        if low and high and low > high:
            raise ctx.error(path, "minDigits is greater than maxDigits")
        return values

    @property
    def minimum(self) -> int:
        return self.digits if self.digits is not None else (self.min_digits or 0)

    @property
    def maximum(self) -> Optional[int]:
        return self.digits if self.digits is not None else self.max_digits


@dataclass(frozen=True)
class PosthookConfig:
    url: str = _key("url", required=True)
    summary: Optional[str] = _key("summary")
    method: str = _key("method", default="POST")
    headers: Mapping[str, str] = _key("headers", default_factory=_frozen_map)
    include_history: bool = _key("includeHistory", default=True)


def _header_list(value, path, ctx):
    """``extract_headers``: names, or the documented ``{name, pattern}`` entries."""
    if not isinstance(value, list):
        raise ctx.error(path, "must be a list of header names")
    names, patterns = [], {}
    for i, item in enumerate(value):
        where = f"{path}[{i}]"
        if isinstance(item, dict):
            if "name" not in item:
                raise ctx.error(where, "needs a 'name'")
            name = ctx.convert(str, item["name"], where + ".name")
            if item.get("pattern") is not None:
                patterns[name] = _pattern(item["pattern"], where + ".pattern", ctx)
            unknown = set(item) - {"name", "pattern"}
            if unknown:
                ctx.warn(where, f"ignoring {', '.join(sorted(map(str, unknown)))}")
        else:
            name = ctx.convert(str, item, where)
        names.append(name)
    return tuple(names), patterns


def _header_map(value, path, ctx):
    """``hangup_headers`` as a map, or the documented ``bye_headers: [{name, value}]`` list."""
    if isinstance(value, list):
        out = {}
        for i, item in enumerate(value):
            where = f"{path}[{i}]"
            if not isinstance(item, dict) or "name" not in item:
                raise ctx.error(where, "must be {name, value}")
            out[ctx.convert(str, item["name"], where + ".name")] = ctx.convert(str, item.get("value", ""), where)
        return _frozen_map(out)
    return ctx.convert(Mapping[str, str], value, path)


@dataclass(frozen=True)
class AmdConfig:
    """``amd``: answering-machine detection on outbound calls (call/amd.py has the timers' meaning).

    ``voicemail``: what to say after the beep when a machine answers (then hang up); without it a
    machine (or a fax) is hung up on with reason ``answerMachine``."""

    voicemail: Optional[str] = _key("voicemail")
    initialSilence: Optional[int] = _key("initialSilence")
    greeting: Optional[int] = _key("greeting")
    afterGreetingSilence: Optional[int] = _key("afterGreetingSilence")
    totalAnalysisTime: Optional[int] = _key("totalAnalysisTime")
    maximumWords: Optional[int] = _key("maximumWords")
    silenceThreshold: Optional[int] = _key("silenceThreshold")
    beepTimeout: Optional[int] = _key("beepTimeout")

    def timers(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "voicemail" and getattr(self, f.name) is not None}


@dataclass(frozen=True)
class SipConfig:
    """snake_case inside, as in the original; camelCase is accepted too."""

    username: Optional[str] = _key("username")
    password: Optional[str] = _key("password", repr=False)
    realm: Optional[str] = _key("realm")
    contact: Optional[str] = _key("contact")
    headers: Mapping[str, str] = _key("headers", default_factory=_frozen_map)
    hangup_headers: Mapping[str, str] = _key("hangup_headers", "bye_headers", default_factory=_frozen_map, parse=_header_map)
    extract_headers: Optional[tuple[str, ...]] = _key("extract_headers", parse=_header_list)
    #: header name -> regex the value must match (documented ``{name, pattern}`` form).
    extract_patterns: Mapping[str, str] = field(default_factory=_frozen_map)
    #: what the playbook answers a REFER from the far end (``transferRequest``): accept or refuse; unset:
    #: the WebSocket client decides when there is one, else refuse
    transfer_requests: Optional[str] = _key("transfer_requests", "transferRequests", default=None,
                                  parse=lambda v, path, ctx: _transfer_policy(v, path, ctx))

    @classmethod
    def __post_load__(cls, values: dict, path: str, ctx) -> dict:
        """``extract_headers`` was read as (names, patterns): the patterns have a field of their own."""
        if "extract_headers" in values:
            values["extract_headers"], patterns = values["extract_headers"]
            values["extract_patterns"] = _frozen_map(patterns)
        return values


def _transfer_policy(value, path, ctx):
    value = ctx.convert(str, value, path).lower()
    if value not in ("accept", "refuse"):
        raise ctx.error(path, f"must be accept or refuse, not {value!r}")
    return value


def _dtmf_map(value, path, ctx):
    if not isinstance(value, dict):
        raise ctx.error(path, "must map digits to actions")
    out = {}
    for digit, spec in value.items():
        digit = str(digit)
        where = f"{path}.{digit}"
        if not isinstance(spec, dict):
            raise ctx.error(where, "must be {action: goto|transfer|hangup, ...}")
        out[digit] = dtmf_action(digit, {str(k): v for k, v in spec.items()}, where, ctx)
    return _frozen_map(out)


def dtmf_action(digit: str, attrs: Mapping[str, Any], where: str, ctx) -> DtmfAction:
    if digit not in DTMF_DIGITS:
        raise ctx.error(where, f"{digit!r} is not a DTMF digit (0-9, *, #, A-D)")
    action = str(attrs.get("action", "")).lower()
    if action not in DTMF_ACTIONS:
        raise ctx.error(where, f"action must be one of {', '.join(DTMF_ACTIONS)}, not {attrs.get('action')!r}")
    scene = attrs.get("scene")
    target = attrs.get("target")
    if action == "goto" and not scene:
        raise ctx.error(where, "action 'goto' needs a 'scene'")
    if action == "transfer" and not target:
        raise ctx.error(where, "action 'transfer' needs a 'target'")
    unknown = set(attrs) - {"action", "scene", "target", "digit"}
    if unknown:
        ctx.warn(where, f"ignoring {', '.join(sorted(unknown))}")
    return DtmfAction(digit, action, str(scene) if scene else None, str(target) if target else None)


def _collectors(value, path, ctx):
    if not isinstance(value, dict):
        raise ctx.error(path, "must map collector names to collectors")
    out = {}
    for name, spec in value.items():
        where = f"{path}.{name}"
        out[str(name)] = ctx.load(CollectorConfig, spec, where)
    return _frozen_map(out)


@dataclass(frozen=True)
class FrontMatter:
    #: the call's language (``en``, ``zh``, ``zh-CN``...): picks the recogniser and voice when asr/tts name none
    language: Optional[str] = _key("language")
    asr: Optional[AsrConfig] = _key("asr")
    tts: Optional[TtsConfig] = _key("tts")
    llm: Optional[LlmConfig] = _key("llm")
    vad: Optional[VadConfig] = _key("vad")
    denoise: Optional[bool] = _key("denoise")
    ambiance: Optional[AmbianceConfig] = _key("ambiance")
    recorder: Optional[RecorderConfig] = _key("recorder")
    extra: Mapping[str, str] = _key("extra", default_factory=_frozen_map)
    eou: Optional[EouConfig] = _key("eou")
    greeting: Optional[str] = _key("greeting")
    interruption: InterruptionConfig = _key("interruption", default_factory=InterruptionConfig)
    wait_filler: Optional[WaitFillerConfig] = _key("waitFiller")
    dtmf: Mapping[str, DtmfAction] = _key("dtmf", default_factory=_frozen_map, parse=_dtmf_map)
    dtmf_collectors: Mapping[str, CollectorConfig] = _key("dtmfCollectors", default_factory=_frozen_map, parse=_collectors)
    realtime: Optional[RealtimeConfig] = _key("realtime")
    posthook: Optional[PosthookConfig] = _key("posthook")
    follow_up: Optional[FollowUpConfig] = _key("followUp", "followup")
    sip: SipConfig = _key("sip", default_factory=SipConfig)
    amd: Optional[AmdConfig] = _key("amd")



# -- reading it: typed.Loader with the playbook's policy -------------------------------------------------


def _yaml_keys(cls, f: dataclasses.Field) -> tuple:
    """The YAML spellings a field declares (``_key``); a field without is no key."""
    return f.metadata.get("keys", ())


def _describe(value) -> str:
    return type(value).__name__ if value is not None else "nothing"


def _string(value):
    """YAML reads ``speaker: 101`` as a number: a string key takes numbers as written."""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    return typed.NO


class Context(typed.Loader):
    """One file's reading: its name, the line of each YAML key path, the warnings so far.

    Keys are the declared spellings plus their camelCase and snake_case; a key given twice under two
    spellings is an error; an unknown key is a warning unless it is a near miss of a known one; ``null``
    where a section is expected is an empty section; mappings are frozen, their ``null`` values ``""``.
    """

    def __init__(self, source: str, lines: Mapping[str, int]):
        super().__init__(
            unknown="warn", suggest_cutoff=0.75, fold_case=True,
            keys=_yaml_keys, case_aliases=True, duplicates="error", none_as_empty=True,
            scalars={str: _string}, mapping=_frozen_map, mapping_key=str, mapping_null="",
        )
        self.source = source
        self.lines = lines
        self.warnings: list[str] = []

    def line_of(self, path: str) -> Optional[int]:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", path) if ("." in path or "[" in path) else ""
        return None

    def error(self, path: str, reason: str) -> PlaybookError:
        return PlaybookError(reason, self.source, self.line_of(path), path or None)

    def warn(self, path: str, reason: str) -> None:
        line = self.line_of(path)
        text = f"{self.source}{':' + str(line) if line else ''}: key '{path}': {reason}"
        self.warnings.append(text)
        log.warn("playbook: {problem}", problem=text)

    def unknown_value(self, path: str, value: str, known) -> None:
        close = difflib.get_close_matches(value, known, n=1, cutoff=0.75)
        if close:
            raise self.error(path, f"unknown value {value!r}; did you mean '{close[0]}'?")
        self.warn(path, f"unknown value {value!r}, ignored")

    def mismatch(self, hint, value, path: str) -> str:
        unset = isinstance(value, str) and ENV_REF.search(value)
        hint_env = f" (is the environment variable {unset.group(1)} unset?)" if unset else ""
        if hint is str:
            return f"must be a string, not {_describe(value)}"
        if hint is bool:
            return f"must be true or false, not {value!r}{hint_env}"
        if hint is int:
            return f"must be an integer, not {value!r}{hint_env}"
        if hint is float:
            return f"must be a number, not {value!r}{hint_env}"
        if typing.get_origin(hint) is tuple:
            return f"must be a list, not {_describe(value)}"
        return f"must be a mapping, not {_describe(value)}"


def apply_llm_defaults(config: FrontMatter, environ: Mapping[str, str]) -> FrontMatter:
    """Environment fallbacks for the LLM endpoint, and ``llm.apiKey`` as the providers' missing secretKey."""
    llm = config.llm
    if llm is None:
        return config
    llm = dataclasses.replace(
        llm,
        api_key=llm.api_key or environ.get("OPENAI_API_KEY") or None,
        base_url=llm.base_url or environ.get("OPENAI_BASE_URL") or None,
        model=llm.model or environ.get("OPENAI_MODEL") or None,
    )
    if llm.base_url is None:
        llm = dataclasses.replace(llm, base_url=DEFAULT_BASE_URL)
    if llm.model is None:
        llm = dataclasses.replace(llm, model=DEFAULT_MODEL)
    changes: dict[str, Any] = {"llm": llm}
    if llm.api_key:
        for name in ("asr", "tts", "realtime", "eou"):
            section = getattr(config, name)
            if section is not None and not section.secret_key:
                changes[name] = dataclasses.replace(section, secret_key=llm.api_key)
    return dataclasses.replace(config, **changes)

