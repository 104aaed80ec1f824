"""Speech synthesised ahead of its turn (``Playback.prepare``, call/playback.py): never sent and never named
by an event until a ``tts`` with the play id it was claimed for and the same text adopts it; cancelling it
cancels its synthesis."""

import numpy as np
from twisted.internet import task
from twisted.trial import unittest

from activecall.call.playback import Playback
from activecall.protocol import events as ev
from activecall.testing import FakeSynthesizer


class PreparedSpeechTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.events = []
        self.synth = FakeSynthesizer(hold=True)
        self.playback = Playback("bot", self.events.append, self.clock, lambda option: self.synth)

    def answer(self, level=900, frames=2):
        d, sink = self.synth.pending.pop(0)
        sink(np.full(frames * 320, level, dtype=np.int16))
        d.callback(None)

    def starts(self):
        return [e.playId for e in self.events if isinstance(e, ev.TrackStart)]

    def test_prepared_audio_is_silent_until_a_claimed_tts_adopts_it(self):
        prepared = self.playback.prepare("Sure, Alice,", None)
        self.answer()
        self.assertTrue(prepared.done)
        self.assertEqual(prepared.samples, 640)
        self.assertIsNone(self.playback.tick())
        self.assertEqual(self.events, [])
        prepared.claim("llm-2")
        self.playback.tts("Sure, Alice,", None, play_id="llm-2")
        self.assertEqual(self.starts(), ["llm-2"])
        self.assertTrue(prepared.adopted)
        self.assertTrue((self.playback.tick() == 900).all())
        self.assertEqual(self.synth.texts, ["Sure, Alice,"])  # synthesised once
        metrics = [e for e in self.events if isinstance(e, ev.Metrics)]
        self.assertEqual([m.key for m in metrics], ["completed.tts.fake"])

    def test_unclaimed_or_other_text_is_synthesised_anew(self):
        prepared = self.playback.prepare("Sure, Alice,", None)
        self.answer()
        self.playback.tts("Sure, Alice,", None, play_id="llm-2")  # not claimed: not the confirmed reply
        self.assertFalse(prepared.adopted)
        self.assertEqual(self.synth.texts, ["Sure, Alice,", "Sure, Alice,"])
        prepared.claim("llm-3")
        self.playback.tts("Something else.", None, play_id="llm-3")
        self.assertFalse(prepared.adopted)
        self.assertEqual(self.synth.texts[-1], "Something else.")

    def test_cancel_cancels_the_synthesis_and_nothing_plays(self):
        prepared = self.playback.prepare("Sure, Alice,", None)
        prepared.claim("llm-2")
        prepared.cancel()
        self.assertEqual(self.synth.cancelled, ["Sure, Alice,"])
        self.assertIsNone(self.playback.prepared)
        self.playback.tts("Sure, Alice,", None, play_id="llm-2")
        self.assertFalse(prepared.adopted)
        self.assertEqual(self.synth.texts, ["Sure, Alice,", "Sure, Alice,"])

    def test_adopted_while_synthesising_then_the_queue_goes_on(self):
        prepared = self.playback.prepare("Sure, Alice,", None)
        prepared.claim("llm-2")
        self.playback.tts("Sure, Alice,", None, play_id="llm-2")
        self.playback.tts("one moment.", None, play_id="llm-2", end_of_stream=True)
        self.assertEqual(self.synth.texts, ["Sure, Alice,"])  # the next text waits for the first
        self.answer(level=500)
        self.assertEqual(self.synth.texts, ["Sure, Alice,", "one moment."])
        self.answer(level=300, frames=1)
        frames = [self.playback.tick() for _ in range(4)]
        self.assertEqual([int(f[0]) if f is not None else None for f in frames], [500, 500, 300, None])
        self.assertEqual([e.TAG for e in self.events if e.TAG in ("trackStart", "trackEnd")],
                         ["trackStart", "trackEnd"])

    def test_a_new_prepare_replaces_the_old_one(self):
        first = self.playback.prepare("One,", None)
        second = self.playback.prepare("Two,", None)
        self.assertTrue(first.cancelled)
        self.assertEqual(self.synth.cancelled, ["One,"])
        self.assertIs(self.playback.prepared, second)
