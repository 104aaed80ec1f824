"""Every documented CallOption key (docs/api.md, "CallOption") and what becomes of it: one table.

A key either has an effect or is **refused**: the call goes on without it and the client gets
``{"event":"error","sender":"option","code":501,"error":"option 'ambiance' is not supported: …"}``
when the call is answered (``refusals``).  A key that nobody documented is reported too
(code 400, "unknown option key", still kept for the CDR), so a typo is not a silent no-op.

Making a refused option work is one line: drop its ``refused=`` reason below (for a new option block,
also list its keys and put its class in ``BLOCKS``; until then its keys are not walked: the refused block
is named once).
``tests/test_option_keys.py`` keeps this table, the dataclasses in ``commands.py`` and the
CallOption section of docs/api.md in step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from activecall.protocol import commands as cmd
from activecall.protocol.events import OTHER_KEYS, WireObject

CALL_TYPES = ("webSocket", "sip", "webrtc")


@dataclass(frozen=True)
class OptionKey:
    """One key: ``refused`` says why it has no effect (None: it works); ``call_types`` where it
    works (elsewhere it is refused as meaningless there); a value in ``harmless`` is what we do
    anyway (``vad.samplerate: 16000``), so it is not refused."""

    path: str
    refused: Optional[str] = None
    call_types: tuple[str, ...] = CALL_TYPES
    harmless: tuple = ()
    #: a free-form map: its own keys are not checked
    free_form: bool = False

    def refusal(self, value: Any, call_type: str) -> Optional[str]:
        if value in self.harmless:
            return None
        if self.refused is not None:
            return self.refused
        if call_type not in self.call_types:
            return f"it has no effect on a {call_type} call (only {', '.join(self.call_types)})"
        return None


def _k(path, **kw) -> tuple[str, OptionKey]:
    return path, OptionKey(path, **kw)


_NOT_USED = "no provider here reads it"
_ONLY_16K = "the speech pipeline runs at 16 kHz"
_SIP = ("sip",)

#: path (dotted, wire spelling) -> OptionKey.  Nested blocks list their own keys.
OPTION_KEYS: dict[str, OptionKey] = dict([
    _k("caller"), _k("callee"),
    _k("offer", call_types=("webrtc",)), _k("sdp", call_types=("webrtc",)),
    _k("codec"),  # /call: the audio codec; /call/sip: the offer's order; webrtc: the preferred codec
    _k("sampleRate", call_types=("webSocket",)),
    _k("playbook"),
    _k("denoise"),
    _k("recorder"), _k("recorder.recorderFile"), _k("recorder.samplerate"), _k("recorder.ptime"),
    _k("recorder.format"),
    _k("vad"), _k("vad.type"), _k("vad.speechPadding"), _k("vad.silencePadding"), _k("vad.voiceThreshold"),
    _k("vad.silenceTimeout"),
    _k("vad.samplerate", refused=_ONLY_16K, harmless=(16000,)),
    _k("vad.ratio", refused="the VADs here decide per frame on voiceThreshold", harmless=(0.5,)),
    _k("vad.maxBufferDurationSecs", refused="the VAD keeps no audio buffer", harmless=(50,)),
    _k("vad.endpoint", refused="no remote VAD provider"), _k("vad.secretKey", refused="no remote VAD provider"),
    _k("vad.secretId", refused="no remote VAD provider"),
    _k("asr"), _k("asr.provider"), _k("asr.language"), _k("asr.model"), _k("asr.appId"), _k("asr.secretId"),
    _k("asr.secretKey"), _k("asr.modelType"), _k("asr.endpoint"), _k("asr.extra", free_form=True),
    _k("asr.bufferSize", refused="recognisers are fed 20 ms frames"),
    _k("asr.samplerate", refused=_ONLY_16K, harmless=(16000,)),
    _k("asr.startWhenAnswer", refused="recognition always starts with the answer", harmless=(True,)),
    _k("tts"), _k("tts.provider"), _k("tts.speed"), _k("tts.volume"), _k("tts.speaker"), _k("tts.voice"),
    _k("tts.model"), _k("tts.language"), _k("tts.endpoint"), _k("tts.appId"), _k("tts.secretId"),
    _k("tts.secretKey"), _k("tts.extra", free_form=True),
    _k("tts.samplerate", refused="every synthesiser's audio is taken at its own rate and resampled to 16 kHz",
       harmless=(16000,)),
    _k("tts.codec", refused="synthesis is always PCM inside the daemon", harmless=("pcm",)),
    _k("tts.subtitle", refused="no subtitles are produced", harmless=(False,)),
    _k("tts.emotion", refused=_NOT_USED), _k("tts.maxConcurrentTasks", refused=_NOT_USED),
    _k("tts.sessionId", refused=_NOT_USED), _k("tts.cacheKey", refused="give cacheKey on the tts command"),
    _k("language"),  # ✱ the defaults by language (docs/api.md, "Speech defaults")
    _k("mediaPass"), _k("mediaPass.url"), _k("mediaPass.inputSampleRate"), _k("mediaPass.outputSampleRate"),
    _k("mediaPass.packetSize"), _k("mediaPass.ptime"),
    _k("handshakeTimeout", call_types=("webrtc",)),
    _k("enableIpv6", call_types=("webrtc",)),
    _k("inactivityTimeout"),
    _k("sip", call_types=_SIP), _k("sip.username", call_types=_SIP), _k("sip.password", call_types=_SIP),
    _k("sip.realm", call_types=_SIP), _k("sip.contact", refused="the Contact is always our own address"),
    _k("sip.headers", free_form=True, call_types=_SIP), _k("sip.hangup_headers", free_form=True, call_types=_SIP),
    _k("sip.extract_headers", refused="a playbook's front matter names the headers it reads (sip.extract_headers)"),
    _k("sip.enableSrtp", call_types=_SIP),
    _k("extra", free_form=True),
    _k("ambiance"),
    _k("ambiance.path"), _k("ambiance.duckLevel"), _k("ambiance.normalLevel"), _k("ambiance.transitionSpeed"),
    _k("ambiance.enabled"),
    # ✱ server-side barge-in (call/barge_in.py)
    _k("interruption"), _k("interruption.strategy"), _k("interruption.pauseOnVoice"),
    _k("interruption.minSpeechMs"), _k("interruption.falseInterruptionMs"), _k("interruption.minWords"),
    _k("interruption.backchannel"), _k("interruption.fillerWordFilter"), _k("interruption.volumeFadeMs"),
    _k("interruption.ignoreFirstMs"), _k("interruption.echoCancel"),
    _k("eou"), _k("eou.type"), _k("eou.endpoint"), _k("eou.secretKey"), _k("eou.secretId"), _k("eou.timeout"),
    _k("eou.extra", free_form=True), _k("eou.threshold"), _k("eou.pauseMs"),
    _k("eou.earlyLook"), _k("eou.earlyThreshold"),
    _k("realtime"), _k("realtime.provider"), _k("realtime.model"), _k("realtime.secretKey"),
    _k("realtime.secretId"), _k("realtime.endpoint"), _k("realtime.turnDetection", free_form=True),
    _k("realtime.tools", free_form=True), _k("realtime.extra", free_form=True),
    _k("subscribe", call_types=("sip", "webrtc"), harmless=(False,)),
    # true or a map of timers, checked by call/amd.py (a bad timer is an error event there)
    _k("amd", call_types=_SIP, harmless=(False, None), free_form=True),
])


@dataclass(frozen=True)
class Refusal:
    """A key of a call's option that has no effect: the ``error`` event names it."""

    path: str
    reason: str
    unknown: bool = False

    @property
    def code(self) -> int:
        return 400 if self.unknown else 501

    @property
    def message(self) -> str:
        if self.unknown:
            return (f"unknown option key '{self.path}': it has no effect (kept in the CDR's option)")
        return f"option '{self.path}' is not supported: {self.reason}; the call goes on without it"


def _items(obj: WireObject):
    """``(wire name, value)`` of the set fields of an option object, unknown keys included."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name == OTHER_KEYS:
            for key, extra in (value or {}).items():
                yield key, extra
        elif value is not None:
            yield f.metadata.get("wire", f.name), value


def refusals(option: Optional[cmd.CallOption], call_type: str) -> list[Refusal]:
    """The keys of ``option`` that will have no effect on a ``call_type`` call, parents first.

    A refused block's own keys are not listed again (``ambiance`` says it for ``ambiance.path``)."""
    out: list[Refusal] = []
    if option is not None:
        _walk(option, "", call_type, out)
    return out


def _walk(obj, prefix: str, call_type: str, out: list) -> None:
    """``refusals``' recursion (a module function: a nested one that calls itself is a reference cycle
    per call, left for the garbage collector)."""
    for name, value in _items(obj):
        path = prefix + name
        entry = OPTION_KEYS.get(path)
        if entry is None:
            out.append(Refusal(path, "not documented", unknown=True))
            continue
        reason = entry.refusal(value, call_type)
        if reason is not None:
            out.append(Refusal(path, reason))
            continue
        if isinstance(value, WireObject) and not entry.free_form:
            _walk(value, path + ".", call_type, out)


#: the option blocks whose keys the table lists (name -> dataclass), for the consistency test
BLOCKS = {
    "": cmd.CallOption, "recorder": cmd.RecorderOption, "vad": cmd.VadOption, "asr": cmd.TranscriptionOption,
    "tts": cmd.SynthesisOption, "mediaPass": cmd.MediaPassOption, "sip": cmd.SipOption,
    "ambiance": cmd.AmbianceOption, "eou": cmd.EouOption, "realtime": cmd.RealtimeOption,
    "interruption": cmd.InterruptionOption,
}
