"""Offline TTS: flite streams 16 kHz audio, is killed on cancel, and the cache
answers a repeated prompt without a process."""

from __future__ import annotations

import os

import numpy as np
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from activecall.speech import registry
from activecall.speech.base import OptionError, ProviderNotFound, SpeechError, TtsOptions
from activecall.speech.cache import TtsCache, cache_key
from activecall.speech.tts.sentences import split_sentences

LONG = " and ".join(["this rather long clause keeps the synthesiser busy"] * 7) + "."  # one sentence


class FliteTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_streams_16k_per_sentence(self):
        synth = registry.create_synthesizer({"provider": "flite", "speaker": "kal"})  # an 8 kHz voice
        chunks = []
        samples = yield synth.synthesize("Hello there. How are you today?", chunks.append)
        self.assertEqual(synth.processes_spawned, 2)
        self.assertEqual(samples, sum(c.size for c in chunks))
        self.assertTrue(all(c.dtype == np.int16 and c.size <= 1600 for c in chunks))
        self.assertGreater(samples / 16000, 1.0)  # about 2 s of speech, resampled to 16 kHz
        self.assertLess(samples / 16000, 5.0)

    @defer.inlineCallbacks
    def test_speed_shortens_audio(self):
        slow = yield registry.create_synthesizer({"provider": "flite"}).synthesize("One two three four five.", list().append)
        fast = yield registry.create_synthesizer({"provider": "flite", "speed": 2.0}).synthesize(
            "One two three four five.", list().append)
        self.assertLess(fast, slow * 0.7)

    def test_cancel_kills_the_process(self):
        synth = registry.create_synthesizer({"provider": "flite"})
        chunks, pending = [], []
        ended = defer.Deferred()
        original = reactor.spawnProcess

        def spy(proto, *args, **kw):
            transport = original(proto, *args, **kw)
            proto.done.addErrback(lambda f: ended.callback(f.value) or None)
            reactor.callLater(0, lambda: pending[0].cancel())  # while flite is still running
            return transport

        self.patch(reactor, "spawnProcess", spy)
        d = synth.synthesize(LONG, chunks.append)
        pending.append(d)
        self.assertFailure(d, defer.CancelledError)

        def check(reason):
            self.assertIn("signal 9", str(reason))
            self.assertEqual(chunks, [])
            self.assertEqual(synth.processes_spawned, 1)

        return d.addCallback(lambda _: ended).addCallback(check)

    def test_cancel_mid_stream_kills_the_next_process(self):
        synth = registry.create_synthesizer({"provider": "flite"})
        chunks, killed = [], []
        original = reactor.spawnProcess

        def spy(proto, *args, **kw):
            reaped = defer.Deferred()
            proto.done.addErrback(lambda f: reaped.callback(f.value) or None)
            killed.append(reaped)
            transport = original(proto, *args, **kw)
            if len(killed) == 2:  # the first sentence has been delivered; the second is being synthesised
                reactor.callLater(0, d.cancel)
            return transport

        self.patch(reactor, "spawnProcess", spy)
        d = synth.synthesize("Hello there. " + LONG, chunks.append)
        self.assertFailure(d, defer.CancelledError)

        def check(_):
            delivered = len(chunks)
            self.assertGreater(delivered, 0)
            return killed[1].addCallback(lambda reason: (
                self.assertIn("signal 9", str(reason)),
                self.assertEqual(len(chunks), delivered),
                self.assertEqual(synth.processes_spawned, 2)))

        return d.addCallback(check)

    def test_cancel_from_the_sink_stops_at_once(self):
        synth = registry.create_synthesizer({"provider": "flite"})
        chunks = []

        def sink(pcm):
            chunks.append(pcm)
            d.cancel()

        d = synth.synthesize("Hello there. How are you today?", sink)
        self.assertFailure(d, defer.CancelledError)

        def check():
            self.assertEqual(len(chunks), 1)  # not the rest of the sentence
            self.assertEqual(synth.processes_spawned, 1)  # and no process for the next one

        return d.addCallback(lambda _: task.deferLater(reactor, 0, check))  # once the synthesis could go on

    def test_unknown_voice(self):
        e = self.assertRaises(SpeechError, registry.create_synthesizer, {"provider": "flite", "speaker": "bob"})
        self.assertIn("rms", str(e))

    def test_unknown_provider(self):
        e = self.assertRaises(ProviderNotFound, registry.create_synthesizer, {"provider": "msedge"})
        self.assertTrue(str(e).startswith("unknown tts provider 'msedge'; available: "), str(e))
        self.assertIn("flite", e.available)

    def test_bad_speed(self):
        self.assertRaises(OptionError, TtsOptions.from_dict, {"speed": 10})
        self.assertRaises(OptionError, TtsOptions.from_dict, {"speed": "fast"})


class SentenceTests(unittest.TestCase):
    def test_split(self):
        self.assertEqual(split_sentences("Hi. How are you?  Fine!"), ["Hi.", "How are you?", "Fine!"])
        self.assertEqual(split_sentences("你好。再见！"), ["你好。", "再见！"])
        self.assertEqual(split_sentences("  "), [])

    def test_first_chunk_is_a_short_clause_or_phrase(self):
        from activecall.speech.tts.sentences import first_chunk_split, speech_chunks
        self.assertEqual(first_chunk_split("Please send the invoice to Maria Johnson."),
                         ["Please send the invoice,", "to Maria Johnson."])
        self.assertEqual(first_chunk_split("Yes, that is correct, thank you very much."),
                         ["Yes, that is correct,", "thank you very much."])
        self.assertEqual(first_chunk_split("My name is David Smith and I live in Boston."),
                         ["My name is David Smith,", "and I live in Boston."])
        # no conjunction or preposition early enough: before a determiner
        self.assertEqual(first_chunk_split("Could you repeat the last four digits, please?"),
                         ["Could you repeat,", "the last four digits, please?"])
        for short in ("Hi.", "Thank you.", "Sure, Alice, your order has shipped.", "Your order has shipped."):
            self.assertEqual(first_chunk_split(short), [short])  # a cut would not be worth it
        self.assertEqual(speech_chunks("Thank you for calling us, how can I help? Bye."),
                         ["Thank you for calling us,", "how can I help?", "Bye."])
        self.assertEqual(speech_chunks("The order number is seven eight two nine. It ships today."),
                         ["The order number,", "is seven eight two nine.", "It ships today."])
        parts = split_sentences("word " * 200, max_chars=100)
        self.assertTrue(all(len(p) <= 100 for p in parts))
        self.assertEqual(" ".join(parts).split(), ["word"] * 200)


class CacheTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_second_synthesis_spawns_no_process(self):
        cache = TtsCache(self.mktemp())
        synth = registry.create_synthesizer({"provider": "flite"}, cache=cache)
        first, second = [], []
        yield synth.synthesize("Your call is important to us.", first.append)
        self.assertEqual(synth.inner.processes_spawned, 1)
        yield synth.synthesize("Your call is important to us.", second.append)
        self.assertEqual(synth.inner.processes_spawned, 1)
        self.assertEqual(cache.hits, 1)
        np.testing.assert_array_equal(np.concatenate(first), np.concatenate(second))
        # another voice or speed is another entry
        other = registry.create_synthesizer({"provider": "flite", "speed": 1.5}, cache=cache)
        yield other.synthesize("Your call is important to us.", list().append)
        self.assertEqual(other.inner.processes_spawned, 1)
        self.assertEqual(len([n for n in os.listdir(cache.path) if n.endswith(".pcm")]), 2)

    def test_a_lone_surrogate_in_the_text_still_has_a_key(self):
        """JSON from a client may carry a lone \\udc80; its entry is named like any other text."""
        from activecall.speech.cache import cache_key
        odd = cache_key("flite", None, 1.0, "card \udc80 ends")
        self.assertRegex(odd, "^[0-9a-f]{64}$")
        self.assertNotEqual(odd, cache_key("flite", None, 1.0, "card \udc81 ends"))

    def test_lru_bound_and_atomic_files(self):
        cache = TtsCache(self.mktemp(), max_bytes=3000, memory_bytes=0)  # the disk's own LRU
        for i, key in enumerate("abc"):
            cache.put(key, np.full(500, i, dtype=np.int16))  # 1000 bytes each
            os.utime(cache._file(key), ns=(i * 10 ** 9, i * 10 ** 9))
        self.assertIsNotNone(cache.get("a"))  # a becomes the most recent
        cache.put("d", np.zeros(500, dtype=np.int16))
        self.assertFalse(os.path.exists(cache._file("b")))  # least recently used went from disk
        for key in "acd":
            self.assertIsNotNone(cache.get(key))
        self.assertEqual([n for n in os.listdir(cache.path) if n.startswith(".tmp-")], [])

    def test_hits_are_served_from_memory_within_its_bound(self):
        cache = TtsCache(self.mktemp(), memory_bytes=4000)
        cache.put("a", np.arange(500, dtype=np.int16))  # 1000 bytes
        os.unlink(cache._file("a"))  # memory still has it: no file is read
        np.testing.assert_array_equal(cache.get("a"), np.arange(500, dtype=np.int16))
        self.assertFalse(cache.get("a").flags.writeable)  # shared by every call that plays it
        for key in "bcde":
            cache.put(key, np.zeros(500, dtype=np.int16))
        self.assertIsNone(cache.get("a"))  # pushed out of memory by newer entries, and gone from disk
        self.assertLessEqual(sum(p.nbytes for p in cache._memory.values()), 4000)
        cache.put("long", np.zeros(2000, dtype=np.int16))  # over a quarter of the bound: disk only
        self.assertNotIn("long", cache._memory)
        self.assertEqual(cache.get("long").size, 2000)

    def test_a_memory_hit_touches_the_file_at_most_once_a_minute(self):
        cache = TtsCache(self.mktemp())
        cache.put("a", np.zeros(10, dtype=np.int16))
        os.utime(cache._file("a"), ns=(0, 0))
        cache.get("a")
        self.assertEqual(os.stat(cache._file("a")).st_mtime_ns, 0)  # touched when it was stored
        cache._touched["a"] -= TtsCache.TOUCH_INTERVAL
        cache.get("a")
        self.assertGreater(os.stat(cache._file("a")).st_mtime_ns, 0)

    def test_key_depends_on_every_part(self):
        base = cache_key("flite", "rms", 1.0, "hi")
        self.assertNotEqual(base, cache_key("flite", "kal16", 1.0, "hi"))
        self.assertNotEqual(base, cache_key("flite", "rms", 1.2, "hi"))
        self.assertNotEqual(base, cache_key("openai", "rms", 1.0, "hi"))
        self.assertNotEqual(base, cache_key("flite", "rms", 1.0, "hi!"))

    def test_cancelled_synthesis_is_not_stored(self):
        cache = TtsCache(self.mktemp())
        synth = registry.create_synthesizer({"provider": "flite"}, cache=cache)
        ended = []
        original = reactor.spawnProcess

        def spy(proto, *args, **kw):
            ended.append(proto.done.addErrback(lambda f: None))  # the killed process is reaped
            return original(proto, *args, **kw)

        self.patch(reactor, "spawnProcess", spy)
        d = synth.synthesize(LONG, list().append)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        return defer.gatherResults(ended).addCallback(
            lambda _: self.assertEqual(os.listdir(cache.path), []))
