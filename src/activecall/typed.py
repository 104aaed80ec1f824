"""Mappings -> typed dataclasses, by their type hints: the one walker under the configuration (TOML,
``config.py``), the playbook front matter (YAML, ``playbook/front_matter.py``) and the WebSocket
protocol (JSON, ``api/commands.py`` and ``api/events.py``).

This module sits at the bottom of the package and imports nothing from activecall.  A ``Loader`` holds
one use's policy; the walk is the same for all:

- a dataclass is read from a mapping key by key; its fields' hints say what each value must be:
  ``str``/``int``/``float``/``bool``, ``Optional[X]``, ``Union[X, Y]`` (the first that fits),
  ``tuple[X, ...]``/``list[X]`` (from a list), ``dict[K, V]``/``Mapping[K, V]``, ``Literal[...]``, an
  ``enum.Enum``, another dataclass, or ``Any``;
- the path of the value in hand (``handler.rules[1].playbook``) is carried down for error messages;
- per-use policy is the constructor's parameters: how unknown keys are met (``"error"`` / ``"warn"`` /
  ``"keep"`` / ``"ignore"``), which key spellings a field has (``keys``, ``case_aliases`` for the
  camelCase and snake_case of each), what a key given twice means, how scalars coerce (``scalars``),
  how an error is made and worded (``error``, ``mismatch``);
- per-field rules live on the field's metadata: ``parse(value, path, loader)`` reads the value in place
  of the hint (a shape the hints cannot say), ``check(value)`` normalises it after the hint did
  (a ``ValueError`` becomes an error at the key's path), ``required=True`` for a field whose default
  only stands for "not given";
- per-class rules are a classmethod ``__post_load__(cls, values, path, loader) -> values``, run on the
  keyword arguments before the class is called.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import enum
import re
import types
import typing
from typing import Any, Callable, Literal, Mapping, Optional, Union

#: a scalar converter's answer for "this value is not of my type"
NO = object()
#: ``mapping_null``'s default: a ``null`` value in a mapping is converted like any other value
CONVERT = object()


class LoadError(ValueError):
    """The default error: ``path`` names the key, ``reason`` says what is wrong."""

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}" if path else reason)


def join(path: str, key) -> str:
    """``path.key``, or ``key`` at the top."""
    return f"{path}.{key}" if path else str(key)


def snake(name: str) -> str:
    """``sampleRate`` -> ``sample_rate``."""
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


def camel(name: str) -> str:
    """``sample_rate`` -> ``sampleRate``."""
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


# -- scalars -------------------------------------------------------------------------------------------


def _bool(value):
    return value if isinstance(value, bool) else NO


def _int(value):
    """An integer; a float with no fraction (JSON and YAML write ``5.0``) is one too."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return NO


def _float(value):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return NO


def _str(value):
    return value if isinstance(value, str) else NO


#: type -> ``converter(value) -> converted value, or NO``: JSON's rules, no silent coercion
JSON_SCALARS: Mapping[type, Callable[[Any], Any]] = types.MappingProxyType(
    {bool: _bool, int: _int, float: _float, str: _str}
)


def kind(value) -> str:
    """What a JSON value is, in words (``null``, ``an integer``, ``an object``…)."""
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}


def type_name(hint) -> str:
    return _TYPE_NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def json_mismatch(hint, value, path: str) -> str:
    """The default wording of "``value`` is not a ``hint``"."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        names = " or ".join(type_name(a) for a in typing.get_args(hint))
        return f"expected {names}, got {kind(value)}"
    if origin is Literal:
        return f"expected one of {', '.join(map(repr, typing.get_args(hint)))}, got {value!r}"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return f"expected one of {', '.join(repr(m.value) for m in hint)}, got {value!r}"
    if origin in (list, tuple) or hint in (list, tuple):
        args = typing.get_args(hint)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            return f"expected an array of {len(args)} items, got {kind(value)}"
        return f"expected an array, got {kind(value)}"
    if hint in _TYPE_NAMES:
        return f"expected {_TYPE_NAMES[hint]}, got {kind(value)}"
    return f"expected an object, got {kind(value)}"


# -- shapes: what a hint asks for, worked out once per hint ----------------------------------------------

_SHAPES: dict[Any, tuple] = {}


def _shape(hint) -> tuple:
    shape = _SHAPES.get(hint)
    if shape is None:
        shape = _SHAPES[hint] = _work_out(hint)
    return shape


def _work_out(hint) -> tuple:
    if hint is Any:
        return ("any",)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        arms = tuple(a for a in args if a is not type(None))
        nullable = len(arms) < len(args)
        if len(arms) == 1:
            return ("optional" if nullable else "same", arms[0])
        return ("union", arms, nullable, Union[arms])
    if origin is Literal:
        return ("literal", args)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return ("dataclass", hint)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return ("enum", hint)
    if origin in (tuple, list) or hint in (tuple, list):
        container = origin or hint
        if container is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            return ("fixed", args)
        return ("seq", args[0] if args else Any, container)
    if origin in (dict, collections.abc.Mapping) or hint in (dict, collections.abc.Mapping, typing.Mapping):
        return ("map", args[1] if args else Any)
    if isinstance(hint, type):
        return ("scalar", hint)
    raise TypeError(f"no conversion for {hint!r}")  # a programming error in an annotation


# -- classes: their fields and spellings, worked out once per class and policy -----------------------------


class _Spec:
    __slots__ = ("hints", "by_key", "known", "required", "keep", "post_load")


_SPECS: dict[tuple, _Spec] = {}


def _default_keys(cls, f: dataclasses.Field) -> tuple:
    return (f.name,)


def _default_include(f: dataclasses.Field) -> bool:
    return f.init


class Loader:
    """One use's policy for reading mappings into dataclasses; ``load`` and ``convert`` do the walk.

    ``error(path, reason)`` makes the exception to raise (default ``LoadError``); ``warn(path, reason)``
    reports what the ``"warn"`` policy lets through; ``mismatch(hint, value, path)`` words a value of the
    wrong type.  Subclasses may override the three as methods instead (a per-file context, say).

    ``unknown``: ``"error"`` (with a did-you-mean), ``"warn"`` (a near miss of a known key is still an
    error: a typo silently ignored is a setting silently lost), ``"keep"`` (into the class's
    ``keep_field``, when it has one; otherwise ignored) or ``"ignore"``.  ``suggest_cutoff`` and
    ``fold_case`` tune the did-you-mean.

    ``keys(cls, field)``: the field's spellings, documented first (default: its name); ``case_aliases``
    adds the snake_case and camelCase of each.  ``include(field)``: which fields are keys at all
    (default: those ``__init__`` takes).  ``duplicates``: two spellings of one field are an ``"error"``
    or the ``"first"`` wins.  ``none_is_missing``: a ``null`` value is the key left out.
    ``none_as_empty``: ``null`` where a dataclass is expected is an empty mapping.

    ``scalars``: type -> converter (returns the value, or ``NO``), over ``JSON_SCALARS``.  ``mapping``:
    what a ``dict``/``Mapping`` hint's value becomes (called with a dict); ``mapping_key`` converts its
    keys; ``mapping_null``, if given, is what a ``null`` value in one becomes.
    """

    def __init__(
        self,
        *,
        error: Optional[Callable[[str, str], Exception]] = None,
        warn: Optional[Callable[[str, str], None]] = None,
        mismatch: Optional[Callable[[Any, Any, str], str]] = None,
        unknown: str = "error",
        suggest_cutoff: float = 0.6,
        fold_case: bool = False,
        keys: Callable[[type, dataclasses.Field], tuple] = _default_keys,
        case_aliases: bool = False,
        include: Callable[[dataclasses.Field], bool] = _default_include,
        keep_field: str = "other_keys",
        duplicates: str = "error",
        none_is_missing: bool = False,
        none_as_empty: bool = False,
        scalars: Optional[Mapping[type, Callable[[Any], Any]]] = None,
        mapping: Callable[[dict], Any] = dict,
        mapping_key: Optional[Callable[[Any], Any]] = None,
        mapping_null: Any = CONVERT,
    ):
        if unknown not in ("error", "warn", "keep", "ignore"):
            raise ValueError(f"unknown={unknown!r}")
        if duplicates not in ("error", "first"):
            raise ValueError(f"duplicates={duplicates!r}")
        if error is not None:
            self.error = error
        if warn is not None:
            self.warn = warn
        if mismatch is not None:
            self.mismatch = mismatch
        self.unknown = unknown
        self.suggest_cutoff = suggest_cutoff
        self.fold_case = fold_case
        self.keys = keys
        self.case_aliases = case_aliases
        self.include = include
        self.keep_field = keep_field
        self.duplicates = duplicates
        self.none_is_missing = none_is_missing
        self.none_as_empty = none_as_empty
        self.scalars = {**JSON_SCALARS, **(scalars or {})}
        self.mapping = mapping
        self.mapping_key = mapping_key
        self.mapping_null = mapping_null
        self._spec_key = (keys, case_aliases, include, keep_field)

    # -- hooks (override, or pass to the constructor) --

    def error(self, path: str, reason: str) -> Exception:
        return LoadError(path, reason)

    def warn(self, path: str, reason: str) -> None:
        pass

    def mismatch(self, hint, value, path: str) -> str:
        return json_mismatch(hint, value, path)

    # -- the walk --

    def load(self, cls, value, path: str = ""):
        """Dataclass ``cls`` from the mapping ``value`` found at ``path``."""
        if value is None and self.none_as_empty:
            value = {}
        if not isinstance(value, dict):
            raise self.error(path, self.mismatch(cls, value, path))
        spec = self.spec(cls)
        by_key = spec.by_key
        kwargs: dict[str, Any] = {}
        given_as: dict[str, str] = {}
        kept: Optional[dict] = None
        for raw_key, item in value.items():
            key = raw_key if type(raw_key) is str else str(raw_key)
            f = by_key.get(key)
            if f is None:
                if self.unknown == "keep":
                    if spec.keep is not None:
                        if kept is None:
                            kept = {}
                        kept[raw_key] = item
                elif self.unknown != "ignore":
                    self._unknown(spec, path, key)
                continue
            if item is None and self.none_is_missing:
                continue
            name = f.name
            if name in given_as:
                if self.duplicates == "first":
                    continue
                raise self.error(join(path, key), f"given twice (also as '{given_as[name]}')")
            given_as[name] = key
            where = f"{path}.{key}" if path else key
            parse = f.metadata.get("parse")
            if parse:
                kwargs[name] = parse(item, where, self)
                continue
            converted = self.convert(spec.hints[name], item, where)
            check = f.metadata.get("check")
            if check is not None:
                try:
                    converted = check(converted)
                except ValueError as e:
                    raise self.error(where, str(e)) from None
            kwargs[name] = converted
        for name, key in spec.required:
            if name not in kwargs:
                raise self.error(join(path, key), "is required")
        if kept:
            kwargs[spec.keep] = kept
        if spec.post_load is not None:
            kwargs = spec.post_load(kwargs, path, self)
        return cls(**kwargs)

    def convert(self, hint, value, path: str):
        """``value`` as the type ``hint`` says, or the error naming ``path``."""
        shape = _shape(hint)
        tag = shape[0]
        if tag == "scalar":
            conv = self.scalars.get(shape[1])
            if conv is None:
                raise TypeError(f"no conversion for {hint!r}")  # a programming error in an annotation
            out = conv(value)
            if out is NO:
                raise self.error(path, self.mismatch(hint, value, path))
            return out
        if tag == "optional":
            return None if value is None else self.convert(shape[1], value, path)
        if tag == "any":
            return value
        if tag == "same":
            return self.convert(shape[1], value, path)
        if tag == "dataclass":
            return self.load(shape[1], value, path)
        if tag == "seq":
            if not isinstance(value, list):
                raise self.error(path, self.mismatch(hint, value, path))
            elem = shape[1]
            return shape[2](self.convert(elem, item, f"{path}[{i}]") for i, item in enumerate(value))
        if tag == "map":
            if not isinstance(value, dict):
                raise self.error(path, self.mismatch(hint, value, path))
            vt, mk, null = shape[1], self.mapping_key, self.mapping_null
            return self.mapping({
                (mk(k) if mk else k): (null if v is None and null is not CONVERT else self.convert(vt, v, f"{path}.{k}"))
                for k, v in value.items()
            })
        if tag == "union":
            arms, nullable, bare = shape[1], shape[2], shape[3]
            if value is None and nullable:
                return None
            for arm in arms:
                try:
                    return self.convert(arm, value, path)
                except Exception:  # this arm does not fit: try the next
                    continue
            raise self.error(path, self.mismatch(bare, value, path))
        if tag == "literal":
            for choice in shape[1]:
                if value == choice and type(value) is type(choice):
                    return choice
            raise self.error(path, self.mismatch(hint, value, path))
        if tag == "enum":
            try:
                return shape[1](value)
            except ValueError:
                raise self.error(path, self.mismatch(hint, value, path)) from None
        if tag == "fixed":
            if not isinstance(value, list) or len(value) != len(shape[1]):
                raise self.error(path, self.mismatch(hint, value, path))
            return tuple(self.convert(t, item, f"{path}[{i}]") for i, (t, item) in enumerate(zip(shape[1], value)))
        raise AssertionError(tag)  # pragma: no cover

    # -- classes --

    def spec(self, cls) -> _Spec:
        """``cls``'s hints and key spellings under this loader's policy, once per class and policy
        (``typing.get_type_hints`` evaluates every annotation string again on each call)."""
        spec = _SPECS.get((cls, self._spec_key))
        if spec is None:
            spec = _SPECS[(cls, self._spec_key)] = self._work_out_spec(cls)
        return spec

    def _work_out_spec(self, cls) -> _Spec:
        spec = _Spec()
        spec.hints = typing.get_type_hints(cls)
        spec.by_key = {}
        declared: list[str] = []
        spec.required = []
        spec.keep = None
        for f in dataclasses.fields(cls):
            if f.name == self.keep_field:
                spec.keep = f.name
                continue
            if not self.include(f):
                continue
            names = tuple(self.keys(cls, f))
            declared += names
            for name in names:
                spellings = (name, snake(name), camel(name)) if self.case_aliases else (name,)
                for spelling in spellings:
                    spec.by_key.setdefault(spelling, f)
            no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if no_default or f.metadata.get("required"):
                spec.required.append((f.name, names[0] if names else f.name))
        #: the spellings a did-you-mean picks from, documented ones first
        spec.known = list(dict.fromkeys(declared + list(spec.by_key)))
        spec.post_load = getattr(cls, "__post_load__", None)
        return spec

    def suggest(self, key: str, known) -> Optional[str]:
        """The known key ``key`` is a near miss of, if any."""
        if not self.fold_case:
            close = difflib.get_close_matches(key, known, n=1, cutoff=self.suggest_cutoff)
            return close[0] if close else None
        by_lower: dict[str, str] = {}
        for name in known:  # documented spellings come first and win
            by_lower.setdefault(name.lower(), name)
        close = difflib.get_close_matches(key.lower(), by_lower, n=1, cutoff=self.suggest_cutoff)
        return by_lower[close[0]] if close else None

    def _unknown(self, spec: _Spec, parent: str, key: str) -> None:
        path = join(parent, key)
        guess = self.suggest(key, spec.known)
        if guess is not None:
            raise self.error(path, f"unknown key; did you mean '{guess}'?")
        if self.unknown == "error":
            raise self.error(path, "unknown key")
        self.warn(path, "unknown key, ignored")
