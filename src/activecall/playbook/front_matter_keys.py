"""Every playbook front-matter key and what becomes of it (docs/playbooks.md, "Front matter keys").

The media sections (``asr``, ``tts``, ``vad``, ``recorder``, ``denoise``, ``ambiance``, ``eou``) become the
call's option and are judged by ``protocol/option_keys.py`` when the call is answered.  The others are
the playbook's own: ``REFUSED`` names those with no effect yet; when a playbook sets one (to anything but
its default) the call gets ``error{sender:"playbook",code:501}`` naming it as the playbook starts.
Making one work is one line: drop it from ``REFUSED``.  ``tests/test_option_keys.py`` checks that this
table covers every field of ``front_matter.FrontMatter``.
"""

from __future__ import annotations

import dataclasses
import functools
import typing

from activecall.playbook import front_matter as fm

#: front-matter sections that become the call's option (checked by protocol/option_keys.py)
MEDIA_SECTIONS = ("asr", "tts", "vad", "recorder", "denoise", "ambiance", "eou")

_SIP_OPTION = "a playbook does not place or answer its call; give it in the call's option (sip.*) instead"

#: documented spelling (dotted) -> why it has no effect
REFUSED: dict[str, str] = {
    "interruption.minSpeechMs": "barge-in waits for the VAD's speechPadding, not a playbook minimum",
    "interruption.volumeFadeMs": "an interrupted track stops at once (no fade-out)",
    "sip.username": _SIP_OPTION,
    "sip.password": _SIP_OPTION,
    "sip.realm": _SIP_OPTION,
    "sip.contact": _SIP_OPTION,
    "sip.headers": _SIP_OPTION,
    "sip.extract_headers[].pattern": "the header is read whole; no pattern is applied",
}


def field_paths(cls=fm.FrontMatter, prefix: str = "") -> list[str]:
    """Every key of the front matter in its documented spelling, sections first (``llm``, ``llm.model``)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        keys = f.metadata.get("keys")
        if not keys:
            continue
        path = prefix + keys[0]
        out.append(path)
        args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)]
        inner = args[0] if args else hints[f.name]
        if dataclasses.is_dataclass(inner):
            out.extend(field_paths(inner, path + "."))
    return out


@functools.lru_cache(maxsize=None)
def _field_name(cls, key: str):
    """The attribute of dataclass ``cls`` documented as ``key`` (None: no such key); the classes are
    fixed, so each answer is worked out once (``refusals`` runs on every playbook call)."""
    return next((f.name for f in dataclasses.fields(cls) if (f.metadata.get("keys") or (None,))[0] == key), None)


def _value(config, path: str):
    value = config
    for part in path.split("."):
        if value is None:
            return None
        name = _field_name(type(value), part)
        if name is None:
            return None
        value = getattr(value, name)
    return value


@functools.lru_cache(maxsize=None)
def _default(cls, path: str):
    *parents, last = path.split(".")
    section = cls()
    for part in parents:
        section = _value(section, part)
    f = next(f for f in dataclasses.fields(section) if (f.metadata.get("keys") or (None,))[0] == last)
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def refusals(config: fm.FrontMatter) -> list[tuple[str, str]]:
    """``(key, reason)`` for each refused key the playbook sets."""
    out = []
    for path, reason in REFUSED.items():
        if path == "sip.extract_headers[].pattern":
            if config.sip is not None and config.sip.extract_patterns:
                out.append((path, reason))
            continue
        value = _value(config, path)
        if value is not None and value != _default(fm.FrontMatter, path) and value != {}:
            out.append((path, reason))
    return out
