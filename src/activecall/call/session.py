"""One call: a state machine (new -> ringing -> answered -> ended) that owns the
call's leg, its server-side playback, its timers, its event journal and its CDR.

Every way out — the hangup command, a BYE, /kill, inactivity, autoHangup, an
error, the WebSocket closing, daemon shutdown — goes through ``end()``, which
runs the teardown exactly once: stop playback, cancel timers, close the leg
(releasing ports), send ``trackEnd``/``hangup``/``end``, write the CDR.
"""

from __future__ import annotations

import enum
import json
import os
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from activecall.backlink import BackLink, LinkedCall
from activecall.call.cdr import CallDetailRecord, ICdrWriter, RecorderFile
from activecall.call.interfaces import (
    ICallConnector, ICallLeg, IDtmfConnector, IInboundConnector, IMessageConnector, ITransferConnector,
)
from activecall.call.playback import Playback, SynthesisUnavailable
from activecall.filenames import safe_file_part
from activecall.media.recorder import (
    BOT, CALLER, FORMATS, SAMPLE_RATES, IRecorder, WavRecorder, recording_path)
from activecall.media.rtp_leg import IMediaSession
from activecall.media.tracks import MediaLoader
from activecall.protocol import commands as cmd
from activecall.protocol import events as ev
from activecall.protocol import option_keys

log = Logger(namespace="activecall.session")

SERVER_SIDE_TRACK = "server-side-track"
#: events a session keeps for late watchers
EVENT_LOG_SIZE = 1000
#: ``subscribe`` audio frames: one byte naming the side, then 16 kHz s16le (the original's framing)
SUBSCRIBE_PREFIX = {BOT: b"\x00", CALLER: b"\x01"}


@dataclass(frozen=True)
class CallSummary:
    """One active call as /list shows it.  ``startTime`` is the answer time (as the original)."""

    id: str
    callType: str  # webSocket / webrtc / sip / b2bua
    option: Any = None  # CallOption or dict; redacted on output
    ringTime: Optional[str] = None
    startTime: Optional[str] = None
    locked: bool = False

    def to_dict(self) -> dict:
        if self.locked:
            return {"id": self.id, "callType": self.callType, "status": "locked"}
        return {"id": self.id, "callType": self.callType,
                "cs.option": cmd.redact(self.option) if self.option is not None else None,
                "ringTime": self.ringTime, "startTime": self.startTime}


class CallState(enum.Enum):
    NEW = "new"
    RINGING = "ringing"
    ANSWERED = "answered"
    ENDED = "ended"


#: SIP-ish status code written to the CDR for each end reason
STATUS_FOR_REASON = {"canceled": 487, "rejected": 603, "noAnswer": 480, "failed": 500}


class EventJournal:
    """``<dir>/<session>.events.jsonl``: every command and event, one line each (``<session>``
    through ``safe_file_part``: a long or odd Call-ID still gets its dump).

    Lines are collected and written with one ``os.write`` per reactor turn (``clock.callLater(0)``)
    and at ``close()``, instead of one write syscall per line: a crash loses at most the lines
    of the turn it happens in, and a SIGTERM none (shutdown ends every call, which closes its
    journal).  Without a clock every line is written at once.

    The file is created by the first flush, not with the session: an inbound call's first lines
    come with its answer, so creating the file (which on ext4 can wait behind another thread's
    journal commit) no longer delays the 200 OK.  A journal that cannot be created logs one
    warning and drops its lines; ``created`` tells the CDR whether there is a file to name.
    """

    _FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)

    def __init__(self, path: str, clock=None):
        self.path = path
        self._clock = clock
        self._flush_call = None
        self._lines: list[bytes] = []
        self._fd: Optional[int] = None
        self._done = False  # closed, or the file could not be created
        self.created = False  # the file exists (the CDR names it)

    def write(self, kind: str, timestamp: int, content: str) -> None:
        if self._done:
            return
        # the same text as json.dumps({"type", "timestamp", "content"}, ensure_ascii=False)
        # (backslashreplace: a lone surrogate stays a JSON escape instead of losing the line)
        line = (f'{{"type": {json.dumps(kind)}, "timestamp": {int(timestamp)}, '
                f'"content": {json.dumps(content, ensure_ascii=False)}}}\n')
        self._lines.append(line.encode("utf-8", "backslashreplace"))
        if self._clock is None:
            self.flush()
        elif self._flush_call is None:
            self._flush_call = self._clock.callLater(0, self._turn_ended)

    def _turn_ended(self) -> None:
        self._flush_call = None
        self.flush()

    def _open(self) -> bool:
        try:
            try:
                self._fd = os.open(self.path, self._FLAGS, 0o666)
            except FileNotFoundError:  # the first call, or the directory was removed
                os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
                self._fd = os.open(self.path, self._FLAGS, 0o666)
        except OSError as e:
            log.warn("cannot write the event dump {path}: {e}", path=self.path, e=e)
            self._done = True
            self._lines = []
            return False
        self.created = True
        return True

    def flush(self) -> None:
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        if self._done or not self._lines:
            return
        if self._fd is None and not self._open():
            return
        data = memoryview(b"".join(self._lines))
        self._lines = []
        while data:
            data = data[os.write(self._fd, data):]

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._done = True
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


@implementer(IMediaSession)
class CallSession:
    """One call.  ``emit`` delivers events to the client (the WebSocket)."""

    def __init__(self, session_id: str, call_type: str, *, clock, emit: Callable[[ev.Event], None],
                 config=None, synthesizer_for: Optional[Callable] = None,
                 media_loader: Optional[MediaLoader] = None, cdr_writer=None, metrics=None,
                 dump: bool = True, server_track_id: str = SERVER_SIDE_TRACK,
                 processor_factory: Optional[Callable] = None):
        self.id = session_id
        self.call_type = call_type
        #: how the call's parts point back at it: strong while it runs, weak once it has ended, so
        #: reference counting frees a finished call (activecall/backlink.py, ``_release``)
        self.back_link = BackLink(self)
        self.clock = clock
        self._emit = emit
        self.config = config
        self.cdr_writer: Optional[ICdrWriter] = cdr_writer
        self.metrics = metrics
        self.state = CallState.NEW
        self.option: Optional[cmd.CallOption] = None
        #: the media leg (``ICallLeg``), set by the connector; ``close()`` releases its resources
        self.leg: Optional[ICallLeg] = None
        #: the call-type glue (``ICallConnector`` and what else it provides: ``IInboundConnector``,
        #: ``ITransferConnector``, ``IDtmfConnector``), set by whoever opens the call
        self.connector = None
        #: the ``CallManager`` that opened the call (None for a session made on its own, as in tests)
        self.manager = None
        #: the playbook running on the call (set by the playbook layer), else None
        self.playbook_runner = None
        #: the controller of a realtime playbook on the call (``IRealtimeController``, which puts itself
        #: here), else None
        self.realtime_controller = None
        #: a REFER from the far end waiting for, or carried out after, acceptTransfer (call/transfer.py)
        self.inbound_transfer = None
        #: the audio bridge to another live call (``bridge`` command, call/audio_bridge.py), else None
        self.bridge = None
        #: the warm transfer in progress or done (call/warm_transfer.py), else None
        self.warm_transfer = None
        #: the answering-machine detector of an outbound call with ``amd`` (call/amd.py), else None
        self.amd = None
        #: callables told every event the call emits (the playbook runner listens here)
        self.listeners: list[Callable[[ev.Event], None]] = []
        #: callables fed every inbound 16 kHz frame (VAD, ASR, recorder)
        self.audio_sinks: list[Callable] = []
        #: callables told ``(channel, pcm)`` for both sides' 16 kHz frames as the call hears them
        #: (``CALLER`` after mute, ``BOT`` as sent): subscribers and ``mediaPass``
        self.audio_taps: list[Callable] = []
        #: the call's events so far, ``(sequence number, event)``, for watchers that join late
        #: (``GET /events/{id}``, ``/call/subscribe``); bounded
        self.event_log: deque = deque(maxlen=EVENT_LOG_SIZE)
        self._event_seq = 0
        self.extras: dict[str, Any] = {}
        self.hangup_headers: dict[str, str] = {}
        self.start_time = datetime.fromtimestamp(clock.seconds(), timezone.utc)
        self.ring_time: Optional[datetime] = None
        self.answer_time: Optional[datetime] = None
        self.end_time: Optional[datetime] = None
        self.end_reason: Optional[str] = None
        self.status_code = 200
        self.muted_tracks: set = set()
        self._ending = False
        self._done = False
        self._waiters: list[defer.Deferred] = []
        self._inactivity = None
        self._wait_input = None
        self._recorders: list = []
        self.recorder: Optional[IRecorder] = None
        self._record_pauses: list[dict] = []
        #: the ``mediaPass`` bridge (call/media_pass.py), while the option runs
        self.media_pass = None
        #: builds VAD/ASR for the call from its option when it is answered
        self.processor_factory = processor_factory
        self.processors = None
        self._speech = (None, None, None)  # (option, CallSpeech, SynthesisOption): see ``speech``
        #: the per-turn latency breakdown (call/turn_timing.py), with the speech processors
        self.turn_timing = None
        cache = config.media_cache_path if config is not None else "./config/mediacache"
        self.playback = Playback(
            server_track_id, LinkedCall(self.back_link, "emit"), clock,
            synthesizer_for=synthesizer_for or _no_synthesizer,
            loader=media_loader or MediaLoader(cache),
            on_track_done=LinkedCall(self.back_link, "_track_done"),
        )
        #: pause-then-decide on the caller's voice over the bot (call/barge_in.py); configured by a
        #: playbook or the ✱ ``interruption`` call option, idle otherwise
        from activecall.call.barge_in import BargeIn

        self.barge_in = BargeIn.attach(self)
        #: told every frame sent (None when nothing was): the echo canceller's reference
        self.echo_reference: Optional[Callable] = None
        #: the background bed mixed under the bot (call/ambiance.py), or None
        self.ambiance = None
        self.journal: Optional[EventJournal] = None
        if dump and config is not None:
            path = os.path.join(config.recording.path, safe_file_part(session_id) + ".events.jsonl")
            self.journal = EventJournal(path, clock)
        if metrics is not None:
            metrics.calls_active.labels(call_type=call_type).inc()

    # -- events -------------------------------------------------------------------------------

    def now(self) -> int:
        return ev.now_ms(self.clock)

    def emit(self, event: ev.Event) -> None:
        """Send an event to the client and the journal; some events cancel the input timer."""
        if isinstance(event, (ev.Speaking, ev.Dtmf, ev.AsrDelta, ev.AsrFinal, ev.TrackStart)):
            self._cancel_wait_input()
        if self.journal is not None:
            self.journal.write("event", self.now(), event.to_json())
        self._event_seq += 1
        self.event_log.append((self._event_seq, event))
        try:
            self._emit(event)
        except Exception:
            log.failure("delivering {tag} failed", tag=event.TAG)
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:
                log.failure("a listener of {id} failed on {tag}", id=self.id, tag=event.TAG)

    def error(self, sender: str, message: str, code: Optional[int] = None) -> None:
        if self.metrics is not None:
            self.metrics.errors.labels(kind=sender.split(":")[0]).inc()
        self.emit(ev.Error(trackId=self.id, timestamp=self.now(), sender=sender, error=message,
                           code=code))

    # -- commands -------------------------------------------------------------------------------

    def receive_frame(self, frame) -> defer.Deferred:
        """A text frame from the client: parse, journal, dispatch; errors become ``error``."""
        parsed = cmd.decode_command(frame)
        if self.journal is not None:
            text = frame if isinstance(frame, str) else frame.decode("utf-8", "replace")
            self.journal.write("command", self.now(), text[:65536])
        if isinstance(parsed, cmd.CommandError):
            self.emit(parsed.to_event(self.id, self.now()))
            return defer.succeed(None)
        return self.handle(parsed)

    def handle(self, command: cmd.Command) -> defer.Deferred:
        if self.state is CallState.ENDED:
            self.error("command", f"the call has ended; {command.TAG} ignored")
            return defer.succeed(None)
        handler = getattr(self, "on_" + command.TAG, None)
        if handler is None:
            self.error("command", f"{command.TAG} is not supported on a {self.call_type} call")
            return defer.succeed(None)
        d = defer.maybeDeferred(handler, command)

        def failed(failure):
            log.failure("command {tag} failed", failure, tag=command.TAG)
            self.error("command", f"{command.TAG} failed: {failure.getErrorMessage()}")

        d.addErrback(failed)
        return d

    # call-type specific commands go to the connector (WebSocket, SIP, WebRTC), when it provides them

    def _connector(self, interface, command):
        """The connector if it provides ``interface``; else None, and the command is refused."""
        if interface.providedBy(self.connector):
            return self.connector
        self.error("command", f"{command.TAG} is not supported on a {self.call_type} call")
        return None

    def on_invite(self, command: cmd.Invite):
        connector = self._connector(ICallConnector, command)
        return connector.invite(command) if connector is not None else None

    def on_accept(self, command: cmd.Accept):
        connector = self._connector(ICallConnector, command)
        return connector.accept(command) if connector is not None else None

    def on_ringing(self, command: cmd.Ringing):
        connector = self._connector(IInboundConnector, command)
        return connector.ringing(command) if connector is not None else None

    def on_reject(self, command: cmd.Reject):
        connector = self._connector(IInboundConnector, command)
        return connector.reject(command) if connector is not None else None

    def on_refer(self, command: cmd.Refer):
        connector = self._connector(ITransferConnector, command)
        return connector.refer(command) if connector is not None else None

    def on_sendMessage(self, command: cmd.SendMessage):
        connector = self._connector(IMessageConnector, command)
        return connector.sendMessage(command) if connector is not None else None

    def on_sendDtmf(self, command: cmd.SendDtmf):
        connector = self._connector(IDtmfConnector, command)
        return connector.sendDtmf(command) if connector is not None else None

    def on_acceptTransfer(self, command: cmd.AcceptTransfer):
        from activecall.call import transfer

        transfer.accept(self, command)

    def on_rejectTransfer(self, command: cmd.RejectTransfer):
        from activecall.call import transfer

        transfer.reject(self, command)

    def on_bridge(self, command: cmd.Bridge):
        from activecall.call import audio_bridge

        audio_bridge.bridge(self, command.target)

    def on_warmTransfer(self, command: cmd.WarmTransfer):
        from activecall.call.warm_transfer import start_warm_transfer

        start_warm_transfer(self, command)

    def on_unbridge(self, command: cmd.Unbridge):
        if self.bridge is None:
            self.error("unbridge", "the call is not bridged")
            return
        self.bridge.part()

    @property
    def can_transfer(self) -> bool:
        """The call's type can carry out ``refer`` (its connector provides ``ITransferConnector``)."""
        return ITransferConnector.providedBy(self.connector)

    @property
    def speech(self):
        """The call's VAD, recogniser and voice with the defaults for its language filled in where its
        option asks for speech without naming a provider (``speech.defaults.CallSpeech``; docs/api.md,
        "Speech defaults").  Worked out once per option (a second invite may change it)."""
        return self._speech_for_option()[0]

    def _speech_for_option(self):
        option = self.option
        if self._speech[0] is not option or self._speech[1] is None:
            from activecall.speech import defaults as speech_defaults

            def section(name):
                value = getattr(option, name, None) if option is not None else None
                if value is None:
                    return None
                return value.to_dict() if hasattr(value, "to_dict") else dict(value)

            plan = speech_defaults.for_call(
                section("vad"), section("asr"), section("tts"),
                getattr(option, "language", None) if option is not None else None,
                speech_defaults.models_dir_from_env())
            tts = cmd.SynthesisOption.from_dict(plan.tts) if plan.tts is not None else None
            self._speech = (option, plan, tts)
        return self._speech[1], self._speech[2]

    def on_tts(self, command: cmd.Tts):
        base = self._speech_for_option()[1]
        option = command.option.layered_over(base) if command.option is not None else base
        try:
            self.playback.tts(
                command.text, option, play_id=command.playId, end_of_stream=command.endOfStream,
                auto_hangup=command.autoHangup, wait_input_timeout=command.waitInputTimeout,
                is_base64=command.base64,
            )
        except SynthesisUnavailable as e:
            self.error("command", str(e))

    def prepare_speech(self, text: str):
        """Synthesise ``text`` with the call's voice ahead of its turn, without playing it
        (``Playback.prepare``: a speculative reply); None when the call has no voice."""
        option = self.option.tts if self.option is not None else None
        try:
            return self.playback.prepare(text, option)
        except SynthesisUnavailable:
            return None

    def on_play(self, command: cmd.Play):
        return self.playback.play(command.url, command.effective_play_id, command.autoHangup,
                                  command.waitInputTimeout)

    def on_interrupt(self, command: cmd.Interrupt):
        self.playback.interrupt(graceful=command.graceful)

    def on_pause(self, command):
        self.playback.pause()

    def on_resume(self, command):
        self.playback.resume()

    def on_hangup(self, command: cmd.Hangup):
        if command.headers:
            self.hangup_headers.update(command.headers)
        return self.end(command.clean_reason, initiator=command.initiator or "caller")

    def on_history(self, command: cmd.History):
        self.emit(ev.AddHistory(sender=self.id, timestamp=self.now(), speaker=command.speaker,
                                text=command.text))

    def _tracks(self, track_id):
        """The tracks a mute/unmute names: the caller's (session id), the bot's, or both."""
        if track_id is None:
            return {self.id, self.playback.track_id}
        if track_id not in (self.id, self.playback.track_id):
            self.error("command", f"no track {track_id!r} (tracks: {self.id}, {self.playback.track_id})")
            return set()
        return {track_id}

    def on_mute(self, command: cmd.Mute):
        self.muted_tracks |= self._tracks(command.trackId)

    def on_unmute(self, command: cmd.Unmute):
        self.muted_tracks -= self._tracks(command.trackId)

    @property
    def muted(self) -> bool:
        """The bot's audio is muted (silence goes out instead)."""
        return self.playback.track_id in self.muted_tracks

    # -- lifecycle ------------------------------------------------------------------------------

    def ringing(self) -> None:
        if self.state is CallState.NEW:
            self.state = CallState.RINGING
            self.ring_time = self._now_dt()

    def answered(self, sdp: str = "") -> None:
        """The call is up: ``trackStart{S}`` then ``answer``, timers armed."""
        if self.state in (CallState.ANSWERED, CallState.ENDED):
            return
        self.state = CallState.ANSWERED
        self.answer_time = self._now_dt()
        self.emit(ev.TrackStart(trackId=self.id, timestamp=self.now()))
        self.emit(ev.Answer(trackId=self.id, timestamp=self.now(), sdp=sdp))
        self.refuse_options()
        self._arm_inactivity()
        self._start_subscribe()
        self._start_media_pass()
        self.start_recording()
        self._configure_barge_in()
        from activecall.call.ambiance import attach_ambiance

        attach_ambiance(self)
        if self.processor_factory is not None:
            self.processors = self.processor_factory(self)
            if self.processors is not None:
                from activecall.call.turn_timing import TurnTiming

                TurnTiming.attach(self, self.metrics)

    def _configure_barge_in(self) -> None:
        """The ✱ ``interruption`` call option, unless a playbook configured barge-in already."""
        option = self.option.interruption if self.option is not None else None
        if option is None or self.barge_in.policy is not None:
            return
        from activecall.call.barge_in import InterruptionPolicy

        try:
            policy = InterruptionPolicy.from_mapping(option.to_dict())
        except ValueError as e:
            self.error("interruption", str(e), code=400)
            return
        self.barge_in.configure(policy, decides=True)

    def _start_subscribe(self) -> None:
        """``subscribe: true``: both sides' audio to the control WebSocket as prefixed binary frames."""
        if self.option is None or not self.option.subscribe:
            return
        send_audio = getattr(getattr(self.connector, "protocol", None), "send_audio", None)
        if send_audio is None:
            self.error("option", "option 'subscribe' needs the call's control WebSocket (this call has "
                                 "none; watch it on /call/subscribe)", code=501)
            return
        self.audio_taps.append(lambda channel, pcm: send_audio(SUBSCRIBE_PREFIX[channel] + pcm.astype("<i2").tobytes()))

    def _start_media_pass(self) -> None:
        """``mediaPass``: the caller's audio to an external WebSocket, its answer as the bot's audio."""
        if self.option is None or self.option.mediaPass is None or self.media_pass is not None:
            return
        from activecall.call.media_pass import MediaPass

        self.media_pass = MediaPass(self, self.option.mediaPass)
        self.media_pass.start()

    def refuse_options(self) -> None:
        """One ``error{sender:"option"}`` per key of the call's option that will have no effect
        (``protocol/option_keys.py``): nothing a client asked for is dropped silently."""
        for refusal in option_keys.refusals(self.option, self.call_type):
            log.info("call {id}: {message}", id=self.id, message=refusal.message)
            self.error("option", refusal.message, code=refusal.code)

    def start_recording(self) -> None:
        """``[recording]``: ``enabled`` allows it; ``auto_start`` or the call's
        ``recorder`` option starts it (the original ignored both settings).  The ``recorder``
        option's ``recorderFile``, ``samplerate``, ``format`` and ``ptime`` win over
        ``[recording]``'s ``filename_pattern``, ``samplerate``, ``format`` and ``ptime``."""
        if self.recorder is not None or self.config is None:
            return
        policy = self.config.recording
        requested = self.option is not None and self.option.recorder is not None
        if not policy.enabled:
            if requested:
                self.error("recorder", "recording is disabled in the configuration ([recording] enabled)")
            return
        if not (policy.auto_start or requested):
            return
        wanted = self.option.recorder if requested else cmd.RecorderOption()
        template = wanted.recorderFile or policy.filename_pattern
        file_format = (wanted.format or policy.format).lower()
        if file_format not in FORMATS:
            self.error("recorder", f"recorder.format {wanted.format!r} is not supported "
                                   f"({', '.join(FORMATS)}); recording as {policy.format}", code=400)
            file_format = policy.format
        rate = wanted.samplerate or policy.samplerate
        if rate not in SAMPLE_RATES:
            self.error("recorder", f"recorder.samplerate {rate} is not supported "
                                   f"({', '.join(map(str, SAMPLE_RATES))}); recording at {policy.samplerate}",
                       code=400)
            rate = policy.samplerate
        try:
            path = recording_path(policy.path, self.id, template, extension=file_format,
                                  fields=self._file_fields())
            self.recorder = WavRecorder(path, rate=rate, ptime_ms=wanted.ptime or policy.ptime,
                                        clock=self.clock, file_format=file_format)
        except (OSError, ValueError) as e:
            self.error("recorder", f"cannot record: {e}")
            return
        self.audio_sinks.append(lambda pcm: self.recorder.write(CALLER, pcm))

    def _file_fields(self) -> dict:
        """The values of a recording file name's placeholders (``filenames.PATTERN_FIELDS``)."""
        start = self.start_time
        # a SIP call we placed is outbound; a SIP call we answered, a browser or a /call client is inbound
        inbound = self.call_type != "sip" or getattr(self.connector, "inbound", None) is not None

        def user(uri) -> str:
            uri = str(uri or "")
            if uri.startswith(("sip:", "sips:", "tel:")):
                uri = uri.split(":", 1)[1]
            return uri.split("@", 1)[0].split(";", 1)[0]

        return {"caller": user(self._party("caller")), "callee": user(self._party("callee")),
                "date": start.strftime("%Y%m%d"), "time": start.strftime("%H%M%S"),
                "datetime": start.strftime("%Y%m%d-%H%M%S"), "timestamp": int(start.timestamp()),
                "direction": "inbound" if inbound else "outbound", "call_type": self.call_type}

    def on_pauseRecording(self, command) -> None:
        """Silence instead of words in the recording until ``resumeRecording``; the CDR lists the span."""
        if self.recorder is None:
            self.error("command", "pauseRecording: the call is not being recorded")
            return
        if not self.recorder.paused:
            self.recorder.paused = True
            self._record_pauses.append({"startTime": ev.rfc3339(self._now_dt())})

    def on_resumeRecording(self, command) -> None:
        if self.recorder is None:
            self.error("command", "resumeRecording: the call is not being recorded")
            return
        if self.recorder.paused:
            self.recorder.paused = False
            self._record_pauses[-1]["endTime"] = ev.rfc3339(self._now_dt())

    def audio_in(self, pcm) -> None:
        """Caller audio (16 kHz mono int16) from the leg, to the processors."""
        self.audio_received()
        if self.id in self.muted_tracks:
            pcm = pcm * 0  # the caller is muted: processors, recorder and bridges hear silence
        for sink in list(self.audio_sinks):
            try:
                sink(pcm)
            except Exception:
                log.failure("an audio processor of {id} failed; removed", id=self.id)
                self.audio_sinks.remove(sink)
        if self.audio_taps:
            self._tap(CALLER, pcm)

    def _tap(self, channel: int, pcm) -> None:
        for tap in list(self.audio_taps):
            try:
                tap(channel, pcm)
            except Exception:
                log.failure("an audio tap of {id} failed; removed", id=self.id)
                self.audio_taps.remove(tap)

    def audio_received(self) -> None:
        """The leg got caller audio: the call is not inactive."""
        if self._inactivity is not None and self._inactivity.active():
            self._inactivity.reset(self._inactivity_timeout())

    def tick(self):
        """Media clock: the server-side frame due now (None when nothing plays)."""
        if self.state is CallState.ENDED:
            return None
        frame = self.playback.tick()
        if self.media_pass is not None:
            frame = self.media_pass.mix(frame)
        if frame is not None and self.muted:
            frame = frame * 0
        if frame is not None and self.turn_timing is not None and self.turn_timing.wants_frame:
            self.turn_timing.frame_out(frame)  # the bot's own audio, not the bed under it
        if self.ambiance is not None and not self.muted:
            frame = self.ambiance.mix(frame)
        if self.echo_reference is not None:
            self.echo_reference(frame)
        if frame is not None and self.recorder is not None:
            self.recorder.write(BOT, frame)
        if frame is not None and self.audio_taps:
            self._tap(BOT, frame)
        return frame

    def end(self, reason: str = "system", initiator: Optional[str] = None,
            status_code: Optional[int] = None) -> defer.Deferred:
        """Tear the call down once; every caller gets a Deferred firing when it is over."""
        if not self._ending:
            self._ending = True
            self.end_reason = reason
            self.status_code = (status_code if status_code is not None
                                else STATUS_FOR_REASON.get(reason, 200))
            d = self._teardown(initiator)
            d.addErrback(lambda f: log.failure("teardown of {id} failed", f, id=self.id))
            d.addCallback(lambda _: self._finished())
        return self.when_ended()

    def when_ended(self) -> defer.Deferred:
        if self._done:
            return defer.succeed(self)
        d = defer.Deferred()
        self._waiters.append(d)
        return d

    def _finished(self):
        self._done = True
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(self)
        self._release()

    def _release(self) -> None:
        """The call is over (teardown done, waiters told): its parts' links back to it turn weak, so
        it is freed by reference counting as soon as nobody else (the API, a watcher, a test) holds
        it, not at the garbage collector's next pass.  Everything stays readable while it is held."""
        self.back_link.weaken()
        for part in (self.playbook_runner,):  # parts with links of their own
            link = getattr(part, "back_link", None)
            if isinstance(link, BackLink):
                link.weaken()

    @defer.inlineCallbacks
    def _teardown(self, initiator):
        self.playback.stop_current(interrupted=True)
        if self.media_pass is not None:
            self.media_pass.close()
        for timer in (self._inactivity, self._wait_input):
            if timer is not None and timer.active():
                timer.cancel()
        previous = self.state
        self.state = CallState.ENDED
        self.end_time = self._now_dt()
        # the one line per call at info (the call's other lines are at debug)
        log.info("call {id} ended: {reason} by {by} ({call_type}, {caller} -> {callee}, {answered})",
                 id=self.id, reason=self.end_reason, by=initiator or "-", call_type=self.call_type,
                 caller=self._party("caller") or "-", callee=self._party("callee") or "-",
                 answered=(f"answered {self._answered_ms()} ms" if self.answer_time is not None
                           else "not answered"))
        if self.leg is not None:
            try:
                yield defer.maybeDeferred(self.leg.close)
            except Exception:
                log.failure("closing the leg of {id} failed", id=self.id)
        if self.processors is not None:
            try:
                yield self.processors.close()
            except Exception:
                log.failure("closing the speech processors of {id} failed", id=self.id)
        if self.recorder is not None:
            self.recorder.close()
            pauses = [dict(p) for p in self._record_pauses]
            if pauses and "endTime" not in pauses[-1]:
                pauses[-1]["endTime"] = ev.rfc3339(self.end_time)
            self._recorders.append(RecorderFile(trackId=self.id, path=self.recorder.path,
                                                size=self.recorder.size, format=self.recorder.format,
                                                samplerate=self.recorder.file_rate,
                                                pauses=tuple(pauses) or None))
        if previous is CallState.ANSWERED:
            self.emit(ev.TrackEnd(trackId=self.id, timestamp=self.now(),
                                  duration=self._answered_ms(), ssrc=0))
        self.emit(ev.Hangup(
            trackId=self.id, timestamp=self.now(), reason=self.end_reason, initiator=initiator,
            startTime=ev.rfc3339(self.start_time), hangupTime=ev.rfc3339(self.end_time),
            answerTime=ev.rfc3339(self.answer_time) if self.answer_time else None,
            ringingTime=ev.rfc3339(self.ring_time) if self.ring_time else None,
            extra=dict(self.extras) or None,
        ))
        # the configuration guide's listeners wait for "end": always the last event of a call
        self.emit(ev.End(trackId=self.id, timestamp=self.now(), reason=self.end_reason))
        if self.metrics is not None:
            self.metrics.calls_active.labels(call_type=self.call_type).dec()
            self.metrics.calls_total.labels(call_type=self.call_type, reason=self.end_reason).inc()
        yield self._write_cdr()
        if self.journal is not None:
            self.journal.close()

    @defer.inlineCallbacks
    def _write_cdr(self):
        if self.cdr_writer is None:
            return
        if self.journal is not None:
            self.journal.flush()  # the file exists once it holds a line: the CDR names only a real file
        option = self.option
        record = CallDetailRecord(
            callType=self.call_type, option=option, callId=self.id, startTime=self.start_time,
            ringTime=self.ring_time, answerTime=self.answer_time, endTime=self.end_time,
            caller=self._party("caller"), callee=self._party("callee"),
            statusCode=self.status_code, hangupReason=self.end_reason,
            recorder=tuple(self._recorders), extras=dict(self.extras) or None,
            dumpEventFile=self.journal.path if self.journal is not None and self.journal.created else None,
        )
        try:
            yield self.cdr_writer.write(record)
        except Exception:
            log.failure("writing the CDR of {id} failed", id=self.id)

    # -- timers ---------------------------------------------------------------------------------

    def _inactivity_timeout(self) -> Optional[float]:
        if self.option is not None and self.option.inactivityTimeout:
            return float(self.option.inactivityTimeout)
        return None

    def _arm_inactivity(self) -> None:
        timeout = self._inactivity_timeout()
        if timeout:
            self._inactivity = self.clock.callLater(timeout, self._inactive)

    def _inactive(self) -> None:
        self.emit(ev.Inactivity(trackId=self.id, timestamp=self.now()))
        self.end("inactivityTimeout", initiator="system")

    def _track_done(self, track) -> None:
        """The current bot track ended naturally: autoHangup, or arm waitInputTimeout."""
        if track.auto_hangup:
            self.end("autohangup", initiator="system")
            return
        timeout_ms = track.wait_input_timeout
        if timeout_ms:
            self._cancel_wait_input()
            armed_at = self.now()
            self._wait_input = self.clock.callLater(
                timeout_ms / 1000.0, self._input_timed_out, armed_at, timeout_ms)

    def _input_timed_out(self, armed_at: int, timeout_ms: int) -> None:
        self._wait_input = None
        self.emit(ev.Silence(trackId=self.playback.track_id, timestamp=self.now(),
                             startTime=armed_at, duration=timeout_ms))

    def _cancel_wait_input(self) -> None:
        if self._wait_input is not None and self._wait_input.active():
            self._wait_input.cancel()
        self._wait_input = None

    # -- helpers ------------------------------------------------------------------------------------

    def _now_dt(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), timezone.utc)

    def _party(self, which: str) -> str:
        """The call's ``caller``/``callee``: from its option, else from its extras (SIP inbound)."""
        value = getattr(self.option, which, None) if self.option is not None else None
        return value or self.extras.get(which, "")

    def _answered_ms(self) -> int:
        if self.answer_time is None or self.end_time is None:
            return 0
        return int((self.end_time - self.answer_time).total_seconds() * 1000)

    def summary(self) -> CallSummary:
        return CallSummary(
            id=self.id, callType=self.call_type, option=self.option,
            ringTime=ev.rfc3339(self.ring_time) if self.ring_time else None,
            startTime=ev.rfc3339(self.answer_time) if self.answer_time else None,
        )

    def kill(self) -> defer.Deferred:
        return self.end("system", initiator="system")


def _no_synthesizer(option):
    raise SynthesisUnavailable("no tts option available")
