"""Smart Turn v3.2 end-of-turn inference cost (print only): one call = features + one onnxruntime run on 8 s.

    .venv/bin/python bench/bench_eou.py [--runs 50] [--turn-seconds 8] [--threads 1] [--spin 0|1]
                                        [--opt all|extended|basic] [--batch 1] [--model PATH]

The audio is flite speech (two sentences, voice rms, repeated), cut to the
last ``--turn-seconds`` (default 8: the model's whole window; a shorter turn
is zero-padded at the start, as the detector does).  Prints the model load
time, then per call wall and **CPU time of the whole process** (onnxruntime's
intra-op threads included, so spinning threads show), p50/p95/max, split into
features and the ONNX run; the features both ways (the reference
``log_mel(last_window(.))`` and ``turn_log_mel``, which skips the padding),
and with ``--batch N`` the cost per item of one run over N windows.  Nothing is
asserted; docs/benchmarks.md ("End-of-turn inference") records the output.
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


def show(name, values, unit="ms", runs=None):
    print(f"{name:>26}: p50 {percentile(values, 50):6.1f} {unit}  p95 {percentile(values, 95):6.1f} {unit}  "
          f"max {max(values):6.1f} {unit}  ({runs or len(values)} runs)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--turn-seconds", type=float, default=8.0, help="length of the turn's audio (s)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra_op_num_threads")
    parser.add_argument("--spin", choices=("0", "1"), help="session.intra_op.allow_spinning (onnxruntime's "
                        "default: 1; matters with --threads > 1)")
    parser.add_argument("--opt", choices=("all", "extended", "basic"), default="all",
                        help="graph optimisation level")
    parser.add_argument("--batch", type=int, default=1, help="windows per session.run (the batch dimension)")
    parser.add_argument("--model", help="another Smart Turn ONNX file")
    args = parser.parse_args()

    import onnxruntime as ort
    print(f"python {platform.python_version()}, onnxruntime {ort.__version__}, numpy {np.__version__}, "
          f"cpus {len(os.sched_getaffinity(0))}, load {os.getloadavg()[0]:.2f}")
    speech = np.concatenate([flite(t) for t in TEXTS * 4])
    audio = speech[-int(args.turn_seconds * 16000):] if args.turn_seconds < 8 else speech[: features.WINDOW_SAMPLES]
    print(f"audio: {audio.size / 16000:.2f} s; threads {args.threads}, spin {args.spin or 'default'}, "
          f"opt {args.opt}, batch {args.batch}")

    t = time.perf_counter()
    model = SmartTurnModel(path=args.model, threads=args.threads)
    if args.spin is not None or args.opt != "all":  # a session of its own with these options
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                       "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                       "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}[args.opt]
        if args.spin is not None:
            so.add_session_config_entry("session.intra_op.allow_spinning", args.spin)
        model.session = ort.InferenceSession(model.path, sess_options=so, providers=["CPUExecutionProvider"])
    print(f"model load: {(time.perf_counter() - t) * 1000:.0f} ms")
    model.predict(audio)  # warm-up: the first run allocates

    x = audio.astype(np.float32) / 32768.0
    wall, cpu, feat_cpu, onnx_cpu, ref_cpu = [], [], [], [], []
    for _ in range(args.runs):
        c0 = time.process_time()
        features.log_mel(features.last_window(x))
        ref_cpu.append((time.process_time() - c0) * 1000)
        w0, c0 = time.perf_counter(), time.process_time()
        mel = features.turn_log_mel(x)
        c1 = time.process_time()
        model.session.run(None, {"input_features": np.repeat(mel[None], args.batch, axis=0)})
        w2, c2 = time.perf_counter(), time.process_time()
        wall.append((w2 - w0) * 1000)
        cpu.append((c2 - c0) * 1000)
        feat_cpu.append((c1 - c0) * 1000)
        onnx_cpu.append((c2 - c1) * 1000 / args.batch)
    print(f"p = {model.predict(audio):.3f} on this audio")
    show("wall (features + run)", wall, runs=args.runs)
    show("CPU (features + run)", cpu, runs=args.runs)
    show("features CPU, reference", ref_cpu)
    show("features CPU, turn_log_mel", feat_cpu)
    show(f"ONNX run CPU per item (x{args.batch})", onnx_cpu)
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
