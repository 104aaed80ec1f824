"""Helpers for tests and benchmarks: labelled speech made with flite, word error rate.

Kept in the package (like ``treq.testing``) so tests and bench/ share one way
of making audio whose speech extents are known.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from twisted.internet import defer

from activecall.audio import SAMPLE_RATE
from activecall.speech.base import TtsOptions


def synthesize_pcm(text: str, voice: str = "rms", reactor=None) -> defer.Deferred:
    """Deferred int16 16 kHz audio of ``text`` spoken by flite."""
    from activecall.speech.tts.flite import FliteSynthesizer
    out: list = []
    synth = FliteSynthesizer(TtsOptions(speaker=voice), reactor=reactor)
    return synth.synthesize(text, out.append).addCallback(
        lambda _: np.concatenate(out) if out else np.zeros(0, dtype=np.int16))


def speech_extent(pcm: np.ndarray, level: int = 300) -> tuple[int, int]:
    """First and last sample above ``level`` (flite pads its output with near-silence)."""
    loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > level)
    return (int(loud[0]), int(loud[-1]) + 1) if loud.size else (0, 0)


@dataclass
class LabelledAudio:
    pcm: np.ndarray
    segments: list  # (start_ms, end_ms) of each utterance's audible part


@defer.inlineCallbacks
def labelled_speech(texts, gap_ms=(1200,), noise_dbfs: float = -50.0, seed: int = 1, voice: str = "rms"):
    """Utterances separated by quiet gaps (cycled from ``gap_ms``) over low white noise."""
    rng = np.random.default_rng(seed)
    parts, segments, pos = [], [], 0
    for i, text in enumerate(texts):
        gap = np.zeros(gap_ms[i % len(gap_ms)] * SAMPLE_RATE // 1000, dtype=np.int16)
        parts.append(gap)
        pos += gap.size
        pcm = yield synthesize_pcm(text, voice)
        a, b = speech_extent(pcm)
        segments.append(((pos + a) * 1000 // SAMPLE_RATE, (pos + b) * 1000 // SAMPLE_RATE))
        parts.append(pcm)
        pos += pcm.size
    parts.append(np.zeros(gap_ms[0] * SAMPLE_RATE // 1000, dtype=np.int16))
    audio = np.concatenate(parts).astype(np.float64)
    audio += rng.normal(0.0, 32768 * 10 ** (noise_dbfs / 20), audio.size)
    return LabelledAudio(np.clip(np.rint(audio), -32768, 32767).astype(np.int16), segments)


def _words(text: str) -> list[str]:
    return [w for w in "".join(c.lower() if c.isalnum() or c in "' " else " " for c in text).split()]


def word_edits(ref: list, hyp: list) -> int:
    """Levenshtein distance between two word lists (substitutions, insertions, deletions)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Levenshtein distance over words divided by the reference's word count."""
    ref = _words(reference)
    return word_edits(ref, _words(hypothesis)) / max(len(ref), 1)


def frames(pcm: np.ndarray, size: int = 320):
    """20 ms frames, the way the media clock hands them out."""
    for i in range(0, pcm.size, size):
        yield pcm[i:i + size]
