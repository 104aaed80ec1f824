"""Noise suppression for the recogniser: word error of pocketsphinx on noisy speech, and CPU per call.

    PYTHONPATH=src .venv/bin/python bench/bench_denoise.py [--snr 0,10,20] [--voices rms,slt] [--rnnoise]

Six flite sentences (voices rms and slt), white and babble-like noise (speech-shaped: low-passed,
amplitude-modulated) added at each SNR, some scaled down 20 dB (a quiet caller), then recognised
by pocketsphinx with a fresh decoder per condition: raw, through ``speech/denoise.py`` at noise
suppression levels 1-3 (with its gain controller), and, with ``--rnnoise`` when the ``pyrnnoise``
package is importable, through RNNoise (48 kHz, resampled both ways).  CPU: seconds of processing
per second of audio for one call, on this machine.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from twisted.internet import defer, task

from activecall.audio import resample
from activecall.speech.denoise import Denoiser
from activecall.speech.testing import synthesize_pcm, word_error_rate

SENTENCES = [
    "I would like to check the status of my order.",
    "Please transfer me to the billing department.",
    "Hello, thank you for calling the support line.",
    "My account number is on the last invoice.",
    "Can you call me back tomorrow morning?",
    "Goodbye and have a nice day.",
]


def noise(kind: str, n: int, rng) -> np.ndarray:
    white = rng.normal(0, 1, n)
    if kind == "white":
        return white
    # speech-shaped "babble": low-passed noise with a 4 Hz syllable-like envelope
    kernel = np.hanning(9)
    shaped = np.convolve(white, kernel / kernel.sum(), mode="same")
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * 4 * np.arange(n) / 16000 + rng.uniform(0, 6))
    return shaped * envelope


def mix(pcm, kind, snr_db, gain_db, rng):
    s = pcm.astype(np.float64)
    nz = noise(kind, s.size, rng)
    p_s = np.mean(s[np.abs(s) > 300] ** 2)
    nz *= np.sqrt(p_s / 10 ** (snr_db / 10) / np.mean(nz ** 2))
    out = (s + nz) * 10 ** (gain_db / 20)
    return np.clip(np.rint(out), -32768, 32767).astype(np.int16)


def recognise(pcm):
    from pocketsphinx import Decoder
    decoder = Decoder(loglevel="FATAL")
    decoder.start_utt()
    for i in range(0, pcm.size, 5120):
        decoder.process_raw(pcm[i:i + 5120].tobytes(), False, False)
    decoder.end_utt()
    hyp = decoder.hyp()
    return hyp.hypstr if hyp else ""


def through_webrtc(level):
    def run(pcm):
        d = Denoiser(level=level)
        out = [d.process(pcm[i:i + 320]) for i in range(0, pcm.size - 319, 320)]
        return np.concatenate(out)
    return run


def through_rnnoise(pcm):
    from pyrnnoise import rnnoise
    state = rnnoise.create()
    up = resample(pcm, 16000, 48000)
    out = []
    for i in range(0, up.size - 479, 480):
        frame, _ = rnnoise.process_mono_frame(state, up[i:i + 480])
        out.append(np.asarray(frame, dtype=np.int16).reshape(-1))
    rnnoise.destroy(state)
    return resample(np.concatenate(out), 48000, 16000)


@defer.inlineCallbacks
def main(reactor, args):
    clips = []
    for voice in args.voices.split(","):
        for s in SENTENCES:
            pcm = yield synthesize_pcm(s, voice)
            clips.append((s, np.concatenate([np.zeros(8000, np.int16), pcm, np.zeros(8000, np.int16)])))
    paths = [("raw", lambda p: p)] + [(f"webrtc ns{lv}", through_webrtc(lv)) for lv in (1, 2, 3)]
    if args.rnnoise:
        try:
            import pyrnnoise  # noqa: F401
            paths.append(("rnnoise", through_rnnoise))
        except ImportError:
            print("pyrnnoise not importable: RNNoise skipped")
    snrs = [float(x) for x in args.snr.split(",")]
    print(f"{'path':<12} " + " ".join(f"{k[0]}{snr:>4.0f}dB{'/q' if q else '  '}" for k in ("white", "babble")
                                        for snr in snrs for q in (False, True)) + "   mean   cpu/call")
    for name, fn in paths:
        wers, spent, audio_s = [], 0.0, 0.0
        for kind in ("white", "babble"):
            for snr in snrs:
                for gain in (0, -20):
                    rng = np.random.default_rng(7)
                    errors = []
                    for text, pcm in clips:
                        noisy = mix(pcm, kind, snr, gain, rng)
                        t = time.perf_counter()
                        cleaned = fn(noisy)
                        spent += time.perf_counter() - t
                        audio_s += noisy.size / 16000
                        errors.append(word_error_rate(text, recognise(cleaned)))
                    wers.append(float(np.mean(errors)))
        print(f"{name:<12} " + " ".join(f"{w:>10.2f}" for w in wers) + f"   {np.mean(wers):.3f}  {100 * spent / audio_s:.2f}%",
              flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--snr", default="0,10,20")
    parser.add_argument("--rnnoise", action="store_true")
    parser.add_argument("--voices", default="rms,slt")
    args = parser.parse_args()
    task.react(main, [args])
