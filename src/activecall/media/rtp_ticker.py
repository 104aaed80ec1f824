"""Every RTP leg of one media clock, ticked together.

One ``RtpTicker`` per ``MediaClock`` is the clock's single subscriber for all
SIP (RTP) legs.  Each 20 ms frame it goes through the legs in phases rather
than leg by leg:

1. ask each session for its bot frame, encode them all at once
   (``codecs.encode_frames``, one matrix product for G.711) and send each
   leg's packet;
2. read every leg's socket (one readiness poll — epoll — for all of them,
   then one ``recvfrom`` per packet waiting, so an empty socket costs nothing;
   packets go through latching, SRTP, stats and the jitter buffer), pop each leg's
   jitter buffer, decode all of this tick's payloads at once
   (``codecs.decode_payloads``) and hand each session its frame;
3. for a twenty-fifth of the legs (each leg every 0.5 s), RTCP: read the
   RTCP socket and send the sender report when one is due.

Sending is what the far end hears late; the receive side can wait.  So when
a tick's receive work would run into the next frame's deadline (an overloaded
core, a slow moment of the host), the ticker stops playing out inbound frames
at the deadline (less ``RECEIVE_MARGIN``) and plays them first thing in the
next tick, after that tick's sends (``receive_deferred`` counts them).  Frames
carried over are always played, so none is lost and the carry never exceeds
one tick: under sustained overload the clock falls behind as it would without
the carry.  Past the deadline, sockets are read one packet each per tick (the
stream's own rate); a backlog waits in the kernel for a tick with time to spare.

The per-packet loops of the three phases are C (``_rtpcore.c``: ``send_audio``,
``read_ready``, ``pop_inbound``), which handle the steady state themselves and
call the leg's Python methods for everything else.  Per leg and tick that
leaves a ``recv``, a ``send`` and the session's own calls; the numpy coding is
shared.  Measured in docs/benchmarks.md.  A leg whose callback raises is
logged and dropped from the ticker (as the media clock does with a failing
subscriber), never the others.

The ticker joins its clock when it gets its first leg and leaves it with its
last, so an idle daemon has no timer running.
"""

from __future__ import annotations

import select
import weakref

from twisted.logger import Logger

from activecall.media import _rtpcore
from activecall.media import codecs as codec_mod

log = Logger(namespace="activecall.media.rtp")

MAX_READ_ROUNDS = 16  # as rtp_leg.MAX_READS_PER_TICK: a flood cannot hold the tick
RECEIVE_CHUNK = 256  # legs played out (popped, decoded as one batch) between two looks at the clock
RECEIVE_MARGIN = 0.001  # the receive side stops this long before the next frame is due
RTCP_POLL_TICKS = 25  # each leg's RTCP socket is read every 0.5 s; reports come every ~5 s

_tickers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_CAN_POLL = hasattr(select, "epoll") and hasattr(_rtpcore, "read_ready")  # Linux


def _limit_blas_threads() -> None:
    """The batched codecs' matrix products are small: one BLAS thread on the reactor thread.

    A multi-threaded BLAS would wake helper threads every 20 ms (and spin in
    them) for a ~1 ms product, taking a second core from a daemon that is
    meant to run on one."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a dependency; the limit is an optimisation
        return
    threadpool_limits(limits=1, user_api="blas")


class RtpTicker:
    """The media clock's subscriber for all RTP legs (see the module docstring)."""

    _blas_limited = False

    @classmethod
    def of(cls, media_clock, reactor, metrics=None) -> "RtpTicker":
        """The ticker of ``media_clock``, made on first use."""
        ticker = _tickers.get(media_clock)
        if ticker is None:
            ticker = _tickers[media_clock] = cls(media_clock, reactor, metrics)
        elif ticker.metrics is None and metrics is not None:
            ticker._set_metrics(metrics)
        return ticker

    def __init__(self, media_clock, reactor, metrics=None):
        if not RtpTicker._blas_limited:
            RtpTicker._blas_limited = True
            _limit_blas_threads()
        self.media_clock = media_clock
        self.reactor = reactor
        self.legs: list = []
        self.ticks = 0
        self.failures = 0
        self.metrics = None
        self._m_in = self._m_out = self._m_deferred = None
        self._attached = False
        self._poller = None  # readiness of the legs' RTP sockets (level-triggered), made on first use
        self._by_fd: dict = {}  # RTP socket descriptor -> leg
        self._fd_of: dict = {}  # leg -> its registered descriptor; a leg not here is read until empty
        self._checking: list = []  # legs whose socket was just connected, until it is seen empty
        self._unpolled: list = []  # legs without a pollable descriptor: read until empty each tick
        self._carried: list = []  # legs whose inbound frame of the last tick is still to be played
        self.receive_deferred = 0  # inbound frames played a tick late (the tick ran into its deadline)
        if metrics is not None:
            self._set_metrics(metrics)

    def _set_metrics(self, metrics) -> None:
        self.metrics = metrics
        self._m_in = metrics.rtp_packets.labels(direction="in")
        self._m_out = metrics.rtp_packets.labels(direction="out")
        self._m_deferred = metrics.rtp_inbound_frames_deferred

    def __len__(self) -> int:
        """Legs carried (the media clock counts them, not the ticker, in /health)."""
        return len(self.legs)

    def add(self, leg) -> None:
        if leg in self.legs:
            return
        self.legs.append(leg)
        self._watch(leg)
        if not self._attached:
            self._attached = True
            self.media_clock.add(self)

    def remove(self, leg) -> None:
        try:
            self.legs.remove(leg)
        except ValueError:
            return
        self._unwatch(leg)
        if not self.legs and self._attached:
            self._attached = False
            self.media_clock.remove(self)

    def _watch(self, leg) -> None:
        """Register the leg's RTP socket with the readiness poll (a leg without a real socket, or
        a system without epoll, is read the plain way, until its socket is empty)."""
        fd = leg.rtp_fileno()
        if fd < 0 or not _CAN_POLL:
            self._unpolled.append(leg)
            return
        if self._poller is None:
            self._poller = select.epoll()
        try:
            self._poller.register(fd, select.EPOLLIN)
        except (OSError, ValueError):
            self._unpolled.append(leg)
            return
        self._by_fd[fd] = leg
        self._fd_of[leg] = fd

    def _unwatch(self, leg) -> None:
        """Forget ``leg`` everywhere the ticker keeps it: the poll, the plain reads, the carry."""
        if leg in self._unpolled:
            self._unpolled.remove(leg)
        if leg in self._checking:
            self._checking.remove(leg)
        if leg in self._carried:
            self._carried = [other for other in self._carried if other is not leg]
        fd = self._fd_of.pop(leg, None)
        if fd is None or self._by_fd.get(fd) is not leg:
            return  # the descriptor was closed and reused by a newer leg, which registered it itself
        del self._by_fd[fd]
        try:
            self._poller.unregister(fd)
        except (OSError, ValueError, KeyError):
            pass  # closed before it left the ticker: the kernel already dropped it from the poll

    def _read_ready(self, now: float, stop_at=None) -> int:
        """Read every polled socket that has data: one packet from each ready socket per round,
        rounds until none is ready (or ``MAX_READ_ROUNDS``, so a flood cannot hold the tick).
        Past ``stop_at`` only the first round runs: after a stall every socket holds several
        packets, and reading them all in one tick would make that tick late too; one a tick
        keeps up with the stream, and the rest waits in the kernel for a tick with time to spare.
        The RTP packets taken.  The loop is C (``_rtpcore.read_ready``)."""
        received, saw_empty = _rtpcore.read_ready(
            self._poller.fileno(), self._by_fd, now, stop_at, self.reactor.seconds, MAX_READ_ROUNDS, self._failed)
        if saw_empty and self._checking:  # every socket is empty now, including the newly connected ones
            checking, self._checking = self._checking, []
            for leg in checking:
                leg.queue_checked()
        return received

    def check_queue(self, leg) -> None:
        """``leg`` connected its socket: tell it (``queue_checked``) once a readiness poll finds
        every socket empty, so what queued before the connect has been read with its source."""
        if leg in self._fd_of:
            self._checking.append(leg)

    def _failed(self, leg) -> None:
        """``leg`` raised on the tick (called in its ``except`` block, also by the C loops)."""
        log.failure("RTP leg of {session} failed on the media tick; its media stopped",
                    session=leg.session.id)
        self.failures += 1
        self.remove(leg)

    def __call__(self) -> None:
        """One 20 ms frame for every leg: send first, then receive.

        Sending first puts every leg's packet on the wire at the same offset
        from the clock's deadline each tick, whatever this tick's inbound work
        turns out to be; that offset is what the far end sees as jitter."""
        self.ticks += 1
        legs = list(self.legs)
        now = self.reactor.seconds()
        self._send_all(legs)
        next_deadline = getattr(self.media_clock, "next_deadline", None)
        self._receive_all(legs, now, next_deadline() - RECEIVE_MARGIN if next_deadline is not None else None)
        for leg in legs[self.ticks % RTCP_POLL_TICKS::RTCP_POLL_TICKS]:
            if leg.running:
                try:
                    leg.rtcp_tick(now)
                except Exception:
                    self._failed(leg)

    def _send_all(self, legs) -> None:
        """Ask each session for its bot frame, encode them all at once, send each leg's packet."""
        encoders, frames, send_legs = [], [], []
        for leg in legs:
            try:
                pcm = leg.next_outbound()
            except Exception:
                self._failed(leg)
                continue
            if pcm is not None:
                encoders.append(leg.encoder)
                frames.append(pcm)
                send_legs.append(leg)
        if not send_legs:
            return
        try:
            encoded = codec_mod.encode_frames(encoders, frames)
        except Exception:  # a session handed over something that is not audio: find out whose
            encoded = [_encode_or_none(leg, pcm) for leg, pcm in zip(send_legs, frames)]
        sent = _rtpcore.send_audio(send_legs, encoded, self._failed)
        if sent and self._m_out is not None:
            self._m_out.inc(sent)

    def _receive_all(self, legs, now: float, stop_at=None) -> None:
        """Read every socket, then play out: pop each jitter buffer, decode a chunk at once, hand each
        session its frame, chunk after chunk, the frames carried from the last tick first (all of
        them).  This tick's play-out stops at ``stop_at`` (reactor seconds), but never before its
        first chunk when nothing was carried; what is left waits for the next tick."""
        received = self._read_ready(now, stop_at) if self._by_fd else 0
        for leg in self._unpolled:
            if leg.running:
                try:
                    received += leg.read(now)
                except Exception:
                    self._failed(leg)
        if received and self._m_in is not None:
            self._m_in.inc(received)
        carried, self._carried = self._carried, []
        # the carried frames in chunks of their own: a leg is never twice in one decode batch
        # (both rows would start from the same filter history)
        chunks = [carried[i:i + RECEIVE_CHUNK] for i in range(0, len(carried), RECEIVE_CHUNK)]
        n_carried = len(chunks)
        chunks += [legs[i:i + RECEIVE_CHUNK] for i in range(0, len(legs), RECEIVE_CHUNK)]
        seconds = self.reactor.seconds
        for k, chunk in enumerate(chunks):
            if k >= max(n_carried, 1) and stop_at is not None and seconds() >= stop_at:
                self._carried = [leg for later in chunks[k:] for leg in later]
                self.receive_deferred += len(self._carried)
                if self._m_deferred is not None:
                    self._m_deferred.inc(len(self._carried))
                return
            self._play_out(chunk)

    def _play_out(self, legs) -> None:
        """Pop every running leg's jitter buffer (C: ``_rtpcore.pop_inbound``, which plays a
        concealed gap's frame at once), decode the payloads together, hand each session its frame."""
        decoders, payloads, decode_legs = _rtpcore.pop_inbound(legs, self._failed)
        if not decode_legs:
            return
        pcms = codec_mod.decode_payloads(decoders, payloads)  # None for a payload its decoder refused
        for leg, pcm in zip(decode_legs, pcms):
            if pcm is None or not leg.running:
                continue
            try:
                leg.play_inbound(pcm)
            except Exception:
                self._failed(leg)


def _encode_or_none(leg, pcm):
    try:
        return leg.encoder.encode(pcm)
    except Exception:
        log.failure("bot audio of {session} could not be encoded", session=leg.session.id)
        return None
