"""The LLM pipeline as a turn strategy: the caller's ``asrFinal`` -> LLM stream -> reply tags -> TTS.

One LLM reply is one ``playId``: its sentences are streamed to the TTS as they arrive and the last command
carries ``endOfStream``.  Tags in the reply act (hang up after the speech, transfer, play, switch scene,
set a variable, call HTTP, collect digits) and never reach the TTS; a reply that is a JSON command runs its
tools (``tools.apply_json_tools``) and may ask the model again.  The caller talking over the bot is a
barge-in.  LLM failures never leave dead air: an ``error`` event and ``llm.fallback`` is spoken instead
(``_llm_failed``, the one place that handles them).  Context features: repair of a false turn, rolling
summary.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from typing import Callable, Optional

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from activecall.backlink import back_link
from activecall.call.barge_in import bot_words, takes_the_turn
from activecall.playbook import prompts, tags
from activecall.playbook.strategy import ITurnStrategy
from activecall.playbook.templates import set_var
from activecall.playbook.tools import apply_json_tools
from activecall.protocol import commands as cmd
from activecall.protocol import events as ev

log = Logger(namespace="activecall.playbook")

#: an asrFinal younger than this suppresses barge-in (its trailing deltas must not cut the new reply)
STALE_FINAL_MS = 500
#: JSON mode: at most this many LLM rounds for one reply (tool results re-ask the model)
MAX_TOOL_ROUNDS = 3
#: context repair: an assistant line shorter than this, said within ``repairWindowMs``, is undone
REPAIR_MAX_CHARS = 15
#: rolling summary keeps this many recent messages
SUMMARY_KEEP = 6
#: a reply's first clause of at least this many characters goes to the TTS on its own (tags.ReplyParser):
#: the caller hears "Sure, Alice," while the rest is synthesised (docs/playbooks.md, "Replies")
FIRST_CLAUSE_CHARS = 12

#: what ``_ask`` gives when the model did not answer (cancelled, or failed and handled)
_NO_ANSWER = object()


def normalise(text: str) -> str:
    """What must match between a partial and the final for a preemptive answer to count: the words, with
    case, punctuation and white space ignored."""
    kept = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in (text or "").casefold())
    return " ".join(kept.split())


@dataclass
class Preemptive:
    """An LLM request started on a partial transcript before the end of turn; nothing of it is spoken until
    the final confirms it (its deltas wait in ``deltas``, then go to ``sink``).

    With ``speak_ahead`` (``llm.preemptiveTts``) its first sentence is also synthesised while the turn is
    judged: ``parser`` finds it in the buffered deltas, ``prepare(text)`` (the session's
    ``prepare_speech``) makes ``speech``, a ``call.playback.PreparedSpeech`` that plays only if the reply
    is adopted and its first ``tts`` says exactly that text."""

    text: str
    messages: list
    d: Optional[defer.Deferred] = None
    deltas: list = field(default_factory=list)
    sink: Optional[Callable[[str], None]] = None
    failed: bool = False
    speak_ahead: bool = False
    prepare: Optional[Callable[[str], object]] = None
    parser: Optional[tags.ReplyParser] = None
    speech: object = None  # call.playback.PreparedSpeech
    looked: bool = False  # the reply's first event was seen (a sentence to prepare, or something else)

    def on_delta(self, delta: str) -> None:
        if self.sink is not None:
            self.sink(delta)
            return
        self.deltas.append(delta)
        if self.speak_ahead and not self.looked:
            self._look(self.parser.feed(delta))

    def stream_done(self) -> None:
        """The model finished before the turn was confirmed: a reply of one short sentence is prepared too."""
        if self.speak_ahead and not self.looked and self.sink is None and not self.failed:
            self._look(self.parser.finish())

    def _look(self, events) -> None:
        """Only a reply that starts with a sentence is spoken ahead (a tag first, JSON: nothing prepared)."""
        if not events:
            return
        self.looked = True
        first = events[0]
        if isinstance(first, tags.Sentence) and first.text.strip() and self.prepare is not None:
            self.speech = self.prepare(first.text)


@dataclass
class Reply:
    """One LLM reply being streamed and spoken."""

    number: int
    play_id: str
    parser: tags.ReplyParser = field(default_factory=lambda: tags.ReplyParser(first_clause_chars=FIRST_CLAUSE_CHARS))
    started_ms: int = 0
    first_delta_ms: Optional[int] = None
    spoken: list = field(default_factory=list)  # sentences sent to the TTS
    spoke_on_play_id: bool = False  # a tts went out on the current play_id
    hangup: bool = False
    end_reason: Optional[str] = None  # "refer" when a transfer cannot be done here
    cancelled: bool = False
    llm: Optional[defer.Deferred] = None  # the LLM request in flight
    done: bool = False


@implementer(ITurnStrategy)
class LlmTurns:
    """The bot's turns are LLM replies; ``runner.llm`` is the model client."""

    name = "llm"

    #: the playbook runner; weak once the call has ended (activecall/backlink.py)
    runner = back_link()

    def __init__(self, runner):
        self.runner = runner
        self.llm_config = runner.llm_config
        self.reply: Optional[Reply] = None
        self.summary: Optional[str] = None  # rolling summary, kept across scene switches
        self.preemptive: Optional[Preemptive] = None  # a reply started on a stable partial
        self._speech = None  # the adopted preemptive reply's prepared first sentence, until it plays
        self._caller_quiet = False  # the VAD's last word on the caller: silence (no speech since)
        self._caller_speaking = False  # ... or speech (no silence since)
        self._voice_ended_ms: Optional[int] = None  # when the VAD's last speech segment ended
        self._stable = None  # DelayedCall: the partial has not changed for ``preemptive_stable_ms``
        self._filler = None  # DelayedCall: the reply is slow, say the wait filler
        self._filler_last = False  # the bot's last words were a filler (never two in a row)
        self._filler_index = 0

    # -- what the runner asks -------------------------------------------------------------------------

    def attach(self) -> None:
        pass

    def system_prompt(self) -> str:
        runner = self.runner
        scene = runner.playbook.scenes[runner.scene_id]
        return prompts.system_prompt(
            runner.render(scene.prompt), self.llm_config.features, self.llm_config.tool_instructions,
            runner.config.dtmf_collectors, self.summary)

    def begin(self) -> None:
        """The initial scene's ``<play>``, then the greeting or the LLM's opening line."""
        runner = self.runner
        log.debug("call {id}: playbook {source} started in scene {scene}", id=runner.session.id,
                  source=runner.playbook.source, scene=runner.scene_id)
        scene_play = runner.playbook.initial.play
        if scene_play:
            runner.send(cmd.Play(url=runner.render(scene_play), waitInputTimeout=None), wait=True)
        greeting = runner.playbook.greeting
        if greeting:
            text = runner.render(greeting)
            runner.send(cmd.Tts(text=text, playId="greeting", endOfStream=True,
                                waitInputTimeout=runner.wait_input_ms()))
            runner.history.append({"role": "assistant", "content": text})
            runner.last_bot_line_ms = runner.now()
            runner.emit_history("assistant", text)
        else:
            self.start_turn()

    def observe(self, event) -> None:
        # the VAD's view of the caller: a partial that arrives after its speech end covers the words up to a
        # pause (the recogniser decodes them there), so a preemptive reply need not wait for it to stay stable
        if isinstance(event, ev.Speaking):
            self._caller_quiet = False
            self._caller_speaking = True
        elif isinstance(event, ev.Silence):
            self._caller_quiet = True
            self._caller_speaking = False
            self._voice_ended_ms = self.runner.now()
        elif isinstance(event, ev.AsrFinal) and (self._caller_quiet or self._caller_speaking):
            # the turn is over: the next utterance's first words (the recogniser opens it before the VAD's
            # speech start is confirmed) are not the words up to a pause; wait for the VAD's silence again
            self._caller_quiet = False
            self._caller_speaking = True

    def scene_changed(self) -> None:
        pass

    def stop(self) -> None:
        self._drop_preemptive("cancelled")
        self.cancel(keep_partial=True)

    def caller_said(self, event: ev.AsrFinal) -> None:
        runner = self.runner
        text = (event.text or "").strip()
        if not text or runner.hanging_up:
            return
        interruption = runner.config.interruption
        if (interruption.filler_word_filter and runner.is_speaking
                and (event.isFiller or tags.is_filler(text, runner.fillers))):
            return
        if runner.is_speaking and interruption.strategy in ("both", "asr") and (
                self._words_without_voice()
                or not takes_the_turn(interruption.policy(), text, runner.fillers, self._bot_words())):
            # a backchannel ("uh-huh"), fewer than minWords, or words of a sound the VAD never took for a
            # voice: the bot goes on (call/barge_in.py resumes it if it paused)
            return
        runner.last_final_ms = runner.now()
        runner.last_interaction_ms = runner.now()
        self.cancel(keep_partial=True)
        if "context_repair" in self.llm_config.features and self._repair(text):
            pass
        else:
            runner.history.append({"role": "user", "content": text})
        runner.emit_history("user", text)
        runner.followup_count = 0
        self.start_turn(preempted=self._confirm_preemptive())

    #: words the recogniser gives this long after the VAD's last speech segment ended still have a voice
    #: (or the end-of-turn ceiling + 1 s, when longer: a turn's final comes at its end)
    VOICE_RECENT_MS = 2500

    def _words_without_voice(self) -> bool:
        """Words over the bot that come with no voice: the call's (echo-guarded) VAD heard no speech in
        the last ``VOICE_RECENT_MS``.  The recogniser's own segmenter (webrtcvad, pocketsphinx) makes words
        of a cough, a knock or a leaked trace of the bot's echo that silero never took for a voice; with
        ``pauseOnVoice`` and strategy ``both`` (voice pauses, words decide) those never stop the bot.  A
        call without a VAD (words alone decide) is not affected."""
        runner = self.runner
        interruption = runner.config.interruption
        if not interruption.pause_on_voice or interruption.strategy != "both":
            return False
        processors = getattr(runner.session, "processors", None)
        if processors is None or getattr(processors, "vad", None) is None:
            return False
        if self._caller_speaking:
            return False
        eou = getattr(getattr(runner.session, "option", None), "eou", None)
        recent = max(self.VOICE_RECENT_MS, (getattr(eou, "timeout", None) or 0) + 1000)  # a turn's final
        return self._voice_ended_ms is None or runner.now() - self._voice_ended_ms > recent

    def _bot_words(self) -> list:
        """What the bot is saying now (its echo is not the caller's words: call/barge_in.py)."""
        playback = getattr(self.runner.session, "playback", None)
        return bot_words(playback.current) if playback is not None else []

    def caller_speaking(self, event) -> None:
        """Interrupt the bot when the caller talks over it (docs/playbooks.md, interruption)."""
        runner = self.runner
        if isinstance(event, ev.AsrDelta):
            self._partial(event.text)
        interruption = runner.config.interruption
        strategy = interruption.strategy
        if isinstance(event, ev.Speaking) and strategy not in ("both", "vad"):
            return
        if isinstance(event, ev.Speaking) and strategy == "both" and interruption.pause_on_voice:
            return  # voice alone paused the bot (call/barge_in.py); words decide
        if isinstance(event, ev.AsrDelta):
            if strategy not in ("both", "asr") or not (event.text or "").strip():
                return
            if self._words_without_voice() \
                    or not takes_the_turn(interruption.policy(), event.text, runner.fillers, self._bot_words()):
                return
        if not runner.is_speaking or runner.hanging_up:
            return
        now = runner.now()
        if runner.last_tts_start_ms is not None and now - runner.last_tts_start_ms < interruption.ignore_first_ms:
            return
        if interruption.filler_word_filter:
            if event.isFiller:
                return
            if isinstance(event, ev.AsrDelta) and tags.is_filler(event.text, runner.fillers):
                return
        if runner.last_final_ms is not None and now - runner.last_final_ms < STALE_FINAL_MS:
            return
        runner.barge_in()

    def start_turn(self, intro_play: Optional[str] = None, preempted: Optional[Preemptive] = None) -> None:
        """A new LLM reply: whatever was streaming or queued is superseded."""
        runner = self.runner
        if runner.stopped:
            return
        self.cancel(keep_partial=True)
        runner.flush_queue()
        if intro_play:
            runner.send(cmd.Play(url=intro_play), wait=True)
        reply = Reply(runner.replies + 1, runner.next_play_id(), started_ms=runner.now())
        self.reply = reply
        d = self._run(reply, preempted)
        d.addErrback(lambda f: log.failure("call {id}: LLM turn failed", f, id=runner.session.id))

    def cancel(self, keep_partial: bool) -> None:
        self._cancel_filler()
        self._check_speech(done=True)
        reply, self.reply = self.reply, None
        if reply is None or reply.done:
            return
        reply.cancelled = True
        if reply.llm is not None:
            reply.llm.cancel()
        if keep_partial and reply.parser.raw.strip():
            self.runner.history.append({"role": "assistant", "content": reply.parser.raw})

    # -- one reply --------------------------------------------------------------------------------------

    # -- preemptive generation (docs/playbooks.md, "Preemptive replies") --------------------------------

    def _partial(self, text: Optional[str]) -> None:
        """A partial transcript: a preemptive request on other words is dropped.  One that comes while the
        VAD says the caller is silent (the pause-time decode) starts one at once; while the VAD hears speech,
        none starts (its words are still growing); on a call without VAD events, one that stays unchanged
        for ``preemptive_stable_ms`` starts one."""
        if not self.llm_config.preemptive:
            return
        text = (text or "").strip()
        if self.preemptive is not None and normalise(self.preemptive.text) != normalise(text):
            self._drop_preemptive("cancelled")
        if self._stable is not None and self._stable.active():
            self._stable.cancel()
        self._stable = None
        if text and self.preemptive is None:
            if self._caller_quiet:
                self._preempt(text)  # the words up to the caller's pause: nothing more is coming for now
                return
            if self._caller_speaking:
                return  # the VAD hears the caller still talking: more words are coming (no request to waste)
            self._stable = self.runner.clock.callLater(self.llm_config.preemptive_stable_ms / 1000.0,
                                                       self._preempt, text)

    def _preempt(self, text: str) -> None:
        self._stable = None
        runner = self.runner
        if runner.stopped or runner.hanging_up or self.preemptive is not None or not self._can_preempt():
            return
        messages = [dict(m) for m in runner.history] + [{"role": "user", "content": text}]
        prepare = getattr(runner.session, "prepare_speech", None)
        speak_ahead = self.llm_config.preemptive_tts and prepare is not None
        p = Preemptive(text, messages, speak_ahead=speak_ahead, prepare=prepare,
                       parser=tags.ReplyParser(first_clause_chars=FIRST_CLAUSE_CHARS) if speak_ahead else None)

        def done(result):
            p.stream_done()
            return result

        def failed(f):
            p.failed = True
            return f

        self.preemptive = p
        p.d = runner.llm.stream([dict(m) for m in messages], p.on_delta)
        p.d.addCallbacks(done, failed)
        log.debug("call {id}: preemptive LLM request on {text!r}", id=runner.session.id, text=text)

    def _can_preempt(self) -> bool:
        """Only when the reply would be asked at once with the history as it stands (no <http> result to
        wait for, no rolling summary due)."""
        runner = self.runner
        if runner.collection is not None or runner.tools.settled() is not None:
            return False
        if "rolling_summary" in self.llm_config.features and \
                len(runner.history) + 1 > self.llm_config.summary_limit + SUMMARY_KEEP:
            return False
        return True

    def _confirm_preemptive(self) -> Optional[Preemptive]:
        """At the final (history updated): the preemptive request if it asked exactly what would be asked
        now (the final's words equal the partial's, normalised; the rest of the history unchanged), else
        None after cancelling it."""
        if self._stable is not None and self._stable.active():
            self._stable.cancel()
        self._stable = None
        p = self.preemptive
        if p is None:
            return None
        now = [dict(m) for m in self.runner.history]
        last = now[-1] if now else {}
        if (not p.failed and last.get("role") == "user" and now[:-1] == p.messages[:-1]
                and normalise(last.get("content", "")) == normalise(p.text)):
            self.preemptive = None
            self._count("hit")
            return p
        self._drop_preemptive("miss")
        return None

    def _drop_preemptive(self, outcome: str) -> None:
        if self._stable is not None and self._stable.active():
            self._stable.cancel()
        self._stable = None
        p, self.preemptive = self.preemptive, None
        if p is None:
            return
        self._count(outcome)
        self._drop_speech(p.speech)
        p.d.addErrback(lambda _: None)  # cancelled, or it failed: either way nobody hears it
        p.d.cancel()

    def _count(self, outcome: str) -> None:
        metrics = getattr(self.runner.session, "metrics", None)
        if metrics is not None:
            metrics.llm_preemptive.labels(outcome=outcome).inc()
        self.runner.metrics("preemptive", 0, {"outcome": outcome})

    def _speech_outcome(self, speech, outcome: str) -> None:
        """``played`` or ``wasted``: counted, and a ``metrics`` event ``preemptive.tts`` (how long it had
        been synthesising, how much audio it held)."""
        metrics = getattr(self.runner.session, "metrics", None)
        if metrics is not None:
            metrics.speculative_speech.labels(outcome=outcome).inc()
        age = int((self.runner.clock.seconds() - speech.started) * 1000)
        self.runner.metrics("preemptive.tts", age, {"outcome": outcome, "text": speech.text,
                                                    "bufferedMs": speech.samples // 16, "done": speech.done})

    def _drop_speech(self, speech) -> None:
        """Speech prepared for a reply that will not say it: cancelled, never heard, counted as wasted."""
        if speech is None or speech.adopted or speech.cancelled:
            return
        speech.cancel()
        self._speech_outcome(speech, "wasted")

    def _adopt(self, reply: Reply, p: Preemptive) -> defer.Deferred:
        """The confirmed preemptive request becomes ``reply``'s: what it said so far is replayed, then it streams.
        Its prepared first sentence is claimed for the reply's play id: the ``tts`` the replay sends with that
        text adopts the buffered audio (``call/playback.py``)."""
        p.sink = lambda delta: self._delta(reply, delta)
        speech = p.speech
        if speech is not None:
            speech.claim(reply.play_id)
            self._speech = speech
        buffered, p.deltas = p.deltas, []
        for delta in buffered:
            self._delta(reply, delta)
        self._check_speech()
        return p.d

    def _check_speech(self, done: bool = False) -> None:
        """The claimed speech played (counted), or, once the reply can no longer say it (``done``), wasted."""
        speech = self._speech
        if speech is None:
            return
        if speech.adopted:
            self._speech = None
            self._speech_outcome(speech, "played")
        elif done or speech.cancelled or speech.failed:
            self._speech = None
            self._drop_speech(speech)

    # -- one reply --------------------------------------------------------------------------------------

    # -- wait filler (docs/playbooks.md, "Wait filler") ---------------------------------------------------

    def _arm_filler(self, reply: Reply) -> None:
        config = self.runner.config.wait_filler
        self._cancel_filler()
        if config is None or not config.enabled or not config.phrases or self._filler_last:
            return
        self._filler = self.runner.clock.callLater(config.after_ms / 1000.0, self._say_filler, reply)

    def _cancel_filler(self) -> None:
        if self._filler is not None and self._filler.active():
            self._filler.cancel()
        self._filler = None

    def _say_filler(self, reply: Reply) -> None:
        """The tool call or the model's first token is late: a short filler, on the reply's playId (its
        sentences follow on the same track); not kept in the history."""
        self._filler = None
        runner = self.runner
        if (reply is not self.reply or reply.cancelled or reply.first_delta_ms is not None or runner.stopped
                or runner.hanging_up or self._filler_last):
            return
        phrases = runner.config.wait_filler.phrases
        text = runner.render(phrases[self._filler_index % len(phrases)])
        self._filler_index += 1
        self._filler_last = True
        reply.spoke_on_play_id = True
        runner.metrics("wait_filler", runner.now() - reply.started_ms, {"playId": reply.play_id, "text": text})
        runner.send(cmd.Tts(text=text, playId=reply.play_id, streaming=True))

    @defer.inlineCallbacks
    def _run(self, reply: Reply, preempted: Optional[Preemptive] = None):
        runner = self.runner
        self._arm_filler(reply)
        if preempted is None:
            settled = runner.tools.settled()
            if settled is not None:  # an <http> result belongs in the context of the next turn
                yield settled
                if reply.cancelled:
                    return
            if "rolling_summary" in self.llm_config.features:
                yield self._rolling_summary(reply)
                if reply.cancelled:
                    return
        runner.metrics("llm_call_start", 0, {"playId": reply.play_id, "scene": runner.scene_id,
                                             "messages": len(runner.history),
                                             "preemptive": preempted is not None})
        if preempted is not None:
            result = yield self._ask(reply, lambda: self._adopt(reply, preempted))
        else:
            result = yield self._ask(reply, lambda: runner.llm.stream(
                [dict(m) for m in runner.history], lambda delta: self._delta(reply, delta)))
        if result is _NO_ANSWER or reply.cancelled:
            return
        final = reply.parser.finish()
        json_command = next((e for e in final if isinstance(e, tags.JsonCommand)), None)
        if json_command is not None:
            yield self._json_reply(reply, json_command)
            return
        self._finish_stream(reply, final, getattr(result, "content", reply.parser.raw))

    @defer.inlineCallbacks
    def _ask(self, reply: Reply, request):
        """One model request for ``reply`` (``request()`` starts it), cancellable through ``reply.llm``.

        Fires with the model's answer, or ``_NO_ANSWER`` when the request was cancelled or failed; a
        failure has then been handled (``_llm_failed``)."""
        try:
            reply.llm = request()
            result = yield reply.llm
        except defer.CancelledError:
            return _NO_ANSWER
        except Exception as e:
            if not reply.cancelled:
                self._llm_failed(reply, e)
            return _NO_ANSWER
        finally:
            reply.llm = None
        return result

    def _llm_failed(self, reply: Reply, error: Exception) -> None:
        """Never dead air: tell the client, speak the playbook's fallback line."""
        runner = self.runner
        message = getattr(error, "message", None) or str(error) or type(error).__name__
        log.warn("call {id}: LLM failed: {error}; speaking the fallback line", id=runner.session.id, error=message)
        runner.session.error("llm", message, code=getattr(error, "status", None))
        reply.hangup = False
        reply.spoken.append(self.llm_config.fallback)
        self._close_reply(reply, runner.render(self.llm_config.fallback), "")

    def _delta(self, reply: Reply, delta: str) -> None:
        if reply is not self.reply or reply.cancelled or self.runner.stopped:
            return
        if reply.first_delta_ms is None:
            reply.first_delta_ms = self.runner.now()
            self._cancel_filler()
        self._apply(reply, reply.parser.feed(delta))

    def _apply(self, reply: Reply, events) -> None:
        runner = self.runner
        for event in events:
            if runner.stopped or reply.cancelled:
                return
            if isinstance(event, tags.Sentence):
                self._say(reply, event.text)
            elif isinstance(event, tags.Hangup):
                reply.hangup = True  # acted on at the end of the reply, so a later set_var still counts
            elif isinstance(event, tags.Refer):
                runner.refer(event.to, reply)
            elif isinstance(event, tags.WarmTransfer):
                runner.warm_transfer(event.to, event.summary, event.moh)
            elif isinstance(event, tags.Play):
                self._play_in_reply(reply, event.file)
            elif isinstance(event, tags.Goto):
                runner.goto(event.scene)
            elif isinstance(event, tags.SetVar):
                set_var(runner.variables, event.key, event.value)
                runner.refresh_hangup_headers()
            elif isinstance(event, tags.Http):
                runner.tools.tag(event)
            elif isinstance(event, tags.Collect):
                runner.collector.start(event, say=lambda text: self._say(reply, text),
                                       reply_spoke=bool(reply.spoken))

    def _say(self, reply: Reply, text: str) -> None:
        self._filler_last = False
        reply.spoken.append(text)
        reply.spoke_on_play_id = True
        self.runner.send(cmd.Tts(text=text, playId=reply.play_id, streaming=True,
                                 waitInputTimeout=self.runner.wait_input_ms()))
        self._check_speech(done=True)  # the reply's first sentence went out: the prepared one played or not

    def _play_in_reply(self, reply: Reply, file: str) -> None:
        """``<play>`` mid-reply: the speech so far ends, the file plays, the rest of the reply follows."""
        runner = self.runner
        if reply.spoke_on_play_id:
            runner.send(cmd.Tts(text="", playId=reply.play_id, streaming=True, endOfStream=True), wait=True)
        runner.send(cmd.Play(url=runner.render(file)), wait=True)
        reply.play_id = f"{reply.play_id}.{len(reply.spoken) + 1}"
        reply.spoke_on_play_id = False

    def _finish_stream(self, reply: Reply, final_events, raw: str) -> None:
        """The stream ended: the last sentence (or an empty one) closes the reply with ``endOfStream``."""
        audio = (tags.Sentence, tags.Play, tags.Refer, tags.Collect)
        last = None
        sentences = [i for i, e in enumerate(final_events) if isinstance(e, tags.Sentence)]
        if sentences and not any(isinstance(e, audio) for e in final_events[sentences[-1] + 1:]):
            last = final_events[sentences[-1]]
            final_events = final_events[: sentences[-1]] + final_events[sentences[-1] + 1:]
        self._apply(reply, final_events)
        if last is not None:
            reply.spoken.append(last.text)
        self._close_reply(reply, last.text if last is not None else "", raw)

    def _close_reply(self, reply: Reply, text: str, history_text: str, wait_input_ms: Optional[int] = None) -> None:
        runner = self.runner
        if runner.stopped or reply.cancelled:
            return
        reply.done = True
        if reply is self.reply:
            self.reply = None
            self._cancel_filler()
        if text.strip():
            self._filler_last = False
        if reply.hangup:
            runner.hanging_up = True
            runner.refresh_hangup_headers()
        runner.send(cmd.Tts(text=text, playId=reply.play_id, streaming=True, endOfStream=True,
                            autoHangup=True if reply.hangup else None,
                            waitInputTimeout=wait_input_ms or runner.wait_input_ms()))
        self._check_speech(done=True)
        if reply.end_reason and not reply.hangup:
            runner.end_after(reply.play_id, reply.end_reason)
        if history_text:
            runner.history.append({"role": "assistant", "content": history_text})
        spoken = " ".join(s for s in reply.spoken if s)
        if spoken:
            runner.last_bot_line_ms = runner.now()
            runner.emit_history("assistant", spoken)
        now = runner.now()
        runner.metrics("llm_response", now - reply.started_ms, {
            "playId": reply.play_id, "text": history_text,
            "ttfb": (reply.first_delta_ms - reply.started_ms) if reply.first_delta_ms is not None else None,
        })

    def _close_quietly(self, reply: Reply) -> None:
        self._check_speech(done=True)
        reply.done = True
        if reply is self.reply:
            self.reply = None

    # -- JSON mode ----------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def _json_reply(self, reply: Reply, command: tags.JsonCommand):
        """``{"text", "waitInputTimeout", "tools"}``: tools act; http/rag results re-ask (3 rounds at most)."""
        runner = self.runner
        rounds = 1
        hangup: Optional[tags.HangupTool] = None
        while True:
            found, reask = yield apply_json_tools(runner, reply, command.tools)
            hangup = found or hangup
            if not reask or rounds >= MAX_TOOL_ROUNDS or reply.cancelled or runner.stopped:
                break
            rounds += 1
            result = yield self._ask(reply, lambda: runner.llm.complete([dict(m) for m in runner.history]))
            if result is _NO_ANSWER:
                return
            content = result.content
            command = tags.parse_json_command(content) or tags.JsonCommand(text=content)
        if reply.cancelled or runner.stopped:
            return
        text = command.text if command.text is not None else ""
        if hangup is not None:
            reply.hangup = True
            if not text:
                self._close_quietly(reply)
                runner.end_call(ev.hangup_reason(hangup.reason, hangup.initiator),
                                initiator=hangup.initiator or "system")
                return
        spoken = _strip_markup(text)
        reply.spoken.append(spoken)
        reply.play_id = runner.next_play_id()
        self._close_reply(reply, spoken, spoken, wait_input_ms=command.wait_input_timeout)

    # -- context features ---------------------------------------------------------------------------

    def _repair(self, text: str) -> bool:
        """Context repair: a very short bot line right after the caller spoke was a false turn; undo it
        and glue the new words to the caller's previous message."""
        runner = self.runner
        history = runner.history
        window = self.llm_config.repair_window_ms
        if runner.last_bot_line_ms is None or runner.now() - runner.last_bot_line_ms >= window:
            return False
        last = history[-1] if len(history) > 1 else None
        if last is None or last["role"] != "assistant" or len(last["content"]) >= REPAIR_MAX_CHARS:
            return False
        history.pop()
        previous = history[-1] if len(history) > 1 else None
        if previous is not None and previous["role"] == "user":
            joiner = "，" if self.llm_config.language.lower().startswith("zh") else ", "
            previous["content"] = previous["content"] + joiner + text
        else:
            history.append({"role": "user", "content": text})
        log.info("call {id}: context repaired (dropped {line!r})", id=runner.session.id, line=last["content"])
        return True

    @defer.inlineCallbacks
    def _rolling_summary(self, reply: Reply):
        """Long conversations: summarise all but the last few messages into the system prompt."""
        runner = self.runner
        if len(runner.history) <= self.llm_config.summary_limit + SUMMARY_KEEP:
            return
        older = runner.history[: len(runner.history) - SUMMARY_KEEP]
        try:
            result = yield runner.llm.complete(
                [dict(m) for m in older] + [{"role": "user", "content": prompts.ROLLING_SUMMARY_PROMPT}])
        except Exception as e:
            log.warn("call {id}: rolling summary failed: {e}", id=runner.session.id, e=str(e))
            return
        if reply.cancelled:
            return
        text = (result.content or "").strip()
        if text:
            self.summary = f"{self.summary}\n{text}" if self.summary else text
        recent = runner.history[len(runner.history) - SUMMARY_KEEP:]
        runner.history = [{"role": "system", "content": self.system_prompt()}] + recent


def _strip_markup(text: str) -> str:
    """JSON-mode ``text`` is spoken whole; markup in it is removed, never read out."""
    parser = tags.ReplyParser(min_sentence_chars=0)
    events = parser.feed(text) + parser.finish()
    return " ".join(e.text for e in events if isinstance(e, tags.Sentence))
