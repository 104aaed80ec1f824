"""A playbook running one call: a Deferred-driven dialogue state machine (docs/playbooks.md, "Runtime").

The runner is a listener of its ``CallSession``: it sees every event the call emits (asrFinal, speaking,
silence, dtmf, trackStart/trackEnd, hangup) and answers with the same commands a WebSocket client would
send (``tts``, ``play``, ``interrupt``, ``refer``), through ``session.handle``.  It keeps the dialogue:
scenes, DTMF actions, follow-ups, transfers, hangup headers, the command queue behind a ``<play>``; the
bot's turns are its *turn strategy*'s (``strategy.ITurnStrategy``), picked from the front matter:

- ``llm_strategy.LlmTurns``: one LLM reply is one ``playId``, its sentences streamed to the TTS, tags acting;
- ``realtime_strategy.RealtimeTurns``: a speech-to-speech model (``realtime:``).

Around it: ``collectors`` (``<collect>``: DTMF digits into a variable), ``tools`` (``<http>`` and the JSON
tool commands), ``posthook`` (after the call), ``start`` (loading a playbook and starting it on a call).

Time is the injected clock (collector timers, posthook retries, HTTP timeouts, barge-in guards), so tests
drive it with ``task.Clock``.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.logger import Logger

from activecall.backlink import BackLink, back_link
from activecall.call.session import CallState
from activecall.playbook import tags
from activecall.playbook.collectors import DigitCollector
from activecall.playbook.echo import EchoLLM
from activecall.playbook.front_matter import ECHO_PROVIDER, LlmConfig, PlaybookError
from activecall.playbook.llm import LLMClient, LLMSettings
from activecall.playbook.llm_strategy import LlmTurns
from activecall.playbook.parser import Playbook
from activecall.playbook.posthook import deliver_posthook
from activecall.playbook.realtime_strategy import RealtimeTurns
from activecall.playbook.templates import CallInfo, bye_headers, render, template_context
from activecall.playbook.tools import HttpTools
from activecall.protocol import commands as cmd
from activecall.protocol import events as ev

log = Logger(namespace="activecall.playbook")

#: ms of silence after the bot's speech before ``silence`` fires (the original's fixed value)
DEFAULT_WAIT_INPUT_MS = 10000


def default_llm_client_factory(clock=None) -> Callable[[LlmConfig], Any]:
    """``llm`` config -> a client: the built-in echo for ``provider: echo`` (or ``auto`` with no endpoint),
    else the OpenAI-compatible streaming client."""

    def factory(llm: LlmConfig):
        if llm.effective_provider == ECHO_PROVIDER:
            return EchoLLM()
        return LLMClient(LLMSettings.from_playbook(llm), clock=clock)

    return factory


def strategy_for(playbook: Playbook):
    """The turn strategy a playbook asks for: ``realtime:`` in the front matter is speech to speech (the
    model replaces VAD/ASR/LLM/TTS), anything else the LLM pipeline."""
    return RealtimeTurns if playbook.config.realtime is not None else LlmTurns


class PlaybookRunner:
    """Runs ``playbook`` on ``session``; ``attach()`` once, it starts when the call is answered.

    ``llm_client_factory(llm_config)`` builds the model client (``stream``/``complete``/``LLMReply``);
    ``http`` is a treq-like client for ``<http>``, the http tool and the posthook.  ``done`` fires (with None) when the
    call has ended and the posthook is delivered (or given up).  ``strategy`` takes the bot's turns.
    """

    #: the call's session; weak once the call has ended (activecall/backlink.py)
    session = back_link()

    def __init__(self, session, playbook: Playbook, clock=None, llm_client_factory=None, http=None,
                 fillers=tags.DEFAULT_FILLERS):
        if playbook.config.llm is None:
            if playbook.config.realtime is None:
                raise PlaybookError("missing 'llm': a playbook needs an llm section to run", playbook.source,
                                    key="llm")
            # realtime: only llm's fallback/apiKey are read, and the posthook's summary asks the echo model
            playbook = dataclasses.replace(
                playbook, config=dataclasses.replace(playbook.config, llm=LlmConfig(provider=ECHO_PROVIDER)))
        #: how the runner's parts (strategy, tools, collector) point back at it: weak once the call has
        #: ended (the session's ``_release``; activecall/backlink.py)
        self.back_link = BackLink(self)
        self.session = session
        #: the session, held until ``done``: the posthook (and whatever else the runner still awaits after
        #: the end) may read ``runner.session``, whose link turns weak when the call ends
        self._session_until_done = session
        self.playbook = playbook
        self.config = playbook.config
        self.llm_config: LlmConfig = playbook.config.llm
        self.clock = clock if clock is not None else session.clock
        factory = llm_client_factory or default_llm_client_factory()
        self.llm = factory(self.llm_config)
        self.tools = HttpTools(self, http)
        self.fillers = tuple(fillers)
        self.variables = session.extras  # shared: set_var, collectors and SIP headers all land here
        self.scene_id = playbook.initial_scene
        self.history: list[dict[str, str]] = []
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
        self.collector = DigitCollector(self)
        self.replies = 0  # playIds handed out (llm-N)
        self._gate: Optional[str] = None  # playId whose trackEnd the queued commands wait for
        self._outbox: deque = deque()
        self._end_after: Optional[tuple[str, str]] = None  # (playId, reason): end the call when it ends
        self.strategy = strategy_for(playbook)(self)

    @property
    def reply(self):
        """The bot's reply in progress (the strategy's), or None."""
        return self.strategy.reply

    @property
    def collection(self):
        """The DTMF collection in progress, or None."""
        return self.collector.current

    # -- life cycle ---------------------------------------------------------------------------------

    def attach(self) -> "PlaybookRunner":
        """Listen to the call; begin as soon as it is answered (media waits for the answer)."""
        self.session.listeners.append(self._on_event)
        self.session.playbook_runner = self
        self.session.when_ended().addCallback(lambda _: self._stop())
        for key, value in (self.config.extra or {}).items():
            self.variables.setdefault(key, value)
        self.strategy.attach()
        controller = getattr(self.session, "barge_in", None)
        if controller is not None and self.strategy.name == "llm":
            # pause on the caller's voice here (fast, acoustic); the strategy decides on words
            controller.configure(self.config.interruption.policy(), decides=False, fillers=self.fillers)
        if self.session.state is CallState.ANSWERED:
            self.start()
        return self

    def start(self) -> None:
        """System prompt and hangup headers, then the strategy's opening (scene ``<play>``, greeting ...)."""
        if self.started or self.stopped:
            return
        self.started = True
        self.history = [{"role": "system", "content": self.system_prompt()}]
        self.last_interaction_ms = self.now()
        self.refresh_hangup_headers()
        self.strategy.begin()

    def _stop(self) -> None:
        """The call is over: cancel everything, then deliver the posthook."""
        if self.stopped:
            return
        self.stopped = True
        timer = getattr(self, "_voicemail_timer", None)
        if timer is not None and timer.active():
            timer.cancel()
        self.strategy.stop()
        self.collector.end()
        self._outbox.clear()
        if self._on_event in self.session.listeners:
            self.session.listeners.remove(self._on_event)
        session_id = self.session.id  # the session may be gone by the time the posthook is done
        d = deliver_posthook(self) if self.started else defer.succeed(None)
        d.addErrback(lambda f: log.failure("posthook of {id} failed", f, id=session_id))
        d.addBoth(self._done)

    def _done(self, _) -> None:
        self._session_until_done = None  # from now on only the session's holders keep it
        # fires with None, not the runner: a fired Deferred keeps its result (runner -> done -> runner)
        self.done.callback(None)

    # -- events -------------------------------------------------------------------------------------

    def _on_event(self, event) -> None:
        if self.stopped:
            return
        if self.started:
            self.strategy.observe(event)
        if isinstance(event, ev.Answer):
            if event.trackId == self.session.id:
                detector = self.session.amd
                if detector is not None and detector.verdict is None:
                    return  # answering-machine detection first: the verdict starts (or replaces) the dialogue
                self.start()
            return
        if isinstance(event, ev.AnswerMachineDetection):
            self._amd_verdict(event)
            return
        if isinstance(event, ev.Hangup):
            self._stop()
            return
        if isinstance(event, ev.TransferRequest):
            self._transfer_requested(event)
            return
        if not self.started:
            return
        bot_track = self.session.playback.track_id
        if isinstance(event, ev.TrackStart) and event.trackId == bot_track:
            self.is_speaking = True
            self.last_tts_start_ms = self.now()
        elif isinstance(event, ev.TrackEnd) and event.trackId == bot_track:
            self._track_ended(event)
        elif isinstance(event, ev.Dtmf):
            self._on_dtmf(event.digit)
        elif self.collection is not None and not self.collection.config.interruptible:
            return  # collecting: speech is not for us (docs/playbooks.md, collectors)
        elif self.transferring:
            return  # on hold, consulting or bridged to a human: the caller is not talking to us
        elif isinstance(event, ev.AsrFinal):
            self.strategy.caller_said(event)
        elif isinstance(event, (ev.AsrDelta, ev.Speaking)):
            self.last_interaction_ms = self.now()
            self.strategy.caller_speaking(event)
        elif isinstance(event, ev.Silence):
            self._on_silence()
        # ev.Eou starts no turn here (the original started one with no user message, then another on
        # the asrFinal): a completed turn finalises the recogniser, and that asrFinal starts the turn

    def _amd_verdict(self, event: ev.AnswerMachineDetection) -> None:
        """human / unknown: the dialogue starts; machine: wait for the beep and leave ``amd.voicemail``
        (or hang up without one); fax: hang up."""
        config = self.playbook.config.amd
        self.variables["amd"] = event.result if event.result != "beep" else "machine"
        if event.result in ("human", "unknown"):
            self.start()
        elif event.result == "fax" or (event.result == "machine" and (config is None or not config.voicemail)):
            if not self.started or event.result == "fax":
                self.end_call("answerMachine")
        elif event.result == "machine":
            if self.started:
                return  # the dialogue had begun (amd set by the client, not the playbook): leave it be
            self._voicemail_due = True
            timeout = (self.session.amd.s.beepTimeout if self.session.amd is not None else 30000) / 1000
            self._voicemail_timer = self.session.clock.callLater(timeout, self._leave_voicemail)
        elif event.result == "beep" and getattr(self, "_voicemail_due", False):
            self._leave_voicemail()

    def _leave_voicemail(self) -> None:
        """After the beep (or when none came in time): say ``amd.voicemail`` and hang up."""
        if not getattr(self, "_voicemail_due", False) or self.stopped:
            return
        self._voicemail_due = False
        timer = getattr(self, "_voicemail_timer", None)
        if timer is not None and timer.active():
            timer.cancel()
        text = self.render(self.playbook.config.amd.voicemail)
        log.info("call {id}: leaving the voicemail message", id=self.session.id)
        self.dispatch(cmd.Tts(text=text, playId="voicemail", autoHangup=True, endOfStream=True))

    @property
    def transferring(self) -> bool:
        """A warm transfer holds the call, or the call is bridged to another one."""
        wt = self.session.warm_transfer
        return self.session.bridge is not None or (wt is not None and wt.state in ("dialing", "consulting"))

    def warm_transfer(self, target: str, summary: Optional[str] = None, moh: Optional[str] = None) -> None:
        """``<warm_transfer>``: hold the caller, brief the human, connect; on failure the dialogue resumes
        with a system note saying so."""
        from activecall.call.warm_transfer import start_warm_transfer

        self.strategy.cancel(keep_partial=True)
        self.flush_queue()
        command = cmd.WarmTransfer(callee=self.render(target), summary=self.render(summary) if summary else None,
                                   moh=moh)

        def done(outcome, code):
            self.variables["transfer_result"] = outcome
            if outcome == "failed" and not self.stopped and self.session.state.value == "answered":
                self.history.append({"role": "system", "content":
                                     f"The transfer to {command.callee} did not happen (SIP {code}). "
                                     "Tell the caller and offer to help otherwise."})
                self.start_turn()

        start_warm_transfer(self.session, command, on_done=done)

    def _transfer_requested(self, event: ev.TransferRequest) -> None:
        """A REFER from the far end: the front matter's ``sip.transfer_requests`` answers it."""
        policy = self.playbook.config.sip.transfer_requests
        self.variables["transfer_to"] = event.referTo
        if policy is None and getattr(self.session.connector, "protocol", None) is not None:
            return  # a /call/sip client is attached: it answers (acceptTransfer / rejectTransfer)
        policy = policy or "refuse"
        log.info("call {id}: the far end asks for a transfer to {to}; {policy}", id=self.session.id,
                 to=event.referTo, policy=policy)
        if policy == "accept":
            self.session.handle(cmd.AcceptTransfer())
        else:
            self.session.handle(cmd.RejectTransfer(code=603))

    def _track_ended(self, event: ev.TrackEnd) -> None:
        self.is_speaking = False
        self.last_interaction_ms = self.now()
        if self._end_after is not None and event.playId == self._end_after[0]:
            reason = self._end_after[1]
            self._end_after = None
            self.end_call(reason)
            return
        if self.collection is not None and not self.collection.digits:
            self.collector.arm_timeout()  # the caller can type now that the prompt is over
        if self._gate is not None and event.playId == self._gate:
            self._gate = None
            self._drain()

    def barge_in(self) -> None:
        """Flush the bot's playout at once and stop the reply (what it said so far stays in history)."""
        log.info("call {id}: barge-in, playout flushed", id=self.session.id)
        self.strategy.cancel(keep_partial=True)
        self.flush_queue()
        self.is_speaking = False
        self.dispatch(cmd.Interrupt(graceful=False))

    def _on_silence(self) -> None:
        """Follow-up: speak again after ``timeout`` ms of quiet, hang up after ``maxCount`` tries."""
        config = self.playbook.followup_for(self.scene_id)
        if config is None or self.is_speaking or self.reply is not None or self.hanging_up:
            return
        if self.now() - self.last_interaction_ms < config.timeout:
            return
        if self.followup_count >= config.max_count:
            log.info("call {id}: no answer after {n} follow-ups, hanging up", id=self.session.id,
                     n=self.followup_count)
            self.end_call("Max follow-up reached")
            return
        self.followup_count += 1
        self.last_interaction_ms = self.now()
        self.start_turn()

    def _on_dtmf(self, digit: str) -> None:
        """A collection in progress takes the digit; otherwise the scene's DTMF action, if any."""
        self.last_interaction_ms = self.now()
        if self.collection is not None:
            self.collector.digit(digit)
            return
        action = self.playbook.dtmf_action(self.scene_id, digit)
        if action is None:
            return
        log.info("call {id}: DTMF {digit} -> {action}", id=self.session.id, digit=digit, action=action.action)
        if action.action == "goto":
            self.strategy.cancel(keep_partial=True)
            self.goto(action.scene)
            play = self.playbook.scenes[action.scene].play
            self.start_turn(intro_play=self.render(play) if play else None)
        elif action.action == "transfer":
            self.refer(self.render(action.target), None)
        elif action.action == "hangup":
            self.end_call("DTMF Hangup")

    # -- actions (the strategy's, the collector's, the tools') -----------------------------------------

    def start_turn(self, intro_play: Optional[str] = None) -> None:
        """The bot's turn (the strategy's), after ``intro_play`` when given."""
        self.strategy.start_turn(intro_play=intro_play)

    def goto(self, scene_id: str) -> None:
        """Switch scene: the system prompt is rebuilt with the scene's rendered text; no new turn."""
        if scene_id not in self.playbook.scenes:
            log.warn("call {id}: <goto> to unknown scene {scene!r}, ignored", id=self.session.id, scene=scene_id)
            return
        log.info("call {id}: scene {old} -> {new}", id=self.session.id, old=self.scene_id, new=scene_id)
        before = self.scene_id
        self.scene_id = scene_id
        system = {"role": "system", "content": self.system_prompt()}
        if self.history:
            self.history[0] = system
        else:
            self.history.append(system)
        if scene_id != before:
            self.strategy.scene_changed()

    def refer(self, target: str, reply=None, caller: Optional[str] = None, options: Optional[dict] = None) -> None:
        """Transfer: through the call's connector when it can; otherwise end the call with reason refer
        (after ``reply``, when one is still being spoken)."""
        if self.session.can_transfer:
            option = self.session.option
            command = cmd.Refer(
                caller=caller or (option.caller if option is not None and option.caller else "") or "",
                callee=target,
                options=cmd.ReferOption.from_dict(dict(options)) if options else None,
            )
            self.send(command)
            return
        log.warn("call {id}: refer to {target}: a {kind} call cannot be transferred; ending it with reason refer "
                 "after the reply", id=self.session.id, target=target, kind=self.session.call_type)
        self.variables.setdefault("refer_to", target)
        if reply is not None and not reply.done:
            reply.end_reason = "refer"
        else:
            self.end_call("refer")

    def end_call(self, reason: str, initiator: Optional[str] = "system", status_code: Optional[int] = None) -> None:
        self.hanging_up = True
        self.refresh_hangup_headers()
        self.session.end(reason, initiator=initiator, status_code=status_code)

    def end_after(self, play_id: str, reason: str) -> None:
        """End the call with ``reason`` once the track ``play_id`` has played."""
        self._end_after = (play_id, reason)

    def refresh_hangup_headers(self) -> None:
        """``sip.hangup_headers`` (and ``_hangup_headers`` set in bulk) rendered for the BYE."""
        if self.session is None:  # an <http> that answered after the call ended and was freed
            return
        try:
            headers = bye_headers(self.config.sip.hangup_headers, self.variables, self._call_info())
        except Exception:
            log.failure("call {id}: rendering hangup headers failed", id=self.session.id)
            return
        self.session.hangup_headers.update(headers)

    # -- plumbing -----------------------------------------------------------------------------------

    def send(self, command, wait: bool = False) -> None:
        """Send now, or queue behind the track being waited for (``<play>`` mid-reply keeps the order).

        ``wait``: later commands wait until this one's track has ended.  A callable is a strategy's own
        step (realtime: ``response.create``), queued like a command and run when its turn comes."""
        if self._gate is not None:
            self._outbox.append((command, wait))
            return
        self.dispatch(command)
        if wait:
            self._gate = command.effective_play_id if isinstance(command, cmd.Play) else command.playId

    def _drain(self) -> None:
        while self._outbox and self._gate is None:
            command, wait = self._outbox.popleft()
            self.send(command, wait)

    def flush_queue(self) -> None:
        """Drop the commands waiting behind a track, and the wait."""
        self._outbox.clear()
        self._gate = None

    def dispatch(self, command) -> None:
        if callable(command):
            if not self.stopped:
                command()
            return
        if self.stopped or self.session.state is CallState.ENDED:
            return  # a reply finishing while the call hangs up has no one to speak to
        self.session.handle(command)
        if isinstance(command, cmd.Tts) and command.autoHangup and self.session.playback.current is None:
            self.end_call("autohangup")  # nothing could be played: do not wait for a trackEnd that never comes

    def system_note(self, text: str) -> None:
        self.history.append({"role": "system", "content": text})

    def system_prompt(self) -> str:
        return self.strategy.system_prompt()

    def wait_input_ms(self) -> int:
        """The follow-up timeout when the scene has one, so the silence that triggers it arrives in time."""
        followup = self.playbook.followup_for(self.scene_id)
        return followup.timeout if followup is not None else DEFAULT_WAIT_INPUT_MS

    def next_play_id(self) -> str:
        self.replies += 1
        return f"llm-{self.replies}"

    def _call_info(self) -> CallInfo:
        option = self.session.option
        return CallInfo(
            session_id=self.session.id,
            call_type=self.session.call_type.lower(),
            start_time=ev.rfc3339(self.session.start_time),
            caller=self.variables.get("caller") or (option.caller if option is not None else None),
            callee=self.variables.get("callee") or (option.callee if option is not None else None),
        )

    def render(self, template: str) -> str:
        return render(template, template_context(self.variables, self._call_info()), what="playbook text")

    def emit_history(self, speaker: str, text: str) -> None:
        self.session.emit(ev.AddHistory(sender="llm", timestamp=self.now(), speaker=speaker, text=text))

    def metrics(self, key: str, duration: int, data: dict) -> None:
        self.session.emit(ev.Metrics(timestamp=self.now(), key=key, duration=max(0, int(duration)), data=data))

    def now(self) -> int:
        return ev.now_ms(self.clock)
