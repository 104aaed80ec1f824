"""Calls per second answered (issue 3): sipp's built-in ``uac`` (INVITE -> 200 -> ACK -> BYE, no
media, zero pause) against the daemon at rising rates, and the same load against sipp's own
built-in ``uas`` in the same run as the reference.

The daemon answers with a playbook route to a minimal playbook (``llm: {provider: echo}``, which
names no speech providers and so gets the defaults by language: a VAD, a recogniser, an end-of-turn
detector and a voice, docs/speech.md), so each call is the real path: SIP transaction + dialog,
handler, session, RTP leg (ports bound, SDP answer, joined to the media clock), speech processors,
playbook runner and its spoken opening line (from the TTS cache), BYE, teardown, CDR written to a
local directory.  The daemon runs pinned to one core (``taskset``),
sipp and this driver on the other.

Figures per rate: calls attempted, answered, failed (sipp), achieved rate (answered calls /
span from the first INVITE to the last 200), INVITE -> 200 OK setup time p50/p99/max from the
kernel timestamps of the packets on ``lo`` (bench/sip_sniffer.py; needs root), INVITE
retransmissions (sipp retransmits after 500 ms without an answer), CPU of the answering
process on its core.  Without root it falls back to sipp's ``-trace_rtt`` (4 ms resolution).

    .venv/bin/python bench/bench_sip_cps.py [--rates 50,100,200,300,400] [--seconds 10]
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

SIPP = shutil.which("sipp") or "/usr/bin/sipp"
BIN = os.path.dirname(sys.executable)
LOCAL = "127.0.0.1"
TICKS = os.sysconf("SC_CLK_TCK")

PLAYBOOK = """---
llm:
  provider: echo
---
Benchmark playbook: answer and wait.
"""


NICE = 0  # --nice: scheduling priority of the daemon, sipp and this driver (negative needs root)


def set_autogroup_nice(nice: int) -> None:
    """With the kernel's autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled``, on in
    Debian), a nice value only ranks processes within their session: each session (another
    engineer's bench, say) gets an equal share of a core whatever its processes' nice.  The
    session's own weight is ``/proc/self/autogroup``; ``--nice`` sets it too (root), so the
    daemon does get the core it is pinned to on a shared machine."""
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(nice))
    except OSError as e:
        print(f"# autogroup nice not set ({e}): other sessions share the daemon's core equally", flush=True)


def warm_tts_cache(work: str, core: int, daemon_port: int, tries: int = 6) -> int:
    """Calls of 3 s until the greeting is in the TTS cache (``cache/tts``); returns the entries.

    The first synthesis loads the voice (piper: seconds on a busy machine); a call that ends before it
    finishes stores nothing (or only its first sentence), and every later (zero-length) call would then
    synthesise again.  So calls are made until one adds no entry."""
    cache = os.path.join(work, "cache", "tts")
    entries = 0
    for attempt in range(tries):
        warm = os.path.join(work, f"warm-up-{attempt}")
        os.makedirs(warm)
        subprocess.call(pinned(core, [SIPP, "-sn", "uac", f"{LOCAL}:{daemon_port}",
                         "-i", LOCAL, "-p", str(free_udp_port()), "-mp", str(free_udp_port()), "-m", "1",
                         "-d", "3000", "-nostdin", "-timeout", "20s"]), cwd=warm,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        before, entries = entries, len(glob.glob(os.path.join(cache, "*.pcm")))
        if entries and entries == before:
            return entries
    return entries


def pinned(core: int, argv):
    """``argv`` pinned to ``core`` (taskset) at priority NICE; both exec, so the pid is the program's."""
    return ["nice", "-n", str(NICE), "taskset", "-c", str(core)] + list(argv)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOCAL, 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (and its reaped children), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / TICKS


def core_busy_seconds(core: int) -> float:
    """Busy (non-idle, non-iowait) time of one CPU core, seconds, from /proc/stat."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{core} "):
                v = [int(x) for x in line.split()[1:]]
                return (sum(v[:8]) - v[3] - v[4]) / TICKS
    return float("nan")


def percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def wait_port_bound(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind((LOCAL, port))
            except OSError:
                return True
        time.sleep(0.05)
    return False


def file_create_cost(directory: str, count: int = 300) -> float:
    """µs of CPU to create (and close) one empty file in ``directory``: a calibration printed with
    the results, since ext4 makes file creation far dearer in block groups with many recently
    deleted inodes (a directory tree test suites keep filling and emptying)."""
    probe = os.path.join(directory, "create-probe")  # left in place: deleting would itself churn the group
    os.makedirs(probe, exist_ok=True)
    start = time.process_time()
    for i in range(count):
        os.close(os.open(os.path.join(probe, str(i)), os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644))
    return (time.process_time() - start) / count * 1e6


def start_daemon(work: str, core: int, log_level: str):
    sip_port = free_udp_port()
    os.makedirs(os.path.join(work, "playbooks"))
    with open(os.path.join(work, "playbooks", "bench.md"), "w") as f:
        f.write(PLAYBOOK)
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        http_port = s.getsockname()[1]
    conf = os.path.join(work, "bench.toml")
    with open(conf, "w") as f:
        f.write(f'''
addr = "{LOCAL}"
udp_port = {sip_port}
tcp_port = 0
http_addr = "{LOCAL}:{http_port}"
rtp_start_port = 20000
rtp_end_port = 40000
media_cache_path = "{work}/cache"
playbook_dir = "{work}/playbooks"
log_level = "{log_level}"
graceful_shutdown_timeout = "2s"
[recording]
enabled = false
[callrecord]
type = "local"
root = "{work}/cdr"
[handler]
type = "playbook"
default = "bench.md"
''')
    log = open(os.path.join(work, "daemon.log"), "w")
    proc = subprocess.Popen(pinned(core, [os.path.join(BIN, "twistd"), "--nodaemon",
                             "--pidfile=", "--reactor=asyncio", "activecall", "--conf", conf]),
                            stdout=log, stderr=subprocess.STDOUT, cwd=work)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with open(os.path.join(work, "daemon.log")) as f:
            if "activecall ready" in f.read():
                return proc, sip_port
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    with open(os.path.join(work, "daemon.log")) as f:
        tail = f.read()[-3000:]
    proc.kill()
    raise SystemExit(f"the daemon did not start:\n{tail}")


def start_sipp_uas(work: str, core: int):
    port = free_udp_port()
    out = open(os.path.join(work, "uas.out"), "w")
    proc = subprocess.Popen(pinned(core, [SIPP, "-sn", "uas", "-i", LOCAL, "-p", str(port),
                             "-mp", str(free_udp_port()), "-nostdin", "-timeout", "3600s"]),
                            stdout=out, stderr=subprocess.STDOUT, cwd=work)
    if not wait_port_bound(port, 10):
        proc.kill()
        raise SystemExit("sipp uas did not bind its port")
    return proc, port


def sipp_final_stats(path: str) -> dict:
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter=";"))
    return dict(zip(rows[0], rows[-1])) if len(rows) > 1 else {}


def sipp_error(work, label, rate) -> str:
    """The last meaningful line of a step's sipp output."""
    try:
        with open(os.path.join(work, f"{label}-{rate}", "sipp.out"), errors="replace") as f:
            lines = [line.strip() for line in f if line.strip() and not line.startswith(("-", "  "))]
    except OSError as e:
        return str(e)
    return lines[-1][:200] if lines else "no output"


def run_rate(work, label, target_port, target_pid, target_core, rate, seconds, core, sniffer, attempt=1):
    calls = int(rate * seconds)
    run_dir = os.path.join(work, f"{label}-{rate}" + (f"-{attempt}" if attempt > 1 else ""))
    os.makedirs(run_dir)
    if sniffer is not None:
        sniffer.reset()
    cpu0, busy0, t0 = cpu_seconds(target_pid), core_busy_seconds(target_core), time.monotonic()
    argv = pinned(core, [SIPP, "-sn", "uac", f"{LOCAL}:{target_port}", "-i", LOCAL,
            "-p", str(free_udp_port()), "-mp", str(free_udp_port()), "-r", str(rate), "-m", str(calls),
            "-l", "20000", "-nostdin", "-timeout", f"{seconds + 30}s", "-recv_timeout", "10s",
            "-timer_resol", "1", "-trace_stat", "-fd", "1", "-trace_rtt", "-rtt_freq", "1", "-trace_err"])
    with open(os.path.join(run_dir, "sipp.out"), "w") as out:
        code = subprocess.call(argv, stdout=out, stderr=subprocess.STDOUT, cwd=run_dir)
    wall, cpu = time.monotonic() - t0, cpu_seconds(target_pid) - cpu0
    others = core_busy_seconds(target_core) - busy0 - cpu
    time.sleep(0.5)  # the last 200s/BYEs have crossed lo; let the answerer finish teardown
    stats_files = [p for p in glob.glob(os.path.join(run_dir, "uac_*_.csv"))]
    stats = sipp_final_stats(stats_files[0]) if stats_files else {}
    rtt = []
    for p in glob.glob(os.path.join(run_dir, "uac_*_rtt.csv")):
        with open(p) as f:
            rtt += [float(line.split(";")[1]) / 1000 for line in f.readlines()[1:] if line.strip()]
    if sniffer is not None:
        setup = sniffer.setup_times()
        starts = list(sniffer.invites.values())
        ends = list(sniffer.oks.values())
        span = (max(ends) - min(starts)) if starts and ends else float("nan")
        answered, retrans = len(setup), sniffer.invite_retransmissions
        source = "lo"
    else:
        setup, answered, retrans, source = rtt, len(rtt), None, "sipp"
        span = seconds
    return {
        "label": label, "rate": rate, "calls": calls, "answered": answered,
        "successful": int(stats.get("SuccessfulCall(C)", 0) or 0),
        "failed": int(stats.get("FailedCall(C)", 0) or 0),
        "achieved": answered / span if span and span == span else float("nan"),
        "p50": percentile(setup, 50) * 1000, "p99": percentile(setup, 99) * 1000,
        "max": (max(setup) * 1000) if setup else float("nan"),
        "sipp_p99": percentile(rtt, 99) * 1000, "retrans": retrans,
        "cpu": 100 * cpu / wall, "others": 100 * max(0.0, others) / wall,
        "cpu_per_call": 1000 * cpu / answered if answered else float("nan"),
        "exit": code, "source": source,
    }


def print_row(r):
    retrans = "-" if r["retrans"] is None else str(r["retrans"])
    print(f"| {r['label']} | {r['rate']} | {r['calls']} | {r['successful']} | {r['failed']} | "
          f"{r['achieved']:.1f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['max']:.1f} | {r['sipp_p99']:.0f} | "
          f"{retrans} | {r['cpu']:.0f}% | {r['cpu_per_call']:.2f} | {r['others']:.0f}% |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="50,100,200,300,400")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each step")
    parser.add_argument("--daemon-core", type=int, default=0)
    parser.add_argument("--sipp-core", type=int, default=1)
    parser.add_argument("--log-level", default="info", help="the daemon's log_level (default: info, as shipped)")
    parser.add_argument("--cold-tts", action="store_true",
                        help="skip the warm-up call that fills the TTS cache (every call then spawns flite)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--work-parent", default=None,
                        help="where the work directory (CDRs, event journals) is made; default: the "
                             "system temp directory. /dev/shm (tmpfs) takes the disk out of the figures")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--nice", type=int, default=0,
                        help="nice value for the daemon, sipp and this driver (e.g. -10 on a shared machine)")
    args = parser.parse_args()
    global NICE
    NICE = args.nice
    if NICE:
        os.nice(NICE - os.nice(0))
        set_autogroup_nice(NICE)
    rates = [int(r) for r in args.rates.split(",")]
    os.sched_setaffinity(0, {args.sipp_core})

    work = tempfile.mkdtemp(prefix="bench-sip-cps-", dir=args.work_parent)
    create_cost = file_create_cost(work)
    procs = []
    sniffer = None
    try:
        daemon, daemon_port = start_daemon(work, args.daemon_core, args.log_level)
        procs.append(daemon)
        targets = [("activecall", daemon, daemon_port)]
        if not args.skip_reference:
            uas, uas_port = start_sipp_uas(work, args.daemon_core)
            procs.append(uas)
            targets.append(("sipp uas", uas, uas_port))
        # one 3 s call first (more if it ends before the synthesis does): the echo playbook's
        # opening lines go through the TTS once and land in the TTS cache; later (zero-length)
        # calls hit the cache, as in a long-running daemon.  Without it every call spawns the
        # voice's process (flite, espeak-ng for piper; see docs/benchmarks.md).
        if not args.cold_tts:
            entries = warm_tts_cache(work, args.sipp_core, daemon_port)
            print(f"# TTS cache warmed: {entries} prompt(s)" if entries else
                  "# the TTS cache stayed empty after 6 warm-up calls: every call synthesises (cold)", flush=True)
        try:
            from sip_sniffer import SipSniffer
        except ImportError:
            SipSniffer = None
        print(f"# work directory {work}: creating a file there costs {create_cost:.0f} us of CPU "
              "(each call creates two: its CDR and its event journal; ext4 charges far more right "
              "after many files were deleted, e.g. by a test suite or an earlier bench)", flush=True)
        print(f"# sipp uac (core {args.sipp_core}) -> answerer (core {args.daemon_core}); "
              f"{args.seconds:g} s per step; nice {NICE}; setup = INVITE -> 200 OK", flush=True)
        print("| answerer | target cps | calls | successful | failed | achieved cps | setup p50 ms | "
              "setup p99 ms | setup max ms | sipp rtt p99 ms | INVITE retrans | answerer CPU | CPU ms/call | "
              "core used by others |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
        results = []
        for label, proc, port in targets:
            sniffer = None
            if SipSniffer is not None:
                try:
                    sniffer = SipSniffer(port)
                    sniffer.start()
                except PermissionError:
                    print("# no CAP_NET_RAW: setup times from sipp -trace_rtt (4 ms steps)")
                    sniffer = None
            for rate in rates:
                r = run_rate(work, label, port, proc.pid, args.daemon_core, rate, args.seconds, args.sipp_core, sniffer)
                if not r["successful"] and not r["failed"]:
                    # sipp's uac did not run at all (seen twice in ~30 steps: one of the ports picked
                    # for it was taken by then); say why, then run the step again once
                    print(f"# {label} at {rate} cps: sipp uac exited {r['exit']} without making a call "
                          f"({sipp_error(work, label, rate)}); running the step again", flush=True)
                    r = run_rate(work, label, port, proc.pid, args.daemon_core, rate, args.seconds, args.sipp_core,
                                 sniffer, attempt=2)
                results.append(r)
                print_row(r)
                time.sleep(2)
            if sniffer is not None:
                sniffer.stop()
                sniffer = None
            if proc is daemon:
                # past saturation the daemon works off its backlog (retransmissions, stuck calls) for
                # seconds; stopped now, it does not take the reference's core during its first step
                daemon.terminate()
                try:
                    daemon.wait(30)
                except subprocess.TimeoutExpired:
                    daemon.kill()
        if args.keep:
            print(f"# work directory kept: {work}")
    finally:
        if sniffer is not None:
            try:
                sniffer.stop()
            except Exception as e:  # never leave the daemon or sipp running
                print(f"# sniffer did not stop cleanly: {e}")
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
