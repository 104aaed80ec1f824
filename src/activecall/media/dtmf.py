"""RFC 4733 telephone-events: one digit per key press on receive, the packet sequence on send.

Receive follows active-call's receiver (docs/media.md): payload ``[event, E|R|volume,
duration(16)]``; the first packet of a press fires; later packets with the same
event and a duration that did not go down are the same press (updates, end
packets, retransmits); a lower duration is a new press.  Events above 15,
payloads under 4 bytes and payload types under 96 are ignored.  Unlike the
original (PT 101 only) the receiver takes whatever PTs were negotiated.  One
addition: a changed RTP timestamp, when the caller passes it, also starts a
new press (RFC 4733 §2.5.1.3), so a press whose first packets were lost is
not merged with the previous one.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterable, Optional

__all__ = ["EVENTS", "DtmfError", "DtmfEvent", "DtmfReceiver", "DtmfPacket", "event_packets", "DtmfSender",
           "parse_payload", "build_payload"]

EVENTS = "0123456789*#ABCD"


class DtmfError(ValueError):
    """A digit that RFC 4733 events 0-15 cannot carry."""


@dataclass(frozen=True)
class DtmfEvent:
    event: int
    end: bool
    volume: int
    duration: int

    @property
    def digit(self) -> str:
        return EVENTS[self.event]


def parse_payload(payload: bytes) -> Optional[DtmfEvent]:
    """The event in a telephone-event payload, or None for one we ignore (short, or not a DTMF key)."""
    if len(payload) < 4:
        return None
    event, flags, duration = struct.unpack("!BBH", payload[:4])
    if event > 15:
        return None
    return DtmfEvent(event, bool(flags & 0x80), flags & 0x3F, duration)


def build_payload(event: int, duration: int, *, end: bool = False, volume: int = 10) -> bytes:
    return struct.pack("!BBH", event, (0x80 if end else 0) | (volume & 0x3F), min(duration, 0xFFFF))


class DtmfReceiver:
    """Turns telephone-event packets into digits, once per key press."""

    def __init__(self, payload_types: Iterable[int] = (101,)):
        self.payload_types = frozenset(pt for pt in payload_types if pt >= 96)
        self._last: Optional[tuple] = None  # (event, duration, timestamp)

    def handles(self, payload_type: int) -> bool:
        """Whether packets of this PT are telephone-events (and so must not reach the audio decoder)."""
        return payload_type in self.payload_types

    def receive(self, payload_type: int, payload: bytes, timestamp: Optional[int] = None) -> Optional[str]:
        """The digit if this packet starts a new press, else None."""
        if payload_type < 96 or payload_type not in self.payload_types:
            return None
        event = parse_payload(payload)
        if event is None:
            return None
        last = self._last
        self._last = (event.event, event.duration, timestamp)
        if last is not None and last[0] == event.event and event.duration >= last[1]:
            if timestamp is None or last[2] is None or last[2] == timestamp:
                return None  # an update, end packet or retransmit of the press we reported
        return event.digit


@dataclass(frozen=True)
class DtmfPacket:
    """One packet of an event: send it ``frame`` ticks after the event starts."""

    frame: int
    payload: bytes
    marker: bool
    end: bool


def event_packets(digit: str, *, duration_ms: int = 100, clock_rate: int = 8000, volume: int = 10,
                  interval_ms: int = 20, end_repeats: int = 3) -> list:
    """The RFC 4733 packets of one key press, all sharing the event's start timestamp.

    The first carries the marker bit; updates follow every ``interval_ms`` with
    a growing duration; the final duration is sent ``end_repeats`` times with
    the E bit (RFC 4733 §2.5.1.4 recommends three).
    """
    event = digit_event(digit)
    step = clock_rate * interval_ms // 1000
    frames = max(1, -(-duration_ms // interval_ms))
    total = min(frames * step, 0xFFFF)
    packets = [DtmfPacket(i, build_payload(event, min((i + 1) * step, total), volume=volume), i == 0, False)
               for i in range(frames - 1)]
    packets += [DtmfPacket(frames - 1 + i, build_payload(event, total, end=True, volume=volume),
                           frames == 1 and i == 0, True) for i in range(end_repeats)]
    return packets


def digit_event(digit: str) -> int:
    index = EVENTS.find(digit.upper()) if len(digit) == 1 else -1
    if index < 0:
        raise DtmfError(f"{digit!r} is not a DTMF digit (0-9, *, #, A-D)")
    return index


@dataclass(frozen=True)
class DtmfFrame:
    """What to send on this tick: the payload, with the event's start timestamp."""

    payload: bytes
    timestamp: int
    marker: bool


class DtmfSender:
    """Queues digits and hands out one telephone-event packet per 20 ms media tick.

    The leg calls ``tick(stream_timestamp)`` on every clock tick: a DtmfFrame
    means send it (instead of audio) with the given timestamp and the
    negotiated telephone-event PT; None means send audio as usual.  Digits are
    separated by ``gap_ms`` of audio.
    """

    def __init__(self, *, duration_ms: int = 100, gap_ms: int = 60, clock_rate: int = 8000, volume: int = 10,
                 interval_ms: int = 20):
        self.duration_ms, self.gap_ms, self.clock_rate = duration_ms, gap_ms, clock_rate
        self.volume, self.interval_ms = volume, interval_ms
        self._digits: list = []
        self._packets: list = []
        self._timestamp = 0
        self._gap = 0

    def send(self, digits: str, duration_ms: Optional[int] = None) -> None:
        """Queue ``digits`` (validated at once, so a bad string queues nothing)."""
        for d in digits:
            digit_event(d)
        self._digits += [(d, duration_ms or self.duration_ms) for d in digits]

    @property
    def busy(self) -> bool:
        return bool(self._digits or self._packets or self._gap)

    def clear(self) -> None:
        """Drop queued digits; an event in flight still gets its end packets."""
        self._digits.clear()

    def tick(self, stream_timestamp: int) -> Optional[DtmfFrame]:
        if not self._packets:
            if self._gap:
                self._gap -= 1
                return None
            if not self._digits:
                return None
            digit, duration = self._digits.pop(0)
            self._packets = event_packets(digit, duration_ms=duration, clock_rate=self.clock_rate,
                                          volume=self.volume, interval_ms=self.interval_ms)
            self._timestamp = stream_timestamp
        packet = self._packets.pop(0)
        if not self._packets:
            self._gap = max(0, self.gap_ms // self.interval_ms)
        return DtmfFrame(packet.payload, self._timestamp, packet.marker)
