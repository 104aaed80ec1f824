"""CPU per conversation, part by part (print only): what each per-leg speech stage costs a second of a call.

    PYTHONPATH=src .venv/bin/python bench/bench_capacity_parts.py [--streams 40] [--pause-every 6.9]
                                                                 [--bot-share 0.4]

The turn-latency bench's capacity figure (bench_turn_latency.py --load N) is the
daemon's CPU over N conversations on a shared machine: honest, but noisy.  This
one takes the stages that every leg runs apart and times them in one process,
on the same audio, as CPU time (``time.process_time``: every thread of the
process, so a spinning helper thread shows):

- Smart Turn: one question per caller pause (``--pause-every`` s; the bench's
  background conversations pause every ~6.9 s), on a 2.9 s turn;
- silero: every stream's 512-sample windows, ``--streams`` batched per run as the
  daemon does (``SileroModel.run_streams``), 31.25 windows a second;
- echo control (``speech/echo.py``): one inbound and one outbound frame every
  20 ms, the bot silent and the bot talking (``--bot-share`` of the time, its
  echo 12 dB down and 60 ms late on the inbound side);
- the recogniser's webrtcvad pause detector, 50 frames a second.

Prints ms of CPU per second of conversation for each, their sum, and the
conversations one core carries at that sum (the media tick, RTP and dispatch
come on top: bench_rtp_legs.py and the turn bench).  Nothing is asserted;
docs/benchmarks.md ("Turn latency", "Capacity") records the output.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from twisted.internet import defer, reactor

from activecall.speech.base import VadOptions
from activecall.speech.testing import speech_extent, synthesize_pcm

TEXTS = ["I would like to check the status of my order.", "Can you tell me when the store opens tomorrow?",
         "My package has not arrived yet.", "Please send me a new invoice by email."]


def cpu_of(f, repeat: int) -> float:
    """CPU seconds per call of ``f``, the process's (all threads)."""
    f()
    c0 = time.process_time()
    for _ in range(repeat):
        f()
    return (time.process_time() - c0) / repeat


@defer.inlineCallbacks
def main(args):
    from activecall.speech.eou.smart_turn import SmartTurnModel
    from activecall.speech.vad.silero import WINDOW, SileroModel

    speech = []
    for text in TEXTS:
        pcm = yield synthesize_pcm(text)
        a, b = speech_extent(pcm)
        speech.append(pcm[a:b])
    voice = np.concatenate(speech)
    print(f"cpus {len(os.sched_getaffinity(0))}, load {os.getloadavg()[0]:.2f}; {args.streams} streams, a pause "
          f"every {args.pause_every} s, the bot talking {args.bot_share:.0%} of the time")
    rows = []

    # Smart Turn, one question per pause
    model = SmartTurnModel()
    turn = np.concatenate([speech[0], np.zeros(3200, dtype=np.int16)])
    per_pause = cpu_of(lambda: model.predict(turn), 20)
    rows.append(("Smart Turn (per pause %.1f ms)" % (per_pause * 1000), per_pause / args.pause_every))

    # silero, batched across streams
    silero = SileroModel()
    n_windows = 32
    windows = (voice[: n_windows * WINDOW].reshape(n_windows, WINDOW).astype(np.float32) / 32768.0)

    def silero_all():
        jobs = [(np.zeros((2, 128), np.float32), np.zeros(64, np.float32), windows) for _ in range(args.streams)]
        silero.run_streams(jobs)

    per_window = cpu_of(silero_all, 3) / (n_windows * args.streams)
    rows.append(("silero (per window %.0f us)" % (per_window * 1e6), per_window * 16000 / WINDOW))

    # echo control: idle and talking
    try:
        from activecall.speech.echo import EchoControl
        frames = voice[: voice.size // 320 * 320].reshape(-1, 320)
        rng = np.random.default_rng(1)
        noise = (rng.standard_normal(frames.shape) * 30).astype(np.int16)

        def echo_run(talking: bool):
            e = EchoControl()
            for i in range(frames.shape[0]):
                e.reference(frames[i] if talking else None)
                near = noise[i].astype(np.int32)
                if talking and i >= 3:
                    near = near + frames[i - 3] // 4
                e.process(np.clip(near, -32768, 32767).astype(np.int16))

        idle = cpu_of(lambda: echo_run(False), 2) / frames.shape[0]
        talking = cpu_of(lambda: echo_run(True), 2) / frames.shape[0]
        rows.append(("echo control (per frame %.0f us idle, %.0f talking)" % (idle * 1e6, talking * 1e6),
                     50 * ((1 - args.bot_share) * idle + args.bot_share * talking)))
    except ImportError:
        print("speexaec is not installed: no echo control figure")

    # the recogniser's webrtcvad (pause detection)
    from activecall.speech.vad.webrtc import WebRtcVad
    frames = voice[: voice.size // 320 * 320].reshape(-1, 320)

    def webrtc_run():
        v = WebRtcVad(VadOptions(type="webrtcvad", speechPadding=150, silencePadding=200, mode=2), lambda e: None)
        for f in frames:
            v.feed(f)

    per_frame = cpu_of(webrtc_run, 3) / frames.shape[0]
    rows.append(("webrtcvad pauses (per frame %.0f us)" % (per_frame * 1e6), per_frame * 50))

    total = 0.0
    for name, seconds in rows:
        total += seconds
        print(f"  {name:52} {seconds * 1000:6.2f} ms CPU per conversation-second")
    print(f"  {'sum':52} {total * 1000:6.2f} ms -> {1 / total:.0f} conversations per core for these parts alone")
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=40)
    parser.add_argument("--pause-every", type=float, default=6.9, help="seconds between a caller's pauses")
    parser.add_argument("--bot-share", type=float, default=0.4, help="share of the time the bot talks")
    args = parser.parse_args()

    def run():
        d = main(args)
        d.addErrback(lambda f: f.printTraceback())
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()
