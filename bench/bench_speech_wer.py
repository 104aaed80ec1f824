"""Intelligibility of the offline TTS voices, measured with the offline ASR (print only).

    .venv/bin/python bench/bench_speech_wer.py

Each sentence is synthesised by flite, then recognised by pocketsphinx
(utterance decoded in 320 ms steps, as the recogniser does), clean and
through an 8 kHz PCMU line (linear-interpolation and sinc upsampling back to
16 kHz).  Prints the word error rate per voice and path.
"""

from __future__ import annotations

import numpy as np
from twisted.internet import defer, task

from activecall.audio import resample, ulaw_decode, ulaw_encode
from activecall.speech.testing import synthesize_pcm, word_error_rate

SENTENCES = [
    "I would like to check the status of my order.",
    "Please transfer me to the billing department.",
    "Hello, thank you for calling the support line.",
    "My account number is on the last invoice.",
    "Can you call me back tomorrow morning?",
    "Goodbye and have a nice day.",
]


def line(pcm, upsample):
    n8 = ulaw_decode(ulaw_encode(resample(pcm, 16000, 8000))).astype(np.float64)
    if upsample == "sinc":
        return resample(n8.astype(np.int16), 8000, 16000)
    return np.rint(np.interp(np.arange(n8.size * 2) / 2, np.arange(n8.size), n8)).astype(np.int16)


def recognise(decoder, pcm):
    decoder.start_utt()
    for i in range(0, pcm.size, 5120):
        decoder.process_raw(pcm[i:i + 5120].tobytes(), False, False)
    decoder.end_utt()
    hyp = decoder.hyp()
    return hyp.hypstr if hyp else ""


@defer.inlineCallbacks
def main(reactor):
    from pocketsphinx import Decoder
    for voice in ("rms", "kal16", "awb", "slt", "kal"):
        audio = []
        for s in SENTENCES:
            audio.append((yield synthesize_pcm(s, voice)))
        words = sum(len(s.split()) for s in SENTENCES)
        row = []
        for path in ("clean", "pcmu+interp", "pcmu+sinc"):
            decoder = Decoder(loglevel="FATAL")  # fresh per path: CMN adapts across utterances
            errors = 0.0
            for s, pcm in zip(SENTENCES, audio):
                p = pcm if path == "clean" else line(pcm, path.split("+")[1])
                errors += word_error_rate(s, recognise(decoder, p)) * len(s.split())
            row.append(f"{path} WER {errors / words:.2f}")
        print(f"flite {voice}: " + ", ".join(row) + f" ({words} words)")


if __name__ == "__main__":
    task.react(main)
