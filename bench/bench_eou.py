"""Smart Turn v3.2 end-of-turn inference time (print only): one call = features + one onnxruntime run on 8 s.

    .venv/bin/python bench/bench_eou.py [--runs 50] [--threads 1]

The audio is 8 s of flite speech (two sentences, voice rms), so the input is
what a caller's long turn gives the detector.  Prints the model
load time, then wall and CPU (process time of this thread) per call, p50/p95/
max, split into features and the ONNX run.  Nothing is asserted;
docs/benchmarks.md and docs/speech.md record the output.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import subprocess
import time
import wave

import numpy as np

from activecall.speech.eou import features
from activecall.speech.eou.smart_turn import SmartTurnModel

TEXTS = ["Hello, thank you for calling the support line.", "I would like to check the status of my order."]


def flite(text: str) -> np.ndarray:
    """int16 16 kHz speech of ``text`` (flite's rms voice speaks at 16 kHz)."""
    out = subprocess.run(["flite", "-voice", "rms", "-t", text, "-o", "/dev/stdout"], capture_output=True,
                         check=True).stdout
    with wave.open(io.BytesIO(out)) as w:
        assert w.getframerate() == 16000, w.getframerate()
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")


def percentile(values, q):
    return float(np.percentile(np.asarray(values), q))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra_op_num_threads")
    args = parser.parse_args()

    import onnxruntime
    print(f"python {platform.python_version()}, onnxruntime {onnxruntime.__version__}, numpy {np.__version__}, "
          f"cpus {len(os.sched_getaffinity(0))}, load {os.getloadavg()[0]:.2f}")
    audio = np.concatenate([flite(t) for t in TEXTS * 4])[: features.WINDOW_SAMPLES]
    print(f"audio: {audio.size / 16000:.2f} s")

    t = time.perf_counter()
    model = SmartTurnModel(threads=args.threads)
    print(f"model load: {(time.perf_counter() - t) * 1000:.0f} ms")
    model.predict(audio)  # warm-up: the first run allocates

    wall, cpu, feat, onnx = [], [], [], []
    for _ in range(args.runs):
        w0, c0 = time.perf_counter(), time.thread_time()
        mel = features.log_mel(features.last_window(audio.astype(np.float32) / 32768.0))
        w1 = time.perf_counter()
        model.session.run(None, {"input_features": mel[None]})
        w2, c2 = time.perf_counter(), time.thread_time()
        wall.append((w2 - w0) * 1000)
        cpu.append((c2 - c0) * 1000)
        feat.append((w1 - w0) * 1000)
        onnx.append((w2 - w1) * 1000)
    print(f"p = {model.predict(audio):.3f} on this audio")
    for name, values in (("wall", wall), ("cpu", cpu), ("features (wall)", feat), ("onnx run (wall)", onnx)):
        print(f"{name:>16}: p50 {percentile(values, 50):6.1f} ms  p95 {percentile(values, 95):6.1f} ms  "
              f"max {max(values):6.1f} ms  ({args.runs} runs)")
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
