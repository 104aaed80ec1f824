"""Glue between a call session and the speech providers.

- ``synthesizer_factory``: turns a call's ``SynthesisOption`` into a
  synthesiser (with the TTS cache).  With no option at all the offline
  default (flite) speaks — the original answered ``no tts option available``;
  a fresh install should talk without configuration.
- ``attach_processors``: VAD and ASR on the caller's audio (what ``session.speech`` says: the option's
  sections with the defaults for the call's language where it asks for speech without naming a
  provider, ``speech/defaults.py`` ``for_call``), their results sent
  as ``speaking`` / ``silence`` / ``asrDelta`` / ``asrFinal`` / ``metrics``
  events.  An unknown provider gives an ``error`` event naming the available
  ones (the original silently disabled every processor of the call).
  With ``option.eou`` (on by default for playbooks) the recogniser's utterance
  ends come from a ``TurnEndpointer`` and an end-of-turn model (Smart Turn) on
  short pauses, timed from the call VAD's speech end when there is one,
  reported as ``eou`` and ``metrics`` events (docs/speech.md, "End of turn").
  With ``option.realtime`` (or a playbook in realtime mode) the call runs in
  realtime mode instead (``call/realtime_session.py``): VAD and ASR are not built.
"""

from __future__ import annotations

import os
import weakref
from functools import partial

import numpy as np
from twisted.internet import defer
from twisted.logger import Logger

from activecall.backlink import back_link, link_to
from activecall.audio import FRAME_SAMPLES
from activecall.call.playback import SynthesisUnavailable
from activecall.call.realtime_session import attach_realtime, realtime_controller
from activecall.protocol import events as ev
from activecall.speech import registry
from activecall.speech.base import (
    AsrResult, SilenceTimeout, SpeechEnded, SpeechError, SpeechStarted,
)
from activecall.speech.eou.endpointer import TurnDecision, TurnEndpointer

log = Logger(namespace="activecall.call.speech")


def _option_dict(option) -> dict:
    if option is None:
        return {}
    return option.to_dict() if hasattr(option, "to_dict") else dict(option)


def synthesizer_factory(media_cache_path: str, reactor=None):
    """``synthesizer_for(option)`` for sessions, sharing one TTS cache."""
    from activecall.speech.cache import TtsCache

    cache = TtsCache(os.path.join(media_cache_path, "tts"))

    def synthesizer_for(option):
        try:
            return registry.create_synthesizer(_option_dict(option), cache=cache)
        except SpeechError as e:
            raise SynthesisUnavailable(str(e)) from None

    return synthesizer_for


class SpeechProcessors:
    """The VAD and recogniser of one call, fed the caller's 16 kHz frames (and the recogniser's
    end-of-turn ``endpointer``, when the call has one).

    Before them, in this order: the echo canceller and its guard (``speech/echo.py``, on unless the
    ``interruption`` options say ``echoCancel: false``; its reference is every frame the session
    sends, ``session.echo_reference``) and, with ``denoise: true``, the noise suppressor and gain
    controller (``speech/denoise.py``).  The recorder and other audio sinks get the caller's audio
    as it came."""

    #: the call's session; weak once the call has ended (activecall/backlink.py)
    session = back_link()

    def __init__(self, session, vad=None, recognizer=None, asr_provider: str = ""):
        self.session = session
        self.vad = vad
        self.recognizer = recognizer
        self.asr_provider = asr_provider
        self.endpointer = None
        self.echo = None  # speech.echo.EchoControl
        self.denoiser = None  # speech.denoise.Denoiser
        #: what the VAD and the recogniser were fed last (tests: what the recogniser hears)
        self.heard = None
        self._pending = np.zeros(0, dtype=np.int16)  # the caller's audio short of a 20 ms frame

    def feed(self, pcm) -> None:
        if self.echo is not None:
            pcm = np.asarray(pcm, dtype=np.int16).reshape(-1)
            if pcm.size != FRAME_SAMPLES or self._pending.size:
                # the guard works on 20 ms frames: a client sending other chunk sizes is re-framed
                # (at most 20 ms later), not passed on unguarded
                self._pending = np.concatenate([self._pending, pcm])
                whole = self._pending.size // FRAME_SAMPLES * FRAME_SAMPLES
                frames, self._pending = self._pending[:whole], self._pending[whole:]
                for i in range(0, whole, FRAME_SAMPLES):
                    self._feed(self.echo.process(frames[i:i + FRAME_SAMPLES])[0])
                return
            pcm, _ = self.echo.process(pcm)
        self._feed(pcm)

    def _feed(self, pcm) -> None:
        if self.denoiser is not None:
            pcm = self.denoiser.process(pcm)
        if self.heard is not None:
            self.heard(pcm)
        if self.vad is not None:
            self.vad.feed(pcm)
        if self.recognizer is not None:
            self.recognizer.feed(pcm)

    def close(self) -> defer.Deferred:
        """Finish open segments/utterances (their last events still reach the client)."""
        echo = self.echo
        if echo is not None and echo.frames:
            log.info("call {id}: echo control: {echo} of {frames} frames echo, offset {offset}, delay {delay} ms, "
                     "coupling {coupling:.2f}, {jumps} jumps, {resyncs} canceller re-placements",
                     id=getattr(self.session, "id", "?"), echo=echo.echo_frames, frames=echo.frames,
                     offset=echo.offset, delay=echo.delay_ms, coupling=echo.coupling, jumps=echo.jumps,
                     resyncs=echo.resyncs)
        ds = [defer.maybeDeferred(part.close) for part in (self.vad, self.recognizer) if part is not None]
        return defer.DeferredList(ds, consumeErrors=True)


def _narrowband(session) -> bool:
    """The caller's audio went through an 8 kHz codec (G.711 on SIP or /call)."""
    codec = session.leg.codec if session.leg is not None else None
    return codec is not None and codec.name in ("pcmu", "pcma")


def attach_end_of_turn(session, processors: SpeechProcessors, eou_option, **deps):
    """Give the recogniser a ``TurnEndpointer`` from ``eou_option`` (None or ``type: none``: nothing).

    Its verdicts become ``eou`` events (✱ with ``probability`` and ``inferenceMs``) and a
    ``metrics`` event ``eou.<type>`` with the inference time.  A recogniser that finds sentence
    ends in its service (aliyun, tencent, deepgram) or is told them (``endpointing: external``)
    keeps doing so; that is logged.  ``deps`` go to the detector (tests: ``run_in_thread``, ``model``)."""
    if eou_option is None:
        return None
    detector = registry.create_eou_detector(_option_dict(eou_option), **deps)
    if detector is None:
        return None
    s = session
    link = link_to(session)  # not a cell: the endpointer is the session's (activecall/backlink.py)

    def on_decision(decision: TurnDecision) -> None:
        s = link()
        if s is None:
            return
        inference_ms = None if decision.inference_ms is None else int(round(decision.inference_ms))
        s.emit(ev.Eou(trackId=s.id, timestamp=s.now(), completed=decision.completed,
                      probability=None if decision.probability is None else round(decision.probability, 4),
                      inferenceMs=inference_ms))
        if inference_ms is not None:
            data = {"probability": round(decision.probability, 4), "completed": decision.completed}
            if decision.early:
                data["early"] = True  # the look timed from the call VAD's speech end (docs/speech.md)
            s.emit(ev.Metrics(timestamp=s.now(), key=f"eou.{detector.name}", duration=inference_ms, data=data))

    endpointer = TurnEndpointer(s.clock, detector, detector.options, on_decision=on_decision)
    endpoint_with = getattr(processors.recognizer, "endpoint_with", None)
    if endpoint_with is None or not endpoint_with(endpointer):
        log.info("call {id}: asr provider {p} finds turn ends itself; eou {t} not used", id=s.id,
                 p=processors.asr_provider, t=detector.name)
        return None
    processors.endpointer = endpointer
    return endpointer


def _speech_ended(processors: SpeechProcessors, end_ms: int) -> None:
    """The call's VAD heard the voice end at ``end_ms``: the recogniser decodes the words so far now and
    its end-of-turn pause is timed from ``end_ms`` (``speech_ended``), not from its own webrtcvad's later
    pause (docs/speech.md, "End of turn")."""
    recognizer, vad = processors.recognizer, processors.vad
    ended = getattr(recognizer, "speech_ended", None)
    if ended is None:
        paused = getattr(recognizer, "speech_paused", None)
        if paused is not None:
            paused()
        return
    voiced_after = getattr(vad, "voiced_after", None)
    ended(end_ms, None if voiced_after is None else (lambda: not voiced_after(end_ms)))


def attach_processors(session, vad_batcher=None) -> SpeechProcessors | None:
    """Build VAD/ASR from ``session.option``; errors become ``error`` events.

    Realtime mode replaces them (the original's "realtime alone if set")."""
    option = session.option
    if (option is not None and option.realtime is not None) or realtime_controller(session) is not None:
        if option is not None and (option.vad is not None or option.asr is not None):
            log.info("call {id}: realtime mode; the vad/asr options are not used", id=session.id)
        return attach_realtime(session)
    if option is None:
        return None
    # what the call asked for, with the defaults for its language where it named no provider
    # (docs/api.md, "Speech defaults"): a call that did not ask to listen gets no VAD and no recogniser
    plan = session.speech
    if not plan.listens:
        if plan.defaulted:  # a voice chosen by the defaults (tts: {} or language, asr: false)
            _report_providers(session, None, plan)
        return None
    processors = SpeechProcessors(session)
    s = session
    # the callbacks reach the session and the processors through links, not cells: the VAD and the
    # recogniser are the processors' own, so a cell would be a reference cycle (activecall/backlink.py)
    link, processors_ref = link_to(session), weakref.ref(processors)

    def on_vad(event):
        s, processors = link(), processors_ref()
        if s is None or processors is None:
            return
        if isinstance(event, SpeechStarted):
            s.emit(ev.Speaking(trackId=s.id, timestamp=s.now(), startTime=event.start_ms, confidence=1.0))
            resumed = getattr(processors.recognizer, "speech_resumed", None)
            if resumed is not None and processors.endpointer is not None:
                resumed(event.start_ms)  # a pending end-of-turn question no longer counts
        elif isinstance(event, SpeechEnded):
            s.emit(ev.Silence(trackId=s.id, timestamp=s.now(), startTime=event.start_ms,
                              duration=event.duration_ms))
            if processors.endpointer is not None:
                _speech_ended(processors, event.end_ms)
        elif isinstance(event, SilenceTimeout):
            s.emit(ev.Silence(trackId=s.id, timestamp=s.now(), startTime=event.start_ms,
                              duration=event.duration_ms))

    def on_asr(result: AsrResult):
        s, processors = link(), processors_ref()
        if s is None or processors is None:
            return
        cls = ev.AsrFinal if result.final else ev.AsrDelta
        s.emit(cls(trackId=s.id, timestamp=s.now(), index=result.index, startTime=result.start_ms,
                   endTime=result.end_ms, text=result.text, confidence=result.confidence))
        if result.ttfb_ms is not None:
            s.emit(ev.Metrics(timestamp=s.now(), key=f"ttfb.asr.{processors.asr_provider}",
                              duration=result.ttfb_ms, data={"index": result.index}))
        if result.final:
            s.emit(ev.Transcript(trackId=s.id, timestamp=s.now(), text=result.text, index=result.index))

    try:
        if plan.vad is not None:
            deps = {"batcher": vad_batcher} if vad_batcher is not None else {}
            processors.vad = registry.create_vad(dict(plan.vad), on_vad, **deps)
        if plan.asr is not None:
            asr_options = dict(plan.asr)
            if _narrowband(s) and (asr_options.get("provider") or "pocketsphinx") == "pocketsphinx":
                # telephone audio: start pocketsphinx's cepstral mean where G.711 speech lies
                # (the first utterance of a call: WER 0.55 -> 0.05, docs/speech.md)
                extra = dict(asr_options.get("extra") or {})
                extra.setdefault("cmninit", "narrowband")
                asr_options["extra"] = extra
            processors.asr_provider = asr_options.get("provider") or "pocketsphinx"
            processors.recognizer = registry.create_recognizer(asr_options, on_asr, reactor=s.clock)
            if processors.recognizer is not None:  # None: asr.provider "none", a call that must not listen
                # a recogniser that fails mid-call (service down, key refused, a lost utterance) is
                # reported to the client like a failed TTS: error{sender:"asr", code:500}; the call goes on
                processors.recognizer.on_error = partial(_asr_failed, link)
                attach_end_of_turn(s, processors, option.eou)
    except SpeechError as e:
        processors.close()
        s.error("processor", str(e), code=400)
        return None
    _attach_front_end(s, processors, option)
    s.audio_sinks.append(processors.feed)
    _report_providers(s, processors, plan)
    return processors


def _asr_failed(link, message: str) -> None:
    session = link()
    if session is not None:
        session.error("asr", message, code=500)


def _report_providers(session, processors, plan) -> None:
    """One ``metrics`` event ``speech.providers`` saying which VAD, recogniser and voice this call runs
    (docs/speech.md, "Defaults"): ``data`` ``{vad, asr, tts, language}``, and ✱ ``defaults``, the
    sections whose provider the defaults for the language chose, when any did on this call (a playbook's
    defaults are chosen when it loads: its call lists none)."""
    tts = plan.tts or {}
    data = {
        "vad": processors.vad.name if processors is not None and processors.vad is not None else None,
        "asr": (processors.asr_provider
                if processors is not None and processors.recognizer is not None else None),
        "tts": tts.get("provider") or "flite",
        "language": (plan.asr or {}).get("language") or tts.get("language"),
    }
    if plan.defaulted:
        data["defaults"] = list(plan.defaulted)
    session.emit(ev.Metrics(timestamp=session.now(), key="speech.providers", duration=0, data=data))


def _attach_front_end(session, processors: SpeechProcessors, option) -> None:
    """Echo control, denoise and the barge-in controller's voice onset (module docstring)."""
    from activecall.speech import echo as echo_control
    from activecall.speech.denoise import Denoiser

    policy = getattr(getattr(session, "barge_in", None), "policy", None)
    echo_on = policy.echo_cancel if policy is not None else True
    if echo_on and echo_control.available():
        processors.echo = echo_control.EchoControl()
        session.echo_reference = processors.echo.reference
    elif echo_on:
        log.warn("call {id}: speexaec is not installed; no echo cancellation", id=session.id)
    if option.denoise:
        processors.denoiser = Denoiser()
    controller = getattr(session, "barge_in", None)
    if controller is not None and processors.vad is not None and hasattr(processors.vad, "on_window"):
        processors.vad.on_window = controller.voice_window
