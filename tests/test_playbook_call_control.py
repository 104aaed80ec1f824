"""Call control from a playbook: ``amd`` (the dialogue waits for the verdict; a machine gets
``amd.voicemail`` after its beep, then the call hangs up; a human gets the greeting; a machine without a
voicemail is hung up on; audio synthetic, fed frame by frame), ``<warm_transfer>``, and the answer to a
REFER from the far end (``sip.transfer_requests``)."""

import numpy as np

from activecall.call.amd import start_amd
from activecall.playbook.start import playbook_call_option
from tests.test_playbook_runner import RunnerTestBase
from activecall.protocol import commands as cmd
from activecall.protocol import events as ev

RATE = 16000


def silence(ms):
    return np.zeros(RATE * ms // 1000, dtype=np.int16)


def tone(freq, ms, amp=8000):
    t = np.arange(RATE * ms // 1000) / RATE
    return (np.sin(2 * np.pi * freq * t) * amp).astype(np.int16)


def voice(ms):
    return np.random.default_rng(5).normal(0, 3000, RATE * ms // 1000).astype(np.int16)


class PlaybookAmdTests(RunnerTestBase):
    def start(self, amd_yaml):
        runner = self.begin(extra=amd_yaml, greeting="Hello, this is ACME.", answered=False)
        option = playbook_call_option(self.playbook)
        self.assertIsNotNone(option.amd)
        start_amd(self.session, option.amd)
        self.session.answered()
        return runner

    def feed(self, pcm):
        for i in range(0, len(pcm) - 319, 320):
            self.session.audio_in(pcm[i:i + 320])

    def test_machine_gets_the_voicemail_after_the_beep(self):
        runner = self.start('amd:\n  voicemail: "Please call ACME back."\n  initialSilence: 2000')
        self.assertEqual(self.tts(), [], "no greeting before the verdict")
        self.feed(silence(2100))
        self.assertEqual(runner.variables["amd"], "machine")
        self.assertEqual(self.tts(), [], "the message waits for the beep")
        self.feed(silence(400))
        self.assertEqual(self.tts(), [])
        self.feed(tone(1000, 300))
        self.assertEqual([(t.text, bool(t.autoHangup)) for t in self.tts()], [("Please call ACME back.", True)])
        self.play_out()
        self.assertEqual(self.session.end_reason, "autohangup")

    def test_no_beep_in_time_leaves_the_message_anyway(self):
        self.start('amd:\n  voicemail: "Please call back."\n  initialSilence: 1000\n  beepTimeout: 5000')
        self.feed(silence(1100))
        self.assertEqual(self.tts(), [])
        self.clock.advance(5.1)
        self.assertEqual([t.text for t in self.tts()], ["Please call back."])

    def test_human_gets_the_greeting(self):
        runner = self.start("amd:\n  greeting: 1500")
        self.feed(silence(300))
        self.feed(voice(500))
        self.assertEqual(self.tts(), [])
        self.feed(silence(900))
        self.assertEqual(runner.variables["amd"], "human")
        self.assertEqual([t.text for t in self.tts()][:1], ["Hello, this is ACME."])

    def test_machine_without_voicemail_is_hung_up_on(self):
        self.start("amd:\n  initialSilence: 1000")
        self.feed(silence(1100))
        self.assertEqual(self.session.end_reason, "answerMachine")
        self.assertEqual(self.tts(), [])

    def test_front_matter_to_option(self):
        self.begin(extra="amd: {}", answered=False)
        self.assertIs(playbook_call_option(self.playbook).amd, True)
        self.begin(extra="amd:\n  greeting: 2000\n  voicemail: hi", answered=False)
        self.assertEqual(playbook_call_option(self.playbook).amd, {"greeting": 2000})
        self.assertIsInstance(cmd.CallOption.from_dict({"amd": {"greeting": 2000}}), cmd.CallOption)


class WarmTransferTagTests(RunnerTestBase):
    """``<warm_transfer>`` in a reply: the runner starts the transfer; when it fails (here: no SIP in
    the daemon) the dialogue resumes with a system note; a bridged call's speech starts no turn."""

    def test_failed_transfer_resumes_the_dialogue(self):
        self.begin(None, 'One moment. <warm_transfer to="sip:human@pbx" summary="Alice wants a refund"/>',
                   "Sorry, nobody is free.")
        errors = [e for e in self.events if e.TAG == "error" and e.sender == "warmTransfer"]
        self.assertEqual(len(errors), 1)
        self.assertEqual(self.runner.variables["transfer_result"], "failed")
        notes = [m["content"] for m in self.llm.calls[-1].messages if m["role"] == "system"]
        self.assertIn("did not happen (SIP 503)", notes[-1])
        self.assertIn("Sorry, nobody is free.", [t.text for t in self.tts()])

    def test_bridged_call_speech_starts_no_turn(self):
        self.begin(None, "Hello.")
        calls = len(self.llm.calls)
        self.session.bridge = object()
        self.session.emit(ev.AsrFinal(trackId="s1", timestamp=self.session.now(), index=0, text="hi"))
        self.assertEqual(len(self.llm.calls), calls)


class TransferRequestPolicyTests(RunnerTestBase):
    """A ``transferRequest`` (a REFER from the far end) answered by ``sip.transfer_requests``."""

    def request(self):
        self.session.emit(ev.TransferRequest(trackId="s1", timestamp=self.session.now(), referTo="sip:c@pbx"))
        return [c.TAG for c in self.commands if c.TAG in ("acceptTransfer", "rejectTransfer")]

    def test_accept(self):
        self.begin(None, "Hello.", extra="sip:\n  transfer_requests: accept")
        self.assertEqual(self.request(), ["acceptTransfer"])
        self.assertEqual(self.runner.variables["transfer_to"], "sip:c@pbx")

    def test_unset_without_a_client_refuses(self):
        self.begin(None, "Hello.")
        self.assertEqual(self.request(), ["rejectTransfer"])

    def test_unset_with_a_client_leaves_it_to_the_client(self):
        class Connector:
            protocol = object()

        self.begin(None, "Hello.", connector=Connector())
        self.assertEqual(self.request(), [])

    def test_bad_value_is_a_playbook_error(self):
        from activecall.playbook.front_matter import PlaybookError

        with self.assertRaises(PlaybookError) as ctx:
            self.begin(None, "Hello.", extra="sip:\n  transfer_requests: maybe")
        self.assertIn("transfer_requests", str(ctx.exception))
