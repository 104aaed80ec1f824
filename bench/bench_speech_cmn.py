"""pocketsphinx on G.711 legs: where the narrowband cepstral-mean start comes from (print only).

    .venv/bin/python bench/bench_speech_cmn.py

1. Learns the cepstral mean of flite speech (voices awb and slt, sentences not
   used for scoring) after the daemon's PCMU codec (16 -> 8 kHz, μ-law, 8 -> 16
   kHz resampler), by decoding it with one warmed decoder and reading
   ``get_cmn`` (the value kept as ``NARROWBAND_CMN``).
2. Scores the *first utterance of a call*: each sentence on a fresh decoder,
   through PCMU and PCMA (flite rms and kal16), with the model's default start and with the
   narrowband one; and clean 16 kHz with the narrowband start (it hurts there).
"""

from __future__ import annotations

import numpy as np
from twisted.internet import defer, task

from activecall.media.codecs import PcmaCodec, PcmuCodec
from activecall.speech.asr.pocketsphinx import NARROWBAND_CMN
from activecall.speech.testing import frames, synthesize_pcm, word_error_rate

LEARN = ["The weather will be sunny in the afternoon.", "Our office is closed on public holidays.",
         "Press one for sales or two for support.", "We will send you a confirmation by email."]
SCORE = ["I would like to check the status of my order.", "Please transfer me to the billing department.",
         "Hello, thank you for calling the support line.", "My account number is on the last invoice.",
         "Can you call me back tomorrow morning?", "Goodbye and have a nice day."]


def leg(pcm: np.ndarray, codec_cls) -> np.ndarray:
    sender, receiver = codec_cls(), codec_cls()
    return np.concatenate([receiver.decode(sender.encode(f)) for f in frames(pcm) if f.size == 320])


def recognise(decoder, pcm: np.ndarray) -> str:
    decoder.start_utt()
    for i in range(0, pcm.size, 5120):
        decoder.process_raw(pcm[i:i + 5120].astype("<i2").tobytes(), False, False)
    decoder.end_utt()
    hyp = decoder.hyp()
    return hyp.hypstr if hyp else ""


def first_utterance_wer(audio, transform, **config) -> float:
    from pocketsphinx import Decoder
    errors = sum(word_error_rate(s, recognise(Decoder(loglevel="FATAL", **config), transform(p))) * len(s.split())
                 for s, p in zip(SCORE, audio))
    return errors / sum(len(s.split()) for s in SCORE)


@defer.inlineCallbacks
def main(reactor):
    from pocketsphinx import Decoder
    warm = Decoder(loglevel="FATAL")
    for text in LEARN:
        for voice in ("awb", "slt"):
            recognise(warm, leg((yield synthesize_pcm(text, voice)), PcmuCodec))
    print("default cmninit   :", Decoder(loglevel="FATAL").get_cmn(False))
    print("learnt on PCMU    :", warm.get_cmn(False))
    print("NARROWBAND_CMN    :", NARROWBAND_CMN)
    nb = {"cmninit": NARROWBAND_CMN}
    print(f"first utterance of a call, {len(SCORE)} sentences; WER default start / narrowband start")
    for voice in ("rms", "kal16"):
        audio = []
        for text in SCORE:
            audio.append((yield synthesize_pcm(text, voice)))
        cols = []
        for name, codec in (("PCMU", PcmuCodec), ("PCMA", PcmaCodec)):
            cols.append(f"{name} {first_utterance_wer(audio, lambda p: leg(p, codec)):.2f} / "
                        f"{first_utterance_wer(audio, lambda p: leg(p, codec), **nb):.2f}")
        cols.append(f"clean 16 kHz {first_utterance_wer(audio, lambda p: p):.2f} / "
                    f"{first_utterance_wer(audio, lambda p: p, **nb):.2f}")
        print(f"  flite {voice:6s} " + ", ".join(cols))


if __name__ == "__main__":
    task.react(main)
