"""Echo control on the caller's audio: the bot's own voice must never count as the caller's.

A phone line sends part of what we play back to us (a speakerphone, a 2-/4-wire hybrid): 20–200 ms
late, 6–20 dB quieter, coloured.  Two stages, both fed the audio we actually sent (``reference``):

1. **SpeexDSP's echo canceller** (MDF, through the ``speexaec`` package; docs/speech.md, "Echo"
   has the measurements that chose it over WebRTC's AEC3): a linear adaptive filter over a 300 ms
   tail.  It never touches the caller when there is no echo, but needs about a second of the bot's
   speech to converge.
   It is fed a continuous stream of what was sent, kept 100 ms ahead of where the echo is (below), so
   the echo falls inside its tail however late it comes; it jumps there when the offset moves.
2. **A guard** for that first second and for what the filter leaves: a frame counts as echo when
   the filter removed most of its energy (the echo path is known), when the last 100 ms of the
   raw input correlate with the sent audio where the echo is expected (telephone band), or when it
   is no louder than the bot's echo can be (Geigel's double-talk test, with the line's coupling
   learned on the correlated frames).  Echo frames are passed on as silence, so the VAD and the
   recogniser hear nothing of them.  A caller talking over the bot makes the input unlike the
   reference (and the filter removes little): those frames pass.

**Where the echo is** is kept by *stream position*, not by when frames are handled: inbound sample r
returns sent sample r - ``offset``.  On a real socket the time between sending a frame and handling
its echo moves by hundreds of ms (a busy reactor handles a bunch of inbound packets at once, the media
clock catches up in bursts), but the two streams' positions move only when the far end's playout
skips (a late packet played as a gap, a jitter buffer growing).  The tracker finds the offset on 400 ms
windows against up to 1.5 s of sent audio; each frame is then compared around it only (chance likeness
with a caller's voice stays rare), and the canceller is fed a continuous stream kept 100 ms ahead of
it.  When the far end skipped, the echo is no longer near the offset: a frame unlike the audio there
is compared with every lag, and a strong likeness (``WIDE_CORRELATION``) counts as echo and moves the
offset at once.  A canceller output louder than its input (a filter misaligned by a skip, subtracting
an echo that is not there) is never passed on: the input is.

``process`` is called once per inbound frame and ``reference`` once per outbound one, both on the
reactor thread (a few hundred microseconds a frame, measured in bench/bench_echo.py).
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np

from activecall.audio import FRAME_SAMPLES, SAMPLE_RATE

#: echo tail the filter covers (ms); the goal is echo up to 200 ms late, plus jitter
TAIL_MS = 300
#: the canceller's reference may be this many frames from its target position (where the echo is,
#: less a margin) before it jumps there
RESYNC_FRAMES = 3
#: the guard's analysis window (ms of inbound audio) and the delays it searches (ms) before it knows
#: the line's delay
WINDOW_MS = 100
MAX_DELAY_MS = 300
#: where the echo is, is tracked: every TRACK_EVERY frames while the bot sounds, the last TRACK_MS
#: of inbound audio are correlated with up to FAR_MS of what was sent; a peak of TRACK_MIN or more
#: sets the offset (a 400 ms window makes chance peaks rare).  Then each frame searches NARROW_MS
#: around it only.  The canceller is fed the sent stream DELAY_MARGIN_MS ahead of the echo.
FAR_MS = 1500
TRACK_MS = 400
TRACK_EVERY = 5
TRACK_MIN = 0.5
NARROW_MS = 100
#: a frame unlike the sent audio around the offset but this like it at another lag (its last
#: WIDE_WINDOW_MS: short, as the window must not straddle the skip) is echo, and the offset moves there
#: (the far end's playout skipped); before the offset is known, the last WINDOW_MS and this correlation
WIDE_CORRELATION = 0.85
WIDE_WINDOW_MS = 60
UNKNOWN_WIDE_CORRELATION = 0.8
#: ... and a frame quieter than this (-40 dBFS) with some likeness anywhere gets Geigel's test there
FAINT_POWER = (32768 * 10 ** (-40 / 20)) ** 2
DELAY_MARGIN_MS = 100
#: normalised correlation at or above which the window is the bot's echo (flite speech, docs/speech.md:
#: band-limited, 95% of echo frames score 0.7-0.94, another voice at most 0.62)
CORRELATION = 0.7
#: the guard compares the telephone band only (a G.711 line returns nothing above 4 kHz)
BAND_HZ = (250.0, 3600.0)
BAND_TAPS = 63
DECIMATE = 2
GUARD_RATE = SAMPLE_RATE // DECIMATE
#: the filter removing this much (dB) means the frame is mostly echo
CANCELLED_DB = 6.0
#: Geigel's double-talk test: the inbound peak must exceed the learned coupling times the sent peak
#: (over the searched delays) by this factor to count as the caller's
GEIGEL_MARGIN = 1.25
#: frames of correlated echo needed before the coupling is trusted, and its per-frame forgetting
COUPLING_FRAMES = 5
#: the correlation a frame needs to teach the coupling
LEARN_CORRELATION = 0.85
#: ... and the frame must correlate at least this much with the sent audio (a caller's frames rarely do)
GEIGEL_SCORE = 0.3
COUPLING_DECAY = 0.9995
#: the reference counts as sounding (bot speaking) above this mean square, int16 units (-60 dBFS)
ACTIVE_POWER = (32768 * 10 ** (-60 / 20)) ** 2
#: inbound frames quieter than this (-55 dBFS) while the bot sounds are passed on as silence
QUIET_POWER = (32768 * 10 ** (-55 / 20)) ** 2


def available() -> bool:
    try:
        import speexaec  # noqa: F401
    except ImportError:
        return False
    return True


class EchoControl:
    """One call's echo canceller and guard (16 kHz, 20 ms frames)."""

    def __init__(self, tail_ms: int = TAIL_MS, correlation: float = CORRELATION,
                 cancelled_db: float = CANCELLED_DB):
        from speexaec import EchoCanceller
        self._aec = EchoCanceller(FRAME_SAMPLES, tail_ms * SAMPLE_RATE // 1000, SAMPLE_RATE)
        self.correlation = correlation
        self._cancel_ratio = 10 ** (-cancelled_db / 10)
        self._silence = np.zeros(FRAME_SAMPLES, dtype=np.int16)
        # what was sent (newest last): raw for the canceller, and for the guard the telephone band at
        # 8 kHz (band-passed, every other sample: half the work), with each sent frame's power and peak
        self._raw = np.zeros(FAR_MS * SAMPLE_RATE // 1000, dtype=np.int16)
        self._sent = 0  # samples sent so far (the stream position of self._raw's end)
        self._recv = 0  # inbound samples processed so far
        self._aec_pos: Optional[int] = None  # stream position of the next frame the canceller gets
        window = WINDOW_MS * GUARD_RATE // 1000
        self._window = window
        self._near = np.zeros(TRACK_MS * GUARD_RATE // 1000, dtype=np.float64)  # inbound (band-passed)
        self._far = np.zeros(window + FAR_MS * GUARD_RATE // 1000, dtype=np.float64)  # sent (band-passed)
        self._far_power = np.zeros(FAR_MS // 20)  # mean square per sent frame, newest last
        self._far_peaks = np.zeros(FAR_MS // 20)  # peak of each sent frame, newest last
        #: where the echo is: the inbound stream at sample r returns the sent stream at r - offset
        #: (samples), once the tracker found it.  Kept by stream position, not by when frames are
        #: handled: a busy reactor or a bursty network moves the latter by hundreds of ms, the former only
        #: when the far end's playout skips or repeats
        self.offset: Optional[int] = None
        #: the echo's delay (ms) behind what was sent, as found by the tracker's last hit
        self.delay_ms: Optional[int] = None
        #: the line's echo coupling (peak of the returned echo / peak of what was sent), learned on
        #: frames the correlation found to be echo
        self.coupling = 0.0
        self._coupled = 0
        self._band = _bandpass(*BAND_HZ, BAND_TAPS)
        self._near_tail = np.zeros(BAND_TAPS - 1)
        self._far_tail = np.zeros(BAND_TAPS - 1)
        self._lags = (0, MAX_DELAY_MS * SAMPLE_RATE // 1000)  # this frame's searched lags (samples)
        #: counters for metrics and tests
        self.frames = 0
        self.echo_frames = 0
        self.resyncs = 0
        self.jumps = 0
        self.last_wide = 0.0
        self.last_score = 0.0

    # -- the two streams --------------------------------------------------------------------------

    def reference(self, frame: Optional[np.ndarray]) -> None:
        """An outbound 20 ms frame as sent (None: nothing was sent this tick)."""
        if frame is None or frame.size != FRAME_SAMPLES:
            frame = self._silence
        r = self._raw
        r[:-FRAME_SAMPLES] = r[FRAME_SAMPLES:]
        r[-FRAME_SAMPLES:] = frame
        self._sent += FRAME_SAMPLES
        for a, v in ((self._far_peaks, float(np.abs(frame).max())),
                     (self._far_power, float(np.dot(frame, frame.astype(np.float64))) / FRAME_SAMPLES)):
            a[:-1] = a[1:]
            a[-1] = v
        step = FRAME_SAMPLES // DECIMATE
        f = self._far
        f[:-step] = f[step:]
        f[-step:], self._far_tail = self._filter(frame, self._far_tail)

    def _sent_frames(self) -> slice:
        """The sent frames this inbound frame's window may hold the echo of (a slice of the per-frame
        power and peak arrays)."""
        low, high = self._lags
        n = self._far_power.size
        first = max(0, n - 1 - (high + WINDOW_MS * SAMPLE_RATE // 1000) // FRAME_SAMPLES)
        last = max(first + 1, n - low // FRAME_SAMPLES)
        return slice(first, last)

    @property
    def bot_active(self) -> bool:
        """The bot sounded where this inbound frame's echo can come from."""
        return float(self._far_power[self._sent_frames()].max()) > ACTIVE_POWER

    def _search_lags(self) -> tuple[int, int]:
        """The lags (samples behind the newest sent) at which the current inbound frame's echo may be:
        around the tracked offset, or 0 to MAX_DELAY_MS before it is known."""
        per_ms = SAMPLE_RATE // 1000
        if self.offset is None:
            return 0, MAX_DELAY_MS * per_ms
        centre = self._sent - (self._recv - self.offset)
        top = (FAR_MS - WINDOW_MS) * per_ms
        low = min(max(0, centre - NARROW_MS * per_ms), top)
        high = min(max(low, centre + NARROW_MS * per_ms), top)
        return low, high

    def process(self, near: np.ndarray) -> tuple[np.ndarray, bool]:
        """Cancel the echo in one inbound frame; returns (the frame to hear, whether it was echo)."""
        near = np.asarray(near, dtype=np.int16).reshape(-1)
        if near.size != FRAME_SAMPLES:
            return near, False
        self._recv += FRAME_SAMPLES
        step = FRAME_SAMPLES // DECIMATE
        n = self._near
        n[:-step] = n[step:]
        n[-step:], self._near_tail = self._filter(near, self._near_tail)
        self.frames += 1
        self._lags = self._search_lags()
        if self.frames % TRACK_EVERY == 0 and float(self._far_power.max()) > ACTIVE_POWER:
            self._track()
            self._lags = self._search_lags()
        far = self._aec_reference()
        out = self._aec.process(near, far)
        self.last_score = self.last_wide = 0.0
        if float(self._far_power.max()) <= ACTIVE_POWER:
            return out, False  # the bot was silent for FAR_MS: nothing to guard
        p_in = float(np.dot(near, near.astype(np.float64))) / FRAME_SAMPLES
        if p_in < QUIET_POWER:
            # an echo's faint tail between the bot's words: silero hears speech in it at any level
            return self._silence.copy(), False
        echo = False
        if self.bot_active:
            p_out = float(np.dot(out, out.astype(np.float64))) / FRAME_SAMPLES
            near_peak = float(np.abs(near).max())
            far_peak = float(self._far_peaks[self._sent_frames()].max())
            echo = p_out < p_in * self._cancel_ratio
            if not echo:
                self.last_score = self._score()
                echo = self.last_score >= self.correlation
                if self.last_score >= LEARN_CORRELATION and 0 < near_peak < far_peak:
                    # learn how loud the line returns the bot (a slowly forgetting maximum), on frames
                    # that are surely echo (a line returns less than was sent)
                    self._coupled += 1
                    self.coupling = max(self.coupling * COUPLING_DECAY, near_peak / far_peak)
            if not echo and self._coupled >= COUPLING_FRAMES and self.last_score >= GEIGEL_SCORE:
                # Geigel's test with the learned coupling: no louder than the bot's echo can be, and
                # somewhat like it -> echo
                echo = near_peak < GEIGEL_MARGIN * self.coupling * far_peak
        if not echo:
            # the echo is not where the offset says (the far end's playout skipped: a gap, a burst) or
            # the offset is not known yet and a stall put the echo beyond MAX_DELAY_MS: look at every
            # lag; a strong likeness is echo and moves the offset there.  Stricter before the line is
            # known to echo (a caller on a line without echo must not be taken for the bot)
            window, needed = (WIDE_WINDOW_MS, WIDE_CORRELATION) if self.offset is not None \
                else (WINDOW_MS, UNKNOWN_WIDE_CORRELATION)
            lag, self.last_wide = self._wide_score(window)
            if self.last_wide >= needed:
                echo = True
                self.offset = self._recv - (self._sent - lag)
                self.jumps += 1
            elif p_in < FAINT_POWER and self._coupled >= COUPLING_FRAMES and self.last_wide >= GEIGEL_SCORE:
                # a faint frame somewhat like the sent audio somewhere, no louder than the bot's echo can
                # be (Geigel against the loudest the bot was): the onset of echo chopped by the far end's
                # playout gaps, which the correlation cannot place.  Only faint ones: a caller's louder
                # frames are never taken this way (barge-in speed)
                echo = float(np.abs(near).max()) < GEIGEL_MARGIN * self.coupling * float(self._far_peaks.max())
        if echo:
            self.echo_frames += 1
            return self._silence.copy(), True
        if float(np.dot(out, out.astype(np.float64))) > FRAME_SAMPLES * p_in:
            # a canceller that adds energy is subtracting an echo that is not there (its filter is
            # misaligned after a skip): it would put the bot's voice into the caller's audio
            return near, False
        return out, False

    def _filter(self, frame: np.ndarray, tail: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.concatenate([tail, frame.astype(np.float64)])
        return np.convolve(x, self._band, mode="valid")[::DECIMATE], x[-(BAND_TAPS - 1):]

    def _aec_reference(self) -> np.ndarray:
        """The sent frame the canceller gets with this inbound frame: the next one of a continuous
        stream, kept DELAY_MARGIN_MS ahead of where the echo is (the tracked offset), or the newest
        sent frame before the offset is known."""
        if self.offset is None:
            target = self._sent - FRAME_SAMPLES
        else:
            target = self._recv - self.offset - FRAME_SAMPLES - DELAY_MARGIN_MS * SAMPLE_RATE // 1000
        if self._aec_pos is None or abs(self._aec_pos - target) > RESYNC_FRAMES * FRAME_SAMPLES:
            if self._aec_pos is not None:
                self.resyncs += 1
            self._aec_pos = target
        start = self._aec_pos - (self._sent - self._raw.size)
        self._aec_pos += FRAME_SAMPLES
        if start < 0 or start + FRAME_SAMPLES > self._raw.size:
            return self._silence
        return self._raw[start:start + FRAME_SAMPLES].copy()

    def _track(self) -> None:
        """Find where the echo is on a long window (module constants)."""
        n = self._near
        if float(np.dot(n, n)) / n.size < QUIET_POWER / 4:
            return
        score = _correlations(n, self._far)
        best = int(np.argmax(score))
        if score[best] >= TRACK_MIN:
            lag = (self._far.size - n.size - best) * DECIMATE  # samples between the window's end and the newest sent
            self.offset = self._recv - (self._sent - lag)
            self.delay_ms = int(lag * 1000 // SAMPLE_RATE)

    def _wide_score(self, window_ms: int) -> tuple[int, float]:
        """(lag in samples, score) of the best match of the last ``window_ms`` of inbound audio anywhere in
        what was sent."""
        w = window_ms * GUARD_RATE // 1000
        n = self._near[-w:]
        if float(np.dot(n, n)) <= 0.0:
            return 0, 0.0
        score = _correlations(n, self._far)
        best = int(np.argmax(score))
        return (self._far.size - w - best) * DECIMATE, float(score[best])

    def _score(self) -> float:
        """Highest normalised correlation of the last inbound window with the sent audio at the lags
        searched (``_search_lags``)."""
        w = self._window
        n, f = self._near[-w:], self._far
        low, high = (lag // DECIMATE for lag in self._lags)
        segment = f[max(0, f.size - w - high): f.size - low]
        if float(np.dot(n, n)) <= 0.0 or segment.size < w:
            return 0.0
        return float(_correlations(n, segment).max())


def _correlations(n: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Normalised |correlation| of ``n`` with every window of ``f`` of its length (FFT
    cross-correlation, window energies by cumulative sums); near-silent windows of ``f`` score 0."""
    w = n.size
    en = float(np.dot(n, n))
    lags = f.size - w + 1
    size = 1 << int(np.ceil(np.log2(f.size + w)))
    xc = np.fft.irfft(np.fft.rfft(f, size) * np.conj(np.fft.rfft(n, size)), size)[:lags]
    c = np.concatenate(([0.0], np.cumsum(f * f)))
    ef = c[w:w + lags] - c[:lags]
    score = np.abs(xc) / np.sqrt(np.maximum(ef, 1e-9) * max(en, 1e-9))
    score[ef < en * 1e-4] = 0.0  # a near-silent stretch of the reference explains nothing
    return score


@functools.lru_cache(maxsize=8)
def _bandpass(low: float, high: float, taps: int) -> np.ndarray:
    """A windowed-sinc band-pass FIR at 16 kHz (read-only: one per process, shared by every call)."""
    n = np.arange(taps) - (taps - 1) / 2

    def lowpass(cut):
        return 2 * cut / SAMPLE_RATE * np.sinc(2 * cut / SAMPLE_RATE * n)

    band = (lowpass(high) - lowpass(low)) * np.hamming(taps)
    band.flags.writeable = False
    return band
