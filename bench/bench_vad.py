"""Speech figures (print only): VAD cost per stream, silero batched across N calls, flite TTS speed, pocketsphinx RTF.

    .venv/bin/python bench/bench_vad.py [--streams 100] [--seconds 60]

The audio is flite speech separated by quiet gaps over -50 dBFS noise
(activecall.speech.testing.labelled_speech), repeated to ``--seconds``.
Nothing here is asserted; docs/speech.md records the output.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
from twisted.internet import defer, task

from activecall.speech.base import TtsOptions, VadOptions
from activecall.speech.testing import labelled_speech
from activecall.speech.vad.silero import CONTEXT, WINDOW, SileroModel
from activecall.speech.tts.flite import FliteSynthesizer

TEXTS = ["Hello, thank you for calling the support line.", "I would like to check the status of my order.",
         "Please transfer me to the billing department.", "Goodbye."]


def bench_silero_single(model, pcm):
    windows = pcm[: pcm.size // WINDOW * WINDOW].reshape(-1, WINDOW).astype(np.float32) / 32768
    state = np.zeros((2, 1, 128), np.float32)
    context = np.zeros(CONTEXT, np.float32)
    t = time.perf_counter()
    for w in windows:
        _, state = model.run(np.concatenate([context, w])[None, :], state)
        context = w[-CONTEXT:]
    return time.perf_counter() - t, len(windows)


def bench_silero_batched(model, pcm, streams):
    windows = pcm[: pcm.size // WINDOW * WINDOW].reshape(-1, WINDOW).astype(np.float32) / 32768
    state = np.zeros((2, streams, 128), np.float32)
    context = np.zeros((streams, CONTEXT), np.float32)
    t = time.perf_counter()
    for w in windows:  # one run per window period carries every stream's window
        batch = np.concatenate([context, np.broadcast_to(w, (streams, WINDOW))], axis=1)
        _, state = model.run(batch, state)
        context = batch[:, -CONTEXT:]
    return time.perf_counter() - t, len(windows)


def bench_webrtc(pcm, mode):
    import webrtcvad
    vad = webrtcvad.Vad(mode)
    frames = pcm[: pcm.size // 480 * 480].reshape(-1, 480)
    t = time.perf_counter()
    for f in frames:
        vad.is_speech(f.tobytes(), 16000)
    return time.perf_counter() - t


@defer.inlineCallbacks
def bench_flite(voice, text):
    synth = FliteSynthesizer(TtsOptions(speaker=voice))
    first = {}
    t = time.perf_counter()
    samples = yield synth.synthesize(text, lambda c: first.setdefault("t", time.perf_counter()))
    return time.perf_counter() - t, first["t"] - t, samples / 16000


def bench_pocketsphinx(pcm):
    from pocketsphinx import Decoder
    t = time.perf_counter()
    d = Decoder(loglevel="FATAL")
    load = time.perf_counter() - t
    t = time.perf_counter()
    d.start_utt()
    for i in range(0, pcm.size, 5120):
        d.process_raw(pcm[i:i + 5120].tobytes(), False, False)
        d.hyp()
    d.end_utt()
    return load, time.perf_counter() - t


@defer.inlineCallbacks
def main(reactor, args):
    audio = yield labelled_speech(TEXTS, gap_ms=(1500, 1000, 2000))
    reps = int(np.ceil(args.seconds * 16000 / audio.pcm.size))
    pcm = np.tile(audio.pcm, reps)[: args.seconds * 16000]
    secs = pcm.size / 16000
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}, "
          f"audio {secs:.0f} s of 16 kHz")
    import onnxruntime
    t = time.perf_counter()
    model = SileroModel(threads=1)
    print(f"silero load (onnxruntime {onnxruntime.__version__}, 1 thread): {(time.perf_counter() - t) * 1000:.0f} ms")
    took, n = bench_silero_single(model, pcm)
    print(f"silero, 1 stream, 1 run per window: {took * 1000:.0f} ms, {took / n * 1e6:.0f} us/window, RTF {took / secs:.4f}")
    for streams in (10, 100):
        took, n = bench_silero_batched(model, pcm, streams)
        print(f"silero, {streams} streams batched: {took * 1000:.0f} ms total, {took / n * 1e6:.0f} us/batch, "
              f"RTF per stream {took / secs / streams:.5f}, CPU share of one core for all {took / secs:.3f}")
    for mode in (0, 2, 3):
        took = bench_webrtc(pcm, mode)
        print(f"webrtcvad mode {mode}: {took * 1000:.1f} ms, RTF {took / secs:.5f}")
    for voice in ("rms", "kal16", "slt"):
        total, first, dur = yield bench_flite(voice, " ".join(TEXTS))
        print(f"flite {voice}: {dur:.1f} s of audio in {total * 1000:.0f} ms (RTF {total / dur:.3f}), "
              f"first audio after {first * 1000:.0f} ms")
    load, took = bench_pocketsphinx(audio.pcm)
    print(f"pocketsphinx: load {load * 1000:.0f} ms, {audio.pcm.size / 16000:.1f} s decoded in {took * 1000:.0f} ms "
          f"(RTF {took / (audio.pcm.size / 16000):.3f}, partial hypothesis every 320 ms)")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=int, default=60)
    a = p.parse_args()
    task.react(main, (a,))
