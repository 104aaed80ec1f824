"""typed.Loader: mappings -> dataclasses by their hints; nested, optional, lists, maps, unions, literals,
enums; unknown keys under each policy; key spellings; per-field and per-class hooks; error paths."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, Union

from twisted.trial import unittest

from activecall import typed
from activecall.typed import LoadError, Loader


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass(frozen=True)
class Rule:
    playbook: str
    caller: Optional[str] = None


@dataclass(frozen=True)
class Handler:
    default: Optional[str] = None
    rules: tuple[Rule, ...] = ()


@dataclass(frozen=True)
class Top:
    name: str = "x"
    port: int = 5060
    ratio: float = 0.5
    enabled: bool = False
    handler: Optional[Handler] = None
    tags: tuple[str, ...] = ()
    items: list[int] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    extra: Any = None
    mode: Literal["a", "b"] = "a"
    colour: Colour = Colour.RED
    either: Optional[Union[int, str]] = None
    pair: Optional[tuple[str, int]] = None


@dataclass(frozen=True)
class Option:
    sampleRate: Optional[int] = None
    secretKey: Optional[str] = None
    other_keys: Optional[dict] = None


def _duration(value):
    if isinstance(value, str) and value.endswith("s"):
        return float(value[:-1])
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return typed.NO


class LoadTests(unittest.TestCase):
    def test_defaults_fill_the_rest(self):
        self.assertEqual(Loader().load(Top, {}), Top())

    def test_nested_optional_lists_and_maps(self):
        top = Loader().load(Top, {
            "name": "n", "port": 5061, "ratio": 1, "enabled": True,
            "handler": {"default": "a.md", "rules": [{"playbook": "b.md", "caller": "^1"}]},
            "tags": ["x", "y"], "items": [1, 2.0], "headers": {"X-A": "1"}, "extra": {"any": [1]},
            "mode": "b", "colour": "blue", "either": "s", "pair": ["a", 1],
        })
        self.assertEqual(top.handler, Handler("a.md", (Rule("b.md", "^1"),)))
        self.assertEqual((top.tags, top.items, top.headers), (("x", "y"), [1, 2], {"X-A": "1"}))
        self.assertIsInstance(top.ratio, float)
        self.assertEqual((top.extra, top.mode, top.colour, top.either, top.pair),
                         ({"any": [1]}, "b", Colour.BLUE, "s", ("a", 1)))

    def test_optional_takes_none(self):
        self.assertIsNone(Loader().load(Top, {"handler": None}).handler)

    def test_union_takes_the_first_arm_that_fits(self):
        self.assertEqual(Loader().load(Top, {"either": 3}).either, 3)
        e = self.assertRaises(LoadError, Loader().load, Top, {"either": [1]})
        self.assertEqual((e.path, e.reason), ("either", "expected an integer or a string, got an array"))

    def test_error_paths(self):
        load = Loader().load
        cases = [
            ({"handler": {"rules": [{"playbook": "a"}, {"playbook": 1}]}},
             "handler.rules[1].playbook", "expected a string, got an integer"),
            ({"handler": {"rules": [{"playbook": "a"}, {}]}}, "handler.rules[1].playbook", "is required"),
            ({"handler": {"rules": {}}}, "handler.rules", "expected an array, got an object"),
            ({"handler": []}, "handler", "expected an object, got an array"),
            ({"headers": {"X-A": 1}}, "headers.X-A", "expected a string, got an integer"),
            ({"port": True}, "port", "expected an integer, got a boolean"),
            ({"port": 1.5}, "port", "expected an integer, got a number"),
            ({"items": [1, None]}, "items[1]", "expected an integer, got null"),
            ({"mode": "c"}, "mode", "expected one of 'a', 'b', got 'c'"),
            ({"colour": "green"}, "colour", "expected one of 'red', 'blue', got 'green'"),
            ({"pair": ["a"]}, "pair", "expected an array of 2 items, got an array"),
        ]
        for value, path, reason in cases:
            e = self.assertRaises(LoadError, load, Top, value)
            self.assertEqual((e.path, e.reason), (path, reason), value)
        self.assertEqual(str(LoadError("a.b", "why")), "a.b: why")

    def test_not_a_mapping(self):
        e = self.assertRaises(LoadError, Loader().load, Top, [1], "top")
        self.assertEqual((e.path, e.reason), ("top", "expected an object, got an array"))

    def test_unsupported_hint_is_a_programming_error(self):
        @dataclass
        class Odd:
            when: complex = 0j

        self.assertRaises(TypeError, Loader().load, Odd, {"when": 1})


class UnknownKeyTests(unittest.TestCase):
    def test_error_with_did_you_mean(self):
        e = self.assertRaises(LoadError, Loader().load, Top, {"handler": {"defualt": "a"}})
        self.assertEqual((e.path, e.reason), ("handler.defualt", "unknown key; did you mean 'default'?"))
        e = self.assertRaises(LoadError, Loader().load, Top, {"zzz": 1})
        self.assertEqual((e.path, e.reason), ("zzz", "unknown key"))

    def test_warn(self):
        warnings = []
        loader = Loader(unknown="warn", warn=lambda path, reason: warnings.append((path, reason)))
        self.assertEqual(loader.load(Top, {"zzz": 1, "port": 1}).port, 1)
        self.assertEqual(warnings, [("zzz", "unknown key, ignored")])
        # a near miss is still an error: a typo silently ignored is a setting silently lost
        e = self.assertRaises(LoadError, loader.load, Top, {"prot": 1})
        self.assertEqual(e.reason, "unknown key; did you mean 'port'?")

    def test_keep(self):
        loader = Loader(unknown="keep")
        self.assertEqual(loader.load(Option, {"x": 1, "sampleRate": 8000}), Option(sampleRate=8000, other_keys={"x": 1}))
        self.assertIsNone(loader.load(Option, {"sampleRate": 8000}).other_keys)
        self.assertEqual(loader.load(Rule, {"playbook": "a", "x": 1}), Rule("a"))  # no keep field: ignored

    def test_ignore(self):
        self.assertEqual(Loader(unknown="ignore").load(Top, {"prot": 1}), Top())

    def test_fold_case_suggests_the_documented_spelling(self):
        loader = Loader(unknown="warn", fold_case=True, suggest_cutoff=0.75)
        e = self.assertRaises(LoadError, loader.load, Option, {"SAMPLERATE": 1})
        self.assertEqual(e.reason, "unknown key; did you mean 'sampleRate'?")

    def test_bad_policy(self):
        self.assertRaises(ValueError, Loader, unknown="sometimes")
        self.assertRaises(ValueError, Loader, duplicates="last")


class SpellingTests(unittest.TestCase):
    def test_case_aliases_and_duplicates(self):
        loader = Loader(case_aliases=True)
        self.assertEqual(loader.load(Option, {"sample_rate": 1, "secret_key": "k"}), Option(1, "k"))
        e = self.assertRaises(LoadError, loader.load, Option, {"sampleRate": 1, "sample_rate": 2})
        self.assertEqual((e.path, e.reason), ("sample_rate", "given twice (also as 'sampleRate')"))
        self.assertEqual(Loader(case_aliases=True, duplicates="first").load(Option, {"sampleRate": 1, "sample_rate": 2}),
                         Option(sampleRate=1))

    def test_keys_hook(self):
        aliases = {"apiKey": "secretKey"}
        loader = Loader(keys=lambda cls, f: (f.name,) + tuple(a for a, t in aliases.items() if t == f.name))
        self.assertEqual(loader.load(Option, {"apiKey": "k"}).secretKey, "k")

    def test_none(self):
        self.assertEqual(Loader(none_is_missing=True).load(Rule, {"playbook": "a", "caller": None}), Rule("a"))
        e = self.assertRaises(LoadError, Loader(none_is_missing=True).load, Rule, {"playbook": None})
        self.assertEqual((e.path, e.reason), ("playbook", "is required"))
        self.assertEqual(Loader(none_as_empty=True).load(Handler, None), Handler())
        self.assertEqual(Loader(none_as_empty=True).load(Top, {"handler": None}).handler, None)  # Optional stays None

    def test_snake_camel(self):
        self.assertEqual((typed.snake("sampleRate"), typed.camel("sample_rate")), ("sample_rate", "sampleRate"))


class HookTests(unittest.TestCase):
    def test_scalars_coerce(self):
        @dataclass
        class Timeouts:
            accept: float = 60.0

        loader = Loader(scalars={float: _duration})
        self.assertEqual(loader.load(Timeouts, {"accept": "30s"}).accept, 30.0)
        e = self.assertRaises(LoadError, loader.load, Timeouts, {"accept": True})
        self.assertEqual((e.path, e.reason), ("accept", "expected a number, got a boolean"))

    def test_parse_check_required_and_post_load(self):
        def upper(value, path, loader):
            return loader.convert(str, value, path).upper()

        def positive(value):
            if value < 1:
                raise ValueError("must be at least 1")
            return value

        @dataclass(frozen=True)
        class Section:
            method: str = field(default="POST", metadata={"parse": upper})
            count: int = field(default=1, metadata={"check": positive})
            url: Optional[str] = field(default=None, metadata={"required": True})
            low: int = 0
            high: int = 9

            @classmethod
            def __post_load__(cls, values, path, loader):
                if values.get("low", 0) > values.get("high", 9):
                    raise loader.error(path, "low is above high")
                return {**values, "url": values["url"].rstrip("/")}

        load = Loader().load
        self.assertEqual(load(Section, {"method": "get", "url": "http://x/"}), Section("GET", 1, "http://x"))
        e = self.assertRaises(LoadError, load, Section, {"url": "u", "count": 0}, "s")
        self.assertEqual((e.path, e.reason), ("s.count", "must be at least 1"))
        e = self.assertRaises(LoadError, load, Section, {}, "s")
        self.assertEqual((e.path, e.reason), ("s.url", "is required"))
        e = self.assertRaises(LoadError, load, Section, {"url": "u", "low": 5, "high": 1}, "s")
        self.assertEqual((e.path, e.reason), ("s", "low is above high"))

    def test_error_and_mismatch_hooks(self):
        class Oops(Exception):
            def __init__(self, key, reason):
                super().__init__(f"{key}! {reason}")

        loader = Loader(error=Oops, mismatch=lambda hint, value, path: f"not a {getattr(hint, '__name__', hint)}")
        e = self.assertRaises(Oops, loader.load, Top, {"port": "x"})
        self.assertEqual(str(e), "port! not a int")

    def test_mapping_policy(self):
        @dataclass(frozen=True)
        class Extra:
            extra: Mapping[str, str] = field(default_factory=dict)

        loader = Loader(mapping=lambda d: tuple(sorted(d.items())), mapping_key=str, mapping_null="")
        self.assertEqual(loader.load(Extra, {"extra": {1: "a", "b": None}}).extra, (("1", "a"), ("b", "")))
