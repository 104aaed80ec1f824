"""Barge-in on real audio (call/barge_in.py, speech/echo.py, call/ambiance.py), driven by task.Clock.

A ``/call`` leg (``WebSocketConnector``, PCMU or 16 kHz PCM) plays a long flite greeting; the test is the
line and the caller: it decodes every frame the leg sends, returns it to the leg as echo (−6 to −20 dB,
20 to 200 ms late, coloured by a second reflection) and mixes in what the caller does — another flite
voice, or a short throat-clearing.  The VAD is silero (batched, run synchronously), the echo canceller and
its guard are the real ones; only the recogniser is scripted: it "hears words" once it has been fed
300 ms of loud audio (so it hears what the echo guard lets through), or never (an "ahem" has no words).
Everything is counted in media ticks, so the assertions are deterministic.
"""

from __future__ import annotations

import numpy as np
from twisted.internet import defer, task
from twisted.trial import unittest

from activecall.audio import FRAME_SAMPLES, SAMPLE_RATE
from activecall.call import speech as call_speech
from activecall.call.ambiance import Ambiance, AmbianceSettings, room_tone
from activecall.call.barge_in import InterruptionPolicy, echoes_the_bot, takes_the_turn, word_count
from activecall.call.session import CallSession
from activecall.call.websocket_call import WebSocketConnector, codec_for
from activecall.protocol import commands as cmd
from activecall.protocol import events as ev
from activecall.speech import echo as echo_control
from activecall.speech.base import AsrResult
from activecall.speech.testing import speech_extent, synthesize_pcm
from activecall.speech.vad.silero import SileroBatcher
from activecall.testing import ManualMediaClock

GREETING = ("Thank you for calling the city library. Our opening hours are nine to five on weekdays, "
            "and ten to four on Saturdays. Please tell me how I can help you today.")
CALLER = "I would like to renew my books please."

_audio: dict = {}


def _sync(f, *args):
    return defer.succeed(f(*args))


class PcmSynth:
    """A synthesiser that 'speaks' fixed PCM (the flite greeting made once for the module)."""

    name = "pcm"

    def __init__(self, pcm):
        self.pcm = pcm

    def synthesize(self, text, sink):
        sink(self.pcm)
        return defer.succeed(None)


class WordsRecognizer:
    """Hears words once fed ``after_ms`` of audio above -40 dBFS (what passed the echo guard);
    with ``after_ms`` None it never does (a cough)."""

    name = "scripted"

    def __init__(self, on_result, after_ms=300):
        self.on_result = on_result
        self.after_ms = after_ms
        self.loud_ms = 0
        self.said = False
        self.on_error = None
        self.text = "I would like"

    def feed(self, pcm):
        if np.sqrt(np.mean(pcm.astype(np.float64) ** 2)) > 32768 * 10 ** (-40 / 20):
            self.loud_ms += len(pcm) * 1000 // SAMPLE_RATE
        if self.after_ms is not None and not self.said and self.loud_ms >= self.after_ms:
            self.said = True
            self.on_result(AsrResult(index=0, text=self.text, final=False))

    def close(self):
        return defer.succeed(None)


class FakeProtocol:
    def __init__(self):
        self.sent: list = []

    def send_audio(self, data):
        self.sent.append(data)


def echo_path(frames16: np.ndarray, delay_ms: int, gain_db: float) -> np.ndarray:
    """What a hybrid returns: delayed, attenuated, with a weaker second reflection 2.5 ms later."""
    d = delay_ms * SAMPLE_RATE // 1000
    x = np.concatenate([np.zeros(d), frames16.astype(np.float64)])[: frames16.size] * 10 ** (gain_db / 20)
    return x + 0.3 * np.concatenate([np.zeros(40), x])[: x.size]


class Line:
    """One ``/call`` with the bot speaking the greeting over an echoing line."""

    def __init__(self, test, codec="pcm", delay_ms=60, gain_db=-10.0, interruption=None, words_after_ms=300,
                 ambiance=None):
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.events: list = []
        self.media = ManualMediaClock()
        self.protocol = FakeProtocol()
        self.delay_ms, self.gain_db = delay_ms, gain_db
        self.batcher = SileroBatcher(reactor=self.clock, run_in_thread=_sync)
        self.recognizer = None
        self.heard: list = []  # what the VAD and the recogniser were fed
        synth = PcmSynth(_audio["greeting"])

        def processors(session):
            p = call_speech.attach_processors(session, vad_batcher=self.batcher)
            self.recognizer = WordsRecognizer(self._asr, words_after_ms)
            p.recognizer = self.recognizer
            p.heard = self.heard.append
            return p

        self.session = CallSession("c1", "webSocket", clock=self.clock, emit=self.events.append,
                                   synthesizer_for=lambda option: synth, dump=False,
                                   processor_factory=processors)
        self.session.connector = WebSocketConnector(self.session, self.protocol, self.media)
        option = {"codec": codec, "vad": {"type": "silero"},
                  "interruption": interruption if interruption is not None else {"strategy": "both"}}
        if ambiance is not None:
            option["ambiance"] = ambiance
        self.session.handle(cmd.Invite(option=cmd.CallOption.from_dict(option)))
        self.down = codec_for(self.session.option)  # the caller's phone: decodes what we send
        self.up = codec_for(self.session.option)  # and encodes what it sends back
        self.out16: list = []  # what the caller heard, 16 kHz
        self.bot_frames: list = []  # per tick: did the leg send bot audio
        self.extra = np.zeros(0, dtype=np.float64)  # the caller's own sound, queued
        self._history = np.zeros(0)

    def _asr(self, result):
        s = self.session
        s.emit(ev.AsrDelta(trackId=s.id, timestamp=s.now(), index=result.index, text=result.text))

    def say(self, pcm):
        self.extra = np.concatenate([self.extra, pcm.astype(np.float64)])

    def speak_greeting(self):
        self.session.handle(cmd.Tts(text=GREETING, playId="greeting", endOfStream=True))

    def run(self, ms):
        for _ in range(ms // 20):
            self.clock.advance(0.02)
            before = len(self.protocol.sent)
            self.media.tick()
            if len(self.protocol.sent) > before:
                frame = self.down.decode(self.protocol.sent[-1]).astype(np.int16)
            else:
                frame = np.zeros(FRAME_SAMPLES, dtype=np.int16)
            frame = frame[:FRAME_SAMPLES]
            self.out16.append(frame)
            self.bot_frames.append(bool(np.any(frame)))
            self._history = np.concatenate([self._history, frame.astype(np.float64)])[-SAMPLE_RATE:]
            need = FRAME_SAMPLES
            back = echo_path(self._history, self.delay_ms, self.gain_db)[-need:] if self.gain_db is not None \
                else np.zeros(need)
            if self.extra.size:
                take = self.extra[:need]
                back[: take.size] += take
                self.extra = self.extra[need:]
            up = np.clip(np.rint(back), -32768, 32767).astype(np.int16)
            self.session.connector.binary_received(self.up.encode(up))
            self.clock.advance(0)  # the VAD batch

    def of(self, kind):
        return [e for e in self.events if isinstance(e, kind)]

    def metrics(self, key):
        return [e for e in self.of(ev.Metrics) if e.key == key]

    def close(self):
        self.session.leg.close()


class BargeInTests(unittest.TestCase):
    timeout = 600

    @defer.inlineCallbacks
    def setUp(self):
        if not echo_control.available():
            raise unittest.SkipTest("speexaec is not installed (pip install speexaec)")
        if "greeting" not in _audio:
            from twisted.internet import reactor
            _audio["greeting"] = yield synthesize_pcm(GREETING, "rms", reactor=reactor)
            _audio["caller"] = yield synthesize_pcm(CALLER, "slt", reactor=reactor)
            # a throat-clearing "ahem" (0.45 s): voice, but no words
            ahem = yield synthesize_pcm("Ahem.", "slt", reactor=reactor)
            a, b = speech_extent(ahem)
            _audio["ahem"] = ahem[a:b]

    def assert_not_interrupted(self, line, where):
        self.assertEqual(line.of(ev.Interruption), [], where)
        self.assertEqual(line.metrics("interruption.paused"), [], where)
        ends = line.of(ev.TrackEnd)
        self.assertTrue(ends and ends[-1].playId == "greeting", where)
        self.assertGreater(ends[-1].duration, len(_audio["greeting"]) // 16 * 0.95, where)

    def test_echo_never_interrupts(self):
        """The bot's own voice returned at -6..-20 dB, 20..200 ms late, PCMU and 16 kHz PCM: the greeting
        plays to its end, no pause, no interruption; the guard did see echo."""
        seconds = len(_audio["greeting"]) // SAMPLE_RATE + 1
        for codec in ("pcmu", "pcm"):
            for delay_ms, gain_db in ((20, -6.0), (20, -20.0), (60, -10.0), (120, -14.0), (150, -8.0),
                                      (200, -20.0), (200, -6.0)):
                where = f"{codec} {delay_ms} ms {gain_db} dB"
                line = Line(self, codec, delay_ms, gain_db)
                line.speak_greeting()
                line.run(seconds * 1000)
                self.assert_not_interrupted(line, where)
                self.assertGreater(line.session.processors.echo.echo_frames, 50, where)
                # the recogniser heard (nearly) nothing of the bot
                self.assertLess(line.recognizer.loud_ms, 300, where)
                line.close()

    def test_real_speech_over_the_bot_stops_it(self):
        """Another voice over the echoing bot: playout pauses within 250 ms of the caller's first
        sample (counted in ticks), then the words stop and flush it (``interruption``)."""
        for codec in ("pcmu", "pcm"):
            line = Line(self, codec, 60, -10.0)
            line.speak_greeting()
            line.run(3000)
            start_tick = len(line.bot_frames)
            line.say(_audio["caller"])
            line.run(2000)
            paused = line.metrics("interruption.paused")
            self.assertEqual(len(paused), 1, codec)
            # the first silent tick after the caller started
            first_quiet = next(i for i in range(start_tick, len(line.bot_frames)) if not line.bot_frames[i])
            lead = np.flatnonzero(np.abs(_audio["caller"]) > 300)[0] * 1000 // SAMPLE_RATE
            self.assertLessEqual((first_quiet - start_tick) * 20 - lead, 250, codec)
            stops = line.of(ev.Interruption)
            self.assertEqual(len(stops), 1, codec)
            self.assertEqual(stops[0].playId, "greeting")
            self.assertFalse(any(line.bot_frames[first_quiet:]), codec)
            line.close()

    def test_cough_pauses_then_resumes(self):
        """A throat-clearing "ahem" (0.45 s) and no words: the bot pauses, then resumes where it stopped after
        ``falseInterruptionMs``; the greeting still plays to its end, nothing was cut."""
        line = Line(self, "pcm", 60, -10.0, interruption={"strategy": "both", "falseInterruptionMs": 600},
                    words_after_ms=None)
        line.speak_greeting()
        line.run(3000)
        line.say(_audio["ahem"])
        line.run(3000)
        self.assertEqual(len(line.metrics("interruption.paused")), 1)
        resumed = line.metrics("interruption.resumed")
        self.assertEqual(len(resumed), 1)
        self.assertGreaterEqual(resumed[0].duration, 600)
        self.assertEqual(resumed[0].data["playId"], "greeting")
        line.run(10000)
        self.assertEqual(line.of(ev.Interruption), [])
        end = line.of(ev.TrackEnd)[-1]
        self.assertGreater(end.duration, len(_audio["greeting"]) // 16 * 0.95)
        # resumed where it stopped: every sample of the greeting went out exactly once
        sent = np.concatenate(line.out16)
        voiced = np.count_nonzero(np.abs(sent) > 0)
        self.assertLess(abs(voiced / np.count_nonzero(_audio["greeting"]) - 1.0), 0.02)
        line.close()

    def test_backchannel_does_not_stop(self):
        line = Line(self, "pcm", 60, -10.0, interruption={"strategy": "both", "backchannel": True,
                                                          "falseInterruptionMs": 500})
        line.recognizer.after_ms = None
        line.speak_greeting()
        line.run(3000)
        line.say(_audio["caller"][:6000])
        line.run(200)
        s = line.session
        s.emit(ev.AsrDelta(trackId=s.id, timestamp=s.now(), index=0, text="uh-huh"))
        line.run(3000)
        self.assertEqual(line.of(ev.Interruption), [])
        self.assertEqual(len(line.metrics("interruption.resumed")), 1)
        line.close()

    def test_ambiance_in_the_outbound_audio_not_in_what_asr_hears(self):
        """The bed is in every frame sent (ducked under the bot) and not in what the recogniser gets."""
        line = Line(self, "pcm", None, None, ambiance={"duckLevel": 0.1, "normalLevel": 0.3})
        line.gain_db = None
        line.run(1000)
        sent = np.concatenate(line.out16).astype(np.float64)
        self.assertTrue(all(line.bot_frames))
        bed = room_tone().astype(np.float64)
        rms_quiet = np.sqrt(np.mean(sent[FRAME_SAMPLES * 25:] ** 2))
        self.assertLess(abs(rms_quiet / np.sqrt(np.mean(bed ** 2)) - 0.3), 0.05)
        heard = np.concatenate(line.heard)
        self.assertEqual(np.count_nonzero(heard), 0)
        line.speak_greeting()
        line.run(2000)
        self.assertAlmostEqual(line.session.ambiance.gain, 0.1, places=6)
        line.close()


class PolicyTests(unittest.TestCase):
    def test_words_rules(self):
        p = InterruptionPolicy(min_words=2, backchannel=True)
        self.assertFalse(takes_the_turn(p, "Stop."))
        self.assertFalse(takes_the_turn(p, "uh-huh, yeah"))
        self.assertFalse(takes_the_turn(p, "嗯嗯"))
        self.assertTrue(takes_the_turn(p, "wait a moment"))
        self.assertTrue(takes_the_turn(InterruptionPolicy(), "Stop."))
        self.assertFalse(takes_the_turn(InterruptionPolicy(), "  "))
        self.assertEqual(word_count("我想 renew books"), 4)

    def test_from_mapping(self):
        p = InterruptionPolicy.from_mapping({"strategy": "VAD", "minSpeechMs": 80, "resumeAfterMs": 900,
                                             "echoCancel": False, "unknown": 1})
        self.assertEqual((p.strategy, p.min_speech_ms, p.false_interruption_ms, p.echo_cancel),
                         ("vad", 80, 900, False))
        for bad in ({"strategy": "loud"}, {"minWords": -1}, {"backchannel": "yes"}):
            self.assertRaises(ValueError, InterruptionPolicy.from_mapping, bad)

    def test_the_bots_own_words_are_not_the_callers(self):
        bot = "Thank you for calling the city library. Our opening hours are".split()
        for echo in ("the city library", "city libraries", "opening", "our hours are nine", "thank you"):
            self.assertTrue(echoes_the_bot(echo, bot), echo)
            self.assertFalse(takes_the_turn(InterruptionPolicy(), echo, bot_words=bot), echo)
        for caller in ("I would like to renew my books please", "can you tell me when you open tomorrow",
                       "wait", "wait a second"):
            self.assertFalse(echoes_the_bot(caller, bot), caller)
            self.assertTrue(takes_the_turn(InterruptionPolicy(), caller, bot_words=bot), caller)
        self.assertTrue(echoes_the_bot("我想问", ["我想", "问一下"]))
        self.assertFalse(echoes_the_bot("anything", []))

    def test_words_around_the_playout_point(self):
        from activecall.media.tracks import TtsTrack
        track = TtsTrack("c1", "p")
        track.spans.append((0, "one two three four"))
        track.feed(np.ones(4 * SAMPLE_RATE, dtype=np.int16))  # a word a second
        track.spans.append((track.fed, "five six"))
        track.feed(np.ones(2 * SAMPLE_RATE, dtype=np.int16))
        self.assertEqual(track.words_around(1000, 0), [])
        track.frames_played = 150  # 3 s: "three" is at 2.5 s, "four" at 3.5 s
        self.assertEqual(track.words_around(1000, 600), ["three", "four"])
        track.frames_played = 300
        self.assertEqual(track.words_around(2600, 500), ["four", "five", "six"])


class AmbianceUnitTests(unittest.TestCase):
    def test_ducks_and_loops(self):
        bed = np.full(500, 1000, dtype=np.int16)
        a = Ambiance(AmbianceSettings(duck_level=0.1, normal_level=0.5, transition_speed=0.1), bed)
        quiet = a.mix(None)
        self.assertEqual(int(quiet[0]), 500)
        bot = np.full(FRAME_SAMPLES, 2000, dtype=np.int16)
        gains = []
        for _ in range(6):
            out = a.mix(bot)
            gains.append(round(a.gain, 3))
        self.assertEqual(gains, [0.4, 0.3, 0.2, 0.1, 0.1, 0.1])
        self.assertEqual(int(out[-1]), 2100)

    def test_settings_over_config(self):
        from activecall.config import Ambiance as AmbianceConfig
        option = cmd.AmbianceOption(duckLevel=0.2)
        s = AmbianceSettings.resolve(option, AmbianceConfig(path="/x.wav", normalLevel=0.5))
        self.assertEqual((s.path, s.duck_level, s.normal_level), ("/x.wav", 0.2, 0.5))
        self.assertIsNone(AmbianceSettings.resolve(cmd.AmbianceOption(enabled=False), None))
        self.assertIsNone(AmbianceSettings.resolve(None, AmbianceConfig()))


class OnlyTheBotsSpeechPauses(unittest.TestCase):
    def test_a_file_or_bridge_track_is_not_paused(self):
        from activecall.call.barge_in import BargeIn
        from activecall.media.tracks import FileTrack
        clock = task.Clock()
        s = CallSession("c1", "webSocket", clock=clock, emit=lambda e: None, dump=False)
        s.barge_in.configure(InterruptionPolicy(min_speech_ms=32), decides=True)
        track = FileTrack("c1", "moh", "moh.wav")
        s.playback.start_track(track)
        track.set_audio(np.full(16000, 1000, dtype=np.int16))
        s.tick()
        for i in range(5):
            s.barge_in.voice_window(i * 32, 32, 0.9, 0.5)
        self.assertFalse(s.playback.held)
        self.assertIsInstance(s.barge_in, BargeIn)


class AmbianceFromUrlTests(unittest.TestCase):
    """``ambiance.path`` as an http(s) URL: fetched once at call set-up (the media cache), decoded, looped."""

    def test_url_bed_is_fetched_and_mixed(self):
        import os
        from activecall.audio import wav_bytes
        from activecall.media.tracks import MediaLoader

        bed = (np.sin(np.arange(8000) * 2 * np.pi * 200 / SAMPLE_RATE) * 8000).astype(np.int16)
        fetched = []

        class Response:
            code = 200

            def content(self):
                return defer.succeed(wav_bytes(bed))

        def http_get(url):
            fetched.append(url)
            return defer.succeed(Response())

        cache = os.path.abspath(self.mktemp())
        os.makedirs(cache)
        loader = MediaLoader(cache, http_get=http_get, run=_sync)
        events = []
        s = CallSession("c1", "webSocket", clock=task.Clock(), emit=events.append, dump=False,
                        media_loader=loader)
        s.option = cmd.CallOption.from_dict({"ambiance": {"path": "http://sounds.example/office.wav",
                                                          "normalLevel": 0.5}})
        s.answered()
        self.assertEqual(fetched, ["http://sounds.example/office.wav"])
        out = np.concatenate([s.tick() for _ in range(50)]).astype(np.float64)
        self.assertLess(abs(np.sqrt(np.mean(out ** 2)) / np.sqrt(np.mean(bed.astype(np.float64) ** 2)) - 0.5), 0.05)

    def test_a_missing_file_is_an_error_event_and_no_bed(self):
        events = []
        s = CallSession("c1", "webSocket", clock=task.Clock(), emit=events.append, dump=False)
        s.playback.loader.run = _sync
        s.option = cmd.CallOption.from_dict({"ambiance": {"path": "/nonexistent/bed.wav"}})
        s.answered()
        self.assertIsNone(s.ambiance)
        self.assertIsNone(s.tick())
        self.assertTrue(any(isinstance(e, ev.Error) and e.sender == "ambiance" for e in events))
