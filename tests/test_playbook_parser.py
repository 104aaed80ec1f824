"""Playbook parser: front matter, spellings, ${VAR}, scenes and scene tags, errors that name file/line/key."""

import glob
import os
import textwrap

from twisted.trial import unittest

from activecall.playbook import parser
from activecall.playbook.parser import PlaybookError, parse_playbook

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(text, environ=None, source="t.md"):
    return parse_playbook(textwrap.dedent(text).lstrip("\n"), source, environ or {})


class FrontMatterTests(unittest.TestCase):
    def test_requires_front_matter(self):
        e = self.assertRaises(PlaybookError, parse, "Just a prompt\n")
        self.assertEqual((e.source, e.line), ("t.md", 1))
        self.assertIn("---", str(e))

    def test_unclosed_front_matter(self):
        e = self.assertRaises(PlaybookError, parse, "---\nllm: {}\n")
        self.assertIn("not closed", e.reason)

    def test_body_becomes_default_scene_and_llm_prompt(self):
        pb = parse(
            """
            ---
            llm:
              provider: openai
            ---
            You are helpful.
            ---
            """
        )
        self.assertEqual(list(pb.scenes), ["default"])
        self.assertEqual(pb.initial_scene, "default")
        # a later '---' stays in the body
        self.assertEqual(pb.initial.prompt, "You are helpful.\n---")
        self.assertEqual(pb.config.llm.prompt, pb.initial.prompt)

    def test_llm_prompt_used_when_body_empty(self):
        pb = parse("---\nllm: {prompt: Be brief.}\n---\n")
        self.assertEqual(pb.initial.prompt, "Be brief.")

    def test_camel_and_snake_spellings(self):
        pb = parse(
            """
            ---
            llm:
              base_url: http://x/v1
              api_key: k
              repair_window_ms: 100
              summaryLimit: 4
              temperature: 0.2
              max_tokens: 64
            posthook: {url: http://h, include_history: false}
            interruption: {strategy: vad, ignore_first_ms: 300, fillerWordFilter: true}
            ---
            p
            """
        )
        llm = pb.config.llm
        self.assertEqual((llm.base_url, llm.api_key, llm.repair_window_ms, llm.summary_limit), ("http://x/v1", "k", 100, 4))
        self.assertEqual((llm.temperature, llm.max_tokens), (0.2, 64))
        self.assertFalse(pb.config.posthook.include_history)
        self.assertEqual(pb.config.interruption.strategy, "vad")
        self.assertEqual(pb.config.interruption.ignore_first_ms, 300)
        self.assertTrue(pb.config.interruption.filler_word_filter)

    def test_followup_both_spellings(self):
        documented = parse("---\nfollowup:\n  timeout: 10000\n  max: 2\n---\np\n")
        implemented = parse("---\nfollowUp:\n  timeout: 10000\n  maxCount: 2\n---\np\n")
        self.assertEqual(documented.config.follow_up, parser.FollowUpConfig(10000, 2))
        self.assertEqual(implemented.config.follow_up, documented.config.follow_up)

    def test_followup_given_twice(self):
        e = self.assertRaises(PlaybookError, parse, "---\nfollowup: {timeout: 1, max: 1}\nfollowUp: {timeout: 1, maxCount: 1}\n---\n")
        self.assertEqual((e.key, e.line), ("followUp", 3))
        self.assertIn("given twice", e.reason)

    def test_followup_requires_keys(self):
        e = self.assertRaises(PlaybookError, parse, "---\nllm: {}\nfollowUp:\n  timeout: 5\n---\n")
        self.assertEqual((e.key, e.line), ("followUp.maxCount", 3))

    def test_vad_provider_and_type(self):
        self.assertEqual(parse("---\nvad: {provider: nop}\n---\n").config.vad.type, "nop")
        self.assertEqual(parse("---\nvad: {type: silero}\n---\n").config.vad.type, "silero")

    def test_sip_headers_spellings(self):
        pb = parse(
            """
            ---
            sip:
              extract_headers: [X-A, {name: X-B, pattern: "^\\\\d+$"}]
              hangup_headers:
                X-Result: "{{ result }}"
            ---
            """
        )
        self.assertEqual(pb.config.sip.extract_headers, ("X-A", "X-B"))
        self.assertEqual(dict(pb.config.sip.extract_patterns), {"X-B": "^\\d+$"})
        self.assertEqual(dict(pb.config.sip.hangup_headers), {"X-Result": "{{ result }}"})
        camel = parse("---\nsip:\n  hangupHeaders: {X-R: a}\n  extractHeaders: [X-A]\n---\n")
        self.assertEqual(dict(camel.config.sip.hangup_headers), {"X-R": "a"})
        self.assertEqual(camel.config.sip.extract_headers, ("X-A",))
        documented = parse("---\nsip:\n  bye_headers:\n    - {name: X-R, value: '{{ r }}'}\n---\n")
        self.assertEqual(dict(documented.config.sip.hangup_headers), {"X-R": "{{ r }}"})

    def test_realtime_documented_keys(self):
        pb = parse("---\nrealtime:\n  provider: openai\n  voice: alloy\n  turn_detection: {type: server_vad}\n---\n")
        self.assertEqual(pb.config.realtime.extra["voice"], "alloy")
        self.assertEqual(pb.config.realtime.turn_detection, {"type": "server_vad"})

    def test_greeting_precedence(self):
        self.assertEqual(parse("---\ngreeting: Hi\nllm: {greeting: Yo}\n---\n").greeting, "Hi")
        self.assertEqual(parse("---\nllm: {greeting: Yo}\n---\n").greeting, "Yo")
        self.assertIsNone(parse("---\nllm: {}\n---\n").greeting)

    def test_llm_env_fallbacks_and_defaults(self):
        env = {"OPENAI_API_KEY": "sk-env", "OPENAI_BASE_URL": "http://local/v1", "OPENAI_MODEL": "m"}
        llm = parse("---\nllm: {provider: openai}\nasr: {provider: aliyun}\n---\n", env)
        self.assertEqual((llm.config.llm.api_key, llm.config.llm.base_url, llm.config.llm.model), ("sk-env", "http://local/v1", "m"))
        # llm.apiKey fills the providers' unset secretKey
        self.assertEqual(llm.config.asr.secret_key, "sk-env")
        bare = parse("---\nllm: {provider: openai}\n---\n").config.llm
        self.assertEqual((bare.base_url, bare.model, bare.api_key), (parser.DEFAULT_BASE_URL, parser.DEFAULT_MODEL, None))
        self.assertNotIn("sk-env", repr(llm.config))

    def test_auto_provider(self):
        self.assertEqual(parse("---\nllm: {provider: auto}\n---\n").config.llm.effective_provider, "echo")
        env = {"OPENAI_BASE_URL": "http://127.0.0.1:11434/v1"}
        self.assertEqual(parse("---\nllm: {provider: auto}\n---\n", env).config.llm.effective_provider, "openai")
        self.assertEqual(parse("---\nllm: {provider: echo}\n---\n", env).config.llm.effective_provider, "echo")
        self.assertEqual(parse("---\nllm: {provider: aliyun}\n---\n").config.llm.effective_provider, "openai")

    def test_collectors(self):
        pb = parse(
            """
            ---
            dtmfCollectors:
              pin:
                description: four digit PIN
                digits: 4
                validation: {pattern: "^\\\\d{4}$", errorMessage: Wrong PIN}
              phone:
                minDigits: 7
                maxDigits: 11
                finishKey: "#"
            ---
            """
        )
        pin, phone = pb.config.dtmf_collectors["pin"], pb.config.dtmf_collectors["phone"]
        self.assertEqual((pin.minimum, pin.maximum, pin.timeout, pin.retry_times), (4, 4, 15, 3))
        self.assertEqual(pin.validation.error_message, "Wrong PIN")
        self.assertEqual((phone.minimum, phone.maximum, phone.finish_key), (7, 11, "#"))

    def test_collector_bad_regex_names_line(self):
        e = self.assertRaises(PlaybookError, parse, "---\ndtmfCollectors:\n  pin:\n    validation:\n      pattern: '('\n---\n")
        self.assertEqual((e.key, e.line), ("dtmfCollectors.pin.validation.pattern", 5))

    def test_wrong_type_names_key_and_line(self):
        e = self.assertRaises(PlaybookError, parse, "---\nllm:\n  provider: openai\n  summaryLimit: lots\n---\n")
        self.assertEqual((e.source, e.line, e.key), ("t.md", 4, "llm.summaryLimit"))
        self.assertIn("integer", str(e))
        self.assertTrue(str(e).startswith("t.md:4: key 'llm.summaryLimit'"))

    def test_bad_strategy(self):
        e = self.assertRaises(PlaybookError, parse, "---\ninterruption: {strategy: sometimes}\n---\n")
        self.assertEqual(e.key, "interruption.strategy")

    def test_invalid_yaml_names_line(self):
        e = self.assertRaises(PlaybookError, parse, "---\nllm:\n  model: [unclosed\ngreeting: x\n---\n")
        self.assertIsNotNone(e.line)
        self.assertIn("invalid YAML", e.reason)

    def test_unknown_key_near_miss_is_error(self):
        e = self.assertRaises(PlaybookError, parse, "---\nllm: {}\nfolowUp: {timeout: 1, maxCount: 1}\n---\n")
        self.assertEqual((e.key, e.line), ("folowUp", 3))
        self.assertIn("did you mean 'followUp'", e.reason)
        e = self.assertRaises(PlaybookError, parse, "---\nllm:\n  modle: x\n---\n")
        self.assertIn("did you mean 'model'", e.reason)

    def test_unknown_key_otherwise_warning(self):
        pb = parse("---\ndescription: my notes\nllm: {}\n---\n")
        self.assertEqual(len(pb.warnings), 1)
        self.assertIn("description", pb.warnings[0])
        self.assertIn("t.md:2", pb.warnings[0])

    def test_unknown_feature(self):
        e = self.assertRaises(PlaybookError, parse, "---\nllm: {features: [http_tools]}\n---\n")
        self.assertIn("http_tool", e.reason)


class EnvTests(unittest.TestCase):
    def test_expand_in_every_field_including_numbers(self):
        pb = parse(
            "---\ntts:\n  provider: ${TTS}\n  speed: ${SPEED}\nllm:\n  model: \"${MODEL}\"\n---\n${NOT_IN_BODY}\n",
            {"TTS": "aliyun", "SPEED": "1.5", "MODEL": "qwen"},
        )
        self.assertEqual((pb.config.tts.provider, pb.config.tts.speed), ("aliyun", 1.5))
        self.assertEqual(pb.config.llm.model, "qwen")
        self.assertEqual(pb.initial.prompt, "${NOT_IN_BODY}")

    def test_unset_left_literal(self):
        self.assertEqual(parser.expand_env("a ${NOPE} ${YES}", {"YES": "1"}), "a ${NOPE} 1")
        pb = parse("---\nllm: {model: \"${NOPE}\"}\n---\n")
        self.assertEqual(pb.config.llm.model, "${NOPE}")

    def test_unset_numeric_names_variable(self):
        e = self.assertRaises(PlaybookError, parse, "---\ntts:\n  speed: ${TTS_SPEED}\n---\n")
        self.assertEqual(e.key, "tts.speed")
        self.assertIn("TTS_SPEED unset", e.reason)


class SceneTests(unittest.TestCase):
    SAMPLE = """
        ---
        llm: {provider: openai}
        dtmf:
          "1": {action: goto, scene: support}
          "9": {action: transfer, target: "sip:9@pbx"}
        followUp: {timeout: 10000, maxCount: 2}
        ---
        You are Ann, a receptionist.

        # Scene: welcome
        Greet the caller. Offer 1 for support.
        <dtmf digit="1" action="goto" scene="sales"/>
        <dtmf action="hangup" digit="0" />
        <play file="welcome.wav"/>
        <play file="second.wav"/>

        # Scene: sales
        Sell things. Say <hangup/> when done.
        <followup timeout='3000' max='1'/>

        # Scene: support
        Help with problems.
        """

    def test_scenes_preamble_and_tags(self):
        pb = parse(self.SAMPLE)
        self.assertEqual(list(pb.scenes), ["welcome", "sales", "support"])
        self.assertEqual(pb.initial_scene, "welcome")
        self.assertEqual(pb.preamble, "You are Ann, a receptionist.")
        welcome = pb.scenes["welcome"]
        self.assertEqual(welcome.prompt, "You are Ann, a receptionist.\n\nGreet the caller. Offer 1 for support.")
        self.assertEqual(welcome.play, "welcome.wav")
        self.assertEqual(welcome.line, 10)
        self.assertEqual(pb.config.llm.prompt, welcome.prompt)
        # the preamble is shared by every scene, not a scene of its own
        self.assertNotIn("default", pb.scenes)
        self.assertTrue(pb.scenes["support"].prompt.startswith("You are Ann"))
        # other tags stay as text the LLM can read
        self.assertIn("<hangup/>", pb.scenes["sales"].prompt)
        self.assertEqual(len(pb.warnings), 1)  # the second <play>

    def test_scene_dtmf_beats_global(self):
        pb = parse(self.SAMPLE)
        self.assertEqual(pb.dtmf_action("welcome", "1").scene, "sales")
        self.assertEqual(pb.dtmf_action("sales", "1").scene, "support")
        self.assertEqual(pb.dtmf_action("welcome", "0").action, "hangup")
        self.assertEqual(pb.dtmf_action("welcome", "9").target, "sip:9@pbx")
        self.assertIsNone(pb.dtmf_action("welcome", "5"))

    def test_followup_scene_tag_beats_front_matter(self):
        pb = parse(self.SAMPLE)
        self.assertEqual(pb.followup_for("sales"), parser.FollowUpConfig(3000, 1))
        self.assertEqual(pb.followup_for("support"), parser.FollowUpConfig(10000, 2))

    def test_goto_unknown_scene(self):
        e = self.assertRaises(PlaybookError, parse, "---\n---\n# Scene: a\n<dtmf digit=\"1\" action=\"goto\" scene=\"zz\"/>\n")
        self.assertEqual(e.line, 3)
        self.assertIn("zz", e.reason)
        e = self.assertRaises(PlaybookError, parse, "---\ndtmf:\n  '1': {action: goto, scene: zz}\n---\nx\n")
        self.assertEqual((e.key, e.line), ("dtmf.1", 3))

    def test_bad_scene_tags_name_line(self):
        e = self.assertRaises(PlaybookError, parse, "---\n---\n# Scene: a\ntext\n<dtmf digit=\"1\" action=\"dance\"/>\n")
        self.assertEqual(e.line, 5)
        self.assertIn("dance", e.reason)
        e = self.assertRaises(PlaybookError, parse, "---\n---\n# Scene: a\n<followup timeout=\"soon\" max=\"1\"/>\n")
        self.assertEqual(e.line, 4)
        e = self.assertRaises(PlaybookError, parse, "---\n---\n# Scene: a\n<dtmf digit=\"x\" action=\"hangup\"/>\n")
        self.assertIn("not a DTMF digit", e.reason)

    def test_duplicate_and_empty_scene(self):
        e = self.assertRaises(PlaybookError, parse, "---\n---\n# Scene: a\nx\n# Scene: a\ny\n")
        self.assertEqual(e.line, 5)
        e = self.assertRaises(PlaybookError, parse, "---\n---\n# Scene:\nx\n")
        self.assertEqual(e.line, 3)

    def test_templates_left_raw(self):
        pb = parse("---\n---\n# Scene: a\nHello {{ sip[\"X-Name\"] }}\n")
        self.assertEqual(pb.initial.prompt, 'Hello {{ sip["X-Name"] }}')

    def test_subheadings_are_not_scenes(self):
        pb = parse("---\n---\n# Scene: a\n## Role\nx\n# Rules\ny\n")
        self.assertEqual(list(pb.scenes), ["a"])
        self.assertIn("# Rules", pb.initial.prompt)


class ShippedPlaybookTests(unittest.TestCase):
    def test_every_sample_parses(self):
        paths = sorted(glob.glob(os.path.join(ROOT, "etc", "playbook", "*.md")))
        self.assertIn("default.md", [os.path.basename(p) for p in paths])
        for path in paths:
            pb = parser.load_playbook(path, environ={})
            self.assertTrue(pb.scenes, path)
            self.assertEqual(pb.warnings, (), path)

    def test_missing_file(self):
        e = self.assertRaises(PlaybookError, parser.load_playbook, "/nonexistent/x.md")
        self.assertEqual(e.source, "/nonexistent/x.md")
