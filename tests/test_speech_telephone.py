"""pocketsphinx on a G.711 leg: the first utterance of a call, through the daemon's own PCMU codec
(8 kHz, its 8 -> 16 kHz resampler), with and without the narrowband cepstral-mean start."""

from __future__ import annotations

import numpy as np
from twisted.internet import defer
from twisted.trial import unittest

from activecall.media.codecs import PcmuCodec
from activecall.speech import registry
from activecall.speech.asr.pool import default_pool
from activecall.speech.asr.pocketsphinx import NARROWBAND_CMN, cmn_init
from activecall.speech.base import OptionError
from activecall.speech.testing import frames, synthesize_pcm, word_error_rate

SENTENCES = [
    "I would like to check the status of my order.",
    "Please transfer me to the billing department.",
    "Can you call me back tomorrow morning?",
]


def g711_leg(pcm16k: np.ndarray) -> np.ndarray:
    """What the far end's 16 kHz audio becomes after a PCMU call leg, in 20 ms packets."""
    sender, receiver = PcmuCodec(), PcmuCodec()
    return np.concatenate([receiver.decode(sender.encode(f)) for f in frames(pcm16k) if f.size == 320])


class NarrowbandStartTests(unittest.TestCase):
    timeout = 240  # six decoder loads and decodes; generous for a loaded CI machine

    def setUp(self):
        self.addCleanup(default_pool().stop)  # its worker processes must not outlive the test

    @defer.inlineCallbacks
    def first_utterance_wer(self, **extra) -> float:
        """Mean WER over the sentences, each the first utterance of a fresh recogniser (a new call)."""
        total = 0.0
        for text in SENTENCES:
            pcm = g711_leg((yield synthesize_pcm(text, "rms")))
            results = []
            asr = registry.create_recognizer(
                {"provider": "pocketsphinx", "extra": {"endpointing": "external", **extra}}, results.append)
            for frame in frames(pcm):
                asr.feed(frame)
            yield asr.close()
            finals = [r.text for r in results if r.final]
            total += word_error_rate(text, " ".join(finals))
        return total / len(SENTENCES)

    @defer.inlineCallbacks
    def test_narrowband_start_recognises_the_first_utterance(self):
        narrowband = yield self.first_utterance_wer(cmninit="narrowband")
        default = yield self.first_utterance_wer()
        self.assertLessEqual(narrowband, 0.25, f"narrowband start: WER {narrowband:.2f}")
        # the reason the option exists: the model's wideband start does much worse here
        self.assertLess(narrowband + 0.2, default, f"narrowband {narrowband:.2f} vs default {default:.2f}")

    def test_option_values(self):
        self.assertIsNone(cmn_init(None))
        self.assertEqual(cmn_init("narrowband"), NARROWBAND_CMN)
        self.assertEqual(cmn_init(",".join(["1"] * 13)), ",".join(["1.0"] * 13))
        e = self.assertRaises(OptionError, registry.create_recognizer,
                              {"provider": "pocketsphinx", "extra": {"cmninit": "1,2,3"}}, list.append)
        self.assertIn("asr.extra.cmninit", str(e))
