"""What the caller's audio goes through before the VAD and the recogniser: the echo canceller and its guard
(speech/echo.py) and the noise suppressor with gain control (speech/denoise.py), on flite speech."""

from __future__ import annotations

import numpy as np
from twisted.internet import defer, task
from twisted.trial import unittest

from activecall.audio import FRAME_SAMPLES, SAMPLE_RATE
from activecall.call import speech as call_speech
from activecall.call.session import CallSession
from activecall.protocol import commands as cmd
from activecall.speech import echo as echo_control
from activecall.speech.denoise import Denoiser
from activecall.speech.base import SpeechError
from activecall.speech.testing import synthesize_pcm

_audio: dict = {}


def frames(pcm):
    for i in range(0, pcm.size - FRAME_SAMPLES + 1, FRAME_SAMPLES):
        yield pcm[i:i + FRAME_SAMPLES]


def rms(x):
    return float(np.sqrt(np.mean(np.asarray(x, dtype=np.float64) ** 2)))


class SpeechAudio(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        if "bot" not in _audio:
            from twisted.internet import reactor
            _audio["bot"] = yield synthesize_pcm("Our opening hours are nine to five on weekdays, and ten to "
                                                 "four on Saturdays.", "rms", reactor=reactor)
            _audio["caller"] = yield synthesize_pcm("I would like to renew my books please.", "slt",
                                                    reactor=reactor)


class EchoControlTests(SpeechAudio):
    def setUp(self):
        if not echo_control.available():
            raise unittest.SkipTest("speexaec is not installed")
        return super().setUp()

    def run_line(self, near, far):
        ec = echo_control.EchoControl()
        out, flags = [], []
        for n, f in zip(frames(near), frames(far)):
            ec.reference(f)
            o, flag = ec.process(n)
            out.append(o)
            flags.append(flag)
        return ec, np.concatenate(out), np.array(flags)

    def test_echo_is_silenced_and_the_caller_passes(self):
        bot = _audio["bot"]
        echo = np.concatenate([np.zeros(60 * 16), bot])[: bot.size] * 10 ** (-10 / 20)
        ec, out, flags = self.run_line(np.rint(echo).astype(np.int16), bot)
        loud = np.array([np.abs(f).max() > 300 for f in frames(np.rint(echo).astype(np.int16))])
        self.assertGreater(flags[loud].mean(), 0.95)
        self.assertLess(rms(out), rms(echo) / 10)
        self.assertGreater(ec.coupling, 0.1)
        # the caller on a line without echo, while the bot speaks: untouched by the guard
        caller = np.zeros(bot.size, dtype=np.int16)
        caller[16000:16000 + _audio["caller"].size] = _audio["caller"][: bot.size - 16000]
        ec, out, flags = self.run_line(caller, bot)
        voiced = np.array([np.abs(f).max() > 300 for f in frames(caller)])
        self.assertLess(flags[voiced].mean(), 0.03)  # a rare frame that happens to look like the bot
        self.assertGreater(rms(out), 0.8 * rms(caller))

    def test_no_reference_no_change_in_the_guard(self):
        caller = _audio["caller"]
        ec, out, flags = self.run_line(caller, np.zeros_like(caller))
        self.assertFalse(ec.bot_active)
        self.assertEqual(int(flags.sum()), 0)
        self.assertGreater(np.corrcoef(out.astype(float), caller[: out.size].astype(float))[0, 1], 0.8)

    def test_other_chunk_sizes_are_reframed_and_guarded(self):
        """A client sending 10 ms chunks: the processors re-frame them to 20 ms, so the guard still sees
        every frame and the VAD and recogniser hear none of the echo."""
        bot = _audio["bot"]
        echo = np.rint(np.concatenate([np.zeros(60 * 16), bot])[: bot.size] * 10 ** (-10 / 20)).astype(np.int16)
        processors = call_speech.SpeechProcessors(None)
        processors.echo = echo_control.EchoControl()
        heard = []
        processors.heard = heard.append
        for i, f in enumerate(frames(bot)):
            processors.echo.reference(f)
            piece = echo[i * FRAME_SAMPLES:(i + 1) * FRAME_SAMPLES]
            processors.feed(piece[:160])
            processors.feed(piece[160:])
        self.assertEqual({h.size for h in heard}, {FRAME_SAMPLES})
        self.assertEqual(len(heard), bot.size // FRAME_SAMPLES)
        self.assertEqual(processors.echo.frames, len(heard))
        self.assertLess(rms(np.concatenate(heard)), rms(echo) / 10)

    def test_odd_frames_pass_unchanged(self):
        ec = echo_control.EchoControl()
        odd = np.arange(100, dtype=np.int16)
        out, flag = ec.process(odd)
        self.assertFalse(flag)
        self.assertTrue(np.array_equal(out, odd))


class DenoiseTests(SpeechAudio):
    def test_noise_is_reduced_and_a_quiet_caller_lifted(self):
        rng = np.random.default_rng(5)
        speech = _audio["caller"].astype(np.float64) * 10 ** (-25 / 20)  # a quiet caller
        pad = np.zeros(SAMPLE_RATE)
        clean = np.concatenate([pad, speech, pad])
        noise = rng.normal(0, rms(speech[np.abs(speech) > 10]) / 10 ** (10 / 20), clean.size)  # 10 dB SNR
        noisy = np.clip(np.rint(clean + noise), -32768, 32767).astype(np.int16)
        d = Denoiser()
        out = np.concatenate([d.process(f) for f in frames(noisy)])
        # the last half second is noise only: suppressed (after the suppressor settled)
        self.assertLess(rms(out[-8000:]), rms(noisy[-8000:]) / 2)
        # speech is louder than it came (the gain controller)
        seg = slice(SAMPLE_RATE + 4000, SAMPLE_RATE + speech.size - 4000)
        self.assertGreater(rms(out[seg]), 1.5 * rms(noisy[seg]))

    def test_gain_alone_lifts_the_noise_the_suppressor_keeps_it_down(self):
        # why ``denoise: true`` runs the suppressor and not only the gain controller (docs/speech.md, "Denoise
        # and gain"): on a very quiet, noisy caller the gain controller alone lifts the noise between words
        # with the speech (the VAD then takes it for voice); with the suppressor the noise comes out lower
        rng = np.random.default_rng(5)
        speech = _audio["caller"].astype(np.float64) * 10 ** (-35 / 20)
        pad = np.zeros(SAMPLE_RATE)
        clean = np.concatenate([pad, speech, pad])
        noise = rng.normal(0, rms(speech[np.abs(speech) > 3]) / 10 ** (10 / 20), clean.size)
        noisy = np.clip(np.rint(clean + noise), -32768, 32767).astype(np.int16)
        seg = slice(SAMPLE_RATE + 4000, SAMPLE_RATE + speech.size - 4000)

        def gains(denoiser):
            out = np.concatenate([denoiser.process(f) for f in frames(noisy)])
            return (20 * np.log10(rms(out[seg]) / rms(noisy[seg])),
                    20 * np.log10(rms(out[-8000:]) / rms(noisy[-8000:])))

        speech_db, noise_db = gains(Denoiser(level=0))  # gain control only (measured: +6.7 dB, +6 dB)
        self.assertGreater(speech_db, 3)
        self.assertGreater(noise_db, 3)
        speech_db, noise_db = gains(Denoiser())  # the shipped default (measured: +6 dB, -7 dB)
        self.assertGreater(speech_db, 3)
        self.assertLess(noise_db, -3)

    def test_bad_levels(self):
        self.assertRaises(SpeechError, Denoiser, level=5)
        self.assertRaises(SpeechError, Denoiser, target_dbfs=40)

    def test_any_frame_length(self):
        d = Denoiser()
        out = [d.process(np.zeros(n, dtype=np.int16)) for n in (100, 100, 120, 320)]
        self.assertEqual(sum(o.size for o in out), 640)

    def test_call_option_puts_it_before_vad_and_asr(self):
        clock = task.Clock()
        heard = []

        def factory(session):
            p = call_speech.attach_processors(session)
            p.heard = heard.append
            return p

        s = CallSession("c1", "webSocket", clock=clock, emit=lambda e: None, dump=False,
                        processor_factory=factory)
        s.option = cmd.CallOption.from_dict({"denoise": True, "vad": {"type": "webrtcvad"}})
        s.answered()
        self.assertIsInstance(s.processors.denoiser, Denoiser)
        self.assertEqual(s.processors.echo is not None, echo_control.available())
        s.audio_in(np.full(FRAME_SAMPLES, 1000, dtype=np.int16))
        self.assertEqual(len(heard), 1)
        s2 = CallSession("c2", "webSocket", clock=clock, emit=lambda e: None, dump=False,
                         processor_factory=call_speech.attach_processors)
        s2.option = cmd.CallOption.from_dict({"vad": {"type": "webrtcvad"},
                                              "interruption": {"echoCancel": False}})
        s2.answered()
        self.assertIsNone(s2.processors.denoiser)
        self.assertIsNone(s2.processors.echo)
