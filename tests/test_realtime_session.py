"""Realtime mode inside a call, on task.Clock with a scripted stand-in for the Realtime client (the wire protocol
is tests/test_speech_realtime.py, the whole path through the daemon tests/test_realtime_e2e.py): barge-in and
truncation, client interrupts, hangup/transfer after the current audio, tools, errors, and playbooks in
realtime mode (scene instructions, greeting, goto_scene, DTMF, fallback on failure, history)."""

import dataclasses
import json
import os

import numpy as np
from twisted.internet import defer, task
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from activecall.call.realtime_session import (
    IRealtimeController, RealtimeProcessor, attach_realtime, realtime_controller)
from activecall.call.session import CallSession, CallState
from activecall.call.speech import attach_processors
from activecall.config import load_config
from activecall.playbook.parser import parse_playbook
from activecall.playbook.realtime_strategy import RealtimeTurns
from activecall.playbook.runner import PlaybookRunner
from activecall.playbook.strategy import ITurnStrategy
from activecall.testing import FakeConnector as Connector
from activecall.testing import FakeSynthesizer as FakeSynth
from activecall.testing import advance_frames
from activecall.protocol import commands as cmd
from activecall.protocol import events as ev

T0 = 1_700_000_000


class FakeClient:
    """Records what the processor asks of the client; the test plays the service through the handler."""

    instances: list = []

    def __init__(self, settings, handler, reactor=None, instructions=None, extra_tools=()):
        self.settings = settings
        self.handler = handler
        self.instructions = instructions
        self.extra_tools = list(extra_tools)
        self.state = "open"
        self.response_id = None
        self.sent = []
        self.fed = 0
        FakeClient.instances.append(self)

    def connect(self):
        return defer.succeed(self)

    def feed(self, pcm):
        self.fed += len(pcm)

    def close(self):
        self.state = "closed"
        return defer.succeed(None)

    def create_response(self, instructions=None):
        self.sent.append(("response.create", instructions))

    def cancel_response(self):
        if self.response_id is not None:
            self.sent.append(("response.cancel",))

    def truncate(self, item_id, audio_end_ms):
        self.sent.append(("truncate", item_id, audio_end_ms))

    def function_output(self, call_id, output, respond=True):
        self.sent.append(("output", call_id, output, respond))

    def update_session(self, instructions=None, extra_tools=None):
        self.instructions = instructions
        if extra_tools is not None:
            self.extra_tools = list(extra_tools)
        self.sent.append(("session.update", instructions))

    # the service, through the handler
    def respond(self, response_id, seconds, item_id="b1", words=""):
        self.response_id = response_id
        self.handler.response_started(response_id)
        if words:
            self.handler.transcript_delta(response_id, item_id, words)
        self.handler.audio(response_id, item_id, np.full(int(seconds * 16000), 3000, dtype=np.int16))

    def done(self, response_id):
        self.response_id = None
        self.handler.response_done(response_id, "completed")


class Base(unittest.TestCase):
    def setUp(self):
        FakeClient.instances = []
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.events = []
        root = os.path.abspath(self.mktemp())
        cfg, _ = load_config(None)
        self.cfg = dataclasses.replace(
            cfg, recording=dataclasses.replace(cfg.recording, path=os.path.join(root, "rec")),
            media_cache_path=os.path.join(root, "cache"), playbook_dir=os.path.join(root, "playbook"))
        self.synth = FakeSynth()

    def session(self, realtime=None, connector=None):
        s = CallSession("c1", "webSocket", clock=self.clock, emit=self.events.append, config=self.cfg,
                        synthesizer_for=lambda opt: self.synth, dump=False,
                        processor_factory=lambda s: attach_realtime(s, client_factory=FakeClient))
        s.option = cmd.CallOption(realtime=cmd.RealtimeOption.from_dict(realtime) if realtime is not None else None,
                                  tts=cmd.SynthesisOption(provider="fake"))
        s.connector = connector
        self.s = s
        return s

    def answer(self, realtime=None, connector=None):
        s = self.session({"secretKey": "k", **(realtime or {})}, connector)
        s.answered()
        self.p = s.processors
        self.c = FakeClient.instances[-1] if FakeClient.instances else None
        return s

    def tick(self, n):
        advance_frames(self.clock, n, self.s.tick)

    def play_out(self, limit=500):
        for _ in range(limit):
            if self.s.playback.current is None:
                return
            self.tick(1)
        self.fail("playback never ended")

    def tags(self):
        return [e.TAG for e in self.events]

    def of(self, cls):
        return [e for e in self.events if isinstance(e, cls)]


class ProcessorTests(Base):
    def test_attach_processors_chooses_realtime_and_feeds_it(self):
        s = self.session({"secretKey": "k", "endpoint": "ws://127.0.0.1:9"})  # never reached: closed first
        s.option = dataclasses.replace(s.option, vad=cmd.VadOption(type="webrtcvad"))
        processor = attach_processors(s)
        self.addCleanup(processor.close)
        self.assertIsInstance(processor, RealtimeProcessor)
        self.assertIn(processor.feed, s.audio_sinks)
        self.assertEqual(processor.client.state, "connecting")
        s.audio_in(np.zeros(320, dtype=np.int16))
        self.assertEqual(len(processor.client._pending), 480 * 2)  # held at 24 kHz until the socket is open
        names = [t["name"] for t in processor.client.extra_tools]
        self.assertEqual(names, ["hangup_call"])  # no connector: no transfer

    def test_bad_options_are_an_error_event(self):
        self.answer({"provider": "azure"})
        self.assertIsNone(self.s.processors)
        error, = self.of(ev.Error)
        self.assertEqual((error.sender, error.code), ("realtime", 400))
        self.assertIn("realtime.endpoint", error.error)

    def test_caller_events(self):
        self.answer()
        p = self.p
        p.speech_started(1200, "u1")
        p.speech_stopped(2000, "u1")
        p.user_transcript("u1", "hello")
        p.user_transcript("u2", "")
        speaking, = self.of(ev.Speaking)
        self.assertEqual((speaking.trackId, speaking.startTime, speaking.confidence), ("c1", 1200, 1.0))
        silence, = self.of(ev.Silence)
        self.assertEqual((silence.startTime, silence.duration), (1200, 800))
        final, = self.of(ev.AsrFinal)
        self.assertEqual((final.index, final.text, final.startTime, final.endTime), (0, "hello", 1200, 2000))
        self.assertEqual(self.of(ev.Transcript)[0].text, "hello")
        self.assertEqual([(h.sender, h.speaker, h.text) for h in self.of(ev.AddHistory)], [("realtime", "user", "hello")])
        self.assertEqual(self.of(ev.Interrupt), [ev.Interrupt(receiver="c1")])
        self.assertEqual(self.c.sent, [])  # nothing to cancel, nothing playing

    def test_bot_audio_is_a_track_and_barge_in_cuts_it(self):
        self.answer()
        c = self.c
        c.respond("r1", 1.0, words="Your order ")
        start = self.of(ev.TrackStart)[-1]
        self.assertEqual((start.trackId, start.playId), ("server-side-track", "realtime-1"))
        self.tick(25)  # 500 ms played
        self.p.speech_started(3000, "u2")
        self.assertEqual(self.tags()[-4:], ["speaking", "interruption", "trackEnd", "interrupt"])
        interruption = self.of(ev.Interruption)[0]
        self.assertEqual((interruption.playId, interruption.subtitle, interruption.current),
                         ("realtime-1", "Your order ", 500))
        self.assertEqual(c.sent, [("response.cancel",), ("truncate", "b1", 500)])
        c.handler.audio("r1", "b1", np.ones(3200, dtype=np.int16))  # late audio of the cut response
        self.assertEqual(len(self.of(ev.TrackStart)), 2)  # the caller's + realtime-1 only
        c.done("r1")
        c.respond("r2", 0.1, item_id="b2")
        self.assertEqual(self.of(ev.TrackStart)[-1].playId, "realtime-2")
        c.done("r2")
        self.play_out()
        end = self.of(ev.TrackEnd)[-1]
        self.assertEqual((end.playId, end.duration), ("realtime-2", 100))

    def test_one_track_while_responses_follow_each_other_and_the_recording_has_it(self):
        s = self.session({"secretKey": "k"})
        s.answered()
        c = FakeClient.instances[-1]
        c.respond("r1", 0.2)
        c.done("r1")
        self.tick(5)
        c.respond("r2", 0.2, item_id="b2")  # before r1 finished playing: same track
        c.done("r2")
        self.play_out()
        self.assertEqual([e.playId for e in self.of(ev.TrackStart)], [None, "realtime-1"])
        self.assertEqual(self.of(ev.TrackEnd)[-1].duration, 400)

    def test_client_interrupt_command_cancels_and_truncates(self):
        self.answer()
        self.c.respond("r1", 1.0)
        self.tick(10)
        self.s.handle(cmd.Interrupt())
        self.assertEqual(self.c.sent, [("response.cancel",), ("truncate", "b1", 200)])
        self.assertIn("interruption", self.tags())

    def test_hangup_call_waits_for_the_goodbye(self):
        self.answer()
        c = self.c
        c.respond("r1", 0.4)
        self.p.function_call("call_1", "hangup_call", '{"reason": "customer is done"}')
        fc = self.of(ev.FunctionCall)[0]
        self.assertEqual((fc.trackId, fc.callId, fc.name, fc.arguments),
                         ("c1", "call_1", "hangup_call", '{"reason": "customer is done"}'))
        c.done("r1")
        self.tick(10)
        self.assertIs(self.s.state, CallState.ANSWERED)
        self.play_out()
        self.assertIs(self.s.state, CallState.ENDED)
        hangup = self.of(ev.Hangup)[0]
        self.assertEqual((hangup.reason, hangup.initiator), ("customer is done", "ai"))
        self.assertEqual(self.of(ev.TrackEnd)[0].playId, "realtime-1")
        self.assertEqual(self.of(ev.TrackEnd)[0].duration, 400)
        self.assertEqual(self.c.state, "closed")

    def test_hangup_call_with_nothing_playing_is_immediate(self):
        self.answer()
        self.p.function_call("call_1", "hangup_call", "")
        self.assertIs(self.s.state, CallState.ENDED)
        self.assertEqual(self.of(ev.Hangup)[0].reason, "system")

    def test_transfer_after_the_audio_through_the_refer_path(self):
        connector = Connector()
        self.answer(connector=connector)
        self.assertEqual([t["name"] for t in self.c.extra_tools], ["hangup_call", "transfer_call"])
        self.c.respond("r1", 0.1)
        self.p.function_call("call_2", "refer_call", json.dumps({"callee_uri": "sip:agent@pbx"}))
        self.assertEqual(self.c.sent, [("output", "call_2", {"status": "transferring", "callee": "sip:agent@pbx"},
                                        False)])
        self.c.done("r1")
        self.assertEqual(connector.refers, [])
        self.play_out()
        self.assertEqual([(r.callee, r.caller) for r in connector.refers], [("sip:agent@pbx", "")])
        fed = self.c.fed
        self.s.audio_in(np.zeros(320, dtype=np.int16))
        self.assertEqual(self.c.fed, fed)  # the caller talks to the callee now

    def test_tool_errors_and_application_tools(self):
        self.answer()
        p, c = self.p, self.c
        p.function_call("c1", "transfer_call", "{}")
        p.function_call("c2", "transfer_call", '{"callee": "sip:x@y"}')  # no connector
        p.function_call("c3", "goto_scene", '{"scene": "two"}')
        p.function_call("c4", "hangup_call", "[1]")
        p.function_call("c5", "lookup_order", '{"id": 7}')
        self.assertEqual(c.sent, [
            ("output", "c1", {"error": "callee is required"}, True),
            ("output", "c2", {"error": "a webSocket call cannot be transferred"}, True),
            ("output", "c3", {"error": "this call has no scenes"}, True),
            ("output", "c4", {"error": "arguments must be a JSON object"}, True),
        ])
        self.assertEqual([f.name for f in self.of(ev.FunctionCall)],
                         ["transfer_call", "transfer_call", "goto_scene", "hangup_call", "lookup_order"])
        self.assertIs(self.s.state, CallState.ANSWERED)

    def test_builtin_tools_can_be_switched_off(self):
        self.answer({"extra": {"builtin_tools": "false"}})
        self.assertEqual(self.c.extra_tools, [])
        self.p.function_call("c1", "hangup_call", "{}")
        self.assertEqual(self.of(ev.FunctionCall)[0].name, "hangup_call")
        self.assertIs(self.s.state, CallState.ANSWERED)

    def test_failures_are_error_events_and_the_call_goes_on(self):
        self.answer()
        self.p.failed("realtime server_error: overloaded", False, 500)
        self.p.failed("realtime: the service closed the connection (1011: x)", True, 500)
        self.assertEqual([(e.sender, e.error, e.code) for e in self.of(ev.Error)], [
            ("realtime", "realtime server_error: overloaded", 500),
            ("realtime", "realtime: the service closed the connection (1011: x)", 500)])
        self.assertIs(self.s.state, CallState.ANSWERED)


PLAYBOOK = """---
greeting: "Hello {{ caller }}, this is the shop."
realtime:
  provider: openai
  model: gpt-4o-realtime-preview
  voice: verse
  endpoint: ws://127.0.0.1:9
llm:
  apiKey: from-llm
  fallback: Sorry, we have a technical problem.
dtmf:
  "0": { action: goto, scene: billing }
followUp: { timeout: 3000, maxCount: 1 }
posthook:
  url: http://127.0.0.1:9/hook
---
# Scene: main
You help {{ caller }} with orders. Call goto_scene billing for invoices.

# Scene: billing
You explain invoices.
"""


class RealtimePlaybookTests(Base):
    def begin(self, text=PLAYBOOK, connector=None):
        self.playbook = parse_playbook(text, "rt.md", environ={})
        s = self.session(None, connector)
        s.extras["caller"] = "Ann"
        self.runner = PlaybookRunner(s, self.playbook, clock=self.clock, http=_NoHttp())
        self.runner.attach()
        s.answered()
        self.p = s.processors
        self.c = FakeClient.instances[-1]

    def test_the_runner_composes_the_realtime_strategy_the_call_finds(self):
        """``realtime:`` in the front matter: the turns are the model's; the strategy is both the runner's
        ``ITurnStrategy`` and the call's ``IRealtimeController`` (found on the session, gone when it ends)."""
        self.begin()
        strategy = self.runner.strategy
        self.assertIsInstance(strategy, RealtimeTurns)
        self.assertTrue(verifyObject(ITurnStrategy, strategy))
        self.assertTrue(verifyObject(IRealtimeController, strategy))
        self.assertIs(realtime_controller(self.s), strategy)
        self.assertIs(strategy.processor, self.p)
        self.s.end("done")
        self.assertIsNone(realtime_controller(self.s))

    def test_realtime_option_instructions_tools_and_greeting(self):
        self.begin()
        option = self.runner.strategy.realtime_option()
        self.assertEqual(option, {"provider": "openai", "model": "gpt-4o-realtime-preview",
                                  "endpoint": "ws://127.0.0.1:9", "secretKey": "from-llm",
                                  "extra": {"voice": "verse"}})
        self.assertEqual(self.c.settings.voice, "verse")
        self.assertEqual(self.c.instructions, "You help Ann with orders. Call goto_scene billing for invoices.")
        goto = self.c.extra_tools[-1]
        self.assertEqual((goto["name"], goto["parameters"]["properties"]["scene"]["enum"]),
                         ("goto_scene", ["main", "billing"]))
        self.assertEqual(self.c.sent, [("response.create",
                                        "Greet the caller by saying exactly: Hello Ann, this is the shop.")])
        self.assertEqual(self.synth.texts, [])  # the model speaks, not the TTS

    def test_goto_scene_switches_instructions_after_the_audio(self):
        self.begin()
        c = self.c
        c.respond("r1", 0.2)
        self.p.function_call("g1", "goto_scene", '{"scene": "billing"}')
        self.assertEqual(self.runner.scene_id, "billing")
        self.assertEqual(c.sent[1:], [("session.update", "You explain invoices."),
                                      ("output", "g1", {"status": "ok", "scene": "billing"}, False)])
        self.p.function_call("g2", "goto_scene", '{"scene": "nowhere"}')
        self.assertEqual(c.sent[-1], ("output", "g2", {"error": "unknown scene 'nowhere'",
                                                       "scenes": ["main", "billing"]}, True))
        c.done("r1")
        self.play_out()
        self.assertEqual(c.sent[-1], ("response.create", None))  # the model goes on in the new scene
        self.assertEqual(self.runner.history[0]["content"], "You explain invoices.")

    def test_dtmf_goto_and_follow_up(self):
        self.begin()
        c = self.c
        c.respond("r1", 0.1)
        c.done("r1")
        self.play_out()
        self.s.emit(ev.Dtmf(trackId="c1", timestamp=self.s.now(), digit="0"))
        self.assertEqual(c.sent[-2:], [("session.update", "You explain invoices."), ("response.create", None)])
        c.respond("r2", 0.1)
        c.done("r2")
        self.play_out()
        n = len(c.sent)
        self.clock.advance(3.1)  # the bot's waitInputTimeout: silence, then the follow-up
        self.assertEqual(c.sent[n:], [("response.create", None)])

    def test_history_for_the_posthook(self):
        self.begin()
        self.p.user_transcript("u1", "Where is my order?")
        self.p.transcript_done("r1", "b1", "It ships today.")
        self.assertEqual(self.runner.history[1:], [{"role": "user", "content": "Where is my order?"},
                                                   {"role": "assistant", "content": "It ships today."}])
        self.assertEqual(self.c.sent[1:], [])  # no LLM turn: the model answers by itself

    def test_hangup_renders_and_ends_after_the_goodbye(self):
        self.begin()
        self.c.respond("r1", 0.1)
        self.p.function_call("h1", "hangup_call", '{"reason": "done"}')
        self.assertTrue(self.runner.hanging_up)
        self.c.done("r1")
        self.play_out()
        self.assertIs(self.s.state, CallState.ENDED)
        self.assertEqual(self.of(ev.Hangup)[0].reason, "done")

    def test_transfer_without_sip_ends_the_call_with_reason_refer(self):
        self.begin()
        self.p.function_call("t1", "transfer_call", '{"callee": "sip:agent@pbx"}')
        self.assertIs(self.s.state, CallState.ENDED)
        self.assertEqual(self.of(ev.Hangup)[0].reason, "refer")
        self.assertEqual(self.s.extras["refer_to"], "sip:agent@pbx")

    def test_losing_the_service_speaks_the_fallback_and_hangs_up(self):
        self.begin()
        self.p.failed("realtime: the service closed the connection (1011: x)", True, 500)
        self.assertEqual(self.synth.texts, ["Sorry, we have a technical problem."])
        self.play_out()
        self.assertIs(self.s.state, CallState.ENDED)
        self.assertEqual(self.of(ev.Error)[0].sender, "realtime")

    def test_a_playbook_without_llm_section(self):
        text = PLAYBOOK.replace("llm:\n  apiKey: from-llm\n  fallback: Sorry, we have a technical problem.\n", "")
        text = text.replace("  endpoint: ws://127.0.0.1:9\n", "  endpoint: ws://127.0.0.1:9\n  secretKey: rk\n")
        self.begin(text)
        self.assertEqual(self.c.settings.headers["Authorization"], "Bearer rk")


class _NoHttp:
    def request(self, *a, **kw):
        return defer.succeed(_Answer())


class _Answer:
    code = 200

    def content(self):
        return defer.succeed(b"{}")
