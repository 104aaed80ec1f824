"""The server-side track of a call: ``tts``, ``play``, ``interrupt``, ``pause``.

One active track at a time, with active-call's playId rules (docs/api.md, "Tracks and playId"):

- ``tts`` with the active TTS track's playId (both absent counts as equal)
  queues its text on that track: no new trackStart, no interruption;
- a different playId, or any ``play``, stops the active track
  (``interruption`` first if it was TTS and had started, then ``trackEnd``)
  and starts a new one (``trackStart``);
- a TTS track ends only after ``endOfStream`` and once all audio was played;
- ``autoHangup`` / ``waitInputTimeout`` act on the natural end of the
  *current* track only, never on an interrupted or superseded one.

Synthesis is serial per track: texts are synthesised one after another and
their audio appended, so sentences play in order.

Speech can also be synthesised ahead of its turn (``prepare``: a speculative
reply's first sentence while the end of turn is still being judged).  A
``PreparedSpeech`` is a track that is not the current one: nothing of it is
sent and no event names it until a ``tts`` command with the play id it was
``claim``-ed for and the same text adopts it (its buffered audio plays from the
next tick); ``cancel`` drops it and cancels its synthesis.
"""

from __future__ import annotations

import base64
import binascii
from collections import deque
from typing import Callable, Optional

import numpy as np
from twisted.internet import defer
from twisted.logger import Logger

from activecall.media.tracks import FileTrack, MediaLoader, Track, TrackError, TtsTrack
from activecall.protocol import events as ev

log = Logger(namespace="activecall.playback")


class SynthesisUnavailable(Exception):
    """No TTS option/provider for a ``tts`` command."""


class PreparedSpeech:
    """One text synthesised into a track that is not playing (``Playback.prepare``).

    ``claim(play_id)`` says which ``tts`` command may adopt it (the turn was confirmed); until then
    it can only be dropped (``cancel``).  ``done``/``failed``: its synthesis finished / failed."""

    def __init__(self, text: str, track: TtsTrack, provider, started: float):
        self.text = text
        self.track = track
        self.provider = provider
        self.started = started
        self.d: Optional[defer.Deferred] = None
        self.play_id: Optional[str] = None  # claimed for this play id
        self.done = False
        self.failed = False
        self.cancelled = False
        self.adopted = False
        self.observer: Optional[Callable[[Track], None]] = None  # set on adoption (call/turn_timing.py)

    @property
    def samples(self) -> int:
        return len(self.track.buffer)

    def claim(self, play_id: str) -> None:
        self.play_id = play_id

    def cancel(self) -> None:
        """Drop it: its synthesis is cancelled, its audio forgotten (never sent)."""
        if self.adopted or self.cancelled:
            return
        self.cancelled = True
        self.track.stop()
        if self.d is not None and not self.d.called:
            self.d.cancel()


class Playback:
    """Owns the server-side track; the session drives ``tick`` and receives events."""

    def __init__(self, track_id: str, emit: Callable[[ev.Event], None], clock,
                 synthesizer_for: Callable, loader: Optional[MediaLoader] = None,
                 on_track_done: Callable[[Track], None] = lambda t: None):
        self.track_id = track_id
        self.emit = emit
        self.clock = clock
        self.synthesizer_for = synthesizer_for  # SynthesisOption -> provider, raises SynthesisUnavailable
        self.loader = loader
        self.on_track_done = on_track_done
        self.current: Optional[Track] = None
        self.paused = False
        #: held by a barge-in (call/barge_in.py): the track keeps its place, nothing is sent
        self.held = False
        self._fade_out = 0  # frames left of the fade before the hold
        self._fade_in = 0  # frames left of the fade after it
        self._fade_frames = 1
        self._queue: deque = deque()  # (text, is_base64, option) waiting for the current TTS track
        self._synthesis: Optional[defer.Deferred] = None
        self._eos_requested = False
        #: told ``(track)`` each time a synthesiser hands a TTS track samples (call/turn_timing.py)
        self.audio_observer: Optional[Callable[[Track], None]] = None
        #: speech synthesised ahead of its turn, waiting to be adopted or dropped (``prepare``)
        self.prepared: Optional[PreparedSpeech] = None

    # -- commands -----------------------------------------------------------------------------

    def tts(self, text: str, option, play_id: Optional[str] = None, end_of_stream: bool = False,
            auto_hangup: Optional[bool] = None, wait_input_timeout: Optional[int] = None,
            is_base64: bool = False) -> None:
        """Queue ``text`` on the current TTS track or start a new one (playId rules)."""
        provider = None if is_base64 else self.synthesizer_for(option)  # may raise
        track = self.current
        if not (isinstance(track, TtsTrack) and not track.stopped and track.play_id == play_id
                and not track.eos):
            prepared = self.prepared
            if (prepared is not None and not is_base64 and prepared.play_id is not None
                    and prepared.play_id == play_id and prepared.text == text
                    and not prepared.cancelled and not prepared.failed):
                self._adopt(prepared, auto_hangup, wait_input_timeout, end_of_stream)
                return
            self.stop_current(interrupted=True)
            track = TtsTrack(self.track_id, play_id)
            self._eos_requested = False
            self._start(track)
        track.auto_hangup = bool(auto_hangup)
        track.wait_input_timeout = wait_input_timeout
        if text:
            self._queue.append((text, is_base64, provider))
            track.segments.append(text)
        if end_of_stream:
            self._eos_requested = True
        self._pump()

    def prepare(self, text: str, option) -> PreparedSpeech:
        """Synthesise ``text`` now into a track that does not play (see the module docstring); it
        replaces (cancels) any earlier prepared speech.  Raises ``SynthesisUnavailable``."""
        provider = self.synthesizer_for(option)  # may raise
        if self.prepared is not None:
            self.prepared.cancel()
        prepared = PreparedSpeech(text, TtsTrack(self.track_id, None), provider, self.clock.seconds())
        self.prepared = prepared

        def feed(pcm):
            if prepared.observer is not None:
                prepared.observer(prepared.track)
            prepared.track.feed(pcm, trim_lead_in=True)

        def done(result):
            prepared.done = True
            return result

        def failed(failure):
            if prepared.adopted:
                return failure  # the playing track's synthesis: reported like any other (_synthesis_failed)
            if not failure.check(defer.CancelledError):
                prepared.failed = True
                log.warn("speculative synthesis failed: {e}", e=failure.getErrorMessage())
            if self.prepared is prepared:
                self.prepared = None
            return None

        prepared.d = defer.maybeDeferred(provider.synthesize, text, feed)
        prepared.d.addCallbacks(done, failed)
        return prepared

    def _adopt(self, prepared: PreparedSpeech, auto_hangup, wait_input_timeout, end_of_stream) -> None:
        """A confirmed ``tts`` whose first text was prepared: its track becomes the current one (the
        audio already synthesised plays from the next tick), the synthesis still running feeds it."""
        self.prepared = None
        self.stop_current(interrupted=True)
        prepared.adopted = True
        track = prepared.track
        track.play_id = prepared.play_id
        self._eos_requested = False
        self._start(track)
        track.auto_hangup = bool(auto_hangup)
        track.wait_input_timeout = wait_input_timeout
        track.segments.append(prepared.text)
        if end_of_stream:
            self._eos_requested = True
        observer = self.audio_observer
        prepared.observer = observer
        if observer is not None and (prepared.samples or track.lead_in_trimmed):
            observer(track)
        if prepared.done:
            self._completed(prepared.provider, track, prepared.text, prepared.started)
            self._pump()
            return
        d = prepared.d
        self._synthesis = d
        d.addCallbacks(self._synthesised, self._synthesis_failed,
                       callbackArgs=(d, prepared.provider, track, prepared.text, prepared.started),
                       errbackArgs=(d,))

    @defer.inlineCallbacks
    def play(self, url: str, play_id: str, auto_hangup: Optional[bool] = None,
             wait_input_timeout: Optional[int] = None):
        """Replace whatever plays with the file at ``url``."""
        self.stop_current(interrupted=True)
        track = FileTrack(self.track_id, play_id, url)
        track.auto_hangup = bool(auto_hangup)
        track.wait_input_timeout = wait_input_timeout
        self._start(track)
        try:
            pcm = yield self.loader.load(url)
        except (TrackError, Exception) as e:
            if self.current is track:
                self.emit(ev.Error(trackId=self.track_id, timestamp=ev.now_ms(self.clock),
                                   sender=f"filetrack: {url}", error=str(e)))
                track.set_audio(np.zeros(0, dtype=np.int16))
            return
        if not track.stopped:
            track.set_audio(pcm)

    def start_track(self, track: Track) -> None:
        """Replace whatever plays with ``track`` (a bridge to another party, for instance)."""
        self.stop_current(interrupted=True)
        self._start(track)

    def interrupt(self, graceful: bool = False) -> None:
        """Stop the server-side track; ``graceful`` lets the sentence being spoken finish."""
        track = self.current
        if track is None:
            return
        if graceful and isinstance(track, TtsTrack) and not track.stopped:
            self._queue.clear()
            self._eos_requested = True
            track.auto_hangup = False
            track.wait_input_timeout = None
            if self._synthesis is None:
                track.end_of_stream()
            return
        self.stop_current(interrupted=True)

    def pause(self) -> None:
        self.paused = True
        if self.current is not None:
            self.current.paused = True

    def resume(self) -> None:
        self.paused = False
        if self.current is not None:
            self.current.paused = False

    def hold(self, fade_ms: int = 20) -> None:
        """Barge-in pause: fade out over ``fade_ms`` (whole 20 ms frames, at least one), then send
        nothing; the track keeps its place for ``release``."""
        if self.held:
            return
        self.held = True
        self._fade_frames = max(1, int(fade_ms) // 20)
        self._fade_out, self._fade_in = self._fade_frames, 0

    def release(self, fade_ms: int = 20) -> None:
        """End a ``hold``: the track goes on where it stopped, fading in."""
        if not self.held:
            return
        self.held = False
        self._fade_frames = max(1, int(fade_ms) // 20)
        self._fade_in, self._fade_out = self._fade_frames, 0

    def _unhold(self) -> None:
        self.held = False
        self._fade_in = self._fade_out = 0

    def stop_current(self, interrupted: bool = True) -> None:
        track = self.current
        self._unhold()
        if track is None or track.stopped:
            return
        self._queue.clear()
        if self._synthesis is not None:
            d, self._synthesis = self._synthesis, None
            d.cancel()
        if interrupted and isinstance(track, TtsTrack) and track.started:
            self.emit(ev.Interruption(
                trackId=self.track_id, timestamp=ev.now_ms(self.clock), playId=track.play_id,
                subtitle=" ".join(track.segments) or None, current=track.played_ms,
                totalDuration=track.played_ms + int(len(track.buffer) / 16),
            ))
        track.interrupted = interrupted
        track.stop()

    # -- media clock ---------------------------------------------------------------------------

    def tick(self) -> Optional[np.ndarray]:
        """The frame due now from the current track (None: nothing to send)."""
        track = self.current
        if track is None or self.paused or (self.held and self._fade_out <= 0):
            return None
        frame = track.next_frame()
        if frame is None or not (self._fade_out or self._fade_in):
            return frame
        n = self._fade_frames
        if self.held:  # fading out: gain from left/n down to (left-1)/n
            left = self._fade_out
            self._fade_out -= 1
            ramp = np.linspace(left / n, (left - 1) / n, frame.size, endpoint=False)
        else:
            done = n - self._fade_in
            self._fade_in -= 1
            ramp = np.linspace(done / n, (done + 1) / n, frame.size, endpoint=False)
        return (frame.astype(np.float32) * ramp).astype(np.int16)

    # -- internals ----------------------------------------------------------------------------

    def _start(self, track: Track) -> None:
        self._unhold()
        track.interrupted = False
        track.paused = self.paused
        self.current = track
        self.emit(ev.TrackStart(trackId=self.track_id, timestamp=ev.now_ms(self.clock),
                                playId=track.play_id))
        track.ended.addCallback(self._ended)

    def _ended(self, track: Track) -> None:
        self.emit(ev.TrackEnd(trackId=self.track_id, timestamp=ev.now_ms(self.clock),
                              duration=track.played_ms, ssrc=track.ssrc, playId=track.play_id))
        if self.current is track:
            self.current = None
        if not track.interrupted:
            self.on_track_done(track)

    def _pump(self) -> None:
        """Synthesise queued texts one at a time into the current TTS track."""
        track = self.current
        if self._synthesis is not None or not isinstance(track, TtsTrack) or track.stopped:
            return
        if not self._queue:
            if self._eos_requested:
                track.end_of_stream()
            return
        text, is_base64, provider = self._queue.popleft()
        if is_base64:
            try:
                pcm = np.frombuffer(base64.b64decode(text, validate=True), dtype="<i2")
                if self.audio_observer is not None:
                    self.audio_observer(track)
                track.feed(pcm)
            except (binascii.Error, ValueError) as e:
                self._report_tts_error(f"invalid base64 PCM: {e}")
            self._pump()
            return
        started = self.clock.seconds()
        observer = self.audio_observer
        track.spans.append((track.fed, text))

        def feed(pcm, track=track):  # synthesised: the track's lead-in silence is trimmed
            if observer is not None:
                observer(track)
            track.feed(pcm, trim_lead_in=True)

        d = defer.maybeDeferred(provider.synthesize, text, feed)
        self._synthesis = d
        d.addCallbacks(self._synthesised, self._synthesis_failed,
                       callbackArgs=(d, provider, track, text, started), errbackArgs=(d,))

    def _synthesised(self, result, d, provider, track, text, started) -> None:
        if self._synthesis is d:
            self._synthesis = None
            self._completed(provider, track, text, started)
            self._pump()

    def _completed(self, provider, track, text, started) -> None:
        self.emit(ev.Metrics(
            timestamp=ev.now_ms(self.clock), key=f"completed.tts.{provider.name}",
            duration=int((self.clock.seconds() - started) * 1000),
            data={"playId": track.play_id, "length": len(text)},
        ))

    def _synthesis_failed(self, failure, d) -> None:
        if failure.check(defer.CancelledError):
            return None
        if self._synthesis is d:
            self._synthesis = None
            self._report_tts_error(str(failure.value))
            self._pump()

    def _report_tts_error(self, message: str) -> None:
        self.emit(ev.Error(trackId=self.track_id, timestamp=ev.now_ms(self.clock), sender="tts",
                           error=message, code=500))
