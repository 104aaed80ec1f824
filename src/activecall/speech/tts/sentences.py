"""Sentence splitting, so long texts start playing after the first sentence is synthesised."""

from __future__ import annotations

import re

_SPLIT = re.compile(r"(?<=[.!?;:。！？；])\s+|(?<=[。！？；])")


def split_sentences(text: str, max_chars: int = 400) -> list[str]:
    """Non-empty sentences of ``text``; overlong ones are cut at a space near ``max_chars``."""
    out: list[str] = []
    for part in _SPLIT.split(text):
        part = part.strip()
        while len(part) > max_chars:
            cut = part.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            out.append(part[:cut].strip())
            part = part[cut:].strip()
        if part:
            out.append(part)
    return out
