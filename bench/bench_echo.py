"""Echo cancellers for barge-in: echo return loss enhancement, what they do to the caller, CPU per call.

    PYTHONPATH=src .venv/bin/python bench/bench_echo.py [--livekit]

The bot's audio is a 14 s flite greeting (voice rms); the line returns it ``delay`` ms late at ``gain`` dB with
a second reflection 2.5 ms later (a hybrid), plus faint noise; for PCMU the return path goes through 8 kHz
μ-law and back.  The caller is another flite voice (slt), 2.5 s long, starting 3 s in.

- ERLE: echo energy in / out, over the echo-only audio after the first second (converged) and over the
  first second (what a barge-in detector meets at the start of every bot turn);
- caller kept: the caller's level after the canceller, and how much of the caller-dominated frames the
  guard (``speech/echo.py``) passed, when the line has no echo and when it has echo at -10 dB, 60 ms;
- guard: the share of the loud echo-only frames it passed on as silence;
- CPU: seconds of processing per second of audio for one call (one core), bot speaking.

Candidates: SpeexDSP's MDF canceller (``speexaec``, what ``speech/echo.py`` uses) and, with ``--livekit``
when the ``livekit`` package is importable, WebRTC's AEC3 from ``livekit.rtc.AudioProcessingModule``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from twisted.internet import defer, task

from activecall.audio import resample, ulaw_decode, ulaw_encode
from activecall.speech.echo import EchoControl
from activecall.speech.testing import synthesize_pcm

GREETING = ("Thank you for calling the city library. Our opening hours are nine to five on weekdays, "
            "and ten to four on Saturdays. You can renew your books online, by phone, or at the desk. "
            "Please tell me how I can help you today.")
CALLER = "I would like to renew my books please."
CASES = [(20, -6), (20, -20), (60, -10), (120, -14), (200, -6), (200, -20)]


def line(bot, delay_ms, gain_db, codec, seed=0):
    d = delay_ms * 16
    x = np.concatenate([np.zeros(d), bot.astype(np.float64)])[: bot.size] * 10 ** (gain_db / 20)
    x = x + 0.3 * np.concatenate([np.zeros(40), x])[: x.size]
    x += np.random.default_rng(seed).normal(0, 10, x.size)
    if codec == "pcmu":
        n8 = resample(np.clip(np.rint(x), -32768, 32767).astype(np.int16), 16000, 8000)
        x = resample(ulaw_decode(ulaw_encode(n8)), 8000, 16000).astype(np.float64)[: bot.size]
    return x


def speex(near, far):
    from speexaec import EchoCanceller
    ec = EchoCanceller(320, 300 * 16, 16000)
    out = np.zeros_like(near)
    t = time.perf_counter()
    for i in range(0, near.size - 319, 320):
        out[i:i + 320] = ec.process(near[i:i + 320], far[i:i + 320])
    return out, time.perf_counter() - t


def webrtc_aec3(near, far):
    from livekit import rtc
    apm = rtc.AudioProcessingModule(echo_cancellation=True, high_pass_filter=True)
    out = np.zeros_like(near)
    t = time.perf_counter()
    for i in range(0, near.size - 159, 160):
        apm.process_reverse_stream(rtc.AudioFrame(far[i:i + 160].tobytes(), 16000, 1, 160))
        frame = rtc.AudioFrame(bytearray(near[i:i + 160].tobytes()), 16000, 1, 160)
        apm.set_stream_delay_ms(0)
        apm.process_stream(frame)
        out[i:i + 160] = np.frombuffer(bytes(frame.data), dtype=np.int16)
    return out, time.perf_counter() - t


def guard(near, far):
    ec = EchoControl()
    out = np.zeros_like(near)
    flags = []
    t = time.perf_counter()
    for i in range(0, near.size - 319, 320):
        ec.reference(far[i:i + 320])
        out[i:i + 320], f = ec.process(near[i:i + 320])
        flags.append(f)
    return out, time.perf_counter() - t, np.array(flags)


def db(a, b):
    return 10 * np.log10(max(float(np.sum(a.astype(np.float64) ** 2)), 1.0) / max(float(np.sum(b.astype(np.float64) ** 2)), 1.0))


@defer.inlineCallbacks
def main(reactor, args):
    bot = yield synthesize_pcm(GREETING, "rms")
    caller = yield synthesize_pcm(CALLER, "slt")
    cancellers = [("speex", speex)]
    if args.livekit:
        try:
            import livekit.rtc  # noqa: F401
            cancellers.append(("webrtc-aec3", webrtc_aec3))
        except ImportError:
            print("livekit not importable: WebRTC AEC3 skipped")
    seconds = bot.size / 16000
    print(f"{'canceller':<12} {'codec':<5} {'delay':>5} {'gain':>5}  {'ERLE conv.':>10} {'ERLE 1st s':>10}  "
          f"{'cpu/call':>8}")
    for name, fn in cancellers:
        for codec in ("pcm", "pcmu"):
            for delay, gain in CASES:
                near = np.clip(np.rint(line(bot, delay, gain, codec)), -32768, 32767).astype(np.int16)
                out, spent = fn(near, bot)
                print(f"{name:<12} {codec:<5} {delay:>5} {gain:>5}  {db(near[16000:], out[16000:]):>10.1f} "
                      f"{db(near[:16000], out[:16000]):>10.1f}  {100 * spent / seconds:>7.2f}%")
    print()
    print("the caller over the bot (3 s in): level after the canceller (dB), guard frames passed")
    at = 48000
    c = np.zeros(bot.size)
    c[at:at + caller.size] = caller
    seg = slice(at, at + caller.size)
    for echo in (None, (60, -10)):
        e = np.zeros(bot.size) if echo is None else line(bot, echo[0], echo[1], "pcm")
        near = np.clip(np.rint(e + c), -32768, 32767).astype(np.int16)
        label = "no echo" if echo is None else f"echo {echo[1]} dB {echo[0]} ms"
        for name, fn in cancellers:
            out, _ = fn(near, bot)
            print(f"  {name:<12} {label:<18} caller level {db(out[seg], c[seg]):>6.1f} dB")
        out, spent, flags = guard(near, bot)
        frames = np.arange(flags.size)
        pc = np.array([np.mean(c[i * 320:(i + 1) * 320] ** 2) for i in frames])
        pe = np.array([np.mean(e[i * 320:(i + 1) * 320] ** 2) for i in frames])
        dominated = (pc > 4 * pe) & (pc > 1e5)
        print(f"  {'guard':<12} {label:<18} caller-dominated frames passed {100 * (1 - flags[dominated].mean()):.0f}%")
    print()
    print("guard on echo only: loud echo frames passed on as silence, CPU per call")
    for codec in ("pcm", "pcmu"):
        for delay, gain in CASES:
            near = np.clip(np.rint(line(bot, delay, gain, codec)), -32768, 32767).astype(np.int16)
            out, spent, flags = guard(near, bot)
            loud = np.array([np.abs(near[i * 320:(i + 1) * 320]).max() > 300 for i in range(flags.size)])
            print(f"  {codec:<5} {delay:>4} ms {gain:>4} dB  echo frames silenced {100 * flags[loud].mean():5.1f}%  "
                  f"cpu/call {100 * spent / seconds:.2f}%")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--livekit", action="store_true")
    task.react(main, [parser.parse_args()])
