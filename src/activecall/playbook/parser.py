"""Playbook files: YAML front matter + Markdown ``# Scene:`` sections -> frozen dataclasses.

A playbook is parsed once, before a call needs it, so every mistake a user can make in it is found here
and reported as one ``PlaybookError`` naming the file, the line and the key.  Runtime ``{{ var }}``
templates are left in place (``activecall.playbook.templates`` renders them per call); only ``${VAR}``
environment references in the front matter are expanded here.

Both the documented and the original implementation's spellings are accepted (``followup: {timeout, max}``
and ``followUp: {timeout, maxCount}``, ``vad.provider`` and ``vad.type``, camelCase and snake_case keys,
``sip.bye_headers`` and ``sip.hangup_headers``, ...).  Unknown keys: a near-miss of a known key is an
error with a did-you-mean suggestion (a typo silently ignored is a behaviour silently lost); any other
unknown key is a warning, logged and kept in ``Playbook.warnings``, so playbooks may carry their own notes.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import yaml
from twisted.logger import Logger

log = Logger()

DEFAULT_SCENE = "default"
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

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SCENE_HEADER = re.compile(r"^#\s*Scene:\s*(.*?)\s*$")
_SCENE_TAG = re.compile(r"<\s*(dtmf|play|followup)\b((?:[^>\"']|\"[^\"]*\"|'[^']*')*?)/?\s*>", re.IGNORECASE)
_ATTRIBUTE = re.compile(r"([A-Za-z_][\w-]*)\s*=\s*(?:\"([^\"]*)\"|'([^']*)')")


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
    value = _convert(str, value, path, ctx).lower()
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


def _features(value, path, ctx):
    names = _convert(tuple[str, ...], value, path, ctx)
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
    value = _convert(str, value, path, ctx).lower()
    if value not in INTERRUPTION_STRATEGIES:
        raise ctx.error(path, f"must be one of {', '.join(INTERRUPTION_STRATEGIES)}, not {value!r}")
    return value


@dataclass(frozen=True)
class InterruptionConfig:
    """Barge-in.  ``strategy`` defaults to ``both`` (the original requires it inside the block)."""

    strategy: str = _key("strategy", default="both", parse=_strategy)
    min_speech_ms: Optional[int] = _key("minSpeechMs")
    filler_word_filter: bool = _key("fillerWordFilter", default=False)
    volume_fade_ms: Optional[int] = _key("volumeFadeMs")
    ignore_first_ms: int = _key("ignoreFirstMs", default=800)


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
    value = _convert(str, value, path, ctx)
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
    value = _convert(str, value, path, ctx)
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
            name = _convert(str, item["name"], where + ".name", ctx)
            if item.get("pattern") is not None:
                patterns[name] = _pattern(item["pattern"], where + ".pattern", ctx)
            unknown = set(item) - {"name", "pattern"}
            if unknown:
                ctx.warn(where, f"ignoring {', '.join(sorted(map(str, unknown)))}")
        else:
            name = _convert(str, item, where, ctx)
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
            out[_convert(str, item["name"], where + ".name", ctx)] = _convert(str, item.get("value", ""), where, ctx)
        return _frozen_map(out)
    return _convert(Mapping[str, str], value, path, ctx)


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


def _dtmf_map(value, path, ctx):
    if not isinstance(value, dict):
        raise ctx.error(path, "must map digits to actions")
    out = {}
    for digit, spec in value.items():
        digit = str(digit)
        where = f"{path}.{digit}"
        if not isinstance(spec, dict):
            raise ctx.error(where, "must be {action: goto|transfer|hangup, ...}")
        out[digit] = _dtmf_action(digit, {str(k): v for k, v in spec.items()}, where, ctx)
    return _frozen_map(out)


def _dtmf_action(digit: str, attrs: Mapping[str, Any], where: str, ctx) -> DtmfAction:
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
        collector = _build(CollectorConfig, spec, where, ctx)
        if collector.min_digits and collector.max_digits and collector.min_digits > collector.max_digits:
            raise ctx.error(where, "minDigits is greater than maxDigits")
        out[str(name)] = collector
    return _frozen_map(out)


@dataclass(frozen=True)
class FrontMatter:
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
    dtmf: Mapping[str, DtmfAction] = _key("dtmf", default_factory=_frozen_map, parse=_dtmf_map)
    dtmf_collectors: Mapping[str, CollectorConfig] = _key("dtmfCollectors", default_factory=_frozen_map, parse=_collectors)
    realtime: Optional[RealtimeConfig] = _key("realtime")
    posthook: Optional[PosthookConfig] = _key("posthook")
    follow_up: Optional[FollowUpConfig] = _key("followUp", "followup")
    sip: SipConfig = _key("sip", default_factory=SipConfig)


@dataclass(frozen=True)
class Scene:
    """One ``# Scene:`` section.  ``prompt`` is the preamble plus the scene text, tags removed, templates raw."""

    id: str
    prompt: str
    line: int
    dtmf: Mapping[str, DtmfAction] = field(default_factory=_frozen_map)
    play: Optional[str] = None
    followup: Optional[FollowUpConfig] = None


@dataclass(frozen=True)
class Playbook:
    source: str
    config: FrontMatter
    preamble: str
    scenes: Mapping[str, Scene]
    initial_scene: str
    warnings: tuple[str, ...] = ()

    @property
    def greeting(self) -> Optional[str]:
        """The static opener: top-level ``greeting`` wins over ``llm.greeting``."""
        if self.config.greeting is not None:
            return self.config.greeting
        return self.config.llm.greeting if self.config.llm else None

    @property
    def initial(self) -> Scene:
        return self.scenes[self.initial_scene]

    def dtmf_action(self, scene_id: str, digit: str) -> Optional[DtmfAction]:
        """The scene's action for ``digit`` first, then the global one."""
        scene = self.scenes.get(scene_id)
        if scene is not None and digit in scene.dtmf:
            return scene.dtmf[digit]
        return self.config.dtmf.get(digit)

    def followup_for(self, scene_id: str) -> Optional[FollowUpConfig]:
        """The scene's ``<followup>`` first, then the front matter's ``followUp``."""
        scene = self.scenes.get(scene_id)
        if scene is not None and scene.followup is not None:
            return scene.followup
        return self.config.follow_up


# -- the generic loader --------------------------------------------------------------------------------


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


_SPECS: dict[type, dict[str, dataclasses.Field]] = {}


def _spec(cls) -> dict[str, dataclasses.Field]:
    """Every accepted spelling of every key of ``cls`` -> its field."""
    if cls not in _SPECS:
        spec = {}
        for f in dataclasses.fields(cls):
            for name in f.metadata.get("keys", ()):
                for spelling in (name, _snake(name), _camel(name)):
                    spec.setdefault(spelling, f)
        _SPECS[cls] = spec
    return _SPECS[cls]


def _declared(cls) -> list[str]:
    """The key names as written in the field declarations, documented spelling first."""
    return [name for f in dataclasses.fields(cls) for name in f.metadata.get("keys", ())]


class _Context:
    """Where we are: the file name, the line of each YAML key path, the warnings so far."""

    def __init__(self, source: str, lines: Mapping[str, int]):
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

    def unknown(self, parent: str, key: str, known) -> None:
        path = f"{parent}.{key}" if parent else key
        by_lower: dict[str, str] = {}
        for name in known:  # documented spellings come first and win
            by_lower.setdefault(name.lower(), name)
        close = difflib.get_close_matches(key.lower(), by_lower, n=1, cutoff=0.75)
        if close:
            suggestion = by_lower[close[0]]
            raise self.error(path, f"unknown key; did you mean '{suggestion}'?")
        self.warn(path, "unknown key, ignored")

    def unknown_value(self, path: str, value: str, known) -> None:
        close = difflib.get_close_matches(value, known, n=1, cutoff=0.75)
        if close:
            raise self.error(path, f"unknown value {value!r}; did you mean '{close[0]}'?")
        self.warn(path, f"unknown value {value!r}, ignored")


def _describe(value) -> str:
    return type(value).__name__ if value is not None else "nothing"


def _convert(hint, value, path: str, ctx: _Context):
    """``value`` as the type ``hint`` says, or a PlaybookError naming the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None:
            return None
        return _convert(inner[0], value, path, ctx)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path, ctx)
    unset = isinstance(value, str) and _ENV_REF.search(value)
    hint_env = f" (is the environment variable {unset.group(1)} unset?)" if unset else ""
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ctx.error(path, f"must be a string, not {_describe(value)}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ctx.error(path, f"must be true or false, not {value!r}{hint_env}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ctx.error(path, f"must be an integer, not {value!r}{hint_env}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ctx.error(path, f"must be a number, not {value!r}{hint_env}")
    if origin is tuple:
        if not isinstance(value, list):
            raise ctx.error(path, f"must be a list, not {_describe(value)}")
        return tuple(_convert(args[0], item, f"{path}[{i}]", ctx) for i, item in enumerate(value))
    if origin in (collections.abc.Mapping, dict):
        if not isinstance(value, dict):
            raise ctx.error(path, f"must be a mapping, not {_describe(value)}")
        return _frozen_map(
            {str(k): ("" if v is None else _convert(args[1], v, f"{path}.{k}", ctx)) for k, v in value.items()}
        )
    raise TypeError(f"no conversion for {hint!r}")  # a programming error in this module


def _build(cls, value, path: str, ctx: _Context):
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ctx.error(path, f"must be a mapping, not {_describe(value)}")
    hints = typing.get_type_hints(cls)
    spec = _spec(cls)
    kwargs: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for key, item in value.items():
        key = str(key)
        where = f"{path}.{key}" if path else key
        f = spec.get(key)
        if f is None:
            ctx.unknown(path, key, _declared(cls) + list(spec))
            continue
        if f.name in given_as:
            raise ctx.error(where, f"given twice (also as '{given_as[f.name]}')")
        given_as[f.name] = key
        parse = f.metadata.get("parse")
        kwargs[f.name] = parse(item, where, ctx) if parse else _convert(hints[f.name], item, where, ctx)
    for f in dataclasses.fields(cls):
        if f.metadata.get("required") and f.name not in kwargs:
            name = f.metadata["keys"][0]
            raise ctx.error(f"{path}.{name}" if path else name, "is required")
    return _finish(cls, kwargs)


def _finish(cls, kwargs: dict):
    """Per-section fix-ups after the keys are read."""
    if cls is SipConfig and "extract_headers" in kwargs:
        kwargs["extract_headers"], patterns = kwargs["extract_headers"]
        kwargs["extract_patterns"] = _frozen_map(patterns)
    if cls is RealtimeConfig and kwargs.get("voice") and "voice" not in kwargs.get("extra", {}):
        kwargs["extra"] = _frozen_map({**kwargs.get("extra", {}), "voice": kwargs["voice"]})
    return cls(**kwargs)


# -- front matter, environment, lines ------------------------------------------------------------------


def expand_env(text: str, environ: Mapping[str, str]) -> str:
    """Replace ``${NAME}`` with the environment's value; an unset name is left as written."""
    return _ENV_REF.sub(lambda m: environ.get(m.group(1), m.group(0)), text)


def _key_lines(node, first_line: int, prefix: str = "", out: Optional[dict] = None) -> dict[str, int]:
    """Each key path of the composed YAML -> its 1-based line in the file."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = str(key_node.value)
            path = f"{prefix}.{key}" if prefix else key
            out[path] = key_node.start_mark.line + first_line
            _key_lines(value_node, first_line, path, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            path = f"{prefix}[{i}]"
            out[path] = item.start_mark.line + first_line
            _key_lines(item, first_line, path, out)
    return out


def split_front_matter(text: str, source: str = "<playbook>") -> tuple[str, str, int]:
    """(YAML text, body, line number of the body's first line).  The file must open with ``---``."""
    lines = text.lstrip("\ufeff").split("\n")
    if not lines or lines[0].strip() != "---":
        raise PlaybookError("a playbook must start with a '---' line (YAML front matter)", source, 1)
    for i in range(1, len(lines)):
        if lines[i].rstrip() in ("---", "..."):
            return "\n".join(lines[1:i]), "\n".join(lines[i + 1 :]), i + 2
    raise PlaybookError("the front matter is not closed by a '---' line", source, 1)


# -- scenes --------------------------------------------------------------------------------------------


def parse_attributes(text: str) -> dict[str, str]:
    """``a="1" b='2'`` -> {'a': '1', 'b': '2'}, in any order, either quote."""
    return {m.group(1): m.group(2) if m.group(2) is not None else m.group(3) for m in _ATTRIBUTE.finditer(text)}


@dataclass
class _SceneTags:
    dtmf: dict[str, DtmfAction] = field(default_factory=dict)
    play: Optional[str] = None
    followup: Optional[FollowUpConfig] = None


def _extract_scene_tags(text: str, first_line: int, scene: str, ctx: _Context) -> tuple[str, _SceneTags]:
    """Remove ``<dtmf>``, ``<play>`` and ``<followup>`` from a scene's text and read them."""
    tags = _SceneTags()

    def take(m: re.Match) -> str:
        line = first_line + text.count("\n", 0, m.start())
        name, attrs = m.group(1).lower(), parse_attributes(m.group(2))
        where = f"scene '{scene}' <{name}>"
        try:
            if name == "dtmf":
                if "digit" not in attrs:
                    raise ValueError("needs a 'digit'")
                tags.dtmf[attrs["digit"]] = _dtmf_action(attrs["digit"], attrs, where, ctx)
            elif name == "play":
                if not attrs.get("file"):
                    raise ValueError("needs a 'file'")
                if tags.play is None:
                    tags.play = attrs["file"]
                else:
                    ctx.warn(where, "only the first <play> of a scene is played")
            else:
                maximum = attrs.get("max", attrs.get("maxCount"))
                if "timeout" not in attrs or maximum is None:
                    raise ValueError("needs 'timeout' (ms) and 'max'")
                tags.followup = FollowUpConfig(int(attrs["timeout"]), int(maximum))
        except PlaybookError as e:
            raise PlaybookError(e.reason, ctx.source, line, where) from None
        except ValueError as e:
            reason = str(e) if "needs" in str(e) else f"timeout and max must be integers ({e})"
            raise PlaybookError(reason, ctx.source, line, where) from None
        return ""

    stripped = _SCENE_TAG.sub(take, text)
    return _tidy(stripped), tags


def _tidy(text: str) -> str:
    """Trim, and drop the blank lines a removed tag leaves behind."""
    return re.sub(r"\n[ \t]*\n(?:[ \t]*\n)+", "\n\n", text).strip()


def _split_scenes(body: str, body_line: int) -> tuple[tuple[str, int], list[tuple[str, int, str, int]]]:
    """(preamble, its line), [(scene id, header line, text, text's first line)]."""
    preamble: list[str] = []
    scenes: list[tuple[str, int, list[str]]] = []
    for offset, line in enumerate(body.split("\n")):
        m = _SCENE_HEADER.match(line)
        if m:
            scenes.append((m.group(1), body_line + offset, []))
        elif scenes:
            scenes[-1][2].append(line)
        else:
            preamble.append(line)
    return ("\n".join(preamble), body_line), [(sid, ln, "\n".join(text), ln + 1) for sid, ln, text in scenes]


# -- entry points ----------------------------------------------------------------------------------------


def parse_playbook(text: str, source: str = "<playbook>", environ: Optional[Mapping[str, str]] = None) -> Playbook:
    """Parse playbook ``text``; ``source`` names it in errors, ``environ`` (default os.environ) feeds ``${VAR}``."""
    environ = os.environ if environ is None else environ
    yaml_text, body, body_line = split_front_matter(text, source)
    expanded = expand_env(yaml_text, environ)
    try:
        lines = _key_lines(yaml.compose(expanded, Loader=yaml.SafeLoader), 2)
        data = yaml.safe_load(expanded)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 2 if mark is not None else None
        raise PlaybookError(f"invalid YAML: {getattr(e, 'problem', None) or e}", source, line) from None
    ctx = _Context(source, lines)
    config = _build(FrontMatter, data, "", ctx)
    config = _apply_llm_defaults(config, environ)

    (preamble_text, preamble_line), sections = _split_scenes(body.rstrip(), body_line)
    preamble, shared = _extract_scene_tags(preamble_text, preamble_line, "(preamble)", ctx)
    scenes: dict[str, Scene] = {}
    if not sections:
        only = preamble or (config.llm.prompt if config.llm and config.llm.prompt else "")
        scenes[DEFAULT_SCENE] = Scene(
            DEFAULT_SCENE, only, body_line, _frozen_map(shared.dtmf), shared.play, shared.followup
        )
        preamble = ""
    for scene_id, header_line, scene_text, text_line in sections:
        if not scene_id:
            raise PlaybookError("a '# Scene:' header needs a name", source, header_line)
        if scene_id in scenes:
            raise PlaybookError(
                f"scene '{scene_id}' is defined twice (first on line {scenes[scene_id].line})", source, header_line
            )
        own_text, tags = _extract_scene_tags(scene_text, text_line, scene_id, ctx)
        prompt = f"{preamble}\n\n{own_text}" if preamble and own_text else (preamble or own_text)
        scenes[scene_id] = Scene(
            scene_id,
            prompt,
            header_line,
            _frozen_map({**shared.dtmf, **tags.dtmf}),
            tags.play or shared.play,
            tags.followup or shared.followup,
        )
    initial = next(iter(scenes))
    _check_goto_targets(config, scenes, ctx)
    if config.llm is not None:
        config = dataclasses.replace(config, llm=dataclasses.replace(config.llm, prompt=scenes[initial].prompt or config.llm.prompt))
    return Playbook(source, config, preamble, _frozen_map(scenes), initial, tuple(ctx.warnings))


def load_playbook(path: str, environ: Optional[Mapping[str, str]] = None) -> Playbook:
    """Read and parse the playbook file at ``path``."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise PlaybookError(f"cannot read: {e}", path) from None
    return parse_playbook(text, path, environ)


def _check_goto_targets(config: FrontMatter, scenes: Mapping[str, Scene], ctx: _Context) -> None:
    """A DTMF ``goto`` to a scene that does not exist would fail mid-call: refuse it now."""
    for digit, action in config.dtmf.items():
        if action.action == "goto" and action.scene not in scenes:
            raise ctx.error(f"dtmf.{digit}", f"scene '{action.scene}' does not exist (scenes: {', '.join(scenes)})")
    for scene in scenes.values():
        for digit, action in scene.dtmf.items():
            if action.action == "goto" and action.scene not in scenes:
                raise PlaybookError(
                    f"<dtmf digit=\"{digit}\"> goes to scene '{action.scene}', which does not exist",
                    ctx.source,
                    scene.line,
                    f"scene '{scene.id}' <dtmf>",
                )


def _apply_llm_defaults(config: FrontMatter, environ: Mapping[str, str]) -> FrontMatter:
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
