"""What streaming recognisers share: utterance bookkeeping, the serial work chain, endpointing.

A recogniser turns 16 kHz frames into utterances.  By default it finds their
ends itself with webrtcvad (cheap enough to run inline on the reactor, and the
pre-roll buffer keeps the audio from before the VAD was sure); with
``extra.endpointing = "external"`` everything fed is one utterance until the
session calls ``end_utterance()`` (e.g. on its own silero ``SpeechEnded``).
With ``endpoint_with(endpointer)`` (semantic end of turn, ``speech/eou/``) the
VAD reports short pauses instead and the endpointer decides when the
utterance ends: at once when the end-of-turn model says the caller is done,
at its silence ceiling otherwise, never while the caller speaks again.

Decoding hooks run one job at a time per stream (the decoders are not
re-entrant): by default on a thread, chained on a Deferred.  A thread is only
right for a library that releases the GIL while it works; pocketsphinx does
not, so it overrides ``_run`` and decodes in worker processes (``pool.py``).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import implementer

from activecall.backlink import WeakMethod
from activecall.audio import SAMPLE_RATE
from activecall.speech.base import (
    AsrOptions, AsrResult, IStreamingRecognizer, OptionError, SpeechEnded, SpeechStarted, VadOptions,
)

log = Logger(namespace="activecall.speech.asr")

PRE_ROLL_MS = 200  # audio kept before the VAD's speech start


def report_error(recognizer, message: str) -> None:
    """Tell the recogniser's owner (``on_error``) that recognition failed; its bugs are logged, not raised."""
    on_error = recognizer.on_error  # IStreamingRecognizer: None until the call sets it
    if on_error is None:
        return
    try:
        on_error(message)
    except Exception:
        log.failure("ASR error handler failed on {message!r}", message=message)


def _in_thread(f, *args):
    return threads.deferToThread(f, *args)


class _Utterance:
    def __init__(self, index: int, start_sample: int, started_at: float):
        self.index = index
        self.start_sample = start_sample
        self.started_at = started_at  # reactor.seconds() when its first audio arrived
        self.answered = False
        self.pending: list[np.ndarray] = []
        self.pending_samples = 0
        self.last_text = ""
        self.flushed = False  # a pause-time decode was queued (whisper: a later quiet flush only keeps audio)
        self.decodes = 0  # decode steps queued; a step's partial is delivered only if no newer one was queued
        self.recent: list[np.ndarray] = []  # the last seconds of its audio, for an end-of-turn detector
        self.recent_samples = 0

    def keep(self, pcm: np.ndarray, limit: int) -> None:
        self.recent.append(pcm)
        self.recent_samples += pcm.size
        while self.recent_samples - self.recent[0].size >= limit:
            self.recent_samples -= self.recent.pop(0).size

    def audio(self, limit: int) -> np.ndarray:
        return np.concatenate(self.recent)[-limit:] if self.recent else np.zeros(0, dtype=np.int16)


@implementer(IStreamingRecognizer)
class StreamingRecognizer:
    """Subclasses implement ``_begin()``, ``_decode(pcm) -> partial text`` and ``_finish(pcm) -> text``,
    called in order through ``_run`` (on the worker thread by default)."""

    name = "recognizer"
    partial_every_ms = 320  # how much audio to gather before each decode step
    on_error: Optional[Callable[[str], None]] = None  # set by the call: failures become ``error`` events

    def __init__(self, options: AsrOptions, on_result: Callable[[AsrResult], None], reactor=None,
                 run_in_thread: Callable = _in_thread):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.options = options
        self.on_result = on_result
        self.run_in_thread = run_in_thread
        mode = options.extra.get("endpointing", "vad")
        if mode not in ("vad", "external"):
            raise OptionError(f"asr.extra.endpointing: 'vad' or 'external', got {mode!r}")
        self._vad = self._make_vad(int(options.extra.get("silence_ms", 500))) if mode == "vad" else None
        self._endpointer = None
        self._chain: defer.Deferred = defer.succeed(None)  # the thread jobs, one after another
        self._last: defer.Deferred = defer.succeed(None)  # the newest job's result
        self._fed = 0  # samples fed so far (stream clock)
        self._ring = np.zeros(0, dtype=np.int16)  # recent audio, ends at self._fed
        self._utt: Optional[_Utterance] = None
        self._next_index = 0
        self.closed = False

    def _make_vad(self, silence_ms: int):
        from activecall.speech.vad.webrtc import WebRtcVad
        return WebRtcVad(VadOptions(type="webrtcvad", speechPadding=150, silencePadding=silence_ms, mode=2),
                         WeakMethod(self._on_vad))  # the VAD is ours: no reference cycle

    def endpoint_with(self, endpointer) -> bool:
        """Let ``endpointer`` (``speech.eou.endpointer.TurnEndpointer``) end the utterances: the VAD now
        reports pauses of its ``pause_ms``, and the endpointer's ``on_end`` finalises.  Call before the
        first ``feed``.  False (nothing changed) when the session ends utterances (``endpointing: external``)."""
        if self._vad is None:
            return False
        self._vad = self._make_vad(endpointer.pause_ms)
        self._endpointer = endpointer
        self._turn_samples = endpointer.audio_ms * SAMPLE_RATE // 1000
        endpointer.on_end = WeakMethod(self.end_utterance)  # no cycle: the endpointer is ours
        return True

    # -- feeding -----------------------------------------------------------------------------

    def feed(self, pcm) -> None:
        if self.closed:
            return
        pcm = np.asarray(pcm, dtype=np.int16).reshape(-1)
        self._fed += pcm.size
        keep = (PRE_ROLL_MS + 400) * SAMPLE_RATE // 1000
        self._ring = np.concatenate([self._ring, pcm])[-keep:]
        if self._vad is None:
            if self._utt is None:
                self._start(self._fed - pcm.size, pcm)
            else:
                self._add(pcm)
            return
        was_open = self._utt is not None
        self._vad.feed(pcm)  # may open (with pre-roll, this frame included) or close the utterance
        if was_open and self._utt is not None:
            self._add(pcm)

    def _on_vad(self, event) -> None:
        if isinstance(event, SpeechStarted) and self._utt is None:
            start = max(0, event.start_ms * SAMPLE_RATE // 1000 - PRE_ROLL_MS * SAMPLE_RATE // 1000)
            start = max(start, self._fed - self._ring.size)
            self._start(start, self._ring[start - (self._fed - self._ring.size):])
        elif isinstance(event, SpeechStarted) and self._endpointer is not None:
            self._endpointer.resumed()  # speech again inside the turn: same utterance
        elif isinstance(event, SpeechEnded) and self._utt is not None:
            if self._endpointer is None:
                self._end()
            else:
                if not self._endpointer.waiting:  # else the call's VAD saw this pause first: decoded then
                    self._flush(self._utt)
                self._endpointer.paused(self._utt.audio(self._turn_samples))

    def speech_paused(self) -> None:
        """The call's own VAD (silero, on its windows) says the caller stopped speaking: decode what is
        pending now.  Silero sees a word's end before this recogniser's webrtcvad does, so the words so far
        (an ``asrDelta``, a speculative reply's input) and, if only quiet follows, the final are ready
        earlier than at the recogniser's own pause; nothing else changes (the end of turn is decided as
        before)."""
        if self._utt is not None and not self.closed:
            self._flush(self._utt)

    def speech_ended(self, end_ms: int, still_quiet: Optional[Callable[[], bool]] = None) -> None:
        """The call's VAD says the voice stopped at ``end_ms`` (stream time; the VAD is fed the same audio):
        decode the words so far now (``speech_paused``) and, with an endpointer, time its pause from there
        (``TurnEndpointer.speech_ended``): the end-of-turn question comes ``pauseMs`` after ``end_ms``
        instead of ``pauseMs`` after this recogniser's webrtcvad stops hearing voice (~100 ms later: it
        hears a word's tail longer).  ``still_quiet()``: no voice since ``end_ms`` (the VAD's view)."""
        self.speech_paused()
        utt = self._utt
        if utt is None or self._endpointer is None or self.closed:
            return
        turn_samples = self._turn_samples

        def audio():
            return utt.audio(turn_samples) if self._utt is utt else None

        self._endpointer.speech_ended(self._ms(self._fed) - end_ms, audio, still_quiet)

    def speech_resumed(self, start_ms: int) -> None:
        """The call's VAD hears the caller again (its ``SpeechStarted``, voice since ``start_ms``): a pending
        end-of-turn question no longer counts; and if the turn was ended meanwhile while this recogniser's
        webrtcvad was still inside its segment (so it will not report a start), the new utterance opens
        here, with its pre-roll, rather than losing the words."""
        if self.closed or self._endpointer is None or not self._endpointer.early_look:
            return
        if self._utt is not None:
            self._endpointer.resumed()
        elif self._vad is not None and self._vad.segmenter.speaking:
            self._on_vad(SpeechStarted(start_ms))

    def end_utterance(self) -> None:
        if self._utt is not None:
            self._end()

    def close(self) -> defer.Deferred:
        """Finalise an open utterance; fires after its result was delivered."""
        if not self.closed:
            self.closed = True
            self.end_utterance()
        d = defer.Deferred()
        self._last.addBoth(lambda r: (d.callback(None), r)[1])
        return d

    # -- utterances --------------------------------------------------------------------------

    def _start(self, start_sample: int, pcm: np.ndarray) -> None:
        utt = _Utterance(self._next_index, start_sample, self.reactor.seconds())
        self._next_index += 1
        self._utt = utt
        self._enqueue(self._begin).addCallback(lambda _: None)
        self._add(pcm)

    def _add(self, pcm: np.ndarray) -> None:
        utt = self._utt
        if self._endpointer is not None:
            utt.keep(pcm, self._turn_samples)
        utt.pending.append(pcm)
        utt.pending_samples += pcm.size
        if utt.pending_samples * 1000 >= self.partial_every_ms * SAMPLE_RATE:
            self._decode_step(utt, self._take(utt))

    def _flush(self, utt: _Utterance) -> None:
        """Decode what is pending now (the caller paused): while the end of turn is being judged the decoder
        catches up, so only the pause's audio and the decoder's end-of-utterance work remain for the final,
        and the partial for the words so far arrives at the pause (a preemptive reply can start on it; it is
        sent even when its words are those of the last partial, as the sign that they are all there is)."""
        if utt.pending_samples:
            self._decode_step(utt, self._take(utt), pause=True)

    def _decode_step(self, utt: _Utterance, audio: np.ndarray, pause: bool = False) -> None:
        utt.decodes += 1
        self._enqueue(self._decode, audio).addCallback(self._partial, utt, utt.decodes, pause)

    def _take(self, utt: _Utterance) -> np.ndarray:
        audio = np.concatenate(utt.pending) if utt.pending else np.zeros(0, dtype=np.int16)
        utt.pending, utt.pending_samples = [], 0
        return audio

    def _end(self) -> None:
        utt, self._utt = self._utt, None
        if self._endpointer is not None:
            self._endpointer.reset()
        end_sample = self._fed
        self._enqueue(self._finish, self._take(utt)).addCallback(self._final, utt, end_sample)

    def _enqueue(self, fn, *args) -> defer.Deferred:
        """Run the hook ``fn`` after every job queued before it; fires with its result (None if it failed)."""
        result = defer.Deferred()

        def failed(f):
            self._failed(f)
            return None

        defer.maybeDeferred(self._run, fn, *args).addErrback(failed).chainDeferred(result)
        self._last = result
        return result

    def _run(self, fn, *args) -> defer.Deferred:
        """``fn(*args)`` via ``run_in_thread``, one at a time (decoders are not re-entrant).

        Subclasses whose hooks already return Deferreds answered in order (the
        worker-process recognisers) override this to pipeline instead."""
        done = defer.Deferred()
        self._chain.addCallback(lambda _: defer.maybeDeferred(self.run_in_thread, fn, *args).chainDeferred(done))
        return done

    def _failed(self, failure) -> None:
        log.failure("{name} decoding failed", failure, name=self.name)
        report_error(self, f"{self.name} decoding failed: {failure.getErrorMessage()}")

    def _ms(self, sample: int) -> int:
        return sample * 1000 // SAMPLE_RATE

    def _ttfb(self, utt: _Utterance) -> Optional[int]:
        if utt.answered:
            return None
        utt.answered = True
        return int((self.reactor.seconds() - utt.started_at) * 1000)

    def _partial(self, text: Optional[str], utt: _Utterance, step: Optional[int] = None,
                 pause: bool = False) -> None:
        if not text or (text == utt.last_text and not pause):
            return
        if step is not None and step < utt.decodes:
            return  # a newer step (e.g. the pause's) is queued: its words supersede these
        utt.last_text = text
        self._deliver(AsrResult(index=utt.index, text=text, final=False, start_ms=self._ms(utt.start_sample),
                                end_ms=self._ms(self._fed), ttfb_ms=self._ttfb(utt)))

    def _final(self, text: Optional[str], utt: _Utterance, end_sample: int) -> None:
        if not text:
            return
        self._deliver(AsrResult(index=utt.index, text=text, final=True, start_ms=self._ms(utt.start_sample),
                                end_ms=self._ms(end_sample), ttfb_ms=self._ttfb(utt)))

    def _deliver(self, result: AsrResult) -> None:
        try:
            self.on_result(result)
        except Exception:
            log.failure("ASR result handler failed on {result!r}", result=result)

    # -- decoder hooks (through _run) -----------------------------------------------------------

    def _begin(self) -> None:
        raise NotImplementedError

    def _decode(self, pcm: np.ndarray) -> Optional[str]:
        raise NotImplementedError

    def _finish(self, pcm: np.ndarray) -> Optional[str]:
        raise NotImplementedError
