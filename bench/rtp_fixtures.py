"""What the RTP benches' legs talk to: a session stand-in that plays a looped tone, and a PCMU offer.

Shared by ``rtp_legs_harness.py`` and ``bench_ticker_phases.py`` (both run as scripts from bench/)."""

from __future__ import annotations

import numpy as np

from activecall.media.tracks import FRAME_SAMPLES

TONE = [(np.sin(2 * np.pi * 440 * (np.arange(FRAME_SAMPLES) + i * FRAME_SAMPLES) / 16000) * 8000)
        .astype(np.int16) for i in range(50)]  # 1 s of 440 Hz, loops seamlessly


class ToneSession:
    """What a leg needs from a call: tick() -> a frame, audio_in, emit, now, id."""

    def __init__(self, name):
        self.id = name
        self.n = 0
        self.frames_in = 0

    def tick(self):
        self.n += 1
        return TONE[self.n % 50]

    def audio_in(self, pcm):
        self.frames_in += 1

    def emit(self, event):
        pass

    def now(self):
        return 0


def offer(port: int) -> str:
    """A PCMU-only offer from 127.0.0.1:``port`` (the generator or the sender socket)."""
    return ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=ptime:20\r\na=sendrecv\r\n")
