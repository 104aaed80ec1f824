"""The example playbooks in etc/playbook/ do what their comments say, through the runner on a real
CallSession with task.Clock (the LLM's tag-writing part is scripted, as in test_playbook_runner)."""

import json
import os

from activecall.playbook.echo import EchoLLM
from activecall.playbook.parser import load_playbook
from activecall.playbook.runner import default_llm_client_factory
from tests.helpers import ROOT
from tests.test_playbook_runner import FakeHttp, ReferConnector, RunnerTestBase

EXAMPLES = os.path.join(ROOT, "etc", "playbook")


def example(name: str) -> str:
    with open(os.path.join(EXAMPLES, name)) as f:
        return f.read()


class OfflineTests(RunnerTestBase):
    def test_every_example_runs_offline_on_a_fresh_install(self):
        for name in ("hello.md", "ivr.md", "collector.md", "webhook.md"):
            book = load_playbook(os.path.join(EXAMPLES, name), environ={})
            self.assertEqual(book.warnings, (), name)
            self.assertIsInstance(default_llm_client_factory()(book.config.llm), EchoLLM, name)
            self.assertEqual((book.config.asr.provider, book.config.tts.provider), ("pocketsphinx", "flite"), name)

    def test_hello_greets_and_echoes(self):
        self.begin(example("hello.md"))
        self.runner.llm = EchoLLM()
        self.assertEqual(self.sent(), [("tts", "Hello! How can I help you today?", "greeting", True, False)])
        self.play_out()
        self.user("what time is it")
        self.assertEqual(self.runner.history[-1]["content"],
                         "You said: what time is it. Press 1 to hear the menu again, or 0 to hang up.")
        self.play_out()
        self.user("goodbye")
        self.play_out()
        self.assertEqual(self.session.end_reason, "autohangup")


class IvrTests(RunnerTestBase):
    def ivr(self, *script, connector=None):
        self.begin(example("ivr.md"), *script, connector=connector)
        self.assertEqual(self.runner.scene_id, "main")
        self.assertTrue(self.tts()[0].text.startswith("Welcome to Example Corp."))
        self.play_out()

    def system(self):
        return self.runner.history[0]["content"]

    def test_digits_move_between_scenes_and_each_move_is_a_turn(self):
        self.ivr("You reached sales.", "Main menu again.", "You reached support.")
        self.digit("1")
        self.assertEqual(self.runner.scene_id, "sales")
        self.assertIn("You are the sales desk.", self.llm.calls[-1].messages[0]["content"])
        self.assertTrue(self.system().startswith("You are the phone menu of Example Corp."))  # the shared preamble
        self.assertEqual(self.sent()[-1], ("tts", "You reached sales.", "llm-1", True, False))
        self.play_out()
        self.digit("2")  # not a key in sales: nothing happens
        self.assertEqual((self.runner.scene_id, len(self.llm.calls)), ("sales", 1))
        self.digit("*")
        self.assertEqual(self.runner.scene_id, "main")
        self.play_out()
        self.digit("2")
        self.assertEqual(self.runner.scene_id, "support")
        self.assertIn("You are technical support.", self.llm.calls[-1].messages[0]["content"])
        self.assertEqual(len(self.llm.calls), 3)

    def test_zero_transfers_to_the_operator_from_any_scene(self):
        connector = ReferConnector()
        self.ivr("Sales.", connector=connector)
        self.digit("1")
        self.play_out()
        self.digit("0")
        self.assertEqual([r.callee for r in connector.refers], ["sip:operator@127.0.0.1"])

    def test_nine_hangs_up(self):
        self.ivr("Support.")
        self.digit("2")
        self.play_out()
        self.digit("9")
        self.assertEqual(self.session.end_reason, "DTMF Hangup")

    def test_the_keypad_works_offline(self):
        self.ivr()
        self.runner.llm = EchoLLM()
        self.digit("2")
        self.assertEqual(self.runner.scene_id, "support")
        self.assertTrue(self.tts()[-1].endOfStream)  # the echo model answered the new turn
        self.play_out()
        self.digit("9")
        self.assertEqual(self.session.end_reason, "DTMF Hangup")


COLLECT = 'Please type it. <collect type="account" var="account" prompt="Type your account number, then press hash."/>'
BAD = "An account number has 6 to 10 digits and does not start with 0. Please type it again, then press hash."


class CollectorExampleTests(RunnerTestBase):
    def start(self, *script):
        self.begin(example("collector.md"), COLLECT, *script)
        self.play_out()  # the model's opening line and the collector's prompt
        self.assertIsNotNone(self.runner.collection)
        self.assertIn("- `account`: the caller's account number, 6 to 10 digits (6-10 digits, press # to finish)",
                      self.runner.history[0]["content"])

    def type(self, keys):
        for key in keys:
            self.digit(key)

    def test_too_short_and_invalid_are_retried_then_accepted(self):
        self.start("You typed 4 8 1 5 1 6 2 3. Goodbye! <hangup/>")
        self.type("123#")  # too short
        self.assertEqual(self.tts()[-1].text, BAD)
        self.play_out()
        self.type("0123456#")  # starts with 0: the pattern refuses it
        self.assertEqual(self.tts()[-1].text, BAD)
        self.assertEqual(self.runner.collection.retries, 2)
        self.play_out()
        self.user("ignored while typing")
        self.type("48151623#")
        self.assertIsNone(self.runner.collection)
        self.assertEqual(self.session.extras["account"], "48151623")
        self.assertIn(("system", "[DTMF collection completed for 'account': 48151623]"), self.history())
        self.assertNotIn(("user", "ignored while typing"), self.history())
        self.play_out()
        self.assertEqual(self.session.end_reason, "autohangup")
        self.assertEqual(self.session.hangup_headers["X-Account"], "48151623")

    def test_retries_run_out(self):
        self.start("Sorry, an agent will call you back. <hangup/>")
        for _ in range(3):
            self.type("1#")
            self.play_out()
        self.assertIsNone(self.runner.collection)
        notes = [c for r, c in self.history() if r == "system"]
        self.assertTrue(notes[-1].startswith("[DTMF collection failed for 'account' after 2 retries"), notes[-1])
        self.assertNotIn("account", self.session.extras)

    def test_inter_digit_timeout_finishes_a_partial_entry(self):
        self.start("Thanks.")
        self.type("7654321")
        self.clock.advance(3.9)
        self.assertIsNotNone(self.runner.collection)
        self.clock.advance(0.1)
        self.assertEqual(self.session.extras["account"], "7654321")

    def test_no_digits_times_out(self):
        self.start("Are you still there?")
        self.clock.advance(15)
        self.assertIsNone(self.runner.collection)
        self.assertIn("[DTMF collection timed out for 'account'", self.history()[-2][1])
        self.assertEqual(len(self.llm.calls), 2)


class WebhookExampleTests(RunnerTestBase):
    def test_lookup_feeds_the_next_turn_and_the_posthook_reports_the_call(self):
        http = FakeHttp((200, b'{"status": "shipped"}'), (200, b"ok"))
        self.begin(example("webhook.md"),
                   'One moment. <http url="http://127.0.0.1:8090/orders/4711" method="GET" '
                   'set_var="order_status" timeout="5"/>',
                   "Your order has shipped. Goodbye! <hangup/>", http=http)
        self.play_out()
        self.user("my order number is 4711")
        self.assertEqual((http.requests[0]["method"], http.requests[0]["url"]),
                         ("GET", "http://127.0.0.1:8090/orders/4711"))
        self.assertEqual(self.session.extras["order_status"], '{"status": "shipped"}')
        self.play_out()
        self.user("is it shipped")
        self.assertIn({"role": "system",
                       "content": 'HTTP GET http://127.0.0.1:8090/orders/4711 returned (200): {"status": "shipped"}'},
                      self.llm.calls[1].messages)
        self.llm.completions = ["The caller asked about order 4711; it has shipped."]
        self.play_out()
        self.assertEqual(self.session.end_reason, "autohangup")
        self.assertTrue(self.runner.done.called)
        hook = http.requests[-1]
        self.assertEqual((hook["method"], hook["url"]), ("POST", "http://127.0.0.1:8090/posthook"))
        self.assertEqual(hook["headers"]["X-Source"], ["activecall"])
        body = json.loads(hook["data"])
        self.assertEqual(set(body), {"sessionId", "summary", "history", "timestamp"})
        self.assertEqual(body["summary"], "The caller asked about order 4711; it has shipped.")
        self.assertIn({"role": "user", "content": "my order number is 4711"}, body["history"])
        self.assertIn("one or two sentences", self.llm.completed[0][-1]["content"])

    def test_offline_the_posthook_carries_the_echo_summary(self):
        http = FakeHttp((200, b"ok"))
        self.begin(example("webhook.md"), http=http)
        self.runner.llm = EchoLLM()
        self.play_out()
        self.user("order one two three")
        self.play_out()
        self.session.end("caller", initiator="caller")
        body = json.loads(http.requests[-1]["data"])
        self.assertEqual(body["summary"], "The caller said: order one two three.")
