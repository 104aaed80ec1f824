"""Answering-machine detection cost per 20 ms frame (call/amd.py), on a flite voicemail greeting + beep.

    PYTHONPATH=src python bench/bench_amd.py [--repeat 20]

Prints the mean and p99 time per frame (the detector runs on each outbound call's first seconds, on the
reactor thread, inside the leg's play-out)."""

import argparse
import time

import numpy as np
from twisted.internet import defer, task

from activecall.call.amd import AmdSettings, AnsweringMachineDetector
from activecall.speech.testing import synthesize_pcm

GREETING = ("Hi, you have reached the voicemail of John Smith. I am not available to take your call "
            "right now. Please leave your name and number after the tone.")


@defer.inlineCallbacks
def main(reactor, repeat):
    speech = yield synthesize_pcm(GREETING)
    t = np.arange(8000) / 16000
    audio = np.concatenate([speech, (np.sin(2 * np.pi * 1000 * t) * 8000).astype(np.int16)])
    frames = [audio[i:i + 320] for i in range(0, len(audio) - 319, 320)]
    times = []
    for _ in range(repeat):
        # a fresh detector that never finishes early: every frame is analysed (beep search included)
        d = AnsweringMachineDetector(AmdSettings(greeting=10**9, maximumWords=10**9, totalAnalysisTime=10**9,
                                                 initialSilence=10**9, afterGreetingSilence=10**9),
                                     lambda *a: None)
        for f in frames:
            t0 = time.perf_counter()
            d._frame(f)
            times.append(time.perf_counter() - t0)
    us = np.array(times) * 1e6
    print(f"{len(frames)} frames x {repeat}: mean {us.mean():.1f} us, p50 {np.percentile(us, 50):.1f} us, "
          f"p99 {np.percentile(us, 99):.1f} us per 20 ms frame")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    task.react(main, [args.repeat])
