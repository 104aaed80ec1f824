"""Barge-in over a jittery line, in memory (call/barge_in.py, speech/echo.py), driven by task.Clock.

``tests/test_barge_in.py`` returns the bot's audio to the leg in lock step with the media clock; a real
socket does not.  Here the daemon, the network and the caller's phone each keep their own time on one
``task.Clock`` (1 ms steps), as the barge-in bench meets them over a real daemon:

- the daemon's media clock ticks every 20 ms but now and then stalls (a busy reactor) for 40–120 ms and
  then catches up, sending the frames it owes at once — and the caller's audio that came meanwhile is
  handled in one bunch;
- every packet, each way, takes 5 ms plus a random 0–``jitter_ms`` (in order, like TCP);
- the phone plays what it received on its own 20 ms deadlines, one frame a deadline (a frame that is not
  there yet is a gap of silence: the echo's delay steps up by 20 ms), and returns it as echo
  (``delay_ms`` late, ``gain_db``, with a second reflection) with the caller's voice mixed in.

So the echo reaches the guard ``delay_ms`` plus 10–100 ms late, moving from packet to packet, with gaps.
Seeded random numbers: every run is the same.  The recogniser is the scripted one of test_barge_in
(words once it was fed 300 ms of loud audio), and can also say what the bot was saying (pocketsphinx
making words of leaked echo).
"""

from __future__ import annotations

import random

import numpy as np
from twisted.internet import defer
from twisted.trial import unittest

from activecall.audio import FRAME_SAMPLES, SAMPLE_RATE
from activecall.protocol import events as ev
from activecall.speech import echo as echo_control

from tests.test_barge_in import _audio, BargeInTests, GREETING, Line, echo_path


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
        self.up_queue: list = []  # (arrival ms, payload) towards the daemon
        self.last_down = self.last_up = 0
        self.played: list = []  # the phone's received frames, not yet played
        self.sent_seen = 0
        self.ticks = 0
        self.phone_codec = self.__class__._codec(self)
        self.gaps = 0

    def _codec(self):
        from activecall.call.websocket_call import codec_for
        return codec_for(self.session.option), codec_for(self.session.option)

    def _packet_delay(self):
        return 5 + self.rng.uniform(0, self.jitter_ms)

    def _take_inbound(self, now):
        while self.up_queue and self.up_queue[0][0] <= now:
            _, payload = self.up_queue.pop(0)
            self.session.connector.binary_received(payload)

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
                self.up_queue.append((self.last_up, enc.encode(up)))


class JitterTests(BargeInTests):
    """The goal's echo levels and delays over the jittery line: never an interruption (nor a pause)."""

    def test_echo_never_interrupts(self):
        pass  # test_barge_in's lock-step version; here the jittery one below

    test_real_speech_over_the_bot_stops_it = test_cough_pauses_then_resumes = test_echo_never_interrupts
    test_backchannel_does_not_stop = test_ambiance_in_the_outbound_audio_not_in_what_asr_hears = test_echo_never_interrupts

    def test_jittered_echo_never_interrupts(self):
        seconds = len(_audio["greeting"]) // SAMPLE_RATE + 2
        for codec in ("pcmu", "pcm"):
            for delay_ms, gain_db, seed in ((200, -6.0, 1), (200, -6.0, 2), (60, -10.0, 3), (20, -20.0, 4)):
                where = f"{codec} {delay_ms} ms {gain_db} dB seed {seed}"
                line = JitterLine(self, codec, delay_ms, gain_db, seed=seed, stall_ms=(40, 400), stall_every_ms=500)
                line.speak_greeting()
                line.run(seconds * 1000)
                echo = line.session.processors.echo
                print(where, "gaps", line.gaps, "paused", len(line.metrics("interruption.paused")),
                      "interrupted", len(line.of(ev.Interruption)), "loud_ms", line.recognizer.loud_ms,
                      "echo frames", echo.echo_frames, "of", echo.frames, "delay", echo.delay_ms, "jumps", echo.jumps, "resyncs", echo.resyncs)
                line.close()
