"""/call/webrtc: the SDP candidate edits, codec preferences, the recordings route,
and real calls through the daemon with an aiortc peer playing the browser
(every codec; bot audio back; hangup from either side; clean shutdown)."""

import asyncio
import fractions
import glob
import json
import os
import re

import av
import numpy as np
from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtp import RtpPacket
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from activecall.web.rest import recording_file
from activecall.webrtc.candidates import advertise_external_ip, candidate_addresses, strip_ipv6_candidates
from activecall.webrtc.leg import (FrameChunker, PeerConnections, as_deferred, codec_preferences,
                                    handshake_seconds, pcm_frame)
from activecall.protocol import commands as cmd
from activecall.media.dtmf import build_payload
from activecall.testing import FakeLeg
from tests.helpers import MIN_WAIT, free_port, spawn_daemon, loopback_config, write_config
from tests.wsclient import connect, send_json

OFFER_TAIL = (
    "a=candidate:1 1 udp 2130706431 192.0.2.2 50000 typ host\r\n"
    "a=candidate:2 1 udp 2130706175 fd00::2 50001 typ host\r\n"
    "a=candidate:3 1 udp 2130705919 0a1b2c3d-aaaa.local 50002 typ host\r\n"
    "a=candidate:4 1 udp 1694498815 203.0.113.9 50003 typ srflx raddr 192.0.2.2 rport 50000\r\n"
)
SDP = ("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=audio 50000 UDP/TLS/RTP/SAVPF 111\r\n"
       "c=IN IP4 192.0.2.2\r\n" + OFFER_TAIL)


class CandidateTests(unittest.TestCase):
    def test_ipv6_candidates_stripped_others_kept(self):
        out = strip_ipv6_candidates(SDP)
        self.assertEqual(candidate_addresses(out), ["192.0.2.2", "0a1b2c3d-aaaa.local", "203.0.113.9"])
        self.assertTrue(out.endswith("\r\n"))
        self.assertIn("m=audio 50000", out)

    def test_external_ip_adds_srflx_for_ipv4_hosts_and_rewrites_c(self):
        out = advertise_external_ip(strip_ipv6_candidates(SDP), "198.51.100.7")
        self.assertIn("c=IN IP4 198.51.100.7\r\n", out)
        self.assertIn(" 198.51.100.7 50000 typ srflx raddr 192.0.2.2 rport 50000", out)
        # the host candidate stays (peers on the LAN) and only one IPv4 host gets a twin
        self.assertEqual(candidate_addresses(out).count("198.51.100.7"), 1)
        self.assertIn("192.0.2.2", candidate_addresses(out))
        line = [x for x in out.split("\r\n") if "198.51.100.7 50000" in x][0]
        priority = int(line.split()[3])
        self.assertLess(priority, 2130706431)  # below the host candidate


class OptionTests(unittest.TestCase):
    def test_codec_preferences_put_the_chosen_codec_first(self):
        self.assertIsNone(codec_preferences(None))
        self.assertIsNone(codec_preferences("pcm"))
        for name, mime in (("opus", "audio/opus"), ("PCMU", "audio/PCMU"), ("pcma", "audio/PCMA"),
                           ("g722", "audio/G722")):
            prefs = codec_preferences(name)
            self.assertEqual(prefs[0].mimeType.lower(), mime.lower())
            self.assertEqual(len(prefs), len(RTCRtpSender.getCapabilities("audio").codecs))
        with self.assertRaises(ValueError):
            codec_preferences("speex")

    def test_handshake_timeout(self):
        self.assertEqual(handshake_seconds(cmd.CallOption()), 30.0)
        self.assertEqual(handshake_seconds(cmd.CallOption(handshakeTimeout="5s")), 5.0)
        self.assertEqual(handshake_seconds(cmd.CallOption(handshakeTimeout=7)), 7.0)

    def test_chunker_turns_any_rate_into_20ms_16k_frames(self):
        chunker = FrameChunker()
        t = np.arange(960 * 5) / 48000
        tone = (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16)
        frames = []
        for i in range(5):
            frame = av.AudioFrame.from_ndarray(np.repeat(tone[i * 960:(i + 1) * 960], 2).reshape(1, -1),
                                               format="s16", layout="stereo")
            frame.sample_rate = 48000
            frame.pts = i * 960
            frame.time_base = fractions.Fraction(1, 48000)
            frames.extend(chunker.feed(frame))
        self.assertGreaterEqual(len(frames), 4)
        self.assertTrue(all(f.size == 320 and f.dtype == np.int16 for f in frames))
        self.assertGreater(np.abs(np.concatenate(frames[1:])).mean(), 3000)

    def test_pcm_frame(self):
        frame = pcm_frame(np.ones(320, dtype=np.int16), 640)
        self.assertEqual((frame.sample_rate, frame.samples, frame.pts), (16000, 320, 640))


class RecordingFileTests(unittest.TestCase):
    def test_only_files_directly_under_the_directory(self):
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        self.assertEqual(recording_file(root, "a.wav"), os.path.join(os.path.realpath(root), "a.wav"))
        for bad in ("", ".", "..", "../x.wav", "a/b.wav", "..\\x", "/etc/passwd", "x\0.wav"):
            self.assertIsNone(recording_file(root, bad), bad)


class ToneTrack(MediaStreamTrack):
    """The 'browser microphone': a 440 Hz tone at 48 kHz, paced like a real device."""

    kind = "audio"

    def __init__(self):
        super().__init__()
        self.pts = 0
        self.start = None

    async def recv(self):
        if self.readyState != "live":
            raise MediaStreamError
        loop = asyncio.get_event_loop()
        if self.start is None:
            self.start = loop.time()
        wait = self.start + self.pts / 48000 - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        t = (self.pts + np.arange(960)) / 48000
        pcm = (np.sin(2 * np.pi * 440 * t) * 6000).astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = 48000
        frame.pts = self.pts
        frame.time_base = fractions.Fraction(1, 48000)
        self.pts += 960
        return frame


class Peer:
    """An aiortc peer connection on the test's asyncio reactor, collecting what it hears."""

    def __init__(self):
        self.pc = RTCPeerConnection()
        self.pc.addTrack(ToneTrack())
        self.received = []
        self.connected = defer.Deferred()
        self.pc.on("track", lambda track: asyncio.ensure_future(self._listen(track)))
        self.pc.on("connectionstatechange", self._state)

    def _state(self):
        if self.pc.connectionState == "connected" and not self.connected.called:
            self.connected.callback(None)

    async def _listen(self, track):
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            self.received.append(frame.to_ndarray().reshape(-1))

    async def _offer(self):
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    def offer(self):
        return as_deferred(self._offer())

    def answer(self, sdp):
        return as_deferred(self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer")))

    def close(self):
        return as_deferred(self.pc.close())


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


def loud_samples(frames, start=0, level=500) -> int:
    """Samples above ``level`` in the peer's received frames from ``start`` on (any rate)."""
    return sum(int((np.abs(f.astype(np.int32)) > level).sum()) for f in frames[start:])


@defer.inlineCallbacks
def wait_until(predicate, what):
    """Poll ``predicate()`` until it holds; a generous bound turns a hang into a failure (not a speed bar)."""
    deadline = reactor.seconds() + MIN_WAIT
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        yield sleep(0.05)


class WebRTCCallTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        self.port = free_port()
        conf = write_config(self, f'''
addr = "127.0.0.1"
udp_port = {free_port()}
http_addr = "127.0.0.1:{self.port}"
media_cache_path = "{self.root}/cache"
external_ip = "198.51.100.7"
[recording]
enabled = true
auto_start = true
path = "{self.root}/rec"
[callrecord]
type = "local"
root = "{self.root}/cdr"
''')
        self.daemon = spawn_daemon(self, conf)
        yield self.daemon.wait_for("activecall ready")

    @defer.inlineCallbacks
    def call(self, call_id, option):
        peer = Peer()
        self.addCleanup(peer.close)
        offer = yield peer.offer()
        proto, client = yield connect(self, self.port, "/call/webrtc", f"id={call_id}")
        send_json(proto, {"command": "invite", "option": dict(option, sdp=offer)})
        answer = yield client.wait_event("answer")
        yield peer.answer(answer["sdp"])
        yield peer.connected
        return peer, proto, client, answer

    @defer.inlineCallbacks
    def test_every_codec_connects_and_carries_audio_both_ways(self):
        for codec, mime in (("opus", "opus/48000/2"), ("pcmu", "PCMU/8000"), ("pcma", "PCMA/8000"),
                            ("g722", "G722/8000")):
            peer, proto, client, answer = yield self.call(f"c-{codec}", {"codec": codec,
                                                                          "tts": {"provider": "flite"}})
            sdp = answer["sdp"]
            rtpmap = [line for line in sdp.split("\r\n") if line.startswith("a=rtpmap:")][0]
            self.assertIn(mime, rtpmap, codec)
            self.assertIn("a=candidate:", sdp)  # gathering was complete
            self.assertNotIn("fd00::2", sdp)  # IPv6 stripped (enableIpv6 unset)
            self.assertIn("198.51.100.7", sdp)  # external_ip advertised
            send_json(proto, {"command": "tts", "text": "Hello from the server.", "playId": "p1",
                              "endOfStream": True})
            yield client.wait_event("trackEnd")
            # the bot's speech, not silence: a tenth of a second of it at 8 kHz (it is about 1.3 s long; how
            # soon the last of it arrives depends on load, and the silence around it on the set-up's length)
            yield wait_until(lambda: loud_samples(peer.received) >= 800, f"the bot's speech over {codec}")
            send_json(proto, {"command": "hangup"})
            hangup = yield client.wait_event("hangup")
            self.assertEqual(hangup["initiator"], "caller")
            yield client.closed
            yield peer.close()
        yield sleep(0.5)
        cdrs = glob.glob(os.path.join(self.root, "cdr", "*", "*.json"))
        self.assertEqual(len(cdrs), 4)
        for path in cdrs:
            with open(path) as f:
                self.assertEqual(json.load(f)["callType"], "webrtc")
        self.daemon.signal("TERM")
        self.assertEqual((yield self.daemon.ended), 0, self.daemon.output)

    @defer.inlineCallbacks
    def test_browser_dtmf_becomes_one_event_per_key_press(self):
        """RFC 4733 packets as a browser's insertDTMF sends them (start, updates, three end packets,
        over the call's DTLS-SRTP; on an SSRC of their own, since aiortc's sender keeps its audio
        sequence to itself): each digit once, in order.  Chromium itself: the console's keypad test."""
        peer, proto, client, answer = yield self.call("c-dtmf", {"codec": "pcmu"})
        te = re.search(r"a=rtpmap:(\d+) telephone-event/8000", answer["sdp"])
        self.assertIsNotNone(te, answer["sdp"])  # answered, so a browser would send DTMF at all
        pt = int(te.group(1))
        sender = peer.pc.getSenders()[0]
        seq = 1000

        async def press(digit, timestamp):
            nonlocal seq
            event = "0123456789*#".index(digit)
            for i, (duration, end) in enumerate([(160, False), (320, False), (480, False)] + [(640, True)] * 3):
                packet = RtpPacket(payload_type=pt, sequence_number=seq, timestamp=timestamp, marker=int(i == 0))
                packet.ssrc = sender._ssrc ^ 0x5A5A5A5A  # the audio's own SSRC would need its sequence
                packet.payload = build_payload(event, duration, end=end)
                seq += 1
                await sender.transport._send_rtp(packet.serialize())
                await asyncio.sleep(0.02)

        for n, digit in enumerate("19#"):
            yield as_deferred(press(digit, 50000 + 8000 * n))
        for digit in "19#":
            event = yield client.wait_event("dtmf", digit=digit)
            self.assertEqual(event["trackId"], "c-dtmf")
        yield sleep(0.3)
        self.assertEqual([e["digit"] for e in client.events if e["event"] == "dtmf"], ["1", "9", "#"])
        send_json(proto, {"command": "hangup"})
        yield client.wait_event("hangup")

    @defer.inlineCallbacks
    def test_browser_closing_its_peer_connection_ends_the_call(self):
        peer, proto, client, _ = yield self.call("c-close", {})
        yield sleep(1.0)  # some of the tone reaches the recording
        yield peer.close()
        hangup = yield client.wait_event("hangup")
        self.assertEqual(hangup["initiator"], "caller")
        yield client.closed
        self.daemon.signal("TERM")
        self.assertEqual((yield self.daemon.ended), 0, self.daemon.output)
        wavs = glob.glob(os.path.join(self.root, "rec", "*.wav"))
        self.assertEqual(len(wavs), 1)
        import wave
        with wave.open(wavs[0]) as w:
            caller = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, 2)[:, 0]
        self.assertGreater(np.abs(caller.astype(np.float64)).mean(), 500)  # the tone came in

    @defer.inlineCallbacks
    def test_shutdown_with_a_live_call_closes_the_peer_connection(self):
        peer, proto, client, _ = yield self.call("c-shutdown", {})
        self.daemon.signal("TERM")
        hangup = yield client.wait_event("hangup")
        self.assertEqual(hangup["reason"], "system")
        self.assertEqual((yield self.daemon.ended), 0, self.daemon.output)

    @defer.inlineCallbacks
    def test_invite_without_an_offer_is_an_error(self):
        proto, client = yield connect(self, self.port, "/call/webrtc", "id=c-nooffer")
        send_json(proto, {"command": "invite", "option": {}})
        error = yield client.wait_event("error")
        self.assertIn("offer", error["error"])
        send_json(proto, {"command": "invite", "option": {"sdp": "v=0\r\nnonsense\r\n"}})
        error = yield client.wait_event("hangup")
        self.assertEqual(error["reason"], "failed")


class WebRTCReferTests(unittest.TestCase):
    """Issue 6 item 2: a browser (here an aiortc peer) bridged to a SIP callee, audio both ways."""

    timeout = 60

    @defer.inlineCallbacks
    def test_refer_bridges_the_browser_to_a_sip_callee(self):
        from tests.test_sip_integration import LOCAL, port_bound, sipp, sipp_result, udp_port, when

        root = os.path.abspath(self.mktemp())
        http_port = free_port()
        conf = loopback_config(self, root, http_port)
        daemon = spawn_daemon(self, conf)
        uas_port = udp_port()
        # the built-in uas pauses 4 s after the BYE: leave room for a slow browser leg before it
        uas = sipp(self, "-p", str(uas_port), "-mp", str(udp_port() // 2 * 2), "-rtp_echo", builtin="uas",
                   timeout="20s")
        yield when(port_bound(uas_port), 15, "sipp uas to bind")
        yield daemon.wait_for("activecall ready")
        peer = Peer()
        self.addCleanup(peer.close)
        offer = yield peer.offer()
        proto, client = yield connect(self, http_port, "/call/webrtc", "id=wr1&ping=0")
        send_json(proto, {"command": "invite", "option": {"sdp": offer, "codec": "pcmu",
                                                          "caller": "sip:alice@example.com"}})
        answer = yield client.wait_event("answer")
        yield peer.answer(answer["sdp"])
        yield peer.connected
        send_json(proto, {"command": "refer", "caller": "sip:agent@example.com",
                          "callee": f"sip:bob@{LOCAL}:{uas_port}"})
        yield client.wait_event("answer", refer=True)
        start = len(peer.received)
        # the browser's 440 Hz tone goes to sipp and is echoed back to the browser: wait for half a second
        # of it within at least two seconds of audio (PCMU: 8 kHz mono frames)
        yield wait_until(lambda: sum(f.size for f in peer.received[start:]) >= 16000
                         and loud_samples(peer.received, start) >= 4000, "the bridged tone to come back")
        heard = np.concatenate(peer.received[start:]).astype(np.float64)
        spectrum = np.abs(np.fft.rfft(heard))
        self.assertLess(abs(np.argmax(spectrum) * 8000 / heard.size - 440), 20)
        send_json(proto, {"command": "hangup"})
        yield client.wait_event("hangup")
        yield sipp_result(uas, timeout=25)  # sipp got our BYE on the referred leg
        daemon.signal("TERM")
        self.assertEqual((yield daemon.ended), 0, daemon.output)


class FakeReactor(task.Clock):
    def __init__(self):
        super().__init__()
        self.triggers = []

    def addSystemEventTrigger(self, phase, event, f):
        self.triggers.append((phase, event, f))
        return len(self.triggers)


class PeerConnectionsTests(unittest.TestCase):
    def test_before_shutdown_closes_legs_left_open_after_the_grace_period(self):
        clock = FakeReactor()
        registry = PeerConnections(clock, grace=5)
        registry.startService()
        [(phase, event, trigger)] = clock.triggers
        self.assertEqual((phase, event), ("before", "shutdown"))
        ending, stuck = FakeLeg(), FakeLeg()
        registry.add(ending)
        registry.add(stuck)
        d = trigger()
        ending.ended.callback(None)  # this call ends normally; the other never does
        clock.advance(4.9)
        self.assertFalse(d.called)
        self.assertEqual(stuck.closed, 0)
        clock.advance(0.2)
        self.assertTrue(d.called)
        self.assertEqual(stuck.closed, 1)

    def test_nothing_open_means_nothing_to_wait_for(self):
        clock = FakeReactor()
        registry = PeerConnections(clock)
        registry.startService()
        self.assertIsNone(clock.triggers[0][2]())

    def test_stop_service_closes_every_leg(self):
        registry = PeerConnections(FakeReactor())
        legs = [FakeLeg(), FakeLeg()]
        for leg in legs:
            registry.add(leg)
        registry.startService()
        self.successResultOf(registry.stopService())
        self.assertEqual([leg.closed for leg in legs], [1, 1])
