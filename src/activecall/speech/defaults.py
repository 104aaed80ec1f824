"""Which VAD, recogniser and voice a call gets when it names none: by language, offline first.

The guide picks providers by language when a playbook or API call names none (zh: aliyun TTS, sensevoice
or aliyun ASR; en: supertonic TTS, sensevoice or openai ASR).  We follow its shape with what a registry
install can actually run offline, chosen by measurement (docs/speech.md, "Evaluation" and "Defaults"):

| language | recogniser | voice |
|---|---|---|
| en (and anything not zh) | ``moonshine`` (onnxruntime + the base-en model ``moonshine-cpp`` ships), else ``whisper`` (CTranslate2 + the shipped tiny.en model), else ``pocketsphinx``, else ``openai`` | ``piper`` (shipped en_US joe voice), else ``flite``, else ``openai`` |
| zh | ``sensevoice`` when a model is under the models directory, else ``aliyun`` | ``espeak`` (``cmn``), else ``aliyun`` |

A cloud choice still needs its key; the recogniser or synthesiser then refuses with a message naming it
(``asr.secretKey`` or ``DASHSCOPE_API_KEY``).  ``asr: {provider: none}`` (or ``asr: false`` in a playbook)
is a call that must not listen; ``vad: {type: nop}`` likewise for the VAD.

Nothing here imports a model or a heavy package: availability is looked up with ``find_spec`` and
``which``, the answers remembered for a few seconds (``speech/installed.py``: looking them up on every
call set-up cost a fifth of a call's CPU).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

from activecall.speech.installed import module_found

DEFAULT_LANGUAGE = "en"
NO_PROVIDER = "none"  # asr.provider / tts.provider of a call that must not listen / speak


def primary_language(*tags: Optional[str]) -> str:
    """The first non-empty, non-``auto`` tag as a primary language: ``zh-CN`` -> ``zh``, ``cmn`` -> ``zh``,
    ``en-US`` -> ``en``; none given: DEFAULT_LANGUAGE."""
    for tag in tags:
        if tag and str(tag).strip() and str(tag).strip().lower() != "auto":
            primary = str(tag).strip().replace("_", "-").split("-", 1)[0].lower()
            return {"cmn": "zh", "yue": "zh", "chinese": "zh", "english": "en"}.get(primary, primary)
    return DEFAULT_LANGUAGE


def _module(name: str) -> bool:
    return module_found(name)


def _program(name: str) -> bool:
    from activecall.speech.tts.flite import _which
    return _which(name) is not None


def sensevoice_model(models_dir: Optional[str]) -> Optional[str]:
    """A SenseVoice model directory under ``models_dir`` (``--download-models sensevoice`` puts it there)."""
    if not models_dir or not _module("sherpa_onnx"):
        return None
    from activecall.speech.models import installed_dir
    return installed_dir(models_dir, "sensevoice")


def offline_asr(language: str, models_dir: Optional[str] = None) -> Optional[dict]:
    """The offline recogniser options for ``language``, or None when none is installed."""
    sensevoice = sensevoice_model(models_dir)
    if language == "zh":
        return {"provider": "sensevoice", "extra": {"model_dir": sensevoice}} if sensevoice else None
    if language == "en":
        from activecall.speech.asr.moonshine import available as moonshine_available
        from activecall.speech.asr.whisper import available as whisper_available
        if moonshine_available():
            return {"provider": "moonshine"}
        if whisper_available():
            return {"provider": "whisper"}
        if _module("pocketsphinx"):
            return {"provider": "pocketsphinx"}
    if sensevoice and language in ("ja", "ko"):
        return {"provider": "sensevoice", "extra": {"model_dir": sensevoice}}
    return None


def offline_tts(language: str) -> Optional[dict]:
    """The offline voice options for ``language``, or None when none is installed."""
    if language == "zh":
        return {"provider": "espeak", "speaker": "cmn"} if _program("espeak-ng") else None
    if language == "en":
        from activecall.speech.tts.piper import available as piper_available
        if piper_available():
            return {"provider": "piper"}
        if _program("flite"):
            return {"provider": "flite"}
    return None


CLOUD_ASR = {"zh": "aliyun", "en": "openai"}
CLOUD_TTS = {"zh": "aliyun", "en": "openai"}


def choose(section: str, given: Optional[Mapping[str, Any]], language: str,
           models_dir: Optional[str] = None) -> Optional[dict]:
    """``given`` (an ``asr``/``tts``/``vad`` options dict or None) with its provider filled in by language.

    A section that names its provider (or VAD ``type``) is returned unchanged; ``provider: none`` gives None
    (the call does without).  A missing section gets the whole default."""
    given = dict(given or {})
    key = "type" if section == "vad" else "provider"
    named = given.get(key) or (given.get("provider") if section == "vad" else None)
    if named:
        return None if str(named).lower() in (NO_PROVIDER, "false") else given
    if section == "vad":
        return {**given, "type": "silero"}
    offline = offline_asr(language, models_dir) if section == "asr" else offline_tts(language)
    if offline is None:
        table = CLOUD_ASR if section == "asr" else CLOUD_TTS
        offline = {"provider": table.get(language, table["en"])}
    merged = {**given, **offline}
    if "extra" in given and "extra" in offline:
        merged["extra"] = {**offline["extra"], **given["extra"]}
    if language and not given.get("language"):
        merged.setdefault("language", language)
    return merged


def models_dir_from_env(env: Mapping[str, str] = os.environ) -> Optional[str]:
    return env.get("ACTIVECALL_MODELS_DIR") or None


OFF = (NO_PROVIDER, "false")  # provider / vad type values of a section that is switched off


def _off(section: Optional[Mapping[str, Any]], key: str = "provider") -> bool:
    return section is not None and str(section.get(key) or "").lower() in OFF


class CallSpeech:
    """What one API call (``/call``, ``/call/webrtc``, ``/call/sip``, a SIP handler's option) runs: the
    ``vad``/``asr``/``tts`` option dicts with their providers filled in (None: the call does without),
    its ``language``, and ``defaulted``, the sections whose provider the defaults chose.

    The rule (docs/api.md, "Speech defaults"), chosen for wire compatibility with the original, whose
    calls listen only when the option has ``asr``/``vad``:

    - the call **listens only when it asks to**: an ``asr`` section (``asr: {}``, ``asr: true``, or one with
      a ``language``) or ✱ ``language`` on the option; a client that sends neither (it streams its own audio
      or runs its own recogniser) gets no recogniser and no VAD, as before;
    - a section without a provider gets the one for the call's language (``speech/defaults.py``); one that
      names its provider is used as it is; ``asr: false`` / ``provider: none`` (``vad: false`` /
      ``type: none``) switch it off;
    - ``language`` alone asks for the whole set: VAD (silero), recogniser and voice of that language;
    - the voice of a ``tts`` command: the call's ``tts`` section, filled in by language when it names no
      provider or ``language`` is given; with neither, ``tts`` stays None and the synthesiser's own
      fallback (flite) speaks, as before.
    """

    __slots__ = ("vad", "asr", "tts", "language", "defaulted")

    def __init__(self, vad, asr, tts, language, defaulted):
        self.vad, self.asr, self.tts, self.language, self.defaulted = vad, asr, tts, language, defaulted

    @property
    def listens(self) -> bool:
        return self.vad is not None or self.asr is not None

    def __repr__(self) -> str:  # tests
        return f"CallSpeech(vad={self.vad!r}, asr={self.asr!r}, tts={self.tts!r}, language={self.language!r})"


def for_call(vad: Optional[Mapping[str, Any]], asr: Optional[Mapping[str, Any]],
             tts: Optional[Mapping[str, Any]], language: Optional[str] = None,
             models_dir: Optional[str] = None) -> CallSpeech:
    """The ``CallSpeech`` of an API call's option sections (dicts, None when left out); see its docstring."""
    lang = primary_language(language, (asr or {}).get("language"), (tts or {}).get("language"))
    defaulted = []
    asr_out = None
    if asr is not None or language:
        if not _off(asr):
            asr_out = choose("asr", asr, lang, models_dir)
            if not (asr or {}).get("provider"):
                defaulted.append("asr")
    vad_out = None
    if vad is not None:
        if not (_off(vad, "type") or _off(vad)):
            vad_out = choose("vad", vad, lang)
            if not vad.get("type"):
                defaulted.append("vad")
    elif language and asr_out is not None:
        vad_out = choose("vad", None, lang)
        defaulted.append("vad")
    tts_out = dict(tts) if tts is not None else None
    if (tts is not None or language) and not (tts or {}).get("provider"):
        tts_out = choose("tts", tts, lang, models_dir)
        defaulted.append("tts")
    return CallSpeech(vad_out, asr_out, tts_out, lang, tuple(defaulted))
