"""File names made from values we do not control (Call-IDs, session ids, tags, API input).

A SIP Call-ID may legally be hundreds of bytes long and hold ``/``, ``..``,
quotes or any UTF-8; a session id or ``recorderFile`` comes from an API
client.  Every file the daemon names after such a value gets its name from
``safe_file_part``:

- an *ordinary* value (at most ``MAX_PLAIN`` characters of ``[A-Za-z0-9._@+=-]``,
  not starting with ``.``) is used as it is, so the usual names stay what
  clients and docs expect (``<callId>.events.jsonl``, ``<id>.wav``);
- anything else becomes a readable prefix (unsafe characters as ``_``, at
  most ``PREFIX_CHARS`` characters, no leading dot) plus ``~`` and the first
  16 hex digits of the SHA-256 of the whole value.  ``~`` never appears in an
  ordinary name, and the hash covers the full value, so two different ids
  never share a file (``a/b`` and ``a_b`` used to), and no name can leave
  its directory or exceed the file system's 255-byte limit.

This module imports nothing of the daemon's: sip, media and speech code may use it.
"""

from __future__ import annotations

import hashlib
import re
import string
from typing import Optional

#: longest value used unchanged (file systems allow 255 bytes; suffixes and temp-file
#: decorations such as ``YYYYMMDD-HHMMSS_``, ``.events.jsonl`` and ``.<random>.tmp`` need room)
MAX_PLAIN = 128
#: readable characters kept in front of the hash of a value that is not ordinary
PREFIX_CHARS = 64
HASH_HEX = 16

_SAFE = re.compile(r"[A-Za-z0-9._@+=-]+")
_UNSAFE = re.compile(r"[^A-Za-z0-9._@+=-]")


def is_ordinary(text: str) -> bool:
    """``text`` can name a file as it is."""
    return (0 < len(text) <= MAX_PLAIN and _SAFE.fullmatch(text) is not None
            and not text.startswith("."))


def value_hash(text: str) -> str:
    """The short hash of ``text`` (its UTF-8 bytes; lone surrogates from JSON escapes included)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_HEX]


def safe_file_part(text) -> str:
    """``text`` usable as (part of) one file name: unchanged when ordinary, else
    ``<sanitised prefix>~<hash>`` (at most ``PREFIX_CHARS + 1 + HASH_HEX`` characters)."""
    text = "" if text is None else str(text)
    if is_ordinary(text):
        return text
    prefix = _UNSAFE.sub("_", text[:PREFIX_CHARS]).lstrip(".")
    return f"{prefix}~{value_hash(text)}"


#: placeholders of a recording file name: ``{id}`` (the session id), ``{caller}``/``{callee}`` (their
#: user parts), ``{date}`` (YYYYMMDD), ``{time}`` (HHMMSS), ``{datetime}`` (YYYYMMDD-HHMMSS),
#: ``{timestamp}`` (Unix seconds), ``{direction}`` (inbound/outbound), ``{call_type}``: all of the
#: call's start, in UTC.  Every value goes through ``safe_file_part`` (no ``/``, no ``..``).
PATTERN_FIELDS = ("id", "caller", "callee", "date", "time", "datetime", "timestamp", "direction", "call_type")


def check_pattern(template: str) -> str:
    """A file-name template with known placeholders only; raises ValueError naming a bad one."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"{template!r} is not a valid pattern: {e}") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in PATTERN_FIELDS or spec or conversion:
            raise ValueError(f"unknown placeholder {{{name}}} (known: {', '.join('{%s}' % f for f in PATTERN_FIELDS)})")
    return template


def expand_pattern(template: str, session_id: str, fields: Optional[dict] = None) -> str:
    """``template`` with its placeholders replaced; an unknown placeholder is left as written."""
    values = {"id": session_id, **(fields or {})}

    def one(match):
        name = match.group(1)
        if name not in values:
            return match.group(0)
        return safe_file_part(str(values[name]) or "-")

    return re.sub(r"\{([a-z_]+)\}", one, template)


__all__ = ["MAX_PLAIN", "PATTERN_FIELDS", "PREFIX_CHARS", "check_pattern", "expand_pattern", "is_ordinary",
           "safe_file_part", "value_hash"]
