"""The offline speech loop through the real daemon: a WebSocket /call client
sends flite speech as PCM and gets pocketsphinx transcripts back; a tts command
streams synthesised audio back; the call's recording and CDR are on disk."""

import glob
import json
import os
import wave

import numpy as np
from twisted.internet import defer
from twisted.trial import unittest

from activecall.speech.testing import synthesize_pcm, word_error_rate
from tests.helpers import free_port, spawn_daemon, write_config
from tests.wsclient import connect, send_json

SENTENCE = "I would like to check the status of my order."


class OfflineConversationTests(unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_speech_in_transcript_out_tts_back(self):
        root = os.path.abspath(self.mktemp())
        port = free_port()
        conf = write_config(self, f'''
addr = "127.0.0.1"
udp_port = {free_port()}
http_addr = "127.0.0.1:{port}"
media_cache_path = "{root}/cache"
[recording]
enabled = true
auto_start = true
path = "{root}/rec"
[callrecord]
type = "local"
root = "{root}/cdr"
''')
        daemon = spawn_daemon(self, conf)
        yield daemon.wait_for("activecall ready")
        speech = yield synthesize_pcm(SENTENCE)
        proto, client = yield connect(self, port, "/call", "id=conv1")
        send_json(proto, {"command": "invite", "option": {
            "codec": "pcm",
            "vad": {"type": "webrtcvad"},
            "asr": {"provider": "pocketsphinx"},
            "tts": {"provider": "flite"},
        }})
        yield client.wait_event("answer")
        silence = np.zeros(16000, dtype=np.int16)
        audio = np.concatenate([silence[:8000], speech, silence, silence])
        for i in range(0, audio.size, 320):
            proto.sendMessage(audio[i:i + 320].astype("<i2").tobytes(), isBinary=True)
        final = yield client.wait_event("asrFinal")
        self.assertLess(word_error_rate(SENTENCE, final["text"]), 0.35, final["text"])
        events = [e["event"] for e in client.events]
        self.assertIn("speaking", events)
        self.assertLess(events.index("speaking"), events.index("asrFinal"))

        send_json(proto, {"command": "tts", "text": "Your order has shipped.", "playId": "r1",
                          "endOfStream": True})
        end = yield client.wait_event("trackEnd")
        self.assertEqual(end["playId"], "r1")
        self.assertGreater(end["duration"], 500)
        self.assertEqual(len(client.audio), end["duration"] // 20)
        self.assertTrue(all(len(frame) == 640 for frame in client.audio))
        pcm = np.frombuffer(b"".join(client.audio), dtype="<i2")
        self.assertGreater(np.abs(pcm).mean(), 100)  # speech, not silence

        send_json(proto, {"command": "hangup"})
        yield client.wait_event("hangup")
        yield client.closed
        daemon.signal("TERM")
        self.assertEqual((yield daemon.ended), 0, daemon.output)

        cdrs = glob.glob(os.path.join(root, "cdr", "*", "*.json"))
        self.assertEqual(len(cdrs), 1)
        with open(cdrs[0]) as f:
            cdr = json.load(f)
        self.assertEqual(cdr["callType"], "webSocket")
        with wave.open(cdr["recorder"][0]["path"]) as w:
            self.assertEqual(w.getnchannels(), 2)
            frames = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, 2)
        self.assertGreater(np.abs(frames[:, 0]).mean(), 50)  # the caller's speech, left
        self.assertGreater(np.abs(frames[:, 1]).mean(), 20)  # the bot's reply, right

    @defer.inlineCallbacks
    def test_a_failing_asr_service_is_an_error_event_and_the_call_goes_on(self):
        port = free_port()
        conf = write_config(self, f'''
addr = "127.0.0.1"
udp_port = {free_port()}
http_addr = "127.0.0.1:{port}"
''')
        daemon = spawn_daemon(self, conf)
        yield daemon.wait_for("activecall ready")
        proto, client = yield connect(self, port, "/call", "id=asrdown")
        nobody = free_port()  # nothing listens there: the recogniser's connection is refused
        send_json(proto, {"command": "invite", "option": {
            "codec": "pcm",
            "asr": {"provider": "deepgram", "endpoint": f"ws://127.0.0.1:{nobody}", "secretKey": "k-secret"},
        }})
        yield client.wait_event("answer")
        for _ in range(10):
            proto.sendMessage(np.zeros(320, dtype="<i2").tobytes(), isBinary=True)
        error = yield client.wait_event("error", sender="asr")
        self.assertEqual((error["trackId"], error["code"]), ("asrdown", 500))
        self.assertIn("deepgram", error["error"])
        self.assertNotIn("k-secret", error["error"])
        send_json(proto, {"command": "hangup"})  # the call itself is fine
        yield client.wait_event("hangup")
        daemon.signal("TERM")
        self.assertEqual((yield daemon.ended), 0, daemon.output)
