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

The buffer holds at most ``JB_CAPACITY`` (64) packets, over a second of 20 ms
audio: its depth stays under ``max_depth + shed_slack`` plus one tick's reads,
so only a peer bursting more than that reaches it, and then the oldest packet
goes (counted as shed).

It is written in C (``_rtpcore.c``), as is the rest of the per-packet RTP work,
because every leg pushes and pops it 50 times a second; this module is its
Python home and documentation.
"""

from __future__ import annotations

from activecall.media._rtpcore import JB_CAPACITY, Frame, JitterBuffer, JitterStats

__all__ = ["Frame", "JitterBuffer", "JitterStats", "JB_CAPACITY", "seq_delta"]


def seq_delta(a: int, b: int) -> int:
    """Signed distance ``a - b`` between 16-bit sequence numbers (wraparound aware)."""
    return ((a - b + 0x8000) & 0xFFFF) - 0x8000
