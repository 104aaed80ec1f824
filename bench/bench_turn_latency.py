"""Voice-to-voice turn latency (issue 20): real turns against a daemon started here.

The daemon (``twistd -n activecall``, a temporary config and playbook) runs a playbook whose LLM
is a local OpenAI-compatible streaming server in this process answering a short line after
``--llm-delay-ms`` (first token; the rest follows at once).  A ``/call`` WebSocket client speaks
fixed sentences synthesised by flite (16 kHz PCM sent on absolute 20 ms deadlines from one clock,
silence between turns, never faster than real time) and measures, on its own clock:

- the end of the caller's speech: when the frame holding the clip's last voiced sample (|x| > 300)
  was sent;
- the first reply audio: the first non-silent binary frame received after it.

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

Configurations (``--config``): ``offline`` (silero VAD, pocketsphinx, Smart Turn, flite: the
defaults) and ``openai`` (the ``openai`` ASR provider against a local OpenAI-compatible
``/v1/audio/transcriptions`` here answering the sentence after ``--asr-delay-ms``).

    PYTHONPATH=src .venv/bin/python bench/bench_turn_latency.py --turns 20 --llm-delay-ms 0,300 \
        [--config offline,openai] [--asr-delay-ms 0,150] [--json] [--dump-events]

SIP/RTP (``--transport sip``) is not implemented yet.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

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

SENTENCES = [
    "I would like to check the status of my order.",
    "Can you tell me when the store opens tomorrow?",
    "My package has not arrived yet.",
    "Please send me a new invoice by email.",
    "I want to change my delivery address.",
]
REPLY = "Sure, one moment."
FRAME = 320
VOICED = 300


class FakeLLM(resource.Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.delay = 0.0

    def render_POST(self, request):
        request.content.read()
        request.setHeader(b"content-type", b"text/event-stream")

        def answer():
            for word in REPLY.split(" "):
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


class Pacer:
    """One 20 ms frame per absolute deadline from one clock; speech queued, silence otherwise."""

    def __init__(self, proto):
        self.proto = proto
        self.queue = np.zeros(0, dtype=np.int16)
        self.last_voiced_left = None  # samples of the queue after which the clip's last voiced one lies
        self.speech_end = None
        self.start = reactor.seconds()
        self.n = 0
        self.late = []
        self.running = True
        self._next()

    def say(self, pcm):
        loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > VOICED)
        self.queue = pcm.copy()
        self.last_voiced_left = int(loud[-1]) if loud.size else None
        self.speech_end = None

    def _next(self):
        if not self.running:
            return
        deadline = self.start + self.n * 0.02
        reactor.callLater(max(0.0, deadline - reactor.seconds()), self._send)

    def _send(self):
        now = reactor.seconds()
        self.late.append(now - (self.start + self.n * 0.02))
        frame = self.queue[:FRAME]
        self.queue = self.queue[FRAME:]
        if frame.size < FRAME:
            frame = np.concatenate([frame, np.zeros(FRAME - frame.size, dtype=np.int16)])
        if self.last_voiced_left is not None:
            if self.last_voiced_left < FRAME:
                self.speech_end = now
                self.last_voiced_left = None
            else:
                self.last_voiced_left -= FRAME
        if self.proto.transport is not None and self.proto.transport.connected:
            self.proto.sendMessage(frame.astype("<i2").tobytes(), isBinary=True)
        self.n += 1
        self._next()


def write_setup(root, llm_port, asr):
    playbooks = os.path.join(root, "playbooks")
    os.makedirs(playbooks)
    with open(os.path.join(playbooks, "bench.md"), "w") as f:
        f.write(f"""---
llm:
  provider: openai
  baseUrl: http://127.0.0.1:{llm_port}/v1
  apiKey: sk-bench
  model: bench
asr: {json.dumps(asr)}
vad: {{type: silero}}
tts: {{provider: flite}}
---
You are a bench.
""")
    http_port = free_port()
    conf = os.path.join(root, "activecall.toml")
    with open(conf, "w") as f:
        f.write(f'''addr = "127.0.0.1"
udp_port = {free_port()}
http_addr = "127.0.0.1:{http_port}"
media_cache_path = "{root}/cache"
playbook_dir = "{playbooks}"
[recording]
path = "{root}/rec"
''')
    return conf, http_port


def pct(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


@defer.inlineCallbacks
def run_config(name, asr, llm_delay, asr_delay, turns, llm, transcriptions, llm_port, clips, dump_events=False):
    root = tempfile.mkdtemp(prefix="turnbench-")
    conf, http_port = write_setup(root, llm_port, asr)
    llm.delay = llm_delay / 1000.0
    transcriptions.delay = asr_delay / 1000.0
    daemon = spawn([TWISTD, "--nodaemon", "--pidfile=", "--reactor=asyncio", "activecall", "--conf", conf])
    try:
        yield daemon.wait_for("activecall ready", timeout=60)
        factory = ClientFactory(f"ws://127.0.0.1:{http_port}/call?id=bench-{name}-{llm_delay}")
        proto = yield TCP4ClientEndpoint(reactor, "127.0.0.1", http_port).connect(factory)
        yield factory.opened
        state = {"waiting": False, "reply": None}

        def on_message(payload, isBinary, original=proto.onMessage):
            # only audio after the caller's speech ended answers the turn (not the opening line, nor
            # the end of the previous reply)
            if isBinary and state["waiting"] and state["reply"] is None and pacer.speech_end is not None:
                if np.abs(np.frombuffer(payload, dtype="<i2")).max(initial=0) > 0:
                    state["reply"] = reactor.seconds()
            original(payload, isBinary)

        proto.onMessage = on_message
        proto.sendMessage(json.dumps({"command": "invite", "option": {"codec": "pcm", "playbook": "bench.md"}}).encode())
        yield factory.wait_event("answer", timeout=30)
        pacer = Pacer(proto)
        # the playbook has no greeting, so the model speaks first (docs/playbooks.md, "Start"): wait
        # for that opening line to play out before the first turn, as a caller would
        yield factory.wait_event("trackEnd", timeout=30, playId="llm-1")
        yield task.deferLater(reactor, 1.0, lambda: None)
        results = []
        for i in range(turns):
            sentence_i = i % len(clips)
            while pacer.queue.size:  # a missed turn's clip plays out; clips are never spliced
                yield task.deferLater(reactor, 0.02, lambda: None)
            transcriptions.text = SENTENCES[sentence_i]
            seen = len(factory.events)
            state["waiting"], state["reply"] = True, None
            pacer.say(clips[sentence_i])
            deadline = reactor.seconds() + 15
            while state["reply"] is None and reactor.seconds() < deadline:
                yield task.deferLater(reactor, 0.01, lambda: None)
            state["waiting"] = False
            if state["reply"] is None or pacer.speech_end is None:
                results.append({"turn": i, "missed": True})
                print(f"  turn {i}: no reply", file=sys.stderr)
                yield task.deferLater(reactor, 2.0, lambda: None)
                continue
            v2v = (state["reply"] - pacer.speech_end) * 1000
            # the reply plays out; its turn.latency arrives with the llm_response; then a pause
            end = reactor.seconds() + 10
            while reactor.seconds() < end and not any(
                    e["event"] == "trackEnd" and str(e.get("playId", "")).startswith("llm")
                    for e in factory.events[seen:]):
                yield task.deferLater(reactor, 0.02, lambda: None)
            yield task.deferLater(reactor, 0.6, lambda: None)
            lat = [e for e in factory.events[seen:] if e["event"] == "metrics" and e["key"] == "turn.latency"]
            row = {"turn": i, "v2v_ms": round(v2v, 1)}
            if lat:
                d = lat[0]["data"]
                row["daemon"] = d
                eou = d["eou_ms"] if d["eou_ms"] is not None else d["asr_final_ms"]
                asr_gap = d["asr_final_ms"] - eou
                llm_ms = (d["llm_first_token_ms"] - d["llm_start_ms"]) if d["llm_first_token_ms"] is not None else 0
                tts_ms = (d["tts_first_audio_ms"] - d["llm_first_token_ms"]) if d["llm_first_token_ms"] is not None else 0
                # same host, same clock: where the daemon's speech end and first frame lie on ours
                row["vad_view_lag_ms"] = round(d["speech_end"] - pacer.speech_end * 1000, 1)
                row["wire_out_ms"] = round((state["reply"] * 1000) - (d["speech_end"] + d["first_frame_ms"]), 1)
                row.update(eou_wait_ms=eou, asr_final_ms=asr_gap, llm_first_token_ms=llm_ms,
                           tts_first_audio_ms=tts_ms, overhead_ms=round(v2v - eou - asr_gap - llm_ms - tts_ms, 1))
            results.append(row)
            print(f"  turn {i}: {row}", file=sys.stderr)
        if dump_events:
            for e in factory.events:
                print("event", json.dumps(e), file=sys.stderr)
        pacer.running = False
        late = np.array(pacer.late) * 1000
        proto.sendMessage(json.dumps({"command": "hangup"}).encode())
        yield task.deferLater(reactor, 0.5, lambda: None)
        return {"config": name, "transport": "ws", "llm_delay_ms": llm_delay, "asr_delay_ms": asr_delay,
                "turns": results, "send_late_ms_p99": round(float(np.percentile(late, 99)), 2)}
    finally:
        daemon.kill()
        shutil.rmtree(root, ignore_errors=True)


def summarise(run):
    ok = [r for r in run["turns"] if "v2v_ms" in r]
    out = {k: run[k] for k in ("config", "transport", "llm_delay_ms", "asr_delay_ms")}
    out["turns"], out["missed"] = len(ok), len(run["turns"]) - len(ok)
    for key in ("v2v_ms", "eou_wait_ms", "asr_final_ms", "llm_first_token_ms", "tts_first_audio_ms", "overhead_ms",
                "vad_view_lag_ms", "wire_out_ms"):
        vals = [r[key] for r in ok if key in r]
        out[key] = {"p50": round(pct(vals, 50), 1), "p95": round(pct(vals, 95), 1),
                    "max": round(max(vals), 1) if vals else None}
    out["send_late_ms_p99"] = run["send_late_ms_p99"]
    return out


@defer.inlineCallbacks
def main(args):
    llm = FakeLLM()
    transcriptions = FakeTranscriptions()
    root = resource.Resource()
    v1 = resource.Resource()
    root.putChild(b"v1", v1)
    chat = resource.Resource()
    v1.putChild(b"chat", chat)
    chat.putChild(b"completions", llm)
    audio = resource.Resource()
    v1.putChild(b"audio", audio)
    audio.putChild(b"transcriptions", transcriptions)
    listening = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server.Site(root))
    port = listening.getHost().port
    clips = []
    for s in SENTENCES:
        pcm = yield synthesize_pcm(s)
        clips.append(np.concatenate([pcm, np.zeros(0, dtype=np.int16)]))
    summaries, runs = [], []
    configs = {"offline": {"provider": "pocketsphinx"},
               "openai": {"provider": "openai", "endpoint": f"http://127.0.0.1:{port}/v1", "secretKey": "sk-bench"}}
    for name in args.config.split(","):
        asr_delays = [int(x) for x in args.asr_delay_ms.split(",")] if name != "offline" else [0]
        for asr_delay in asr_delays:
            for llm_delay in [int(x) for x in args.llm_delay_ms.split(",")]:
                print(f"config {name} llm {llm_delay} ms asr {asr_delay} ms", file=sys.stderr)
                run = yield run_config(name, configs[name], llm_delay, asr_delay, args.turns, llm,
                                       transcriptions, port, clips, args.dump_events)
                runs.append(run)
                summaries.append(summarise(run))
                print(json.dumps(summaries[-1]), file=sys.stderr)
    load = os.getloadavg()
    report = {"load_avg": load, "cpus": os.cpu_count(), "summaries": summaries}
    if args.json:
        report["runs"] = runs
        print(json.dumps(report, indent=1))
    else:
        print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {os.cpu_count()} CPUs")
        head = f"{'config':8} {'tr':3} {'llm':>4} {'asr':>4} {'n':>3}  " + "  ".join(
            f"{k:>18}" for k in ("v2v", "eou wait", "asr final", "llm 1st tok", "tts 1st audio", "overhead"))
        print(head + "    (p50/p95/max ms)")
        for s in summaries:
            cells = "  ".join(f"{s[k]['p50']:>5.0f}/{s[k]['p95']:>5.0f}/{(s[k]['max'] or 0):>5.0f}" for k in (
                "v2v_ms", "eou_wait_ms", "asr_final_ms", "llm_first_token_ms", "tts_first_audio_ms", "overhead_ms"))
            cells += f"   (overhead = VAD view lag {s['vad_view_lag_ms']['p50']:.0f}/{s['vad_view_lag_ms']['p95']:.0f}"
            cells += f" + in-daemon dispatch + frame to wire {s['wire_out_ms']['p50']:.0f}/{s['wire_out_ms']['p95']:.0f})"
            print(f"{s['config']:8} {s['transport']:3} {s['llm_delay_ms']:>4} {s['asr_delay_ms']:>4} "
                  f"{s['turns']:>3}  {cells}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--llm-delay-ms", default="0")
    parser.add_argument("--asr-delay-ms", default="0,150")
    parser.add_argument("--config", default="offline")
    parser.add_argument("--transport", default="ws", choices=("ws", "sip", "both"))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--dump-events", action="store_true",
                        help="print every event of each call to stderr at its end")
    args = parser.parse_args()
    if args.transport != "ws":
        sys.exit("--transport sip: not implemented yet (only ws)")

    def run():
        d = main(args)
        d.addErrback(lambda f: (f.printTraceback(), None))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()
