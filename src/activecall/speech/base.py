"""The three speech interfaces and their option/result types.

Every provider sits behind one of three small interfaces so that the session
never knows which vendor or library it talks to:

- ``IVoiceActivityDetector``: 16 kHz int16 frames in, ``SpeechStarted`` /
  ``SpeechEnded`` / ``SilenceTimeout`` out (through a callback, because
  inference may finish later, off the reactor);
- ``IStreamingRecognizer``: 16 kHz frames in, ``AsrResult`` (delta or final,
  with stream-relative timing and time-to-first-byte) out;
- ``ISynthesizer``: ``synthesize(text, sink)`` pushes 16 kHz int16 chunks to
  ``sink`` as they exist and returns a Deferred; cancelling it stops the work
  at once (the process is killed, the request aborted).

Options arrive as the camelCase dicts of the API and playbooks (docs/api.md, CallOption)
and are parsed here into frozen dataclasses, so a wrong type names the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import numpy as np
from twisted.internet import defer
from zope.interface import Attribute, Interface

from activecall.audio import SAMPLE_RATE


class SpeechError(Exception):
    """A speech provider could not be built or failed while working."""


class ProviderNotFound(SpeechError):
    """The options name a provider nobody registered; the message lists the ones that exist."""

    def __init__(self, kind: str, name: str, available):
        self.kind = kind
        self.name = name
        self.available = sorted(available)
        super().__init__(
            f"unknown {kind} provider {name!r}; available: {', '.join(self.available)}")


class OptionError(SpeechError):
    """An option has the wrong type or value; the message names the key."""


# -- events and results ------------------------------------------------------------------------


@dataclass(frozen=True)
class SpeechStarted:
    """Speech has lasted ``speechPadding``; it began at ``start_ms`` (stream time)."""

    start_ms: int


@dataclass(frozen=True)
class SpeechEnded:
    """Speech from ``start_ms`` ended at ``end_ms`` (followed by ``silencePadding`` of quiet)."""

    start_ms: int
    end_ms: int

    @property
    def duration_ms(self) -> int:
        return self.end_ms - self.start_ms


@dataclass(frozen=True)
class SilenceTimeout:
    """The line has been quiet since ``start_ms`` for ``duration_ms`` (repeats every silenceTimeout)."""

    start_ms: int
    duration_ms: int


@dataclass(frozen=True)
class AsrResult:
    """One recogniser answer: a partial (``final=False``, an asrDelta) or a final (asrFinal).

    ``index`` counts utterances from 0; ``ttfb_ms`` is set on the first result
    of an utterance: wall time from its first audio to this answer.
    """

    index: int
    text: str
    final: bool
    start_ms: Optional[int] = None
    end_ms: Optional[int] = None
    ttfb_ms: Optional[int] = None
    confidence: Optional[float] = None


# -- options -----------------------------------------------------------------------------------


def _get(options: Mapping[str, Any], key: str, kinds, default, where: str):
    """``options[key]`` checked against ``kinds`` (bool is not taken for a number)."""
    value = options.get(key, default)
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if value is None or (isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))):
        return value
    names = "/".join(k.__name__ for k in kinds)
    raise OptionError(f"{where}.{key}: expected {names}, got {type(value).__name__} {value!r}")


def _extra(options: Mapping[str, Any], where: str) -> dict:
    extra = options.get("extra") or {}
    if not isinstance(extra, Mapping):
        raise OptionError(f"{where}.extra: expected an object, got {type(extra).__name__}")
    return {str(k): str(v) for k, v in extra.items()}


@dataclass(frozen=True)
class VadOptions:
    """``vad`` options (CallOption ``vad``, docs/api.md); ms values, probabilities in 0..1."""

    type: str = "silero"
    speechPadding: int = 250
    silencePadding: int = 100
    voiceThreshold: float = 0.5
    ratio: float = 0.5
    silenceTimeout: Optional[int] = None
    mode: int = 2  # webrtcvad aggressiveness 0..3 (not in the original; extra.mode also works)

    @classmethod
    def from_dict(cls, options: Optional[Mapping[str, Any]]) -> "VadOptions":
        o = dict(options or {})
        w = "vad"
        extra = _extra(o, w)
        mode = _get(o, "mode", int, int(extra.get("mode", cls.mode)), w)
        result = cls(
            type=_get(o, "type", str, cls.type, w) or cls.type,
            speechPadding=_get(o, "speechPadding", int, cls.speechPadding, w),
            silencePadding=_get(o, "silencePadding", int, cls.silencePadding, w),
            voiceThreshold=float(_get(o, "voiceThreshold", (int, float), cls.voiceThreshold, w)),
            ratio=float(_get(o, "ratio", (int, float), cls.ratio, w)),
            silenceTimeout=_get(o, "silenceTimeout", int, None, w),
            mode=mode,
        )
        if not 0.0 < result.voiceThreshold < 1.0:
            raise OptionError(f"vad.voiceThreshold: must be between 0 and 1, got {result.voiceThreshold}")
        if result.speechPadding < 0 or result.silencePadding < 0:
            raise OptionError("vad.speechPadding/silencePadding: must not be negative")
        if not 0 <= result.mode <= 3:
            raise OptionError(f"vad.mode: webrtcvad mode is 0..3, got {result.mode}")
        return result


@dataclass(frozen=True)
class AsrOptions:
    """``asr`` options (CallOption ``asr``, docs/api.md).

    ``model`` (the guide's spelling, e.g. ``model: whisper-1``) and ``modelType`` (the original's) name
    the same thing; ``modelType`` wins when both are given."""

    provider: str = "pocketsphinx"
    language: Optional[str] = None
    modelType: Optional[str] = None
    secretKey: Optional[str] = None
    appId: Optional[str] = None
    secretId: Optional[str] = None
    endpoint: Optional[str] = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, options: Optional[Mapping[str, Any]]) -> "AsrOptions":
        o = dict(options or {})
        w = "asr"
        return cls(
            provider=_get(o, "provider", str, cls.provider, w) or cls.provider,
            language=_get(o, "language", str, None, w),
            # ``model`` is the configuration guide's spelling (``asr: {provider: openai, model: whisper-1}``)
            modelType=_get(o, "modelType", str, None, w) or _get(o, "model", str, None, w),
            secretKey=_get(o, "secretKey", str, None, w),
            appId=_get(o, "appId", str, None, w),
            secretId=_get(o, "secretId", str, None, w),
            endpoint=_get(o, "endpoint", str, None, w),
            extra=_extra(o, w),
        )


@dataclass(frozen=True)
class TtsOptions:
    """``tts`` options (CallOption ``tts``, docs/api.md).

    ``voice`` (the guide's spelling, e.g. ``voice: alloy``) and ``speaker`` (the original's) name the same
    thing; ``speaker`` wins when both are given."""

    provider: str = "flite"
    speaker: Optional[str] = None
    speed: float = 1.0
    volume: int = 5
    model: Optional[str] = None
    language: Optional[str] = None
    secretKey: Optional[str] = None
    endpoint: Optional[str] = None
    samplerate: int = SAMPLE_RATE
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, options: Optional[Mapping[str, Any]]) -> "TtsOptions":
        o = dict(options or {})
        w = "tts"
        result = cls(
            provider=_get(o, "provider", str, cls.provider, w) or cls.provider,
            # ``voice`` is the configuration guide's spelling (``tts: {provider: openai, voice: alloy}``)
            speaker=_get(o, "speaker", str, None, w) or _get(o, "voice", str, None, w),
            speed=float(_get(o, "speed", (int, float), cls.speed, w)),
            volume=_get(o, "volume", int, cls.volume, w),
            model=_get(o, "model", str, None, w),
            language=_get(o, "language", str, None, w),
            secretKey=_get(o, "secretKey", str, None, w),
            endpoint=_get(o, "endpoint", str, None, w),
            samplerate=_get(o, "samplerate", int, SAMPLE_RATE, w),
            extra=_extra(o, w),
        )
        if not 0.25 <= result.speed <= 4.0:
            raise OptionError(f"tts.speed: must be between 0.25 and 4, got {result.speed}")
        return result


# -- interfaces --------------------------------------------------------------------------------

VadCallback = Callable[[object], None]
AsrCallback = Callable[[AsrResult], None]
PcmSink = Callable[[np.ndarray], None]


class IVoiceActivityDetector(Interface):
    """Speech/silence segmentation of one 16 kHz stream."""

    name = Attribute("provider name, e.g. 'silero'")

    def feed(pcm):
        """Queue int16 samples (any length, usually one 20 ms frame). Never blocks."""

    def drain():
        """A Deferred that fires once everything fed so far has been classified."""

    def close():
        """Stop; later feeds are ignored. Returns a Deferred like ``drain``."""


class IStreamingRecognizer(Interface):
    """Speech-to-text of one 16 kHz stream; results go to the callback given at creation."""

    name = Attribute("provider name, e.g. 'pocketsphinx'")
    on_error = Attribute("None, or ``callable(message)`` told when recognition fails (the service is "
                         "unreachable, refuses us, or an utterance could not be decoded); the call sets it "
                         "and reports an ``error`` event")

    def feed(pcm):
        """Queue int16 samples. Never blocks."""

    def end_utterance():
        """The caller stopped talking (an external VAD said so): finalise now."""

    def close():
        """Finalise and stop; a Deferred that fires when the last result was delivered."""


class ISynthesizer(Interface):
    """Text-to-speech producing 16 kHz mono int16."""

    name = Attribute("provider name, e.g. 'flite'")

    def synthesize(text, sink):
        """Push audio chunks to ``sink(np.ndarray int16)``; a Deferred firing with the sample count.

        Cancelling the Deferred stops synthesis at once; no chunk reaches ``sink`` afterwards.
        """


def synthesis(run: Callable[[Callable[[np.ndarray], None]], defer.Deferred], sink) -> defer.Deferred:
    """The Deferred of one ``ISynthesizer.synthesize``: ``run(deliver)`` does the work, pushing audio
    through ``deliver`` to ``sink``, and its Deferred fires with the sample count.

    ``run`` is an ``inlineCallbacks`` generator (or a coroutine through
    ``ensureDeferred``), and each thing it waits for is a Deferred whose
    canceller stops that piece of work: the HTTP request, the body transfer,
    the WebSocket, the flite process.  Cancelling the synthesis cancels
    ``run``'s Deferred, which Twisted passes on to what it is waiting for.

    Two things Twisted's propagation does not do are done here.  The
    synthesis fails with ``CancelledError`` at once and whatever ``run``
    reports afterwards is dropped: stopped work seldom fails with
    ``CancelledError`` itself (an aborted treq request fails with
    ``ResponseNeverReceived``, an aborted connect with ``DNSLookupError``, a
    killed flite with its signal), and the session tells a cancel from a
    failure by that type.  And ``deliver`` raises ``CancelledError`` once the
    synthesis is cancelled: a ``run`` cancelled while it is running (from
    inside the sink) waits on nothing Twisted could cancel, and stops at its
    next chunk instead.
    """
    work: Optional[defer.Deferred] = None

    def cancel(result: defer.Deferred) -> None:
        result.errback(defer.CancelledError())  # first, so nothing the stopped work says can take its place
        if work is not None:
            work.cancel()

    result = defer.Deferred(cancel)

    def deliver(pcm: np.ndarray) -> None:
        if result.called:
            raise defer.CancelledError()
        sink(pcm)

    def succeeded(samples) -> None:
        if not result.called:
            result.callback(samples)

    def failed(failure) -> None:
        if not result.called:
            result.errback(failure)

    work = run(deliver)
    work.addCallbacks(succeeded, failed)
    return result
