"""N concurrent G.711 RTP legs on one core (issue 4).

Each step starts two processes:

- ``bench/rtp_legs_harness.py`` pinned to one core: N ``RtpLeg``s as the daemon builds them (asyncio
  reactor, one shared 20 ms ``MediaClock``, PCMU answer, a looped tone encoded every tick, inbound
  packets through the jitter buffer and decoded every tick) — no SIP signalling;
- ``bench/rtp_generator.py`` pinned to the other core: sends every leg 20 ms PCMU and records the
  kernel arrival time of every packet the legs send back.

Figures per N: CPU of the harness (% of its core, per leg, microseconds per leg per tick), media clock
ticks that owed more than one frame and re-anchors, outbound packet lateness against each stream's
ideal 20 ms schedule (p50/p99/max), outbound packets missing by sequence number, inbound packets the
legs counted lost.  Steps stop early once a step is clearly overloaded.

Reference in the same run: ``sipp -sn uas -rtp_echo`` (C, one socket, recvfrom + sendto, no codec, no
timers) echoing the same number of 20 ms streams from the same generator: its CPU for the same packet
rate is the floor for "receive and send 50 packets/s per stream" on this machine.  With
``--interleave`` each N's reference runs right after that N's legs, so the two are measured within a
minute of each other on a host whose speed drifts (docs/benchmarks.md, machine C); without it, all
references run after all legs steps, as before.

    .venv/bin/python bench/bench_rtp_legs.py [--legs 100,500,1000] [--seconds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
SIPP = shutil.which("sipp") or "/usr/bin/sipp"
TICKS = os.sysconf("SC_CLK_TCK")


def read_line(proc, prefix: str, timeout: float) -> str:
    """The first stdout line of ``proc`` starting with ``prefix`` (others are echoed to stderr)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(prefix):
            return line[len(prefix):].strip()
        sys.stderr.write(line)
    raise RuntimeError(f"no {prefix!r} line from {proc.args[-5:]} within {timeout:g} s")


NICE = 0  # --nice: scheduling priority of every process the benchmark starts (negative needs root)


def pinned(core: int, argv):
    """``argv`` pinned to ``core`` (taskset) at priority NICE; both exec, so the pid is the program's."""
    return ["nice", "-n", str(NICE), "taskset", "-c", str(core)] + list(argv)


def spawn(core: int, argv):
    return subprocess.Popen(pinned(core, argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, bufsize=1)


def stop(proc):
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def core_seconds(core: int) -> tuple[float, float]:
    """(busy, stolen) seconds of ``core`` since boot: busy is user, nice, system, irq and softirq time
    (anyone's); stolen is what the hypervisor ran elsewhere while this guest wanted the core."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{core} "):
                v = [int(x) for x in line.split()[1:]]
                return (v[0] + v[1] + v[2] + v[5] + v[6]) / TICKS, (v[7] if len(v) > 7 else 0) / TICKS
    return float("nan"), float("nan")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_legs(n, seconds, core, gen_core, base_port):
    gen = harness = None
    try:
        gen = spawn(gen_core, [PY, os.path.join(HERE, "rtp_generator.py")])
        gen_port = int(read_line(gen, "PORT ", 10))
        harness = spawn(core, [PY, os.path.join(HERE, "rtp_legs_harness.py"), "--legs", str(n),
                               "--gen-port", str(gen_port), "--seconds", str(seconds),
                               "--base-port", str(base_port)])
        ports = json.loads(read_line(harness, "LEGS ", 120))
        busy0, stolen0 = core_seconds(core)
        gen.stdin.write(json.dumps({"targets": [["127.0.0.1", p] for p in ports], "seconds": seconds + 1.5,
                                   "skip_seconds": 1.0}) + "\n")
        harness.stdin.write("GO\n")
        h = _read_json_line(harness, seconds + 60)
        busy1, stolen1 = core_seconds(core)
        g = _read_json_line(gen, seconds + 60)
        h["others_pct"] = max(0.0, 100 * (busy1 - busy0 - h["cpu_s"]) / (seconds + 1.0))
        h["stolen_pct"] = 100 * (stolen1 - stolen0) / (seconds + 1.0)
        return h, g
    finally:
        stop(harness)
        stop(gen)


def run_echo(n, seconds, core, gen_core):
    gen = echo = None
    try:
        echo_port = free_udp_port() // 2 * 2
        echo = subprocess.Popen(pinned(core, [SIPP, "-sn", "uas", "-i", "127.0.0.1",
                                 "-p", str(free_udp_port()), "-rtp_echo", "-mp", str(echo_port), "-nostdin",
                                 "-timeout", f"{int(seconds) + 30}s"]),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        gen = spawn(gen_core, [PY, os.path.join(HERE, "rtp_generator.py")])
        read_line(gen, "PORT ", 10)
        gen.stdin.write(json.dumps({"targets": [["127.0.0.1", echo_port]], "streams_per_target": n,
                                    "seconds": seconds}) + "\n")
        time.sleep(1.0)
        c0, t0 = cpu_seconds(echo.pid), time.monotonic()
        time.sleep(seconds - 1.5)
        used, wall = cpu_seconds(echo.pid) - c0, time.monotonic() - t0
        g = _read_json_line(gen, seconds + 60)
        return {"cpu_pct": 100 * used / wall, "cpu_per_leg_pct": 100 * used / wall / n}, g
    finally:
        stop(gen)
        stop(echo)


def _read_json_line(proc, timeout):
    return json.loads("{" + read_line(proc, "{", timeout))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--legs", default="100,500,1000")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--core", type=int, default=0)
    parser.add_argument("--generator-core", type=int, default=1)
    parser.add_argument("--base-port", type=int, default=44000)
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--interleave", action="store_true",
                        help="run each N's sipp reference right after that N's legs (a drifting host)")
    parser.add_argument("--nice", type=int, default=0,
                        help="nice value for the harness, generator and sipp (e.g. -10 on a shared machine)")
    args = parser.parse_args()
    global NICE
    NICE = args.nice
    counts = [int(x) for x in args.legs.split(",")]

    print(f"# harness on core {args.core}, generator/sink on core {args.generator_core}, nice {NICE}; "
          f"{args.seconds:g} s measured per step; PCMU 20 ms both ways")
    print("| legs | harness CPU (% of core) | CPU per leg | µs per leg-tick | late ticks / re-anchors | "
          "tick CPU p50 / p99 ms | out lateness p50 / p99 / max ms | out missing | in lost | core used by others | "
          "generator send p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    done, diagnostics, references = [], [], {}
    for n in counts:
        h, g = run_legs(n, args.seconds, args.core, args.generator_core, args.base_port)
        done.append(n)
        if args.interleave and not args.skip_reference:
            references[n] = run_echo(n, args.seconds, args.core, args.generator_core)
        print(f"| {n} | {h['cpu_pct']:.1f}% | {h['cpu_per_leg_pct']:.3f}% | {h['cpu_us_per_leg_tick']:.1f} | "
              f"{h['late_ticks']} / {h['reanchors']} | {h['tick_cpu_p50_ms']:.2f} / {h['tick_cpu_p99_ms']:.2f} | {g.get('late_p50_ms', float('nan')):.2f} / "
              f"{g.get('late_p99_ms', float('nan')):.2f} / {g.get('late_max_ms', float('nan')):.1f} | "
              f"{g.get('missing', '-')} of {g.get('received', 0)} | {h['inbound_lost']} of {h['packets_in']} | "
              f"{h['others_pct']:.0f}% | {g['send_late_p99_ms']:.2f} |", flush=True)
        diagnostics.append(
            f"# {n} legs: clock wake-up after its deadline p50 / p99 / max {h['wake_late_p50_ms']:.2f} / "
            f"{h['wake_late_p99_ms']:.2f} / {h['wake_late_max_ms']:.1f} ms; tick wall p99 {h['tick_wall_p99_ms']:.2f} ms; "
            f"{h['gc_collections']} GC collections ({h['gc_full_collections']} full), longest {h['gc_pause_max_ms']:.1f} ms; "
            f"inbound frames played a tick late {h['receive_deferred']} "
            f"({100 * h['receive_deferred'] / max(1, h['packets_in']):.3f}%); "
            f"the hypervisor stole {h['stolen_pct']:.1f}% of the harness's core")
        if h["cpu_pct"] > 90 or h["tick_cpu_p50_ms"] > 20:
            print(f"# stopping after {n} legs: the core is saturated (one tick's work does not fit in 20 ms)")
            break
    print("\n".join(diagnostics), flush=True)
    if args.skip_reference:
        return
    print()
    print("# reference: sipp -rtp_echo on the same core, the same streams from the same generator"
          + (", each run right after the same N's legs" if args.interleave else ""))
    print("| streams | sipp CPU (% of core) | CPU per stream | echo lateness p50 / p99 / max ms | missing |")
    print("|---|---|---|---|---|", flush=True)
    for n in done:
        e, g = references[n] if n in references else run_echo(n, args.seconds, args.core, args.generator_core)
        print(f"| {n} | {e['cpu_pct']:.1f}% | {e['cpu_per_leg_pct']:.3f}% | "
              f"{g.get('late_p50_ms', float('nan')):.2f} / {g.get('late_p99_ms', float('nan')):.2f} / "
              f"{g.get('late_max_ms', float('nan')):.1f} | {g.get('missing', '-')} of {g.get('received', 0)} |",
              flush=True)


if __name__ == "__main__":
    main()
