"""Per-turn latency: where the time between the caller's last word and the bot's first
audio frame went (issue 20).

``TurnTiming`` listens to a call's events (it is one of ``session.listeners``) and to the
caller's inbound frames (one of ``session.audio_sinks``, only to map the VAD's stream time to
the clock), and is told by two small hooks when the bot's TTS produced its first samples
(``Playback.audio_observer``) and when the first frame of the reply went out
(``CallSession.tick``).  For each turn it emits one ``metrics`` event

    key "turn.latency", duration = first_frame_ms,
    data {speech_end, eou_ms, asr_final_ms, llm_start_ms, llm_first_token_ms,
          tts_first_audio_ms, first_frame_ms}

every ``*_ms`` measured from the end of the caller's speech as the VAD saw it (the wall time the
frame holding the last voiced sample reached the daemon), a field ``None`` when the stage did
not happen in that turn (no end-of-turn model, no LLM: a /call client that answers itself), and
observes the ``activecall_turn_*_seconds`` histograms (metrics.py).

A turn starts at ``eou{completed: true}``, or at an ``asrFinal`` when no end-of-turn model
ended it (cloud recognisers that cut sentences themselves).  The caller's speech end is the
last ``silence`` (VAD segment end) before the turn started — it may arrive after the ``eou``
when the VAD's ``silencePadding`` is longer than the end-of-turn pause — else the
``asrFinal``'s ``endTime``.  The LLM's first token comes from the playbook's ``llm_response``
metrics (``timestamp - duration`` = request sent, ``+ ttfb`` = first token), which arrives when
the reply's stream closes: the turn is reported on its first frame once that is known, else
when the next turn starts or the call ends.
"""

from __future__ import annotations

from collections import deque
from typing import Optional

from activecall.backlink import back_link
from activecall.protocol import events as ev

SAMPLES_PER_MS = 16
#: stream-time → clock samples kept (one per inbound frame: 20 s at 20 ms)
_HISTORY = 1000

FIELDS = ("eou_ms", "asr_final_ms", "llm_start_ms", "llm_first_token_ms", "tts_first_audio_ms",
          "first_frame_ms")


class _Turn:
    __slots__ = ("started", "speech_end", "eou", "asr_final", "asr_end_stream", "llm_start",
                 "llm_first_token", "llm_done", "tts_first_audio", "first_frame", "reported")

    def __init__(self, started: float):
        self.started = started
        self.speech_end: Optional[float] = None
        self.eou: Optional[float] = None
        self.asr_final: Optional[float] = None
        self.asr_end_stream: Optional[int] = None
        self.llm_start: Optional[float] = None
        self.llm_first_token: Optional[float] = None
        self.llm_done = False
        self.tts_first_audio: Optional[float] = None
        self.first_frame: Optional[float] = None
        self.reported = False


class TurnTiming:
    """The per-turn latency breakdown of one call (see the module docstring)."""

    #: the call's session; weak once the call has ended (activecall/backlink.py)
    session = back_link()

    def __init__(self, session, metrics=None):
        self.session = session
        self.clock = session.clock
        self.metrics = metrics
        self._stream_ms = 0
        self._frames: deque = deque(maxlen=_HISTORY)  # (stream ms at the frame's end, clock)
        self._last_speech_end: Optional[float] = None
        self.turn: Optional[_Turn] = None
        self._speaking = False
        self._previous_started: Optional[float] = None
        #: True while the session should tell us about its next outbound frame
        self.wants_frame = False

    @classmethod
    def attach(cls, session, metrics=None) -> "TurnTiming":
        timing = cls(session, metrics)
        session.listeners.append(timing.event)
        session.audio_sinks.append(timing.audio)
        session.playback.audio_observer = timing.tts_audio
        session.turn_timing = timing
        return timing

    # -- inputs --------------------------------------------------------------------------------

    def audio(self, pcm) -> None:
        """An inbound 16 kHz frame, as the VAD and recogniser get it."""
        self._stream_ms += len(pcm) // SAMPLES_PER_MS
        self._frames.append((self._stream_ms, self.clock.seconds()))

    def stream_to_clock(self, stream_ms: int) -> Optional[float]:
        """The clock time the frame holding stream position ``stream_ms`` arrived."""
        for end, when in self._frames:
            if end >= stream_ms:
                return when
        return None

    def tts_audio(self, track) -> None:
        """The bot's TTS produced samples (first call per turn counts)."""
        t = self.turn
        if t is not None and t.tts_first_audio is None and t.first_frame is None:
            t.tts_first_audio = self.clock.seconds()

    def frame_out(self, frame) -> None:
        """The session handed the leg a bot frame while ``wants_frame``."""
        t = self.turn
        if t is None or t.first_frame is not None:
            self.wants_frame = False
            return
        if not frame.any():
            return  # silence (a muted bot, leading zeros): not the reply yet
        t.first_frame = self.clock.seconds()
        self.wants_frame = False
        if t.llm_done:
            self._report(t)

    def event(self, event) -> None:
        now = self.clock.seconds()
        if isinstance(event, ev.Speaking):
            self._speaking = True
        elif isinstance(event, ev.Silence):
            # the first silence after speaking closes the VAD's segment (startTime + voiced
            # duration); later ones are silence timeouts (the quiet's start and length)
            if self._speaking and event.duration is not None and event.startTime is not None:
                self._speaking = False
                end = self.stream_to_clock(event.startTime + event.duration)
                if end is not None:
                    self._last_speech_end = end
                    t = self.turn
                    if t is not None and t.speech_end is None and end <= t.started:
                        t.speech_end = end
        elif isinstance(event, ev.Eou):
            if event.completed:
                self._start(now).eou = now
        elif isinstance(event, ev.AsrFinal):
            t = self.turn
            if t is None or t.asr_final is not None or t.first_frame is not None:
                t = self._start(now)
            t.asr_final = now
            t.asr_end_stream = event.endTime
        elif isinstance(event, ev.Metrics) and event.key == "llm_response":
            t = self.turn
            if t is None or t.llm_done:
                return
            data = event.data or {}
            t.llm_start = (event.timestamp - (event.duration or 0)) / 1000.0
            ttfb = data.get("ttfb")
            if ttfb is not None:
                t.llm_first_token = t.llm_start + ttfb / 1000.0
            t.llm_done = True
            if t.first_frame is not None:
                self._report(t)
        elif isinstance(event, (ev.End, ev.Hangup)):
            if self.turn is not None:
                self._report(self.turn)
            self.wants_frame = False
            if isinstance(event, ev.End):
                # the call's last event: its frame history (up to _HISTORY tuples) goes now, by
                # reference count, not with the session's reference cycles at the next full GC
                self._frames.clear()

    # -- turns ---------------------------------------------------------------------------------

    def _start(self, now: float) -> _Turn:
        if self.turn is not None:
            self._report(self.turn)
        t = _Turn(now)
        if self._last_speech_end is not None and self._last_speech_end <= now and (
                self._previous_started is None or self._last_speech_end > self._previous_started):
            t.speech_end = self._last_speech_end
        self._previous_started = now
        self.turn = t
        self.wants_frame = True
        return t

    def breakdown(self, t: _Turn) -> Optional[dict]:
        origin = t.speech_end
        if origin is None and t.asr_end_stream is not None:
            origin = self.stream_to_clock(t.asr_end_stream)
        if origin is None:
            return None

        def ms(when):
            return None if when is None else int(round((when - origin) * 1000))

        return {"eou_ms": ms(t.eou), "asr_final_ms": ms(t.asr_final), "llm_start_ms": ms(t.llm_start),
                "llm_first_token_ms": ms(t.llm_first_token), "tts_first_audio_ms": ms(t.tts_first_audio),
                "first_frame_ms": ms(t.first_frame), "speech_end": int(round(origin * 1000))}

    def _report(self, t: _Turn) -> None:
        if t.reported:
            return
        t.reported = True
        if t is self.turn:
            self.wants_frame = False
        if t.first_frame is None:
            return  # no reply to this turn (an empty final, a hang-up): nothing to measure
        data = self.breakdown(t)
        if data is None:
            return
        s = self.session
        s.emit(ev.Metrics(timestamp=s.now(), key="turn.latency", duration=data["first_frame_ms"], data=data))
        if self.metrics is not None:
            self.metrics.observe_turn(data)
