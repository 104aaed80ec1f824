"""Interop with baresip (Debian ``baresip-core``, 1.0.0), a real daemon and a real peer on loopback:

- SIP over TLS: baresip calls the daemon's TLS listener (a certificate from a throwaway test CA); a playbook-routed
  call is answered, baresip's ``aufile`` source speaks a flite sentence and the daemon's recording holds it,
  baresip's ``sndfile`` dump of what it heard holds the flite greeting; the daemon ends the call (``/call/kill``),
  so its BYE goes over a TLS connection the daemon opens to baresip and verifies against the test CA; a CDR follows;
- SDES-SRTP: the same over TLS with ``enable_srtp = true`` and ``mediaenc=srtp-mand`` on baresip's account: the
  daemon's answer is RTP/SAVP with an ``a=crypto`` line, audio goes both ways, baresip hangs up (end of its WAV).

The playbook has no ASR on purpose: the daemon's recording is checked offline, and pocketsphinx decoding on the
daemon's worker thread holds the GIL long enough on a loaded machine to stall the media clock (see docs/sip.md,
"Interop").  The audio checks are on sound (at least half of what flite made, at most half as much again),
not on words: both directions are RTP paced in real time, so what a recogniser makes of either file
differs from run to run (telephone-band recognition is tested on fixed clips in test_speech_telephone).
A missing baresip fails the test, naming the package; the project's setup installs it.
"""

import glob
import json
import os
import shutil
import socket
import tempfile
import wave

import numpy as np
from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web.client import Agent, readBody

from activecall.audio import resample
from activecall.speech.testing import synthesize_pcm
from tests.helpers import free_port, loud_ms, spawn, spawn_daemon, write_config
from tests.test_sip_integration import require, udp_port, when
from tests.test_sip_transport import make_ca_and_cert

BARESIP = "/usr/bin/baresip"
PACKAGE = "baresip-core"
SENTENCE = "my account number is one two three four five"
GREETING = "Hello, how can I help you today?"

PLAYBOOK = f"""---
llm:
  provider: echo
  greeting: "{GREETING}"
tts:
  provider: flite
---
You repeat what the caller says.
"""

# baresip 1.0.0, headless: aufile plays an 8 kHz mono WAV as the microphone (and ends the call at its end),
# sndfile dumps what was sent and heard to WAVs, ALSA's "null" device is the clock for the player.
BARESIP_CONFIG = """\
poll_method		epoll
sip_listen		127.0.0.1:{sip_port}
net_interface		127.0.0.1
sip_cafile		{ca}
sip_certificate		{cert_and_key}
audio_player		alsa,null
audio_alert		alsa,null
audio_source		aufile,{speech}
rtp_ports		{rtp_low}-{rtp_high}
module_path		/usr/lib/baresip/modules
module			g711.so
module			alsa.so
module			aufile.so
module			sndfile.so
module			srtp.so
module_app		account.so
module_app		menu.so
snd_path		{snd}
"""


def sip_port_pair() -> int:
    """A port free for SIP over UDP/TCP whose next port is free for TLS (baresip listens on both)."""
    while True:
        port = udp_port()
        try:
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                with socket.socket(socket.AF_INET, kind) as s:
                    s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue


def write_wav(path: str, pcm: np.ndarray, rate: int) -> None:
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.astype("<i2").tobytes())


def read_wav(path: str) -> tuple[np.ndarray, int]:
    with wave.open(path) as w:
        frames = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        return frames.reshape(-1, w.getnchannels()), w.getframerate()


def later(seconds: float) -> defer.Deferred:
    d = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


class BaresipInteropTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def start(self, *, srtp: bool, tail_seconds: float):
        """The daemon (TLS listener, playbook routing, recording, CDRs) and a baresip dialling it over TLS."""
        baresip = require(BARESIP, PACKAGE)
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.root, "playbooks"))
        # baresip's sndfile truncates long dump paths (a fixed-size buffer): keep its directory short
        self.snd = tempfile.mkdtemp(prefix="bs-snd-")
        self.addCleanup(shutil.rmtree, self.snd, True)
        os.makedirs(os.path.join(self.root, "baresip"))
        with open(os.path.join(self.root, "playbooks", "test.md"), "w") as f:
            f.write(PLAYBOOK)
        pki = make_ca_and_cert(self.root)
        bundle = os.path.join(self.root, "baresip", "tls.pem")  # baresip wants certificate and key in one file
        with open(bundle, "w") as out:
            for name in ("cert.pem", "key.pem"):
                with open(pki[name]) as f:
                    out.write(f.read())

        # the caller's speech: aufile in baresip 1.0.0 takes 8 kHz mono 16-bit WAVs only
        speech = yield synthesize_pcm(SENTENCE)
        self.speech = speech
        self.greeting = yield synthesize_pcm(GREETING)
        pcm8k = resample(np.concatenate([np.zeros(16000, np.int16), speech,
                                         np.zeros(int(16000 * tail_seconds), np.int16)]), 16000, 8000)
        self.speech_wav = os.path.join(self.root, "speech.wav")
        write_wav(self.speech_wav, pcm8k, 8000)

        self.tls_port = free_port()
        self.http_port = free_port()
        base = free_port() // 2 * 2
        conf = write_config(self, f'''
addr = "127.0.0.1"
udp_port = {udp_port()}
tcp_port = 0
log_level = "debug"  # the test reads the call id from the debug line "inbound call <id> from ..."
tls_port = {self.tls_port}
tls_cert_file = "{pki['cert.pem']}"
tls_key_file = "{pki['key.pem']}"
tls_ca_file = "{pki['ca.pem']}"
tls_verify_peer = true
enable_srtp = {"true" if srtp else "false"}
http_addr = "127.0.0.1:{self.http_port}"
rtp_start_port = {base}
rtp_end_port = {base + 20}
media_cache_path = "{self.root}/cache"
playbook_dir = "{self.root}/playbooks"
[recording]
enabled = true
auto_start = true
path = "{self.root}/rec"
[callrecord]
type = "local"
root = "{self.root}/cdr"
[handler]
type = "playbook"
default = "test.md"
''')
        self.daemon = spawn_daemon(self, conf)
        yield self.daemon.wait_for("activecall ready")

        rtp_low = free_port() // 2 * 2
        config_dir = os.path.join(self.root, "baresip")
        with open(os.path.join(config_dir, "config"), "w") as f:
            self.baresip_sip_port = sip_port_pair()
            f.write(BARESIP_CONFIG.format(
                sip_port=self.baresip_sip_port, ca=pki["ca.pem"], cert_and_key=bundle, speech=self.speech_wav,
                rtp_low=rtp_low, rtp_high=rtp_low + 9, snd=self.snd))
        with open(os.path.join(config_dir, "accounts"), "w") as f:
            f.write("<sip:caller@127.0.0.1;transport=tls>;regint=0"
                    + (";mediaenc=srtp-mand" if srtp else "") + "\n")
        # -s: SIP trace on stdout (the test reads the SDP answer from it); -t: a last-resort exit
        self.baresip = spawn([baresip, "-s", "-f", config_dir, "-t", "40",
                              "-e", f"/dial sip:agent@127.0.0.1:{self.tls_port}"])
        self.addCleanup(self.baresip.kill)
        yield self.baresip.wait_for(r"Call established", timeout=15)
        found = yield self.daemon.wait_for(r"inbound call (\S+) from sip:caller@127\.0\.0\.1", timeout=5)
        self.call_id = found.group(1)

    @defer.inlineCallbacks
    def finish(self):
        """After the call: baresip quits, the CDR is read; returns (cdr, daemon recording, baresip's dec WAV)."""
        yield self.baresip.wait_for(r"terminated \(duration", timeout=15)
        cdr = yield self.wait_cdr()
        self.baresip.signal("TERM")
        yield when(self.baresip.ended, 10, "baresip to exit")
        dumps = glob.glob(os.path.join(self.snd, "dump-*-dec.wav"))
        self.assertEqual(len(dumps), 1, f"baresip's sndfile dumps: {os.listdir(self.snd)}")
        recording, rate = read_wav(cdr["recorder"][0]["path"])
        self.assertEqual((recording.shape[1], rate), (2, 16000))
        heard, rate = read_wav(dumps[0])
        self.assertEqual(rate, 8000)
        return cdr, recording, heard[:, 0]

    @defer.inlineCallbacks
    def wait_cdr(self):
        for _ in range(200):
            found = glob.glob(os.path.join(self.root, "cdr", "*", "*.json"))
            if found:
                with open(found[0]) as f:
                    return json.load(f)
            yield later(0.05)
        raise AssertionError("no CDR was written\n" + self.daemon.output[-3000:])

    def check_audio_both_ways(self, recording: np.ndarray, baresip_heard: np.ndarray):
        # the daemon's recording, left channel: baresip's microphone (aufile) through PCMU
        caller, sent = loud_ms(recording[:, 0]), loud_ms(self.speech)
        self.assertGreaterEqual(caller, sent // 2, f"the daemon's recording: {caller} ms of sound, {sent} sent")
        self.assertLessEqual(caller, sent * 3 // 2, f"the daemon's recording: {caller} ms of sound, {sent} sent")
        # what baresip played out (its sndfile decode dump, 8 kHz): the greeting
        heard, said = loud_ms(resample(baresip_heard, 8000, 16000)), loud_ms(self.greeting)
        self.assertGreaterEqual(heard, said // 2, f"baresip's dump: {heard} ms of sound, the greeting {said}")
        self.assertLessEqual(heard, said * 3 // 2, f"baresip's dump: {heard} ms of sound, the greeting {said}")

    @defer.inlineCallbacks
    def test_tls_call(self):
        # a long tail of silence: the daemon hangs up, not baresip's end of file
        yield self.start(srtp=False, tail_seconds=8)
        self.assertIn("SIP/2.0 200 OK", self.baresip.output)
        self.assertIn("Contact: <sip:127.0.0.1:", self.baresip.output)  # sip:;transport=tls, not sips:
        # baresip's own call clock (its status line) says greeting and sentence are through
        yield self.baresip.wait_for(r"\[0:00:0[7-9]\]", timeout=15)
        response = yield Agent(reactor).request(
            b"POST", f"http://127.0.0.1:{self.http_port}/call/kill/{self.call_id}".encode())
        body = yield readBody(response)
        self.assertEqual((response.code, json.loads(body)), (200, True))
        cdr, recording, heard = yield self.finish()
        # the daemon's BYE reached baresip on the TLS connection the daemon opened and verified
        self.assertRegex(self.baresip.output,
                         rf"TLS 127\.0\.0\.1:\d+ -> 127\.0\.0\.1:{self.baresip_sip_port + 1}\r?\nBYE sip:")
        self.assertEqual(cdr["callType"], "sip")
        self.assertEqual(cdr["callId"], self.call_id)
        self.assertNotEqual(cdr["hangupReason"], "caller")
        self.assertTrue(cdr["callee"].endswith(";transport=tls"), cdr["callee"])
        self.check_audio_both_ways(recording, heard)

    @defer.inlineCallbacks
    def test_sdes_srtp_call(self):
        yield self.start(srtp=True, tail_seconds=1.5)
        self.assertIn("SRTP is Enabled (cryptosuite=AES_CM_128_HMAC_SHA1_80)", self.baresip.output)
        cdr, recording, heard = yield self.finish()  # baresip hangs up at the end of its WAV
        self.assertEqual(cdr["hangupReason"], "caller")
        with open(cdr["dumpEventFile"]) as f:
            events = [json.loads(json.loads(line)["content"]) for line in f]
        answer = next(e["sdp"] for e in events if e.get("event") == "answer")
        self.assertIn("m=audio", answer)
        self.assertRegex(answer, r"m=audio \d+ RTP/SAVP ")
        self.assertRegex(answer, r"a=crypto:\d+ AES_CM_128_HMAC_SHA1_80 inline:")
        self.check_audio_both_ways(recording, heard)
