"""Barge-in over a jittery line, in memory (call/barge_in.py, speech/echo.py), driven by task.Clock.

``tests/test_barge_in.py`` returns the bot's audio to the leg in lock step with the media clock; a real
socket does not.  Here the daemon, the network and the caller's phone each keep their own time on one
``task.Clock`` (1 ms steps), as the barge-in bench meets them over a real daemon:

- the daemon's media clock ticks every 20 ms but now and then stalls (a busy reactor: 40–120 ms every
  0.7 s or so, or 40–400 ms every 0.5 s in the echo test) and then catches up, sending the frames it owes
  at once (re-anchoring past 10, as ``media/clock.py`` does) — and the caller's audio that came meanwhile
  is handled in one bunch, before or after those ticks;
- every packet, each way, takes 5 ms plus a random 0–``jitter_ms`` (in order, like TCP);
- the phone plays what it received on its own 20 ms deadlines, one frame a deadline (a frame that is not
  there yet is a gap of silence: the echo's delay steps up by 20 ms), and returns it as echo
  (``delay_ms`` late, ``gain_db``, with a second reflection) with the caller's voice mixed in.

So the echo reaches the guard ``delay_ms`` plus tens to hundreds of ms late, the lateness moving from packet
to packet, with gaps that shift it for good.
Seeded random numbers: every run is the same.  The recogniser is the scripted one of test_barge_in
(words once it was fed 300 ms of loud audio), and can also say what the bot was saying (pocketsphinx
making words of leaked echo).
"""

from __future__ import annotations

import random

import numpy as np
from twisted.trial import unittest

from activecall.audio import FRAME_SAMPLES, SAMPLE_RATE
from activecall.call.websocket_call import codec_for
from activecall.protocol import events as ev

from tests import test_barge_in as base
from tests.test_barge_in import _audio, Line, echo_path


class JitterLine(Line):
    """``Line`` with a network and a phone that keep their own time (module docstring)."""

    def __init__(self, test, codec="pcm", delay_ms=200, gain_db=-6.0, jitter_ms=40, stall_every_ms=700,
                 stall_ms=(40, 120), seed=1, **kw):
        super().__init__(test, codec, delay_ms, gain_db, **kw)
        self.rng = random.Random(seed)
        self.jitter_ms = jitter_ms
        self.stall_every_ms = stall_every_ms
        self.stall_ms = stall_ms
        self.now_ms = 0
        self.busy_until = 0  # the daemon's reactor is stalled until then
        self.next_tick = 20
        self.next_deadline = 7  # the phone's 20 ms deadlines, out of phase with the daemon's
        self.down: list = []  # (arrival ms, payload) towards the phone
        self.up_queue: list = []  # (arrival ms, payload, phone frame number) towards the daemon
        self.last_down = self.last_up = 0
        self.played: list = []  # the phone's received frames, not yet played
        self.sent_seen = 0
        self.ticks = 0
        # the caller's phone: decodes what it receives, encodes what it sends back
        self.phone_codec = codec_for(self.session.option), codec_for(self.session.option)
        self.gaps = 0
        self.phone_frames = 0  # frames the phone sent
        self._voice_frame = None
        self.voice_in_ms = self.paused_ms = None  # the daemon got the caller's first voice; it paused

    def _packet_delay(self):
        return 5 + self.rng.uniform(0, self.jitter_ms)

    def mark_voice(self, frames_in):
        """The caller's first voiced sample is in the ``frames_in``-th frame of what ``say`` queued."""
        self._voice_frame = self.phone_frames + frames_in

    def _take_inbound(self, now):
        while self.up_queue and self.up_queue[0][0] <= now:
            _, payload, n = self.up_queue.pop(0)
            self.session.connector.binary_received(payload)
            if n == self._voice_frame and self.voice_in_ms is None:
                self.voice_in_ms = now
            if self.paused_ms is None and self.metrics("interruption.paused"):
                self.paused_ms = now
        if self.paused_ms is None and self.metrics("interruption.paused"):
            self.paused_ms = now

    def run(self, ms):
        dec, enc = self.phone_codec
        for _ in range(ms):
            self.now_ms += 1
            self.clock.advance(0.001)
            now = self.now_ms
            # the daemon: stalls now and then; when free, it catches up on the ticks it owes and takes
            # in the caller's packets that came meanwhile, in one go
            if now >= self.busy_until and self.stall_every_ms and self.rng.random() < 1.0 / self.stall_every_ms:
                self.busy_until = now + self.rng.randint(*self.stall_ms)
            if now >= self.busy_until:
                inbound_first = self.rng.random() < 0.5
                if inbound_first:
                    self._take_inbound(now)
                owed = (now - self.next_tick) // 20 + 1 if self.next_tick <= now else 0
                if owed > 10:  # the media clock re-anchors rather than bursting
                    self.next_tick = now + 20 * (1 - owed)
                    owed = 1
                for _ in range(owed):
                    self.next_tick += 20
                    self.ticks += 1
                    self.media.tick()
                for payload in self.protocol.sent[self.sent_seen:]:
                    self.last_down = max(self.last_down, now + self._packet_delay())
                    self.down.append((self.last_down, payload))
                self.sent_seen = len(self.protocol.sent)
                if not inbound_first:
                    self._take_inbound(now)
                self.clock.advance(0)  # the VAD batch
            while self.down and self.down[0][0] <= now:
                self.played.append(self.down.pop(0)[1])
            # the phone: one frame a deadline
            if now >= self.next_deadline:
                self.next_deadline += 20
                if self.played:
                    frame = dec.decode(self.played.pop(0)).astype(np.int16)[:FRAME_SAMPLES]
                else:
                    frame = np.zeros(FRAME_SAMPLES, dtype=np.int16)
                    self.gaps += 1
                self.out16.append(frame)
                self.bot_frames.append(bool(np.any(frame)))
                self._history = np.concatenate([self._history, frame.astype(np.float64)])[-SAMPLE_RATE:]
                back = echo_path(self._history, self.delay_ms, self.gain_db)[-FRAME_SAMPLES:] \
                    if self.gain_db is not None else np.zeros(FRAME_SAMPLES)
                if self.extra.size:
                    take = self.extra[:FRAME_SAMPLES]
                    back[: take.size] += take
                    self.extra = self.extra[FRAME_SAMPLES:]
                up = np.clip(np.rint(back), -32768, 32767).astype(np.int16)
                self.last_up = max(self.last_up, now + self._packet_delay())
                self.up_queue.append((self.last_up, enc.encode(up), self.phone_frames))
                self.phone_frames += 1


class JitterTests(unittest.TestCase):
    """The goal's echo levels and delays over the jittery line: never a pause nor an interruption; a caller
    talking over the bot still stops it fast; a cough still pauses and resumes."""

    timeout = 900
    setUp = base.BargeInTests.setUp
    assert_not_interrupted = base.BargeInTests.assert_not_interrupted

    def test_jittered_echo_never_interrupts(self):
        """-6 dB 200 ms (two seeds), -10 dB 60 ms, -20 dB 20 ms, -14 dB 120 ms on PCMU and 16 kHz PCM, with the
        daemon stalling 40-400 ms every half second or so: the greeting plays to its end, unpaused, and
        the recogniser hears (nearly) nothing of the bot."""
        seconds = len(_audio["greeting"]) // SAMPLE_RATE + 3
        for codec in ("pcmu", "pcm"):
            for delay_ms, gain_db, seed in ((200, -6.0, 1), (200, -6.0, 2), (60, -10.0, 3), (20, -20.0, 4),
                                            (120, -14.0, 5)):
                where = f"{codec} {delay_ms} ms {gain_db} dB seed {seed}"
                line = JitterLine(self, codec, delay_ms, gain_db, seed=seed, stall_ms=(40, 400),
                                  stall_every_ms=500)
                line.speak_greeting()
                line.run(seconds * 1000)
                self.assert_not_interrupted(line, where)
                echo = line.session.processors.echo
                self.assertGreater(echo.echo_frames, 300, where)
                self.assertLess(line.recognizer.loud_ms, 300, where)
                line.close()

    def test_real_speech_over_the_bot_stops_it(self):
        """Another voice over the echoing bot (-6 dB 200 ms and -10 dB 60 ms, jittered): the playout pauses
        within 250 ms of the daemon receiving the caller's first voiced sample, then the words stop it."""
        for codec, delay_ms, gain_db, seed, stall in (("pcmu", 200, -6.0, 11, 0), ("pcm", 200, -6.0, 12, 0),
                                                      ("pcm", 60, -10.0, 13, 0), ("pcmu", 200, -6.0, 14, 700),
                                                      ("pcm", 200, -6.0, 15, 700), ("pcmu", 120, -14.0, 16, 0)):
            where = f"{codec} {delay_ms} ms {gain_db} dB seed {seed}"
            line = JitterLine(self, codec, delay_ms, gain_db, seed=seed, stall_every_ms=stall)
            line.speak_greeting()
            line.run(3000)
            line.say(_audio["caller"])
            lead = int(np.flatnonzero(np.abs(_audio["caller"]) > 300)[0]) // FRAME_SAMPLES
            line.mark_voice(lead)
            line.run(2500)
            paused = line.metrics("interruption.paused")
            self.assertEqual(len(paused), 1, where)
            took = line.paused_ms - line.voice_in_ms
            self.assertGreaterEqual(took, 0, where)
            self.assertLessEqual(took, 250, where)
            stops = line.of(ev.Interruption)
            self.assertEqual(len(stops), 1, where)
            self.assertEqual(stops[0].playId, "greeting", where)
            line.close()

    def test_cough_pauses_then_resumes(self):
        """An "ahem" and no words on the jittery -6 dB 200 ms line: a pause, then the bot resumes and plays
        to its end."""
        line = JitterLine(self, "pcmu", 200, -6.0, seed=21, words_after_ms=None,
                          interruption={"strategy": "both", "falseInterruptionMs": 600})
        line.speak_greeting()
        line.run(3000)
        line.say(_audio["ahem"])
        line.run(3000)
        self.assertEqual(len(line.metrics("interruption.paused")), 1)
        self.assertEqual(len(line.metrics("interruption.resumed")), 1)
        line.run(12000)
        self.assertEqual(line.of(ev.Interruption), [])
        end = line.of(ev.TrackEnd)[-1]
        self.assertGreater(end.duration, len(_audio["greeting"]) // 16 * 0.95)
        line.close()

    def test_words_made_of_leaked_echo_do_not_stop_the_bot(self):
        """With the echo guard off the -6 dB echo reaches the VAD and the recogniser, which makes the bot's
        own words of it ("thank you"): the bot pauses but is not stopped; it resumes and goes on."""
        line = JitterLine(self, "pcmu", 200, -6.0, seed=31,
                          interruption={"strategy": "both", "falseInterruptionMs": 500, "echoCancel": False})
        self.assertIsNone(line.session.processors.echo)
        line.recognizer.text = "thank you"
        line.speak_greeting()
        line.run(12000)
        self.assertTrue(line.recognizer.said)
        self.assertGreaterEqual(len(line.metrics("interruption.paused")), 1)
        self.assertGreaterEqual(len(line.metrics("interruption.resumed")), 1)
        self.assertEqual(line.of(ev.Interruption), [])
        # paused again and again by its unguarded echo, but never stopped: it went on speaking
        track = line.session.playback.current
        self.assertEqual(track.play_id, "greeting")
        self.assertFalse(track.stopped)
        self.assertGreater(track.played_ms, 3000)
        line.close()
