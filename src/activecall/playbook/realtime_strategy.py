"""A playbook in realtime mode: front matter ``realtime:`` (docs/playbooks.md, "Realtime mode").

The speech-to-speech model replaces VAD, ASR, the LLM and the TTS; this turn strategy connects the
runner's dialogue to the call's realtime mode (``call/realtime_session.py``), as its controller
(``IRealtimeController``, found on the call as ``session.realtime_controller``):

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
  words) work as in LLM mode (they are the runner's);
- when the realtime service is lost, the call is not left in dead air: the
  ``llm.fallback`` line is spoken by the TTS and the call hangs up.

``llm`` is optional here (only its ``fallback``/``apiKey`` are read);
``llm.apiKey`` fills an unset ``realtime.secretKey`` as in the original.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

from twisted.logger import Logger
from zope.interface import implementer

from activecall.backlink import back_link
from activecall.call.realtime_session import IRealtimeController, goto_scene_tool
from activecall.playbook.strategy import ITurnStrategy
from activecall.protocol import commands as cmd
from activecall.protocol import events as ev

log = Logger(namespace="activecall.playbook.realtime")


@implementer(ITurnStrategy, IRealtimeController)
class RealtimeTurns:
    """The bot's turns are the realtime model's; see the module docstring."""

    name = "realtime"
    reply = None  # the model's responses are the realtime processor's, never the runner's

    #: the playbook runner; weak once the call has ended (activecall/backlink.py)
    runner = back_link()

    def __init__(self, runner):
        self.runner = runner
        self.realtime = runner.config.realtime
        self.processor = None
        self._opened = False

    # -- what call/realtime_session.py asks (IRealtimeController) -----------------------------------

    def realtime_option(self) -> dict:
        """The ``realtime`` section as a RealtimeOption JSON object."""
        rt = self.realtime
        extra = {str(k): v for k, v in (rt.extra or {}).items()}
        if rt.voice and "voice" not in extra:
            extra["voice"] = rt.voice
        out = {"provider": rt.provider, "model": rt.model, "endpoint": rt.endpoint, "secretId": rt.secret_id,
               "secretKey": rt.secret_key or self.runner.llm_config.api_key, "turnDetection": rt.turn_detection,
               "tools": list(rt.tools) if rt.tools else None, "extra": extra or None}
        return {k: v for k, v in out.items() if v is not None}

    def realtime_instructions(self) -> Optional[str]:
        runner = self.runner
        text = runner.render(runner.playbook.scenes[runner.scene_id].prompt).strip()
        return text or None

    def realtime_tools(self) -> list:
        scenes = self.runner.playbook.scenes
        return [goto_scene_tool(scenes)] if len(scenes) > 1 else []

    def realtime_attached(self, processor) -> None:
        self.processor = processor
        processor.wait_input_ms = self.runner.wait_input_ms()
        if self.runner.started:
            self._open()

    def realtime_function(self, call_id: str, name: str, args: dict) -> bool:
        """Act on a built-in function; False leaves it to the processor's default."""
        runner = self.runner
        processor = self.processor
        if name == "goto_scene":
            scene = args.get("scene")
            if scene not in runner.playbook.scenes:
                processor.client.function_output(call_id, {
                    "error": f"unknown scene {scene!r}", "scenes": list(runner.playbook.scenes)})
                return True
            runner.goto(scene)
            processor.client.function_output(call_id, {"status": "ok", "scene": scene}, respond=False)
            play = runner.playbook.scenes[scene].play
            intro = runner.render(play) if play else None
            processor.after_current_audio(lambda: runner.start_turn(intro_play=intro))
            return True
        if name == "hangup_call":
            runner.hanging_up = True
            runner.refresh_hangup_headers()
            return False
        if name in ("transfer_call", "refer_call"):
            callee = args.get("callee") or args.get("callee_uri")
            if not callee or not isinstance(callee, str):
                return False
            processor.client.function_output(call_id, {"status": "transferring", "callee": callee}, respond=False)
            processor.transfer_after_audio(callee, transfer=lambda target: runner.refer(runner.render(target), None))
            return True
        return False

    def realtime_failed(self, message: str) -> None:
        """The service is gone: say the fallback line (TTS) and hang up, never dead air."""
        runner = self.runner
        if runner.stopped or runner.hanging_up:
            return
        log.warn("call {id}: realtime failed ({message}); speaking the fallback line", id=runner.session.id,
                 message=message)
        runner.hanging_up = True
        runner.flush_queue()
        runner.dispatch(cmd.Tts(text=runner.render(runner.llm_config.fallback), playId=runner.next_play_id(),
                                endOfStream=True, autoHangup=True))

    # -- what the runner asks (ITurnStrategy) -------------------------------------------------------

    def attach(self) -> None:
        """The call's realtime mode finds its controller here when the call is answered."""
        self.runner.session.realtime_controller = self

    def stop(self) -> None:
        session = self.runner.session
        if session.realtime_controller is self:
            session.realtime_controller = None

    def begin(self) -> None:
        runner = self.runner
        log.info("call {id}: realtime playbook {source} started in scene {scene}", id=runner.session.id,
                 source=runner.playbook.source, scene=runner.scene_id)
        if self.processor is not None:
            self._open()

    def _open(self) -> None:
        """The initial scene's ``<play>``, then the greeting (or the model's opening line)."""
        runner = self.runner
        if self._opened or runner.stopped:
            return
        self._opened = True
        play = runner.playbook.initial.play
        if play:
            runner.send(cmd.Play(url=runner.render(play)), wait=True)
        greeting = runner.playbook.greeting
        self._respond(f"Greet the caller by saying exactly: {runner.render(greeting)}" if greeting else None)

    def _respond(self, instructions: Optional[str] = None) -> None:
        """Queue a ``response.create`` (it waits behind a ``<play>`` like any command of the runner)."""
        self.runner.send(partial(self._create_response, instructions))

    def _create_response(self, instructions: Optional[str]) -> None:
        if self.processor is not None:
            self.processor.client.create_response(instructions)

    def system_prompt(self) -> str:
        return self.realtime_instructions() or ""

    def scene_changed(self) -> None:
        if self.processor is not None:
            self.processor.client.update_session(instructions=self.realtime_instructions() or "",
                                                 extra_tools=self.processor.builtin_tools())

    def start_turn(self, intro_play: Optional[str] = None) -> None:
        """A turn is the model's: ``response.create`` (after the scene's ``<play>``, if any)."""
        runner = self.runner
        if runner.stopped:
            return
        runner.flush_queue()
        if intro_play:
            runner.send(cmd.Play(url=intro_play), wait=True)
        self._respond()

    def observe(self, event) -> None:
        """The bot's words (the processor's ``addHistory``) go into the history for the posthook."""
        if isinstance(event, ev.AddHistory) and event.sender == "realtime" and event.speaker == "assistant":
            self.runner.history.append({"role": "assistant", "content": event.text})
            self.runner.last_bot_line_ms = self.runner.now()

    def caller_said(self, event: ev.AsrFinal) -> None:
        """The caller's transcribed turn: history only (the model answers by itself)."""
        runner = self.runner
        text = (event.text or "").strip()
        if not text:
            return
        runner.last_final_ms = runner.now()
        runner.last_interaction_ms = runner.now()
        runner.followup_count = 0
        runner.history.append({"role": "user", "content": text})

    def caller_speaking(self, event) -> None:
        """Barge-in is the realtime processor's (the service's VAD decides)."""

    def cancel(self, keep_partial: bool) -> None:
        """Nothing of the runner's is in flight: the processor cancels the model's responses itself."""
