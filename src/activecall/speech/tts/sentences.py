"""Sentence splitting, so long texts start playing after the first sentence is synthesised, and the
first-chunk cut of synthesisers whose cost grows with the audio (piper), so the first audio comes sooner."""

from __future__ import annotations

import re

_SPLIT = re.compile(r"(?<=[.!?;:。！？；])\s+|(?<=[。！？；])")
_CLAUSE_END = re.compile(r"[,;:，、；：]$")

#: the first chunk is cut at a clause end or a phrase break once it has this many words
FIRST_CHUNK_MIN_WORDS = 3
#: a first chunk longer than this (characters) is cut at a phrase break when there is one: for the piper
#: voice ~1.5 s of speech, ~0.15 s of one core to synthesise here (docs/speech.md, "Piper first audio")
FIRST_CHUNK_MAX_CHARS = 24
#: where an English phrase may break with a short pause that still sounds natural: before a conjunction, a
#: preposition, an infinitive's "to" or a copula (after a subject of three words or more)
BREAK_BEFORE = frozenset("""to and or but for with about in on at from by into after before until while because
    so if when that which who is are was were""".split())
#: where it may break when there is no such word early enough: before a determiner (a verb and its object)
WEAK_BREAK_BEFORE = frozenset("the a an my your our their his her its this these those".split())


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


def first_chunk_split(sentence: str) -> list[str]:
    """``sentence`` as [first chunk, rest] (or [sentence] when no cut is worth it): after its first clause
    end (``, ; :``) that closes at least FIRST_CHUNK_MIN_WORDS words; then, if that first chunk is longer than
    FIRST_CHUNK_MAX_CHARS, before the first word of BREAK_BEFORE (else WEAK_BREAK_BEFORE) that leaves at least
    FIRST_CHUNK_MIN_WORDS words and at most FIRST_CHUNK_MAX_CHARS before it and two words or more after it,
    marked with a comma so the voice pauses there as at a clause.

    "Please send the invoice to Maria Johnson." -> ["Please send the invoice,", "to Maria Johnson."].
    The text a call sends in one ``tts`` command is cut here, for every call type; a playbook's LLM reply
    is already cut at its first clause while it streams (``playbook/tags.py``, ``first_clause_chars``)."""
    words = sentence.split()
    first = len(words)
    for i, word in enumerate(words[:-1]):
        if _CLAUSE_END.search(word) and i + 1 >= FIRST_CHUNK_MIN_WORDS:
            first = i + 1
            break
    if len(" ".join(words[:first])) > FIRST_CHUNK_MAX_CHARS:
        for breaks in (BREAK_BEFORE, WEAK_BREAK_BEFORE):
            cut = None
            for i in range(FIRST_CHUNK_MIN_WORDS, min(first, len(words) - 1)):  # two words or more after it
                if len(" ".join(words[:i])) > FIRST_CHUNK_MAX_CHARS:
                    break
                if words[i].lower().strip("\"'(") in breaks and not _CLAUSE_END.search(words[i - 1]):
                    cut = i
                    break
            if cut is not None:
                return [" ".join(words[:cut]) + ",", " ".join(words[cut:])]
    if first < len(words):
        return [" ".join(words[:first]), " ".join(words[first:])]
    return [sentence]


def speech_chunks(text: str, max_chars: int = 400) -> list[str]:
    """The sentences of ``text``, the first one cut by ``first_chunk_split``."""
    sentences = split_sentences(text, max_chars)
    if sentences:
        sentences[0:1] = first_chunk_split(sentences[0])
    return sentences
