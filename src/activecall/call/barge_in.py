"""Pause, then decide: what the bot does when the caller's voice starts over its speech.

Stopping the bot on the first sound makes a cough, a door or "uh-huh" end its turn for good; stopping
only on recognised words takes half a second.  So the two are split:

1. **pause** (fast, acoustic): ``minSpeechMs`` of voiced VAD windows (after the echo guard in
   ``speech/echo.py``, so never the bot's own voice) while the bot sounds → the playout fades out over
   ``volumeFadeMs`` and holds where it is (``Playback.hold``);
2. **decide** (on words): words from the recogniser (``minWords`` of them, not only backchannel or
   filler words when ``backchannel`` / ``fillerWordFilter`` is set) → the track is stopped and flushed
   (``interruption`` + ``trackEnd``); no words within ``falseInterruptionMs`` and the caller quiet →
   the playout resumes where it stopped (a ``metrics`` event ``interruption.resumed``).

A playbook decides itself (``playbook/llm_strategy.py``: the words also cancel the LLM reply): it sets
``decides = False``.  A ``/call`` client that asks for server-side barge-in with the ✱ ``interruption``
call option gets the decision made here.  Without either nothing is paused: the client drives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from difflib import SequenceMatcher
from typing import Any, Mapping, Optional

import numpy as np
from twisted.logger import Logger

from activecall.backlink import back_link
from activecall.media.tracks import TtsTrack
from activecall.protocol import events as ev

log = Logger(namespace="activecall.call.barge_in")

STRATEGIES = ("both", "vad", "asr", "none")

#: short acknowledgements that do not take the turn (``backchannel: true``)
BACKCHANNELS = ("uh-huh", "uh huh", "uhhuh", "mm-hmm", "mhm", "mm", "hmm", "uh", "um", "yeah", "yep", "yes",
                "right", "okay", "ok", "sure", "i see", "嗯", "嗯嗯", "哦", "对", "对对", "好", "好的", "是")

#: recognised words over the bot that are this share of its own recent words are its echo
ECHO_SHARE = 0.6
#: a recognised word this like one of the bot's (difflib ratio) counts as that word (pocketsphinx
#: mangles echo: "library" -> "liberty")
ECHO_WORD_LIKENESS = 0.75

_NOT_WORD = re.compile(r"[^\w\u4e00-\u9fff]+")


@dataclass(frozen=True)
class InterruptionPolicy:
    """Barge-in options; the names on the wire and in playbooks are in ``KEYS``."""

    strategy: str = "both"
    pause_on_voice: bool = True
    min_speech_ms: int = 60
    false_interruption_ms: int = 1500
    min_words: int = 1
    backchannel: bool = False
    filler_word_filter: bool = False
    volume_fade_ms: int = 20
    ignore_first_ms: int = 0
    echo_cancel: bool = True

    KEYS = {"strategy": "strategy", "pauseOnVoice": "pause_on_voice", "minSpeechMs": "min_speech_ms",
            "falseInterruptionMs": "false_interruption_ms", "resumeAfterMs": "false_interruption_ms",
            "minWords": "min_words", "backchannel": "backchannel", "fillerWordFilter": "filler_word_filter",
            "volumeFadeMs": "volume_fade_ms", "ignoreFirstMs": "ignore_first_ms", "echoCancel": "echo_cancel"}

    @classmethod
    def from_mapping(cls, values: Optional[Mapping[str, Any]], **defaults) -> "InterruptionPolicy":
        """From wire/playbook keys (None values are left at their default); bad values raise ValueError."""
        kw = dict(defaults)
        types = {f.name: f.type for f in fields(cls)}
        for key, value in (values or {}).items():
            name = cls.KEYS.get(key)
            if name is None or value is None:
                continue
            kind = types[name]
            if kind == "bool":
                if not isinstance(value, bool):
                    raise ValueError(f"interruption.{key}: expected true or false, got {value!r}")
            elif kind == "int":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                    raise ValueError(f"interruption.{key}: expected a non-negative number, got {value!r}")
                value = int(value)
            elif kind == "str":
                value = str(value).lower()
                if value not in STRATEGIES:
                    raise ValueError(f"interruption.{key}: must be one of {', '.join(STRATEGIES)}, not {value!r}")
            kw[name] = value
        return cls(**kw)

    @property
    def pauses(self) -> bool:
        return self.pause_on_voice and self.strategy in ("both", "vad")


def _squeeze(text: str) -> str:
    return _NOT_WORD.sub("", text.lower())


def word_count(text: str) -> int:
    """Words in ``text``; each CJK character counts as one."""
    text = text or ""
    cjk = len(re.findall(r"[\u4e00-\u9fff]", text))
    latin = len(re.findall(r"[^\W\u4e00-\u9fff]+", re.sub(r"[\u4e00-\u9fff]", " ", text)))
    return cjk + latin


def only_words_from(text: str, words) -> bool:
    """``text`` holds nothing but words from ``words`` (any number of them, any punctuation)."""
    squeezed = _squeeze(text)
    if not squeezed:
        return True
    vocabulary = sorted({_squeeze(w) for w in words} - {""}, key=len, reverse=True)
    if not vocabulary:
        return False
    return re.fullmatch("(?:%s)+" % "|".join(map(re.escape, vocabulary)), squeezed) is not None


def _words(text: str) -> list[str]:
    """Lower-case words of ``text``; each CJK character is one."""
    text = re.sub(r"([\u4e00-\u9fff])", r" \1 ", (text or "").lower())
    return re.findall(r"[^\W_]+(?:'[^\W_]+)?", text)


def _like(word: str, others: set) -> bool:
    if word in others:
        return True
    if len(word) < 3:
        return False
    return any(len(o) >= 3 and SequenceMatcher(None, word, o).ratio() >= ECHO_WORD_LIKENESS for o in others)


def echoes_the_bot(text: str, bot_words) -> bool:
    """Recognised ``text`` is the bot's own voice coming back: at least ``ECHO_SHARE`` of its words (all
    of them when there are one or two) are, or sound like, words the bot was saying around then.  A
    recogniser given leaked echo makes words of the bot's sentence (often mangled); a caller talking
    over the bot says their own."""
    heard = _words(text)
    said = set(_words(" ".join(bot_words)))
    if not heard or not said:
        return False
    matched = sum(1 for w in heard if _like(w, said))
    need = len(heard) if len(heard) <= 2 else int(np.ceil(ECHO_SHARE * len(heard)))
    return matched >= need


def takes_the_turn(policy: InterruptionPolicy, text: str, fillers=(), bot_words=()) -> bool:
    """Whether recognised ``text`` spoken over the bot stops it (minWords, backchannel, filler filter;
    never the bot's own words: ``bot_words`` are what it was saying, ``echoes_the_bot``)."""
    text = (text or "").strip()
    if word_count(text) < max(policy.min_words, 1):
        return False
    if bot_words and echoes_the_bot(text, bot_words):
        return False
    ignored: tuple = ()
    if policy.backchannel:
        ignored += BACKCHANNELS + tuple(fillers)
    if policy.filler_word_filter:
        ignored += tuple(fillers)
    if ignored and only_words_from(text, ignored):
        return False
    return True


def bot_words(track) -> list[str]:
    """What the bot was saying around the playout point of ``track`` (a TTS track), for
    ``takes_the_turn``'s echo test; nothing for other tracks."""
    words_around = getattr(track, "words_around", None)
    return words_around() if words_around is not None else []


class BargeIn:
    """One call's pause-then-decide controller (see the module docstring)."""

    #: the call's session; weak once the call has ended (activecall/backlink.py)
    session = back_link()

    #: while the caller is still voiced at the end of the wait, look again this much later (s)
    RECHECK = 0.2

    def __init__(self, session, policy: Optional[InterruptionPolicy] = None, decides: bool = True):
        self.session = session
        self.clock = session.clock
        self.policy = policy
        self.decides = decides
        self.fillers: tuple = ()
        self._voiced_ms = 0
        self._speaking = False  # VAD segment open (speaking .. silence)
        self._timer = None
        self._paused_at: Optional[float] = None
        self._track = None
        #: counters (metrics, tests)
        self.pauses = 0
        self.resumes = 0
        self.stops = 0

    @classmethod
    def attach(cls, session, policy=None, decides: bool = True) -> "BargeIn":
        controller = cls(session, policy, decides)
        session.listeners.append(controller.event)
        session.barge_in = controller
        return controller

    def configure(self, policy: Optional[InterruptionPolicy], decides: bool, fillers=()) -> None:
        self.policy = policy
        self.decides = decides
        self.fillers = tuple(fillers)
        if policy is None or not policy.pauses:
            self._resume()

    @property
    def holding(self) -> bool:
        return self._paused_at is not None

    # -- inputs --------------------------------------------------------------------------------

    def voice_window(self, start_ms: int, length_ms: int, probability: float, threshold: float) -> None:
        """One VAD window of the caller's (echo-guarded) audio."""
        if probability >= threshold:
            self._voiced_ms += length_ms
        else:
            self._voiced_ms = 0
            return
        p = self.policy
        if p is None or not p.pauses or self.holding or self._voiced_ms < max(p.min_speech_ms, 1):
            return
        playback = self.session.playback
        track = playback.current
        if not isinstance(track, TtsTrack):
            return  # only the bot's speech: not a file, music on hold or a bridged party
        if track.stopped or playback.paused or playback.held or track.frames_played == 0:
            return
        if p.ignore_first_ms and track.frames_played * 20 < p.ignore_first_ms:
            return
        self._pause(track)

    def event(self, event) -> None:
        if isinstance(event, ev.Speaking):
            self._speaking = True
            if self.holding and self.decides and self.policy is not None and self.policy.strategy == "vad":
                self._stop("voice")
        elif isinstance(event, ev.Silence):
            self._speaking = False
        elif isinstance(event, (ev.AsrDelta, ev.AsrFinal)):
            if self.holding and self.decides and self.policy is not None \
                    and self.policy.strategy in ("both", "asr") \
                    and takes_the_turn(self.policy, event.text, self.fillers, bot_words(self._track)):
                self._stop("words")
        elif isinstance(event, (ev.TrackEnd, ev.Interruption, ev.Hangup, ev.End)):
            if self.holding and (self.session.playback.current is not self._track
                                 or isinstance(event, (ev.Hangup, ev.End))):
                self._clear()

    # -- actions --------------------------------------------------------------------------------

    def _pause(self, track) -> None:
        p = self.policy
        self.session.playback.hold(p.volume_fade_ms)
        self._paused_at = self.clock.seconds()
        self._track = track
        self.pauses += 1
        s = self.session
        s.emit(ev.Metrics(timestamp=s.now(), key="interruption.paused", duration=self._voiced_ms,
                          data={"playId": track.play_id, "current": track.played_ms}))
        self._arm(p.false_interruption_ms / 1000.0)

    def _arm(self, delay: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self.clock.callLater(delay, self._waited)

    def _waited(self) -> None:
        self._timer = None
        if not self.holding:
            return
        if self._track is not self.session.playback.current or self._track.stopped:
            self._clear()
            return
        if self._speaking or self._voiced_ms > 0:
            self._arm(self.RECHECK)  # the caller still talks: no verdict yet
            return
        self._resume()

    def _resume(self) -> None:
        if not self.holding:
            return
        track, paused_at = self._track, self._paused_at
        self._clear()
        playback = self.session.playback
        if track is None or playback.current is not track or track.stopped:
            return
        playback.release(self.policy.volume_fade_ms if self.policy else 20)
        self.resumes += 1
        s = self.session
        s.emit(ev.Metrics(timestamp=s.now(), key="interruption.resumed",
                          duration=int(round((self.clock.seconds() - paused_at) * 1000)),
                          data={"playId": track.play_id, "current": track.played_ms}))

    def _stop(self, why: str) -> None:
        track = self._track
        self._clear()
        playback = self.session.playback
        if track is None or playback.current is not track:
            return
        self.stops += 1
        log.info("call {id}: barge-in ({why}), playout flushed", id=self.session.id, why=why)
        playback.stop_current(interrupted=True)

    def _clear(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._paused_at = None
        self._track = None

    def close(self) -> None:
        self._clear()
