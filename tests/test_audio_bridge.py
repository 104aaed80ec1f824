"""The ``bridge`` command on in-memory sessions: audio from A reaches B and back, ``bridged`` events,
``unbridge``, and the bridge ending with either call."""

import dataclasses
import os

import numpy as np
from twisted.internet import task
from twisted.trial import unittest

from activecall.call.session import CallSession
from activecall.config import load_config
from activecall.protocol import commands as cmd
from activecall.testing import FakeSynthesizer


class _Manager:
    def __init__(self):
        self.sessions = {}


def tone(freq, n=320, amp=8000):
    t = np.arange(n) / 16000
    return (np.sin(2 * np.pi * freq * t) * amp).astype(np.int16)


def dominant(frame) -> float:
    spectrum = np.abs(np.fft.rfft(frame.astype(float)))
    return np.argmax(spectrum) * 16000 / frame.size


class AudioBridgeTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        root = os.path.abspath(self.mktemp())
        cfg, _ = load_config(None)
        self.cfg = dataclasses.replace(
            cfg, recording=dataclasses.replace(cfg.recording, path=os.path.join(root, "rec")),
            media_cache_path=os.path.join(root, "cache"))
        self.manager = _Manager()
        self.events = {"A": [], "B": []}
        self.a = self.make("A")
        self.b = self.make("B")

    def make(self, sid):
        s = CallSession(sid, "webSocket", clock=self.clock, emit=self.events[sid].append, config=self.cfg,
                        synthesizer_for=lambda opt: FakeSynthesizer(), dump=False)
        s.option = cmd.CallOption(tts=cmd.SynthesisOption(provider="fake"))
        s.manager = self.manager
        self.manager.sessions[sid] = s
        s.answered()
        return s

    def tags(self, sid, tag):
        return [e for e in self.events[sid] if e.TAG == tag]

    def test_audio_both_ways(self):
        self.a.handle(cmd.Bridge(target="B"))
        self.assertEqual([(e.peer, e.active) for e in self.tags("A", "bridged")], [("B", True)])
        self.assertEqual([(e.peer, e.active) for e in self.tags("B", "bridged")], [("A", True)])
        self.a.audio_in(tone(700))
        self.b.audio_in(tone(1200))
        to_b = self.b.tick()
        to_a = self.a.tick()
        self.assertIsNotNone(to_b)
        self.assertIsNotNone(to_a)
        self.assertLess(abs(dominant(to_b) - 700), 60)
        self.assertLess(abs(dominant(to_a) - 1200), 60)
        # nothing more was said: the next frames are no echo of the old ones
        nxt = self.b.tick()
        self.assertTrue(nxt is None or not np.any(nxt))

    def test_unbridge_parts_both(self):
        self.a.handle(cmd.Bridge(target="B"))
        self.b.handle(cmd.Unbridge())
        self.assertEqual([e.active for e in self.tags("A", "bridged")], [True, False])
        self.assertEqual([e.active for e in self.tags("B", "bridged")], [True, False])
        self.assertIsNone(self.a.bridge)
        self.a.audio_in(tone(700))
        for _ in range(3):
            frame = self.b.tick()
            self.assertTrue(frame is None or not np.any(frame))

    def test_ending_one_call_parts_the_bridge(self):
        self.a.handle(cmd.Bridge(target="B"))
        self.a.end("caller", initiator="caller")
        self.assertIsNone(self.b.bridge)
        self.assertEqual([e.active for e in self.tags("B", "bridged")], [True, False])
        self.assertEqual(self.b.state.value, "answered")

    def test_unknown_or_self_target_is_an_error(self):
        self.a.handle(cmd.Bridge(target="nope"))
        self.a.handle(cmd.Bridge(target="A"))
        errors = self.tags("A", "error")
        self.assertEqual([e.code for e in errors], [404, 404])
        self.assertIsNone(self.a.bridge)

    def test_unanswered_target_is_refused(self):
        c = CallSession("C", "webSocket", clock=self.clock, emit=lambda e: None, config=self.cfg, dump=False)
        c.manager = self.manager
        self.manager.sessions["C"] = c
        self.a.handle(cmd.Bridge(target="C"))
        self.assertEqual(self.tags("A", "error")[-1].code, 409)

    def test_wire_shape(self):
        parsed = cmd.decode_command('{"command": "bridge", "target": "B"}')
        self.assertEqual(parsed, cmd.Bridge(target="B"))
        self.assertEqual(cmd.decode_command('{"command": "unbridge"}'), cmd.Unbridge())

    def test_a_new_track_on_either_call_parts_the_bridge(self):
        self.a.handle(cmd.Bridge(target="B"))
        self.b.handle(cmd.Tts(text="hello", playId="p1"))
        self.assertEqual([e.active for e in self.tags("A", "bridged")], [True, False])
        self.assertIsNone(self.a.bridge)
        self.assertIsNone(self.b.bridge)
