"""VAD: the segmenter's padding rules, silero batching across streams, and both
real detectors against flite speech with known extents."""

from __future__ import annotations

import os

import numpy as np
from twisted.internet import defer, task
from twisted.trial import unittest

from activecall.speech import registry
from activecall.speech.base import (
    OptionError, ProviderNotFound, SilenceTimeout, SpeechEnded, SpeechError, SpeechStarted, VadOptions,
)
from activecall.speech.testing import frames, labelled_speech
from activecall.speech.vad.segmenter import Segmenter

TEXTS = [
    "Hello, thank you for calling the support line.",
    "I would like to check the status of my order.",
    "Please transfer me to the billing department.",
    "Goodbye.",
]

_cache: dict = {}


@defer.inlineCallbacks
def shared_audio():
    """The labelled recording, synthesised once per test run."""
    if "audio" not in _cache:
        _cache["audio"] = yield labelled_speech(TEXTS, gap_ms=(1500, 1000, 2000))
    return _cache["audio"]


def run(seg: Segmenter, probs, window_ms=32):
    events = []
    for i, p in enumerate(probs):
        events += seg.push(i * window_ms, window_ms, p)
    return events


class SegmenterTests(unittest.TestCase):
    def test_short_blip_is_not_speech(self):
        seg = Segmenter(VadOptions(speechPadding=250, silencePadding=100))
        # 160 ms voiced, then quiet: shorter than speechPadding.
        self.assertEqual(run(seg, [0.9] * 5 + [0.0] * 20), [])

    def test_start_and_end_times(self):
        seg = Segmenter(VadOptions(speechPadding=250, silencePadding=100))
        events = run(seg, [0.0] * 10 + [0.9] * 20 + [0.0] * 10)
        # voice from 320 ms to 960 ms; started after 256 ms of it, ended after 128 ms of quiet
        self.assertEqual(events, [SpeechStarted(320), SpeechEnded(320, 960)])

    def test_hysteresis_keeps_a_segment_through_dips(self):
        seg = Segmenter(VadOptions(speechPadding=100, silencePadding=100, voiceThreshold=0.5))
        events = run(seg, [0.9] * 5 + [0.4] * 10 + [0.9] * 5 + [0.0] * 5)
        self.assertEqual(events, [SpeechStarted(0), SpeechEnded(0, 640)])

    def test_gap_shorter_than_silence_padding_does_not_split(self):
        seg = Segmenter(VadOptions(speechPadding=100, silencePadding=300))
        events = run(seg, [0.9] * 10 + [0.0] * 5 + [0.9] * 10 + [0.0] * 12)
        self.assertEqual(events, [SpeechStarted(0), SpeechEnded(0, 800)])

    def test_silence_timeout_repeats(self):
        seg = Segmenter(VadOptions(silenceTimeout=320))
        events = run(seg, [0.0] * 31)  # 992 ms of quiet
        self.assertEqual(events, [SilenceTimeout(0, 320), SilenceTimeout(0, 640), SilenceTimeout(0, 960)])

    def test_finish_closes_open_segment(self):
        seg = Segmenter(VadOptions(speechPadding=64))
        self.assertEqual(run(seg, [0.9] * 4), [SpeechStarted(0)])
        self.assertEqual(seg.finish(128), [SpeechEnded(0, 128)])


class OptionTests(unittest.TestCase):
    def test_unknown_type_names_the_available_ones(self):
        e = self.assertRaises(ProviderNotFound, registry.create_vad, {"type": "tiny"}, list.append)
        self.assertIn("'tiny'", str(e))
        for name in ("silero", "webrtcvad", "nop"):
            self.assertIn(name, str(e))

    def test_bad_option_names_the_key(self):
        e = self.assertRaises(OptionError, VadOptions.from_dict, {"speechPadding": "250"})
        self.assertIn("vad.speechPadding", str(e))
        e = self.assertRaises(OptionError, VadOptions.from_dict, {"voiceThreshold": 1.5})
        self.assertIn("vad.voiceThreshold", str(e))

    def test_defaults(self):
        o = VadOptions.from_dict({})
        self.assertEqual((o.type, o.speechPadding, o.silencePadding, o.voiceThreshold), ("silero", 250, 100, 0.5))


class SileroModelFileTests(unittest.TestCase):
    """The model ships as activecall's package data (no silero-vad or torch needed)."""

    def test_default_model_is_the_shipped_file(self):
        from activecall.speech.vad import silero
        path = silero.model_path()
        self.assertEqual(path, os.path.join(silero.DATA_DIR, "silero_vad.onnx"))
        self.assertTrue(os.path.isfile(path))
        self.assertTrue(os.path.isfile(os.path.join(silero.DATA_DIR, "LICENSE.silero-vad")))

    def test_missing_model_names_the_file_and_where_it_was_looked_for(self):
        from activecall.speech.vad import silero
        self.patch(silero, "DATA_DIR", os.path.abspath(self.mktemp()))
        self.patch(silero.importlib.util, "find_spec", lambda name: None)

        def no_distribution(name):
            raise silero.importlib.metadata.PackageNotFoundError(name)

        self.patch(silero.importlib.metadata, "files", no_distribution)
        e = self.assertRaises(SpeechError, silero.model_path)
        self.assertIn("silero_vad.onnx", str(e))
        self.assertIn(silero.DATA_DIR, str(e))
        self.assertIn("silero-vad", str(e))


def _sync(f, *args):
    return defer.maybeDeferred(f, *args)


class SileroBatchingTests(unittest.TestCase):
    """Many streams fed in one reactor turn go to onnxruntime in one batch."""

    @defer.inlineCallbacks
    def test_one_batch_per_tick_and_same_answers_as_alone(self):
        from activecall.speech.vad.silero import SileroBatcher, SileroVad
        audio = yield shared_audio()
        pcm = audio.pcm[: 16000 * 6]
        clock = task.Clock()
        batcher = SileroBatcher(reactor=clock, run_in_thread=_sync)
        streams, events = [], []
        for i in range(5):
            got = []
            events.append(got)
            # each stream starts at a different offset, so the rounds really differ per stream
            streams.append((SileroVad(VadOptions(), got.append, batcher=batcher), pcm[i * 3200:]))
        for n in range(0, pcm.size, 320):
            for vad, stream_pcm in streams:
                vad.feed(stream_pcm[n:n + 320])
            clock.advance(0)
        # one onnxruntime batch per window period for all five streams (unbatched: five per period)
        self.assertLessEqual(batcher.batches, pcm.size // 512 + 1)
        self.assertGreater(batcher.batches, 0)
        for vad, _ in streams:
            yield vad.close()
        # the same stream alone, on its own batcher, gives the same events
        for i, (_, stream_pcm) in enumerate(streams):
            alone = []
            solo = SileroVad(VadOptions(), alone.append, batcher=SileroBatcher(reactor=clock, run_in_thread=_sync))
            for frame in frames(stream_pcm[: pcm.size]):
                solo.feed(frame)
            clock.advance(0)
            yield solo.close()
            self.assertEqual(alone, events[i])
            self.assertTrue(any(isinstance(e, SpeechStarted) for e in alone))

    def test_drain_waits_for_the_batch(self):
        from activecall.speech.vad.silero import SileroBatcher, SileroVad
        clock = task.Clock()
        vad = SileroVad(VadOptions(), [].append, batcher=SileroBatcher(reactor=clock, run_in_thread=_sync))
        vad.feed(np.zeros(1024, dtype=np.int16))
        d = vad.drain()
        self.assertNoResult(d)
        clock.advance(0)
        self.successResultOf(d)


class LabelledSpeechTests(unittest.TestCase):
    """Both detectors find the four utterances within a tolerance (real threads for silero)."""

    START_TOLERANCE_MS = 150
    END_TOLERANCE_MS = 250

    @defer.inlineCallbacks
    def check(self, vad_type, **options):
        audio = yield shared_audio()
        events = []
        vad = registry.create_vad(dict(type=vad_type, silencePadding=400, **options), events.append)
        for frame in frames(audio.pcm):
            vad.feed(frame)
        yield vad.close()
        found = [(e.start_ms, e.end_ms) for e in events if isinstance(e, SpeechEnded)]
        self.assertEqual(len(found), len(audio.segments), f"{vad_type}: {found} vs labels {audio.segments}")
        for (s, e), (ls, le) in zip(found, audio.segments):
            self.assertLess(abs(s - ls), self.START_TOLERANCE_MS, f"start {s} vs label {ls}")
            self.assertLess(abs(e - le), self.END_TOLERANCE_MS, f"end {e} vs label {le}")
        starts = [e.start_ms for e in events if isinstance(e, SpeechStarted)]
        self.assertEqual(starts, [s for s, _ in found])

    def test_silero(self):
        return self.check("silero")

    def test_webrtcvad(self):
        return self.check("webrtcvad", mode=2)

    @defer.inlineCallbacks
    def test_nop_hears_nothing(self):
        audio = yield shared_audio()
        events = []
        vad = registry.create_vad({"type": "nop"}, events.append)
        for frame in frames(audio.pcm):
            vad.feed(frame)
        yield vad.close()
        self.assertEqual(events, [])
