"""Soak (issue 23): call churn for a long time, watching what must not grow.

A daemon started here (``twistd -n activecall``, a temporary config) answers every SIP call with a
playbook that runs silero VAD (``llm: echo``, no ASR: the recogniser's worker processes would need
more than the two cores this was written for).  sipp calls it ``--calls`` at a time: each call
streams a flite sentence and silence in a loop as PCMU RTP (``rtp_stream``), so the VAD finds
speech and silence all the time, for ``--call-seconds``, then hangs up; a new call takes its place.
Beside them ``--ws-calls`` WebSocket ``/call`` sessions do the same with 16 kHz PCM (the same
playbook), each reconnecting when its call ends.

Every ``--interval`` seconds (default 60) one line: the daemon's RSS, open file descriptors, UDP
sockets it holds, and from ``/health``: live calls, RTP port pairs in use, legs on the media clock,
pending reactor timers.  At the end: the slope of RSS (MB/hour) and fds (per hour) by least squares
over the samples under full load (the ramp-up excluded), memory per live call (RSS under load minus
RSS idle after the warm-up call, per live call), idle RSS before and after, and whether every
call's legs, ports, fds and timers went back to their idle values once the last call ended.

    PYTHONPATH=src .venv/bin/python bench/bench_soak.py [--duration 3600] [--calls 100] [--ws-calls 10]
        [--call-seconds 20] [--interval 60] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "src"))

from twisted.internet import asyncioreactor  # noqa: E402

asyncioreactor.install()

import treq  # noqa: E402
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol  # noqa: E402
from twisted.internet import defer, reactor, task  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint  # noqa: E402

from activecall.audio import FRAME_BYTES  # noqa: E402
from activecall.speech.testing import synthesize_pcm  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from turn_sip import write_ulaw_wav  # noqa: E402

SIPP = shutil.which("sipp") or "/usr/bin/sipp"
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
LOCAL = "127.0.0.1"
SENTENCE = "Hello, I would like to know when my parcel will arrive, please."

PLAYBOOK = """---
vad:
  type: silero
asr:
  provider: none
llm:
  provider: echo
---
Soak playbook: listen (VAD) and answer nothing.
"""

# one call: INVITE, the sentence looped as PCMU until the pause ends, BYE (shared with turn_sip.py)
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "sipp_looping_caller.xml")) as _f:
    SCENARIO = _f.read()


def free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((LOCAL, 0))
        return s.getsockname()[1]


def sleep(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


# -- what is measured ---------------------------------------------------------------------------

def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def fd_inodes(pid: int) -> tuple[int, set]:
    """Open fds of ``pid`` and the inodes of its sockets."""
    fds, inodes = 0, set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        fds += 1
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return fds, inodes


def udp_sockets(pid: int, inodes: set) -> int:
    """UDP sockets (v4 and v6) among ``inodes``."""
    n = 0
    for table in ("udp", "udp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f)
                n += sum(1 for line in f if line.split()[9] in inodes)
        except OSError:
            pass
    return n


@defer.inlineCallbacks
def sample(pid: int, http_port: int, t0: float) -> dict:
    response = yield treq.get(f"http://{LOCAL}:{http_port}/health", persistent=False)
    health = yield response.json()
    fds, inodes = fd_inodes(pid)
    return {
        "t": time.monotonic() - t0, "rss_mb": rss_mb(pid), "fds": fds, "udp": udp_sockets(pid, inodes),
        "calls": health["active_calls"], "rtp_ports": health.get("rtp_ports_in_use"),
        "legs": health.get("media_clock_legs"), "timers": health.get("reactor_timers"),
    }


def print_sample(s: dict, label: str = "") -> None:
    print(f"| {s['t'] / 60:6.1f} | {s['rss_mb']:7.1f} | {s['fds']:5d} | {s['udp']:5d} | {s['calls']:5d} | "
          f"{s['rtp_ports']} | {s['legs']} | {s['timers']} | {label} |", flush=True)


def slope_per_hour(samples, key) -> float:
    """Least-squares slope of ``key`` against time, per hour."""
    if len(samples) < 2:
        return float("nan")
    t = np.array([s["t"] for s in samples]) / 3600.0
    y = np.array([s[key] for s in samples], dtype=float)
    return float(np.polyfit(t, y, 1)[0])


# -- the load ------------------------------------------------------------------------------------

class WsClient(WebSocketClientProtocol):
    def onOpen(self):
        self.factory.opened.callback(self)

    def onMessage(self, payload, isBinary):
        if not isBinary:
            event = json.loads(payload)
            if event.get("event") == "answer" and not self.factory.answered.called:
                self.factory.answered.callback(event)
            elif event.get("event") == "hangup":
                self.factory.hungup = True

    def onClose(self, wasClean, code, reason):
        if not self.factory.closed.called:
            self.factory.closed.callback(code)
        if not self.factory.opened.called:
            self.factory.opened.errback(RuntimeError(f"closed before open: {reason}"))


class WsFactory(WebSocketClientFactory):
    protocol = WsClient

    def __init__(self, url):
        super().__init__(url)
        self.opened, self.answered, self.closed = defer.Deferred(), defer.Deferred(), defer.Deferred()
        self.hungup = False


class WsLoad:
    """``n`` WebSocket callers, each one call after another until ``stop``."""

    def __init__(self, http_port: int, pcm16k: np.ndarray, call_seconds: float):
        self.http_port = http_port
        self.frames = [pcm16k[i:i + FRAME_BYTES // 2].tobytes() for i in range(0, pcm16k.size - 319, 320)]
        self.call_seconds = call_seconds
        self.running = True
        self.done = self.failed = 0
        self.last_error = ""
        self.callers: list = []

    def start(self, n: int) -> None:
        self.callers = [self.caller(i) for i in range(n)]

    def stop(self) -> defer.Deferred:
        self.running = False
        return defer.DeferredList(self.callers)

    @defer.inlineCallbacks
    def caller(self, i: int):
        yield sleep(i * 0.3)  # spread the starts
        n = 0
        while self.running:
            n += 1
            try:
                yield self.one_call(f"soak-ws-{i}-{n}")
                self.done += 1
            except Exception as e:  # a failed call is counted, the caller goes on
                self.failed += 1
                self.last_error = repr(e)[:200]
                yield sleep(1.0)

    @defer.inlineCallbacks
    def one_call(self, call_id: str):
        factory = WsFactory(f"ws://{LOCAL}:{self.http_port}/call?id={call_id}")
        proto = yield TCP4ClientEndpoint(reactor, LOCAL, self.http_port, timeout=10).connect(factory)
        try:
            yield factory.opened.addTimeout(10, reactor)
            proto.sendMessage(json.dumps({"command": "invite",
                                          "option": {"codec": "pcm", "playbook": "soak.md"}}).encode())
            yield factory.answered.addTimeout(20, reactor)
            start, k = reactor.seconds(), 0
            while reactor.seconds() - start < self.call_seconds and not factory.hungup and self.running:
                # frames on absolute 20 ms deadlines (a late wake-up sends what is due at once)
                due = int((reactor.seconds() - start) / 0.02) + 1
                while k < due:
                    proto.sendMessage(self.frames[k % len(self.frames)], isBinary=True)
                    k += 1
                yield sleep(0.02)
            if not factory.hungup:
                proto.sendMessage(json.dumps({"command": "hangup"}).encode())
            yield factory.closed.addTimeout(10, reactor)
        finally:
            if proto.transport is not None and proto.transport.connected:
                proto.transport.loseConnection()


def start_daemon(work: str, call_seconds: float, recording: bool):
    sip_port, http_port = free_port(socket.SOCK_DGRAM), free_port()
    os.makedirs(os.path.join(work, "playbooks"))
    with open(os.path.join(work, "playbooks", "soak.md"), "w") as f:
        f.write(PLAYBOOK)
    conf = os.path.join(work, "soak.toml")
    with open(conf, "w") as f:
        f.write(f'''
addr = "{LOCAL}"
udp_port = {sip_port}
tcp_port = 0
http_addr = "{LOCAL}:{http_port}"
rtp_start_port = 30000
rtp_end_port = 40000
media_cache_path = "{work}/cache"
playbook_dir = "{work}/playbooks"
log_level = "warn"
graceful_shutdown_timeout = "{int(call_seconds) + 10}s"
[recording]
enabled = {"true" if recording else "false"}
path = "{work}/rec"
[callrecord]
type = "local"
root = "{work}/cdr"
[handler]
type = "playbook"
default = "soak.md"
''')
    log = open(os.path.join(work, "daemon.log"), "w")
    proc = subprocess.Popen([TWISTD, "--nodaemon", "--pidfile=", "--reactor=asyncio", "activecall",
                             "--conf", conf], stdout=log, stderr=subprocess.STDOUT, cwd=work)
    return proc, sip_port, http_port


@defer.inlineCallbacks
def wait_ready(proc, work: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        response = None
        try:
            with open(os.path.join(work, "soak.toml")) as f:
                port = int(f.read().split('http_addr = "127.0.0.1:')[1].split('"')[0])
            response = yield treq.get(f"http://{LOCAL}:{port}/health", persistent=False)
        except Exception:
            pass
        if response is not None and response.code == 200:
            yield response.content()
            return
        yield sleep(0.2)
    with open(os.path.join(work, "daemon.log")) as f:
        tail = f.read()[-3000:]
    raise RuntimeError(f"the daemon did not start:\n{tail}")


def sipp_uac(work: str, sip_port: int, scenario: str, calls: int, rate: float, total: int, name: str):
    out = open(os.path.join(work, f"{name}.out"), "w")
    argv = [SIPP, f"{LOCAL}:{sip_port}", "-sf", scenario, "-i", LOCAL, "-p", str(free_port(socket.SOCK_DGRAM)),
            "-mp", str(free_port(socket.SOCK_DGRAM) // 2 * 2), "-l", str(calls), "-r", str(rate),
            "-rp", "1000", "-m", str(total), "-nostdin", "-recv_timeout", "30s", "-trace_stat",
            "-stf", os.path.join(work, f"{name}.csv"), "-fd", "10", "-trace_err",
            "-error_file", os.path.join(work, f"{name}-errors.log")]
    return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=work)


def sipp_counts(work: str, name: str) -> tuple[int, int]:
    try:
        with open(os.path.join(work, f"{name}.csv")) as f:
            rows = [line.rstrip("\n").split(";") for line in f if line.strip()]
        last = dict(zip(rows[0], rows[-1]))
        return int(last.get("SuccessfulCall(C)", 0)), int(last.get("FailedCall(C)", 0))
    except (OSError, IndexError, ValueError):
        return 0, 0


@defer.inlineCallbacks
def wait_idle(pid: int, http_port: int, t0: float, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = yield sample(pid, http_port, t0)
        if (s["calls"], s["legs"], s["rtp_ports"]) == (0, 0, 0) or time.monotonic() > deadline:
            return s
        yield sleep(1.0)


@defer.inlineCallbacks
def run(args):
    work = tempfile.mkdtemp(prefix="bench-soak-", dir=args.work_parent)
    daemon = sipp_proc = None
    procs = []
    try:
        speech = yield synthesize_pcm(SENTENCE)
        # the sentence, 1.5 s of silence: the VAD sees speech start and end every few seconds
        looped = np.concatenate([speech, np.zeros(24000, np.int16)])
        wav = os.path.join(work, "speech.wav")
        write_ulaw_wav(wav, looped)
        scenario = os.path.join(work, "soak.xml")
        with open(scenario, "w") as f:
            f.write(SCENARIO.replace("{WAV}", wav).replace("{CALL_MS}", str(int(args.call_seconds * 1000))))

        daemon, sip_port, http_port = start_daemon(work, args.call_seconds, args.recording)
        procs.append(daemon)
        yield wait_ready(daemon, work)
        t0 = time.monotonic()
        idle0 = yield sample(daemon.pid, http_port, t0)
        # one SIP and one WebSocket call first: the models load, the TTS cache fills
        warm = sipp_uac(work, sip_port, scenario, 1, 1, 1, "warm-up")
        procs.append(warm)
        ws = WsLoad(http_port, looped, min(args.call_seconds, 5.0))
        ws.start(1 if args.ws_calls else 0)
        while warm.poll() is None:
            yield sleep(0.5)
        ws.running = False
        yield ws.stop()
        idle1 = yield wait_idle(daemon.pid, http_port, t0, 30)
        print(f"# bench_soak: {args.calls} SIP calls (sipp, PCMU RTP, silero VAD) + {args.ws_calls} WebSocket "
              f"calls at a time, {args.call_seconds:g} s each, for {args.duration:g} s; daemon pid {daemon.pid}; "
              f"work {work}", flush=True)
        print(f"# idle RSS after start-up {idle0['rss_mb']:.1f} MB, after the warm-up calls {idle1['rss_mb']:.1f} MB "
              f"(fds {idle1['fds']}, UDP sockets {idle1['udp']}, timers {idle1['timers']})", flush=True)
        print("| min | RSS MB | fds | UDP sockets | live calls | RTP port pairs | clock legs | reactor timers | |")
        print("|---|---|---|---|---|---|---|---|---|", flush=True)

        rate = args.calls / args.call_seconds
        total = max(args.calls, int(args.duration * rate))
        t_load = time.monotonic()
        sipp_proc = sipp_uac(work, sip_port, scenario, args.calls, round(rate, 3), total, "soak")
        procs.append(sipp_proc)
        ws = WsLoad(http_port, looped, args.call_seconds)
        ws.start(args.ws_calls)
        loaded = []  # samples under full load: after one call length of ramp-up
        next_sample = t_load + args.interval
        while time.monotonic() - t_load < args.duration and sipp_proc.poll() is None:
            yield sleep(max(0.0, min(next_sample, t_load + args.duration) - time.monotonic()))
            if time.monotonic() < next_sample:
                continue
            next_sample += args.interval
            s = yield sample(daemon.pid, http_port, t_load)
            ok, failed = sipp_counts(work, "soak")
            label = f"sip {ok} ok / {failed} failed, ws {ws.done} ok / {ws.failed} failed"
            if s["t"] >= args.call_seconds * 1.5:
                loaded.append(s)
            print_sample(s, label)
        # the end: no new calls; those in progress finish
        if sipp_proc.poll() is None:
            sipp_proc.send_signal(signal.SIGUSR1)  # sipp: place no new call, exit when the last ends
        yield ws.stop()
        deadline = time.monotonic() + args.call_seconds + 30
        while sipp_proc.poll() is None and time.monotonic() < deadline:
            yield sleep(0.5)
        if sipp_proc.poll() is None:
            sipp_proc.terminate()
        end = yield wait_idle(daemon.pid, http_port, t_load, 30)
        yield sleep(2.0)  # teardown timers (e.g. SIP transaction lingering) run out
        end = yield sample(daemon.pid, http_port, t_load)
        print_sample(end, "all calls ended")
        ok, failed = sipp_counts(work, "soak")
        print(f"# SIP calls: {ok} successful, {failed} failed; WebSocket calls: {ws.done} done, {ws.failed} failed"
              + (f" (last error {ws.last_error})" if ws.failed else ""), flush=True)
        if loaded:
            live = np.mean([s["calls"] for s in loaded])
            mean_rss = np.mean([s["rss_mb"] for s in loaded])
            print(f"# under load ({len(loaded)} samples from {loaded[0]['t'] / 60:.1f} min): "
                  f"RSS slope {slope_per_hour(loaded, 'rss_mb'):+.1f} MB/hour, "
                  f"fds slope {slope_per_hour(loaded, 'fds'):+.1f} /hour, "
                  f"UDP sockets slope {slope_per_hour(loaded, 'udp'):+.1f} /hour, "
                  f"timers slope {slope_per_hour(loaded, 'timers'):+.1f} /hour", flush=True)
            late = loaded[len(loaded) // 2:]
            if len(late) >= 2:  # past the ramp to the allocator's working set (see docs/benchmarks.md)
                print(f"# second half ({len(late)} samples from {late[0]['t'] / 60:.1f} min): "
                      f"RSS slope {slope_per_hour(late, 'rss_mb'):+.1f} MB/hour, "
                      f"fds slope {slope_per_hour(late, 'fds'):+.1f} /hour, "
                      f"UDP sockets slope {slope_per_hour(late, 'udp'):+.1f} /hour", flush=True)
            print(f"# memory per live call: ({mean_rss:.1f} - {idle1['rss_mb']:.1f}) MB / {live:.1f} calls = "
                  f"{(mean_rss - idle1['rss_mb']) / live * 1024:.0f} KB", flush=True)
        print(f"# idle RSS: {idle1['rss_mb']:.1f} MB after the warm-up, {end['rss_mb']:.1f} MB once the last "
              f"call ended ({end['rss_mb'] - idle1['rss_mb']:+.1f} MB)", flush=True)
        back = {k: (idle1[k], end[k]) for k in ("fds", "udp", "calls", "rtp_ports", "legs", "timers")}
        print("# back to idle: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in back.items())
              + ("" if all(a == b for a, b in back.values()) else "  <-- NOT all back"), flush=True)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
        if args.keep:
            print(f"# work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=3600.0, help="seconds of churn (default 3600)")
    parser.add_argument("--calls", type=int, default=100, help="concurrent SIP calls (default 100)")
    parser.add_argument("--ws-calls", type=int, default=10, help="concurrent WebSocket /call sessions (default 10)")
    parser.add_argument("--call-seconds", type=float, default=20.0, help="length of each call (default 20)")
    parser.add_argument("--interval", type=float, default=60.0, help="seconds between samples (default 60)")
    parser.add_argument("--recording", action="store_true",
                        help="record every call (WAV files: ~1.3 MB per 20 s call, left in the work directory)")
    parser.add_argument("--work-parent", default=None, help="where the work directory is made (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    failure = []

    def done(result):
        if isinstance(result, Exception) or hasattr(result, "getTraceback"):
            failure.append(result)
            print(result.getTraceback() if hasattr(result, "getTraceback") else result, file=sys.stderr)
        reactor.stop()

    reactor.callWhenRunning(lambda: run(args).addBoth(done))
    reactor.run()
    sys.exit(1 if failure else 0)


if __name__ == "__main__":
    main()
