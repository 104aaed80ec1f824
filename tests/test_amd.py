"""Answering-machine detection on fixtures the test builds with the machine's offline TTS (flite):
a long voicemail greeting followed by a 1 kHz beep, a short "hello?" and a fax tone.  The verdicts
come from the structure of the audio (greeting length, silence after it, tones), counted in frames:
the same audio always gets the same verdict, whatever the machine's speed.  The same recordings also go
through the whole daemon: it dials sipp, which answers and plays them as PCMU RTP."""

import os

import numpy as np
from twisted.internet import defer, task
from twisted.trial import unittest

from activecall.audio import resample
from activecall.call.amd import AmdSettings, AnsweringMachineDetector, ToneDetector, start_amd
from activecall.speech.testing import synthesize_pcm
from tests.helpers import free_port, spawn_daemon, loopback_config
from tests.test_sip_calls import write_ulaw_wav
from tests.test_sip_integration import SCENARIOS, port_bound, sipp, sipp_result, udp_port, when
from tests.wsclient import connect, send_json

RATE = 16000
GREETING = ("Hi, you have reached the voicemail of John Smith. I am not available to take your call "
            "right now. Please leave your name and number after the tone, and I will call you back.")


def silence(ms):
    return np.zeros(RATE * ms // 1000, dtype=np.int16)


def tone(freq, ms, amp=8000):
    t = np.arange(RATE * ms // 1000) / RATE
    return (np.sin(2 * np.pi * freq * t) * amp).astype(np.int16)


def noise(ms, level=30, seed=3):
    return np.random.default_rng(seed).normal(0, level, RATE * ms // 1000).astype(np.int16)


def run(pcm, settings=None):
    verdicts = []
    d = AnsweringMachineDetector(settings or AmdSettings(),
                                 lambda r, why, s, e: verdicts.append((r, why, s, e)))
    # in 20 ms frames, as a leg delivers them; a little room noise under everything
    pcm = np.concatenate([pcm, silence(3000)])
    pcm = np.clip(pcm.astype(np.int32) + noise(len(pcm) * 1000 // RATE), -32768, 32767).astype(np.int16)
    for i in range(0, len(pcm) - 319, 320):
        d.feed(pcm[i:i + 320])
    return verdicts, d


class VerdictTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_voicemail_greeting_then_beep(self):
        speech = yield synthesize_pcm(GREETING)
        self.assertGreater(len(speech), RATE * 3, "the fixture greeting must be long")
        audio = np.concatenate([silence(300), speech, silence(600), tone(1000, 500)])
        verdicts, _ = run(audio)
        self.assertEqual([v[0] for v in verdicts], ["machine", "beep"], verdicts)
        self.assertIn("greeting longer", verdicts[0][1])
        # the machine verdict comes once the greeting outlasts 1.5 s: well before it ends
        self.assertLess(verdicts[0][3], 300 + 1500 + 1000)
        beep_end = 300 + len(speech) * 1000 // RATE + 600 + 500
        self.assertLessEqual(verdicts[1][3], beep_end)
        self.assertGreaterEqual(verdicts[1][3], beep_end - 500 + 150)

    @defer.inlineCallbacks
    def test_short_hello_is_human(self):
        speech = yield synthesize_pcm("Hello?")
        self.assertLess(len(speech), RATE * 1.5)
        verdicts, d = run(np.concatenate([silence(400), speech]))
        self.assertEqual([v[0] for v in verdicts], ["human"], verdicts)
        self.assertTrue(d.finished)
        # decided after the greeting and 800 ms of silence, within the analysis time
        self.assertLessEqual(verdicts[0][3], 400 + len(speech) * 1000 // RATE + 800 + 40)

    @defer.inlineCallbacks
    def test_hello_then_more_words_is_still_human_when_short(self):
        speech = yield synthesize_pcm("Hello, who is it?")
        verdicts, _ = run(np.concatenate([silence(200), speech]),
                          AmdSettings(greeting=max(1500, len(speech) * 1000 // RATE + 200), maximumWords=10))
        self.assertEqual([v[0] for v in verdicts], ["human"], verdicts)

    def test_long_initial_silence_is_a_machine(self):
        verdicts, _ = run(silence(4000))
        self.assertEqual(verdicts[0][0], "machine")
        self.assertEqual(verdicts[0][3], 2500)

    def test_fax_tone(self):
        verdicts, _ = run(np.concatenate([silence(200), tone(2100, 1000)]))
        self.assertEqual([v[0] for v in verdicts], ["fax"])

    def test_beep_tones_and_length(self):
        detector = ToneDetector()
        for freq in (1000.0, 1400.0, 850.0, 440.0):
            self.assertEqual(detector.tone_of(tone(freq, 20)), freq)
        self.assertIsNone(detector.tone_of(noise(20, level=3000)))
        self.assertIsNone(detector.tone_of(tone(1000, 20, amp=100)))  # too quiet
        # a 100 ms blip is no beep; 160 ms is
        verdicts, _ = run(np.concatenate([silence(100), tone(1000, 100), silence(200)]),
                          AmdSettings(initialSilence=10000, totalAnalysisTime=10000))
        self.assertNotIn("beep", [v[0] for v in verdicts])
        verdicts, _ = run(np.concatenate([silence(100), tone(1000, 160)]))
        self.assertEqual([v[0] for v in verdicts], ["machine", "beep"])

    def test_nothing_decided_is_unknown(self):
        # steady speech-level noise with no pause: neither human nor machine by the rules
        settings = AmdSettings(greeting=100000, maximumWords=1000, totalAnalysisTime=3000)
        verdicts, _ = run(noise(4000, level=2000), settings)
        self.assertEqual(verdicts[0][0], "unknown")
        self.assertEqual(verdicts[0][3], 3000)

    def test_settings_from_option(self):
        self.assertEqual(AmdSettings.from_option(True), AmdSettings())
        self.assertEqual(AmdSettings.from_option({"greeting": 2000}).greeting, 2000)
        with self.assertRaises(ValueError):
            AmdSettings.from_option({"greting": 2000})
        with self.assertRaises(ValueError):
            AmdSettings.from_option({"greeting": -1})


class SessionTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_events_on_the_session(self):
        from activecall.call.session import CallSession

        clock = task.Clock()
        clock.advance(1_700_000_000)
        events = []
        s = CallSession("o1", "sip", clock=clock, emit=events.append, dump=False)
        start_amd(s, {"greeting": 1500})
        s.answered()
        speech = yield synthesize_pcm(GREETING)
        audio = np.concatenate([speech[:RATE * 3], silence(300), tone(1400, 300), silence(200)])
        for i in range(0, len(audio) - 319, 320):
            s.audio_in(audio[i:i + 320])
        amd = [e for e in events if e.TAG == "answerMachineDetection"]
        self.assertEqual([(e.result, e.beep) for e in amd], [("machine", None), ("beep", True)])
        self.assertEqual(amd[0].startTime, amd[0].timestamp)  # no clock advance in this test
        self.assertIn('"event":"answerMachineDetection"', amd[1].to_json().replace(" ", ""))
        self.assertEqual(s.extras["amd"], "machine")
        self.assertEqual(s.audio_sinks, [])  # done: the detector left the audio path

    def test_bad_option_is_an_error_event(self):
        from activecall.call.session import CallSession

        events = []
        s = CallSession("o2", "sip", clock=task.Clock(), emit=events.append, dump=False)
        self.assertIsNone(start_amd(s, {"nope": 1}))
        self.assertEqual(events[-1].TAG, "error")
        self.assertIn("amd.nope", events[-1].error)


class SipEndToEndTests(unittest.TestCase):
    """The daemon dials sipp (``/call/sip`` invite with ``amd``); sipp answers and plays a recording
    built here with flite as PCMU RTP: a voicemail greeting and a 1 kHz beep, or a short "hello?"."""

    timeout = 90

    @defer.inlineCallbacks
    def call(self, recording):
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        wav = os.path.join(root, "greeting.wav")
        write_ulaw_wav(wav, resample(recording, 16000, 8000))
        scenario = os.path.join(root, "uas_greeting.xml")
        with open(os.path.join(SCENARIOS, "uas_greeting.xml")) as f:
            text = f.read()
        with open(scenario, "w") as f:
            f.write(text.replace("{GREETING_WAV}", wav))
        http_port = free_port()
        conf = loopback_config(self, root, http_port)
        daemon = spawn_daemon(self, conf)
        uas_port = udp_port()
        uas = sipp(self, "-p", str(uas_port), "-mp", str(udp_port() // 2 * 2), scenario=scenario)
        yield when(port_bound(uas_port), 15, "sipp uas to bind")
        yield daemon.wait_for("activecall ready")
        proto, client = yield connect(self, http_port, "/call/sip", "id=amd1")
        send_json(proto, {"command": "invite", "option": {"callee": f"sip:vm@127.0.0.1:{uas_port}", "amd": True}})
        yield client.wait_event("answer")
        return proto, client, uas

    @defer.inlineCallbacks
    def test_voicemail_then_beep_over_rtp(self):
        speech = yield synthesize_pcm(GREETING)
        proto, client, uas = yield self.call(np.concatenate([silence(300), speech, silence(500), tone(1000, 600),
                                                             silence(1000)]))
        verdict = yield client.wait_event("answerMachineDetection", result="machine")
        self.assertIn("greeting longer", verdict["text"])
        beep = yield client.wait_event("answerMachineDetection", result="beep", timeout=30)
        self.assertTrue(beep["beep"])
        self.assertGreater(beep["endTime"], verdict["endTime"])
        send_json(proto, {"command": "hangup"})
        yield client.wait_event("hangup")
        yield sipp_result(uas, timeout=15)

    @defer.inlineCallbacks
    def test_hello_over_rtp_is_human(self):
        speech = yield synthesize_pcm("Hello?")
        proto, client, uas = yield self.call(np.concatenate([silence(400), speech, silence(3000)]))
        verdict = yield client.wait_event("answerMachineDetection")
        self.assertEqual(verdict["result"], "human")
        send_json(proto, {"command": "hangup"})
        yield client.wait_event("hangup")
        yield sipp_result(uas, timeout=15)
        results = [e["result"] for e in client.events if e["event"] == "answerMachineDetection"]
        self.assertEqual(results, ["human"])
