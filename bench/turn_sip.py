"""The SIP/RTP side of ``bench_turn_latency.py``: a caller that dials the daemon and speaks over RTP.

``SipLine`` is a user agent of this package (transports + UA on loopback, in the bench's process) that
places one call to the daemon with a PCMU offer, then plays the part of a phone: one 20 ms RTP packet per
absolute deadline from the reactor's clock (silence between turns, as a phone sends it), and every
packet the daemon sends is decoded and looked at for the first audible sample of a reply.  The daemon's
own view of each turn (the ``metrics`` ``turn.latency`` event) is read from the call's event dump
(``<recording path>/<id>.events.jsonl``), which the daemon appends to once per reactor turn.

``SippLoad`` starts sipp callers that hold ``n`` concurrent conversations with the same daemon: each
call streams a sentence followed by silence in a loop (``rtp_stream``, sipp's own C pacing), so every
background call takes a turn every few seconds, with VAD and end of turn on every leg.
"""

from __future__ import annotations

import glob
import json
import os
import random
import struct

import numpy as np
from twisted.internet import defer, protocol, reactor

from activecall.config import load_config
from activecall.media.codecs import PcmuCodec
from activecall.sip.sdp_offer import minimal_offer
from activecall.sip.transport import TransportManager
from activecall.sip.useragent import UserAgent

FRAME = 320  # 20 ms at 16 kHz: PcmuCodec codes 16 kHz PCM to and from 8 kHz mu-law


class Pacer:
    """One 20 ms frame of 16 kHz PCM per absolute deadline from the reactor's clock, handed to ``send``:
    the speech ``say`` queued, silence otherwise.  ``speech_end`` is when the frame holding the clip's last
    voiced sample (|x| > ``VOICED``) went out; ``late`` how late each frame was."""

    VOICED = 300

    def __init__(self, send):
        self.send = send
        self.queue = np.zeros(0, dtype=np.int16)
        self.last_voiced_left = None  # samples of the queue after which the clip's last voiced one lies
        self.speech_end = None
        self.late = []
        self.start = reactor.seconds()
        self.n = 0
        self.running = True
        self._next()

    def say(self, pcm16k):
        pcm = np.asarray(pcm16k, dtype=np.int16)
        loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > self.VOICED)
        self.queue = pcm.copy()
        self.last_voiced_left = int(loud[-1]) if loud.size else None
        self.speech_end = None

    def _next(self):
        if self.running:
            reactor.callLater(max(0.0, self.start + self.n * 0.02 - reactor.seconds()), self._send)

    def _send(self):
        if not self.running:
            return
        now = reactor.seconds()
        self.late.append(now - (self.start + self.n * 0.02))
        frame = self.queue[:FRAME]
        self.queue = self.queue[FRAME:]
        if frame.size < FRAME:
            frame = np.concatenate([frame, np.zeros(FRAME - frame.size, dtype=np.int16)])
        if self.last_voiced_left is not None:
            if self.last_voiced_left < FRAME:
                self.speech_end = now
                self.last_voiced_left = None
            else:
                self.last_voiced_left -= FRAME
        self.send(frame)
        self.n += 1
        self._next()


class _Rtp(protocol.DatagramProtocol):
    def __init__(self, line):
        self.line = line

    def datagramReceived(self, data, addr):
        self.line.received(data)


class SipLine:
    """One call to the daemon; ``say``/``queue``/``speech_end``/``late`` are its pacer's, as on ``WsLine``."""

    VOICED = Pacer.VOICED

    def __init__(self, daemon_sip_port: int, rec_dir: str):
        import dataclasses
        cfg, _ = load_config(None, None)
        self.config = dataclasses.replace(cfg, addr="127.0.0.1", udp_port=0, tcp_port=0)
        self.transport = TransportManager(self.config)
        self.ua = UserAgent(self.config, self.transport, shutdown_timeout=2.0)
        self.transport.on_message = self.ua.layer.message_received
        self.daemon_port = daemon_sip_port
        self.rec_dir = rec_dir
        self.codec = PcmuCodec()
        self.on_audio = None  # called with the arrival time of each audible packet
        self.pacer = None
        self.remote = None
        self.seq = random.randrange(1 << 16)
        self.ts = random.randrange(1 << 32)
        self.ssrc = random.randrange(1 << 32)
        self.events = []
        self._journal = None
        self._journal_pos = 0

    @defer.inlineCallbacks
    def connect(self):
        self.transport.startService()
        self.ua.startService()
        self.rtp = reactor.listenUDP(0, _Rtp(self), interface="127.0.0.1")
        port = self.rtp.getHost().port
        self.call = self.ua.place_call(f"sip:bench@127.0.0.1:{self.daemon_port}", minimal_offer("127.0.0.1", port))
        yield self.call.when_answered()
        sdp = self.call.remote_sdp.decode()
        host = next(line[len("c=IN IP4 "):].strip() for line in sdp.splitlines() if line.startswith("c="))
        mport = next(int(line.split()[1]) for line in sdp.splitlines() if line.startswith("m=audio"))
        self.remote = (host, mport)
        self.pacer = Pacer(self._send_rtp)

    queue = property(lambda self: self.pacer.queue)
    speech_end = property(lambda self: self.pacer.speech_end)
    late = property(lambda self: self.pacer.late)

    def say(self, pcm16k):
        self.pacer.say(pcm16k)

    def _send_rtp(self, frame):
        header = struct.pack("!BBHII", 0x80, 0, self.seq, self.ts, self.ssrc)
        self.seq = (self.seq + 1) & 0xFFFF
        self.ts = (self.ts + 160) & 0xFFFFFFFF
        self.rtp.write(header + self.codec.encode(frame), self.remote)

    def received(self, data):
        if len(data) < 12 or (data[1] & 0x7F) != 0 or self.on_audio is None:
            return
        cc = data[0] & 0x0F
        pcm = self.codec.decode(data[12 + 4 * cc:])
        if np.abs(pcm.astype(np.int32)).max(initial=0) > self.VOICED:
            self.on_audio(reactor.seconds())

    def poll_events(self):
        """New events from the call's dump since the last poll (the dump is found by its Call-ID)."""
        if self._journal is None:
            # this call's dump only (the background calls have theirs): its name holds our Call-ID
            token = self.call.call_id.split("@")[0]
            paths = glob.glob(os.path.join(self.rec_dir, "*.events.jsonl"))
            match = [p for p in paths if token and token in os.path.basename(p)]
            if not match:  # not written yet
                return []
            self._journal = match[0]
        with open(self._journal, "rb") as f:
            f.seek(self._journal_pos)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._journal_pos += end
        new = []
        for line in data[:end].splitlines():
            record = json.loads(line)
            if record.get("type") == "event":
                new.append(json.loads(record["content"]))
        self.events.extend(new)
        return new

    @defer.inlineCallbacks
    def close(self):
        self.pacer.running = False
        try:
            yield self.call.hangup()
        except Exception:
            pass
        yield self.rtp.stopListening()
        yield self.ua.stopService()
        yield self.transport.stopService()


#: the looping caller bench_soak.py uses too: {WAV} in a loop for {CALL_MS} ms, then BYE
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "sipp_looping_caller.xml")) as _f:
    LOAD_SCENARIO = _f.read()


def write_ulaw_wav(path: str, pcm16k: np.ndarray) -> None:
    """A mono 8 kHz mu-law WAV (format 7, no fact chunk), what sipp's ``rtp_stream`` plays as PT 0."""
    data = PcmuCodec().encode(pcm16k.astype(np.int16))
    fmt = b"fmt " + struct.pack("<IHHIIHHH", 18, 7, 1, 8000, 8000, 1, 8, 0)
    body = b"WAVE" + fmt + b"data" + struct.pack("<I", len(data)) + data
    with open(path, "wb") as f:
        f.write(b"RIFF" + struct.pack("<I", len(body)) + body)


class _Sipp(protocol.ProcessProtocol):
    def __init__(self):
        self.ended = defer.Deferred()
        self.output = b""

    def outReceived(self, data):
        self.output = (self.output + data)[-20000:]

    errReceived = outReceived

    def processEnded(self, reason):
        self.ended.callback(reason.value.exitCode)


class SippLoad:
    """``n`` background conversations from one sipp process (``-l n``), each holding ``hold_s``."""

    def __init__(self, workdir: str, daemon_sip_port: int, clip16k: np.ndarray, silence_s: float = 4.0):
        self.workdir = workdir
        self.port = daemon_sip_port
        pcm = np.concatenate([clip16k.astype(np.int16), np.zeros(int(16000 * silence_s), dtype=np.int16)])
        pcm = pcm[: pcm.size // 320 * 320]
        self.wav = os.path.join(workdir, "load.wav")
        write_ulaw_wav(self.wav, pcm)
        self.cycle_s = pcm.size / 16000
        self.proc = None

    def start(self, n: int, hold_s: float, rate: float = 20.0, sip_port: int = 0, media_port: int = 0):
        scenario = os.path.join(self.workdir, "load.xml")
        with open(scenario, "w") as f:
            f.write(LOAD_SCENARIO.replace("{WAV}", self.wav).replace("{CALL_MS}", str(int(hold_s * 1000))))
        argv = ["sipp", f"127.0.0.1:{self.port}", "-sf", scenario, "-i", "127.0.0.1", "-p", str(sip_port),
                "-mp", str(media_port), "-l", str(n), "-m", str(n), "-r", str(rate), "-nostdin",
                "-trace_err", "-timeout", f"{int(hold_s + 120)}s"]
        self.proc = _Sipp()
        reactor.spawnProcess(self.proc, "/usr/bin/sipp", argv, env=dict(os.environ), path=self.workdir)
        return self.proc.ended

    def stop(self):
        if self.proc is not None and not self.proc.ended.called:
            try:
                self.proc.transport.signalProcess("KILL")
            except Exception:
                pass


def read_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks
