"""Providers by name: ``create_vad``, ``create_recognizer``, ``create_synthesizer``, ``create_eou_detector``.

The options dicts are those of the API and playbooks.  The VAD is selected by
``type`` (default ``silero``), ASR and TTS by ``provider`` (default the
offline ``pocketsphinx`` / ``flite``; a call that names none gets
``speech/defaults.py``'s choice by language).  An unknown name raises
``ProviderNotFound`` listing the registered ones; the session turns that into
an ``error`` event instead of silently disabling the call's processing.

Factories import their libraries lazily, so a missing optional package only
hurts the calls that ask for that provider, with a message naming it.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

from activecall.speech.base import (
    AsrOptions, ProviderNotFound, TtsOptions, VadOptions,
)

VAD_PROVIDERS: dict[str, Callable] = {}
ASR_PROVIDERS: dict[str, Callable] = {}
TTS_PROVIDERS: dict[str, Callable] = {}
EOU_PROVIDERS: dict[str, Callable] = {}


def register(table: dict, *names: str):
    """Decorator: add a factory under one or more names."""

    def deco(factory):
        for n in names:
            table[n] = factory
        return factory

    return deco


def _lookup(table: dict, kind: str, name: str) -> Callable:
    try:
        return table[name]
    except KeyError:
        raise ProviderNotFound(kind, name, table) from None


def create_vad(options: Optional[Mapping[str, Any]], on_event: Callable, **deps):
    """A VAD for one stream; ``deps`` may hold ``batcher`` (silero)."""
    opts = VadOptions.from_dict(options)
    return _lookup(VAD_PROVIDERS, "vad", opts.type)(opts, on_event, **deps)


def create_recognizer(options: Optional[Mapping[str, Any]], on_result: Callable, **deps):
    """A streaming recogniser for one stream; ``deps``: ``reactor``, ``run_in_thread``, ``agent``.

    ``provider: none``: None (a call that must not listen)."""
    opts = AsrOptions.from_dict(options)
    if opts.provider == "none":
        return None
    return _lookup(ASR_PROVIDERS, "asr", opts.provider)(opts, on_result, **deps)


def create_synthesizer(options: Optional[Mapping[str, Any]], cache=None, **deps):
    """A synthesiser; with ``cache`` (a ``TtsCache``) repeated texts cost nothing."""
    opts = TtsOptions.from_dict(options)
    synth = _lookup(TTS_PROVIDERS, "tts", opts.provider)(opts, **deps)
    if cache is not None:
        from activecall.speech.cache import CachedSynthesizer
        synth = CachedSynthesizer(synth, cache, opts)
    return synth


def create_eou_detector(options: Optional[Mapping[str, Any]], **deps):
    """An end-of-turn detector (``IEndOfTurnDetector``, its ``options`` an ``EouOptions``) by ``type``
    (default ``smart_turn``), or None for ``type: none``; ``deps``: ``run_in_thread``, ``model``."""
    from activecall.speech.eou.base import EouOptions
    opts = EouOptions.from_dict(options)
    return _lookup(EOU_PROVIDERS, "eou", opts.type)(opts, **deps)


# -- the built-in providers ----------------------------------------------------------------------


@register(VAD_PROVIDERS, "silero")
def _silero(opts, on_event, batcher=None, **_):
    from activecall.speech.vad.silero import SileroVad
    return SileroVad(opts, on_event, batcher=batcher)


@register(VAD_PROVIDERS, "webrtcvad", "webrtc")
def _webrtc(opts, on_event, **_):
    from activecall.speech.vad.webrtc import WebRtcVad
    return WebRtcVad(opts, on_event)


@register(VAD_PROVIDERS, "nop")
def _nop(opts, on_event, **_):
    from activecall.speech.vad.base import NopVad
    return NopVad(opts, on_event)


@register(TTS_PROVIDERS, "flite")
def _flite(opts, reactor=None, **_):
    from activecall.speech.tts.flite import FliteSynthesizer
    return FliteSynthesizer(opts, reactor=reactor)


@register(TTS_PROVIDERS, "piper")
def _piper(opts, reactor=None, **deps):
    from activecall.speech.tts.piper import PiperSynthesizer
    return PiperSynthesizer(opts, reactor=reactor, **deps)


@register(TTS_PROVIDERS, "espeak", "espeak-ng")
def _espeak(opts, reactor=None, **_):
    from activecall.speech.tts.espeak import EspeakSynthesizer
    return EspeakSynthesizer(opts, reactor=reactor)


@register(ASR_PROVIDERS, "pocketsphinx")
def _pocketsphinx(opts, on_result, **deps):
    from activecall.speech.asr.pocketsphinx import PocketsphinxRecognizer
    return PocketsphinxRecognizer(opts, on_result, **deps)


@register(ASR_PROVIDERS, "whisper", "faster-whisper", "faster_whisper")
def _whisper(opts, on_result, **deps):
    from activecall.speech.asr.whisper import WhisperRecognizer
    return WhisperRecognizer(opts, on_result, **deps)


@register(ASR_PROVIDERS, "moonshine")
def _moonshine(opts, on_result, **deps):
    from activecall.speech.asr.moonshine import MoonshineRecognizer
    return MoonshineRecognizer(opts, on_result, **deps)


@register(ASR_PROVIDERS, "sensevoice")
def _sensevoice(opts, on_result, **deps):
    from activecall.speech.asr.sensevoice import SenseVoiceRecognizer
    return SenseVoiceRecognizer(opts, on_result, **deps)


@register(ASR_PROVIDERS, "openai")
def _openai_asr(opts, on_result, **deps):
    from activecall.speech.asr.openai import OpenAIRecognizer
    return OpenAIRecognizer(opts, on_result, **deps)


@register(TTS_PROVIDERS, "openai")
def _openai_tts(opts, **deps):
    from activecall.speech.tts.openai import OpenAISynthesizer
    return OpenAISynthesizer(opts, **deps)


@register(ASR_PROVIDERS, "deepgram")
def _deepgram_asr(opts, on_result, **deps):
    from activecall.speech.asr.deepgram import DeepgramRecognizer
    return DeepgramRecognizer(opts, on_result, **deps)


@register(TTS_PROVIDERS, "deepgram")
def _deepgram_tts(opts, **deps):
    from activecall.speech.tts.deepgram import DeepgramSynthesizer
    return DeepgramSynthesizer(opts, **deps)


@register(ASR_PROVIDERS, "aliyun")
def _aliyun_asr(opts, on_result, **deps):
    from activecall.speech.asr.aliyun import AliyunRecognizer
    return AliyunRecognizer(opts, on_result, **deps)


@register(TTS_PROVIDERS, "aliyun")
def _aliyun_tts(opts, **deps):
    from activecall.speech.tts.aliyun import AliyunSynthesizer
    return AliyunSynthesizer(opts, **deps)


@register(ASR_PROVIDERS, "tencent")
def _tencent_asr(opts, on_result, **deps):
    from activecall.speech.asr.tencent import TencentRecognizer
    return TencentRecognizer(opts, on_result, **deps)


@register(TTS_PROVIDERS, "tencent", "tencent_basic")
def _tencent_tts(opts, **deps):
    from activecall.speech.tts.tencent import TencentSynthesizer
    return TencentSynthesizer(opts, **deps)


@register(EOU_PROVIDERS, "smart_turn")
def _smart_turn(opts, **deps):
    from activecall.speech.eou.smart_turn import SmartTurnDetector
    return SmartTurnDetector(opts, **deps)


@register(EOU_PROVIDERS, "none")
def _no_eou(opts, **_):
    return None
