"""Offline ASR: flite speech recognised by pocketsphinx, directly and through a
PCMU (8 kHz μ-law) telephone round trip; endpointing; provider errors."""

from __future__ import annotations

import numpy as np
from twisted.internet import defer
from twisted.trial import unittest

from activecall.audio import resample
from activecall.speech import registry
from activecall.speech.asr.pool import default_pool
from activecall.speech.base import ProviderNotFound, SpeechError
from activecall.speech.testing import frames, labelled_speech, synthesize_pcm, word_error_rate

SENTENCES = [
    "I would like to check the status of my order.",
    "Please transfer me to the billing department.",
]


# -- a G.711 μ-law codec written here, independent of the daemon's own, for the line simulation --

def ulaw_encode(pcm: np.ndarray) -> np.ndarray:
    x = pcm.astype(np.int32)
    sign = np.where(x < 0, 0x80, 0)
    mag = np.minimum(np.abs(x), 32635) + 0x84
    exp = np.clip(np.floor(np.log2(mag)).astype(np.int32) - 7, 0, 7)
    mant = (mag >> (exp + 3)) & 0x0F
    return (~(sign | (exp << 4) | mant) & 0xFF).astype(np.uint8)


def ulaw_decode(codes: np.ndarray) -> np.ndarray:
    c = ~codes.astype(np.int32) & 0xFF
    mag = ((((c & 0x0F) << 3) + 0x84) << ((c >> 4) & 0x07)) - 0x84
    return np.where(c & 0x80, -mag, mag).astype(np.int16)


def telephone_line(pcm16k: np.ndarray) -> np.ndarray:
    """16 kHz -> 8 kHz -> PCMU bytes -> 8 kHz -> 16 kHz (linear interpolation), as a SIP call carries it.

    Linear upsampling leaves images above 4 kHz; pocketsphinx's wideband model
    does better with them than with an empty top band (docs/speech.md).
    """
    line = ulaw_decode(ulaw_encode(resample(pcm16k, 16000, 8000))).astype(np.float64)
    return np.rint(np.interp(np.arange(line.size * 2) / 2, np.arange(line.size), line)).astype(np.int16)


class MuLawTests(unittest.TestCase):
    def test_round_trip_error_is_small(self):
        x = (np.sin(np.arange(8000) / 10) * 20000).astype(np.int16)
        y = ulaw_decode(ulaw_encode(x))
        self.assertLess(np.max(np.abs(y.astype(int) - x)), 20000 * 0.04)
        self.assertEqual(ulaw_encode(np.array([0], dtype=np.int16))[0], 0xFF)


class PocketsphinxTests(unittest.TestCase):
    MAX_WER = 0.3  # per sentence; flite rms scores ~0.02-0.15 on these

    def setUp(self):
        self.addCleanup(default_pool().stop)  # its worker processes must not outlive the test

    @defer.inlineCallbacks
    def recognise(self, pcm, **options):
        results = []
        asr = registry.create_recognizer(dict(provider="pocketsphinx", **options), results.append)
        for frame in frames(pcm):
            asr.feed(frame)
        yield asr.close()
        return results

    @defer.inlineCallbacks
    def test_two_utterances_found_and_recognised(self):
        audio = yield labelled_speech(SENTENCES, gap_ms=(1200,))
        results = yield self.recognise(audio.pcm)
        finals = [r for r in results if r.final]
        self.assertEqual([r.index for r in finals], [0, 1], results)
        for r, text, (ls, le) in zip(finals, SENTENCES, audio.segments):
            self.assertLessEqual(word_error_rate(text, r.text), self.MAX_WER, r.text)
            self.assertLess(abs(r.start_ms - ls), 400)
            self.assertGreater(r.end_ms, le)
        self.assertLessEqual(sum(word_error_rate(t, r.text) for r, t in zip(finals, SENTENCES)) / 2, 0.2)
        deltas = [r for r in results if not r.final]
        self.assertTrue(deltas, "no asrDelta before the finals")
        for index in (0, 1):
            first = [r for r in results if r.index == index][0]
            self.assertIsNotNone(first.ttfb_ms)
            self.assertGreaterEqual(first.ttfb_ms, 0)
            self.assertTrue(all(r.ttfb_ms is None for r in results if r.index == index and r is not first))

    @defer.inlineCallbacks
    def test_through_pcmu_line(self):
        audio = yield labelled_speech(SENTENCES[:1], gap_ms=(800,))
        results = yield self.recognise(telephone_line(audio.pcm))
        finals = [r for r in results if r.final]
        self.assertEqual(len(finals), 1, results)
        self.assertLessEqual(word_error_rate(SENTENCES[0], finals[0].text), 0.2, finals[0].text)

    @defer.inlineCallbacks
    def test_external_endpointing(self):
        pcm = yield synthesize_pcm(SENTENCES[0])
        results = []
        asr = registry.create_recognizer(
            {"provider": "pocketsphinx", "extra": {"endpointing": "external"}}, results.append)
        for frame in frames(pcm):
            asr.feed(frame)
        asr.end_utterance()
        for frame in frames(pcm):
            asr.feed(frame)
        yield asr.close()
        finals = [r for r in results if r.final]
        self.assertEqual([r.index for r in finals], [0, 1])
        for r in finals:
            self.assertLessEqual(word_error_rate(SENTENCES[0], r.text), 0.2, r.text)

    @defer.inlineCallbacks
    def test_silence_gives_no_result(self):
        results = yield self.recognise(np.zeros(16000, dtype=np.int16))
        self.assertEqual(results, [])

    def test_other_language_needs_a_model(self):
        e = self.assertRaises(SpeechError, registry.create_recognizer,
                              {"provider": "pocketsphinx", "language": "zh"}, list.append)
        self.assertIn("asr.extra.hmm", str(e))


class RegistryTests(unittest.TestCase):
    def test_unknown_provider_lists_available(self):
        e = self.assertRaises(ProviderNotFound, registry.create_recognizer, {"provider": "vosk"}, list.append)
        self.assertIn("'vosk'", str(e))
        self.assertIn("pocketsphinx", str(e))
        self.assertIn("sensevoice", str(e))


class SenseVoiceTests(unittest.TestCase):
    def test_without_model_dir_names_the_option(self):
        e = self.assertRaises(SpeechError, registry.create_recognizer, {"provider": "sensevoice"}, list.append)
        self.assertIn("asr.extra.model_dir", str(e))

    def test_model_dir_without_model(self):
        d = self.mktemp()
        import os
        os.makedirs(d)
        e = self.assertRaises(SpeechError, registry.create_recognizer,
                              {"provider": "sensevoice", "extra": {"model_dir": d}}, list.append)
        self.assertIn("model.int8.onnx", str(e))
