"""Fakes for testing against activecall, as ``treq.testing`` is to treq.

Everything here runs without a network, a speech engine or a real clock: a
test drives it with ``twisted.internet.task.Clock`` and reads what it recorded.

- media clock: ``advance_frames`` (a ``task.Clock`` in 20 ms media ticks),
  ``ManualMediaClock`` (the shared media clock's interface, ticked by hand);
- speech: ``FakeSynthesizer`` (``ISynthesizer``), ``FakeRecognizer``
  (``IStreamingRecognizer``), ``ScriptedVad`` (a call VAD that knows where the
  voice is, with silero's padding);
- calls: ``FakeLeg`` (``ICallLeg``: what a session needs of its network leg),
  ``FakeConnector`` (``ITransferConnector``: a call type that can transfer),
  ``FakeMediaSession`` (``IMediaSession``: what an ``RtpLeg`` needs of its call);
- network: ``MemoryUdpNetwork`` with its ``MemoryPortPool`` (RTP legs over
  in-memory datagrams: a send is in the destination's queue when it returns),
  ``FakeDatagramTransport`` (a UDP transport that records writes).

Speech test audio (flite-made labelled speech, word error rate) is in
``activecall.speech.testing``.  This module ships in the wheel: it imports
nothing beyond activecall's own dependencies.
"""

from __future__ import annotations

import errno
import ipaddress
from collections import deque
from typing import Callable, Optional

import numpy as np
from twisted.internet import defer
from zope.interface import implementer

from activecall.audio import FRAME_SAMPLES, SAMPLE_RATE
from activecall.call.interfaces import ICallLeg, ITransferConnector
from activecall.media.rtp import PortPool
from activecall.media.rtp_leg import IMediaSession
from activecall.speech.base import (
    AsrResult, IStreamingRecognizer, ISynthesizer, IVoiceActivityDetector, SpeechEnded, SpeechStarted,
)

#: one media tick, in seconds
FRAME_SECONDS = 0.02


# -- clocks ---------------------------------------------------------------------------------------


def advance_frames(clock, frames: int = 1, *on_tick: Callable[[], object]) -> None:
    """Advance ``clock`` (a ``task.Clock``) by ``frames`` media ticks of 20 ms, calling each of
    ``on_tick`` after every step, as the media clock calls its subscribers."""
    for _ in range(frames):
        clock.advance(FRAME_SECONDS)
        for f in on_tick:
            f()


class ManualMediaClock:
    """The shared media clock's interface (``add``/``remove`` a subscriber), ticked by the test:
    ``tick(n)`` calls every subscriber ``n`` times, with no time passing."""

    def __init__(self):
        self.subscribers: list = []

    def add(self, fn) -> None:
        self.subscribers.append(fn)

    def remove(self, fn) -> None:
        self.subscribers.remove(fn)

    def tick(self, n: int = 1) -> None:
        for _ in range(n):
            for fn in list(self.subscribers):
                fn()


# -- speech ---------------------------------------------------------------------------------------


@implementer(ISynthesizer)
class FakeSynthesizer:
    """Text to speech without an engine: ``frames`` 20 ms frames of a constant tone per text, all at
    once; or, with ``hold``, nothing until the test answers from ``pending`` (``(deferred, sink)``
    pairs).  Every text asked for is kept in ``texts``; a held synthesis that was cancelled, in ``cancelled``."""

    name = "fake"

    def __init__(self, frames: int = 3, hold: bool = False, level: int = 1000):
        self.frames = frames
        self.hold = hold
        self.level = level
        self.texts: list[str] = []
        self.pending: list = []
        self.cancelled: list[str] = []

    def synthesize(self, text, sink) -> defer.Deferred:
        self.texts.append(text)
        if self.hold:
            d = defer.Deferred(lambda _, text=text: self.cancelled.append(text))
            self.pending.append((d, sink))
            return d
        sink(np.full(self.frames * FRAME_SAMPLES, self.level, dtype=np.int16))
        return defer.succeed(None)


@implementer(IStreamingRecognizer)
class FakeRecognizer:
    """Speech to text without an engine: keeps what it is fed (``fed``: int16 samples), says what the
    test makes it say (``say``), counts ``end_utterance`` calls and notes ``closed``."""

    name = "fake"

    def __init__(self, on_result: Optional[Callable[[AsrResult], None]] = None):
        self.on_result = on_result
        self.on_error = None
        self.fed = 0
        self.utterances_ended = 0
        self.closed = False
        self._index = 0

    def feed(self, pcm) -> None:
        self.fed += len(pcm)

    def end_utterance(self) -> None:
        self.utterances_ended += 1

    def close(self) -> defer.Deferred:
        self.closed = True
        return defer.succeed(None)

    def say(self, text: str, final: bool = True) -> AsrResult:
        """Deliver ``text`` as a partial or final result of the current utterance (a final ends it)."""
        result = AsrResult(index=self._index, text=text, final=final)
        if final:
            self._index += 1
        if self.on_result is not None:
            self.on_result(result)
        return result


@implementer(IVoiceActivityDetector)
class ScriptedVad:
    """A call VAD told where the voice is: ``segments`` ``[(start_ms, end_ms)]`` in stream time.  Fed audio,
    it reports ``SpeechStarted(start)`` once the stream passes ``start + speech_padding`` and
    ``SpeechEnded(start, end)`` once it passes ``end + silence_padding`` (silero's defaults: 250 / 100 ms),
    as the segmenter would on perfect windows; ``voiced_after(ms)`` says whether voice was heard after
    ``ms`` so far (``WindowedVad.voiced_after``)."""

    name = "scripted"

    def __init__(self, segments, on_event: Callable[[object], None], speech_padding: int = 250,
                 silence_padding: int = 100):
        self.segments = list(segments)
        self.on_event = on_event
        self.speech_padding = speech_padding
        self.silence_padding = silence_padding
        self.fed_ms = 0.0
        self._due = sorted([(start + speech_padding, 0, SpeechStarted(start)) for start, end in self.segments]
                           + [(end + silence_padding, 1, SpeechEnded(start, end)) for start, end in self.segments],
                           key=lambda item: (item[0], item[1]))
        self.closed = False

    def feed(self, pcm) -> None:
        if self.closed:
            return
        self.fed_ms += len(pcm) * 1000 / SAMPLE_RATE
        while self._due and self._due[0][0] <= self.fed_ms:
            self.on_event(self._due.pop(0)[2])

    def voiced_after(self, ms: int) -> bool:
        return any(start < self.fed_ms and min(end, self.fed_ms) > ms for start, end in self.segments)

    def drain(self) -> defer.Deferred:
        return defer.succeed(None)

    def close(self) -> defer.Deferred:
        self.closed = True
        return defer.succeed(None)


# -- calls ----------------------------------------------------------------------------------------


@implementer(ICallLeg)
class FakeLeg:
    """A call's network leg as its session sees it: ``codec`` (None unless given), ``close`` (counted in
    ``closed``) and ``when_ended`` (``ended``, fired by the test)."""

    def __init__(self, codec=None):
        self.session = self
        self.codec = codec
        self.ended = defer.Deferred()
        self.closed = 0

    def when_ended(self) -> defer.Deferred:
        return self.ended

    def close(self) -> defer.Deferred:
        self.closed += 1
        return defer.succeed(None)


@implementer(ITransferConnector)
class FakeConnector:
    """A call type that can transfer: keeps every ``refer`` command."""

    def __init__(self):
        self.refers: list = []

    def refer(self, command) -> None:
        self.refers.append(command)


@implementer(IMediaSession)
class FakeMediaSession:
    """What an ``RtpLeg`` needs of its call: ``tick()`` for the bot's frame (a sine of ``freq`` Hz,
    else ``frame`` every time, else None: silence), ``audio_in`` (kept in ``received``), ``emit``
    (kept in ``events``), ``now``.  With ``fail``, ``tick`` raises."""

    def __init__(self, id: str = "fake", freq: Optional[float] = None, frame=None, fail: bool = False,
                 level: int = 8000):
        self.id = id
        self.freq = freq
        self.frame = frame
        self.fail = fail
        self.level = level
        self.received: list = []
        self.events: list = []
        self.n = 0

    def tick(self):
        if self.fail:
            raise RuntimeError("a broken session")
        if self.freq is not None:
            t = (np.arange(FRAME_SAMPLES) + self.n * FRAME_SAMPLES) / SAMPLE_RATE
            self.n += 1
            return (np.sin(2 * np.pi * self.freq * t) * self.level).astype(np.int16)
        return None if self.frame is None else np.array(self.frame, copy=True)

    def audio_in(self, pcm) -> None:
        self.received.append(pcm)

    def emit(self, event) -> None:
        self.events.append(event)

    def now(self) -> int:
        return 0


# -- network --------------------------------------------------------------------------------------


class MemoryUdpSocket:
    """A non-blocking UDP socket of a ``MemoryUdpNetwork``, with the methods ``RtpLeg`` uses.

    It has no descriptor (``fileno()`` is -1), so the RTP ticker reads it the plain way rather than
    through its readiness poll and C loops; and it cannot be connected (``connect`` fails as on a
    platform without it), so a leg on it always names the destination of its packets."""

    def __init__(self, network: "MemoryUdpNetwork", address: tuple):
        self.network = network
        self.address = address
        self.queue: deque = deque()
        self.closed = False

    def getsockname(self) -> tuple:
        return self.address

    def fileno(self) -> int:
        return -1

    def setblocking(self, flag) -> None:
        pass

    def connect(self, address) -> None:
        raise OSError(errno.EOPNOTSUPP, "in-memory sockets are not connected")

    def sendto(self, data: bytes, address) -> int:
        if self.closed:
            raise OSError(errno.EBADF, "Bad file descriptor")
        self.network.deliver(bytes(data), self.address, address)
        return len(data)

    def send(self, data: bytes) -> int:
        raise OSError(errno.EDESTADDRREQ, "Destination address required")

    def recvfrom(self, size: int):
        if self.closed:
            raise OSError(errno.EBADF, "Bad file descriptor")
        if not self.queue:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        data, source = self.queue.popleft()
        return data[:size], source

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.queue.clear()
            self.network.unbind(self)


class MemoryUdpNetwork:
    """Datagrams between ``MemoryUdpSocket`` objects, delivered inside ``sendto`` (no loss, no
    delay, no reordering): a test ticks legs and finds each packet already waiting at the far end.
    A datagram to an address nobody holds is dropped, as UDP's is; a destination a real socket would
    refuse (a port above 65535, a host that is not an IP literal, not a (host, port) pair) raises
    what ``socket.sendto`` raises for it.  ``sent`` keeps every (data, source, destination)."""

    def __init__(self):
        self.sockets: dict = {}
        self.sent: list = []

    def socket(self, host: str = "127.0.0.1", port: int = 0) -> MemoryUdpSocket:
        """A socket bound to (host, port); port 0 picks a free one.  OSError(EADDRINUSE) if taken."""
        if port == 0:
            port = next(p for p in range(50000, 65536) if (host, p) not in self.sockets)
        address = (host, port)
        if address in self.sockets:
            raise OSError(errno.EADDRINUSE, "Address already in use")
        sock = self.sockets[address] = MemoryUdpSocket(self, address)
        return sock

    def unbind(self, sock: MemoryUdpSocket) -> None:
        if self.sockets.get(sock.address) is sock:
            del self.sockets[sock.address]

    def pool(self, start: int, end: int, interface: str = "127.0.0.1") -> "MemoryPortPool":
        return MemoryPortPool(self, start, end, interface)

    def deliver(self, data: bytes, source: tuple, destination) -> None:
        host, port = _check_destination(destination)
        self.sent.append((data, source, (host, port)))
        target = self.sockets.get((host, port))
        if target is not None:
            target.queue.append((data, source))


def _check_destination(destination) -> tuple:
    if not isinstance(destination, tuple) or len(destination) != 2:
        raise TypeError("sendto(): AF_INET address must be a pair (host, port)")
    host, port = destination
    if not isinstance(host, str) or not isinstance(port, int):
        raise TypeError("sendto(): AF_INET address must be a (str, int) pair")
    if not 0 <= port <= 65535:
        raise OverflowError("sendto(): port must be 0-65535.")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise OSError(errno.EINVAL, f"not an IP address: {host!r}") from None
    return host, port


class MemoryPortPool(PortPool):
    """``PortPool`` (even RTP port, RTCP on +1, round-robin, exhaustion) binding ``MemoryUdpSocket``
    objects of ``network`` instead of real sockets: ``RtpLeg.allocate(pool)`` takes it as it is."""

    def __init__(self, network: MemoryUdpNetwork, start: int, end: int, interface: str = "127.0.0.1"):
        super().__init__(None, start, end, interface)
        self.network = network

    def _bind(self, port: int) -> Optional[MemoryUdpSocket]:
        try:
            return self.network.socket(self.interface, port)
        except OSError:
            return None


class FakeDatagramTransport:
    """A UDP transport (``IUDPTransport.write``) that keeps every (data, addr) in ``written``."""

    def __init__(self):
        self.written: list = []

    def write(self, data, addr=None) -> None:
        self.written.append((data, addr))
