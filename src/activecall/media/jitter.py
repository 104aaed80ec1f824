"""Adaptive jitter buffer for one inbound RTP stream.

Pure: no timers, no sockets.  The leg ``push``es packets as they arrive (with
their arrival time in seconds) and ``pop``s one frame whenever it needs the
next frame of audio (once per media-clock tick for 20 ms packets).  Packets are
reordered by sequence number (16-bit wraparound handled by extending to a
64-bit index), packets older than the playout point are dropped as late, and a
gap yields a ``Frame`` with ``concealed=True`` so the decoder can run its loss
concealment (Opus PLC) or the leg can repeat/fade the last frame.

The target depth follows the measured interarrival jitter (RFC 3550 §6.4.1):
``ceil(k * jitter / frame) + 1`` frames, clamped to ``[min_depth, max_depth]``.
A buffer that stays more than ``shed_slack`` frames past the target sheds
one frame per pop (latency shrinks gradually; a burst is played, not cut); an underrun conceals, and after
``rebuffer_after`` empty pops (a talk pause or DTX) the buffer primes again
to the current target before playing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple, Optional

SEQ_MOD = 1 << 16
TS_MOD = 1 << 32


class Frame(NamedTuple):
    """One frame handed to the decoder; ``concealed`` frames have no payload.

    A named tuple, not a dataclass: one is built per received packet, and a
    tuple is several times cheaper to make."""

    seq: int
    timestamp: int
    payload: bytes
    payload_type: int = -1
    concealed: bool = False
    marker: bool = False


_new_frame = partial(tuple.__new__, Frame)  # a Frame from a full tuple, without the keyword-parsing __new__


@dataclass
class JitterStats:
    received: int = 0
    played: int = 0
    late: int = 0
    duplicates: int = 0
    concealed: int = 0
    shed: int = 0  # frames discarded to shrink latency
    resets: int = 0


def seq_delta(a: int, b: int) -> int:
    """Signed distance ``a - b`` between 16-bit sequence numbers (wraparound aware)."""
    return ((a - b + 0x8000) & 0xFFFF) - 0x8000


class JitterBuffer:
    """Reorders, drops late packets, signals loss, adapts its depth to jitter."""

    def __init__(
        self,
        clock_rate: int = 8000,
        frame_ms: int = 20,
        min_depth: int = 1,
        max_depth: int = 15,
        initial_depth: int = 2,
        jitter_factor: float = 3.0,
        rebuffer_after: int = 5,
        shed_slack: int = 3,
        reset_gap: int = 500,
    ):
        self.clock_rate = clock_rate
        self.frame_seconds = frame_ms / 1000.0
        self.frame_samples = clock_rate * frame_ms // 1000
        self.min_depth = min_depth
        self.max_depth = max_depth
        self.jitter_factor = jitter_factor
        self.rebuffer_after = rebuffer_after
        self.shed_slack = shed_slack
        self.reset_gap = reset_gap
        self.target = max(min_depth, min(initial_depth, max_depth))
        # seconds, RFC 3550 smoothed interarrival jitter; it starts at the value that
        # gives ``initial_depth`` and converges on the measured one
        self.jitter = (self.target - 1) * self.frame_seconds / jitter_factor
        self.stats = JitterStats()
        self._packets: dict[int, Frame] = {}  # extended seq -> frame
        self._ref: Optional[int] = None  # extended seq of the last packet pushed (for extension)
        self._next: Optional[int] = None  # extended seq to play next (None while priming)
        self._last_ts: Optional[int] = None
        self._last_transit: Optional[float] = None
        self._empty_pops = 0

    def __len__(self) -> int:
        return len(self._packets)

    @property
    def playing(self) -> bool:
        return self._next is not None

    def push(self, seq: int, timestamp: int, payload: bytes, arrival: float,
             payload_type: int = -1, marker: bool = False) -> bool:
        """Queue a packet; False when it was dropped (late or duplicate).

        Called for every packet of every leg, so the sequence extension and the
        jitter update are written out here rather than called."""
        ref = self._ref
        if ref is None:
            ext = seq + SEQ_MOD  # headroom so a slightly older first packet stays positive
        else:
            # ref + seq_delta(seq, ref & 0xFFFF): ref's upper bits do not change the 16-bit distance
            ext = ref + ((seq - ref + 0x8000) & 0xFFFF) - 0x8000
            if abs(ext - ref) > self.reset_gap:
                self.reset()  # the sender restarted its sequence: start over
                self.stats.resets += 1
                ext = seq + SEQ_MOD
        stats = self.stats
        stats.received += 1
        # RFC 3550 interarrival jitter, in seconds; the target depth follows it
        transit = arrival - timestamp / self.clock_rate
        last = self._last_transit
        self._last_transit = transit
        if last is not None:
            d = abs(transit - last)
            if d < 10.0:  # a timestamp jump (new talkspurt after a long pause) is not jitter
                self.jitter += (d - self.jitter) / 16.0
                want = math.ceil(self.jitter_factor * self.jitter / self.frame_seconds - 1e-9) + 1
                self.target = max(self.min_depth, min(self.max_depth, want))
        nxt = self._next
        if nxt is not None and ext < nxt:
            stats.late += 1
            return False
        packets = self._packets
        if ext in packets:
            stats.duplicates += 1
            return False
        packets[ext] = _new_frame((seq, timestamp, payload, payload_type, False, marker))
        if self._ref is None or ext > self._ref:
            self._ref = ext
        return True

    def pop(self) -> Optional[Frame]:
        """The next frame, a concealed frame for a gap, or None while (re)buffering."""
        if self._next is None:
            if len(self._packets) < self.target:
                return None
            self._next = min(self._packets)
            self._empty_pops = 0
        if len(self._packets) > self.target + self.shed_slack:
            # persistently too deep (a sender clock running fast, a burst that never drained):
            # shed one frame per pop so latency shrinks without cutting a burst of speech
            if self._next not in self._packets:
                self._next = min(self._packets)
            else:
                self._take(self._next)
                self._next += 1
                self.stats.shed += 1
        frame = self._packets.pop(self._next, None)
        if frame is not None:
            self._next += 1
            self._empty_pops = 0
            self._last_ts = frame.timestamp
            self.stats.played += 1
            return frame
        if not self._packets:
            self._empty_pops += 1
            if self._empty_pops >= self.rebuffer_after:
                self._next = None  # a pause: prime again before playing
                return None
        seq = self._next & 0xFFFF
        ts = ((self._last_ts or 0) + self.frame_samples) % TS_MOD
        self._last_ts = ts
        self._next += 1
        self.stats.concealed += 1
        return Frame(seq, ts, b"", concealed=True)

    def _take(self, ext: int) -> Frame:
        frame = self._packets.pop(ext)
        self._last_ts = frame.timestamp
        return frame

    def flush(self) -> None:
        """Drop everything queued (barge-in, re-INVITE) and prime again."""
        self._packets.clear()
        self._next = None
        self._empty_pops = 0

    def reset(self) -> None:
        """Forget the stream entirely (SSRC change)."""
        self.flush()
        self._ref = None
        self._last_ts = None
        self._last_transit = None
