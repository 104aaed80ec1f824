"""The playbook runner on a real CallSession driven by task.Clock, with a scripted fake LLM (exact turns,
tags, barge-in, follow-up, DTMF, collectors, posthook), and against a real local OpenAI-compatible SSE
server for the LLM path (docs/playbooks.md §6)."""

import dataclasses
import json
import os
from unittest import mock

import numpy as np

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial import unittest
from twisted.web import resource, server
from zope.interface.verify import verifyObject

from activecall.call.session import CallSession
from activecall.config import load_config
from activecall.metrics import Metrics
from activecall.playbook import tags
from activecall.playbook.echo import EchoLLM, echo_reply
from activecall.playbook.llm import LLMClient, LLMError, LLMReply, LLMSettings
from activecall.playbook.parser import parse_playbook
from activecall.playbook.llm_strategy import LlmTurns
from activecall.playbook.runner import PlaybookRunner
from activecall.playbook.start import playbook_call_option, start_playbook
from activecall.playbook.strategy import ITurnStrategy
from activecall.testing import FakeConnector as ReferConnector
from activecall.testing import FakeSynthesizer as FakeSynth  # 3 frames (60 ms) per text
from activecall.testing import advance_frames
from activecall.protocol import commands as cmd
from activecall.protocol import events as ev

T0 = 1_700_000_000


class StreamCall:
    """One streamed LLM request the test answers by hand."""

    def __init__(self, messages, on_delta):
        self.messages = messages
        self.on_delta = on_delta
        self.text = ""
        self.cancelled = False
        self.d = defer.Deferred(canceller=self._cancel)

    def _cancel(self, d):
        self.cancelled = True

    def send(self, *chunks):
        for chunk in chunks:
            self.text += chunk
            self.on_delta(chunk)

    def end(self):
        self.d.callback(LLMReply(self.text, finish_reason="stop"))

    def reply(self, *chunks):
        self.send(*chunks)
        self.end()


class FakeLLM:
    """Scripted model: each stream() takes the next step of ``script`` (a list of chunks to send and end,
    an exception to fail with, or None to leave the request open); complete() answers from ``completions``."""

    def __init__(self, *script):
        self.script = list(script)
        self.calls = []
        self.completions = []
        self.completed = []

    def stream(self, messages, on_delta, tools=None):
        call = StreamCall([dict(m) for m in messages], on_delta)
        self.calls.append(call)
        step = self.script.pop(0) if self.script else None
        if isinstance(step, Exception):
            call.d.errback(step)
        elif step is not None:
            call.reply(*([step] if isinstance(step, str) else step))
        return call.d

    def complete(self, messages, tools=None):
        self.completed.append([dict(m) for m in messages])
        answer = self.completions.pop(0) if self.completions else "ok"
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed(LLMReply(answer))


class FakeResponse:
    def __init__(self, code, body):
        self.code = code
        self.body = body

    def content(self):
        return defer.succeed(self.body)


class FakeHttp:
    """treq-like: records requests; ``answers`` are (code, body), an exception, or None (never answers)."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.requests = []

    def request(self, method, url, data=None, headers=None):
        self.requests.append({"method": method, "url": url, "data": data, "headers": headers})
        answer = self.answers.pop(0) if self.answers else (200, b"{}")
        if answer is None:
            return defer.Deferred()
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed(FakeResponse(*answer))


PLAYBOOK = """---
llm:
  provider: openai
  baseUrl: http://127.0.0.1:9/v1
  model: test-model
{extra}
---
You are a test bot for {{{{ session_id }}}}.
"""


class RunnerTestBase(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.events = []
        root = os.path.abspath(self.mktemp())
        cfg, _ = load_config(None)
        self.cfg = dataclasses.replace(
            cfg, recording=dataclasses.replace(cfg.recording, path=os.path.join(root, "rec")),
            media_cache_path=os.path.join(root, "cache"), playbook_dir=os.path.join(root, "playbook"))
        os.makedirs(self.cfg.playbook_dir)
        self.synth = FakeSynth()
        self.commands = []

    def make_session(self, connector=None):
        s = CallSession("s1", "webSocket", clock=self.clock, emit=self.events.append, config=self.cfg,
                        synthesizer_for=lambda opt: self.synth, dump=False)
        s.option = cmd.CallOption(tts=cmd.SynthesisOption(provider="fake"))
        s.connector = connector
        original = s.handle

        def handle(command):
            self.commands.append(command)
            return original(command)

        s.handle = handle
        return s

    def begin(self, text=None, *script, extra="", greeting=None, answered=True, connector=None, http=None):
        """A runner over a fresh session with playbook front matter ``extra``."""
        if greeting is not None:
            extra += f"\ngreeting: {json.dumps(greeting)}"
        source = text if text is not None else PLAYBOOK.format(extra=extra)
        self.playbook = parse_playbook(source, "test.md", environ={})
        self.session = self.make_session(connector)
        self.llm = FakeLLM(*script)
        self.http = http or FakeHttp()
        self.runner = PlaybookRunner(self.session, self.playbook, clock=self.clock,
                                     llm_client_factory=lambda cfg: self.llm, http=self.http)
        self.runner.attach()
        if answered:
            self.session.answered()
        return self.runner

    # helpers

    def tts(self):
        return [c for c in self.commands if isinstance(c, cmd.Tts)]

    def sent(self):
        """Commands as compact tuples."""
        out = []
        for c in self.commands:
            if isinstance(c, cmd.Tts):
                out.append(("tts", c.text, c.playId, c.endOfStream, bool(c.autoHangup)))
            elif isinstance(c, cmd.Play):
                out.append(("play", c.url))
            elif isinstance(c, cmd.Refer):
                out.append(("refer", c.callee))
            elif isinstance(c, cmd.Interrupt):
                out.append(("interrupt",))
            else:
                out.append((c.TAG,))
        return out

    def play_out(self, limit=500):
        """Tick the media clock until the bot's track is done."""
        for _ in range(limit):
            if self.session.playback.current is None:
                return
            self.clock.advance(0.02)
            self.session.tick()
        self.fail("playback never ended")

    def tick(self, n):
        advance_frames(self.clock, n, self.session.tick)

    def user(self, text, **kw):
        self.session.emit(ev.AsrFinal(trackId="s1", timestamp=self.session.now(), index=0, text=text, **kw))

    def digit(self, d):
        self.session.emit(ev.Dtmf(trackId="s1", timestamp=self.session.now(), digit=d))

    def silence(self):
        self.session.emit(ev.Silence(trackId="s1", timestamp=self.session.now(), startTime=0, duration=0))

    def history(self):
        return [(m["role"], m["content"]) for m in self.runner.history[1:]]

    def of(self, tag):
        return [e for e in self.events if e.TAG == tag]


class StartTests(RunnerTestBase):
    def test_the_runner_composes_the_llm_turn_strategy(self):
        """No ``realtime:`` in the front matter: the LLM pipeline takes the turns, as an ``ITurnStrategy``."""
        self.begin(None, "Hi.")
        self.assertIsInstance(self.runner.strategy, LlmTurns)
        self.assertTrue(verifyObject(ITurnStrategy, self.runner.strategy))
        self.assertIsNone(getattr(self.session, "realtime_controller", None))

    def test_greeting_is_the_first_command_and_media_waits_for_answer(self):
        self.begin(None, greeting="Hello {{ session_id }}!", answered=False)
        self.assertEqual(self.commands, [])
        self.session.answered()
        self.assertEqual(self.sent(), [("tts", "Hello s1!", "greeting", True, False)])
        self.assertEqual(self.llm.calls, [])
        self.assertEqual(self.of("addHistory")[0].speaker, "assistant")

    def test_without_greeting_the_llm_speaks_first(self):
        self.begin(None, "Hi there, how can I help?")
        self.assertEqual(len(self.llm.calls), 1)
        messages = self.llm.calls[0].messages
        self.assertEqual([m["role"] for m in messages], ["system"])
        self.assertIn("You are a test bot for s1.", messages[0]["content"])
        self.assertIn("<hangup/>", messages[0]["content"])  # tool instructions
        self.assertEqual(self.sent(), [("tts", "Hi there, how can I help?", "llm-1", True, False)])
        keys = [e.key for e in self.of("metrics") if e.key.startswith("llm")]
        self.assertEqual(keys, ["llm_call_start", "llm_response"])

    def test_initial_scene_play_comes_before_the_greeting(self):
        path = os.path.join(self.cfg.playbook_dir, "beep.wav")
        self.begin(PLAYBOOK.format(extra='greeting: "Welcome."').replace(
            "You are", f'<play file="{path}"/>\nYou are'))
        self.assertEqual(self.sent(), [("play", path)])  # the greeting waits for the file's trackEnd
        self.play_out()
        self.assertEqual(self.sent()[-1], ("tts", "Welcome.", "greeting", True, False))


class ReplyTests(RunnerTestBase):
    def test_sentences_share_one_play_id_and_the_last_ends_the_stream(self):
        self.begin(None, ["Hello! How can ", "I help you today?"])
        self.assertEqual(self.sent(), [
            ("tts", "Hello!", "llm-1", False, False),
            ("tts", "How can I help you today?", "llm-1", True, False),
        ])
        self.assertTrue(all(c.streaming for c in self.tts()))
        self.assertEqual(self.tts()[0].waitInputTimeout, 10000)

    def test_a_reply_ending_in_a_newline_gets_an_empty_end_of_stream(self):
        self.begin(None, "Hello! How can I help you today?\n")
        self.assertEqual(self.sent(), [
            ("tts", "Hello!", "llm-1", False, False),
            ("tts", "How can I help you today?", "llm-1", False, False),
            ("tts", "", "llm-1", True, False),
        ])

    def test_refer_and_hangup_tags(self):
        connector = ReferConnector()
        self.begin(None, ['Hello! <refer to="sip:1', '23"/> How are you? <hangup/>'], connector=connector)
        self.assertEqual(self.sent(), [
            ("tts", "Hello!", "llm-1", False, False),
            ("refer", "sip:123"),
            ("tts", "How are you?", "llm-1", False, False),
            ("tts", "", "llm-1", True, True),
        ])
        self.assertEqual(connector.refers[0].callee, "sip:123")
        self.assertNotIn("hangup", [c.TAG for c in self.commands])
        self.assertEqual(self.history(), [("assistant", 'Hello! <refer to="sip:123"/> How are you? <hangup/>')])
        self.play_out()
        self.assertEqual(self.session.end_reason, "autohangup")
        self.assertTrue(self.runner.stopped)

    def test_tags_never_reach_the_tts(self):
        self.begin(None, ['Sure <set_var key="a" value="1"/>thing. <goto scene="nowhere"/>Bye <bogus x=1> now.'])
        self.assertEqual(self.synth.texts, ["Sure", "thing.", "Bye", "now."])
        for text in self.synth.texts:
            self.assertNotIn("<", text)

    def test_set_var_after_hangup_lands_in_the_bye_headers(self):
        self.begin(None, 'Goodbye. <hangup/><set_var key="outcome" value="resolved"/>', extra="""sip:
  hangup_headers:
    X-Outcome: "{{ outcome }}"
    X-Session: "{{ session_id }}"
    X-Missing: "{{ nothing }}"
""")
        self.assertEqual(self.session.extras["outcome"], "resolved")
        self.assertEqual(self.session.hangup_headers, {"X-Outcome": "resolved", "X-Session": "s1", "X-Missing": ""})
        self.assertEqual(self.sent()[-2:], [("tts", "Goodbye.", "llm-1", False, False), ("tts", "", "llm-1", True, True)])

    def test_refer_on_a_call_that_cannot_transfer_ends_it_after_the_reply(self):
        self.begin(None, 'Transferring you now. <refer to="sip:agent@pbx"/>')
        self.assertEqual(self.sent(), [("tts", "Transferring you now.", "llm-1", False, False),
                                       ("tts", "", "llm-1", True, False)])
        self.assertIsNone(self.session.end_reason)
        self.play_out()
        self.assertEqual(self.session.end_reason, "refer")

    def test_goto_switches_the_system_prompt_without_a_new_turn(self):
        text = """---
llm: {provider: openai}
---
Shared rules.
# Scene: start
Greet. Your name is {{ bot }}.
# Scene: billing
Talk about invoices for {{ bot }}.
"""
        self.begin(text, 'One moment. <set_var key="bot" value="Ann"/><goto scene="billing"/>')
        self.assertEqual(len(self.llm.calls), 1)
        system = self.runner.history[0]["content"]
        self.assertTrue(system.startswith("Shared rules.\n\nTalk about invoices for Ann."), system)
        self.assertEqual(self.runner.scene_id, "billing")

    def test_play_mid_reply_keeps_the_order(self):
        path = os.path.join(self.cfg.playbook_dir, "hold.wav")
        self.begin(None, f'Please hold. <play file="{path}"/>Thanks for waiting.')
        self.assertEqual(self.sent(), [
            ("tts", "Please hold.", "llm-1", False, False),
            ("tts", "", "llm-1", True, False),
        ])
        self.play_out()
        self.assertEqual(self.sent()[2], ("play", path))
        self.play_out()
        self.assertEqual(self.sent()[3], ("tts", "Thanks for waiting.", "llm-1.2", True, False))

    def test_http_tag_runs_in_the_background_and_feeds_the_next_turn(self):
        http = FakeHttp(None)
        self.begin(None, ["Let me check. ", '<http url="http://api/x" method="POST" body=\'{"a":1}\' set_var="r"/>'],
                 "Your order shipped.", http=http)
        self.assertEqual(http.requests[0]["method"], "POST")
        self.assertEqual(http.requests[0]["data"], b'{"a":1}')
        self.assertEqual(self.sent()[-1][3], True)  # the reply finished without waiting for HTTP
        self.user("Any news?")
        self.assertEqual(len(self.llm.calls), 1)  # the next turn waits for the pending request...
        self.clock.advance(10)  # ...which times out after the tag's 10 s
        self.assertEqual(len(self.llm.calls), 2)
        self.assertIn(("system", "HTTP POST http://api/x failed: timed out"), self.history())

    def test_http_tag_result_becomes_a_system_message_and_a_variable(self):
        http = FakeHttp((200, b'{"status": "shipped"}'))
        self.begin(None, 'Checking. <http url="http://api/{{ session_id }}" set_var="order"/>', http=http)
        self.assertEqual(http.requests[0]["url"], "http://api/s1")
        self.assertEqual(self.session.extras["order"], '{"status": "shipped"}')
        self.assertIn(("system", 'HTTP GET http://api/s1 returned (200): {"status": "shipped"}'), self.history())

    def test_llm_error_speaks_the_fallback_line(self):
        self.begin(None, LLMError("LLM HTTP 500: boom", 500), extra='  fallback: "Sorry, say again?"')
        errors = self.of("error")
        self.assertEqual((errors[0].sender, errors[0].error, errors[0].code), ("llm", "LLM HTTP 500: boom", 500))
        self.assertEqual(self.sent(), [("tts", "Sorry, say again?", "llm-1", True, False)])

    def test_llm_error_mid_reply_still_ends_with_the_fallback(self):
        self.begin(None, None)
        self.llm.calls[0].send("Let me see. ")
        self.llm.calls[0].d.errback(LLMError("LLM stream broken: lost"))
        self.assertEqual([t.text for t in self.tts()], ["Let me see.", self.playbook.config.llm.fallback])
        self.assertTrue(self.tts()[-1].endOfStream)


class JsonModeTests(RunnerTestBase):
    def test_text_and_wait_input_timeout(self):
        self.begin(None, '{"text": "Hello there.", "waitInputTimeout": 5000}')
        [tts] = self.tts()
        self.assertEqual((tts.text, tts.waitInputTimeout, tts.endOfStream), ("Hello there.", 5000, True))
        self.assertEqual(self.history(), [("assistant", "Hello there.")])

    def test_hangup_tool_folds_into_the_tts(self):
        self.begin(None, '```json\n{"text": "Bye.", "tools": [{"name": "hangup"}]}\n```')
        [tts] = self.tts()
        self.assertEqual((tts.text, tts.autoHangup), ("Bye.", True))
        self.play_out()
        self.assertEqual(self.session.end_reason, "autohangup")

    def test_refer_tool(self):
        connector = ReferConnector()
        self.begin(None, '{"tools": [{"name": "refer", "caller": "sip:bot@x", "callee": "sip:human@x"}]}',
                 connector=connector)
        self.assertEqual((connector.refers[0].caller, connector.refers[0].callee), ("sip:bot@x", "sip:human@x"))

    def test_http_tool_re_asks_at_most_three_rounds(self):
        again = '{"tools": [{"name": "http", "url": "http://api/x"}]}'
        http = FakeHttp((200, b"one"), (200, b"two"), (200, b"three"))
        self.begin(None, None, http=http)
        self.llm.completions = [again, again, again]
        self.llm.calls[0].reply(again)
        self.assertEqual(len(self.llm.completed), 2)  # 3 rounds in all
        self.assertEqual(len(http.requests), 3)
        self.assertEqual(self.llm.completed[0][-1], {"role": "system", "content": "HTTP tool response (200): one"})
        [tts] = self.tts()
        self.assertEqual(tts.text, "")  # no text after the last round: nothing to say

    def test_http_tool_then_answer(self):
        http = FakeHttp((200, b'{"balance": 12}'))
        self.begin(None, '{"tools": [{"name": "http", "url": "http://api/b", "method": "POST", "body": {"id": 7}}]}',
                 http=http)
        self.assertEqual(http.requests[0]["data"], b'{"id": 7}')

    def test_http_tool_answer_is_spoken(self):
        http = FakeHttp((200, b'{"balance": 12}'))
        runner = self.begin(None, None, http=http)
        self.llm.completions = ['{"text": "Your balance is 12 euros."}']
        self.llm.calls[0].reply('{"tools": [{"name": "http", "url": "http://api/b"}]}')
        self.assertEqual(self.tts()[-1].text, "Your balance is 12 euros.")
        self.assertEqual(runner.history[-1], {"role": "assistant", "content": "Your balance is 12 euros."})


class BargeInTests(RunnerTestBase):
    def speaking(self, **kw):
        self.session.emit(ev.Speaking(trackId="s1", timestamp=self.session.now(), startTime=0, **kw))

    def delta(self, text, **kw):
        self.session.emit(ev.AsrDelta(trackId="s1", timestamp=self.session.now(), index=0, text=text, **kw))

    def start_speaking(self, extra=""):
        self.begin(None, None, extra=extra)
        self.llm.calls[0].send("This is a long answer. ", "It goes on and on. ")
        self.tick(1)
        self.assertTrue(self.runner.is_speaking)

    def test_interrupt_only_after_the_guard_and_it_flushes_and_cancels(self):
        # the original's rule (voice alone stops the bot); by default voice pauses and words stop
        # (PauseThenDecideTests)
        self.start_speaking(extra="interruption: {strategy: both, pauseOnVoice: false}")
        self.clock.advance(0.5)
        self.speaking()
        self.assertNotIn(("interrupt",), self.sent())
        self.clock.advance(0.4)
        self.speaking()
        self.assertEqual(self.sent()[-1], ("interrupt",))
        self.assertTrue(self.llm.calls[0].cancelled)
        self.assertEqual([e.TAG for e in self.events[-2:]], ["interruption", "trackEnd"])
        self.assertIsNone(self.session.playback.current)
        self.assertFalse(self.runner.is_speaking)
        self.assertEqual(self.history(), [("assistant", "This is a long answer. It goes on and on. ")])

    def test_filler_words_do_not_interrupt_but_wait_does(self):
        self.start_speaking(extra="interruption: {strategy: both, fillerWordFilter: true}")
        self.clock.advance(1)
        self.speaking(isFiller=True)
        self.delta("uh")
        self.delta("Um.")
        self.assertNotIn(("interrupt",), self.sent())
        self.delta("Wait")
        self.assertEqual(self.sent()[-1], ("interrupt",))

    def test_a_fresh_final_suppresses_the_interrupt(self):
        self.start_speaking(extra="interruption: {strategy: both, pauseOnVoice: false}")
        self.clock.advance(1)
        self.runner.last_final_ms = self.session.now() - 300
        self.speaking()
        self.assertNotIn(("interrupt",), self.sent())
        self.clock.advance(0.3)
        self.speaking()
        self.assertIn(("interrupt",), self.sent())

    def test_strategies(self):
        for strategy, speaking, delta in (("vad", True, False), ("asr", False, True), ("none", False, False)):
            self.commands.clear()
            self.start_speaking(extra=f"interruption: {{strategy: {strategy}}}")
            self.clock.advance(1)
            self.delta("hello")
            self.assertEqual(("interrupt",) in self.sent(), delta, strategy)
            self.speaking()
            self.assertEqual(("interrupt",) in self.sent(), speaking or delta, strategy)

    def test_a_new_final_supersedes_the_running_reply(self):
        self.start_speaking()
        self.clock.advance(1)
        self.user("Stop, I have a question.")
        self.assertTrue(self.llm.calls[0].cancelled)
        self.assertEqual(len(self.llm.calls), 2)
        self.assertEqual(self.llm.calls[1].messages[-1], {"role": "user", "content": "Stop, I have a question."})
        self.llm.calls[1].reply("Go ahead.")
        self.assertEqual(self.sent()[-1], ("tts", "Go ahead.", "llm-2", True, False))
        self.assertIn(("interruption", "llm-1"), [(e.TAG, getattr(e, "playId", None)) for e in self.events])


class TurnTests(RunnerTestBase):
    def test_each_final_is_a_turn_with_history(self):
        self.begin(None, "Hi!", "Your order 42 shipped.")
        self.play_out()
        self.user("Where is my order?")
        messages = self.llm.calls[1].messages
        self.assertEqual([m["role"] for m in messages], ["system", "assistant", "user"])
        self.assertEqual(messages[-1]["content"], "Where is my order?")
        self.assertEqual(self.history()[-1], ("assistant", "Your order 42 shipped."))
        users = [e for e in self.of("addHistory") if e.speaker == "user"]
        self.assertEqual((users[0].sender, users[0].text), ("llm", "Where is my order?"))

    def test_empty_finals_are_ignored(self):
        self.begin(None, "Hi!")
        self.user("  ")
        self.assertEqual(len(self.llm.calls), 1)

    def test_eou_starts_no_turn_of_its_own(self):
        """The asrFinal the end-of-turn decision brings starts the turn; the eou alone would ask the
        model with no user message (the original's double turn)."""
        self.begin(None, "Hi!", "Yes?")
        self.play_out()
        self.session.emit(ev.Eou(trackId="s1", timestamp=self.session.now(), completed=True, probability=0.9))
        self.assertEqual(len(self.llm.calls), 1)
        self.user("Where is my order?")
        self.assertEqual(len(self.llm.calls), 2)

    def test_context_repair_glues_a_split_utterance(self):
        self.begin(None, "Hi!", "OK.", "Fine.", extra="  language: en\n  features: [context_repair]")
        self.play_out()
        self.user("I want to")
        self.play_out()
        self.clock.advance(1)
        self.user("change my address")
        self.assertEqual(self.llm.calls[2].messages[-1], {"role": "user", "content": "I want to, change my address"})
        self.assertNotIn(("assistant", "OK."), self.history())

    def test_rolling_summary(self):
        self.begin(None, "Hi!", "Reply.", extra="  features: [rolling_summary]\n  summaryLimit: 4")
        self.play_out()
        self.runner.history[1:] = [{"role": "user" if i % 2 else "assistant", "content": f"m{i}"} for i in range(12)]
        self.llm.completions = ["They talked about m1 to m6."]
        self.user("New question")
        self.assertEqual(self.llm.completed[0][-1]["role"], "user")
        self.assertTrue(self.runner.history[0]["content"].endswith("[Previous Context Summary]: They talked about m1 to m6."))
        self.assertEqual([m["content"] for m in self.runner.history[1:]],
                         ["m7", "m8", "m9", "m10", "m11", "New question", "Reply."])


class FollowUpTests(RunnerTestBase):
    def test_follow_up_then_hang_up(self):
        self.begin(None, "Hello?", "Still there?", "Hello??", extra="followUp: {timeout: 5000, maxCount: 2}")
        self.assertEqual(self.tts()[0].waitInputTimeout, 5000)
        self.play_out()
        self.clock.advance(2)
        self.silence()  # too early
        self.assertEqual(len(self.llm.calls), 1)
        self.clock.advance(3)  # the session's waitInputTimeout fires silence itself
        self.assertEqual(len(self.llm.calls), 2)
        self.assertEqual(self.llm.calls[1].messages, self.llm.calls[0].messages + [
            {"role": "assistant", "content": "Hello?"}])  # history unchanged but for the last reply
        self.play_out()
        self.clock.advance(5)
        self.assertEqual(len(self.llm.calls), 3)
        self.play_out()
        self.clock.advance(5)
        self.assertEqual(self.session.end_reason, "Max follow-up reached")

    def test_a_final_resets_the_count(self):
        self.begin(None, "A.", "B.", "C.", "D.", extra="followUp: {timeout: 1000, maxCount: 1}")
        self.play_out()
        self.clock.advance(1)
        self.assertEqual(self.runner.followup_count, 1)
        self.play_out()
        self.user("Yes")
        self.assertEqual(self.runner.followup_count, 0)
        self.play_out()
        self.clock.advance(1)
        self.assertEqual(len(self.llm.calls), 4)
        self.assertIsNone(self.session.end_reason)

    def test_scene_followup_tag_wins(self):
        self.begin(PLAYBOOK.format(extra="followUp: {timeout: 9000, maxCount: 1}").replace(
            "You are", '<followup timeout="2000" max="0"/>You are'), "Hi.")
        self.play_out()
        self.clock.advance(2)
        self.assertEqual(self.session.end_reason, "Max follow-up reached")


DTMF_PLAYBOOK = """---
llm: {provider: openai}
greeting: "Menu."
dtmf:
  "1": {action: goto, scene: sales}
  "9": {action: hangup}
  "0": {action: transfer, target: "sip:operator@pbx"}
---
# Scene: main
Main menu.
<dtmf digit="9" action="goto" scene="support"/>
# Scene: sales
Sales. <play file="%s"/>
# Scene: support
Support.
"""


class DtmfTests(RunnerTestBase):
    def dtmf_run(self, *script, connector=None):
        self.path = os.path.join(self.cfg.playbook_dir, "chime.wav")
        return self.begin(DTMF_PLAYBOOK % self.path, *script, connector=connector)

    def test_scene_action_beats_global(self):
        self.dtmf_run("Support here.")
        self.digit("9")
        self.assertEqual(self.runner.scene_id, "support")
        self.assertIsNone(self.session.end_reason)
        self.assertEqual(len(self.llm.calls), 1)
        self.assertTrue(self.llm.calls[0].messages[0]["content"].startswith("Support."))

    def test_goto_plays_the_scene_file_then_a_new_turn(self):
        self.dtmf_run("Sales here.")
        self.digit("1")
        self.assertEqual(self.sent()[-1], ("play", self.path))
        self.play_out()
        self.assertEqual(self.sent()[-1], ("tts", "Sales here.", "llm-1", True, False))

    def test_hangup_and_unmapped(self):
        self.dtmf_run()
        self.digit("5")
        self.assertIsNone(self.session.end_reason)
        self.runner.scene_id = "sales"
        self.digit("9")
        self.assertEqual(self.session.end_reason, "DTMF Hangup")

    def test_transfer(self):
        connector = ReferConnector()
        self.dtmf_run(connector=connector)
        self.digit("0")
        self.assertEqual(connector.refers[0].callee, "sip:operator@pbx")


COLLECTORS = """dtmfCollectors:
  pin:
    description: "4-digit PIN"
    digits: 4
    validation: {pattern: "^[0-9]+$", errorMessage: "Digits only please."}
    retryTimes: 1
  account:
    minDigits: 3
    maxDigits: 8
    finishKey: "#"
    timeout: 20
    interDigitTimeout: 3
"""


class CollectorTests(RunnerTestBase):
    def collect(self, kind, *script):
        self.begin(None, f'Please enter it. <collect type="{kind}" var="v" prompt="Enter now."/>', *script,
                 extra=COLLECTORS)
        self.play_out()

    def test_prompt_lists_collectors(self):
        self.collect("pin")
        system = self.runner.history[0]["content"]
        self.assertIn("- `account`: account (3-8 digits, press # to finish)", system)
        self.assertIn("- `pin`: 4-digit PIN (4 digits)", system)
        self.assertLess(system.index("`account`"), system.index("`pin`"))

    def test_auto_finish_at_the_digit_count(self):
        self.collect("pin", "Thanks.")
        self.assertEqual([t.text for t in self.tts()], ["Please enter it.", "Enter now.", ""])
        self.user("ignored while collecting")
        for d in "1234":
            self.digit(d)
        self.assertEqual(self.session.extras["v"], "1234")
        self.assertIn(("system", "[DTMF collection completed for 'v': 1234]"), self.history())
        self.assertNotIn(("user", "ignored while collecting"), self.history())
        self.assertEqual(len(self.llm.calls), 2)

    def test_finish_key_and_inter_digit_timeout(self):
        self.collect("account", "Got it.", "Got it again.")
        for d in "12345#":
            self.digit(d)
        self.assertEqual(self.session.extras["v"], "12345")
        self.runner.collector.start(tags.Collect("account", "w"))
        for d in "987":
            self.digit(d)
        self.clock.advance(2.9)
        self.assertNotIn("w", self.session.extras)
        self.clock.advance(0.1)
        self.assertEqual(self.session.extras["w"], "987")

    def test_too_long_with_a_finish_key_is_rejected(self):
        self.collect("account", "Let us try another way.")
        for d in "123456789#":  # maxDigits 8, but the caller typed on to the finish key
            self.digit(d)
        self.assertNotIn("v", self.session.extras)
        self.assertEqual(self.tts()[-1].text, "Expected at most 8 digits, got 9")

    def test_too_short_retries_then_fails(self):
        self.collect("account", "Let us try another way.")
        self.digit("1")
        self.digit("#")
        self.assertEqual(self.tts()[-1].text, "Expected at least 3 digits, got 1")
        for d in "12#":
            self.digit(d)
        for d in "9#":
            self.digit(d)
        self.assertIsNotNone(self.runner.collection)  # 3 retries allowed
        for d in "5#":
            self.digit(d)
        notes = [c for r, c in self.history() if r == "system"]
        self.assertTrue(notes[-1].startswith("[DTMF collection failed for 'v' after 3 retries: "
                                             "Expected at least 3 digits, got 1"), notes[-1])
        self.assertIsNone(self.runner.collection)

    def test_validation_error_message(self):
        self.collect("pin")
        for d in "12*4":
            self.digit(d)
        self.assertEqual(self.tts()[-1].text, "Digits only please.")
        self.assertEqual(self.runner.collection.retries, 1)

    def test_overall_timeout_without_digits(self):
        self.collect("account", "Are you there?")
        self.clock.advance(19.9)
        self.assertIsNotNone(self.runner.collection)
        self.clock.advance(0.1)
        self.assertIn(("system", "[DTMF collection timed out for 'v'. No digits were entered. Please guide the user.]"),
                      self.history())
        self.assertEqual(len(self.llm.calls), 2)

    def test_unknown_type(self):
        self.collect("zip")
        self.assertIn(("system", "[Unknown DTMF collector type 'zip'. Available types: account, pin]"),
                      self.history())
        self.assertIsNone(self.runner.collection)

    def test_hangup_still_ends_the_call_while_collecting(self):
        self.collect("pin")
        self.session.end("caller", initiator="caller")
        self.assertTrue(self.runner.stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class PosthookTests(RunnerTestBase):
    HOOK = """posthook:
  url: http://hooks/done
  summary: short
  headers: {X-Token: abc}
"""

    def test_posthook_is_retried_then_delivered(self):
        http = FakeHttp(ConnectionError("refused"), (500, b"busy"), (200, b"ok"))
        self.begin(None, "Hi.", extra=self.HOOK, http=http)
        self.llm.completions = ["The caller greeted."]
        self.session.end("caller", initiator="caller")
        self.assertEqual(len(http.requests), 1)
        self.clock.advance(1)
        self.assertEqual(len(http.requests), 2)
        self.clock.advance(2)
        self.assertEqual(len(http.requests), 3)
        self.assertTrue(self.runner.done.called)
        request = http.requests[-1]
        self.assertEqual((request["method"], request["url"]), ("POST", "http://hooks/done"))
        self.assertEqual(request["headers"]["X-Token"], ["abc"])
        body = json.loads(request["data"])
        self.assertEqual(set(body), {"sessionId", "summary", "history", "timestamp"})
        self.assertEqual(body["sessionId"], "s1")
        self.assertEqual(body["summary"], "The caller greeted.")
        self.assertEqual(body["history"], [{"role": "assistant", "content": "Hi."}])
        self.assertIn("one or two sentences", self.llm.completed[0][-1]["content"])

    def test_a_posthook_in_flight_keeps_the_ended_session_then_lets_it_go(self):
        """The session's links turn weak when the call ends; the runner holds its session until the
        posthook is done (it may read ``runner.session``), then reference counting frees the call."""
        import gc
        import weakref

        gc.disable()
        self.addCleanup(gc.enable)
        http = FakeHttp(ConnectionError("refused"), (200, b"ok"))
        self.begin(None, "Hi.", extra="posthook: {url: 'http://hooks/x'}", http=http)
        del self.session.handle  # the fixture's wrapper closes over the session's own method: a cycle of its own
        ref = weakref.ref(self.session)
        self.session.end("caller", initiator="caller")
        del self.session
        self.assertFalse(self.runner.done.called)  # the first attempt failed; the retry waits a second
        self.assertIs(self.runner.session, ref())
        self.assertIsNotNone(ref())
        self.clock.advance(1)
        self.assertEqual(len(http.requests), 2)
        self.assertTrue(self.runner.done.called)
        self.assertIsNone(ref())
        self.assertIsNone(self.runner.session)
        self.runner.refresh_hangup_headers()  # e.g. an <http> answering now: nothing to update, no error

    def test_posthook_gives_up_after_three_attempts(self):
        http = FakeHttp((503, b""), (503, b""), (503, b""), (200, b""))
        self.begin(None, "Hi.", extra="posthook: {url: 'http://hooks/x', includeHistory: false}", http=http)
        self.session.end("caller")
        self.clock.advance(1)
        self.clock.advance(2)
        self.clock.advance(4)
        self.assertEqual(len(http.requests), 3)
        body = json.loads(http.requests[0]["data"])
        self.assertIsNone(body["summary"])
        self.assertIsNone(body["history"])
        self.assertTrue(self.runner.done.called)


class EchoTests(RunnerTestBase):
    def test_echo_mode_holds_a_conversation_offline(self):
        self.playbook = parse_playbook("---\nllm: {provider: echo}\ngreeting: Hi.\n---\nEcho.\n", "echo.md",
                                       environ={})
        self.session = self.make_session()
        runner = start_playbook(self.session, self.playbook, clock=self.clock)
        self.session.answered()
        self.user("the weather is nice")
        self.assertEqual(self.tts()[-1].text, "Press 1 to hear the menu again, or 0 to hang up.")
        self.assertEqual(runner.history[-1]["content"],
                         "You said: the weather is nice. Press 1 to hear the menu again, or 0 to hang up.")
        self.play_out()
        self.user("goodbye")
        self.assertTrue(self.tts()[-1].autoHangup)
        self.play_out()
        self.assertEqual(self.session.end_reason, "autohangup")

    def test_echo_lines(self):
        self.assertEqual(echo_reply([{"role": "system", "content": "x"}]),
                         "I am listening. Say something and I will repeat it.")
        self.assertEqual(echo_reply([{"role": "user", "content": "你好"}]), "你说的是：你好。按1重听菜单，按0挂断。")
        self.assertEqual(echo_reply([{"role": "system", "content": "x"},
                                     {"role": "system", "content": "[DTMF collection completed for 'v': 42]"}]),
                         "You entered 4 2.")

    def test_auto_without_endpoint_is_echo(self):
        from activecall.playbook.runner import default_llm_client_factory

        book = parse_playbook("---\nllm: {provider: auto}\n---\nx\n", environ={})
        self.assertIsInstance(default_llm_client_factory()(book.config.llm), EchoLLM)
        book = parse_playbook("---\nllm: {provider: auto, baseUrl: 'http://h/v1'}\n---\nx\n", environ={})
        self.assertIsInstance(default_llm_client_factory()(book.config.llm), LLMClient)


class StartPlaybookTests(RunnerTestBase):
    def test_playbook_media_options_fill_what_the_call_left_out(self):
        book = parse_playbook("---\nllm: {provider: echo}\nasr: {provider: pocketsphinx}\n"
                              "tts: {provider: flite, speaker: slt}\nvad: {type: webrtcvad, silenceTimeout: 800}\n---\nx\n",
                              environ={})
        option = playbook_call_option(book)
        self.assertEqual(option.asr.provider, "pocketsphinx")
        self.assertEqual((option.tts.provider, option.tts.speaker), ("flite", "slt"))
        self.assertEqual((option.vad.type, option.vad.silenceTimeout), ("webrtcvad", 800))
        session = self.make_session()
        start_playbook(session, book, clock=self.clock)
        self.assertEqual(session.option.tts.provider, "fake")  # the call's own choice wins
        self.assertEqual(session.option.asr.provider, "pocketsphinx")

    def test_named_playbook_under_the_directory(self):
        with open(os.path.join(self.cfg.playbook_dir, "hi.md"), "w") as f:
            f.write("---\nllm: {provider: echo}\ngreeting: Hello from a file.\n---\nx\n")
        session = self.make_session()
        runner = start_playbook(session, "hi.md", clock=self.clock)
        session.answered()
        self.assertEqual(runner.playbook.source, os.path.join(self.cfg.playbook_dir, "hi.md"))
        self.assertEqual(self.tts()[0].text, "Hello from a file.")

    def test_a_configured_file_outside_the_directory_runs_but_the_same_name_from_the_api_does_not(self):
        from activecall.call.handlers import PlaybookFile

        outside = os.path.abspath(self.mktemp() + ".md")
        with open(outside, "w") as f:
            f.write("---\nllm: {provider: echo}\ngreeting: From elsewhere.\n---\nx\n")
        session = self.make_session()
        runner = start_playbook(session, PlaybookFile(outside), clock=self.clock)  # the router's decision
        session.answered()
        self.assertEqual(runner.playbook.source, outside)
        self.assertEqual(self.tts()[0].text, "From elsewhere.")
        for name in (outside, os.path.relpath(outside, self.cfg.playbook_dir)):  # an invite's option.playbook
            self.events.clear()
            session = self.make_session()
            self.assertIsNone(start_playbook(session, name, clock=self.clock))
            [error] = self.of("error")
            self.assertEqual(error.sender, "playbook")
            self.assertIn("playbook", error.error)
        self.events.clear()
        session = self.make_session()
        self.assertIsNone(start_playbook(session, PlaybookFile(outside + ".gone"), clock=self.clock))
        [error] = self.of("error")
        self.assertIn("playbook not found", error.error)

    def test_a_routed_call_under_a_relative_playbook_dir(self):
        """The router gives the runner the path it resolved; the runner used to resolve that
        absolute path again as a name and refused it whenever ``playbook_dir`` was relative (the
        default ``./config/playbook``)."""
        from activecall.call.handlers import PlaybookFile, playbook_route

        relative = self.mktemp()  # relative to the test's working directory
        os.makedirs(relative)
        with open(os.path.join(relative, "hi.md"), "w") as f:
            f.write("---\nllm: {provider: echo}\ngreeting: Relative.\n---\nx\n")
        self.cfg = dataclasses.replace(self.cfg, playbook_dir=relative)
        decision = playbook_route(relative, "hi.md", {}, configured=True)
        session = self.make_session()
        self.assertIsNotNone(start_playbook(session, PlaybookFile(decision.path), clock=self.clock))
        session.answered()
        self.assertEqual(self.tts()[0].text, "Relative.")

    def test_refused_names_and_bad_playbooks_end_the_call_with_an_error(self):
        for name in ("../etc/passwd", "/etc/passwd", "missing.md", "---\nllm: [\n---\n"):
            self.events.clear()
            session = self.make_session()
            self.assertIsNone(start_playbook(session, name, clock=self.clock))
            [error] = self.of("error")
            self.assertEqual(error.sender, "playbook")
            self.assertEqual(session.end_reason, "failed")


# -- against a real OpenAI-compatible server ---------------------------------------------------------------


class SSEServer(resource.Resource):
    """POST /v1/chat/completions: records the request body, streams ``replies`` in chunks."""

    isLeaf = True

    def __init__(self, *replies):
        super().__init__()
        self.replies = list(replies)
        self.bodies = []
        self.status = 200

    def render_POST(self, request):
        self.bodies.append(json.loads(request.content.read()))
        if self.status != 200:
            request.setResponseCode(self.status)
            return json.dumps({"error": {"message": "model overloaded"}}).encode()
        request.setHeader(b"content-type", b"text/event-stream")
        text = self.replies.pop(0) if self.replies else "OK."
        for i in range(0, len(text), 7):
            delta = {"choices": [{"index": 0, "delta": {"content": text[i:i + 7]}, "finish_reason": None}]}
            request.write(f"data: {json.dumps(delta)}\n\n".encode())
        request.write(b"data: [DONE]\n\n")
        request.finish()
        return server.NOT_DONE_YET


class RealServerTests(RunnerTestBase):
    @defer.inlineCallbacks
    def serve(self, *replies):
        self.server = SSEServer(*replies)
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server.Site(self.server))
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}/v1"

    def wait_for(self, predicate):
        d = defer.Deferred()

        def check(n=0):
            if predicate():
                d.callback(None)
            elif n > 500:
                d.errback(AssertionError("condition never met"))
            else:
                reactor.callLater(0.01, check, n + 1)

        check()
        return d

    @defer.inlineCallbacks
    def test_transcript_goes_to_the_server_and_the_stream_is_spoken(self):
        base = yield self.serve("Welcome! Ask me anything.", 'Your order ships today. <hangup/>')
        text = PLAYBOOK.replace("http://127.0.0.1:9/v1", base).format(extra="  apiKey: sk-test")
        self.playbook = parse_playbook(text, "real.md", environ={})
        self.session = self.make_session()
        settings = LLMSettings.from_playbook(self.playbook.config.llm, environ={})
        runner = PlaybookRunner(self.session, self.playbook, clock=reactor,
                                llm_client_factory=lambda cfg: LLMClient(settings), http=FakeHttp()).attach()
        self.session.answered()
        yield self.wait_for(lambda: runner.reply is None and self.tts())
        self.assertEqual([t.text for t in self.tts()], ["Welcome!", "Ask me anything."])
        self.assertEqual(self.server.bodies[0]["model"], "test-model")
        self.assertTrue(self.server.bodies[0]["stream"])
        self.user("Where is my order?")
        yield self.wait_for(lambda: runner.reply is None and len(self.tts()) > 2)
        body = self.server.bodies[1]
        self.assertEqual(body["messages"][-1], {"role": "user", "content": "Where is my order?"})
        self.assertEqual(body["messages"][-2], {"role": "assistant", "content": "Welcome! Ask me anything."})
        self.assertEqual(self.sent()[-2:], [("tts", "Your order ships today.", "llm-2", False, False),
                                            ("tts", "", "llm-2", True, True)])
        assistant = [e.text for e in self.of("addHistory") if e.speaker == "assistant"]
        self.assertEqual(assistant, ["Welcome! Ask me anything.", "Your order ships today."])

    @defer.inlineCallbacks
    def test_server_error_becomes_the_fallback_line(self):
        base = yield self.serve()
        self.server.status = 503
        text = PLAYBOOK.replace("http://127.0.0.1:9/v1", base).format(extra="")
        self.playbook = parse_playbook(text, "real.md", environ={})
        self.session = self.make_session()
        runner = PlaybookRunner(self.session, self.playbook, clock=reactor,
                                llm_client_factory=lambda cfg: LLMClient(LLMSettings.from_playbook(cfg, {})),
                                http=FakeHttp()).attach()
        self.session.answered()
        yield self.wait_for(lambda: self.tts())
        self.assertEqual(self.tts()[0].text, self.playbook.config.llm.fallback)
        [error] = self.of("error")
        self.assertEqual((error.sender, error.code), ("llm", 503))
        self.assertIn("model overloaded", error.error)
        self.assertIsNone(runner.reply)


class PreemptiveTests(RunnerTestBase):
    """A reply asked on a partial that stopped changing (llm.preemptive, docs/playbooks.md): used when the
    final says the same words, cancelled and asked again when it does not; nothing spoken before the final."""

    def delta(self, text):
        self.session.emit(ev.AsrDelta(trackId="s1", timestamp=self.session.now(), index=0, text=text))

    def start(self, extra="  preemptive: true"):
        self.begin(None, extra=extra, greeting="Hi.")
        self.session.metrics = Metrics()
        self.play_out()

    def count(self, outcome):
        return self.session.metrics.llm_preemptive.labels(outcome=outcome)._value.get()

    def test_final_matching_the_partial_uses_the_preemptive_answer(self):
        self.start()
        self.delta("what time do you open")
        self.clock.advance(0.2)
        self.assertEqual(len(self.llm.calls), 1)
        self.assertEqual(self.llm.calls[0].messages[-1], {"role": "user", "content": "what time do you open"})
        self.llm.calls[0].send("We open at nine. ", "See you")
        self.assertEqual(self.tts()[1:], [])  # nothing spoken before the turn is confirmed
        self.user("What time do you open?")
        self.assertEqual(len(self.llm.calls), 1)
        self.assertEqual([c.text for c in self.tts()[1:]], ["We open at nine."])
        self.llm.calls[0].send(" then.")
        self.llm.calls[0].end()
        self.assertEqual([c.text for c in self.tts()[1:]], ["We open at nine.", "See you then."])
        self.assertFalse(self.llm.calls[0].cancelled)
        self.assertEqual(self.count("hit"), 1)
        self.assertEqual(self.history()[-2:], [("user", "What time do you open?"),
                                               ("assistant", "We open at nine. See you then.")])

    def test_mismatch_cancels_and_asks_again(self):
        self.start()
        self.delta("what time do you")
        self.clock.advance(0.2)
        self.assertEqual(len(self.llm.calls), 1)
        self.llm.calls[0].send("Wrong answer. ")
        self.user("what time do you close")
        self.assertTrue(self.llm.calls[0].cancelled)
        self.assertEqual(len(self.llm.calls), 2)
        self.assertEqual(self.llm.calls[1].messages[-1], {"role": "user", "content": "what time do you close"})
        self.llm.calls[1].reply("We close at six.")
        self.assertEqual([c.text for c in self.tts()[1:]], ["We close at six."])
        self.assertEqual(self.count("miss"), 1)
        self.assertEqual(self.count("hit"), 0)

    def test_a_changed_partial_cancels_the_request(self):
        self.start()
        self.delta("what time")
        self.clock.advance(0.2)
        self.delta("what time do you close")
        self.assertTrue(self.llm.calls[0].cancelled)
        self.assertEqual(self.count("cancelled"), 1)
        self.clock.advance(0.2)
        self.user("what time do you close")
        self.assertEqual(len(self.llm.calls), 2)
        self.assertEqual(self.count("hit"), 1)

    def test_a_partial_after_the_vads_speech_end_starts_at_once(self):
        """The recogniser decodes the words so far when the caller pauses: that partial, arriving while the
        VAD says silence, needs no stable window; partials while the VAD hears speech start nothing."""
        self.start()
        self.session.emit(ev.Speaking(trackId="s1", timestamp=self.session.now(), startTime=0))
        self.delta("what time")
        self.assertEqual(self.llm.calls, [])
        self.session.emit(ev.Silence(trackId="s1", timestamp=self.session.now(), startTime=0, duration=900))
        self.delta("what time do you open")
        self.assertEqual(len(self.llm.calls), 1)  # no clock advance needed
        self.assertEqual(self.llm.calls[0].messages[-1], {"role": "user", "content": "what time do you open"})
        self.session.emit(ev.Speaking(trackId="s1", timestamp=self.session.now(), startTime=1000))
        self.delta("what time do you open on sunday")
        self.assertTrue(self.llm.calls[0].cancelled)
        self.clock.advance(1)
        self.assertEqual(len(self.llm.calls), 1)  # while the VAD hears speech, no request on a partial
        self.session.emit(ev.Silence(trackId="s1", timestamp=self.session.now(), startTime=1000, duration=900))
        self.delta("what time do you open on sunday please")
        self.assertEqual(len(self.llm.calls), 2)

    def test_the_next_utterances_first_words_wait_for_the_vads_silence(self):
        """After a turn the recogniser's first partial of the next utterance can come before the VAD's
        ``speaking``: it is not the words up to a pause (no request, none wasted)."""
        self.start()
        self.session.emit(ev.Speaking(trackId="s1", timestamp=self.session.now(), startTime=0))
        self.session.emit(ev.Silence(trackId="s1", timestamp=self.session.now(), startTime=0, duration=900))
        self.delta("what time do you open")
        self.assertEqual(len(self.llm.calls), 1)
        self.user("what time do you open")
        self.llm.calls[0].reply("At nine.")
        self.play_out()
        self.delta("and")  # the next utterance, before its speaking event
        self.clock.advance(1)
        self.assertEqual(len(self.llm.calls), 1)
        self.assertEqual(self.count("cancelled"), 0)
        self.session.emit(ev.Speaking(trackId="s1", timestamp=self.session.now(), startTime=2000))
        self.session.emit(ev.Silence(trackId="s1", timestamp=self.session.now(), startTime=2000, duration=700))
        self.delta("and on sunday")
        self.assertEqual(len(self.llm.calls), 2)

    def test_a_partial_still_changing_starts_nothing(self):
        self.start()
        self.delta("what")
        self.clock.advance(0.1)
        self.delta("what time")
        self.clock.advance(0.1)
        self.assertEqual(self.llm.calls, [])

    def test_on_by_default_off_when_set_off(self):
        for extra, calls in (("", 1), ("  preemptive: false", 0)):
            self.start(extra=extra)
            self.delta("what time do you open")
            self.clock.advance(1)
            self.assertEqual(len(self.llm.calls), calls, extra)

    def test_off(self):
        self.start(extra="  preemptive: false")
        self.delta("what time do you open")
        self.clock.advance(1)
        self.assertEqual(self.llm.calls, [])
        self.user("what time do you open")
        self.assertEqual(len(self.llm.calls), 1)


class SpeculativeSpeechTests(RunnerTestBase):
    """A preemptive reply's first sentence is synthesised while the turn is judged (llm.preemptiveTts,
    docs/playbooks.md): held, never sent, until the final confirms the words; then its buffered audio is
    the reply's start (no second synthesis).  Dropped, cancelled and counted as wasted otherwise."""

    def delta(self, text):
        self.session.emit(ev.AsrDelta(trackId="s1", timestamp=self.session.now(), index=0, text=text))

    def start(self, extra="  preemptive: true", hold=False):
        self.synth = FakeSynth(hold=hold)
        self.begin(None, extra=extra, greeting="Hi.")
        self.session.metrics = Metrics()
        if hold:  # the greeting's synthesis
            d, sink = self.synth.pending.pop(0)
            sink(np.full(3 * 320, 1000, dtype=np.int16))
            d.callback(None)
        self.play_out()
        self.synth.texts.clear()
        self.events.clear()

    def speech_count(self, outcome):
        return self.session.metrics.speculative_speech.labels(outcome=outcome)._value.get()

    def llm_count(self, outcome):
        return self.session.metrics.llm_preemptive.labels(outcome=outcome)._value.get()

    def track_starts(self):
        return [e.playId for e in self.of("trackStart")]

    def frames(self, n):
        out = []
        for _ in range(n):
            self.clock.advance(0.02)
            out.append(self.session.tick())
        return out

    def speculate(self, partial="what time do you open", answer=("We open at nine. ", "See you")):
        self.delta(partial)
        self.clock.advance(0.2)
        self.assertEqual(len(self.llm.calls), 1)
        self.llm.calls[0].send(*answer)

    def test_confirmed_turn_plays_the_buffered_audio_on_the_next_tick(self):
        self.start()
        self.speculate()
        # synthesised ahead, but nothing plays and nothing is said
        self.assertEqual(self.synth.texts, ["We open at nine."])
        self.assertEqual(self.tts()[1:], [])
        self.assertEqual(self.track_starts(), [])
        self.assertIsNone(self.session.playback.current)
        self.assertEqual(self.frames(3), [None, None, None])
        self.assertEqual(self.history()[-1:], [("assistant", "Hi.")])
        self.user("What time do you open?")
        self.assertEqual(self.track_starts(), ["llm-1"])
        first = self.frames(1)[0]
        self.assertIsNotNone(first)
        self.assertTrue((first == 1000).all())  # the prepared audio, from the very next tick
        self.assertEqual(self.synth.texts, ["We open at nine."])  # not synthesised twice
        self.assertEqual(self.speech_count("played"), 1)
        self.assertEqual(self.speech_count("wasted"), 0)
        self.assertEqual(self.llm_count("hit"), 1)
        outcomes = [e.data["outcome"] for e in self.of("metrics") if e.key == "preemptive.tts"]
        self.assertEqual(outcomes, ["played"])
        self.llm.calls[0].send(" then.")
        self.llm.calls[0].end()
        self.assertEqual(self.synth.texts, ["We open at nine.", "See you then."])
        self.play_out()
        self.assertEqual(self.history()[-2:], [("user", "What time do you open?"),
                                               ("assistant", "We open at nine. See you then.")])

    def test_synthesis_still_running_at_the_confirmation_feeds_the_playing_track(self):
        self.start(hold=True)
        self.speculate()
        self.assertEqual(len(self.synth.pending), 1)
        self.user("what time do you open")
        self.assertEqual(self.track_starts(), ["llm-1"])
        self.assertEqual(self.synth.texts, ["We open at nine."])
        self.assertEqual(self.frames(1), [None])  # nothing synthesised yet
        d, sink = self.synth.pending.pop(0)
        sink(np.full(2 * 320, 700, dtype=np.int16))
        d.callback(None)
        self.assertTrue((self.frames(1)[0] == 700).all())
        self.assertEqual(self.speech_count("played"), 1)
        self.llm.calls[0].reply(" then.")
        self.assertEqual(self.synth.texts, ["We open at nine.", "See you then."])  # the next sentence follows

    def test_the_caller_going_on_drops_everything(self):
        self.start(hold=True)
        self.speculate()
        self.assertEqual(self.synth.texts, ["We open at nine."])
        self.delta("what time do you open on sunday")  # the caller resumed: other words
        self.assertTrue(self.llm.calls[0].cancelled)
        self.assertEqual(self.synth.cancelled, ["We open at nine."])  # the TTS is cancelled
        self.assertEqual(self.speech_count("wasted"), 1)
        self.assertEqual(self.llm_count("cancelled"), 1)
        self.assertIsNone(self.session.playback.prepared)
        self.assertEqual(self.frames(3), [None, None, None])
        self.assertEqual(self.track_starts(), [])
        self.assertEqual(self.tts()[1:], [])
        self.assertEqual(self.history(), [("assistant", "Hi.")])

    def test_a_final_that_differs_drops_the_audio_and_asks_again(self):
        self.start(hold=True)
        self.speculate()
        self.user("what time do you close")
        self.assertTrue(self.llm.calls[0].cancelled)
        self.assertEqual(self.synth.cancelled, ["We open at nine."])
        self.assertEqual(self.speech_count("wasted"), 1)
        self.assertEqual(self.speech_count("played"), 0)
        self.assertEqual(self.llm_count("miss"), 1)
        self.assertEqual(self.llm.calls[1].messages[-1], {"role": "user", "content": "what time do you close"})
        self.llm.calls[1].reply("We close at six.")
        self.assertEqual([c.text for c in self.tts()[1:]], ["We close at six."])
        self.assertEqual(self.synth.texts, ["We open at nine.", "We close at six."])
        d, sink = self.synth.pending.pop(-1)  # only the confirmed reply's synthesis is heard
        sink(np.full(2 * 320, 500, dtype=np.int16))
        d.callback(None)
        frames = [f for f in self.frames(5) if f is not None]
        self.assertTrue(frames and all((f == 500).all() or not f.any() for f in frames))
        self.assertNotIn(("assistant", "We open at nine."), self.history())
        self.assertEqual(self.history()[-2:], [("user", "what time do you close"),
                                               ("assistant", "We close at six.")])

    def test_a_hangup_of_the_call_cancels_the_prepared_speech(self):
        self.start(hold=True)
        self.speculate()
        self.session.end("caller", initiator="caller")
        self.assertTrue(self.runner.stopped)
        self.assertEqual(self.synth.cancelled, ["We open at nine."])
        self.assertEqual(self.speech_count("wasted"), 1)

    def test_a_one_sentence_reply_finished_before_the_final_is_prepared_too(self):
        self.start()
        self.delta("are you open")
        self.clock.advance(0.2)
        self.llm.calls[0].reply("Yes.")
        self.assertEqual(self.synth.texts, ["Yes."])
        self.assertEqual(self.track_starts(), [])
        self.user("Are you open?")
        self.assertEqual(self.track_starts(), ["llm-1"])
        self.assertEqual(self.synth.texts, ["Yes."])
        self.assertEqual(self.speech_count("played"), 1)
        self.assertEqual([(c.text, c.endOfStream) for c in self.tts()[1:]], [("Yes.", True)])

    def test_a_reply_starting_with_a_tag_is_not_spoken_ahead(self):
        self.start()
        self.speculate(answer=('<set_var key="x" value="1"/>We open at nine. ',))
        self.assertEqual(self.synth.texts, [])
        self.user("what time do you open")
        self.assertEqual(self.synth.texts, ["We open at nine."])
        self.assertEqual(self.speech_count("played") + self.speech_count("wasted"), 0)

    def test_preemptive_tts_off_synthesises_only_after_the_final(self):
        self.start(extra="  preemptive: true\n  preemptiveTts: false")
        self.speculate()
        self.assertEqual(self.synth.texts, [])
        self.user("what time do you open")
        self.assertEqual(self.synth.texts, ["We open at nine."])
        self.assertEqual(self.llm_count("hit"), 1)


class PauseThenDecideTests(RunnerTestBase):
    """The playbook's side of barge-in (call/barge_in.py pauses; words decide here)."""

    def speaking(self):
        self.session.emit(ev.Speaking(trackId="s1", timestamp=self.session.now(), startTime=0))

    def delta(self, text):
        self.session.emit(ev.AsrDelta(trackId="s1", timestamp=self.session.now(), index=0, text=text))

    def start_speaking(self, extra=""):
        self.begin(None, None, extra=extra)
        self.llm.calls[0].send("This is a long answer. ", "It goes on and on. ")
        self.tick(1)
        self.clock.advance(1)

    def test_voice_alone_no_longer_stops_words_do(self):
        self.start_speaking()
        self.assertTrue(self.session.barge_in.policy.pauses)
        self.assertFalse(self.session.barge_in.decides)
        self.speaking()
        self.assertNotIn(("interrupt",), self.sent())
        self.delta("hold on")
        self.assertEqual(self.sent()[-1], ("interrupt",))

    def test_min_words_and_backchannel(self):
        self.start_speaking(extra="interruption: {strategy: both, minWords: 2, backchannel: true}")
        self.delta("Stop")
        self.delta("uh-huh yeah")
        self.session.emit(ev.AsrFinal(trackId="s1", timestamp=self.session.now(), index=0, text="mhm"))
        self.assertNotIn(("interrupt",), self.sent())
        self.assertEqual(len(self.llm.calls), 1)  # the backchannel final started no new turn
        self.delta("stop talking")
        self.assertEqual(self.sent()[-1], ("interrupt",))

    def test_the_bots_own_words_do_not_stop_it(self):
        """Words the recogniser made of the bot's echo (what it is saying, mangled) are not the caller's:
        no interrupt, no new turn; the caller's own words still stop it."""
        self.start_speaking()
        self.assertIn("answer.", self.session.playback.current.words_around())
        self.delta("a long answer")
        self.delta("it goes on")
        self.session.emit(ev.AsrFinal(trackId="s1", timestamp=self.session.now(), index=0, text="long answers"))
        self.assertNotIn(("interrupt",), self.sent())
        self.assertEqual(len(self.llm.calls), 1)
        self.delta("hold on please")
        self.assertEqual(self.sent()[-1], ("interrupt",))

    def test_words_without_a_voice_do_not_stop_it(self):
        """With a VAD on the call, words the recogniser made of a sound the VAD never took for a voice (a
        cough, a knock, a trace of echo) neither stop the bot nor start a turn; after the VAD's speech start
        the same words do, and a final soon after the VAD's silence is the caller's turn."""
        self.start_speaking()
        self.session.processors = mock.Mock(vad=object())
        self.delta("hold on")
        self.session.emit(ev.AsrFinal(trackId="s1", timestamp=self.session.now(), index=0, text="hold on"))
        self.assertNotIn(("interrupt",), self.sent())
        self.assertEqual(len(self.llm.calls), 1)
        self.speaking()
        self.delta("hold on")
        self.assertEqual(self.sent()[-1], ("interrupt",))

    def test_a_final_soon_after_the_voice_is_a_turn(self):
        self.start_speaking()
        self.session.processors = mock.Mock(vad=object())
        self.speaking()
        self.session.emit(ev.Silence(trackId="s1", timestamp=self.session.now(), startTime=0, duration=800))
        self.clock.advance(1.0)
        self.session.emit(ev.AsrFinal(trackId="s1", timestamp=self.session.now(), index=0, text="what about today"))
        self.assertEqual(len(self.llm.calls), 2)


class WaitFillerTests(RunnerTestBase):
    def test_slow_first_token_gets_one_filler(self):
        self.begin(None, None, None, extra="waitFiller: {afterMs: 700, phrases: [One moment., Let me see.]}")
        self.clock.advance(0.69)
        self.assertEqual(self.tts(), [])
        self.clock.advance(0.02)
        self.assertEqual([c.text for c in self.tts()], ["One moment."])
        self.clock.advance(5)
        self.assertEqual(len(self.tts()), 1)  # once per wait
        filler_play_id = self.tts()[0].playId
        # the caller speaks before the model answered: the next slow reply gets no second filler in a row
        self.session.emit(ev.AsrFinal(trackId="s1", timestamp=self.session.now(), index=0, text="hello"))
        self.clock.advance(2)
        self.assertEqual([c.text for c in self.tts()], ["One moment."])
        # the model answers: its words go out, and the next slow wait may have a filler again
        self.llm.calls[-1].reply("Here you are.")
        self.assertEqual(self.tts()[-1].text, "Here you are.")
        self.assertNotEqual(self.tts()[-1].playId, filler_play_id)
        self.session.emit(ev.AsrFinal(trackId="s1", timestamp=self.session.now(), index=1, text="thanks"))
        self.clock.advance(0.8)
        self.assertEqual(self.tts()[-1].text, "Let me see.")
        self.assertTrue(any(e.key == "wait_filler" for e in self.events if isinstance(e, ev.Metrics)))

    def test_fast_reply_no_filler(self):
        self.begin(None, ["Hi."], extra="waitFiller: {afterMs: 700}")
        self.clock.advance(2)
        self.assertEqual([c.text for c in self.tts()], ["Hi."])
