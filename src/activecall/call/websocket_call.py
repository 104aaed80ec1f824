"""``/call``: the caller's audio rides the control WebSocket as binary frames.

In: binary frames of pcm (s16le mono at ``sampleRate``, default 16 kHz), pcmu,
pcma or g722 per ``option.codec``, in any chunk size; frames sent before
``invite`` are queued.  Out: bot audio as one binary frame per 20 ms media
tick, in the same codec; nothing while nothing plays.

Deliberate difference: the original sent ``pcm`` back at 8 kHz while reading
16 kHz; we answer in the rate the client uses (``sampleRate``, default 16 kHz).
"""

from __future__ import annotations

from collections import deque

import numpy as np
from twisted.logger import Logger
from zope.interface import implementer

from activecall.call.interfaces import ICallConnector, ICallLeg, ITransferConnector
from activecall.call.manager import start_playbook
from activecall.protocol import commands as cmd

log = Logger(namespace="activecall.call.websocket")

#: binary frames kept before invite (about 10 s of 16 kHz PCM in 20 ms chunks)
MAX_QUEUED_FRAMES = 500


class PcmCodec:
    """Raw s16le mono at 8 or 16 kHz, resampled to/from the 16 kHz pipeline."""

    name = "pcm"

    def __init__(self, sample_rate: int = 16000):
        if sample_rate not in (8000, 16000):
            raise ValueError(f"sampleRate {sample_rate} is not supported (8000 or 16000)")
        self.sample_rate = sample_rate
        self._odd = b""

    def decode(self, payload: bytes) -> np.ndarray:
        data = self._odd + payload
        cut = len(data) - (len(data) % 2)
        self._odd = data[cut:]
        pcm = np.frombuffer(data[:cut], dtype="<i2").astype(np.int16)
        if self.sample_rate == 8000:
            pcm = np.repeat(pcm, 2)  # simple 2x upsampling; telephone band only
        return pcm

    def encode(self, pcm16k: np.ndarray) -> bytes:
        if self.sample_rate == 8000:
            pcm16k = pcm16k.reshape(-1, 2).mean(axis=1).astype(np.int16)
        return pcm16k.astype("<i2").tobytes()


def start_pending_playbook(session) -> None:
    """A playbook posted to ``/api/playbook/run`` for this session id starts with the connection
    (docs/api.md, "REST routes"); it speaks once the call is answered."""
    pending = session.manager.pending_playbooks if session.manager is not None else None
    taken = pending.take(session.id) if pending is not None else None
    if taken is not None:
        start_playbook(session, taken.content if taken.content is not None else taken.name, extras=taken.extras)


def codec_for(option: cmd.CallOption):
    """The /call codec for ``option.codec`` (absent or ``pcm``: raw PCM)."""
    name = (option.codec or "pcm").lower()
    if name in ("pcm", "l16", "linear16"):
        return PcmCodec(option.sampleRate or 16000)
    if name not in ("pcmu", "pcma", "g722"):
        raise ValueError(f"codec {option.codec!r} is not available on /call (pcm, pcmu, pcma, g722)")
    from activecall.media import codecs

    return codecs.stream_codec(name)


@implementer(ICallLeg)
class WebSocketAudioLeg:
    """Moves audio between the socket and the session, paced by the media clock."""

    def __init__(self, session, send_audio, codec, media_clock):
        self.session = session
        self.send_audio = send_audio
        self.codec = codec
        self.media_clock = media_clock
        self.frames_in = 0
        self.frames_out = 0
        media_clock.add(self.on_tick)

    def receive(self, payload: bytes) -> None:
        pcm = self.codec.decode(payload)
        if pcm.size:
            self.frames_in += 1
            self.session.audio_in(pcm)

    def on_tick(self) -> None:
        frame = self.session.tick()
        if frame is not None:
            self.frames_out += 1
            self.send_audio(self.codec.encode(frame))

    def close(self) -> None:
        self.media_clock.remove(self.on_tick)


@implementer(ICallConnector, ITransferConnector)
class WebSocketConnector:
    """The call-type glue for ``/call``: ``invite`` answers at once."""

    def __init__(self, session, protocol, media_clock):
        self.session = session
        self.protocol = protocol
        self.media_clock = media_clock
        self.queued: deque[bytes] = deque(maxlen=MAX_QUEUED_FRAMES)
        start_pending_playbook(session)

    def binary_received(self, payload: bytes) -> None:
        leg = self.session.leg
        if leg is None:
            self.queued.append(payload)
        else:
            leg.receive(payload)

    def invite(self, command: cmd.Invite) -> None:
        session = self.session
        if session.leg is not None:
            session.error("command", "the call is already started")
            return
        option = command.option.merged_over(session.option)
        try:
            codec = codec_for(option)
        except (ValueError, KeyError) as e:
            session.error("invite", str(e), code=400)
            return
        session.option = option
        if option.playbook and session.playbook_runner is None:
            if start_playbook(session, option.playbook) is None:
                return  # refused: error{sender: "playbook"} sent, the call is ending
        session.leg = WebSocketAudioLeg(session, self.protocol.send_audio, codec, self.media_clock)
        session.answered(sdp="")
        while self.queued:
            session.leg.receive(self.queued.popleft())

    def refer(self, command: cmd.Refer) -> None:
        """Bridge this WebSocket call to a SIP callee (the original's B2BUA refer)."""
        from activecall.call.bridge import start_refer

        manager = self.session.manager
        start_refer(self.session, command, manager.sip_calls if manager is not None else None)

    def accept(self, command: cmd.Accept) -> None:
        self.session.error("command", "accept is for a pending inbound SIP call (use /call/sip)")
