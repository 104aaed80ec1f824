"""Speech defaults by language (``speech/defaults.py``) and a playbook that names no asr/vad/tts."""

from __future__ import annotations

import os
from unittest import mock

from twisted.trial import unittest

from activecall.playbook.parser import parse_playbook
from activecall.playbook.start import playbook_call_option
from activecall.speech import defaults, registry
from activecall.speech.asr import moonshine, whisper
from activecall.speech.tts import piper


def _option(front_matter: str):
    return playbook_call_option(parse_playbook(f"---\n{front_matter}\n---\nHello.\n", "<test>"))


class LanguageTests(unittest.TestCase):
    def test_primary_language(self):
        self.assertEqual([defaults.primary_language(t) for t in ("zh-CN", "zh_TW", "cmn", "en-US", "EN", "ja")],
                         ["zh", "zh", "zh", "en", "en", "ja"])
        self.assertEqual(defaults.primary_language(None, "auto", "", "zh-CN"), "zh")
        self.assertEqual(defaults.primary_language(None, None), defaults.DEFAULT_LANGUAGE)


class ChoiceTests(unittest.TestCase):
    def test_named_provider_is_kept_and_none_means_none(self):
        given = {"provider": "openai", "model": "whisper-1", "language": "zh-CN"}
        self.assertEqual(defaults.choose("asr", given, "zh"), given)
        self.assertIsNone(defaults.choose("asr", {"provider": "none"}, "en"))
        self.assertEqual(defaults.choose("vad", None, "en"), {"type": "silero"})
        self.assertEqual(defaults.choose("vad", {"type": "webrtcvad"}, "en"), {"type": "webrtcvad"})

    def test_english_offline_order(self):
        with mock.patch.object(moonshine, "available", return_value=True):
            self.assertEqual(defaults.choose("asr", None, "en"), {"provider": "moonshine", "language": "en"})
        with mock.patch.object(moonshine, "available", return_value=False), \
                mock.patch.object(whisper, "available", return_value=True):
            self.assertEqual(defaults.choose("asr", None, "en"), {"provider": "whisper", "language": "en"})
        with mock.patch.object(moonshine, "available", return_value=False), \
                mock.patch.object(whisper, "available", return_value=False), \
                mock.patch.object(defaults, "_module", lambda name: name == "pocketsphinx"):
            self.assertEqual(defaults.choose("asr", None, "en")["provider"], "pocketsphinx")
        with mock.patch.object(moonshine, "available", return_value=False), \
                mock.patch.object(whisper, "available", return_value=False), \
                mock.patch.object(defaults, "_module", lambda name: False):
            self.assertEqual(defaults.choose("asr", None, "en")["provider"], "openai")
        with mock.patch.object(piper, "available", return_value=True):
            self.assertEqual(defaults.choose("tts", None, "en")["provider"], "piper")
        with mock.patch.object(piper, "available", return_value=False), \
                mock.patch.object(defaults, "_program", lambda name: name == "flite"):
            self.assertEqual(defaults.choose("tts", None, "en")["provider"], "flite")
        with mock.patch.object(piper, "available", return_value=False), \
                mock.patch.object(defaults, "_program", lambda name: False):
            self.assertEqual(defaults.choose("tts", None, "en")["provider"], "openai")

    def test_chinese_offline_else_aliyun(self):
        # no SenseVoice model: the guide's cloud default, with what the section already says kept
        got = defaults.choose("asr", {"endpoint": "ws://127.0.0.1:1/x", "secretKey": "k"}, "zh")
        self.assertEqual(got, {"provider": "aliyun", "endpoint": "ws://127.0.0.1:1/x", "secretKey": "k",
                               "language": "zh"})
        with mock.patch.object(defaults, "_program", lambda name: name == "espeak-ng"):
            self.assertEqual(defaults.choose("tts", None, "zh"), {"provider": "espeak", "speaker": "cmn",
                                                                 "language": "zh"})
        with mock.patch.object(defaults, "_program", lambda name: False):
            self.assertEqual(defaults.choose("tts", None, "zh")["provider"], "aliyun")

    def test_sensevoice_from_the_models_dir(self):
        root = self.mktemp()
        os.makedirs(os.path.join(root, "sensevoice"))
        for name in ("model.int8.onnx", "tokens.txt"):
            open(os.path.join(root, "sensevoice", name), "w").close()
        with mock.patch.object(defaults, "_module", lambda name: name == "sherpa_onnx"):
            got = defaults.choose("asr", None, "zh", models_dir=root)
        self.assertEqual(got, {"provider": "sensevoice", "extra": {"model_dir": os.path.join(root, "sensevoice")},
                               "language": "zh"})
        with mock.patch.object(defaults, "_module", lambda name: False):
            self.assertEqual(defaults.choose("asr", None, "zh", models_dir=root)["provider"], "aliyun")

    def test_none_recognizer(self):
        self.assertIsNone(registry.create_recognizer({"provider": "none"}, lambda r: None))


class PlaybookDefaultsTests(unittest.TestCase):
    def test_playbook_without_speech_blocks_listens_and_speaks(self):
        option = _option("llm: {provider: echo}")
        self.assertEqual(option.vad.type, "silero")
        self.assertEqual(option.asr.provider, defaults.offline_asr("en")["provider"])
        self.assertEqual(option.asr.language, "en")
        self.assertEqual(option.tts.provider, defaults.offline_tts("en")["provider"])

    def test_named_sections_are_kept(self):
        option = _option("asr: {provider: pocketsphinx}\nvad: {type: webrtcvad}\ntts: {provider: flite}")
        self.assertEqual((option.asr.provider, option.vad.type, option.tts.provider),
                         ("pocketsphinx", "webrtcvad", "flite"))

    def test_language_zh_picks_chinese_providers(self):
        option = _option("language: zh-CN")
        self.assertEqual(option.asr.provider, "aliyun")  # no offline Chinese recogniser installed here
        self.assertEqual(option.asr.language, "zh")
        with mock.patch.object(defaults, "_program", lambda name: name == "espeak-ng"):
            option = _option("language: zh")
        self.assertEqual((option.tts.provider, option.tts.speaker), ("espeak", "cmn"))
        # the section's own language counts too
        self.assertEqual(_option("asr: {language: zh-CN}").asr.provider, "aliyun")
        self.assertEqual(_option("asr: {language: zh-CN}").asr.language, "zh-CN")

    def test_asr_none_is_a_call_that_does_not_listen(self):
        option = _option("asr: {provider: none}")
        self.assertEqual(option.asr.provider, "none")
        self.assertIsNone(option.vad)


class CallDefaultsTests(unittest.TestCase):
    """An API call's option (``/call``, ``/call/webrtc``, ``/call/sip``): ``defaults.for_call`` and the
    ``asr: false`` / ``asr: true`` spellings (docs/api.md, "Speech defaults")."""

    def setUp(self):
        for patch in (mock.patch.object(moonshine, "available", return_value=True),
                      mock.patch.object(piper, "available", return_value=True)):
            patch.start()
            self.addCleanup(patch.stop)

    def plan(self, **option):
        from activecall.protocol import commands as cmd
        parsed = cmd.CallOption.from_dict(option)

        def section(name):
            value = getattr(parsed, name)
            return value.to_dict() if value is not None else None
        return defaults.for_call(section("vad"), section("asr"), section("tts"), parsed.language)

    def test_a_bare_invite_gets_nothing(self):
        plan = self.plan(codec="pcm")
        self.assertEqual((plan.vad, plan.asr, plan.tts, plan.defaulted), (None, None, None, ()))
        self.assertFalse(plan.listens)

    def test_named_providers_are_kept_unchanged(self):
        plan = self.plan(asr={"provider": "pocketsphinx"}, vad={"type": "webrtcvad"},
                         tts={"provider": "flite", "speaker": "slt"})
        self.assertEqual((plan.asr, plan.vad, plan.tts),
                         ({"provider": "pocketsphinx"}, {"type": "webrtcvad"}, {"provider": "flite", "speaker": "slt"}))
        self.assertEqual(plan.defaulted, ())

    def test_sections_without_provider_get_the_language_defaults(self):
        plan = self.plan(asr={"extra": {"step_ms": 400}}, tts={"speed": 1.2})
        self.assertEqual(plan.asr, {"provider": "moonshine", "extra": {"step_ms": 400}, "language": "en"})
        self.assertEqual(plan.tts, {"provider": "piper", "speed": 1.2, "language": "en"})
        self.assertIsNone(plan.vad)  # asked for a recogniser only: no VAD events it did not ask for
        self.assertEqual(plan.defaulted, ("asr", "tts"))
        self.assertEqual(self.plan(asr=True).asr["provider"], "moonshine")
        self.assertEqual(self.plan(vad={}).vad, {"type": "silero"})

    def test_language_asks_for_the_whole_set(self):
        plan = self.plan(language="en-US")
        self.assertEqual((plan.vad["type"], plan.asr["provider"], plan.tts["provider"], plan.language),
                         ("silero", "moonshine", "piper", "en"))
        self.assertEqual(plan.defaulted, ("asr", "vad", "tts"))
        plan = self.plan(language="zh-CN", tts={"provider": "flite"})
        self.assertEqual((plan.asr["provider"], plan.asr["language"], plan.tts),
                         ("aliyun", "zh", {"provider": "flite"}))

    def test_false_switches_a_section_off(self):
        plan = self.plan(language="en", asr=False)
        self.assertEqual((plan.vad, plan.asr, plan.tts["provider"]), (None, None, "piper"))
        self.assertFalse(plan.listens)
        plan = self.plan(language="en", vad=False)
        self.assertEqual((plan.vad, plan.asr["provider"]), (None, "moonshine"))
        plan = self.plan(asr={"provider": "none"}, language="en")
        self.assertIsNone(plan.asr)

    def test_false_and_true_on_the_wire(self):
        from activecall.protocol import commands as cmd
        option = cmd.CallOption.from_dict({"asr": False, "vad": False, "language": "zh-CN"})
        self.assertEqual((option.asr.provider, option.vad.type, option.language), ("none", "none", "zh-CN"))
        self.assertEqual(cmd.CallOption.from_dict({"asr": True}).asr, cmd.TranscriptionOption())
        from activecall.protocol.events import WireError
        with self.assertRaises(WireError):
            cmd.CallOption.from_dict({"asr": "yes"})
class InstalledTests(unittest.TestCase):
    """``speech/installed.py``: what is installed is looked up once per RECHECK seconds, not per call."""

    def test_answers_are_kept_for_recheck_seconds(self):
        from activecall.speech import installed
        now = [1000.0]
        looked = []

        @installed.remembered
        def present(name):
            looked.append(name)
            return len(looked)

        with mock.patch.object(installed.time, "monotonic", lambda: now[0]):
            self.assertEqual((present("a"), present("a"), present("b")), (1, 1, 2))
            now[0] += installed.RECHECK - 0.1
            self.assertEqual(present("a"), 1)
            now[0] += 0.2  # an install or removal is noticed after RECHECK seconds
            self.assertEqual(present("a"), 3)
            present.forget()
            self.assertEqual(present("b"), 4)
        self.assertEqual(looked, ["a", "b", "a", "b"])

    def test_module_found(self):
        from activecall.speech import installed
        self.assertTrue(installed.module_found("json"))
        self.assertFalse(installed.module_found("no_such_module_anywhere_xyz"))
        self.assertFalse(installed.module_found("json.no_such_submodule_xyz"))

    def test_a_shared_playbook_builds_its_call_option_once(self):
        from activecall.playbook import start
        from activecall.speech import installed
        book = parse_playbook("---\nllm: {provider: echo}\n---\nHello.\n", "<test>")
        other = parse_playbook("---\nllm: {provider: echo}\nasr: {provider: none}\n---\nHello.\n", "<test>")
        now = [5000.0]
        with mock.patch.object(start.time, "monotonic", lambda: now[0]), \
                mock.patch.object(start, "playbook_call_option", wraps=start.playbook_call_option) as built:
            first = start._call_option_for(book)
            self.assertIs(start._call_option_for(book), first)
            self.assertEqual(built.call_count, 1)
            self.assertEqual(start._call_option_for(other).asr.provider, "none")  # another playbook: its own
            now[0] += installed.RECHECK + 1  # the defaults may have changed: built again
            self.assertEqual(start._call_option_for(book), first)
            self.assertEqual(built.call_count, 3)
