"""N RTP legs in one process, as the daemon runs them, for bench/bench_rtp_legs.py.

The asyncio reactor (the daemon's), one shared ``MediaClock``, ``N`` ``activecall.media.rtp_leg.RtpLeg``s
bound from a ``PortPool`` on 127.0.0.1, each answering a PCMU offer that points at the generator's
port.  Each leg's session is a stand-in that returns a looped 16 kHz tone frame per tick (so every
tick encodes: resample to 8 kHz + u-law) and drops what the leg decodes (no VAD/ASR).  No SIP.

    rtp_legs_harness.py --legs N --gen-port P --seconds S --base-port B

Prints ``LEGS [ports]`` once the legs are bound and answered, waits for ``GO`` on stdin, starts
every leg, lets 1 s pass, then measures CPU (getrusage of this process) over ``S`` seconds and
prints one JSON line: CPU seconds, CPU per leg, media clock late ticks / re-anchors, packets in/out.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time

from twisted.internet import asyncioreactor

asyncioreactor.install()

import numpy as np  # noqa: E402
from twisted.internet import reactor, task, threads  # noqa: E402

from activecall.media.clock import MediaClock  # noqa: E402
from activecall.media.rtp import PortPool  # noqa: E402
from activecall.media.rtp_leg import RtpLeg  # noqa: E402
from activecall.media.rtp_ticker import RtpTicker  # noqa: E402
from activecall.service import tune_gc_for_daemon  # noqa: E402
from rtp_fixtures import ToneSession, offer  # noqa: E402  (bench/, the script's own folder)

WARMUP = 1.0


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--legs", type=int, required=True)
    p.add_argument("--gen-port", type=int, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--base-port", type=int, default=44000)
    args = p.parse_args()

    result = {}
    tune_gc_for_daemon()  # as the daemon once started: calls (here, the legs) come after it
    clock = MediaClock(reactor)
    tick_cpu, tick_wall, wake_late, gc_pauses = [], [], [], []
    inner_tick = clock._tick

    def timed_tick():  # CPU and wall time of each wake-up of the shared clock (all legs, owed frames)
        c, w = time.thread_time(), time.perf_counter()
        due = clock._start + (clock.ticks + 1) * clock.interval  # this wake-up's deadline
        late = reactor.seconds() - due
        inner_tick()
        if "t0" in result:
            tick_cpu.append(time.thread_time() - c)
            tick_wall.append(time.perf_counter() - w)
            wake_late.append(late)

    gc_started = []

    def on_gc(phase, info):  # how long the collector held the thread (a pause delays the next tick)
        if phase == "start":
            gc_started[:] = [time.perf_counter()]
        elif gc_started and "t0" in result:
            gc_pauses.append((info["generation"], time.perf_counter() - gc_started[0]))

    gc.callbacks.append(on_gc)

    clock._tick = timed_tick
    pool = PortPool(reactor, args.base_port, args.base_port + 4 * args.legs + 200, interface="127.0.0.1")
    sessions = [ToneSession(f"leg{i}") for i in range(args.legs)]
    legs = []
    for s in sessions:
        leg = RtpLeg(s, clock, reactor, host="127.0.0.1", codecs=("pcmu",))
        leg.allocate(pool)
        leg.answer(offer(args.gen_port))
        legs.append(leg)
    ticker = RtpTicker.of(clock, reactor)
    print("LEGS " + json.dumps([leg.local_port for leg in legs]), flush=True)

    def go(_line):
        for leg in legs:
            leg.start()
        reactor.callLater(WARMUP, begin)

    def begin():
        result["cpu0"], result["t0"] = cpu(), time.monotonic()
        result["ticks0"], result["late0"], result["re0"] = clock.ticks, clock.late_ticks, clock.reanchors
        result["deferred0"] = ticker.receive_deferred
        result["in0"] = sum(leg.packets_in for leg in legs)
        result["out0"] = sum(leg.packets_out for leg in legs)
        reactor.callLater(args.seconds, finish)

    def finish():
        used, wall = cpu() - result["cpu0"], time.monotonic() - result["t0"]
        out = {
            "legs": args.legs, "wall_s": wall, "cpu_s": used, "cpu_pct": 100 * used / wall,
            "cpu_per_leg_pct": 100 * used / wall / args.legs,
            "cpu_us_per_leg_tick": 1e6 * used / (args.legs * wall / 0.020),
            "clock_ticks": clock.ticks - result["ticks0"], "late_ticks": clock.late_ticks - result["late0"],
            "reanchors": clock.reanchors - result["re0"],
            "packets_in": sum(leg.packets_in for leg in legs) - result["in0"],
            "packets_out": sum(leg.packets_out for leg in legs) - result["out0"],
            "inbound_lost": sum(max(0, leg.stats.lost) for leg in legs if leg.stats is not None),
            "tick_cpu_p50_ms": 1000 * float(np.percentile(tick_cpu, 50)) if tick_cpu else None,
            "tick_cpu_p99_ms": 1000 * float(np.percentile(tick_cpu, 99)) if tick_cpu else None,
            "tick_wall_p99_ms": 1000 * float(np.percentile(tick_wall, 99)) if tick_wall else None,
            "wake_late_p50_ms": 1000 * float(np.percentile(wake_late, 50)) if wake_late else None,
            "wake_late_p99_ms": 1000 * float(np.percentile(wake_late, 99)) if wake_late else None,
            "wake_late_max_ms": 1000 * max(wake_late) if wake_late else None,
            "receive_deferred": ticker.receive_deferred - result["deferred0"],
            "gc_collections": len(gc_pauses),
            "gc_full_collections": sum(1 for g, _ in gc_pauses if g == 2),
            "gc_pause_max_ms": 1000 * max((t for _, t in gc_pauses), default=0.0),
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        d = task.deferLater(reactor, 0, lambda: None)
        for leg in legs:
            d.addCallback(lambda _, leg=leg: leg.close())
        d.addBoth(lambda _: (print(json.dumps(out), flush=True), reactor.stop()))

    threads.deferToThread(sys.stdin.readline).addCallback(go)
    reactor.callLater(args.seconds + 120, reactor.stop)  # never outlive a lost driver
    reactor.run()
    os._exit(0)


if __name__ == "__main__":
    main()
