"""/call over a real WebSocket on loopback (Autobahn client): invite order,
binary audio both ways, error events for bad frames, hangup, ping, CDR."""

import dataclasses
import os
import wave

import numpy as np
from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web import resource, server

from activecall.call.manager import CallManager
from activecall.call.websocket_call import WebSocketConnector
from activecall.config import CallRecord, load_config
from activecall.testing import ManualMediaClock
from activecall.web.ws import endpoint_resource
from tests.wsclient import connect, send_json


class CallEndpointTests(unittest.TestCase):
    def setUp(self):
        root = os.path.abspath(self.mktemp())
        cfg, _ = load_config(None)
        self.cfg = dataclasses.replace(
            cfg, media_cache_path=os.path.join(root, "cache"),
            recording=dataclasses.replace(cfg.recording, path=os.path.join(root, "rec")),
            callrecord=CallRecord(root=os.path.join(root, "cdr")))
        self.media_clock = ManualMediaClock()
        self.manager = CallManager(self.cfg, reactor, self.media_clock)
        site_root = resource.Resource()
        site_root.putChild(b"call", endpoint_resource(
            self.manager, "webSocket",
            lambda session, proto: WebSocketConnector(session, proto, self.media_clock), "/call"))
        self.port = reactor.listenTCP(0, server.Site(site_root), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.root = root

    def connect(self, query="id=c1"):
        return connect(self, self.port.getHost().port, "/call", query)

    def send(self, proto, obj):
        send_json(proto, obj)

    @defer.inlineCallbacks
    def test_invite_order_audio_in_and_hangup(self):
        proto, f = yield self.connect()
        received = []
        proto.sendMessage(b"\x01\x00" * 160, isBinary=True)  # before invite: queued
        self.send(proto, {"command": "invite", "option": {"codec": "pcm"}})
        yield f.wait_event("answer")
        self.assertEqual([e["event"] for e in f.events[:2]], ["trackStart", "answer"])
        self.assertEqual(f.events[0]["trackId"], "c1")
        self.assertNotIn("playId", f.events[0])  # optional fields left out
        self.assertEqual(f.events[1]["sdp"], "")
        self.assertIs(f.events[1]["refer"], False)
        session = self.manager.sessions["c1"]
        session.audio_sinks.append(received.append)
        proto.sendMessage(b"\x02\x00" * 320, isBinary=True)
        self.send(proto, {"command": "history", "speaker": "user", "text": "hi"})
        yield f.wait_event("addHistory")
        self.assertEqual(sum(len(r) for r in received), 320)
        self.assertEqual(session.leg.frames_in, 2)  # the queued frame and the live one
        self.send(proto, {"command": "hangup", "reason": "caller"})
        hangup = yield f.wait_event("hangup")
        self.assertEqual(hangup["reason"], "caller")
        code = yield f.closed
        self.assertEqual(code, 1000)
        self.assertEqual([e["event"] for e in f.events[-3:]], ["trackEnd", "hangup", "end"])
        self.assertNotIn("c1", self.manager.sessions)
        cdrs = [n for _, _, names in os.walk(os.path.join(self.root, "cdr")) for n in names]
        self.assertEqual(len(cdrs), 1)
        self.assertTrue(os.path.exists(os.path.join(self.root, "rec", "c1.events.jsonl")))

    @defer.inlineCallbacks
    def test_bad_frames_get_error_events_and_the_socket_stays_open(self):
        proto, f = yield self.connect()
        for frame in ("{nope", '{"command":"fly"}', '{"command":"tts"}', '{"command":"tts","text":5}'):
            self.send(proto, frame)
        self.send(proto, {"command": "history", "speaker": "a", "text": "b"})
        yield f.wait_event("addHistory")
        errors = [e for e in f.events if e["event"] == "error"]
        self.assertEqual(len(errors), 4)
        self.assertTrue(all(e["sender"] == "command" for e in errors))
        self.assertIn("fly", errors[1]["error"])

    @defer.inlineCallbacks
    def test_play_sends_paced_binary_frames(self):
        path = os.path.join(self.root, "tone.wav")
        os.makedirs(self.root, exist_ok=True)
        t = np.arange(1600) / 16000
        with wave.open(path, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(16000)
            w.writeframes((np.sin(2 * np.pi * 500 * t) * 5000).astype("<i2").tobytes())
        proto, f = yield self.connect()
        self.send(proto, {"command": "invite", "option": {}})
        yield f.wait_event("answer")
        self.send(proto, {"command": "play", "url": path, "autoHangup": True})
        self.send(proto, {"command": "history", "speaker": "a", "text": "b"})
        yield f.wait_event("addHistory")
        self.assertEqual(f.events[-2]["event"], "trackStart")
        self.assertEqual(f.events[-2]["playId"], path)
        session = self.manager.sessions["c1"]
        track = session.playback.current
        yield track.loaded
        self.media_clock.tick(6)  # 100 ms of audio = 5 frames, then the end
        end = yield f.wait_event("trackEnd")
        self.assertEqual(end["duration"], 100)
        hangup = yield f.wait_event("hangup")
        self.assertEqual(hangup["reason"], "autohangup")
        yield f.closed
        self.assertEqual(len(f.audio), 5)
        self.assertTrue(all(len(frame) == 640 for frame in f.audio))

    @defer.inlineCallbacks
    def test_client_close_ends_the_call(self):
        proto, f = yield self.connect("id=c2&ping=0")
        self.send(proto, {"command": "invite", "option": {}})
        yield f.wait_event("answer")
        session = self.manager.sessions["c2"]
        proto.sendClose()
        yield session.when_ended()
        self.assertEqual(session.end_reason, "caller")

    @defer.inlineCallbacks
    def test_duplicate_id_is_refused(self):
        proto, f = yield self.connect("id=dup")
        proto2, f2 = yield self.connect("id=dup")
        code = yield f2.closed
        self.assertEqual(f2.events[0]["event"], "error")
        self.assertIn("already active", f2.events[0]["error"])
        self.assertNotEqual(code, 1000)
        self.assertIn("dup", self.manager.sessions)


class CallCodecTests(CallEndpointTests):
    """G.711 on /call: any chunk size in, 160-byte frames out; unknown codecs refused."""

    @defer.inlineCallbacks
    def test_pcmu_chunks_in_and_frames_out(self):
        from activecall.media.codecs import create

        encoder = create("pcmu")
        t = np.arange(1600) / 16000
        tone = (np.sin(2 * np.pi * 400 * t) * 8000).astype(np.int16)
        wire = b"".join(encoder.encode(tone[i:i + 320]) for i in range(0, 1600, 320))
        self.assertEqual(len(wire), 800)
        proto, f = yield self.connect()
        self.send(proto, {"command": "invite", "option": {"codec": "pcmu"}})
        yield f.wait_event("answer")
        got = []
        self.manager.sessions["c1"].audio_sinks.append(got.append)
        for i in range(0, len(wire), 97):  # odd chunk sizes
            proto.sendMessage(wire[i:i + 97], isBinary=True)
        self.send(proto, {"command": "history", "speaker": "a", "text": "b"})
        yield f.wait_event("addHistory")
        pcm = np.concatenate(got)
        self.assertEqual(pcm.size, 1600)
        spectrum = np.abs(np.fft.rfft(pcm.astype(float)))
        self.assertAlmostEqual(np.argmax(spectrum) * 16000 / pcm.size, 400, delta=15)
        import base64

        self.send(proto, {"command": "tts", "text": base64.b64encode(tone.astype("<i2").tobytes()).decode(),
                          "base64": True, "endOfStream": True})
        self.send(proto, {"command": "history", "speaker": "a", "text": "c"})
        yield f.wait_event("addHistory", text="c")
        self.media_clock.tick(6)
        yield f.wait_event("trackEnd")
        self.assertEqual([len(a) for a in f.audio], [160] * 5)

    @defer.inlineCallbacks
    def test_unknown_codec_is_an_invite_error(self):
        proto, f = yield self.connect()
        self.send(proto, {"command": "invite", "option": {"codec": "opus"}})
        err = yield f.wait_event("error")
        self.assertEqual(err["sender"], "invite")
        self.assertIn("not available on /call", err["error"])
        self.assertNotIn("answer", [e["event"] for e in f.events])
