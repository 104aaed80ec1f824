"""A playbook running one call: a Deferred-driven dialogue state machine (docs/playbooks.md, "Runtime").

The runner is a listener of its ``CallSession``: it sees every event the call emits (asrFinal, speaking,
silence, dtmf, trackStart/trackEnd, hangup) and answers with the same commands a WebSocket client would
send (``tts``, ``play``, ``interrupt``, ``refer``), through ``session.handle``.  One LLM reply is one
``playId``: its sentences are streamed to the TTS as they arrive and the last command carries
``endOfStream``.  Tags in the reply act (hang up after the speech, transfer, play, switch scene, set a
variable, call HTTP, collect digits) and never reach the TTS.

Time is the injected clock (collector timers, posthook retries, HTTP timeouts, barge-in guards), so tests
drive it with ``task.Clock``.  LLM failures never leave dead air: an ``error`` event and ``llm.fallback``
is spoken instead.  ``start_playbook`` is the one entry point the call paths (/call, SIP, WebRTC) use.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.logger import Logger

from activecall.api import commands as cmd
from activecall.api import events as ev
from activecall.playbook import prompts, tags
from activecall.playbook.echo import EchoLLM
from activecall.playbook.llm import LLMClient, LLMSettings
from activecall.playbook.parser import ECHO_PROVIDER, LlmConfig, Playbook, PlaybookError, load_playbook, parse_playbook
from activecall.playbook.templates import CallInfo, bye_headers, render, set_var, template_context

log = Logger(namespace="activecall.playbook")

#: ms of silence after the bot's speech before ``silence`` fires (the original's fixed value)
DEFAULT_WAIT_INPUT_MS = 10000
#: an asrFinal younger than this suppresses barge-in (its trailing deltas must not cut the new reply)
STALE_FINAL_MS = 500
#: JSON mode: at most this many LLM rounds for one reply (tool results re-ask the model)
MAX_TOOL_ROUNDS = 3
#: context repair: an assistant line shorter than this, said within ``repairWindowMs``, is undone
REPAIR_MAX_CHARS = 15
#: how much of an HTTP response body goes into the conversation
MAX_HTTP_BODY = 4000
#: posthook delivery: attempts, first back-off (doubled each time), per-attempt timeout (seconds)
POSTHOOK_ATTEMPTS = 3
POSTHOOK_BACKOFF = 1.0
POSTHOOK_TIMEOUT = 10.0
#: rolling summary keeps this many recent messages
SUMMARY_KEEP = 6


def default_llm_client_factory(clock=None) -> Callable[[LlmConfig], Any]:
    """``llm`` config -> a client: the built-in echo for ``provider: echo`` (or ``auto`` with no endpoint),
    else the OpenAI-compatible streaming client."""

    def factory(llm: LlmConfig):
        if llm.effective_provider == ECHO_PROVIDER:
            return EchoLLM()
        return LLMClient(LLMSettings.from_playbook(llm), clock=clock)

    return factory


def _default_http_client():
    from twisted.internet import reactor

    from activecall.call.handlers import default_http_client

    return default_http_client(reactor)


@dataclass
class _Reply:
    """One LLM reply being streamed and spoken."""

    number: int
    play_id: str
    parser: tags.ReplyParser = field(default_factory=tags.ReplyParser)
    started_ms: int = 0
    first_delta_ms: Optional[int] = None
    spoken: list = field(default_factory=list)  # sentences sent to the TTS
    spoke_on_play_id: bool = False  # a tts went out on the current play_id
    hangup: bool = False
    end_reason: Optional[str] = None  # "refer" when a transfer cannot be done here
    cancelled: bool = False
    llm: Optional[defer.Deferred] = None  # the LLM request in flight
    done: bool = False


@dataclass
class _Collection:
    """A DTMF collector in progress (``<collect type var prompt/>``)."""

    name: str
    var: str
    config: Any  # parser.CollectorConfig
    digits: str = ""
    retries: int = 0
    overall: Any = None  # IDelayedCall
    inter_digit: Any = None


class PlaybookRunner:
    """Runs ``playbook`` on ``session``; ``start()`` once, it waits for the call to be answered.

    ``llm_client_factory(llm_config)`` builds the model client (``stream``/``complete``/``LLMReply``);
    ``http`` is a treq-like client for ``<http>``, the http tool and the posthook.  ``done`` fires when the
    call has ended and the posthook is delivered (or given up).
    """

    def __init__(self, session, playbook: Playbook, clock=None, llm_client_factory=None, http=None,
                 fillers=tags.DEFAULT_FILLERS):
        if playbook.config.llm is None:
            raise PlaybookError("missing 'llm': a playbook needs an llm section to run", playbook.source, key="llm")
        self.session = session
        self.playbook = playbook
        self.config = playbook.config
        self.llm_config: LlmConfig = playbook.config.llm
        self.clock = clock if clock is not None else session.clock
        factory = llm_client_factory or default_llm_client_factory()
        self.llm = factory(self.llm_config)
        self._http = http
        self.fillers = tuple(fillers)
        self.variables = session.extras  # shared: set_var, collectors and SIP headers all land here
        self.scene_id = playbook.initial_scene
        self.history: list[dict[str, str]] = []
        self.summary: Optional[str] = None  # rolling summary, kept across scene switches
        self.done = defer.Deferred()
        self.started = False
        self.stopped = False
        self.is_speaking = False
        self.hanging_up = False
        self.followup_count = 0
        self.last_tts_start_ms: Optional[int] = None
        self.last_final_ms: Optional[int] = None
        self.last_interaction_ms = 0
        self.last_bot_line_ms: Optional[int] = None
        self.reply: Optional[_Reply] = None
        self.collection: Optional[_Collection] = None
        self._replies = 0
        self._gate: Optional[str] = None  # playId whose trackEnd the queued commands wait for
        self._outbox: deque = deque()
        self._end_after: Optional[tuple[str, str]] = None  # (playId, reason): end the call when it ends
        self._pending_http: list[defer.Deferred] = []

    # -- life cycle ---------------------------------------------------------------------------------

    @property
    def http(self):
        if self._http is None:
            self._http = _default_http_client()
        return self._http

    def attach(self) -> "PlaybookRunner":
        """Listen to the call; begin as soon as it is answered (media waits for the answer)."""
        from activecall.call.session import CallState

        self.session.listeners.append(self._on_event)
        self.session.playbook_runner = self
        self.session.when_ended().addCallback(lambda _: self._stop())
        for key, value in (self.config.extra or {}).items():
            self.variables.setdefault(key, value)
        if self.session.state is CallState.ANSWERED:
            self.start()
        return self

    def start(self) -> None:
        """System prompt, the initial scene's ``<play>``, then the greeting or the LLM's opening line."""
        if self.started or self.stopped:
            return
        self.started = True
        self.history = [{"role": "system", "content": self._system_prompt()}]
        self.last_interaction_ms = self._now()
        self._refresh_hangup_headers()
        log.debug("call {id}: playbook {source} started in scene {scene}", id=self.session.id,
                  source=self.playbook.source, scene=self.scene_id)
        scene_play = self.playbook.initial.play
        if scene_play:
            self._send(cmd.Play(url=self._render(scene_play), waitInputTimeout=None), wait=True)
        greeting = self.playbook.greeting
        if greeting:
            text = self._render(greeting)
            self._send(cmd.Tts(text=text, playId="greeting", endOfStream=True,
                               waitInputTimeout=self._wait_input_ms()))
            self.history.append({"role": "assistant", "content": text})
            self.last_bot_line_ms = self._now()
            self._emit_history("assistant", text)
        else:
            self._start_turn()

    def _stop(self) -> None:
        """The call is over: cancel everything, then deliver the posthook."""
        if self.stopped:
            return
        self.stopped = True
        self._cancel_reply(keep_partial=True)
        self._end_collection()
        self._outbox.clear()
        if self._on_event in self.session.listeners:
            self.session.listeners.remove(self._on_event)
        d = self._posthook() if self.started else defer.succeed(None)
        d.addErrback(lambda f: log.failure("posthook of {id} failed", f, id=self.session.id))
        d.addBoth(lambda _: self.done.callback(self))

    # -- events -------------------------------------------------------------------------------------

    def _on_event(self, event) -> None:
        if self.stopped:
            return
        if isinstance(event, ev.Answer):
            if event.trackId == self.session.id:
                self.start()
            return
        if isinstance(event, ev.Hangup):
            self._stop()
            return
        if not self.started:
            return
        bot_track = self.session.playback.track_id
        if isinstance(event, ev.TrackStart) and event.trackId == bot_track:
            self.is_speaking = True
            self.last_tts_start_ms = self._now()
        elif isinstance(event, ev.TrackEnd) and event.trackId == bot_track:
            self._track_ended(event)
        elif isinstance(event, ev.Dtmf):
            self._on_dtmf(event.digit)
        elif self.collection is not None and not self.collection.config.interruptible:
            return  # collecting: speech is not for us (docs/playbooks.md, collectors)
        elif isinstance(event, ev.AsrFinal):
            self._on_final(event)
        elif isinstance(event, (ev.AsrDelta, ev.Speaking)):
            self.last_interaction_ms = self._now()
            self._maybe_barge_in(event)
        elif isinstance(event, ev.Silence):
            self._on_silence()
        elif isinstance(event, ev.Eou):
            if event.completed and not self.is_speaking and self.reply is None:
                self._start_turn()

    def _track_ended(self, event: ev.TrackEnd) -> None:
        self.is_speaking = False
        self.last_interaction_ms = self._now()
        if self._end_after is not None and event.playId == self._end_after[0]:
            reason = self._end_after[1]
            self._end_after = None
            self._end_call(reason)
            return
        if self.collection is not None and not self.collection.digits:
            self._arm_collection_timeout()  # the caller can type now that the prompt is over
        if self._gate is not None and event.playId == self._gate:
            self._gate = None
            self._drain()

    def _on_final(self, event: ev.AsrFinal) -> None:
        text = (event.text or "").strip()
        if not text or self.hanging_up:
            return
        if (self.config.interruption.filler_word_filter and self.is_speaking
                and (event.isFiller or tags.is_filler(text, self.fillers))):
            return
        self.last_final_ms = self._now()
        self.last_interaction_ms = self._now()
        self._cancel_reply(keep_partial=True)
        if "context_repair" in self.llm_config.features and self._repair(text):
            pass
        else:
            self.history.append({"role": "user", "content": text})
        self._emit_history("user", text)
        self.followup_count = 0
        self._start_turn()

    def _maybe_barge_in(self, event) -> None:
        """Interrupt the bot when the caller talks over it (docs/playbooks.md, interruption)."""
        strategy = self.config.interruption.strategy
        if isinstance(event, ev.Speaking) and strategy not in ("both", "vad"):
            return
        if isinstance(event, ev.AsrDelta):
            if strategy not in ("both", "asr") or not (event.text or "").strip():
                return
        if not self.is_speaking or self.hanging_up:
            return
        now = self._now()
        if self.last_tts_start_ms is not None and now - self.last_tts_start_ms < self.config.interruption.ignore_first_ms:
            return
        if self.config.interruption.filler_word_filter:
            if event.isFiller:
                return
            if isinstance(event, ev.AsrDelta) and tags.is_filler(event.text, self.fillers):
                return
        if self.last_final_ms is not None and now - self.last_final_ms < STALE_FINAL_MS:
            return
        self.barge_in()

    def barge_in(self) -> None:
        """Flush the bot's playout at once and stop the LLM stream (what it said so far stays in history)."""
        log.info("call {id}: barge-in, playout flushed", id=self.session.id)
        self._cancel_reply(keep_partial=True)
        self._outbox.clear()
        self._gate = None
        self.is_speaking = False
        self._dispatch(cmd.Interrupt(graceful=False))

    def _on_silence(self) -> None:
        """Follow-up: speak again after ``timeout`` ms of quiet, hang up after ``maxCount`` tries."""
        config = self.playbook.followup_for(self.scene_id)
        if config is None or self.is_speaking or self.reply is not None or self.hanging_up:
            return
        if self._now() - self.last_interaction_ms < config.timeout:
            return
        if self.followup_count >= config.max_count:
            log.info("call {id}: no answer after {n} follow-ups, hanging up", id=self.session.id,
                     n=self.followup_count)
            self._end_call("Max follow-up reached")
            return
        self.followup_count += 1
        self.last_interaction_ms = self._now()
        self._start_turn()

    # -- DTMF ---------------------------------------------------------------------------------------

    def _on_dtmf(self, digit: str) -> None:
        self.last_interaction_ms = self._now()
        if self.collection is not None:
            self._collect_digit(digit)
            return
        action = self.playbook.dtmf_action(self.scene_id, digit)
        if action is None:
            return
        log.info("call {id}: DTMF {digit} -> {action}", id=self.session.id, digit=digit, action=action.action)
        if action.action == "goto":
            self._cancel_reply(keep_partial=True)
            self._goto(action.scene)
            play = self.playbook.scenes[action.scene].play
            self._start_turn(intro_play=self._render(play) if play else None)
        elif action.action == "transfer":
            self._refer(self._render(action.target), None)
        elif action.action == "hangup":
            self._end_call("DTMF Hangup")

    # -- collectors ---------------------------------------------------------------------------------

    def _start_collection(self, reply: Optional[_Reply], tag: tags.Collect) -> None:
        collectors = self.config.dtmf_collectors
        config = collectors.get(tag.type)
        if config is None:
            names = ", ".join(sorted(collectors)) or "none"
            self._system_note(f"[Unknown DTMF collector type '{tag.type}'. Available types: {names}]")
            return
        self._end_collection()
        self.collection = _Collection(tag.type, tag.var, config)
        log.info("call {id}: collecting digits into {var} ({name})", id=self.session.id, var=tag.var, name=tag.type)
        if tag.prompt and reply is not None:
            self._say(reply, tag.prompt)
        elif tag.prompt:
            self._send(cmd.Tts(text=tag.prompt, playId=self._next_play_id(), endOfStream=True))
        if not self.is_speaking and not (tag.prompt or (reply is not None and reply.spoken)):
            self._arm_collection_timeout()

    def _arm_collection_timeout(self) -> None:
        c = self.collection
        if c is None:
            return
        _cancel(c.overall)
        c.overall = self.clock.callLater(c.config.timeout, self._collection_timed_out, c)

    def _collect_digit(self, digit: str) -> None:
        c = self.collection
        config = c.config
        _cancel(c.overall)
        _cancel(c.inter_digit)
        if config.finish_key and digit == config.finish_key:
            self._finish_collection(c)
            return
        c.digits += digit
        if not config.finish_key and config.maximum is not None and len(c.digits) >= config.maximum:
            self._finish_collection(c)
            return
        c.inter_digit = self.clock.callLater(config.inter_digit_timeout, self._inter_digit_timed_out, c)
        c.overall = self.clock.callLater(config.timeout, self._collection_timed_out, c)

    def _inter_digit_timed_out(self, c: _Collection) -> None:
        if c is self.collection and c.digits:
            self._finish_collection(c)

    def _collection_timed_out(self, c: _Collection) -> None:
        if c is not self.collection:
            return
        if c.digits:
            self._finish_collection(c)
            return
        self._end_collection()
        self._system_note(f"[DTMF collection timed out for '{c.var}'. No digits were entered. "
                          "Please guide the user.]")
        self._start_turn()

    def _finish_collection(self, c: _Collection) -> None:
        config = c.config
        problem = None
        if len(c.digits) < config.minimum:
            problem = f"Expected at least {config.minimum} digits, got {len(c.digits)}"
        elif config.maximum and len(c.digits) > config.maximum:
            problem = f"Expected at most {config.maximum} digits, got {len(c.digits)}"
        elif config.validation is not None and re.search(config.validation.pattern, c.digits) is None:
            problem = config.validation.error_message
        if problem is None:
            self._end_collection()
            self.variables[c.var] = c.digits
            self._refresh_hangup_headers()
            self._system_note(f"[DTMF collection completed for '{c.var}': {c.digits}]")
            self._start_turn()
            return
        if c.retries < config.retry_times:
            c.retries += 1
            c.digits = ""
            message = config.validation.error_message if config.validation is not None else problem
            log.info("call {id}: digits for {var} rejected ({why}), retry {n}", id=self.session.id, var=c.var,
                     why=problem, n=c.retries)
            self._send(cmd.Tts(text=message, playId=self._next_play_id(), endOfStream=True))
            return
        self._end_collection()
        self._system_note(f"[DTMF collection failed for '{c.var}' after {c.retries} retries: {problem}. "
                          "Please guide the user to try again or offer another way.]")
        self._start_turn()

    def _end_collection(self) -> None:
        c, self.collection = self.collection, None
        if c is not None:
            _cancel(c.overall)
            _cancel(c.inter_digit)

    # -- LLM turns ----------------------------------------------------------------------------------

    def _start_turn(self, intro_play: Optional[str] = None) -> None:
        """A new LLM reply: whatever was streaming or queued is superseded."""
        if self.stopped:
            return
        self._cancel_reply(keep_partial=True)
        self._outbox.clear()
        self._gate = None
        if intro_play:
            self._send(cmd.Play(url=intro_play), wait=True)
        reply = _Reply(self._replies + 1, self._next_play_id(), started_ms=self._now())
        self.reply = reply
        d = self._run(reply)
        d.addErrback(lambda f: log.failure("call {id}: LLM turn failed", f, id=self.session.id))

    @defer.inlineCallbacks
    def _run(self, reply: _Reply):
        if self._pending_http:  # an <http> result belongs in the context of the next turn
            yield defer.DeferredList(list(self._pending_http), consumeErrors=True)
            if reply.cancelled:
                return
        if "rolling_summary" in self.llm_config.features:
            yield self._rolling_summary(reply)
            if reply.cancelled:
                return
        self._metrics("llm_call_start", 0, {"playId": reply.play_id, "scene": self.scene_id,
                                             "messages": len(self.history)})
        try:
            reply.llm = self.llm.stream([dict(m) for m in self.history], lambda delta: self._delta(reply, delta))
            result = yield reply.llm
        except defer.CancelledError:
            return
        except Exception as e:
            if not reply.cancelled:
                self._llm_failed(reply, e)
            return
        finally:
            reply.llm = None
        if reply.cancelled:
            return
        final = reply.parser.finish()
        json_command = next((e for e in final if isinstance(e, tags.JsonCommand)), None)
        if json_command is not None:
            yield self._json_reply(reply, json_command)
            return
        self._finish_stream(reply, final, getattr(result, "content", reply.parser.raw))

    def _delta(self, reply: _Reply, delta: str) -> None:
        if reply is not self.reply or reply.cancelled or self.stopped:
            return
        if reply.first_delta_ms is None:
            reply.first_delta_ms = self._now()
        self._apply(reply, reply.parser.feed(delta))

    def _apply(self, reply: _Reply, events) -> None:
        for event in events:
            if self.stopped or reply.cancelled:
                return
            if isinstance(event, tags.Sentence):
                self._say(reply, event.text)
            elif isinstance(event, tags.Hangup):
                reply.hangup = True  # acted on at the end of the reply, so a later set_var still counts
            elif isinstance(event, tags.Refer):
                self._refer(event.to, reply)
            elif isinstance(event, tags.Play):
                self._play_in_reply(reply, event.file)
            elif isinstance(event, tags.Goto):
                self._goto(event.scene)
            elif isinstance(event, tags.SetVar):
                set_var(self.variables, event.key, event.value)
                self._refresh_hangup_headers()
            elif isinstance(event, tags.Http):
                self._http_tag(event)
            elif isinstance(event, tags.Collect):
                self._start_collection(reply, event)

    def _say(self, reply: _Reply, text: str) -> None:
        reply.spoken.append(text)
        reply.spoke_on_play_id = True
        self._send(cmd.Tts(text=text, playId=reply.play_id, streaming=True,
                           waitInputTimeout=self._wait_input_ms()))

    def _play_in_reply(self, reply: _Reply, file: str) -> None:
        """``<play>`` mid-reply: the speech so far ends, the file plays, the rest of the reply follows."""
        if reply.spoke_on_play_id:
            self._send(cmd.Tts(text="", playId=reply.play_id, streaming=True, endOfStream=True), wait=True)
        self._send(cmd.Play(url=self._render(file)), wait=True)
        reply.play_id = f"{reply.play_id}.{len(reply.spoken) + 1}"
        reply.spoke_on_play_id = False

    def _finish_stream(self, reply: _Reply, final_events, raw: str) -> None:
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

    def _close_reply(self, reply: _Reply, text: str, history_text: str, wait_input_ms: Optional[int] = None) -> None:
        if self.stopped or reply.cancelled:
            return
        reply.done = True
        if reply is self.reply:
            self.reply = None
        if reply.hangup:
            self.hanging_up = True
            self._refresh_hangup_headers()
        self._send(cmd.Tts(text=text, playId=reply.play_id, streaming=True, endOfStream=True,
                           autoHangup=True if reply.hangup else None,
                           waitInputTimeout=wait_input_ms or self._wait_input_ms()))
        if reply.end_reason and not reply.hangup:
            self._end_after = (reply.play_id, reply.end_reason)
        if history_text:
            self.history.append({"role": "assistant", "content": history_text})
        spoken = " ".join(s for s in reply.spoken if s)
        if spoken:
            self.last_bot_line_ms = self._now()
            self._emit_history("assistant", spoken)
        now = self._now()
        self._metrics("llm_response", now - reply.started_ms, {
            "playId": reply.play_id, "text": history_text,
            "ttfb": (reply.first_delta_ms - reply.started_ms) if reply.first_delta_ms is not None else None,
        })

    def _llm_failed(self, reply: _Reply, error: Exception) -> None:
        """Never dead air: tell the client, speak the playbook's fallback line."""
        message = getattr(error, "message", None) or str(error) or type(error).__name__
        log.warn("call {id}: LLM failed: {error}; speaking the fallback line", id=self.session.id, error=message)
        self.session.error("llm", message, code=getattr(error, "status", None))
        reply.hangup = False
        reply.spoken.append(self.llm_config.fallback)
        self._close_reply(reply, self._render(self.llm_config.fallback), "")

    def _cancel_reply(self, keep_partial: bool) -> None:
        reply, self.reply = self.reply, None
        if reply is None or reply.done:
            return
        reply.cancelled = True
        if reply.llm is not None:
            reply.llm.cancel()
        if keep_partial and reply.parser.raw.strip():
            self.history.append({"role": "assistant", "content": reply.parser.raw})

    # -- JSON mode ----------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def _json_reply(self, reply: _Reply, command: tags.JsonCommand):
        """``{"text", "waitInputTimeout", "tools"}``: tools act; http/rag results re-ask (3 rounds at most)."""
        rounds = 1
        hangup: Optional[tags.HangupTool] = None
        while True:
            reask = False
            for tool in command.tools:
                if isinstance(tool, tags.HangupTool):
                    hangup = tool
                elif isinstance(tool, tags.ReferTool):
                    self._refer(tool.callee, reply, caller=tool.caller, options=tool.options)
                elif isinstance(tool, tags.HttpTool):
                    note = yield self._http_tool(tool)
                    self.history.append({"role": "system", "content": note})
                    reask = True
                elif isinstance(tool, tags.RagTool):
                    self.history.append({"role": "system", "content": f"RAG result for {tool.query}: "
                                         "no knowledge base is configured for this playbook."})
                    reask = True
                elif isinstance(tool, tags.AcceptTool):
                    self._accept(tool)
                elif isinstance(tool, tags.RejectTool):
                    self._reject(tool)
            if not reask or rounds >= MAX_TOOL_ROUNDS or reply.cancelled or self.stopped:
                break
            rounds += 1
            try:
                reply.llm = self.llm.complete([dict(m) for m in self.history])
                result = yield reply.llm
            except defer.CancelledError:
                return
            except Exception as e:
                if not reply.cancelled:
                    self._llm_failed(reply, e)
                return
            finally:
                reply.llm = None
            content = result.content
            command = tags.parse_json_command(content) or tags.JsonCommand(text=content)
        if reply.cancelled or self.stopped:
            return
        text = command.text if command.text is not None else ""
        if hangup is not None:
            reply.hangup = True
            if not text:
                self._close_quietly(reply)
                self._end_call(ev.hangup_reason(hangup.reason, hangup.initiator), initiator=hangup.initiator or "system")
                return
        spoken = _strip_markup(text)
        reply.spoken.append(spoken)
        reply.play_id = self._next_play_id()
        self._close_reply(reply, spoken, spoken, wait_input_ms=command.wait_input_timeout)

    def _close_quietly(self, reply: _Reply) -> None:
        reply.done = True
        if reply is self.reply:
            self.reply = None

    def _accept(self, tool: tags.AcceptTool) -> None:
        from activecall.call.session import CallState

        if self.session.state is CallState.ANSWERED:
            log.info("call {id}: accept tool ignored, the call is already answered", id=self.session.id)
            return
        option = cmd.CallOption.from_dict(dict(tool.options))
        self._dispatch(cmd.Accept(option=option))

    def _reject(self, tool: tags.RejectTool) -> None:
        from activecall.call.session import CallState

        if self.session.state is CallState.ANSWERED:
            self._end_call("rejected", status_code=tool.code or 603)
            return
        self._dispatch(cmd.Reject(reason=tool.reason, code=tool.code))

    # -- actions ------------------------------------------------------------------------------------

    def _goto(self, scene_id: str) -> None:
        """Switch scene: the system prompt is rebuilt with the scene's rendered text; no new turn."""
        if scene_id not in self.playbook.scenes:
            log.warn("call {id}: <goto> to unknown scene {scene!r}, ignored", id=self.session.id, scene=scene_id)
            return
        log.info("call {id}: scene {old} -> {new}", id=self.session.id, old=self.scene_id, new=scene_id)
        self.scene_id = scene_id
        system = {"role": "system", "content": self._system_prompt()}
        if self.history:
            self.history[0] = system
        else:
            self.history.append(system)

    def _refer(self, target: str, reply: Optional[_Reply], caller: Optional[str] = None,
               options: Optional[dict] = None) -> None:
        """Transfer: through the call's connector when it can; otherwise end the call with reason refer."""
        connector = self.session.connector
        if connector is not None and callable(getattr(connector, "refer", None)):
            option = self.session.option
            command = cmd.Refer(
                caller=caller or (option.caller if option is not None and option.caller else "") or "",
                callee=target,
                options=cmd.ReferOption.from_dict(dict(options)) if options else None,
            )
            self._send(command)
            return
        log.warn("call {id}: refer to {target}: a {kind} call cannot be transferred; ending it with reason refer "
                 "after the reply", id=self.session.id, target=target, kind=self.session.call_type)
        self.variables.setdefault("refer_to", target)
        if reply is not None and not reply.done:
            reply.end_reason = "refer"
        else:
            self._end_call("refer")

    def _end_call(self, reason: str, initiator: Optional[str] = "system", status_code: Optional[int] = None) -> None:
        self.hanging_up = True
        self._refresh_hangup_headers()
        self.session.end(reason, initiator=initiator, status_code=status_code)

    def _refresh_hangup_headers(self) -> None:
        """``sip.hangup_headers`` (and ``_hangup_headers`` set in bulk) rendered for the BYE."""
        try:
            headers = bye_headers(self.config.sip.hangup_headers, self.variables, self._call_info())
        except Exception:
            log.failure("call {id}: rendering hangup headers failed", id=self.session.id)
            return
        self.session.hangup_headers.update(headers)

    def _http_tag(self, tag: tags.Http) -> None:
        """``<http>``: runs in the background with its timeout; the result joins the conversation."""
        url = self._render(tag.url)
        body = self._render(tag.body) if tag.body is not None else None
        d = self._http_call(tag.method, url, body.encode("utf-8") if body is not None else None, {}, tag.timeout)

        def done(result):
            status, text = result
            if tag.set_var:
                set_var(self.variables, tag.set_var, text)
                self._refresh_hangup_headers()
            self._system_note(f"HTTP {tag.method} {url} returned ({status}): {text[:MAX_HTTP_BODY]}")

        def failed(failure):
            self._system_note(f"HTTP {tag.method} {url} failed: {_failure_text(failure)}")

        d.addCallbacks(done, failed)
        self._pending_http.append(d)
        d.addBoth(lambda _: self._pending_http.remove(d) if d in self._pending_http else None)

    @defer.inlineCallbacks
    def _http_tool(self, tool: tags.HttpTool):
        body = None
        headers = dict(tool.headers)
        if tool.body is not None:
            body = (tool.body if isinstance(tool.body, str) else json.dumps(tool.body)).encode("utf-8")
            headers.setdefault("Content-Type", "application/json")
        try:
            status, text = yield self._http_call(tool.method, tool.url, body, headers, tags.DEFAULT_HTTP_TIMEOUT)
        except Exception as e:
            return f"HTTP tool failed: {_failure_text(e)}"
        return f"HTTP tool response ({status}): {text[:MAX_HTTP_BODY]}"

    def _http_call(self, method: str, url: str, body: Optional[bytes], headers: dict, timeout: float) -> defer.Deferred:
        """(status, body text); fails on a connection error or after ``timeout`` seconds."""

        @defer.inlineCallbacks
        def call():
            response = yield self.http.request(method, url, data=body,
                                               headers={k: [v] for k, v in headers.items()})
            content = yield response.content()
            return response.code, content.decode("utf-8", "replace")

        d = call()
        d.addTimeout(timeout, self.clock)
        return d

    # -- context features ---------------------------------------------------------------------------

    def _repair(self, text: str) -> bool:
        """Context repair: a very short bot line right after the caller spoke was a false turn; undo it
        and glue the new words to the caller's previous message."""
        window = self.llm_config.repair_window_ms
        if self.last_bot_line_ms is None or self._now() - self.last_bot_line_ms >= window:
            return False
        last = self.history[-1] if len(self.history) > 1 else None
        if last is None or last["role"] != "assistant" or len(last["content"]) >= REPAIR_MAX_CHARS:
            return False
        self.history.pop()
        previous = self.history[-1] if len(self.history) > 1 else None
        if previous is not None and previous["role"] == "user":
            joiner = "，" if self.llm_config.language.lower().startswith("zh") else ", "
            previous["content"] = previous["content"] + joiner + text
        else:
            self.history.append({"role": "user", "content": text})
        log.info("call {id}: context repaired (dropped {line!r})", id=self.session.id, line=last["content"])
        return True

    @defer.inlineCallbacks
    def _rolling_summary(self, reply: _Reply):
        """Long conversations: summarise all but the last few messages into the system prompt."""
        if len(self.history) <= self.llm_config.summary_limit + SUMMARY_KEEP:
            return
        older = self.history[: len(self.history) - SUMMARY_KEEP]
        try:
            result = yield self.llm.complete(
                [dict(m) for m in older] + [{"role": "user", "content": prompts.ROLLING_SUMMARY_PROMPT}])
        except Exception as e:
            log.warn("call {id}: rolling summary failed: {e}", id=self.session.id, e=str(e))
            return
        if reply.cancelled:
            return
        text = (result.content or "").strip()
        if text:
            self.summary = f"{self.summary}\n{text}" if self.summary else text
        recent = self.history[len(self.history) - SUMMARY_KEEP:]
        self.history = [{"role": "system", "content": self._system_prompt()}] + recent

    # -- posthook -----------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def _posthook(self):
        """After the call: ``{sessionId, summary, history, timestamp}`` to ``posthook.url``, retried."""
        hook = self.config.posthook
        if hook is None:
            return
        conversation = [dict(m) for m in self.history[1:]]
        summary = None
        if hook.summary:
            try:
                result = yield self.llm.complete(
                    [dict(m) for m in self.history] + [{"role": "user", "content": prompts.summary_prompt(hook.summary)}])
                summary = result.content
            except Exception as e:
                log.warn("call {id}: posthook summary failed: {e}", id=self.session.id, e=str(e))
        body = json.dumps({
            "sessionId": self.session.id,
            "summary": summary,
            "history": conversation if hook.include_history else None,
            "timestamp": ev.rfc3339(self.clock.seconds()),
        }, ensure_ascii=False).encode("utf-8")
        headers = {"Content-Type": "application/json", **dict(hook.headers)}
        delay = POSTHOOK_BACKOFF
        for attempt in range(1, POSTHOOK_ATTEMPTS + 1):
            try:
                status, text = yield self._http_call(hook.method.upper(), hook.url, body, headers, POSTHOOK_TIMEOUT)
                if 200 <= status < 300:
                    log.info("call {id}: posthook delivered to {url}", id=self.session.id, url=hook.url)
                    return
                why = f"HTTP {status}: {text[:200]}"
            except Exception as e:
                why = _failure_text(e)
            log.warn("call {id}: posthook attempt {n} to {url} failed: {why}", id=self.session.id, n=attempt,
                     url=hook.url, why=why)
            if attempt < POSTHOOK_ATTEMPTS:
                yield _sleep(self.clock, delay)
                delay *= 2
        log.error("call {id}: posthook to {url} given up after {n} attempts", id=self.session.id, url=hook.url,
                  n=POSTHOOK_ATTEMPTS)

    # -- plumbing -----------------------------------------------------------------------------------

    def _send(self, command, wait: bool = False) -> None:
        """Send now, or queue behind the track being waited for (``<play>`` mid-reply keeps the order).

        ``wait``: later commands wait until this one's track has ended."""
        if self._gate is not None:
            self._outbox.append((command, wait))
            return
        self._dispatch(command)
        if wait:
            self._gate = command.effective_play_id if isinstance(command, cmd.Play) else command.playId

    def _drain(self) -> None:
        while self._outbox and self._gate is None:
            command, wait = self._outbox.popleft()
            self._send(command, wait)

    def _dispatch(self, command) -> None:
        from activecall.call.session import CallState

        if self.stopped or self.session.state is CallState.ENDED:
            return  # a reply finishing while the call hangs up has no one to speak to
        self.session.handle(command)
        if isinstance(command, cmd.Tts) and command.autoHangup and self.session.playback.current is None:
            self._end_call("autohangup")  # nothing could be played: do not wait for a trackEnd that never comes

    def _system_note(self, text: str) -> None:
        self.history.append({"role": "system", "content": text})

    def _system_prompt(self) -> str:
        scene = self.playbook.scenes[self.scene_id]
        return prompts.system_prompt(
            self._render(scene.prompt), self.llm_config.features, self.llm_config.tool_instructions,
            self.config.dtmf_collectors, self.summary)

    def _wait_input_ms(self) -> int:
        """The follow-up timeout when the scene has one, so the silence that triggers it arrives in time."""
        followup = self.playbook.followup_for(self.scene_id)
        return followup.timeout if followup is not None else DEFAULT_WAIT_INPUT_MS

    def _next_play_id(self) -> str:
        self._replies += 1
        return f"llm-{self._replies}"

    def _call_info(self) -> CallInfo:
        option = self.session.option
        return CallInfo(
            session_id=self.session.id,
            call_type=self.session.call_type.lower(),
            start_time=ev.rfc3339(self.session.start_time),
            caller=self.variables.get("caller") or (option.caller if option is not None else None),
            callee=self.variables.get("callee") or (option.callee if option is not None else None),
        )

    def _render(self, template: str) -> str:
        return render(template, template_context(self.variables, self._call_info()), what="playbook text")

    def _emit_history(self, speaker: str, text: str) -> None:
        self.session.emit(ev.AddHistory(sender="llm", timestamp=self._now(), speaker=speaker, text=text))

    def _metrics(self, key: str, duration: int, data: dict) -> None:
        self.session.emit(ev.Metrics(timestamp=self._now(), key=key, duration=max(0, int(duration)), data=data))

    def _now(self) -> int:
        return ev.now_ms(self.clock)


def _cancel(call) -> None:
    if call is not None and call.active():
        call.cancel()


def _sleep(clock, seconds: float) -> defer.Deferred:
    d = defer.Deferred()
    clock.callLater(seconds, d.callback, None)
    return d


def _failure_text(error) -> str:
    value = getattr(error, "value", error)
    if isinstance(value, (defer.TimeoutError, defer.CancelledError)):
        return "timed out"
    return str(value) or type(value).__name__


def _strip_markup(text: str) -> str:
    """JSON-mode ``text`` is spoken whole; markup in it is removed, never read out."""
    parser = tags.ReplyParser(min_sentence_chars=0)
    events = parser.feed(text) + parser.finish()
    return " ".join(e.text for e in events if isinstance(e, tags.Sentence))


# -- where playbooks start -------------------------------------------------------------------------------


def playbook_call_option(playbook: Playbook) -> cmd.CallOption:
    """The playbook's media sections as a CallOption (what an invite inherits when it leaves them out)."""
    config = playbook.config

    def wire(section):
        if section is None:
            return None
        out = {}
        for f in dataclasses.fields(section):
            keys = f.metadata.get("keys")
            value = getattr(section, f.name)
            if not keys or value is None or (hasattr(value, "keys") and not value):
                continue
            out[keys[0]] = dict(value) if hasattr(value, "keys") else value
        return out

    data: dict[str, Any] = {}
    for name in ("asr", "tts", "vad", "recorder", "ambiance", "eou"):
        value = wire(getattr(config, name))
        if value is not None:
            data[name] = value
    if config.denoise is not None:
        data["denoise"] = config.denoise
    if config.extra:
        data["extra"] = dict(config.extra)
    return cmd.CallOption.from_dict(data)


def load_for_session(session, playbook_or_name) -> Playbook:
    """A ``Playbook``, a ``PlaybookFile`` (a path already decided: the router's, from the
    configuration or confined under ``playbook_dir``), inline text (starting with ``---``) or a
    name under ``config.playbook_dir`` (names from the API: confined there).

    Raises ``PlaybookError`` (bad file or name)."""
    from activecall.call.handlers import PlaybookFile, PlaybookNameError, resolve_playbook

    if isinstance(playbook_or_name, Playbook):
        return playbook_or_name
    if isinstance(playbook_or_name, PlaybookFile):
        if not os.path.isfile(playbook_or_name.path):
            raise PlaybookError("playbook not found", playbook_or_name.path)
        return _load_cached(playbook_or_name.path)
    text = str(playbook_or_name)
    if text.lstrip().startswith("---"):
        return parse_playbook(text.lstrip(), "<inline playbook>")
    playbook_dir = session.config.playbook_dir if session.config is not None else "./config/playbook"
    try:
        path = resolve_playbook(playbook_dir, text)
    except PlaybookNameError as e:
        raise PlaybookError(str(e), text) from None
    if not os.path.isfile(path):
        raise PlaybookError("playbook not found", text)
    return _load_cached(path)


_PLAYBOOK_CACHE: dict = {}


def _load_cached(path: str) -> Playbook:
    """Parse a playbook file once per (mtime, size): every call of a busy route shares it
    (parsing cost 13 % of a call's CPU at 150 calls/s); an edited file is parsed again."""
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size)
    playbook = _PLAYBOOK_CACHE.get(key)
    if playbook is None:
        playbook = load_playbook(path)
        if len(_PLAYBOOK_CACHE) > 256:
            _PLAYBOOK_CACHE.clear()
        _PLAYBOOK_CACHE[key] = playbook
    return playbook


def start_playbook(session, playbook_or_name, *, extras: Optional[dict] = None, clock=None,
                   llm_client_factory=None, http=None) -> Optional[PlaybookRunner]:
    """Run a playbook on ``session`` (any call type): load it, give the call its media options, attach.

    Before the answer, the playbook's ``asr``/``tts``/``vad``/… become the call's options where the call
    left them out; the runner begins when the call is answered.  A playbook that cannot be loaded sends
    ``error{sender: "playbook"}`` and ends the call; the result is then None.
    """
    from activecall.call.session import CallState

    existing = getattr(session, "playbook_runner", None)
    if existing is not None and not existing.stopped:
        session.error("playbook", "a playbook is already running on this call")
        return existing
    try:
        playbook = load_for_session(session, playbook_or_name)
        runner_class = PlaybookRunner
        if playbook.config.realtime is not None:  # speech to speech: the model replaces VAD/ASR/LLM/TTS
            from activecall.playbook.realtime import RealtimePlaybookRunner as runner_class
        runner = runner_class(session, playbook, clock=clock, llm_client_factory=llm_client_factory, http=http,
                              fillers=_fillers_for(session))
    except PlaybookError as e:
        log.warn("call {id}: cannot run playbook: {e}", id=session.id, e=str(e))
        session.error("playbook", str(e))
        session.end("failed", initiator="system")
        return None
    if extras:
        session.extras.update(extras)
    if session.state is not CallState.ANSWERED:
        option = playbook_call_option(playbook)
        session.option = session.option.merged_over(option) if session.option is not None else option
    return runner.attach()


def _fillers_for(session) -> tuple[str, ...]:
    """``fillers.txt`` next to the playbook directory (the original's ``config/fillers.txt``), if present."""
    if session.config is None:
        return tags.DEFAULT_FILLERS
    path = os.path.join(os.path.dirname(os.path.abspath(session.config.playbook_dir)), "fillers.txt")
    return tags.load_fillers(path)
