"""Speech defaults on API calls, end to end: a daemon started here, a real WebSocket client on ``/call``.

The rule (docs/api.md, "Speech defaults"): a call listens only when its invite asks to (an ``asr`` section
or ✱ ``language``); a section without a provider gets the one for the call's language; ``asr: false``
switches listening off; the ``metrics`` event ``speech.providers`` says what runs and which the defaults
chose.  A bare invite (a client that runs its own speech) gets no VAD and no recogniser, as in the
original."""

import os

import numpy as np
from twisted.internet import defer
from twisted.trial import unittest

from activecall.speech import defaults
from tests.helpers import free_port, loopback_config, spawn_daemon, speak_into_call
from tests.wsclient import connect, send_json

SENTENCE = "I would like to check the status of my order."
HEARING = ("speaking", "silence", "asrDelta", "asrFinal", "transcript")


class CallSpeechDefaultsTests(unittest.TestCase):
    timeout = 180

    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        self.port = free_port()
        self.daemon = spawn_daemon(self, loopback_config(self, self.root, self.port))
        return self.daemon.wait_for("activecall ready")

    @defer.inlineCallbacks
    def say_and_hang_up(self, proto, client, text="Thank you for calling."):
        """A ``tts`` command with no option of its own: returns its ``completed.tts.*`` metrics key and
        the audio it sent, after the call ended (so every event of the call has arrived)."""
        before = len(client.audio)
        send_json(proto, {"command": "tts", "text": text, "playId": "p1", "endOfStream": True})
        yield client.wait_event("trackEnd", playId="p1")
        completed = [e["key"] for e in client.events if e["event"] == "metrics"
                     and e["key"].startswith("completed.tts.")]
        pcm = np.frombuffer(b"".join(client.audio[before:]), dtype="<i2")
        send_json(proto, {"command": "hangup"})
        yield client.closed
        return completed, pcm

    @defer.inlineCallbacks
    def test_language_gives_the_whole_offline_set(self):
        """``language: en`` and nothing named: silero, the offline recogniser and voice for English; the
        caller is heard, and a bare ``tts`` command is spoken by the default voice."""
        proto, client = yield connect(self, self.port, "/call", "id=defaults-language")
        send_json(proto, {"command": "invite", "option": {"codec": "pcm", "language": "en"}})
        yield client.wait_event("answer")
        providers = yield client.wait_event("metrics", key="speech.providers")
        asr, tts = defaults.offline_asr("en")["provider"], defaults.offline_tts("en")["provider"]
        self.assertEqual(providers["data"], {"vad": "silero", "asr": asr, "tts": tts, "language": "en",
                                             "defaults": ["asr", "vad", "tts"]})
        self.assertFalse([e for e in client.events if e["event"] == "error"])
        yield speak_into_call(proto, SENTENCE)
        final = yield client.wait_event("asrFinal", timeout=60)
        self.assertIn("order", final["text"].lower())
        yield client.wait_event("speaking")
        completed, pcm = yield self.say_and_hang_up(proto, client)
        self.assertEqual(completed, [f"completed.tts.{tts}"])
        self.assertGreater(np.abs(pcm.astype(np.int32)).mean(), 100)  # the reply was spoken

    @defer.inlineCallbacks
    def test_asr_without_provider_gets_the_recogniser_only(self):
        """``asr: {}`` asks for a recogniser without naming one: the language's default; no VAD is added
        (no ``speaking``/``silence`` events the client did not ask for)."""
        proto, client = yield connect(self, self.port, "/call", "id=defaults-asr")
        send_json(proto, {"command": "invite", "option": {"codec": "pcm", "asr": {}}})
        yield client.wait_event("answer")
        providers = yield client.wait_event("metrics", key="speech.providers")
        self.assertEqual((providers["data"]["vad"], providers["data"]["asr"], providers["data"]["defaults"]),
                         (None, defaults.offline_asr("en")["provider"], ["asr"]))
        yield speak_into_call(proto, SENTENCE)
        final = yield client.wait_event("asrFinal", timeout=60)
        self.assertIn("order", final["text"].lower())
        completed, _ = yield self.say_and_hang_up(proto, client)
        self.assertEqual(completed, ["completed.tts.flite"])  # no tts section, no language: as before
        self.assertNotIn("speaking", [e["event"] for e in client.events])

    @defer.inlineCallbacks
    def test_a_bare_invite_is_not_listened_to(self):
        """No ``asr``/``vad``/``language``: a client that runs its own speech gets no recogniser, no VAD
        and no ``speech.providers`` event, whatever it streams; its ``tts`` commands still speak (flite)."""
        proto, client = yield connect(self, self.port, "/call", "id=defaults-bare")
        send_json(proto, {"command": "invite", "option": {"codec": "pcm"}})
        yield client.wait_event("answer")
        yield speak_into_call(proto, SENTENCE)
        completed, _ = yield self.say_and_hang_up(proto, client)
        self.assertEqual(completed, ["completed.tts.flite"])
        names = [e["event"] for e in client.events]
        self.assertFalse([n for n in names if n in HEARING], names)
        self.assertFalse([e for e in client.events if e["event"] == "metrics" and e["key"] == "speech.providers"])

    @defer.inlineCallbacks
    def test_asr_false_speaks_but_does_not_listen(self):
        """``language`` with ``asr: false``: the default voice, no recogniser and no VAD."""
        proto, client = yield connect(self, self.port, "/call", "id=defaults-deaf")
        send_json(proto, {"command": "invite", "option": {"codec": "pcm", "language": "en", "asr": False}})
        yield client.wait_event("answer")
        providers = yield client.wait_event("metrics", key="speech.providers")
        tts = defaults.offline_tts("en")["provider"]
        self.assertEqual(providers["data"], {"vad": None, "asr": None, "tts": tts, "language": "en",
                                             "defaults": ["tts"]})
        yield speak_into_call(proto, SENTENCE)
        completed, _ = yield self.say_and_hang_up(proto, client)
        self.assertEqual(completed, [f"completed.tts.{tts}"])
        names = [e["event"] for e in client.events]
        self.assertFalse([n for n in names if n in HEARING], names)
