"""How late the reactor runs a 20 ms media tick while pocketsphinx streams decode.

Runs the real reactor (asyncio, as the daemon does) with the daemon's own
``MediaClock``; each tick feeds every stream one 20 ms frame of flite speech
(like a call's inbound leg) and records how late the tick ran against its
absolute deadline.  A decoder that holds the GIL on the reactor's process
shows up here as 100 ms+ lateness; decoding in worker processes should leave
only scheduling noise.

    .venv/bin/python bench/bench_reactor_stall.py --streams 4 --seconds 20
    .venv/bin/python bench/bench_reactor_stall.py --gil   # which native calls hold the GIL
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from twisted.internet import asyncioreactor

asyncioreactor.install()

import numpy as np  # noqa: E402
from twisted.internet import defer, reactor, task  # noqa: E402

from activecall.media.clock import MediaClock  # noqa: E402
from activecall.speech import registry  # noqa: E402
from activecall.speech.testing import labelled_speech  # noqa: E402

SENTENCES = [
    "I would like to check the status of my order.",
    "Please transfer me to the billing department.",
    "My account number is four five six seven.",
    "Can you tell me when the package will arrive?",
]


def percentile(values, p):
    return float(np.percentile(np.asarray(values), p)) if values else 0.0


@defer.inlineCallbacks
def run(args):
    audio = yield labelled_speech(SENTENCES, gap_ms=(900, 1400))
    pcm = np.tile(audio.pcm, int(np.ceil(args.seconds * 16000 / audio.pcm.size)))[: int(args.seconds * 16000)]
    results = [[] for _ in range(args.streams)]
    recognizers = [registry.create_recognizer({"provider": "pocketsphinx"}, results[i].append)
                   for i in range(args.streams)]
    clock = MediaClock(reactor)
    lateness: list[float] = []
    wakeups: list[float] = []  # reactor time of each tick call: gaps show stalls even across re-anchors
    done = defer.Deferred()
    state = {"frame": 0}

    def tick():
        n = state["frame"]
        deadline = clock._start + clock.ticks * clock.interval
        now = reactor.seconds()
        lateness.append(max(0.0, now - deadline))
        if not wakeups or now > wakeups[-1]:
            wakeups.append(now)
        frame = pcm[n * 320:(n + 1) * 320]
        state["frame"] += 1
        if frame.size < 320:
            clock.remove(tick)
            done.callback(None)
            return
        for i, asr in enumerate(recognizers):
            # offset each stream so their utterances do not end on the same tick
            k = (n + i * 37) % (pcm.size // 320)
            asr.feed(pcm[k * 320:(k + 1) * 320])

    cpu0 = time.process_time()
    wall0 = time.monotonic()
    clock.add(tick)
    yield done
    wall = time.monotonic() - wall0
    cpu = time.process_time() - cpu0
    yield defer.DeferredList([asr.close() for asr in recognizers])
    pool = sys.modules.get("activecall.speech.asr.pool")
    if pool is not None:
        yield pool.default_pool().stop()
    ms = [x * 1000 for x in lateness]
    gaps = [b * 1000 - a * 1000 for a, b in zip(wakeups, wakeups[1:])]
    finals = sum(1 for r in results for x in r if x.final)
    print(f"streams={args.streams} seconds={args.seconds} cpus={os.cpu_count()} ticks={len(ms)}")
    print(f"tick lateness ms: p50={percentile(ms, 50):.1f} p99={percentile(ms, 99):.1f} max={max(ms):.1f} "
          f"ticks>40ms={sum(1 for x in ms if x > 40)} ticks>100ms={sum(1 for x in ms if x > 100)}")
    worst = int(np.argmax(gaps))
    print(f"gap between clock wake-ups ms: p99={percentile(gaps, 99):.1f} max={gaps[worst]:.1f} "
          f"(at {wakeups[worst] - wakeups[0]:.2f} s)")
    print(f"media clock: late_ticks={clock.late_ticks} reanchors={clock.reanchors}; "
          f"daemon-process CPU {cpu / wall:.0%} of one core; finals={finals}")


# -- --gil: which native calls let the reactor thread run while they work in another thread ---------

def gil_probe(job, seconds: float = 2.0) -> tuple[float, float]:
    """Run ``job`` in a loop on a thread; (max ms the main thread woke late from 1 ms sleeps, ms per job)."""
    import threading
    stop = threading.Event()
    calls = []

    def loop():
        while not stop.is_set():
            t = time.perf_counter()
            job()
            calls.append(time.perf_counter() - t)

    thread = threading.Thread(target=loop)
    thread.start()
    worst = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        time.sleep(0.001)
        worst = max(worst, time.perf_counter() - t - 0.001)
    stop.set()
    thread.join()
    return worst * 1000, (sum(calls) / len(calls) * 1000) if calls else 0.0


def per_frame_us(fn, frames: int = 2000) -> float:
    t = time.perf_counter()
    for _ in range(frames):
        fn()
    return (time.perf_counter() - t) / frames * 1e6


def gil_report() -> None:
    rng = np.random.default_rng(1)
    speechy = (rng.standard_normal(16000 * 2) * 3000).astype(np.int16)
    print("native call in a thread -> worst main-thread wake-up lateness (ms) / ms per call")
    print("  nothing: %.1f" % gil_probe(lambda: time.sleep(0.01))[0])
    from pocketsphinx import Decoder
    decoder = Decoder(loglevel="FATAL")
    decoder.start_utt()
    chunk = speechy[:5120].tobytes()
    print("  pocketsphinx process_raw 320 ms: %.1f / %.1f" % gil_probe(lambda: decoder.process_raw(chunk, False, False)))
    print("  pocketsphinx Decoder() (model load): %.1f / %.1f" % gil_probe(lambda: Decoder(loglevel="FATAL"), 3))
    from activecall.speech.vad.silero import SileroModel, CONTEXT
    model = SileroModel()
    jobs = [(np.zeros((2, 128), np.float32), np.zeros(CONTEXT, np.float32),
             rng.standard_normal((10, 512)).astype(np.float32) * 0.1) for _ in range(100)]
    print("  silero run_streams, 100 streams x 10 windows: %.1f / %.1f" % gil_probe(lambda: model.run_streams(jobs)))
    big = [(j[0], j[1], rng.standard_normal((1, 512)).astype(np.float32)) for j in jobs * 10]
    print("  silero one run, 1000 windows: %.1f / %.1f" % gil_probe(lambda: model.run_streams(big)))
    print("codec work inline on the reactor, µs per 20 ms frame (one call, one direction)")
    from activecall.media import codecs
    frame = speechy[:320]
    for cls in (codecs.PcmuCodec, codecs.G722Codec, codecs.OpusCodec):
        try:
            enc, dec = cls(), cls()
        except Exception as e:  # an optional codec library missing
            print(f"  {cls.__name__}: unavailable ({e})")
            continue
        payload = enc.encode(frame)
        print(f"  {cls.__name__}: encode {per_frame_us(lambda: enc.encode(frame)):.0f}, "
              f"decode {per_frame_us(lambda: dec.decode(payload)):.0f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--gil", action="store_true", help="only check which native calls release the GIL")
    args = parser.parse_args()
    if args.gil:
        return gil_report()
    failures = []
    task.react(lambda _: run(args).addErrback(failures.append))
    if failures:
        failures[0].printTraceback()
        sys.exit(1)


if __name__ == "__main__":
    main()
