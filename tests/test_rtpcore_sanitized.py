"""The hand-written C of the RTP core (``_rtpcore.c``) under AddressSanitizer.

The module is compiled again with ``-fsanitize=address`` into a temporary directory, and a
child Python, with the sanitizer's runtime preloaded, loads that build in place of the
installed one and drives every entry point hard: the jitter buffer through random pushes,
pops, flushes and resets (against bounds: capacity, sequence wrap, restarts), the stream and
statistics types, and a ticker with 64 legs on loopback fed good packets, garbage and the
errors of a peer that went away.  Any out-of-bounds access, use after free or double free
makes ASan abort the child with a report; the test fails on that report.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap

from twisted.trial import unittest

from tests.helpers import ROOT

SOURCE = os.path.join(ROOT, "src", "activecall", "media", "_rtpcore.c")

WORKLOAD = textwrap.dedent('''
    import importlib.util, random, socket, sys
    spec = importlib.util.spec_from_file_location("activecall.media._rtpcore", sys.argv[1])
    core = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(core)
    sys.modules["activecall.media._rtpcore"] = core  # every activecall module now uses this build

    from twisted.internet import task
    from activecall.media.clock import MediaClock
    from activecall.media.jitter import JitterBuffer
    from activecall.media.rtp import PortPool, ReceiveStats, RtpPacket, RtpStream
    from activecall.media.rtp_leg import RtpLeg
    from activecall.media.rtp_ticker import RtpTicker
    assert RtpLeg.__mro__[1] is core.RtpLegCore

    rng = random.Random(1)
    for trial in range(300):
        jb = JitterBuffer(initial_depth=rng.randint(1, 5), max_depth=rng.randint(5, 15),
                          shed_slack=rng.randint(0, 4), rebuffer_after=rng.randint(1, 5))
        stats = ReceiveStats(1, 8000)
        seq = rng.randrange(65536)
        for step in range(300):
            r = rng.random()
            if r < 0.6:
                s = seq if rng.random() < 0.8 else rng.randrange(65536)
                seq = (seq + 1) & 0xFFFF
                payload = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))
                jb.push(s, rng.randrange(1 << 32), payload, step * 0.02 + rng.random() * 0.1,
                        rng.choice((-1, 0, 8)), rng.random() < 0.1)
                stats.update(s, rng.randrange(1 << 32), step * 0.02)
            elif r < 0.9:
                frame = jb.pop()
                if frame is not None:
                    tuple(frame)
            elif r < 0.95:
                jb.flush()
            else:
                jb.reset()
        for i in range(200):  # well past the capacity, all at once
            jb.push((seq + i) & 0xFFFF, 0, b"x", 0.0)
        while jb.pop() is not None and len(jb):
            pass
    stream = RtpStream(0, 8000)
    for _ in range(70000):
        stream.next_audio_header(160, 160)
    stream.next_header(4, 160, marker=True, payload_type=101, timestamp=5)

    class Session:
        def __init__(self, n):
            self.id, self.n = f"s{n}", n
        def tick(self):
            import numpy as np
            return np.full(320, 100 * self.n, dtype=np.int16)
        def audio_in(self, pcm):
            pass
        def emit(self, event):
            pass
        def now(self):
            return 0

    clock = task.Clock()
    media_clock = MediaClock(clock)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.setblocking(False)
    base = random.SystemRandom().randrange(20000, 50000, 2)  # PortPool skips what others hold
    pool = PortPool(clock, base, base + 600, interface="127.0.0.1")
    offer = ("v=0\\r\\no=- 1 1 IN IP4 127.0.0.1\\r\\ns=-\\r\\nc=IN IP4 127.0.0.1\\r\\nt=0 0\\r\\n"
             f"m=audio {peer.getsockname()[1]} RTP/AVP 0 101\\r\\na=rtpmap:0 PCMU/8000\\r\\n"
             "a=rtpmap:101 telephone-event/8000\\r\\na=sendrecv\\r\\n")
    legs = []
    for n in range(64):
        leg = RtpLeg(Session(n), media_clock, clock, host="127.0.0.1", codecs=("pcmu", "telephone_event"))
        leg.allocate(pool)
        leg.answer(offer)
        leg.start()
        legs.append(leg)
    ticker = RtpTicker.of(media_clock, clock)
    for tick in range(200):
        for k, leg in enumerate(legs):
            if not leg.running:
                continue
            r = rng.random()
            if r < 0.85:
                data = RtpPacket(0, tick & 0xFFFF, 160 * tick, 1000 + k, bytes(160)).serialize()
            elif r < 0.9:
                data = RtpPacket(101, tick & 0xFFFF, 160 * tick, 1000 + k, bytes([5, 10, 0, 160])).serialize()
            else:
                data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))
            peer.sendto(data, ("127.0.0.1", leg.local_port))
        if tick == 100:
            for leg in legs[:8]:
                leg.close()  # hung up mid-call
        if tick == 150:
            peer.close()  # the far end goes away: ICMP errors on send and receive
            peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        clock.advance(0.02)
    assert ticker.failures == 0, ticker.failures
    assert sum(leg.packets_in for leg in legs) > 5000, sum(leg.packets_in for leg in legs)
    for leg in legs:
        leg.close()
    print("workload done")
''')


def _asan_runtime():
    try:
        out = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    path = out.stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


class SanitizedCoreTests(unittest.TestCase):
    def test_every_entry_point_under_address_sanitizer(self):
        runtime = _asan_runtime()
        if runtime is None or shutil.which("gcc") is None:  # make setup installs gcc; this is a dev box without
            raise unittest.SkipTest("gcc with AddressSanitizer is not installed")
        build = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, build, True)
        library = os.path.join(build, "_rtpcore_asan.so")
        include = sysconfig.get_paths()["include"]
        subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer",
                        f"-I{include}", SOURCE, "-o", library], check=True, timeout=120)
        env = dict(os.environ, LD_PRELOAD=runtime, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:exitcode=99",
                   PYTHONPATH=ROOT)
        result = subprocess.run([sys.executable, "-c", WORKLOAD, library], capture_output=True, text=True,
                                env=env, timeout=300, cwd=ROOT)
        report = result.stderr[-6000:]
        self.assertNotIn("AddressSanitizer", result.stderr, report)
        self.assertEqual(result.returncode, 0, report)
        self.assertIn("workload done", result.stdout)
