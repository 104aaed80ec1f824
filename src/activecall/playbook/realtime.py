"""A playbook in realtime mode: front matter ``realtime:`` (docs/playbooks.md, "Realtime mode").

The speech-to-speech model replaces VAD, ASR, the LLM and the TTS; the runner
keeps the dialogue state machine around it:

- instructions = the current scene's prompt (rendered with the call's
  variables), sent in ``session.update`` when the call opens and again on
  every scene switch; ``realtime.extra.instructions`` only when the scene is empty;
- the initial scene's ``<play>``, then the greeting said by the model
  (``response.create`` with "say exactly ...") or, without a greeting, the
  model's own opening line;
- the model's functions: ``goto_scene{scene}`` (offered when there are several
  scenes) switches scene, plays its ``<play>`` and lets the model go on;
  ``hangup_call`` renders the BYE headers and hangs up after the goodbye;
  ``transfer_call``/``refer_call`` go through the runner's refer path (a call
  that cannot transfer ends with reason ``refer``, as for ``<refer>``);
- DTMF actions, follow-ups (a ``response.create`` after ``followUp.timeout`` of
  quiet), the history for the posthook (the caller's transcripts and the bot's
  words) work as in LLM mode;
- when the realtime service is lost, the call is not left in dead air: the
  ``llm.fallback`` line is spoken by the TTS and the call hangs up.

``llm`` is optional here (only its ``fallback``/``apiKey`` are read);
``llm.apiKey`` fills an unset ``realtime.secretKey`` as in the original.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from twisted.logger import Logger

from activecall.api import commands as cmd
from activecall.api import events as ev
from activecall.call.realtime_session import goto_scene_tool
from activecall.playbook.parser import ECHO_PROVIDER, LlmConfig, Playbook, PlaybookError
from activecall.playbook.runner import PlaybookRunner

log = Logger(namespace="activecall.playbook.realtime")


class _Respond:
    """A queued ``response.create`` (waits behind a ``<play>`` like any command of the runner)."""

    TAG = "response.create"

    def __init__(self, instructions: Optional[str] = None):
        self.instructions = instructions


class RealtimePlaybookRunner(PlaybookRunner):
    """``PlaybookRunner`` whose turns are the realtime model's; see the module docstring."""

    def __init__(self, session, playbook: Playbook, **kw):
        if playbook.config.realtime is None:
            raise PlaybookError("not a realtime playbook (no 'realtime' section)", playbook.source, key="realtime")
        if playbook.config.llm is None:  # the base runner wants one; echo is never asked anything here
            playbook = dataclasses.replace(
                playbook, config=dataclasses.replace(playbook.config, llm=LlmConfig(provider=ECHO_PROVIDER)))
        super().__init__(session, playbook, **kw)
        self.realtime = playbook.config.realtime
        self.processor = None
        self._opened = False

    # -- what call/realtime_session.py asks ----------------------------------------------------------------

    def realtime_option(self) -> dict:
        """The ``realtime`` section as a RealtimeOption JSON object."""
        rt = self.realtime
        extra = {str(k): v for k, v in (rt.extra or {}).items()}
        if rt.voice and "voice" not in extra:
            extra["voice"] = rt.voice
        out = {"provider": rt.provider, "model": rt.model, "endpoint": rt.endpoint, "secretId": rt.secret_id,
               "secretKey": rt.secret_key or self.llm_config.api_key, "turnDetection": rt.turn_detection,
               "tools": list(rt.tools) if rt.tools else None, "extra": extra or None}
        return {k: v for k, v in out.items() if v is not None}

    def realtime_instructions(self) -> Optional[str]:
        text = self._render(self.playbook.scenes[self.scene_id].prompt).strip()
        return text or None

    def realtime_tools(self) -> list:
        return [goto_scene_tool(self.playbook.scenes)] if len(self.playbook.scenes) > 1 else []

    def realtime_attached(self, processor) -> None:
        self.processor = processor
        processor.wait_input_ms = self._wait_input_ms()
        if self.started:
            self._open()

    def realtime_function(self, call_id: str, name: str, args: dict) -> bool:
        """Act on a built-in function; False leaves it to the processor's default."""
        processor = self.processor
        if name == "goto_scene":
            scene = args.get("scene")
            if scene not in self.playbook.scenes:
                processor.client.function_output(call_id, {
                    "error": f"unknown scene {scene!r}", "scenes": list(self.playbook.scenes)})
                return True
            self._goto(scene)
            processor.client.function_output(call_id, {"status": "ok", "scene": scene}, respond=False)
            play = self.playbook.scenes[scene].play
            intro = self._render(play) if play else None
            processor.after_current_audio(lambda: self._start_turn(intro_play=intro))
            return True
        if name == "hangup_call":
            self.hanging_up = True
            self._refresh_hangup_headers()
            return False
        if name in ("transfer_call", "refer_call"):
            callee = args.get("callee") or args.get("callee_uri")
            if not callee or not isinstance(callee, str):
                return False
            processor.client.function_output(call_id, {"status": "transferring", "callee": callee}, respond=False)
            processor.transfer_after_audio(callee, transfer=lambda target: self._refer(self._render(target), None))
            return True
        return False

    def realtime_failed(self, message: str) -> None:
        """The service is gone: say the fallback line (TTS) and hang up, never dead air."""
        if self.stopped or self.hanging_up:
            return
        log.warn("call {id}: realtime failed ({message}); speaking the fallback line", id=self.session.id,
                 message=message)
        self.hanging_up = True
        self._outbox.clear()
        self._gate = None
        self._dispatch(cmd.Tts(text=self._render(self.llm_config.fallback), playId=self._next_play_id(),
                               endOfStream=True, autoHangup=True))

    # -- the runner's hooks ---------------------------------------------------------------------------

    def start(self) -> None:
        if self.started or self.stopped:
            return
        self.started = True
        self.history = [{"role": "system", "content": self._system_prompt()}]
        self.last_interaction_ms = self._now()
        self._refresh_hangup_headers()
        log.info("call {id}: realtime playbook {source} started in scene {scene}", id=self.session.id,
                 source=self.playbook.source, scene=self.scene_id)
        if self.processor is not None:
            self._open()

    def _open(self) -> None:
        """The initial scene's ``<play>``, then the greeting (or the model's opening line)."""
        if self._opened or self.stopped:
            return
        self._opened = True
        play = self.playbook.initial.play
        if play:
            self._send(cmd.Play(url=self._render(play)), wait=True)
        greeting = self.playbook.greeting
        self._send(_Respond(f"Greet the caller by saying exactly: {self._render(greeting)}" if greeting else None))

    def _system_prompt(self) -> str:
        return self.realtime_instructions() or ""

    def _goto(self, scene_id: str) -> None:
        before = self.scene_id
        super()._goto(scene_id)
        if self.scene_id != before and self.processor is not None:
            self.processor.client.update_session(instructions=self.realtime_instructions() or "",
                                                 extra_tools=self.processor.builtin_tools())

    def _start_turn(self, intro_play: Optional[str] = None) -> None:
        """A turn is the model's: ``response.create`` (after the scene's ``<play>``, if any)."""
        if self.stopped:
            return
        self._outbox.clear()
        self._gate = None
        if intro_play:
            self._send(cmd.Play(url=intro_play), wait=True)
        self._send(_Respond())

    def _dispatch(self, command) -> None:
        if isinstance(command, _Respond):
            if self.processor is not None and not self.stopped:
                self.processor.client.create_response(command.instructions)
            return
        super()._dispatch(command)

    def _on_event(self, event) -> None:
        if (isinstance(event, ev.AddHistory) and event.sender == "realtime" and event.speaker == "assistant"
                and self.started and not self.stopped):
            self.history.append({"role": "assistant", "content": event.text})
            self.last_bot_line_ms = self._now()
        super()._on_event(event)

    def _on_final(self, event: ev.AsrFinal) -> None:
        """The caller's transcribed turn: history only (the model answers by itself)."""
        text = (event.text or "").strip()
        if not text:
            return
        self.last_final_ms = self._now()
        self.last_interaction_ms = self._now()
        self.followup_count = 0
        self.history.append({"role": "user", "content": text})

    def _maybe_barge_in(self, event) -> None:
        """Barge-in is the realtime processor's (the service's VAD decides)."""

