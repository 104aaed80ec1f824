"""Realtime mode through the real daemon: a WebSocket /call client with ``option.realtime`` pointing at a local
server that speaks the OpenAI Realtime protocol.  The caller's PCM reaches the server at 24 kHz, the server's
events come back as speaking / silence / asrFinal / functionCall, its audio as bot frames, and ``hangup_call``
ends the call after the goodbye has played; the bot's speech is in the recording."""

import base64
import glob
import json
import os
import wave

import numpy as np
from twisted.internet import defer
from twisted.trial import unittest

from tests.cloud_helpers import WsServer, tone
from tests.helpers import free_port, spawn_daemon, write_config
from tests.wsclient import connect, send_json

KEY = "rt-e2e-secret"


def fake_realtime(conn, payload, is_binary):
    """The service: after 0.5 s of caller audio, a whole turn ending in hangup_call."""
    heard = sum(len(base64.b64decode(t["audio"])) for t in conn.texts if t["type"] == "input_audio_buffer.append")
    if conn.texts[-1]["type"] != "input_audio_buffer.append" or heard != 24000 or getattr(conn, "answered", False):
        return
    conn.answered = True
    conn.send_json({"type": "input_audio_buffer.speech_started", "audio_start_ms": 100, "item_id": "u1"})
    conn.send_json({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 480, "item_id": "u1"})
    conn.send_json({"type": "conversation.item.input_audio_transcription.completed", "item_id": "u1",
                    "content_index": 0, "transcript": "I want to cancel my order."})
    conn.send_json({"type": "response.created", "response": {"id": "r1", "status": "in_progress"}})
    reply = tone(1.0, rate=24000, freq=500)
    for part in np.array_split(reply, 5):
        conn.send_json({"type": "response.audio.delta", "response_id": "r1", "item_id": "b1", "output_index": 0,
                        "content_index": 0, "delta": base64.b64encode(part.astype("<i2").tobytes()).decode()})
    conn.send_json({"type": "response.audio.done", "response_id": "r1", "item_id": "b1"})
    conn.send_json({"type": "response.audio_transcript.done", "response_id": "r1", "item_id": "b1",
                    "transcript": "Done. Goodbye!"})
    conn.send_json({"type": "response.function_call_arguments.done", "response_id": "r1", "item_id": "f1",
                    "call_id": "call_1", "name": "hangup_call", "arguments": json.dumps({"reason": "goodbye"})})
    conn.send_json({"type": "response.done", "response": {"id": "r1", "status": "completed"}})


class RealtimeCallTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_realtime_call_over_websocket(self):
        srv = WsServer(self, fake_realtime)
        accepted = srv.next_connection()
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
        proto, client = yield connect(self, port, "/call", "id=rt1")
        send_json(proto, {"command": "invite", "option": {
            "codec": "pcm",
            "vad": {"type": "webrtcvad"},  # realtime replaces it
            "realtime": {"endpoint": srv.base, "apiKey": KEY, "model": "gpt-4o-realtime-preview",
                         "tools": [{"type": "function", "name": "lookup_order",
                                    "parameters": {"type": "object", "properties": {}}}],
                         "extra": {"instructions": "You are a shop assistant.", "voice": "verse"}},
        }})
        yield client.wait_event("answer")
        conn = yield accepted
        self.assertEqual(conn.headers["authorization"], f"Bearer {KEY}")
        self.assertEqual(conn.query, {"model": "gpt-4o-realtime-preview"})
        caller = tone(0.5, freq=300)
        for i in range(0, caller.size, 320):
            proto.sendMessage(caller[i:i + 320].astype("<i2").tobytes(), isBinary=True)

        speaking = yield client.wait_event("speaking")
        self.assertEqual((speaking["trackId"], speaking["startTime"]), ("rt1", 100))
        silence = yield client.wait_event("silence")
        self.assertEqual((silence["startTime"], silence["duration"]), (100, 380))
        final = yield client.wait_event("asrFinal")
        self.assertEqual((final["text"], final["index"], final["startTime"], final["endTime"]),
                         ("I want to cancel my order.", 0, 100, 480))
        yield client.wait_event("transcript", text="I want to cancel my order.")
        call = yield client.wait_event("functionCall")
        self.assertEqual((call["trackId"], call["callId"], call["name"], json.loads(call["arguments"])),
                         ("rt1", "call_1", "hangup_call", {"reason": "goodbye"}))
        said = yield client.wait_event("addHistory", speaker="assistant")
        self.assertEqual((said["text"], said["sender"]), ("Done. Goodbye!", "realtime"))
        end = yield client.wait_event("trackEnd", playId="realtime-1")
        hangup = yield client.wait_event("hangup")
        self.assertEqual((hangup["reason"], hangup["initiator"]), ("goodbye", "ai"))
        yield client.closed

        update = conn.texts[0]
        self.assertEqual(update["type"], "session.update")
        session = update["session"]
        self.assertEqual((session["instructions"], session["voice"]), ("You are a shop assistant.", "verse"))
        self.assertEqual([t["name"] for t in session["tools"]], ["lookup_order", "hangup_call", "transfer_call"])
        self.assertEqual(session["turn_detection"]["type"], "server_vad")
        sent = np.frombuffer(b"".join(base64.b64decode(t["audio"]) for t in conn.texts
                                      if t["type"] == "input_audio_buffer.append"), dtype="<i2")
        self.assertEqual(sent.size, 12000)  # 0.5 s at 24 kHz
        spectrum = np.abs(np.fft.rfft(sent[1200:].astype(float)))
        self.assertLessEqual(abs(np.argmax(spectrum) * 24000 / (sent.size - 1200) - 300), 5)

        # the bot's second of speech came back as 20 ms frames, all of it played before the hangup
        self.assertGreaterEqual(end["duration"], 1000)
        self.assertLessEqual(end["duration"], 1040)
        pcm = np.frombuffer(b"".join(client.audio), dtype="<i2")
        self.assertGreaterEqual(pcm.size, 16000)
        self.assertTrue(all(len(frame) == 640 for frame in client.audio))
        loud = pcm[np.abs(pcm) > 1000]
        self.assertGreater(loud.size, 8000)
        events = [e["event"] for e in client.events]
        self.assertLess(events.index("trackEnd"), events.index("hangup"))
        self.assertNotIn("error", events)
        yield conn.closed  # the daemon closed the realtime socket at the end of the call

        daemon.signal("TERM")
        self.assertEqual((yield daemon.ended), 0, daemon.output)
        self.assertNotIn(KEY, daemon.output)
        cdrs = glob.glob(os.path.join(root, "cdr", "*", "*.json"))
        with open(cdrs[0]) as f:
            cdr = json.load(f)
        self.assertEqual(cdr["hangupReason"], "goodbye")
        with wave.open(cdr["recorder"][0]["path"]) as w:
            frames = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, 2)
        self.assertGreater(np.abs(frames[:, 1]).mean(), 1000 / 4)  # the bot's reply, right channel

    @defer.inlineCallbacks
    def test_an_unreachable_realtime_service_is_an_error_event(self):
        port = free_port()
        conf = write_config(self, f'''
addr = "127.0.0.1"
udp_port = {free_port()}
http_addr = "127.0.0.1:{port}"
''')
        daemon = spawn_daemon(self, conf)
        yield daemon.wait_for("activecall ready")
        proto, client = yield connect(self, port, "/call", "id=rtdown")
        nobody = free_port()
        send_json(proto, {"command": "invite", "option": {
            "codec": "pcm", "realtime": {"endpoint": f"ws://127.0.0.1:{nobody}", "secretKey": KEY}}})
        yield client.wait_event("answer")
        error = yield client.wait_event("error", sender="realtime")
        self.assertEqual((error["trackId"], error["code"]), ("rtdown", 500))
        self.assertIn(f"127.0.0.1:{nobody}", error["error"])
        self.assertNotIn(KEY, error["error"])
        send_json(proto, {"command": "hangup"})  # the call itself goes on
        yield client.wait_event("hangup")
        daemon.signal("TERM")
        self.assertEqual((yield daemon.ended), 0, daemon.output)
        self.assertNotIn(KEY, daemon.output)

    @defer.inlineCallbacks
    def test_a_realtime_playbook_through_the_daemon(self):
        """A playbook with ``realtime:``: its scene prompt becomes the model's instructions, the model
        says the greeting, and the scripted turn's hangup_call ends the call."""
        srv = WsServer(self, fake_realtime)
        accepted = srv.next_connection()
        port = free_port()
        conf = write_config(self, f'''
addr = "127.0.0.1"
udp_port = {free_port()}
http_addr = "127.0.0.1:{port}"
''')
        daemon = spawn_daemon(self, conf)
        yield daemon.wait_for("activecall ready")
        playbook = (f"---\nrealtime:\n  endpoint: {srv.base}\n  secretKey: {KEY}\n"
                    "greeting: Thanks for calling the shop.\n---\n"
                    "# Scene: orders\nYou take orders for the shop. Be brief.\n")
        proto, client = yield connect(self, port, "/call", "id=rtpb")
        send_json(proto, {"command": "invite", "option": {"codec": "pcm", "playbook": playbook}})
        yield client.wait_event("answer")
        conn = yield accepted
        caller = tone(0.5, freq=300)
        for i in range(0, caller.size, 320):
            proto.sendMessage(caller[i:i + 320].astype("<i2").tobytes(), isBinary=True)
        yield client.wait_event("asrFinal", text="I want to cancel my order.")
        hangup = yield client.wait_event("hangup")
        self.assertEqual(hangup["initiator"], "ai")
        updates = [t for t in conn.texts if t["type"] == "session.update"]
        self.assertIn("You take orders for the shop.", updates[0]["session"]["instructions"])
        greeting = [t for t in conn.texts if t["type"] == "response.create"]
        self.assertTrue(any("Thanks for calling the shop." in json.dumps(t) for t in greeting), conn.texts[:4])
        daemon.signal("TERM")
        self.assertEqual((yield daemon.ended), 0, daemon.output)
        self.assertNotIn(KEY, daemon.output)
