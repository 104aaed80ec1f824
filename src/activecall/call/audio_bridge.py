"""The ``bridge`` command: two live calls' audio connected both ways, in this daemon.

Each call's caller audio (what its leg hands ``audio_in``, 16 kHz) becomes the other call's server-side
track (a ``BridgeTrack``), so A hears B and B hears A, whatever their call types (SIP, WebSocket,
WebRTC).  Whatever played on either call stops; a ``tts``/``play`` command on either call afterwards
replaces the bridge track on that call only (the bridge is then parted).  The bridge ends with
``unbridge`` on either call, when either call ends, or when either side starts something else; both
calls get ``bridged{active: false}``.  The calls themselves go on (a warm transfer ends the bot's part
by hanging up its own call, or keeps it).
"""

from __future__ import annotations

from typing import Optional

from twisted.logger import Logger

from activecall.call.bridge import BridgeTrack
from activecall.protocol import events as ev

log = Logger(namespace="activecall.call.audio_bridge")

#: the most audio (samples, 1 s) waiting for the other side's play-out; a stalled side never grows it
MAX_BUFFERED = 16000


class AudioBridge:
    """One bridge between sessions ``a`` and ``b``."""

    def __init__(self, a, b):
        self.a = a
        self.b = b
        self.active = False
        self._tracks = {}
        self._sinks = {}

    def start(self) -> None:
        self.active = True
        for here, there in ((self.a, self.b), (self.b, self.a)):
            track = BridgeTrack(here.playback.track_id)
            self._tracks[here.id] = track
            here.bridge = self
            here.playback.start_track(track)  # what played stops: trackEnd, then trackStart of the bridge
            track.ended.addCallback(lambda _t: self.part())

        for here, there in ((self.a, self.b), (self.b, self.a)):
            other_track = self._tracks[there.id]

            def sink(pcm, track=other_track):
                track.buffer.push(pcm)
                if len(track.buffer) > MAX_BUFFERED:
                    track.buffer.clear()

            self._sinks[here.id] = sink
            here.audio_sinks.append(sink)
            here.when_ended().addCallback(lambda _r: self.part())
        for here, there in ((self.a, self.b), (self.b, self.a)):
            here.emit(ev.Bridged(trackId=here.id, timestamp=here.now(), peer=there.id, active=True))
        log.info("calls {a} and {b} bridged", a=self.a.id, b=self.b.id)

    def peer_of(self, session):
        return self.b if session is self.a else self.a

    def part(self) -> None:
        """End the bridge (idempotent); both calls go on."""
        if not self.active:
            return
        self.active = False
        for here in (self.a, self.b):
            sink = self._sinks.pop(here.id, None)
            if sink in here.audio_sinks:
                here.audio_sinks.remove(sink)
            track = self._tracks.pop(here.id, None)
            if track is not None:
                track.closed = True
            if here.bridge is self:
                here.bridge = None
        for here, there in ((self.a, self.b), (self.b, self.a)):
            if here.state.value != "ended":
                here.emit(ev.Bridged(trackId=here.id, timestamp=here.now(), peer=there.id, active=False))
        log.info("calls {a} and {b} parted", a=self.a.id, b=self.b.id)


def bridge(session, target_id: str) -> Optional[AudioBridge]:
    """Bridge ``session`` with the live call ``target_id``; errors become ``error`` events."""
    sessions = session.manager.sessions if session.manager is not None else {}
    other = sessions.get(target_id)
    return bridge_sessions(session, other, target_id)


def bridge_sessions(session, other, target_id: Optional[str] = None) -> Optional[AudioBridge]:
    target_id = target_id or (other.id if other is not None else "")
    if other is None or other is session:
        session.error("bridge", f"no live call {target_id!r} to bridge with", code=404)
        return None
    for s in (session, other):
        if s.state.value != "answered":
            session.error("bridge", f"call {s.id} is not answered ({s.state.value})", code=409)
            return None
    for s in (session, other):
        if s.bridge is not None:
            s.bridge.part()
    b = AudioBridge(session, other)
    b.start()
    return b
