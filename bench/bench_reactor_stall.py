"""How late the reactor runs a 20 ms media tick while pocketsphinx streams decode.

Runs the real reactor (asyncio, as the daemon does) with the daemon's own
``MediaClock``; each tick feeds every stream one 20 ms frame of flite speech
(like a call's inbound leg) and records how late the tick ran against its
absolute deadline.  A decoder that holds the GIL on the reactor's process
shows up here as 100 ms+ lateness; decoding in worker processes should leave
only scheduling noise.

    .venv/bin/python bench/bench_reactor_stall.py --streams 4 --seconds 20
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    failures = []
    task.react(lambda _: run(args).addErrback(failures.append))
    if failures:
        failures[0].printTraceback()
        sys.exit(1)


if __name__ == "__main__":
    main()
