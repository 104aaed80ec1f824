"""Voice-to-voice turn latency (issue 20): real turns against a daemon started here.

The daemon (``twistd -n activecall``, a temporary config and playbook) runs a playbook whose LLM
is a local OpenAI-compatible streaming server in this process answering a short line after
``--llm-delay-ms`` (first token; the rest follows at once).  A ``/call`` WebSocket client speaks
fixed sentences synthesised by flite (16 kHz PCM sent on absolute 20 ms deadlines from one clock,
silence between turns, never faster than real time) and measures, on its own clock:

- the end of the caller's speech: when the frame holding the clip's last voiced sample (|x| > 300)
  was sent;
- the first reply audio: the first binary frame received after it holding an audible sample
  (|x| > 300, the same level as the caller's speech end; a synthesiser's faint lead-in does not count).

Voice to voice = the difference.  The playbook has no greeting, so the model speaks first: the first
turn starts 1 s after that opening line has played out, each turn after the previous clip was sent in
full, and only audio received after the caller's speech ended counts as the reply.  (The bench once
began speaking while the opening line still played: its audio was taken for turn 0's reply, turn 0
was scored "no reply" and turn 1's clip overwrote the rest of turn 0's, so the daemon heard one
spliced utterance; a warm-up turn hid this.  The daemon lost nothing.)

The breakdown comes from the daemon's ``metrics`` event ``turn.latency`` (call/turn_timing.py: every
stage from the end of speech as the daemon's VAD saw it): end-of-turn wait (→ ``eou``), ASR final
(→ ``asrFinal``), LLM first token (request sent → first token), TTS first audio (first token → first
samples), and the daemon's overhead = voice to voice − those four (dispatch from ``asrFinal`` to the
LLM request, from TTS samples to the wire, the socket both ways).

Configurations (``--config``): ``defaults`` (the playbook names no speech providers, so it runs
what a fresh install ships for English: silero VAD, whisper, Smart Turn, piper; docs/speech.md);
``offline`` (silero VAD, pocketsphinx, Smart Turn, flite: the defaults before issue 22); ``openai`` (the ``openai`` ASR provider against a local OpenAI-compatible
``/v1/audio/transcriptions`` here answering the sentence after ``--asr-delay-ms``); ``cloud`` (the
same, and the ``openai`` TTS provider against a local ``/v1/audio/speech`` streaming 24 kHz PCM, its
first chunk after ``--tts-delay-ms``: every provider speaks its cloud protocol, served here).

Transports (``--transport``): ``ws`` (``/call``, 16 kHz PCM) and ``sip`` (the bench dials the daemon
with a user agent of this package, PCMU over RTP on loopback; the daemon answers with the playbook;
the breakdown is read from the call's event dump; bench/turn_sip.py).

Capacity (``--load 0,50,100``, SIP): for each N a fresh daemon holds N background conversations from
sipp (each streams a sentence then 4 s of silence, in a loop, so every leg runs VAD and end of turn
and takes a turn every ~6.5 s) while the bench's own call measures its turns; the daemon's CPU (from
/proc) over the measured window gives the cost per conversation.

    PYTHONPATH=src .venv/bin/python bench/bench_turn_latency.py --turns 20 --llm-delay-ms 0,300 \
        [--config offline,openai,cloud] [--asr-delay-ms 0,150] [--transport ws,sip] [--json] [--dump-events]
    PYTHONPATH=src .venv/bin/python bench/bench_turn_latency.py --transport sip --config cloud \
        --load 0,25,50,100 --turns 10
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import socket
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from twisted.internet import asyncioreactor  # noqa: E402

asyncioreactor.install()

from twisted.internet import defer, reactor, task  # noqa: E402
from twisted.internet.endpoints import TCP4ServerEndpoint  # noqa: E402
from twisted.web import resource, server  # noqa: E402

from activecall.speech.testing import synthesize_pcm  # noqa: E402
from tests.helpers import free_port, spawn, TWISTD  # noqa: E402
from tests.wsclient import ClientFactory  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint  # noqa: E402
from activecall.audio import resample  # noqa: E402

sys.path.insert(0, HERE)
from turn_sip import Pacer, SipLine, SippLoad, read_cpu_seconds  # noqa: E402

SENTENCES = [
    "I would like to check the status of my order.",
    "Can you tell me when the store opens tomorrow?",
    "My package has not arrived yet.",
    "Please send me a new invoice by email.",
    "I want to change my delivery address.",
]
REPLY = "Sure, one moment."
#: each reply names two others (676 different ones), so no turn's audio comes from the TTS cache (a real
#: agent rarely says the same sentence twice); the opening line is REPLY itself
NAMES = ["Alice", "Bruno", "Carla", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kira",
         "Liam", "Maya", "Nico", "Olga", "Pedro", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wendy",
         "Xavier", "Yara", "Zoltan"]
VOICED = Pacer.VOICED  # the same level for the caller's speech end and the reply's first sample


class FakeLLM(resource.Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.delay = 0.0
        self.count = 0

    def render_POST(self, request):
        request.content.read()
        request.setHeader(b"content-type", b"text/event-stream")
        n = self.count - 1
        reply = REPLY if n < 0 else f"Sure {NAMES[n % 26]} and {NAMES[n // 26 % 26]}, one moment."
        self.count += 1

        def answer():
            for word in reply.split(" "):
                chunk = {"choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}]}
                request.write(f"data: {json.dumps(chunk)}\n\n".encode())
            request.write(b"data: [DONE]\n\n")
            request.finish()

        reactor.callLater(self.delay, answer)
        return server.NOT_DONE_YET


class FakeTranscriptions(resource.Resource):
    """OpenAI ``/v1/audio/transcriptions``: answers the turn's sentence after ``delay``."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.delay = 0.0
        self.text = SENTENCES[0]

    def render_POST(self, request):
        request.content.read()
        request.setHeader(b"content-type", b"application/json")
        text = self.text
        reactor.callLater(self.delay, lambda: (request.write(json.dumps({"text": text}).encode()),
                                               request.finish()))
        return server.NOT_DONE_YET


class FakeSpeech(resource.Resource):
    """OpenAI ``/v1/audio/speech``: the reply's audio as 24 kHz PCM, first chunk after ``delay``."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.delay = 0.0
        self.pcm24k = b""

    def render_POST(self, request):
        request.content.read()
        request.setHeader(b"content-type", b"application/octet-stream")
        pcm = self.pcm24k

        def stream():
            for i in range(0, len(pcm), 9600):  # 200 ms chunks
                request.write(pcm[i:i + 9600])
            request.finish()

        reactor.callLater(self.delay, stream)
        return server.NOT_DONE_YET


class WsLine:
    """One ``/call`` session: the pacer sends, every binary frame received is looked at for audio."""

    def __init__(self, http_port: int, call_id: str):
        self.http_port = http_port
        self.call_id = call_id
        self.on_audio = None
        self.pacer = None

    @defer.inlineCallbacks
    def connect(self):
        self.factory = ClientFactory(f"ws://127.0.0.1:{self.http_port}/call?id={self.call_id}")
        self.proto = yield TCP4ClientEndpoint(reactor, "127.0.0.1", self.http_port).connect(self.factory)
        yield self.factory.opened

        def on_message(payload, isBinary, original=self.proto.onMessage):
            if isBinary and self.on_audio is not None:
                if np.abs(np.frombuffer(payload, dtype="<i2").astype(np.int32)).max(initial=0) > VOICED:
                    self.on_audio(reactor.seconds())
            original(payload, isBinary)

        self.proto.onMessage = on_message
        self.proto.sendMessage(json.dumps({"command": "invite",
                                           "option": {"codec": "pcm", "playbook": "bench.md"}}).encode())
        yield self.factory.wait_event("answer", timeout=30)

        def send(frame):
            if self.proto.transport is not None and self.proto.transport.connected:
                self.proto.sendMessage(frame.astype("<i2").tobytes(), isBinary=True)

        self.pacer = Pacer(send)

    # the pacer's view, as SipLine has it
    queue = property(lambda self: self.pacer.queue)
    speech_end = property(lambda self: self.pacer.speech_end)
    late = property(lambda self: self.pacer.late)
    events = property(lambda self: self.factory.events)

    def say(self, pcm):
        self.pacer.say(pcm)

    def poll_events(self):
        return []  # events arrive on the socket

    @defer.inlineCallbacks
    def close(self):
        self.pacer.running = False
        self.proto.sendMessage(json.dumps({"command": "hangup"}).encode())
        yield task.deferLater(reactor, 0.5, lambda: None)


def write_setup(root, llm_port, asr, tts, preemptive="default", early_look="default"):
    playbooks = os.path.join(root, "playbooks")
    os.makedirs(playbooks)
    # no asr/tts named: the playbook gets the shipped defaults for its language (VAD, recogniser, voice)
    speech = "" if asr is None else f"asr: {json.dumps(asr)}\nvad: {{type: silero}}\ntts: {json.dumps(tts)}\n"
    # preemptive replies (and their speculative first sentence): the daemon's default unless named
    preemptive_line = {"default": "", "on": "  preemptive: true\n", "off": "  preemptive: false\n",
                       "llm": "  preemptive: true\n  preemptiveTts: false\n"}[preemptive]
    # eou.earlyLook (Smart Turn asked pauseMs after silero's speech end): the daemon's default unless named
    eou_line = {"default": "", "on": "eou: {type: smart_turn, earlyLook: true}\n",
                "off": "eou: {type: smart_turn, earlyLook: false}\n"}[early_look]
    with open(os.path.join(playbooks, "bench.md"), "w") as f:
        f.write(f"""---
llm:
  provider: openai
  baseUrl: http://127.0.0.1:{llm_port}/v1
  apiKey: sk-bench
  model: bench
{preemptive_line}{eou_line}{speech}---
You are a bench.
""")
    http_port = free_port()
    sip_port = free_port(socket.SOCK_DGRAM)
    conf = os.path.join(root, "activecall.toml")
    with open(conf, "w") as f:
        f.write(f"""addr = "127.0.0.1"
udp_port = {sip_port}
tcp_port = 0
http_addr = "127.0.0.1:{http_port}"
media_cache_path = "{root}/cache"
playbook_dir = "{playbooks}"
[handler]
type = "playbook"
default = "bench.md"
[recording]
path = "{root}/rec"
""")
    return conf, http_port, sip_port


def pct(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def wait_event(line, predicate, timeout, start=0):
    """The first of the line's events from ``start`` on that ``predicate`` accepts, or None at ``timeout``."""
    deadline = reactor.seconds() + timeout
    while True:
        line.poll_events()
        for e in line.events[start:]:
            if predicate(e):
                return e
        if reactor.seconds() > deadline:
            return None
        yield sleep(0.02)


@defer.inlineCallbacks
def converse(line, turns, clips, transcriptions):
    """``turns`` turns on a connected line; a row per turn (voice to voice and the daemon's breakdown)."""
    state = {"waiting": False, "reply": None}

    def on_audio(t):
        # only audio after the caller's speech ended answers the turn (not the opening line, nor
        # the end of the previous reply)
        if state["waiting"] and state["reply"] is None and line.speech_end is not None:
            state["reply"] = t

    line.on_audio = on_audio
    # the playbook has no greeting, so the model speaks first (docs/playbooks.md, "Start"): wait
    # for that opening line to play out before the first turn, as a caller would
    opened = yield wait_event(line, lambda e: e.get("event") == "trackEnd" and e.get("playId") == "llm-1", 30)
    if opened is None:
        raise RuntimeError("the opening line never ended: " + json.dumps(line.events[-5:]))
    yield sleep(1.0)
    results = []
    for i in range(turns):
        sentence_i = i % len(clips)
        while line.queue.size:  # a missed turn's clip plays out; clips are never spliced
            yield sleep(0.02)
        transcriptions.text = SENTENCES[sentence_i]
        line.poll_events()
        seen = len(line.events)
        state["waiting"], state["reply"] = True, None
        line.say(clips[sentence_i])
        deadline = reactor.seconds() + 15
        while state["reply"] is None and reactor.seconds() < deadline:
            yield sleep(0.01)
        state["waiting"] = False
        if state["reply"] is None or line.speech_end is None:
            results.append({"turn": i, "missed": True})
            print(f"  turn {i}: no reply", file=sys.stderr)
            yield sleep(2.0)
            continue
        v2v = (state["reply"] - line.speech_end) * 1000
        # the reply plays out; its turn.latency arrives with the llm_response; then a pause
        yield wait_event(line, lambda e: e.get("event") == "trackEnd" and str(e.get("playId", "")).startswith("llm"),
                         10, seen)
        yield sleep(0.6)
        line.poll_events()
        lat = [e for e in line.events[seen:] if e.get("event") == "metrics" and e.get("key") == "turn.latency"]
        row = {"turn": i, "v2v_ms": round(v2v, 1)}
        # preemptive replies: the LLM request's outcome (hit/miss/cancelled), its first sentence's (played/wasted)
        window = [e for e in line.events[seen:] if e.get("event") == "metrics"]
        row["preemptive"] = [e["data"]["outcome"] for e in window if e.get("key") == "preemptive"]
        row["speculative_tts"] = [e["data"]["outcome"] for e in window if e.get("key") == "preemptive.tts"]
        if lat and (lat[0]["data"].get("asr_final_ms") is None or (
                lat[0]["data"].get("llm_first_token_ms") is not None
                and lat[0]["data"].get("tts_first_audio_ms") is None)):
            row["daemon"] = lat[0]["data"]  # a stage missing (an overloaded daemon mixes turns up): no breakdown
        elif lat:
            d = lat[0]["data"]
            row["daemon"] = d
            eou = d["eou_ms"] if d["eou_ms"] is not None else d["asr_final_ms"]
            asr_gap = d["asr_final_ms"] - eou
            llm_ms = (d["llm_first_token_ms"] - d["llm_start_ms"]) if d["llm_first_token_ms"] is not None else 0
            tts_ms = (d["tts_first_audio_ms"] - d["llm_first_token_ms"]) if d["llm_first_token_ms"] is not None else 0
            # same host, same clock: where the daemon's speech end and first frame lie on ours
            row["vad_view_lag_ms"] = round(d["speech_end"] - line.speech_end * 1000, 1)
            row["wire_out_ms"] = round((state["reply"] * 1000) - (d["speech_end"] + d["first_frame_ms"]), 1)
            row.update(eou_wait_ms=eou, asr_final_ms=asr_gap, llm_first_token_ms=llm_ms,
                       tts_first_audio_ms=tts_ms, overhead_ms=round(v2v - eou - asr_gap - llm_ms - tts_ms, 1))
        results.append(row)
        print(f"  turn {i}: {row}", file=sys.stderr)
    return results


@defer.inlineCallbacks
def run_config(name, asr, tts, transport, delays, turns, servers, llm_port, clips, dump_events=False, load=None,
               profile_dir=None, preemptive="default", early_look="default"):
    """One daemon, one measured conversation (and ``load`` background ones over SIP)."""
    llm, transcriptions, speech = servers
    llm_delay, asr_delay, tts_delay = delays
    root = tempfile.mkdtemp(prefix="turnbench-")
    conf, http_port, sip_port = write_setup(root, llm_port, asr, tts, preemptive, early_look)
    llm.delay = llm_delay / 1000.0
    llm.count = 0
    transcriptions.delay = asr_delay / 1000.0
    speech.delay = tts_delay / 1000.0
    daemon = spawn([TWISTD, "--nodaemon", "--pidfile=", "--reactor=asyncio", "activecall", "--conf", conf])
    background = None
    try:
        yield daemon.wait_for("activecall ready", timeout=60)
        if load:
            background = SippLoad(root, sip_port, clips[0])
            # the calls outlive the measured conversation; sipp is killed (and the daemon with it) after
            background.start(load, hold_s=turns * 8 + 120, rate=10)
            yield sleep(load / 10 + 3)  # ramp up, then let the first turns settle
        if transport == "ws":
            line = WsLine(http_port, f"bench-{name}-{llm_delay}")
        else:
            line = SipLine(sip_port, f"{root}/rec")
        yield line.connect()
        cpu0, wall0 = read_cpu_seconds(daemon.transport.pid), reactor.seconds()
        if profile_dir:  # py-spy samples the daemon while the measured turns run
            out = os.path.join(profile_dir, f"{transport}-{name}-load{load or 0}.txt")
            py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
            spy = spawn([py_spy, "record", "--nonblocking", "--format", "raw", "-o", out, "-p",
                         str(daemon.transport.pid)])
        results = yield converse(line, turns, clips, transcriptions)
        if profile_dir:
            spy.transport.signalProcess("INT")
            yield spy.ended
        cpu = read_cpu_seconds(daemon.transport.pid) - cpu0
        wall = reactor.seconds() - wall0
        if dump_events:
            line.poll_events()
            for e in line.events:
                print("event", json.dumps(e), file=sys.stderr)
        late = np.array(line.late) * 1000
        yield line.close()
        return {"config": name, "transport": transport, "preemptive": preemptive, "early_look": early_look, "llm_delay_ms": llm_delay, "asr_delay_ms": asr_delay,
                "tts_delay_ms": tts_delay, "load": load or 0, "daemon_cores": round(cpu / wall, 3),
                "turns": results, "send_late_ms_p99": round(float(np.percentile(late, 99)), 2)}
    finally:
        if background is not None:
            background.stop()
        daemon.kill()
        shutil.rmtree(root, ignore_errors=True)


def summarise(run):
    ok = [r for r in run["turns"] if "v2v_ms" in r]
    out = {k: run[k] for k in ("config", "transport", "preemptive", "early_look", "llm_delay_ms", "asr_delay_ms", "tts_delay_ms", "load",
                               "daemon_cores")}
    out["turns"], out["missed"] = len(ok), len(run["turns"]) - len(ok)
    for key in ("v2v_ms", "eou_wait_ms", "asr_final_ms", "llm_first_token_ms", "tts_first_audio_ms", "overhead_ms",
                "vad_view_lag_ms", "wire_out_ms"):
        vals = [r[key] for r in ok if key in r]
        out[key] = {"p50": round(pct(vals, 50), 1), "p95": round(pct(vals, 95), 1),
                    "max": round(max(vals), 1) if vals else None}
    out["send_late_ms_p99"] = run["send_late_ms_p99"]
    outcomes = {}
    for r in run["turns"]:
        for o in r.get("preemptive", []):
            outcomes[f"llm_{o}"] = outcomes.get(f"llm_{o}", 0) + 1
        for o in r.get("speculative_tts", []):
            outcomes[f"tts_{o}"] = outcomes.get(f"tts_{o}", 0) + 1
    out["preemptive_outcomes"] = outcomes
    # what the daemon adds (dispatch, the next media tick, the wire): overhead - VAD view lag, per turn
    added = [r["overhead_ms"] - r["vad_view_lag_ms"] for r in ok if "overhead_ms" in r]
    out["daemon_added_ms"] = {"p50": round(pct(added, 50), 1), "p95": round(pct(added, 95), 1),
                              "max": round(max(added), 1) if added else None}
    return out


@defer.inlineCallbacks
def main(args):
    llm = FakeLLM()
    transcriptions = FakeTranscriptions()
    speech = FakeSpeech()
    root = resource.Resource()
    v1 = resource.Resource()
    root.putChild(b"v1", v1)
    chat = resource.Resource()
    v1.putChild(b"chat", chat)
    chat.putChild(b"completions", llm)
    audio = resource.Resource()
    v1.putChild(b"audio", audio)
    audio.putChild(b"transcriptions", transcriptions)
    audio.putChild(b"speech", speech)
    listening = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server.Site(root))
    port = listening.getHost().port
    clips = []
    for s in SENTENCES:
        pcm = yield synthesize_pcm(s)
        clips.append(np.concatenate([pcm, np.zeros(0, dtype=np.int16)]))
    reply = yield synthesize_pcm(REPLY)
    speech.pcm24k = resample(reply, 16000, 24000).astype("<i2").tobytes()
    summaries, runs = [], []
    openai_asr = {"provider": "openai", "endpoint": f"http://127.0.0.1:{port}/v1", "secretKey": "sk-bench"}
    configs = {"defaults": (None, None),
               "offline": ({"provider": "pocketsphinx"}, {"provider": "flite"}),
               "openai": (openai_asr, {"provider": "flite"}),
               "cloud": (openai_asr, {"provider": "openai", "endpoint": f"http://127.0.0.1:{port}/v1",
                                      "secretKey": "sk-bench"})}
    loads = [int(x) for x in args.load.split(",")] if args.load else [None]
    for transport in args.transport.split(","):
        for name in args.config.split(","):
            asr_delays = [int(x) for x in args.asr_delay_ms.split(",")] if name in ("openai", "cloud") else [0]
            tts_delays = [int(x) for x in args.tts_delay_ms.split(",")] if name == "cloud" else [0]
            llm_delays = [int(x) for x in args.llm_delay_ms.split(",")]
            for load, asr_delay, tts_delay, llm_delay, preemptive, early_look in itertools.product(
                    loads, asr_delays, tts_delays, llm_delays, args.preemptive.split(","), args.early_look.split(",")):
                print(f"{transport} config {name} load {load} llm {llm_delay} ms asr {asr_delay} ms "
                      f"tts {tts_delay} ms preemptive {preemptive} early look {early_look} (load average {os.getloadavg()[0]:.2f})",
                      file=sys.stderr)
                asr, tts = configs[name]
                run = yield run_config(name, asr, tts, transport, (llm_delay, asr_delay, tts_delay),
                                       args.turns, (llm, transcriptions, speech), port, clips,
                                       args.dump_events, load, args.py_spy, preemptive, early_look)
                runs.append(run)
                summaries.append(summarise(run))
                summaries[-1]["load_avg_after"] = round(os.getloadavg()[0], 2)
                print(json.dumps(summaries[-1]), file=sys.stderr)
    load_avg = os.getloadavg()
    report = {"load_avg": load_avg, "cpus": os.cpu_count(), "summaries": summaries}
    if args.json:
        report["runs"] = runs
        print(json.dumps(report, indent=1))
    else:
        print(f"load average {load_avg[0]:.2f} {load_avg[1]:.2f} {load_avg[2]:.2f}, {os.cpu_count()} CPUs")
        head = f"{'config':8} {'tr':3} {'llm':>4} {'asr':>4} {'tts':>4} {'N':>4} {'cores':>5} {'n':>3}  " + "  ".join(
            f"{k:>17}" for k in ("v2v", "eou wait", "asr final", "llm 1st tok", "tts 1st audio", "overhead"))
        print(head + "    (p50/p95/max ms)")
        for s in summaries:
            cells = "  ".join(f"{s[k]['p50']:>5.0f}/{s[k]['p95']:>5.0f}/{(s[k]['max'] or 0):>5.0f}" for k in (
                "v2v_ms", "eou_wait_ms", "asr_final_ms", "llm_first_token_ms", "tts_first_audio_ms", "overhead_ms"))
            cells += f"   (overhead = VAD view lag {s['vad_view_lag_ms']['p50']:.0f}/{s['vad_view_lag_ms']['p95']:.0f}"
            cells += f" + in-daemon dispatch + frame to wire {s['wire_out_ms']['p50']:.0f}/{s['wire_out_ms']['p95']:.0f})"
            cells += f"  daemon-added {s['daemon_added_ms']['p50']:.1f}/{s['daemon_added_ms']['p95']:.1f}"
            cells += f"  preemptive {s['preemptive']}: {s['preemptive_outcomes']}  early look {s['early_look']}"
            print(f"{s['config']:8} {s['transport']:3} {s['llm_delay_ms']:>4} {s['asr_delay_ms']:>4} "
                  f"{s['tts_delay_ms']:>4} {s['load']:>4} {s['daemon_cores']:>5.2f} {s['turns']:>3}  {cells}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--llm-delay-ms", default="0")
    parser.add_argument("--asr-delay-ms", default="0,150")
    parser.add_argument("--tts-delay-ms", default="0")
    parser.add_argument("--config", default="defaults", help="defaults, offline, openai, cloud (comma-separated)")
    parser.add_argument("--transport", default="ws", help="ws, sip or ws,sip")
    parser.add_argument("--load", default="", help="background SIP conversations per run, e.g. 0,50,100")
    parser.add_argument("--py-spy", metavar="DIR", help="sample the daemon with py-spy during the measured turns; "
                        "collapsed stacks (one file per run) go to DIR")
    parser.add_argument("--preemptive", default="default",
                        help="preemptive replies in the playbook: default (the daemon's), on, off, llm (the LLM "
                             "request only, no speculative TTS); comma-separated for an A/B")
    parser.add_argument("--early-look", default="default",
                        help="eou.earlyLook for the bench playbook: default, on, off or a comma-separated list")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--dump-events", action="store_true",
                        help="print every event of each call to stderr at its end")
    args = parser.parse_args()
    if args.load and args.transport != "sip":
        sys.exit("--load needs --transport sip (the background conversations are sipp calls)")

    def run():
        d = main(args)
        d.addErrback(lambda f: (f.printTraceback(file=sys.stderr), None))  # not to twisted's log: nobody reads it
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()
