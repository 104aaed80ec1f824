"""Where a turn's time goes after the caller stops, per stage, on this machine (print only).

    PYTHONPATH=src .venv/bin/python bench/bench_streaming_stages.py [--repeat N]

- ASR: a ~3 s flite utterance fed to the worker's decoder the way the recogniser does (320 ms steps while the
  caller speaks); then what is left when the turn ends: the last step's audio + ``end_utt`` + hypothesis.
  Shown for the decoder's default search (fwdtree, then fwdflat and bestpath at ``end_utt``) and with the
  second passes off, with the time of the whole-utterance decode for comparison.
Figures are the best of ``--repeat`` runs (the machine is shared; medians wander).
- TTS (flite): one process per text; spawn alone (``flite -t ""``), a short first clause, a full sentence.
"""

from __future__ import annotations

import argparse
import subprocess
import time

import numpy as np
from twisted.internet import defer, task

from activecall.speech.testing import synthesize_pcm

UTTERANCE = "I would like to check the status of my order please."
STEP = 5120  # 320 ms at 16 kHz, StreamingRecognizer.partial_every_ms


def _ms(t0):
    return (time.perf_counter() - t0) * 1000


def asr(pcm, repeat, **config):
    from pocketsphinx import Decoder
    decoder = Decoder(loglevel="FATAL", **config)
    tails, finals, wholes, text = [], [], [], ""
    for _ in range(repeat):
        decoder.start_utt()
        last = (pcm.size - 1) // STEP * STEP
        for i in range(0, last, STEP):
            decoder.process_raw(pcm[i:i + STEP].tobytes(), False, False)
            decoder.hyp()
        t0 = time.perf_counter()
        decoder.process_raw(pcm[last:].tobytes(), False, False)
        t1 = time.perf_counter()
        decoder.end_utt()
        hyp = decoder.hyp()
        finals.append(_ms(t0))
        tails.append((t1 - t0) * 1000)
        text = hyp.hypstr if hyp else ""
        t0 = time.perf_counter()
        decoder.start_utt()
        decoder.process_raw(pcm.tobytes(), False, False)
        decoder.end_utt()
        wholes.append(_ms(t0))
    return min(tails), min(finals), min(wholes), text


def flite(text, repeat, voice="rms"):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(["flite", "-voice", voice, "-t", text, "-o", "/dev/stdout"], stdout=subprocess.DEVNULL,
                       check=True)
        times.append(_ms(t0))
    return min(times)


def same_text(clips, **config):
    """Texts of every clip with the default search and with ``config``; how many differ, and both WERs."""
    from pocketsphinx import Decoder
    from activecall.speech.testing import word_error_rate
    texts = {}
    for label, cfg in (("default", {}), ("changed", config)):
        decoder = Decoder(loglevel="FATAL", **cfg)
        out = []
        for _, pcm in clips:
            decoder.start_utt()
            for i in range(0, pcm.size, STEP):
                decoder.process_raw(pcm[i:i + STEP].tobytes(), False, False)
            decoder.end_utt()
            hyp = decoder.hyp()
            out.append(hyp.hypstr if hyp else "")
        texts[label] = out
    words = sum(len(s.split()) for s, _ in clips)
    wer = {k: sum(word_error_rate(s, t) * len(s.split()) for (s, _), t in zip(clips, v)) / words
           for k, v in texts.items()}
    differ = sum(a != b for a, b in zip(texts["default"], texts["changed"]))
    return differ, wer


@defer.inlineCallbacks
def main(reactor, repeat):
    from activecall.audio import resample, ulaw_decode, ulaw_encode
    sentences = ["I would like to check the status of my order.", "Please transfer me to the billing department.",
                 "Hello, thank you for calling the support line.", "My account number is on the last invoice.",
                 "Can you call me back tomorrow morning?", "Goodbye and have a nice day.",
                 "What time does the store open on Sunday?", "I need to change the address on my account."]
    for voice in ("rms", "kal16", "slt"):
        clips = []
        for s in sentences:
            clips.append((s, (yield synthesize_pcm(s, voice))))
        line = [(s, resample(ulaw_decode(ulaw_encode(resample(p, 16000, 8000))), 8000, 16000)) for s, p in clips]
        for path, cl in (("clean", clips), ("pcmu", line)):
            differ, wer = same_text(cl, fwdflat=False)
            print(f"fwdflat off vs default, {voice} {path}: {differ}/{len(cl)} texts differ, "
                  f"WER {wer['default']:.3f} -> {wer['changed']:.3f}")
    pcm = yield synthesize_pcm(UTTERANCE, "rms")
    pcm = np.concatenate([pcm, np.zeros(3200, dtype=np.int16)])  # 200 ms of the pause the endpointer hears
    print(f"utterance: {pcm.size / 16000:.2f} s, {UTTERANCE!r}")
    for label, config in (("default (fwdtree+fwdflat+bestpath)", {}),
                          ("fwdflat off", {"fwdflat": False}),
                          ("fwdflat+bestpath off", {"fwdflat": False, "bestpath": False})):
        tail, final, whole, text = asr(pcm, repeat, **config)
        print(f"ASR {label}: last step {tail:.1f} ms, end of turn -> final {final:.1f} ms "
              f"(whole-utterance decode {whole:.0f} ms): {text!r}")
    for label, text in (("spawn only (empty text)", ""), ("first clause", "Sure, I can help with that,"),
                        ("full sentence", "Sure, I can help with that, let me look up your order status now."),
                        ("long sentence", "Sure, I can help with that, let me look up the status of the order "
                                          "you placed last week and tell you when it will arrive.")):
        print(f"flite {label}: {flite(text, repeat):.1f} ms ({len(text.split())} words)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    task.react(main, (args.repeat,))
