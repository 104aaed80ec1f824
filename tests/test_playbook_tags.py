"""LLM reply stream parser: sentences, tags split anywhere, malformed tags dropped, JSON mode, fillers."""

import os

from twisted.trial import unittest

from activecall.playbook import tags as t
from activecall.playbook.tags import Collect, Goto, Hangup, Http, Play, Refer, Sentence, SetVar


def run(chunks, **kw):
    parser = t.ReplyParser(**kw)
    events = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return events + parser.finish()


def every_split(text, **kw):
    """The events for ``text`` fed in two pieces at every possible point, and one character at a time."""
    results = {tuple(run([text[:i], text[i:]], **kw)) for i in range(len(text) + 1)}
    results.add(tuple(run(list(text), **kw)))
    return results


class SentenceTests(unittest.TestCase):
    def test_two_sentences(self):
        self.assertEqual(
            run(["Hello! How can I ", "help you today?"]),
            [Sentence("Hello!"), Sentence("How can I help you today?")],
        )

    def test_sentences_emitted_as_soon_as_certain(self):
        parser = t.ReplyParser()
        self.assertEqual(parser.feed("Hi there."), [])  # "3.5"? wait for the next character
        self.assertEqual(parser.feed(" Next"), [Sentence("Hi there.")])
        self.assertEqual(parser.feed("。下一句"), [Sentence("Next。")])
        self.assertEqual(parser.finish(), [Sentence("下一句")])

    def test_cjk_and_newline(self):
        self.assertEqual(
            run(["你好！请问有什么", "可以帮您？好的。line one\nline two"]),
            [Sentence("你好！"), Sentence("请问有什么可以帮您？"), Sentence("好的。"), Sentence("line one"), Sentence("line two")],
        )

    def test_decimals_and_commas_do_not_split(self):
        self.assertEqual(run(["It costs 3.5 dollars, or 4; ok"]), [Sentence("It costs 3.5 dollars, or 4; ok")])

    def test_punctuation_runs(self):
        self.assertEqual(run(["Really?! Yes... sure"]), [Sentence("Really?!"), Sentence("Yes..."), Sentence("sure")])

    def test_minimum_length_joins_short_pieces(self):
        self.assertEqual(run(["1. Press one. 2. Press two."]), [Sentence("1. Press one."), Sentence("2. Press two.")])
        self.assertEqual(run(["Hi. Welcome back."], min_sentence_chars=10), [Sentence("Hi. Welcome back.")])

    def test_whitespace_only_dropped(self):
        self.assertEqual(run(["  \n\n  ", " "]), [])

    def test_split_anywhere_same_result(self):
        self.assertEqual(every_split("Hello! How are you? 好的。Bye"), {(Sentence("Hello!"), Sentence("How are you?"), Sentence("好的。"), Sentence("Bye"))})


class TagTests(unittest.TestCase):
    def test_reference_sequence(self):
        text = 'Hello! <refer to="sip:123"/> How are you? <hangup/>'
        expected = (Sentence("Hello!"), Refer("sip:123"), Sentence("How are you?"), Hangup())
        self.assertEqual(every_split(text), {expected})

    def test_text_before_tag_flushed_first(self):
        self.assertEqual(run(["Let me check <goto scene=\"billing\"/>now"]), [Sentence("Let me check"), Goto("billing"), Sentence("now")])

    def test_all_tags(self):
        text = (
            '<play file="ding.wav"/><goto scene="x"/><set_var key="name" value=\'Zoe "Z"\'/>'
            '<http url="http://h/q?a=1&amp;b=2" method="post" body=\'{"id": "7>6"}\' set_var="result" timeout="2"/>'
            '<collect type="pin" var="pin" prompt="Enter your PIN."/><hangup />'
        )
        expected = (
            Play("ding.wav"),
            Goto("x"),
            SetVar("name", 'Zoe "Z"'),
            Http("http://h/q?a=1&b=2", "POST", '{"id": "7>6"}', "result", 2.0),
            Collect("pin", "pin", "Enter your PIN."),
            Hangup(),
        )
        self.assertEqual(every_split(text), {expected})

    def test_attribute_order_and_quotes_free(self):
        self.assertEqual(run(["<http method='PUT' body=\"x\" url='http://h'/>"]), [Http("http://h", "PUT", "x")])
        self.assertEqual(run(["<set_var value=\"v\" key='k'></set_var>"]), [SetVar("k", "v")])
        self.assertEqual(run(["<http url=\"http://h\" method=\"BREW\"/>"]), [Http("http://h", "GET")])

    def test_malformed_tags_dropped_never_spoken(self):
        for bad in (
            "<refer to=sip:123/>",
            "<refer/>",
            "<goto scene=\"\"/>",
            "<set_var key=\"k\"/>",
            "<http method=\"POST\"/>",
            "<collect type=\"pin\"/>",
            "<http url=\"h\" timeout=\"soon\"/>",
            "<dance move=\"x\"/>",
            "<b>",
            "</hangup>",
        ):
            events = run([f"Before. {bad} After."])
            self.assertEqual(events, [Sentence("Before."), Sentence("After.")], bad)
            self.assertFalse([e for e in events if "<" in getattr(e, "text", "")], bad)

    def test_unterminated_known_tag_dropped_at_end(self):
        self.assertEqual(run(["Bye now. <hang"]), [Sentence("Bye now.")])
        self.assertEqual(run(['Bye now. <hangup reason="x']), [Sentence("Bye now.")])

    def test_less_than_in_text_is_text(self):
        self.assertEqual(run(["If 3 < 5 then yes. x <3"]), [Sentence("If 3 < 5 then yes."), Sentence("x <3")])
        self.assertEqual(run(["a <"]), [Sentence("a <")])

    def test_long_unknown_markup_becomes_text(self):
        text = "x<y " + "long text " * 10
        self.assertEqual(run([text], max_tag_chars=20), [Sentence(text.strip())])

    def test_period_inside_tag_is_not_a_sentence_end(self):
        self.assertEqual(every_split('Go. <play file="a. b.wav"/>'), {(Sentence("Go."), Play("a. b.wav"))})


class JsonModeTests(unittest.TestCase):
    def test_json_command(self):
        reply = '{"text": "Goodbye.", "waitInputTimeout": 5000, "tools": [{"name": "hangup", "reason": "done"}]}'
        events = run([reply[:7], reply[7:]])
        self.assertEqual(events, [t.JsonCommand("Goodbye.", 5000, (t.HangupTool("done", None),))])

    def test_fenced_and_all_tools(self):
        reply = (
            '  ```json\n{"tools": ['
            '{"name": "refer", "caller": "sip:a", "callee": "sip:b", "options": {"moh": "m.wav"}},'
            '{"name": "rag", "query": "q", "source": "kb"},'
            '{"name": "http", "url": "http://h", "method": "post", "body": {"a": 1}, "headers": {"X": 1}},'
            '{"name": "accept", "options": {"asr": {}}}, {"name": "reject", "code": 486},'
            '{"name": "refer"}, {"name": "fly"}, "junk"]}\n```'
        )
        command = run([reply])[0]
        self.assertIsNone(command.text)
        self.assertEqual(
            command.tools,
            (
                t.ReferTool("sip:b", "sip:a", {"moh": "m.wav"}),
                t.RagTool("q", "kb"),
                t.HttpTool("http://h", "POST", {"a": 1}, {"X": "1"}),
                t.AcceptTool({"asr": {}}),
                t.RejectTool("Rejected by agent", 486),
            ),
        )

    def test_not_json_is_spoken(self):
        self.assertEqual(run(["{oops} Sorry. <hangup/>"]), [Sentence("{oops} Sorry."), Hangup()])
        self.assertIsNone(t.parse_json_command("[1, 2]"))

    def test_mode_decided_by_first_non_blank(self):
        parser = t.ReplyParser()
        self.assertEqual(parser.feed("  \n"), [])
        self.assertIsNone(parser.mode)
        self.assertEqual(parser.feed(" Hi. Yes"), [Sentence("Hi.")])
        self.assertEqual(parser.mode, "xml")


class FillerTests(unittest.TestCase):
    def test_fillers(self):
        for text in ("uh", " Um. ", "嗯", "嗯嗯", "那个...", "uh, um", ""):
            self.assertTrue(t.is_filler(text), text)
        for text in ("Wait", "umbrella", "嗯，我想问", "no"):
            self.assertFalse(t.is_filler(text), text)

    def test_load_fillers(self):
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write("# my fillers\nerm\n\nhmm\n")
        fillers = t.load_fillers(path)
        self.assertEqual(fillers, ("erm", "hmm"))
        self.assertTrue(t.is_filler("Hmm", fillers))
        self.assertFalse(t.is_filler("uh", fillers))
        self.assertEqual(t.load_fillers(os.path.join(path, "missing")), t.DEFAULT_FILLERS)


class FirstClauseTests(unittest.TestCase):
    """With ``first_clause_chars`` the reply's first sentence ends at its first long-enough clause."""

    def test_first_clause_goes_alone(self):
        self.assertEqual(run(["Sure thing Alice, one moment. Then, later, more."], first_clause_chars=12),
                         [Sentence("Sure thing Alice,"), Sentence("one moment."), Sentence("Then, later, more.")])

    def test_short_clause_waits_for_the_next(self):
        self.assertEqual(run(["Yes, Alice and Bruno, one moment."], first_clause_chars=12),
                         [Sentence("Yes, Alice and Bruno,"), Sentence("one moment.")])

    def test_numbers_do_not_split(self):
        self.assertEqual(run(["It costs 1,000 dollars today."], first_clause_chars=5),
                         [Sentence("It costs 1,000 dollars today.")])

    def test_cjk_clause(self):
        self.assertEqual(run(["好的，我来帮您查一下订单。"], first_clause_chars=2),
                         [Sentence("好的，"), Sentence("我来帮您查一下订单。")])

    def test_split_anywhere_same_result(self):
        self.assertEqual(every_split("Sure thing Alice, one moment. Then, x.", first_clause_chars=12),
                         {(Sentence("Sure thing Alice,"), Sentence("one moment."), Sentence("Then, x."))})

    def test_off_by_default(self):
        self.assertEqual(run(["Sure thing Alice, one moment."]), [Sentence("Sure thing Alice, one moment.")])
