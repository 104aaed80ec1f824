"""CPU of each phase of the RTP ticker, per leg, in one process (issue 4's bench, taken apart).

    .venv/bin/python bench/bench_ticker_phases.py --legs 1000 --ticks 500

``bench_rtp_legs.py`` measures the whole media path against an outside generator, and its figures
move with the host (see docs/benchmarks.md, machine C).  This one isolates the phases so a change
to one of them can be compared A/B in the same minute: N ``RtpLeg``s answered on loopback, driven
by a ``task.Clock`` instead of the reactor.  Each tick, untimed, a sender socket puts one 20 ms PCMU
packet on every leg's socket (loopback delivery is synchronous); then, timed with the thread's CPU
clock, the ticker's three phases run as the media clock would run them:

- **send**: every session's frame, the batched G.711 encode, one ``send`` per leg;
- **read**: the readiness poll and one ``recv`` per packet through latching, statistics and the
  jitter buffer;
- **play-out**: every jitter buffer popped, the batched decode, each session handed its frame.

Prints µs per leg and tick for each phase (median of ``--repeats`` runs of ``--ticks`` ticks), so
kernel work (one send, one recv per leg) is included but the generator's own sends are not.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time

from twisted.internet import task

from activecall.media.clock import MediaClock
from activecall.media.rtp import PortPool, RtpPacket
from activecall.media.rtp_leg import RtpLeg
from activecall.media.rtp_ticker import RECEIVE_CHUNK, RtpTicker
from activecall.service import tune_gc_for_daemon
from rtp_fixtures import ToneSession, offer  # bench/, the script's own folder

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--legs", type=int, default=1000)
    p.add_argument("--ticks", type=int, default=300)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--base-port", type=int, default=46000)
    args = p.parse_args()

    tune_gc_for_daemon()
    clock = task.Clock()  # the legs' and the ticker's time
    media_clock = MediaClock(task.Clock())  # never advanced: the phases are called by hand
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.setblocking(False)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    pool = PortPool(clock, args.base_port, args.base_port + 4 * args.legs + 200, interface="127.0.0.1")
    legs = []
    for i in range(args.legs):
        leg = RtpLeg(ToneSession(f"leg{i}"), media_clock, clock, host="127.0.0.1", codecs=("pcmu",))
        leg.allocate(pool)
        leg.answer(offer(peer.getsockname()[1]))
        leg.start()
        legs.append(leg)
    ticker = RtpTicker.of(media_clock, clock)
    targets = [("127.0.0.1", leg.local_port) for leg in legs]
    seq = [0]

    def deliver():  # one packet per leg, as the far ends would send it (untimed)
        seq[0] += 1
        s = seq[0]
        for k, target in enumerate(targets):
            peer.sendto(RtpPacket(0, s & 0xFFFF, 160 * s, 1000 + k, b"\xff" * 160).serialize(), target)

    def drain():
        while True:
            try:
                peer.recv(2048)
            except BlockingIOError:
                return

    def run(ticks: int):
        spent = {"send": 0, "read": 0, "play-out": 0}
        for _ in range(ticks):
            deliver()
            clock.advance(0.02)
            now = clock.seconds()
            t0 = time.thread_time_ns()
            ticker._send_all(legs)
            t1 = time.thread_time_ns()
            ticker._read_ready(now)
            t2 = time.thread_time_ns()
            for start in range(0, len(legs), RECEIVE_CHUNK):
                ticker._play_out(legs[start:start + RECEIVE_CHUNK])
            t3 = time.thread_time_ns()
            spent["send"] += t1 - t0
            spent["read"] += t2 - t1
            spent["play-out"] += t3 - t2
            drain()
        return {k: v / 1000 / (ticks * len(legs)) for k, v in spent.items()}

    run(50)  # warm-up: the jitter buffers prime, the sockets connect
    results = [run(args.ticks) for _ in range(args.repeats)]
    print(f"# {args.legs} legs, {args.ticks} ticks x {args.repeats}; µs of CPU per leg and tick (median, min-max)")
    print("| phase | µs per leg-tick |")
    print("|---|---|")
    total = []
    for phase in ("send", "read", "play-out"):
        values = [r[phase] for r in results]
        print(f"| {phase} | {statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f}) |")
    total = [sum(r.values()) for r in results]
    print(f"| all | {statistics.median(total):.2f} ({min(total):.2f}-{max(total):.2f}) |")
    connected = sum(leg.source_filtered for leg in legs)
    print(f"# legs with a connected, source-filtered socket: {connected} of {len(legs)}; "
          f"packets in {sum(leg.packets_in for leg in legs)}, out {sum(leg.packets_out for leg in legs)}")


if __name__ == "__main__":
    main()
