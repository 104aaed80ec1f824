"""No silent options: every documented CallOption key works or is refused with an ``error`` event.

The table (``protocol/option_keys.py``), the option dataclasses (``protocol/commands.py``) and the
table in docs/api.md are checked against each other; then every key is set on a call, one at a
time, and the call must refuse exactly the keys the table says it refuses."""

import dataclasses
import os
import re
import typing

from twisted.internet import task
from twisted.trial import unittest

from activecall.call.session import CallSession
from activecall.protocol import commands as cmd
from activecall.protocol import option_keys
from activecall.protocol.events import OTHER_KEYS

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs", "api.md")


def documented_table() -> dict:
    """``key -> state text`` from the "Option keys" table of docs/api.md."""
    text = open(DOCS, encoding="utf-8").read()
    section = text.split("### Option keys", 1)[1].split("\n## ", 1)[0]
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| `([^`]+)` \| (.+) \|$", section, re.M)}


def _sample(hint):
    """A value of the field's type that differs from every 'harmless' value."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union:
        return _sample(args[0])
    origin = typing.get_origin(hint)
    if hint is bool:
        return True
    if hint is int:
        return 8000
    if hint is float:
        return 0.7
    if hint is str:
        return "x"
    if origin in (dict, typing.Mapping) or hint is dict:
        return {"a": "b"}
    if origin is tuple:
        return ["x"]
    return {"a": "b"}


def _hints(cls):
    return typing.get_type_hints(cls)


def sample_option(path: str) -> dict:
    """The smallest option dict with ``path`` set (required siblings filled in)."""
    parts = path.split(".")
    if len(parts) == 1:
        top = parts[0]
        if top in option_keys.BLOCKS:
            return {top: sample_block(option_keys.BLOCKS[top], None)}
        hint = _hints(cmd.CallOption).get(top)
        return {top: _sample(hint) if hint is not None else True}
    block, key = parts
    return {block: sample_block(option_keys.BLOCKS[block], key)}


def sample_block(cls, key):
    hints = _hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name == OTHER_KEYS:
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required or f.name == key:
            out[f.name] = _sample(hints[f.name])
    entry = option_keys.OPTION_KEYS.get(f"{_prefix(cls)}.{key}")
    if key is not None and entry is not None and out.get(key) in entry.harmless:
        out[key] = not out[key] if isinstance(out[key], bool) else out[key]
        if out[key] in entry.harmless:
            raise AssertionError(f"no sample for {key}")
    return out


def _prefix(cls):
    return next(p for p, c in option_keys.BLOCKS.items() if c is cls)


class TableTests(unittest.TestCase):
    def test_every_option_field_is_in_the_table(self):
        for prefix, cls in option_keys.BLOCKS.items():
            for f in dataclasses.fields(cls):
                if f.name == OTHER_KEYS:
                    continue
                path = f"{prefix}.{f.name}" if prefix else f.name
                self.assertIn(path, option_keys.OPTION_KEYS, f"{cls.__name__}.{f.name} is not in option_keys")

    def test_every_table_entry_is_a_field_or_a_documented_future_key(self):
        fields = set()
        for prefix, cls in option_keys.BLOCKS.items():
            for f in dataclasses.fields(cls):
                fields.add(f"{prefix}.{f.name}" if prefix else f.name)
        extra = set(option_keys.OPTION_KEYS) - fields
        # keys another part of the daemon will add (they are refused until then, never silent)
        for path in extra:
            self.assertIsNotNone(option_keys.OPTION_KEYS[path].refused, path)

    def test_docs_table_matches(self):
        documented = documented_table()
        self.assertEqual(set(documented), set(option_keys.OPTION_KEYS))
        for path, entry in option_keys.OPTION_KEYS.items():
            state = documented[path]
            if entry.refused:
                self.assertIn("refused", state, path)
                self.assertIn(entry.refused, state, path)
            else:
                self.assertTrue(state.startswith("works"), f"{path}: {state}")

    def test_docs_known_keys_sentence_lists_only_table_keys(self):
        text = open(DOCS, encoding="utf-8").read()
        sentence = text.split("Everything is optional. Known keys:", 1)[1].split("\n\n", 1)[0]
        for key in re.findall(r"`([A-Za-z_0-9]+)`", sentence):
            if key in ("apiKey",):
                continue
            found = key in option_keys.OPTION_KEYS or any(p.endswith("." + key) for p in option_keys.OPTION_KEYS)
            self.assertTrue(found, key)


class WalkTests(unittest.TestCase):
    """Every key, set alone on a call of every type: refused exactly when the table says so."""

    def test_every_key_on_every_call_type(self):
        checked = 0
        for path, entry in option_keys.OPTION_KEYS.items():
            data = sample_option(path)
            option = cmd.CallOption.from_dict(data)
            for call_type in option_keys.CALL_TYPES:
                refused = {r.path: r for r in option_keys.refusals(option, call_type)}
                expected = entry.refused is not None or call_type not in entry.call_types
                parent = path.split(".")[0]
                parent_entry = option_keys.OPTION_KEYS[parent]
                if parent != path and (parent_entry.refused or call_type not in parent_entry.call_types):
                    # the whole block is refused: one error names the block
                    self.assertIn(parent, refused, (path, call_type))
                    self.assertNotIn(path, refused)
                elif expected:
                    self.assertIn(path, refused, (path, call_type, data))
                    self.assertFalse(refused[path].unknown)
                    self.assertEqual(refused[path].code, 501)
                else:
                    self.assertNotIn(path, refused, (path, call_type, data, refused))
                checked += 1
        self.assertGreater(checked, 300)

    def test_harmless_values_are_not_refused(self):
        option = cmd.CallOption.from_dict({"vad": {"samplerate": 16000, "ratio": 0.5}, "denoise": False,
                                           "tts": {"codec": "pcm"}})
        self.assertEqual(option_keys.refusals(option, "sip"), [])

    def test_unknown_keys_at_any_level(self):
        option = cmd.CallOption.from_dict({"inactivityTimout": 5, "vad": {"typ": "silero"},
                                           "extra": {"free": 1}, "sip": {"headers": {"X-A": "1"}}})
        refused = {r.path: r for r in option_keys.refusals(option, "sip")}
        self.assertEqual(set(refused), {"inactivityTimout", "vad.typ"})
        self.assertTrue(refused["vad.typ"].unknown)
        self.assertEqual(refused["vad.typ"].code, 400)
        self.assertIn("unknown option key 'vad.typ'", refused["vad.typ"].message)

    def test_future_key_is_refused_until_flipped(self):
        """A key whose table entry has a reason is refused (as ``amd`` was before it worked)."""
        self.patch(option_keys, "OPTION_KEYS", {**option_keys.OPTION_KEYS,
                                                "amd": option_keys.OptionKey("amd", refused="not yet")})
        option = cmd.CallOption.from_dict({"amd": {"timeout": 3000}})
        [refusal] = option_keys.refusals(option, "sip")
        self.assertEqual(refusal.path, "amd")
        self.assertFalse(refusal.unknown)


class SessionTests(unittest.TestCase):
    """The refusals reach the client as ``error`` events when the call is answered."""

    def test_error_events_name_each_refused_key(self):
        clock = task.Clock()
        events = []
        session = CallSession("s1", "webSocket", clock=clock, emit=events.append, dump=False)
        session.option = cmd.CallOption.from_dict({"handshakeTimeout": 5, "vad": {"ratio": 0.9},
                                                   "inactivityTimeout": 30, "bogus": 1})
        session.answered()
        tags = [e.TAG for e in events]
        self.assertEqual(tags[:2], ["trackStart", "answer"])
        errors = [e for e in events if e.TAG == "error"]
        self.assertTrue(all(e.sender == "option" and e.trackId == "s1" for e in errors))
        named = {re.search(r"'([^']+)'", e.error).group(1): e.code for e in errors}
        self.assertEqual(named, {"handshakeTimeout": 501, "vad.ratio": 501, "bogus": 400})
        wire = errors[0].to_dict()
        self.assertEqual(set(wire), {"event", "trackId", "timestamp", "sender", "error", "code"})

    def test_supported_option_answers_without_errors(self):
        clock = task.Clock()
        events = []
        session = CallSession("s2", "webSocket", clock=clock, emit=events.append, dump=False)
        session.option = cmd.CallOption.from_dict({"codec": "pcmu", "inactivityTimeout": 30,
                                                   "tts": {"provider": "flite", "speed": 1.2}})
        session.answered()
        self.assertEqual([e.TAG for e in events], ["trackStart", "answer"])


class FrontMatterTests(unittest.TestCase):
    """The playbook front matter: media sections are judged as the call's option, the rest by
    ``playbook/front_matter_keys.py``; a refused key a playbook sets is an ``error`` event."""

    def test_media_sections_are_option_keys(self):
        from activecall.playbook import front_matter_keys as fmk

        for path in fmk.field_paths():
            section = path.split(".")[0]
            if section in fmk.MEDIA_SECTIONS:
                self.assertIn(path, option_keys.OPTION_KEYS, path)

    def test_refused_keys_are_front_matter_keys(self):
        from activecall.playbook import front_matter_keys as fmk

        paths = set(fmk.field_paths())
        for key in fmk.REFUSED:
            self.assertIn(key.split("[]")[0], paths, key)

    def test_docs_list_the_refused_keys(self):
        from activecall.playbook import front_matter_keys as fmk

        docs = open(os.path.join(os.path.dirname(__file__), "..", "docs", "playbooks.md"), encoding="utf-8").read()
        section = docs.split("### Front matter keys that do nothing", 1)[1].split("\n## ", 1)[0]
        for key, reason in fmk.REFUSED.items():
            self.assertIn(f"`{key}`", section)
            self.assertIn(reason, section)

    def test_a_playbook_setting_refused_keys_gets_error_events(self):
        from activecall.playbook.parser import parse_playbook
        from activecall.playbook.start import start_playbook

        text = """---
llm:
  provider: echo
interruption:
  strategy: both
  volumeFadeMs: 300
sip:
  username: alice
  extract_headers: [{name: X-Id, pattern: "^[0-9]+$"}, X-Other]
---
Hello.
"""
        events = []
        session = CallSession("p1", "webSocket", clock=task.Clock(), emit=events.append, dump=False)
        start_playbook(session, parse_playbook(text, "<test>"))
        errors = {re.search(r"key '([^']+)'", e.error).group(1): e for e in events if e.TAG == "error"}
        self.assertEqual(set(errors), {"interruption.volumeFadeMs", "sip.username", "sip.extract_headers[].pattern"})
        self.assertTrue(all(e.sender == "playbook" and e.code == 501 for e in errors.values()))

    def test_a_plain_playbook_gets_none(self):
        from activecall.playbook.parser import parse_playbook
        from activecall.playbook.start import start_playbook

        events = []
        session = CallSession("p2", "webSocket", clock=task.Clock(), emit=events.append, dump=False)
        start_playbook(session, parse_playbook("---\nllm:\n  provider: echo\nsip:\n  extract_headers: [X-A]\n---\nHi.\n",
                                               "<test>"))
        self.assertEqual([e for e in events if e.TAG == "error"], [])


class GuideSpellingTests(unittest.TestCase):
    def test_asr_model_is_the_model(self):
        """The guide writes ``asr: {provider: openai, model: whisper-1}``: ``model`` picks the model
        (it was read only as ``modelType`` before, so the guide's key did nothing)."""
        from activecall.speech.base import AsrOptions

        self.assertEqual(AsrOptions.from_dict({"provider": "openai", "model": "whisper-1"}).modelType, "whisper-1")
        self.assertEqual(AsrOptions.from_dict({"model": "a", "modelType": "b"}).modelType, "b")

    def test_tts_voice_is_the_speaker(self):
        from activecall.speech.base import TtsOptions

        self.assertEqual(TtsOptions.from_dict({"provider": "openai", "voice": "alloy"}).speaker, "alloy")
        self.assertEqual(TtsOptions.from_dict({"voice": "a", "speaker": "b"}).speaker, "b")
