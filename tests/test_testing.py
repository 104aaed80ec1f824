"""activecall.testing: the shared fakes provide the interfaces they stand in for, and the in-memory
datagram network behaves as the RTP legs' sockets must (delivery inside the send, UDP's drops and
refusals, the pool's port pairs)."""

import errno

import numpy as np
from twisted.internet import task
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from activecall.media.rtp import PortsExhausted
from activecall.speech.base import IStreamingRecognizer, ISynthesizer
from activecall.testing import (
    FRAME_SECONDS, FakeMediaSession, FakeRecognizer, FakeSynthesizer, ManualMediaClock, MemoryUdpNetwork,
    advance_frames,
)


class InterfaceTests(unittest.TestCase):
    def test_fake_synthesizer_is_an_isynthesizer(self):
        self.assertTrue(verifyObject(ISynthesizer, FakeSynthesizer()))

    def test_fake_recognizer_is_an_istreamingrecognizer(self):
        self.assertTrue(verifyObject(IStreamingRecognizer, FakeRecognizer()))


class SpeechFakeTests(unittest.TestCase):
    def test_synthesizer_feeds_frames_or_holds(self):
        got = []
        synth = FakeSynthesizer(frames=2)
        self.assertIsNone(self.successResultOf(synth.synthesize("hi", got.append)))
        self.assertEqual((synth.texts, got[0].size, got[0].dtype), (["hi"], 640, np.int16))
        held = FakeSynthesizer(hold=True)
        d = held.synthesize("later", got.append)
        self.assertNoResult(d)
        self.assertEqual([p[0] for p in held.pending], [d])
        d.cancel()
        self.failureResultOf(d)

    def test_recognizer_says_what_it_is_told(self):
        results = []
        asr = FakeRecognizer(results.append)
        asr.feed(np.zeros(320, dtype=np.int16))
        asr.say("hel", final=False)
        asr.say("hello")
        asr.say("again")
        self.assertEqual(asr.fed, 320)
        self.assertEqual([(r.index, r.text, r.final) for r in results],
                         [(0, "hel", False), (0, "hello", True), (1, "again", True)])
        self.successResultOf(asr.close())
        self.assertTrue(asr.closed)


class ClockTests(unittest.TestCase):
    def test_advance_frames_ticks_after_every_step(self):
        clock, seen = task.Clock(), []
        advance_frames(clock, 3, lambda: seen.append(clock.seconds()))
        self.assertEqual(len(seen), 3)
        self.assertAlmostEqual(seen[-1], 3 * FRAME_SECONDS)

    def test_manual_media_clock(self):
        clock, calls = ManualMediaClock(), []
        clock.add(lambda: calls.append(1))
        clock.tick(4)
        self.assertEqual(len(calls), 4)


class MemoryUdpNetworkTests(unittest.TestCase):
    def test_delivery_inside_sendto_drops_and_refusals(self):
        net = MemoryUdpNetwork()
        a, b = net.socket("127.0.0.1", 4000), net.socket()
        self.assertRaises(BlockingIOError, b.recvfrom, 2048)
        a.sendto(b"x", b.getsockname())
        self.assertEqual(b.recvfrom(2048), (b"x", ("127.0.0.1", 4000)))
        a.sendto(b"lost", ("127.0.0.1", 9))  # nobody there: dropped, as UDP's is
        self.assertRaises(OverflowError, a.sendto, b"", ("127.0.0.1", 70000))
        self.assertRaises(TypeError, a.sendto, b"", (None, 5000))
        self.assertRaises(OSError, a.sendto, b"", ("no-such-host.invalid", 5000))
        e = self.assertRaises(OSError, net.socket, "127.0.0.1", 4000)
        self.assertEqual(e.errno, errno.EADDRINUSE)
        self.assertEqual(a.fileno(), -1)
        self.assertRaises(OSError, a.connect, b.getsockname())
        a.close()
        net.socket("127.0.0.1", 4000)  # free again

    def test_pool_binds_pairs_and_runs_out(self):
        pool = MemoryUdpNetwork().pool(5000, 5003)
        pairs = [pool.allocate(), pool.allocate()]
        self.assertEqual([(p.rtp.getsockname()[1], p.rtcp.getsockname()[1]) for p in pairs],
                         [(5000, 5001), (5002, 5003)])
        self.assertRaises(PortsExhausted, pool.allocate)
        pairs[0].close()
        self.assertEqual(pool.allocate().rtp_port, 5000)

    def test_fake_media_session(self):
        tone = FakeMediaSession("t", freq=440)
        self.assertEqual(tone.tick().size, 320)
        self.assertIsNone(FakeMediaSession("quiet").tick())
        self.assertRaises(RuntimeError, FakeMediaSession("bad", fail=True).tick)
