"""ASR worker processes (speech/asr/{frames,worker,pool}.py): the frame format, garbage in both
directions, a worker killed mid-utterance (one logged error, the next utterance recognised on a new
worker), shutdown reaping every worker (no zombies), and the pool's stream placement."""

from __future__ import annotations

import json
import os
import signal
import sys

from twisted.internet import defer
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest

from activecall.speech import registry
from activecall.speech.asr import frames as fr
from activecall.speech.asr import pool as poolmod
from activecall.speech.asr.pool import PoolService, WorkerPool
from activecall.speech.asr.worker import Decoders, handle
from activecall.speech.testing import frames, synthesize_pcm, word_error_rate

SENTENCE = "Please transfer me to the billing department."


def gone(pid: int) -> bool:
    """True when ``pid`` was reaped (a zombie still has a /proc entry)."""
    return not os.path.exists(f"/proc/{pid}")


class ErrorLog:
    """Collects error-level log events while a test runs."""

    def __init__(self, case: unittest.TestCase):
        self.events: list = []
        globalLogPublisher.addObserver(self)
        case.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event):
        if event.get("log_level") == LogLevel.error:
            from twisted.logger import formatEvent
            self.events.append(formatEvent(event))


class FrameTests(unittest.TestCase):
    def test_round_trip_in_pieces(self):
        data = fr.encode(fr.AUDIO, 7, b"\x01\x02" * 10) + fr.encode(fr.CLOSE, 8)
        decoder = fr.FrameDecoder()
        got = []
        for i in range(len(data)):
            got += decoder.feed(data[i:i + 1])
        self.assertEqual(got, [(fr.AUDIO, 7, b"\x01\x02" * 10), (fr.CLOSE, 8, b"")])

    def test_bad_lengths(self):
        self.assertRaises(fr.FrameError, fr.FrameDecoder().feed, b"\x00\x00\x00\x02ab")
        self.assertRaises(fr.FrameError, fr.FrameDecoder(max_frame=100).feed, fr.encode(fr.AUDIO, 1, b"x" * 200))
        self.assertRaises(fr.FrameError, fr.FrameDecoder().feed, b"hello world\n")


class HandleTests(unittest.TestCase):
    """The worker's request handling, without a process: every bad request gets an X reply."""

    def reply(self, decoders, kind, stream, payload=b""):
        return fr.FrameDecoder().feed(handle(decoders, kind, stream, payload))[0]

    def test_garbage_requests_get_errors(self):
        d = Decoders()
        for kind, payload, why in [(b"Z", b"", "unknown request kind"), (fr.OPEN, b"{nope", "JSONDecodeError"),
                                   (fr.OPEN, b"[1]", "JSON object"), (fr.AUDIO, b"\0\0", "not open"),
                                   (fr.BEGIN, b"", "not open"), (fr.END, b"", "not open")]:
            kind_out, stream, text = self.reply(d, kind, 3, payload)
            self.assertEqual((kind_out, stream), (fr.ERROR, 3), (kind, payload))
            self.assertIn(why, text.decode())
        self.assertEqual(self.reply(d, fr.CLOSE, 3), (fr.TEXT, 3, b""))  # closing an unknown stream is harmless

    def test_decoder_reused_with_a_fresh_cepstral_mean(self):
        d = Decoders()
        self.assertEqual(self.reply(d, fr.OPEN, 1, b"{}")[0], fr.TEXT)
        decoder, start = d.streams[1][1], d.streams[1][2]
        self.reply(d, fr.BEGIN, 1)
        self.reply(d, fr.END, 1, (os.urandom(32000)))
        self.assertNotEqual(decoder.get_cmn(), start)
        self.reply(d, fr.CLOSE, 1)
        self.reply(d, fr.OPEN, 2, b"{}")
        self.assertIs(d.streams[2][1], decoder)
        self.assertEqual(decoder.get_cmn(), start)


class PoolPlacementTests(unittest.TestCase):
    def test_new_worker_while_there_is_room_then_least_loaded(self):
        class FakeWorker:
            dead = False

            def __init__(self):
                self.streams = set()

        pool = WorkerPool(size=2)
        pool._spawn = lambda: pool.workers.append(FakeWorker()) or pool.workers[-1]
        streams = [pool.stream({}) for _ in range(5)]
        placed = [pool._assign(s) for s in streams[:3]]
        self.assertEqual(len(pool.workers), 2)
        self.assertIs(placed[0], placed[2])
        self.assertIsNot(placed[0], placed[1])
        placed[0].streams.clear()
        self.assertIs(pool._assign(streams[3]), placed[0])
        placed[0].dead = placed[1].dead = True
        self.assertEqual(len(pool.workers), 2)
        self.assertNotIn(pool._assign(streams[4]), placed)  # a dead worker is replaced


class WorkerProcessTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.errors = ErrorLog(self)

    def pool(self, **kw) -> WorkerPool:
        pool = WorkerPool(**kw)
        self.addCleanup(pool.stop)
        return pool

    @defer.inlineCallbacks
    def recognise(self, pool, pcm) -> defer.Deferred:
        results = []
        asr = registry.create_recognizer({"provider": "pocketsphinx", "extra": {"endpointing": "external"}},
                                         results.append, pool=pool)
        for frame in frames(pcm):
            asr.feed(frame)
        yield asr.close()
        return [r for r in results if r.final]

    @defer.inlineCallbacks
    def test_garbage_request_is_answered_and_the_worker_lives_on(self):
        pool = self.pool(size=1)
        stream = pool.stream({})
        self.assertEqual((yield stream.begin(0)), "")
        worker = stream.worker
        e = yield self.assertFailure(worker.request(b"Z", 99, b"junk"), poolmod.SpeechError)
        self.assertIn("unknown request kind", str(e))
        pcm = yield synthesize_pcm(SENTENCE)
        finals = yield self.recognise(pool, pcm)
        self.assertIs(pool.workers[0], worker)
        self.assertLessEqual(word_error_rate(SENTENCE, finals[0].text), 0.2, finals)

    @defer.inlineCallbacks
    def test_unframeable_input_ends_the_worker_and_a_new_one_serves(self):
        pool = self.pool(size=1)
        stream = pool.stream({})
        yield stream.begin(0)
        worker = stream.worker
        worker.transport.write(b"\x7f\xff\xff\xffgarbage")
        yield worker.ended
        self.assertEqual(worker.exit_reason, "exit code 2")
        self.assertTrue(gone(worker.pid))
        self.assertTrue(any("exited unexpectedly (exit code 2)" in e for e in self.errors.events), self.errors.events)
        pcm = yield synthesize_pcm(SENTENCE)
        finals = yield self.recognise(pool, pcm)
        self.assertNotEqual(pool.workers[0].pid, worker.pid)
        self.assertLessEqual(word_error_rate(SENTENCE, finals[0].text), 0.2, finals)

    @defer.inlineCallbacks
    def test_garbage_from_a_worker_kills_it(self):
        script = "import sys; sys.stdout.write('hello world\\n'); sys.stdout.flush(); sys.stdin.read()"
        pool = self.pool(size=1, argv=[sys.executable, "-c", script])
        stream = pool.stream({}, "pocketsphinx")
        self.assertIsNone((yield stream.begin(0)))
        self.assertTrue(any("broke the frame protocol" in e for e in self.errors.events), self.errors.events)
        self.assertTrue(any("utterance 0 is lost" in e for e in self.errors.events), self.errors.events)

    @defer.inlineCallbacks
    def test_worker_killed_mid_utterance(self):
        """The utterance being decoded is lost with one error; the next one is recognised on a new worker."""
        pool = self.pool(size=1)
        pcm = yield synthesize_pcm(SENTENCE)
        results = []
        asr = registry.create_recognizer({"provider": "pocketsphinx", "extra": {"endpointing": "external"}},
                                         results.append, pool=pool)
        reported = []
        asr.on_error = reported.append  # what the call turns into error{sender:"asr"}
        chunks = list(frames(pcm))
        for frame in chunks[:len(chunks) // 2]:
            asr.feed(frame)
        worker = pool.workers[0]
        os.kill(worker.pid, signal.SIGKILL)
        yield worker.ended
        self.assertEqual(worker.exit_reason, f"signal {signal.SIGKILL}")
        for frame in chunks[len(chunks) // 2:]:
            asr.feed(frame)
        asr.end_utterance()
        for frame in chunks:
            asr.feed(frame)
        yield asr.close()
        finals = [r for r in results if r.final]
        self.assertEqual([r.index for r in finals], [1], results)
        self.assertLessEqual(word_error_rate(SENTENCE, finals[0].text), 0.2, finals[0].text)
        lost = [e for e in self.errors.events if "utterance 0 is lost" in e]
        self.assertEqual(len(lost), 1, self.errors.events)
        self.assertIn("pocketsphinx", lost[0])
        self.assertEqual(len(reported), 1, reported)
        self.assertIn("utterance 0 failed", reported[0])
        self.assertNotEqual(pool.workers[0].pid, worker.pid)

    @defer.inlineCallbacks
    def test_stop_reaps_every_worker(self):
        pool = WorkerPool(size=2)
        streams = [pool.stream({}) for _ in range(2)]
        yield defer.gatherResults([s.begin(0) for s in streams])
        pids = [w.pid for w in pool.workers]
        self.assertEqual(len(set(pids)), 2)
        yield pool.stop()
        self.assertEqual(pool.workers, [])
        for pid in pids:
            self.assertTrue(gone(pid), f"worker {pid} not reaped")
        self.assertEqual(self.errors.events, [])  # a requested stop is not an error

    @defer.inlineCallbacks
    def test_stop_kills_a_worker_that_ignores_eof(self):
        script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
        pool = WorkerPool(size=1, argv=[sys.executable, "-c", script], stop_timeout=0.2)
        stream = pool.stream({})
        stream.begin(0)
        pid = stream.worker.pid
        yield pool.stop()
        self.assertTrue(gone(pid))

    @defer.inlineCallbacks
    def test_service_stops_the_default_pool(self):
        self.patch(poolmod, "_default", WorkerPool(size=1))
        stream = poolmod.default_pool().stream({})
        yield stream.begin(0)
        pid = stream.worker.pid
        svc = PoolService()
        svc.startService()
        yield svc.stopService()
        self.assertTrue(gone(pid))

    def test_the_stream_opens_when_the_recogniser_is_made(self):
        """A call's decoder is taken (its worker spawned) before the caller says anything: the first words,
        often a barge-in over the greeting, do not wait for a worker to start and a model to load."""
        pool = WorkerPool(size=1)
        self.addCleanup(pool.stop)
        asr = registry.create_recognizer({"provider": "pocketsphinx"}, list.append, pool=pool)
        self.assertEqual(len(pool.workers), 1)
        self.assertIs(asr._stream.worker, pool.workers[0])
        self.assertIn(asr._stream, pool.workers[0].streams)
        return asr.close()

    def test_open_options_are_json(self):
        """What the recogniser asks the worker to load (model paths, the cepstral start)."""
        pool = WorkerPool(size=1)
        self.addCleanup(pool.stop)  # the recogniser opened its stream (a worker) when made
        asr = registry.create_recognizer(
            {"provider": "pocketsphinx", "extra": {"cmninit": "narrowband", "hmm": "/m/hmm", "endpointing": "external"}},
            list.append, pool=pool)
        options = json.loads(json.dumps(asr._stream.options))
        self.assertEqual(options["hmm"], "/m/hmm")
        self.assertEqual(len(options["cmninit"].split(",")), 13)
        self.assertNotIn("endpointing", options)


class IncrementalDecodingTests(unittest.TestCase):
    """The recogniser sends audio as it arrives (320 ms steps, plus whatever is pending when the caller
    pauses); the final must be the same text however the audio was cut."""

    CLIPS = ("Please transfer me to the billing department.", "I would like to check the status of my order.",
             "Can you call me back tomorrow morning?")

    def decode(self, pcm, cuts) -> str:
        d = Decoders()
        d.open(1, {})
        d.begin(1)
        start = 0
        for cut in cuts:
            d.audio(1, pcm[start:cut].astype("<i2").tobytes())
            start = cut
        return d.end(1, pcm[start:].astype("<i2").tobytes())

    @defer.inlineCallbacks
    def test_same_text_however_the_audio_is_cut(self):
        for sentence in self.CLIPS:
            pcm = yield synthesize_pcm(sentence)
            steps = list(range(5120, pcm.size, 5120))
            whole = self.decode(pcm, [])
            self.assertLess(word_error_rate(sentence, whole), 0.5, whole)
            self.assertEqual(self.decode(pcm, steps), whole)
            # a pause flush in the middle of a step (the recogniser's _flush), then steps again
            flushed = sorted(set(steps[:3] + [steps[3] - 1700] + [s + 3420 for s in steps[3:-1]]))
            self.assertEqual(self.decode(pcm, flushed), whole)
