"""Barge-in over a real daemon (issue 21): how fast the bot's audio stops when the caller talks over it,
and whether its own echo ever interrupts it.

The daemon (``twistd -n activecall``, a temporary config) runs a playbook with a long flite greeting, the
offline providers (silero VAD, pocketsphinx unless ``--asr`` names another, Smart Turn, flite) and a local OpenAI-compatible LLM here.
Each trial is one ``/call`` (16 kHz PCM): a client on absolute 20 ms deadlines sends back the bot's own
audio as echo (``--echo-db`` dB, ``--echo-ms`` late, with a second reflection 2.5 ms later, as a hybrid
does) and, in ``speech`` trials, starts speaking a flite sentence (another voice) ``--speak-after`` seconds
into the greeting.  Measured on the client's clock:

- ``stop``: from the frame that carried the caller's first voiced sample to the end of the last bot
  frame with sound received before the daemon's verdict (``metrics`` ``interruption.paused``, or the
  ``interruption`` event in ``legacy`` mode) arrived; the socket keeps order, so the bot's audio stopped
  there (a trial where the greeting was already in a pause when the caller started is not counted);
- ``interrupted``: an ``interruption`` event came (the recogniser's words stopped and flushed the
  track) within 3 s, else the bot ``resumed`` (a ``metrics`` ``interruption.resumed``);
- ``echo`` trials (no caller speech): any ``interruption`` event or pause during the whole greeting.

``--mode`` ``pause`` is the default playbook (echo control, pause on voice, words decide); ``legacy`` sets
``pauseOnVoice: false, echoCancel: false`` (the behaviour before: voice after ``speechPadding`` sends a
graceful interrupt).

    PYTHONPATH=src .venv/bin/python bench/bench_barge_in.py [--trials 20] [--mode pause,legacy] \
        [--echo-db -10] [--echo-ms 60] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from twisted.internet import asyncioreactor  # noqa: E402

asyncioreactor.install()

from twisted.internet import defer, reactor, task  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint  # noqa: E402
from twisted.web import resource, server  # noqa: E402

from activecall.audio import resample, ulaw_decode, ulaw_encode  # noqa: E402
from activecall.speech.testing import synthesize_pcm  # noqa: E402
from tests.helpers import TWISTD, free_port, spawn  # noqa: E402
from tests.wsclient import ClientFactory  # noqa: E402

GREETING = ("Thank you for calling the city library. Our opening hours are nine to five on weekdays, "
            "and ten to four on Saturdays. You can renew your books online, by phone, or at the desk. "
            "Please tell me how I can help you today.")
CALLER = ["I would like to renew my books please.", "Can you tell me when you open tomorrow?",
          "My library card does not work.", "Wait, I have a question about my account."]
FRAME = 320
VOICED = 300
MODES = {"pause": "", "legacy": "\ninterruption: {strategy: both, pauseOnVoice: false, echoCancel: false}"}


class FakeLLM(resource.Resource):
    isLeaf = True

    def render_POST(self, request):
        request.content.read()
        request.setHeader(b"content-type", b"text/event-stream")
        chunk = {"choices": [{"index": 0, "delta": {"content": "Sure, I can help with that."}, "finish_reason": None}]}
        request.write(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode())
        request.finish()
        return server.NOT_DONE_YET


def write_setup(root, llm_port, mode, args):
    playbooks = os.path.join(root, "playbooks")
    os.makedirs(playbooks)
    # --asr default: no asr block, so the shipped default recogniser for English (docs/speech.md)
    asr_line = "" if args.asr == "default" else f"asr: {{provider: {args.asr}}}\n"
    with open(os.path.join(playbooks, "bench.md"), "w") as f:
        f.write(f"""---
llm:
  provider: openai
  baseUrl: http://127.0.0.1:{llm_port}/v1
  apiKey: sk-bench
  model: bench
greeting: {json.dumps(GREETING)}
{asr_line}vad: {{type: silero}}
tts: {{provider: flite}}{MODES[mode]}{args.extra_front_matter}
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


class Line:
    """The caller's phone: on absolute 20 ms deadlines, the echo of what it received plus its own voice."""

    def __init__(self, proto, echo_db, echo_ms, codec="pcm"):
        self.proto = proto
        self.ulaw = codec == "pcmu"  # a G.711 phone: the whole line at 8 kHz, mu-law both ways
        self.rate = 8000 if self.ulaw else 16000
        self.frame = FRAME * self.rate // 16000
        self.gain = 10 ** (echo_db / 20) if echo_db is not None else 0.0  # None: a line with no echo
        self.delay = echo_ms * self.rate // 1000
        self.second = self.rate * 25 // 10000  # the second reflection, 2.5 ms later
        self.heard = np.zeros(0, dtype=np.float64)  # bot audio received, not yet echoed
        self.history = np.zeros(self.delay + 2 * self.second)
        self.voice = np.zeros(0, dtype=np.float64)
        self.voice_start = None  # when the frame with the first voiced sample was sent
        self._first_voiced = None
        self.bot_frames: list = []  # (arrival time, loud) of bot frames
        self.start = reactor.seconds()
        self.n = 0
        self.running = True
        self._next()

    def received(self, payload):
        pcm = ulaw_decode(payload) if self.ulaw else np.frombuffer(payload, dtype="<i2")
        self.bot_frames.append((reactor.seconds(), bool(np.abs(pcm).max(initial=0) > 0)))
        self.heard = np.concatenate([self.heard, pcm.astype(np.float64)])

    def say(self, pcm):
        if self.ulaw:
            pcm = resample(pcm, 16000, 8000)
        loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > VOICED)
        self._first_voiced = int(loud[0]) if loud.size else 0
        self.voice = pcm.astype(np.float64)
        self.voice_start = None

    def _next(self):
        if self.running:
            deadline = self.start + self.n * 0.02
            reactor.callLater(max(0.0, deadline - reactor.seconds()), self._send)

    def _send(self):
        n, d, r2 = self.frame, self.delay, self.second
        far = self.heard[:n]
        self.heard = self.heard[n:]
        if far.size < n:
            far = np.concatenate([far, np.zeros(n - far.size)])
        self.history = np.concatenate([self.history, far])
        echo = self.history[-n - d: len(self.history) - d] * self.gain
        echo = echo + 0.3 * self.history[-n - d - r2: len(self.history) - d - r2] * self.gain
        self.history = self.history[-(d + 2 * r2 + n):]
        out = echo
        if self.voice.size:
            part = self.voice[:n]
            self.voice = self.voice[n:]
            if self._first_voiced is not None:
                if self._first_voiced < n:
                    self.voice_start = reactor.seconds()
                    self._first_voiced = None
                else:
                    self._first_voiced -= n
            out = out.copy()
            out[: part.size] += part
        if self.running and self.proto.transport is not None and self.proto.transport.connected:
            try:
                samples = np.clip(np.rint(out), -32768, 32767).astype("<i2")
                self.proto.sendMessage(ulaw_encode(samples) if self.ulaw else samples.tobytes(), isBinary=True)
            except Exception:  # the call is closing
                self.running = False
        self.n += 1
        self._next()


def cough(seed):
    """A cough-like burst, 16 kHz: 250 ms of noise, band-limited (300-3000 Hz), a sharp onset and a decay."""
    rng = np.random.default_rng(1000 + seed)
    n = 4000
    noise = rng.standard_normal(n + 64)
    band = np.convolve(noise, np.hanning(9), mode="same")[:n] - np.convolve(noise, np.hanning(53), mode="same")[:n]
    envelope = np.minimum(1.0, np.arange(n) / 160.0) * np.exp(-np.arange(n) / 1400.0)
    burst = band / np.abs(band).max() * envelope * 12000
    return np.concatenate([burst, np.zeros(1600)]).astype(np.int16)


def pct(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


@defer.inlineCallbacks
def one_call(http_port, kind, clip, args, i):
    factory = ClientFactory(f"ws://127.0.0.1:{http_port}/call?id=barge-{kind}-{i}")
    proto = yield TCP4ClientEndpoint(reactor, "127.0.0.1", http_port).connect(factory)
    yield factory.opened
    line = None

    arrivals = []  # (arrival time, event name, key) of the daemon's events

    def on_message(payload, isBinary, original=proto.onMessage):
        if isBinary and line is not None:
            line.received(payload)
        elif not isBinary:
            try:
                e = json.loads(payload)
                arrivals.append((reactor.seconds(), e.get("event"), e.get("key")))
            except ValueError:
                pass
        original(payload, isBinary)

    proto.onMessage = on_message
    proto.sendMessage(json.dumps({"command": "invite", "option": {"codec": args.codec, "playbook": "bench.md"}}).encode())
    yield factory.wait_event("answer", timeout=30)
    line = Line(proto, args.echo_db, args.echo_ms, args.codec)
    yield factory.wait_event("trackStart", timeout=30, playId="greeting")
    row = {"kind": kind}
    try:
        if kind == "echo":
            end = reactor.seconds() + 25
            while reactor.seconds() < end and not any(
                    e["event"] == "trackEnd" and e.get("playId") == "greeting" for e in factory.events):
                yield task.deferLater(reactor, 0.05, lambda: None)
            row["interrupted"] = any(e["event"] == "interruption" for e in factory.events)
            row["paused"] = sum(1 for e in factory.events if e["event"] == "metrics"
                                and e.get("key") == "interruption.paused")
            return row
        # speech or cough: wait until the greeting really sounds, then make the sound over it
        while not any(loud for _, loud in line.bot_frames):
            yield task.deferLater(reactor, 0.02, lambda: None)
        yield task.deferLater(reactor, args.speak_after, lambda: None)
        seen = len(factory.events)
        line.say(clip)
        while line.voice_start is None:
            yield task.deferLater(reactor, 0.01, lambda: None)
        start = line.voice_start
        yield task.deferLater(reactor, args.wait, lambda: None)
        # the daemon's verdict (WebSocket order: the frames sent before it arrive before it)
        verdict = next((t for t, name, key in arrivals if t >= start and (
            name == "interruption" or (name == "metrics" and key == "interruption.paused"))), None)
        row["stop_ms"] = None
        if verdict is not None:
            loud = [t for t, is_loud in line.bot_frames if is_loud and t <= verdict + 0.1]
            if loud and loud[-1] >= start:
                row["stop_ms"] = round((loud[-1] + 0.02 - start) * 1000, 1)
            else:
                row["silent_already"] = True  # the caller started in a pause of the greeting
        later = factory.events[seen:] if not args.dump_events else factory.events
        row["interrupted"] = any(e["event"] == "interruption" for e in later)
        row["paused"] = sum(1 for e in later if e["event"] == "metrics" and e.get("key") == "interruption.paused")
        row["resumed"] = any(e["event"] == "metrics" and e.get("key") == "interruption.resumed" for e in later)
        if args.dump_events:
            print("events", json.dumps(later), file=sys.stderr)
        return row
    finally:
        line.running = False
        proto.sendMessage(json.dumps({"command": "hangup"}).encode())
        yield task.deferLater(reactor, 0.3, lambda: None)
        proto.transport.loseConnection()


@defer.inlineCallbacks
def run_mode(mode, args, llm_port, clips):
    root = tempfile.mkdtemp(prefix="bargebench-")
    conf, http_port = write_setup(root, llm_port, mode, args)
    daemon = spawn([TWISTD, "--nodaemon", "--pidfile=", "--reactor=asyncio", "activecall", "--conf", conf],
                   echo=args.dump_events)
    rows = []
    try:
        yield daemon.wait_for("activecall ready", timeout=60)
        for i in range(args.echo_trials):
            row = yield one_call(http_port, "echo", None, args, i)
            rows.append(row)
            print(f"  {mode} echo {i}: {row}", file=sys.stderr)
        for i in range(args.trials):
            row = yield one_call(http_port, "speech", clips[i % len(clips)], args, i)
            rows.append(row)
            print(f"  {mode} speech {i}: {row}", file=sys.stderr)
        for i in range(args.cough_trials):
            row = yield one_call(http_port, "cough", cough(i), args, i)
            rows.append(row)
            print(f"  {mode} cough {i}: {row}", file=sys.stderr)
    finally:
        daemon.kill()
        shutil.rmtree(root, ignore_errors=True)
    speech = [r for r in rows if r["kind"] == "speech"]
    coughs = [r for r in rows if r["kind"] == "cough"]
    stops = [r["stop_ms"] for r in speech if r.get("stop_ms") is not None]
    echo = [r for r in rows if r["kind"] == "echo"]
    return {"mode": mode, "echo_db": args.echo_db, "echo_ms": args.echo_ms,
            "speech_trials": len(speech), "stopped": len(stops),
            "stop_ms": {"p50": round(pct(stops, 50), 1), "p95": round(pct(stops, 95), 1),
                        "max": round(max(stops), 1) if stops else None},
            "interrupted_by_words": sum(1 for r in speech if r.get("interrupted")),
            "resumed": sum(1 for r in speech if r.get("resumed")),
            "echo_trials": len(echo), "echo_interruptions": sum(1 for r in echo if r["interrupted"]),
            "echo_pauses": sum(r["paused"] for r in echo),
            "cough_trials": len(coughs), "cough_paused": sum(1 for r in coughs if r["paused"]),
            "cough_resumed": sum(1 for r in coughs if r["resumed"]),
            "cough_interrupted": sum(1 for r in coughs if r["interrupted"])}


@defer.inlineCallbacks
def main(args):
    root = resource.Resource()
    v1 = resource.Resource()
    root.putChild(b"v1", v1)
    chat = resource.Resource()
    v1.putChild(b"chat", chat)
    chat.putChild(b"completions", FakeLLM())
    listening = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server.Site(root))
    clips = []
    for s in CALLER:
        clips.append((yield synthesize_pcm(s, "slt")))
    results = []
    for mode in args.mode.split(","):
        print(f"mode {mode}", file=sys.stderr)
        results.append((yield run_mode(mode, args, listening.getHost().port, clips)))
        print(json.dumps(results[-1]), file=sys.stderr)
    load = os.getloadavg()
    report = {"load_avg": load, "cpus": os.cpu_count(), "results": results}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {os.cpu_count()} CPUs; "
              f"{args.codec}; echo {args.echo_db} dB, {args.echo_ms} ms late")
        for r in results:
            if r["cough_trials"]:
                print(f"{r['mode']}: coughs {r['cough_trials']}, paused {r['cough_paused']}, resumed "
                      f"{r['cough_resumed']}, interrupted {r['cough_interrupted']}")
        print(f"{'mode':8} {'trials':>6} {'stop p50/p95/max ms':>22} {'by words':>8} {'resumed':>7} "
              f"{'echo calls':>10} {'echo interruptions':>18} {'echo pauses':>11}")
        for r in results:
            s = r["stop_ms"]
            print(f"{r['mode']:8} {r['speech_trials']:>6} {s['p50']:>8.0f}/{s['p95']:>5.0f}/{(s['max'] or 0):>5.0f}"
                  f"     {r['interrupted_by_words']:>8} {r['resumed']:>7} {r['echo_trials']:>10} "
                  f"{r['echo_interruptions']:>18} {r['echo_pauses']:>11}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--echo-trials", type=int, default=3)
    parser.add_argument("--mode", default="pause,legacy")
    parser.add_argument("--cough-trials", type=int, default=0,
                        help="calls with a 250 ms cough-like burst over the greeting: pause, then resume")
    parser.add_argument("--echo-db", default="-10", help="dB, or 'off' for a line without echo")
    parser.add_argument("--echo-ms", type=int, default=60)
    parser.add_argument("--codec", default="pcm", choices=("pcm", "pcmu"),
                        help="the /call codec: 16 kHz PCM, or a G.711 phone (mu-law, the line at 8 kHz)")
    parser.add_argument("--speak-after", type=float, default=2.5)
    parser.add_argument("--asr", default="pocketsphinx",
                        help="the recogniser: pocketsphinx (the published tables), moonshine, whisper, or default "
                             "(no asr block: the shipped default for English)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--dump-events", action="store_true")
    parser.add_argument("--extra-front-matter", default="", help="more playbook front matter (a YAML line)")
    parser.add_argument("--wait", type=float, default=3.0, help="seconds to watch after the caller starts")
    args = parser.parse_args()
    args.echo_db = None if args.echo_db == "off" else float(args.echo_db)

    def run():
        d = main(args)
        d.addErrback(lambda f: (f.printTraceback(), None))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()
