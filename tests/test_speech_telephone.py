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


class AttachOnG711LegTests(unittest.TestCase):
    """The daemon, not the test, asks pocketsphinx for the narrowband start on a G.711 leg (and
    only there): attach_processors reads the leg's codec (the end-to-end SIP tests use a fake
    recogniser, so this is the one place that choice is checked)."""

    def attach(self, codec: str, asr: dict):
        import dataclasses

        from twisted.internet import task

        from activecall.protocol import commands as cmd
        from activecall.call import speech as call_speech
        from activecall.call.session import CallSession
        from activecall.config import load_config

        cfg, _ = load_config(None)
        root = self.mktemp()
        cfg = dataclasses.replace(cfg, media_cache_path=root + "/cache",
                                  recording=dataclasses.replace(cfg.recording, path=root + "/rec"))
        session = CallSession("c1", "sip", clock=task.Clock(), emit=lambda e: None, config=cfg,
                              synthesizer_for=lambda opt: None, dump=False)
        session.option = cmd.CallOption(asr=cmd.TranscriptionOption.from_dict(asr))
        from activecall.media import codecs
        from activecall.testing import FakeLeg, FakeRecognizer

        session.leg = FakeLeg(codec=codecs.create(codec))

        asked = []

        def create_recognizer(options, on_result, reactor=None):
            asked.append(options)
            return FakeRecognizer(on_result)

        self.patch(call_speech.registry, "create_recognizer", create_recognizer)
        processors = call_speech.attach_processors(session)
        self.assertIsNotNone(processors)
        return asked[0]

    def test_pcmu_and_pcma_legs_start_narrowband(self):
        for codec in ("pcmu", "pcma"):
            options = self.attach(codec, {"provider": "pocketsphinx"})
            self.assertEqual(options["extra"]["cmninit"], "narrowband", codec)

    def test_wideband_legs_and_other_recognisers_are_left_alone(self):
        self.assertNotIn("cmninit", self.attach("g722", {"provider": "pocketsphinx"}).get("extra") or {})
        self.assertNotIn("cmninit", self.attach("pcmu", {"provider": "openai"}).get("extra") or {})

    def test_an_operator_choice_is_kept(self):
        options = self.attach("pcmu", {"provider": "pocketsphinx", "extra": {"cmninit": "40,3,-1"}})
        self.assertEqual(options["extra"]["cmninit"], "40,3,-1")
