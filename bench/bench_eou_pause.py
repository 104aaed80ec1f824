"""When is the end-of-turn question asked, and what does Smart Turn answer then? (stream time, print only)

The turn-latency bench (bench_turn_latency.py) measures on the wall clock, which a shared 2-core machine
inflates; this replays the same flite sentences through the same parts on a ``task.Clock`` in step with the
audio, so every figure is in *stream time* and does not depend on the machine's load:

- the call's VAD: silero with the shipped defaults (its batcher on the clock, answering synchronously);
- the recogniser's endpointing: ``StreamingRecognizer``'s webrtcvad and a ``TurnEndpointer`` (no decoding);
- Smart Turn v3.2 answering synchronously (its inference time is printed apart: add it to the waits).

Each clip is 1 s of quiet, flite's clip (its lead-in and tail included), 2.5 s of quiet (``--pcmu``: through a G.711 μ-law round trip, as
SIP callers are heard).  For each it prints where the voice ends (the last sample with |x| > 300), silero's
speech end, every question asked (stream ms after the voice's end, which one, P) and when the turn ended.
``--early on`` turns ``eou.earlyLook`` on; ``--early off`` (the default since) feeds only the words-so-far
decode at silero's end (the recogniser's own pause alone asks): run it against ``--early on`` to compare.  Mid-sentence clips ("…" in
the name: the first part, 800 ms of quiet, the rest) must end once, after the second part.

    PYTHONPATH=src .venv/bin/python bench/bench_eou_pause.py [--pause-ms 200,150] [--early on,off] [--pcmu] [--voice rms]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from twisted.internet import defer, task

from activecall.speech import defaults as speech_defaults, registry
from activecall.speech.asr.base import StreamingRecognizer
from activecall.speech.base import AsrOptions, SpeechEnded, SpeechStarted
from activecall.speech.eou.base import EouOptions
from activecall.speech.eou.endpointer import TurnEndpointer
from activecall.speech.eou.smart_turn import SmartTurnDetector
from activecall.speech.testing import frames, speech_extent, synthesize_pcm
from activecall.speech.vad.silero import SileroBatcher

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_turn_latency import SENTENCES  # noqa: E402  (the wall-clock bench's sentences)

#: sentences with a pause in the middle
MID = [("My number is five five five", "and then one two three."),
       ("I want to check the status of my", "order number four two."),
       ("my number is five five five and", "then one two three."),
       ("I would like to book a table for", "four people tonight."),
       ("Can you send the invoice to", "my office address?"),
       ("The reason I am calling is that", "my card was declined."),
       ("I need to change the", "delivery date."),
       ("My address is twelve Main Street and", "the zip code is nine oh two one oh.")]
#: single sentences that are not finished: a turn must not end after them (the ceiling ends it)
TRAILING = ["I was wondering if", "So what I need is", "Could you please tell me the", "My account number is"]


def _sync(f, *args):
    return defer.maybeDeferred(f, *args)


class Silent(StreamingRecognizer):
    """Endpointing only: no words."""

    name = "silent"

    def _begin(self):
        pass

    def _decode(self, pcm):
        return None

    def _finish(self, pcm):
        return "end"


def pcmu(pcm: np.ndarray) -> np.ndarray:
    from activecall.media.codecs import create
    codec = create("pcmu")
    out = [codec.decode(codec.encode(f)) for f in frames(pcm)]
    codec.close()
    return np.concatenate(out)


def run_clip(pcm: np.ndarray, pause_ms: int, early: bool):
    clock = task.Clock()
    plan = speech_defaults.for_call({}, {"language": "en"}, None, "en")
    asked, finals, silero_ends = [], [], []
    try:
        options = EouOptions(pauseMs=pause_ms, earlyLook=early)
    except TypeError:  # main before eou.earlyLook: no early look
        options = EouOptions(pauseMs=pause_ms)
    detector = SmartTurnDetector(options, run_in_thread=_sync)
    inference = []

    def analyze(audio, _real=detector.analyze):
        d = _real(audio)
        d.addCallback(lambda p: (asked.append((asr._fed * 1000 // 16000, p.probability,
                                               "early" if asr._vad.segmenter.speaking else "late")),
                                 inference.append(p.inference_ms), p)[-1])
        return d

    detector.analyze = analyze
    endpointer = TurnEndpointer(clock, detector, detector.options)
    asr = Silent(AsrOptions(provider="silent"), lambda r: finals.append(r) if r.final else None, reactor=clock,
                 run_in_thread=_sync)
    asr.endpoint_with(endpointer)

    def on_vad(event):
        if isinstance(event, SpeechStarted) and early and hasattr(asr, "speech_resumed"):
            asr.speech_resumed(event.start_ms)
        elif isinstance(event, SpeechEnded):
            silero_ends.append(event.end_ms)
            if early and hasattr(asr, "speech_ended"):
                asr.speech_ended(event.end_ms, lambda: not vad.voiced_after(event.end_ms))
            else:
                asr.speech_paused()

    vad = registry.create_vad(dict(plan.vad), on_vad, batcher=SileroBatcher(reactor=clock, run_in_thread=_sync))
    for frame in frames(pcm):
        vad.feed(frame)
        asr.feed(frame)
        clock.advance(0.02)
    return asked, [f.end_ms for f in finals], silero_ends, inference


def clip_of(parts, pcm_of, quiet_ms=800):
    """1 s of quiet, flite's whole clips (its own lead-in and tail, as bench_turn_latency sends them) with
    ``quiet_ms`` of quiet between parts, 2.5 s of quiet; and where each part's voice ends (|x| > 300)."""
    lead = np.zeros(16000, dtype=np.int16)
    pieces, ends = [lead], []
    at = lead.size
    for i, p in enumerate(p for p in parts if p):
        clip = pcm_of[p]
        if i:
            pieces.append(np.zeros(quiet_ms * 16, dtype=np.int16))
            at += quiet_ms * 16
        pieces.append(clip)
        ends.append((at + speech_extent(clip)[1]) * 1000 // 16000)
        at += clip.size
    pieces.append(np.zeros(2500 * 16, dtype=np.int16))
    return np.concatenate(pieces), ends


@defer.inlineCallbacks
def main(reactor, args):
    texts = SENTENCES + TRAILING + [t for pair in MID for t in pair]
    pcm_of = {}
    for t in texts:
        pcm_of[t] = yield synthesize_pcm(t, voice=args.voice)
    print(f"load {os.getloadavg()[0]:.2f}; stream-time figures; flite voice {args.voice}; pcmu {args.pcmu}")
    for pause_ms in [int(x) for x in args.pause_ms.split(",")]:
        for early in [x == "on" for x in args.early.split(",")]:
            waits, ceilings, cut, cpu = [], 0, 0, []
            print(f"\n== pauseMs {pause_ms}, early question {'on' if early else 'off'}")
            for parts in [(s,) for s in SENTENCES] + [(s, "") for s in TRAILING] + MID:
                pcm, ends = clip_of(parts, pcm_of)
                if args.pcmu:
                    pcm = pcmu(pcm)
                t0 = time.process_time()
                asked, finals, silero_ends, inference = run_clip(pcm, pause_ms, early)
                cpu.append((time.process_time() - t0) * 1000)
                end = ends[-1]
                looks = " ".join(f"{ms - end:+d}:{stage[0]}:{p:.2f}" for ms, p, stage in asked)
                name = " … ".join(parts)
                wait = finals[-1] - end if finals else None
                verdict = "ok"
                if len(parts) > 1 and not parts[1]:  # trailing off, nothing follows: only the ceiling may end it
                    end = ends[0]
                    wait = finals[-1] - end if finals else None
                    if wait is not None and wait < 1400:
                        verdict = "CUT trailing off"
                        cut += 1
                elif len(parts) > 1 and (len(finals) != 1 or finals[0] < end):
                    verdict = "CUT mid-sentence"
                    cut += 1
                elif wait is not None and wait >= 1400:
                    verdict = "ceiling"
                    ceilings += 1
                if len(parts) == 1 and wait is not None:
                    waits.append(wait)
                print(f"  {name[:60]:60s} voice end {end} ms, silero end {[e - end for e in silero_ends]}, "
                      f"looks [{looks}], turn ended {wait:+d} ms: {verdict}" if wait is not None
                      else f"  {name[:60]:60s} no final: {asked}")
            print(f"  single sentences: end-of-turn wait after the voice p50 {np.percentile(waits, 50):.0f} "
                  f"mean {np.mean(waits):.0f} max {max(waits)} ms (stream; + Smart Turn inference each look); "
                  f"{ceilings} at the ceiling; unfinished turns cut: {cut} of {len(TRAILING) + len(MID)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pause-ms", default="200,150")
    parser.add_argument("--early", default="on,off")
    parser.add_argument("--pcmu", action="store_true", help="through a G.711 μ-law round trip (SIP)")
    parser.add_argument("--voice", default="rms", help="flite voice (rms: the turn-latency bench's)")
    args = parser.parse_args()
    task.react(main, (args,))
