"""``mediaPass``: the call's audio bridged to an external WebSocket (docs/api.md, "mediaPass").

As the original: we connect to ``url`` with ``sample_rate=<outputSampleRate>&packet_size=<n>`` added
to its query, send the caller's audio as binary frames of raw s16le mono at ``outputSampleRate``,
``packetSize`` bytes each (default 3200), and play whatever binary audio the server sends back
(s16le mono at ``inputSampleRate``) as the bot's audio: the server *is* the bot.  Its audio is
buffered and paced out 20 ms per media tick, mixed with any ``tts``/``play`` track, so it reaches the
caller, the recording and watchers like any bot audio.  ``trackStart`` (the server-side track, no
playId) when connected, ``trackEnd`` when the connection ends; a failed or lost connection is an
``error`` event whose sender is ``media_pass: <url>`` (secrets in the URL redacted).
"""

from __future__ import annotations

import urllib.parse

import numpy as np
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
from twisted.logger import Logger

from activecall.audio import FRAME_SAMPLES, SAMPLE_RATE, Resampler
from activecall.media.recorder import CALLER
from activecall.protocol import commands as cmd
from activecall.protocol import events as ev

log = Logger(namespace="activecall.media_pass")

DEFAULT_PACKET_SIZE = 3200
#: at most this much of the server's audio waits to be played (16 kHz samples: 10 s); older is dropped
MAX_BUFFERED = SAMPLE_RATE * 10
#: at most this much caller audio waits for the connection (bytes)
MAX_PENDING_OUT = 64000
RATES = (8000, 16000, 24000, 32000, 44100, 48000)


def pass_url(url: str, sample_rate: int, packet_size: int) -> str:
    """``url`` with the original's query parameters added."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    query += [("sample_rate", str(sample_rate)), ("packet_size", str(packet_size))]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


class _PassProtocol(WebSocketClientProtocol):
    def onOpen(self):
        self.factory.bridge.connected(self)

    def onMessage(self, payload, isBinary):
        if isBinary:
            self.factory.bridge.received(payload)

    def onClose(self, wasClean, code, reason):
        self.factory.bridge.lost(wasClean, code, reason)


class _PassFactory(WebSocketClientFactory):
    protocol = _PassProtocol

    def clientConnectionFailed(self, connector, reason):
        self.bridge.lost(False, None, reason.getErrorMessage())


class MediaPass:
    """One call's bridge; the session calls ``mix`` on every tick and ``close`` at teardown."""

    def __init__(self, session, option: cmd.MediaPassOption, connect=connectWS):
        self.session = session
        self.option = option
        self.packet_size = option.packetSize or DEFAULT_PACKET_SIZE
        self.url = pass_url(option.url, option.outputSampleRate, self.packet_size)
        self.sender = f"media_pass: {cmd.redact(option.url)}"
        self._connect = connect
        self.protocol = None
        self.closed = False
        self.started_at = None
        self._out = bytearray()
        self._odd = b""
        self._in = np.zeros(0, dtype=np.int16)
        self.bytes_sent = 0
        self.bytes_received = 0
        self._to_peer = self._from_peer = None

    def start(self) -> None:
        o = self.option
        scheme = urllib.parse.urlsplit(o.url).scheme
        problem = None
        if scheme not in ("ws", "wss"):
            problem = f"mediaPass.url must be a ws:// or wss:// URL, not {scheme or 'no scheme'!r}"
        elif o.inputSampleRate not in RATES or o.outputSampleRate not in RATES:
            problem = f"mediaPass sample rates must be one of {', '.join(map(str, RATES))}"
        elif self.packet_size <= 0 or self.packet_size % 2:
            problem = "mediaPass.packetSize must be a positive, even number of bytes"
        if problem is not None:
            self.closed = True
            self.session.error(self.sender, problem, code=400)
            return
        self._to_peer = Resampler(SAMPLE_RATE, o.outputSampleRate)
        self._from_peer = Resampler(o.inputSampleRate, SAMPLE_RATE)
        factory = _PassFactory(self.url)
        factory.bridge = self
        factory.setProtocolOptions(closeHandshakeTimeout=5, openHandshakeTimeout=10)
        self.session.audio_taps.append(self._caller_audio)
        try:
            self._connect(factory)
        except Exception as e:
            self.lost(False, None, str(e))

    # -- the connection ----------------------------------------------------------------------------

    def connected(self, protocol) -> None:
        if self.closed:
            protocol.sendClose(code=1000)
            return
        self.protocol = protocol
        self.started_at = self.session.now()
        s = self.session
        s.emit(ev.TrackStart(trackId=s.playback.track_id, timestamp=s.now()))
        self._flush_out()

    def lost(self, clean: bool, code, reason) -> None:
        was_open = self.protocol is not None
        self.protocol = None
        if self._caller_audio in self.session.audio_taps:
            self.session.audio_taps.remove(self._caller_audio)
        if self.closed:
            return
        self.closed = True
        s = self.session
        if not was_open or not clean:
            s.error(self.sender, f"media pass connection {'lost' if was_open else 'failed'}: "
                                 f"{reason or code or 'no answer'}", code=502)
        if was_open:
            s.emit(ev.TrackEnd(trackId=s.playback.track_id, timestamp=s.now(),
                               duration=s.now() - self.started_at, ssrc=0))
        log.info("call {id}: media pass ended; {sent} bytes sent, {received} received", id=s.id,
                 sent=self.bytes_sent, received=self.bytes_received)

    def close(self) -> None:
        """Teardown: close the connection (no error event: the call is over)."""
        protocol = self.protocol
        self.closed = True
        if self._caller_audio in self.session.audio_taps:
            self.session.audio_taps.remove(self._caller_audio)
        if protocol is not None:
            self.protocol = None
            s = self.session
            s.emit(ev.TrackEnd(trackId=s.playback.track_id, timestamp=s.now(),
                               duration=s.now() - self.started_at, ssrc=0))
            protocol.sendClose(code=1000)

    # -- audio ---------------------------------------------------------------------------------------

    def _caller_audio(self, channel: int, pcm) -> None:
        if channel != CALLER or self.closed:
            return
        self._out += self._to_peer(pcm).astype("<i2").tobytes()
        if len(self._out) > MAX_PENDING_OUT:  # not connected yet: keep the latest
            del self._out[:len(self._out) - MAX_PENDING_OUT]
        self._flush_out()

    def _flush_out(self) -> None:
        if self.protocol is None:
            return
        size = self.packet_size
        while len(self._out) >= size:
            chunk = bytes(self._out[:size])
            del self._out[:size]
            self.protocol.sendMessage(chunk, isBinary=True)
            self.bytes_sent += size

    def received(self, payload: bytes) -> None:
        self.bytes_received += len(payload)
        data = self._odd + payload
        cut = len(data) - len(data) % 2
        self._odd = data[cut:]
        if not cut:
            return
        pcm = self._from_peer(np.frombuffer(data[:cut], dtype="<i2"))
        self._in = np.concatenate((self._in, pcm))
        if self._in.size > MAX_BUFFERED:
            self._in = self._in[-MAX_BUFFERED:]

    def mix(self, frame):
        """This tick's bot frame with 20 ms of the server's audio added (None: nothing to play)."""
        if self._in.size < FRAME_SAMPLES:
            return frame
        chunk, self._in = self._in[:FRAME_SAMPLES], self._in[FRAME_SAMPLES:]
        if frame is None:
            return chunk
        return np.clip(frame.astype(np.int32) + chunk, -32768, 32767).astype(np.int16)
