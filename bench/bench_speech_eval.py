"""Speech evaluation: offline recognisers and voices on telephone-band speech (print only; a Markdown table).

    .venv/bin/python bench/bench_speech_eval.py [--snr 20,10] [--quick]

The evaluation set is built here, from what the machine has, and kept out of the tests' fixtures: ten
held-out call-centre sentences with numbers and names, spoken by several engines and voices (flite rms, slt,
awb, kal16; Piper joe when installed; espeak-ng en-us), then sent through a G.711 line (PCMU 8 kHz and back
with the daemon's own codec path), clean and with white noise at the given SNRs.

Recognisers (each on every (voice, line) utterance, decoded as a call would decode it):
- ``pocketsphinx``: one decoder kept warm, 320 ms steps, end of utterance (its first pass + second passes);
- ``whisper 12s``: our recogniser's engine with its default window (12 s of encoder input);
- ``whisper fit``: the encoder window fitted tightly to the utterance (length + 1 s);
- ``whisper 30s``: the same model with faster-whisper's usual 30 s window (for comparison);
- ``moonshine base-en``: the Moonshine model the ``moonshine-cpp`` package ships, through our
  ``MoonshineEngine`` (the model rewritten at load so its int8 weights feed int8 operators; one thread).

Per engine: WER over all words (text normalised: lower case, no punctuation, every digit as its word,
so "555-1234" and "five five five one two three four" agree), RTF (decode wall time / audio), CPU per
decode (the process CPU time of one whole-utterance decode, all its threads), final latency = wall time
from the end of the turn to the final.  For pocketsphinx that is the last step plus ``end_utt``; for
whisper and moonshine it is measured by streaming each utterance through the recogniser in real time
(20 ms frames on the reactor, decoding during speech on its pool) and calling ``end_utterance`` 300 ms
after the audio (what the end-of-turn model does at a pause), and again with the end of turn right where
the speech ends (trimmed, 0 ms: then a whole decode remains after the end of turn); first partial = wall
time from the first speech frame to the first ``asrDelta``.  Memory: RSS growth when the engine is loaded.

Voices: first audio (wall time from ``synthesize`` to the first chunk handed to the sink on the reactor:
the moment a call's track has audio to send), RTF, and intelligibility = WER of ``whisper 12s`` on the
voice's audio through PCMU.

``--stream-only [--stream N] [--tail-ms MS] [--trim] [--asr moonshine]``: only the streamed whisper (or
moonshine) line, the end of turn ``MS`` after the audio (after the speech itself with ``--trim``).
``--asr pocketsphinx,whisper,moonshine``: the recognisers to evaluate (default all three).
``--ab N``: only the cost of one whole-utterance decode (CPU and wall), whisper 12s and moonshine
alternating utterance by utterance on the PCMU line, N rounds: the A/B that a loaded machine allows.
``--tts-only [--repeat N]``: the voices' first audio only (p50 / p95 / max over N rounds of the ten
sentences), no recognisers: the quick A/B for synthesis changes.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import sys
import time

import numpy as np
from twisted.internet import defer, task

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from activecall.audio import resample, ulaw_decode, ulaw_encode  # noqa: E402
from activecall.speech import registry  # noqa: E402
from activecall.speech.testing import word_edits  # noqa: E402

SENTENCES = [
    "My phone number is five five five, one two three four.",
    "I would like to pay my bill with a credit card.",
    "Please send the invoice to Maria Johnson.",
    "The order number is seven eight two nine.",
    "Can I speak to someone about my account?",
    "My name is David Smith and I live in Boston.",
    "I need to change my appointment to Friday afternoon.",
    "The package was supposed to arrive yesterday.",
    "Yes, that is correct, thank you very much.",
    "Could you repeat the last four digits, please?",
]
DIGITS = "zero one two three four five six seven eight nine".split()


def normalise(text: str) -> list[str]:
    text = text.lower().replace("-", " ")
    text = re.sub(r"\d", lambda m: f" {DIGITS[int(m.group())]} ", text)
    return re.sub(r"[^a-z' ]", " ", text).split()


def wer(reference: str, hypothesis: str) -> tuple[int, int]:
    """(edit distance, reference words)."""
    ref = normalise(reference)
    return word_edits(ref, normalise(hypothesis)), len(ref)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def pcmu_line(pcm: np.ndarray) -> np.ndarray:
    return resample(ulaw_decode(ulaw_encode(resample(pcm, 16000, 8000))), 8000, 16000)


def with_noise(pcm: np.ndarray, snr_db: float, seed: int) -> np.ndarray:
    x = pcm.astype(np.float64)
    active = x[np.abs(x) > 100]
    power = np.mean(active ** 2) if active.size else 1.0
    noise = np.random.default_rng(seed).normal(0, np.sqrt(power / 10 ** (snr_db / 10)), x.size)
    return np.clip(np.rint(x + noise), -32768, 32767).astype(np.int16)


@defer.inlineCallbacks
def synthesize(provider: str, voice, text: str):
    options = {"provider": provider}
    if voice:
        options["speaker"] = voice
    tts = registry.create_synthesizer(options)
    out = []
    start = time.perf_counter()
    first = []

    def sink(pcm):
        if not first:
            first.append(time.perf_counter() - start)
        out.append(pcm)

    yield tts.synthesize(text, sink)
    total = time.perf_counter() - start
    pcm = np.concatenate(out) if out else np.zeros(0, dtype=np.int16)
    return pcm, (first[0] if first else total), total


def pocketsphinx_decode(decoder, pcm: np.ndarray) -> tuple[str, float, float]:
    """(text, decode wall s, final latency s: the last step + end_utt)."""
    start = time.perf_counter()
    decoder.start_utt()
    step = 5120
    last = 0.0
    for i in range(0, pcm.size, step):
        t = time.perf_counter()
        decoder.process_raw(pcm[i:i + step].tobytes(), False, False)
        last = time.perf_counter() - t
    t = time.perf_counter()
    decoder.end_utt()
    tail = time.perf_counter() - t
    hyp = decoder.hyp()
    return (hyp.hypstr if hyp else ""), time.perf_counter() - start, last + tail


@defer.inlineCallbacks
def stream_whisper(reactor, pcm: np.ndarray, tail_ms: int = 300, trim: bool = False, provider: str = "whisper"):
    """Real-time streaming through the recogniser ``provider`` (WhisperRecognizer, MoonshineRecognizer):
    (final text, first partial s, final after end s).
    The end of turn comes ``tail_ms`` after the audio (after its last sample above -40 dBFS with ``trim``:
    the voices pad their output with up to a few hundred ms of near-silence)."""
    results = []
    asr = registry.create_recognizer({"provider": provider, "extra": {"endpointing": "external"}},
                                     lambda r: results.append((time.perf_counter(), r)))
    if trim:
        loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > 328)
        pcm = pcm[:loud[-1] + 1] if loud.size else pcm
    audio = np.concatenate([pcm, np.zeros(tail_ms * 16, dtype=np.int16)])  # the speech, then the pause
    start = time.perf_counter()
    for i in range(0, audio.size, 320):
        asr.feed(audio[i:i + 320])
        due = start + (i + 320) / 16000
        yield task.deferLater(reactor, max(0.0, due - time.perf_counter()), lambda: None)
    ended = time.perf_counter()
    _DECODES.clear()
    asr.end_utterance()
    yield asr.close()
    _LATE.append(len(_DECODES))  # decodes that began after the end of turn (the final waited for them)
    partials = [t for t, r in results if not r.final]
    finals = [(t, r.text) for t, r in results if r.final]
    text = finals[-1][1] if finals else ""
    final_after = (finals[-1][0] - ended) if finals else float("nan")
    first_partial = (partials[0] - start) if partials else float("nan")
    return text, first_partial, final_after


def pct(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


@defer.inlineCallbacks
def main(reactor, args):
    snrs = [float(s) for s in args.snr.split(",") if s]
    voices = [("flite", "rms"), ("flite", "slt"), ("flite", "awb"), ("flite", "kal16"), ("espeak", "en-us")]
    from activecall.speech.tts import piper
    if piper.available():
        voices.insert(0, ("piper", None))
    sentences = SENTENCES[:4] if args.quick else SENTENCES
    if args.tts_only:
        yield tts_only(voices[:2], sentences, args.repeat)
        return

    # -- the voices: synthesis cost and audio ---------------------------------------------------------
    print(f"# evaluation set: {len(sentences)} sentences x {len(voices)} voices; lines: clean, pcmu, "
          + ", ".join(f"pcmu+noise {s:g} dB" for s in snrs), flush=True)
    audio = {}
    tts_rows = []
    for provider, voice in voices:
        firsts, rtfs = [], []
        yield synthesize(provider, voice, "Warm up.")
        for s in sentences:
            pcm, first, total = yield synthesize(provider, voice, s)
            audio[(provider, voice, s)] = pcm
            firsts.append(first * 1000)
            rtfs.append(total / max(pcm.size / 16000, 1e-3))
        tts_rows.append((f"{provider} {voice or 'joe'}", pct(firsts, 50), max(firsts), float(np.mean(rtfs))))

    lines = {"clean": lambda p, k: p, "pcmu": lambda p, k: pcmu_line(p)}
    for snr in snrs:
        lines[f"pcmu+{snr:g}dB"] = (lambda snr: lambda p, k: pcmu_line(with_noise(p, snr, k)))(snr)
    utterances = []  # (line, voice label, sentence, pcm)
    for k, ((provider, voice, s), pcm) in enumerate(audio.items()):
        for name, make in lines.items():
            utterances.append((name, f"{provider} {voice or 'joe'}", s, make(pcm, k)))

    if args.stream_only:
        yield stream_only(reactor, args, [(s, pcm) for line, voice, s, pcm in utterances if line == "pcmu"])
        return
    if args.ab:
        ab_decode_cost([(s, pcm) for line, voice, s, pcm in utterances if line == "pcmu"], args.ab)
        return

    # -- the recognisers ---------------------------------------------------------------------------
    wanted = set(args.asr.split(","))
    asr_rows = []
    by_voice: dict = {}
    if "pocketsphinx" in wanted:
        rss0 = rss_mb()
        from pocketsphinx import Decoder
        decoder = Decoder(loglevel="FATAL")
        ps_mem = rss_mb() - rss0
        errs: dict = {}
        lat, cpu, dec, dur = [], [], 0.0, 0.0
        for line, voice, s, pcm in utterances:
            c = time.process_time()
            text, wall, final = pocketsphinx_decode(decoder, pcm)
            cpu.append((time.process_time() - c) * 1000)
            e, n = wer(s, text)
            errs.setdefault(line, [0, 0])
            errs[line][0] += e
            errs[line][1] += n
            lat.append(final * 1000)
            dec += wall
            dur += pcm.size / 16000
        asr_rows.append(("pocketsphinx", errs, dec / dur, pct(cpu, 50), pct(lat, 50), pct(lat, 95), ps_mem))
        del decoder

    engines = []  # (label, transcribe(pcm) -> text, RSS of the engine)
    if "whisper" in wanted:
        from activecall.speech.asr.whisper import WhisperEngine, shipped_model_dir
        rss0 = rss_mb()
        engine = WhisperEngine(shipped_model_dir(), "int8", threads=1)
        engine.transcribe(np.zeros(16000, dtype=np.int16), "en")
        w_mem = rss_mb() - rss0
        for label, window in (("whisper 12s", 12.0), ("whisper fit", 0.0), ("whisper 30s", 30.0)):
            engines.append((label, (lambda window: lambda pcm: engine.transcribe(pcm, "en", window))(window), w_mem))
    if "moonshine" in wanted:
        from activecall.speech.asr import moonshine
        rss0 = rss_mb()
        t = time.perf_counter()
        m_engine = moonshine.MoonshineEngine(moonshine.shipped_model_dir(), threads=1)
        m_load = time.perf_counter() - t
        m_engine.transcribe(np.zeros(16000, dtype=np.int16))
        print(f"  moonshine base-en loaded (and rewritten) in {m_load:.2f} s", flush=True)
        engines.append(("moonshine base-en", m_engine.transcribe, rss_mb() - rss0))
    for label, transcribe, mem in engines:
        errs, lat, cpu, dec, dur = {}, [], [], 0.0, 0.0
        for line, voice, s, pcm in utterances:
            t, c = time.perf_counter(), time.process_time()
            text = transcribe(pcm)
            wall = time.perf_counter() - t
            cpu.append((time.process_time() - c) * 1000)
            e, n = wer(s, text)
            errs.setdefault(line, [0, 0])
            errs[line][0] += e
            errs[line][1] += n
            if label in ("whisper 12s", "moonshine base-en") and line == "pcmu":
                v = by_voice.setdefault((label, voice), [0, 0])
                v[0] += e
                v[1] += n
            lat.append(wall * 1000)
            dec += wall
            dur += pcm.size / 16000
        asr_rows.append((label, errs, dec / dur, pct(cpu, 50), pct(lat, 50), pct(lat, 95), mem))
        print(f"  {label} done", flush=True)

    # streaming: each recogniser as a call runs it, in real time, PCMU line, every voice
    stream = [(s, pcm) for line, voice, s, pcm in utterances if line == "pcmu"][:args.stream]
    streamed = []
    for provider in [p for p in ("whisper", "moonshine") if p in wanted]:
        for tail_ms, trim in ((300, False), (0, True)):
            firsts, finals, e_sum, n_sum = [], [], 0, 0
            for s, pcm in stream:
                text, first, final = yield stream_whisper(reactor, pcm, tail_ms, trim, provider)
                e, n = wer(s, text)
                e_sum += e
                n_sum += n
                firsts.append(first * 1000)
                finals.append(final * 1000)
            streamed.append((provider, tail_ms, trim, e_sum / max(n_sum, 1), firsts, finals))

    # -- the table -------------------------------------------------------------------------------
    names = list(lines)
    print()
    print("| recogniser | " + " | ".join(f"WER {n}" for n in names)
          + " | RTF | CPU per decode p50 | whole-utterance decode p50 / p95 | RSS |")
    print("|---|" + "---|" * len(names) + "---|---|---|---|")
    for label, errs, rtf, cpu50, p50, p95, mem in asr_rows:
        cells = " | ".join(f"{errs[n][0] / errs[n][1]:.3f}" for n in names)
        print(f"| {label} | {cells} | {rtf:.3f} | {cpu50:.0f} ms | {p50:.0f} / {p95:.0f} ms | +{mem:.0f} MB |")
    print()
    for provider, tail_ms, trim, w, firsts, finals in streamed:
        print(f"{provider} streamed in real time ({len(stream)} PCMU utterances, decode every 500 ms of speech, "
              f"end of turn {tail_ms} ms after the {'speech (trimmed)' if trim else 'audio'}): WER {w:.3f}; "
              f"first partial p50 {pct(firsts, 50):.0f} ms; final after end of turn p50 {pct(finals, 50):.0f} ms, "
              f"p95 {pct(finals, 95):.0f} ms, max {max(finals):.0f} ms")
    print()
    print("| voice | first audio p50 / max | RTF | WER (whisper 12s, PCMU) | WER (moonshine, PCMU) |")
    print("|---|---|---|---|---|")
    for label, p50, worst, rtf in tts_rows:
        cells = []
        for engine in ("whisper 12s", "moonshine base-en"):
            e, n = by_voice.get((engine, label), (0, 0))
            cells.append(f"{e / n:.3f}" if n else "-")
        print(f"| {label} | {p50:.0f} / {worst:.0f} ms | {rtf:.3f} | {cells[0]} | {cells[1]} |")
    print(f"\nload average at the end: {os.getloadavg()}; max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB")


_DECODES: list = []  # start times of whisper decodes (traced by stream_only)
_LATE: list = []  # per streamed utterance: decodes that began after its end of turn


def _trace_decodes(provider: str) -> None:
    from activecall.speech.asr import moonshine, whisper
    module = moonshine if provider == "moonshine" else whisper
    engine = module.shared_engine(module.shipped_model_dir())
    method = "decode" if provider == "moonshine" else "transcribe"  # what the recogniser calls
    transcribe = getattr(engine, method)

    def traced(*a, **kw):
        _DECODES.append(time.perf_counter())
        return transcribe(*a, **kw)
    setattr(engine, method, traced)


@defer.inlineCallbacks
def stream_only(reactor, args, pcmu):
    """Only the streamed whisper line (the quick A/B for recogniser scheduling changes), and how many
    utterances' finals waited for a decode that began after the end of turn (less load-bound than times)."""
    provider = args.asr.split(",")[-1] if args.asr in ("whisper", "moonshine") else "whisper"
    _trace_decodes(provider)
    stream = pcmu[:args.stream]
    firsts, finals, e_sum, n_sum = [], [], 0, 0
    load = os.getloadavg()
    for s, pcm in stream:
        text, first, final = yield stream_whisper(reactor, pcm, args.tail_ms, args.trim, provider)
        e, n = wer(s, text)
        e_sum += e
        n_sum += n
        firsts.append(first * 1000)
        finals.append(final * 1000)
    print(f"{provider} streamed in real time ({len(stream)} PCMU utterances, end of turn {args.tail_ms} ms after "
          f"the {'speech (trimmed)' if args.trim else 'audio'}): WER {e_sum / max(n_sum, 1):.3f}; first partial p50 "
          f"{pct(firsts, 50):.0f} ms; final after end of turn p50 {pct(finals, 50):.0f} ms, p95 "
          f"{pct(finals, 95):.0f} ms, max {max(finals):.0f} ms; finals that waited for a decode begun after the "
          f"end of turn: {sum(1 for n in _LATE if n)} of {len(_LATE)}; load average {load} -> {os.getloadavg()}")


def ab_decode_cost(pcmu, rounds: int) -> None:
    """whisper 12s and moonshine base-en alternately on each PCMU utterance (the same minutes, the same load):
    CPU and wall time of one whole-utterance decode, i.e. what remains after the end of turn when the speech
    runs right up to it (one intra-op thread each)."""
    from activecall.speech.asr import moonshine
    from activecall.speech.asr.whisper import WhisperEngine, shipped_model_dir
    engines = {"whisper 12s": (lambda w: lambda pcm: w.transcribe(pcm, "en", 12.0))(
        WhisperEngine(shipped_model_dir(), "int8", threads=1)),
        "moonshine base-en": moonshine.MoonshineEngine(moonshine.shipped_model_dir(), threads=1).transcribe}
    for transcribe in engines.values():
        transcribe(np.zeros(16000, dtype=np.int16))
    cpu = {k: [] for k in engines}
    wall = {k: [] for k in engines}
    errs = {k: [0, 0] for k in engines}
    load = os.getloadavg()
    seconds = [pcm.size / 16000 for s, pcm in pcmu]
    for _ in range(rounds):
        for s, pcm in pcmu:
            for label, transcribe in engines.items():
                t, c = time.perf_counter(), time.process_time()
                text = transcribe(pcm)
                wall[label].append((time.perf_counter() - t) * 1000)
                cpu[label].append((time.process_time() - c) * 1000)
                e, n = wer(s, text)
                errs[label][0] += e
                errs[label][1] += n
    print(f"# {len(pcmu)} PCMU utterances ({min(seconds):.1f}-{max(seconds):.1f} s, p50 {pct(seconds, 50):.1f} s) x "
          f"{rounds} rounds, alternating; load average {load} -> {os.getloadavg()}")
    print("| recogniser | WER PCMU | CPU per decode p50 / p95 / max | wall p50 / p95 | decodes within 150 ms of CPU |")
    print("|---|---|---|---|---|")
    for label in engines:
        c, w = cpu[label], wall[label]
        fast = sum(1 for x in c if x <= 150)
        print(f"| {label} | {errs[label][0] / errs[label][1]:.3f} | {pct(c, 50):.0f} / {pct(c, 95):.0f} / "
              f"{max(c):.0f} ms | {pct(w, 50):.0f} / {pct(w, 95):.0f} ms | {fast} of {len(c)} |")


@defer.inlineCallbacks
def tts_only(voices, sentences, repeat):
    print(f"# first audio: {len(sentences)} sentences x {repeat} rounds; load average {os.getloadavg()}")
    print("| voice | first audio p50 / p95 / max | RTF |")
    print("|---|---|---|")
    for provider, voice in voices:
        firsts, rtfs = [], []
        yield synthesize(provider, voice, "Warm up.")
        for _ in range(repeat):
            for s in sentences:
                pcm, first, total = yield synthesize(provider, voice, s)
                firsts.append(first * 1000)
                rtfs.append(total / max(pcm.size / 16000, 1e-3))
        print(f"| {provider} {voice or 'joe'} | {pct(firsts, 50):.0f} / {pct(firsts, 95):.0f} / {max(firsts):.0f} ms "
              f"| {float(np.mean(rtfs)):.3f} |", flush=True)
    print(f"load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--snr", default="10", help="comma-separated SNRs (dB) of added white noise")
    parser.add_argument("--quick", action="store_true", help="4 sentences instead of 10")
    parser.add_argument("--stream", type=int, default=12, help="utterances streamed in real time")
    parser.add_argument("--ab", type=int, default=0,
                        help="only the whole-decode cost, whisper and moonshine alternating, N rounds (PCMU)")
    parser.add_argument("--asr", default="pocketsphinx,whisper,moonshine",
                        help="comma-separated recognisers to evaluate (pocketsphinx, whisper, moonshine)")
    parser.add_argument("--stream-only", action="store_true", help="only the streamed whisper line")
    parser.add_argument("--tail-ms", type=int, default=300, help="pause between the audio and the end of turn")
    parser.add_argument("--trim", action="store_true", help="cut the voices' trailing near-silence first")
    parser.add_argument("--tts-only", action="store_true", help="the voices' first audio only (piper, flite rms)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of the sentences with --tts-only")
    args = parser.parse_args()
    task.react(main, (args,))
