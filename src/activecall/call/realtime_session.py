"""Realtime (speech-to-speech) mode of a call: ``option.realtime`` or a playbook's ``realtime:``.

It replaces VAD and ASR (the original's "processor chain: realtime alone if
set").  The caller's 16 kHz frames go from the session's audio sinks to a
``RealtimeClient``; the model's speech becomes a streaming bot track on the
call's server-side playback, so it is paced by the media clock, recorded on
the bot channel, muted by ``mute``, and stopped by ``interrupt``, a new
``tts``/``play`` or a barge-in like any TTS.

Events to the client:

- ``speaking`` when the service hears the caller start; if the bot is talking
  that is a barge-in: its audio stops at once (``interruption`` + ``trackEnd``),
  the model's response is cancelled and the model told how much the caller
  heard (``conversation.item.truncate``), then ``interrupt{receiver}``;
- ``silence`` when the caller stops (startTime = speech start, duration = speech length);
- ``asrFinal`` + ``transcript`` (+ ``addHistory`` speaker user) for the caller's transcribed turn;
- ``trackStart``/``trackEnd`` (playId ``realtime-N``) around the bot's speech,
  ``addHistory{sender:"realtime", speaker:"assistant"}`` with what it said;
- ``functionCall{trackId, callId, name, arguments}`` for every tool call;
- ``error{sender:"realtime"}`` for every failure; the call goes on (as in the
  original, which only logged them), except that a playbook in realtime mode
  speaks its fallback line and hangs up when the connection is lost.

Built-in functions (defined in ``session.update`` unless the application's
tools define the same name, acted on unless ``extra.builtin_tools = "false"``):
``hangup_call{reason}`` ends the call once the current bot audio has played;
``transfer_call``/``refer_call{callee|callee_uri}`` goes through the call's
``refer`` path after the current audio (offered only when the call can
transfer); ``goto_scene{scene}`` belongs to a playbook (``playbook/realtime_strategy.py``).

A realtime playbook drives the mode as its controller (``IRealtimeController``): it puts itself on the
call as ``session.realtime_controller`` (the call layer never imports the playbook layer above it).
"""

from __future__ import annotations

import json
from typing import Callable, Optional

import numpy as np
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import Attribute, Interface

from activecall.audio import FRAME_SAMPLES
from activecall.media.tracks import TtsTrack
from activecall.protocol import commands as cmd
from activecall.protocol import events as ev
from activecall.speech.base import SpeechError
from activecall.speech.realtime_openai import RealtimeClient, RealtimeHandler, RealtimeSettings

log = Logger(namespace="activecall.call.realtime")

HANGUP_TOOL = {
    "type": "function", "name": "hangup_call",
    "description": "End the phone call. Say goodbye first; the call ends once that has been played.",
    "parameters": {"type": "object", "properties": {
        "reason": {"type": "string", "description": "Why the call ends, in a few words."}}},
}
TRANSFER_TOOL = {
    "type": "function", "name": "transfer_call",
    "description": "Transfer the caller to a person or another line, after telling them so.",
    "parameters": {"type": "object", "properties": {
        "callee": {"type": "string", "description": "The SIP URI or number to transfer to."}},
        "required": ["callee"]},
}


class IRealtimeController(Interface):
    """What a call's realtime mode asks of the playbook that drives it (``session.realtime_controller``)."""

    processor = Attribute("The call's ``RealtimeProcessor`` once attached, else None.")

    def realtime_option():
        """The RealtimeOption JSON object to connect with."""

    def realtime_instructions():
        """The model's instructions (``session.update``), or None."""

    def realtime_tools():
        """Function definitions offered besides the built-in ones (e.g. ``goto_scene``)."""

    def realtime_attached(processor):
        """The processor is built and connecting; the controller may talk through it from now on."""

    def realtime_function(call_id, name, args):
        """Act on the model's function call ``name(args)``; False leaves it to the processor's default."""

    def realtime_failed(message):
        """The service refused the options or was lost."""


def goto_scene_tool(scenes) -> dict:
    return {
        "type": "function", "name": "goto_scene",
        "description": "Move the conversation to another scene of the script; its instructions replace yours.",
        "parameters": {"type": "object", "properties": {
            "scene": {"type": "string", "enum": list(scenes), "description": "The scene to switch to."}},
            "required": ["scene"]},
    }


class RealtimeTrack(TtsTrack):
    """The model's speech on the bot track: one track per run of speech, fed as the service streams it.

    ``items`` remembers where each output item starts, so a barge-in can tell
    the model how much of which item the caller heard.
    """

    kind = "realtime"

    def __init__(self, track_id: str, play_id: str):
        super().__init__(track_id, play_id)
        self.items: list[tuple[str, int]] = []  # (item_id, first sample in this track)
        self.fed = 0
        self.responses: set = set()
        self._text_item: Optional[str] = None

    def feed_item(self, response_id: str, item_id: Optional[str], pcm: np.ndarray) -> None:
        self.responses.add(response_id)
        if item_id and (not self.items or self.items[-1][0] != item_id):
            self.items.append((item_id, self.fed))
        self.fed += pcm.size
        self.eos = False
        self.feed(pcm)

    def add_text(self, item_id: Optional[str], text: str) -> None:
        """The bot's words, for the ``interruption`` subtitle."""
        if self.segments and item_id == self._text_item:
            self.segments[-1] += text
        else:
            self.segments.append(text)
            self._text_item = item_id

    def heard(self) -> Optional[tuple[str, int]]:
        """(item, ms of it played) for the item playing now."""
        played = self.frames_played * FRAME_SAMPLES
        current = None
        for item_id, start in self.items:
            if start <= played:
                current = (item_id, (played - start) * 1000 // 16000)
        return current


class RealtimeProcessor(RealtimeHandler):
    """Realtime mode of one call: the session's ``processors`` (``feed``/``close``).

    ``controller`` is an ``IRealtimeController``, a realtime playbook (instructions per scene,
    ``goto_scene``, its own handling of transfers and failures) or None.
    """

    def __init__(self, session, settings: RealtimeSettings, controller=None,
                 client_factory: Callable = RealtimeClient):
        self.session = session
        self.settings = settings
        self.controller = controller
        #: ms the bot waits after its speech before ``silence`` (a playbook's follow-up); None: never
        self.wait_input_ms: Optional[int] = None
        self.track: Optional[RealtimeTrack] = None
        self.tracks = 0
        self.speech: dict = {}  # item_id -> [start_ms, end_ms]
        self.last_speech: Optional[list] = None
        self.finals = 0
        self.texts: dict = {}  # item_id -> the bot's words so far
        self.cut: set = set()  # responses whose audio must not play any more
        self.after_audio: Optional[Callable[[], None]] = None  # hang up / transfer once the bot is quiet
        self.transferred = False
        self.closed = False
        instructions = controller.realtime_instructions() if controller is not None else None
        self.client = client_factory(settings, self, reactor=session.clock, instructions=instructions,
                                     extra_tools=self.builtin_tools())

    # -- the session's side ------------------------------------------------------------------------

    def builtin_tools(self) -> list:
        if not self.settings.builtin_tools:
            return []
        tools = [HANGUP_TOOL]
        if self.session.can_transfer:
            tools.append(TRANSFER_TOOL)
        if self.controller is not None:
            tools.extend(self.controller.realtime_tools())
        return tools

    def start(self) -> defer.Deferred:
        d = self.client.connect()
        d.addErrback(lambda f: f.trap(SpeechError))  # reported through failed()
        return d

    def feed(self, pcm) -> None:
        if not self.transferred:
            self.client.feed(pcm)

    def close(self) -> defer.Deferred:
        self.closed = True
        return self.client.close()

    @property
    def ended(self) -> bool:
        from activecall.call.session import CallState
        return self.closed or self.session.state is CallState.ENDED

    def _live_track(self) -> Optional[RealtimeTrack]:
        t = self.track
        if t is None or t.stopped or t.ended.called:
            return None
        return t

    # -- the caller -------------------------------------------------------------------------------------

    def speech_started(self, audio_start_ms, item_id) -> None:
        s = self.session
        start = int(audio_start_ms or 0)
        self.last_speech = self.speech[item_id] = [start, None]
        s.emit(ev.Speaking(trackId=s.id, timestamp=s.now(), startTime=start, confidence=1.0))
        self.barge_in()

    def barge_in(self) -> None:
        """The caller talks: the bot stops now, the model's response is cancelled."""
        s = self.session
        if s.playback.current is not None and not s.playback.current.stopped:
            s.playback.stop_current(interrupted=True)  # cancel and truncation: _track_ended
        streaming = self.client.response_id
        if streaming is not None and streaming not in self.cut:  # a response with no audio played yet
            self.cut.add(streaming)
            self.client.cancel_response()
        s.emit(ev.Interrupt(receiver=s.id))

    def speech_stopped(self, audio_end_ms, item_id) -> None:
        s = self.session
        span = self.speech.get(item_id) or self.last_speech or [int(audio_end_ms or 0), None]
        span[1] = int(audio_end_ms if audio_end_ms is not None else span[0])
        s.emit(ev.Silence(trackId=s.id, timestamp=s.now(), startTime=span[0], duration=max(0, span[1] - span[0])))

    def user_transcript(self, item_id, text) -> None:
        if not text:
            return
        s = self.session
        start, end = self.speech.pop(item_id, None) or (None, None)
        index = self.finals
        self.finals += 1
        s.emit(ev.AsrFinal(trackId=s.id, timestamp=s.now(), index=index, startTime=start, endTime=end, text=text))
        s.emit(ev.Transcript(trackId=s.id, timestamp=s.now(), text=text, index=index))
        s.emit(ev.AddHistory(sender="realtime", timestamp=s.now(), speaker="user", text=text))

    # -- the bot ------------------------------------------------------------------------------------------

    def audio(self, response_id, item_id, pcm) -> None:
        if self.ended or self.transferred or response_id in self.cut:
            return
        track = self._live_track()
        if track is None:
            self.tracks += 1
            track = self.track = RealtimeTrack(self.session.playback.track_id, f"realtime-{self.tracks}")
            track.wait_input_timeout = self.wait_input_ms
            self.session.playback.start_track(track)
            track.ended.addCallback(lambda _, t=track: self._track_ended(t))  # the playback's callback ate the track
        if item_id and (not track.items or track.items[-1][0] != item_id) and self.texts.get(item_id):
            track.add_text(item_id, self.texts[item_id])  # its words came before its audio
        track.feed_item(response_id, item_id, pcm)

    def transcript_delta(self, response_id, item_id, text) -> None:
        self.texts[item_id] = self.texts.get(item_id, "") + text
        track = self._live_track()
        if track is not None and track.items and track.items[-1][0] == item_id:
            track.add_text(item_id, text)

    def transcript_done(self, response_id, item_id, text) -> None:
        said = text or self.texts.get(item_id, "")
        self.texts.pop(item_id, None)
        if said.strip() and response_id not in self.cut:
            s = self.session
            s.emit(ev.AddHistory(sender="realtime", timestamp=s.now(), speaker="assistant", text=said.strip()))

    def response_done(self, response_id, status) -> None:
        track = self._live_track()
        if track is not None and self.client.response_id is None:
            track.end_of_stream()  # ends once played: trackEnd, waitInputTimeout, a pending hangup
        self._maybe_after_audio()

    def _track_ended(self, track: RealtimeTrack) -> None:
        if track.interrupted and not self.ended:
            # stopped early (barge-in, interrupt, a tts/play command): the rest of its responses is dropped
            # and the model learns what the caller really heard
            self.cut |= track.responses
            if self.client.response_id in track.responses:
                self.client.cancel_response()
            heard = track.heard()
            if heard is not None:
                self.client.truncate(*heard)
        self._maybe_after_audio()

    def _maybe_after_audio(self) -> None:
        """Run the pending hangup/transfer once no response is streaming and the bot track has played out."""
        if self.after_audio is None or self.ended:
            return
        if self.client.response_id is not None and self.client.state == "open":
            return
        track = self._live_track()
        if track is not None:
            track.end_of_stream()
            return
        action, self.after_audio = self.after_audio, None
        action()

    # -- tools ------------------------------------------------------------------------------------------

    def function_call(self, call_id, name, arguments) -> None:
        s = self.session
        s.emit(ev.FunctionCall(trackId=s.id, callId=call_id, name=name, arguments=arguments, timestamp=s.now()))
        if not self.settings.builtin_tools:
            return
        try:
            args = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            args = None
        if not isinstance(args, dict):
            if name in ("hangup_call", "transfer_call", "refer_call", "goto_scene"):
                self.client.function_output(call_id, {"error": "arguments must be a JSON object"})
            return
        if self.controller is not None and self.controller.realtime_function(call_id, name, args):
            return
        if name == "hangup_call":
            self.hang_up_after_audio(args.get("reason"))
        elif name in ("transfer_call", "refer_call"):
            callee = args.get("callee") or args.get("callee_uri")
            if not callee or not isinstance(callee, str):
                self.client.function_output(call_id, {"error": "callee is required"})
            elif not s.can_transfer:
                self.client.function_output(call_id, {"error": f"a {s.call_type} call cannot be transferred"})
            else:
                self.client.function_output(call_id, {"status": "transferring", "callee": callee}, respond=False)
                self.transfer_after_audio(callee)
        elif name == "goto_scene":
            self.client.function_output(call_id, {"error": "this call has no scenes"})
        # any other name is the application's tool: the functionCall event is all we do

    def after_current_audio(self, action: Callable[[], None]) -> None:
        """Run ``action`` once the response in progress is done and its audio has played (at once if quiet)."""
        self.after_audio = action
        self._maybe_after_audio()

    def hang_up_after_audio(self, reason: Optional[str], then: Optional[Callable] = None) -> None:
        s = self.session
        clean = ev.hangup_reason(reason if isinstance(reason, str) else None, "ai")
        log.info("call {id}: the realtime model hangs up ({reason})", id=s.id, reason=clean)

        def hang_up():
            if then is not None:
                then()
            s.end(clean, initiator="ai")

        self.after_current_audio(hang_up)

    def transfer_after_audio(self, callee: str, transfer: Optional[Callable] = None) -> None:
        s = self.session

        def refer():
            self.transferred = True  # the caller now talks to the callee, not to the model
            self.client.cancel_response()
            if transfer is not None:
                transfer(callee)
            else:
                option = s.option
                s.handle(cmd.Refer(caller=(option.caller if option is not None and option.caller else ""),
                                   callee=callee))

        self.after_current_audio(refer)

    # -- failures ---------------------------------------------------------------------------------------

    def failed(self, message, fatal, code=None) -> None:
        if self.ended:
            return
        self.session.error("realtime", message, code=code)
        if fatal:
            track = self._live_track()
            if track is not None:
                track.end_of_stream()
            if self.controller is not None:
                self.controller.realtime_failed(message)
            elif self.after_audio is not None:
                self._maybe_after_audio()


def realtime_controller(session) -> Optional[IRealtimeController]:
    """The controller of the session's realtime mode: a realtime playbook running on it, else None."""
    return session.realtime_controller


def attach_realtime(session, client_factory: Callable = RealtimeClient) -> Optional[RealtimeProcessor]:
    """Realtime mode for ``session`` (its option or its realtime playbook); bad options: ``error`` event."""
    controller = realtime_controller(session)
    option = controller.realtime_option() if controller is not None else session.option.realtime
    try:
        settings = RealtimeSettings.from_option(option)
    except SpeechError as e:
        session.error("realtime", str(e), code=400)
        if controller is not None:
            controller.realtime_failed(str(e))
        return None
    processor = RealtimeProcessor(session, settings, controller=controller, client_factory=client_factory)
    session.audio_sinks.append(processor.feed)
    if controller is not None:
        controller.realtime_attached(processor)
    processor.start()
    log.info("call {id}: realtime mode ({provider}, {model})", id=session.id, provider=settings.provider,
             model=settings.model)
    return processor
