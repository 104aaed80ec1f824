"""``mediaPass``, watchers (``/call/subscribe``, the ``subscribe`` option) and the SSE event stream
(``GET /events/{id}``, ``POST /command/{id}``) through the whole daemon.

A real WebSocket server started by the test (Autobahn) stands in for the external media server: it
records what reaches it and answers with a 1 kHz tone.  The caller speaks a 440 Hz tone, over
``/call`` binary frames or as a sipp UAS's RTP on an outbound ``/call/sip`` call.  Assertions are on
what is deterministic: query parameters, frame sizes, the tones' frequencies, the events."""

import json
import os

import numpy as np
import treq
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import defer, reactor
from twisted.trial import unittest

from activecall.audio import resample
from tests.helpers import free_port, spawn_daemon, write_config
from tests.test_sip_calls import write_ulaw_wav
from tests.test_sip_integration import SCENARIOS, port_bound, sipp, sipp_result, udp_port, when
from tests.wsclient import connect, send_json

TOKEN = "s3cret-token"
FRAME = 320  # 20 ms at 16 kHz


def tone(freq, seconds, rate=16000, amplitude=8000):
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def peak_hz(samples, rate):
    samples = np.asarray(samples, dtype=float)
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(samples.size)))
    return float(np.fft.rfftfreq(samples.size, 1 / rate)[int(np.argmax(spectrum))])


def later(seconds):
    d = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


@defer.inlineCallbacks
def until(predicate, what, timeout=30.0):
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        yield later(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class MediaServer(WebSocketServerProtocol):
    """The external media server: keeps what it gets, answers with ``reply`` once audio arrives."""

    def onConnect(self, request):
        self.factory.requests.append(request)

    def onOpen(self):
        self.factory.connections.append(self)

    def onMessage(self, payload, isBinary):
        if not isBinary:
            return
        self.factory.frames.append(payload)
        if not self.factory.replied:
            self.factory.replied = True
            reply = self.factory.reply
            for i in range(0, len(reply), 640):  # 40 ms chunks at 8 kHz
                self.sendMessage(reply[i:i + 640], isBinary=True)


class MediaPassCase(unittest.TestCase):
    timeout = 90

    def media_server(self):
        factory = WebSocketServerFactory()
        factory.protocol = MediaServer
        factory.requests, factory.connections, factory.frames = [], [], []
        factory.replied = False
        factory.reply = tone(1000, 2.0, rate=8000).astype("<i2").tobytes()
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(lambda: [c.dropConnection(abort=True) for c in factory.connections])
        return factory, port.getHost().port

    def start(self):
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        self.sip_port = udp_port()
        self.http_port = free_port()
        base = free_port() // 2 * 2
        conf = write_config(self, f'''
addr = "127.0.0.1"
udp_port = {self.sip_port}
tcp_port = 0
http_addr = "127.0.0.1:{self.http_port}"
http_token = "{TOKEN}"
rtp_start_port = {base}
rtp_end_port = {base + 20}
media_cache_path = "{self.root}/cache"
playbook_dir = "{self.root}"
[recording]
enabled = true
auto_start = true
path = "{self.root}/rec"
''')
        self.daemon = spawn_daemon(self, conf)
        return self.daemon.wait_for("activecall ready")

    def url(self, path):
        return f"http://127.0.0.1:{self.http_port}{path}"

    def auth(self):
        return {"Authorization": [f"Bearer {TOKEN}"]}

    def check_media_server(self, server, packet_size, output_rate):
        query = server.requests[0].params
        self.assertEqual(server.requests[0].path, "/media")
        self.assertEqual(query["sample_rate"], [str(output_rate)])
        self.assertEqual(query["packet_size"], [str(packet_size)])
        self.assertEqual(query["room"], ["7"])  # the URL's own query is kept
        self.assertTrue(all(len(f) == packet_size for f in server.frames), {len(f) for f in server.frames})
        heard = np.frombuffer(b"".join(server.frames), dtype="<i2")
        return heard


class WebSocketCallTests(MediaPassCase):
    @defer.inlineCallbacks
    def test_media_pass_subscribe_and_sse_on_a_call(self):
        server, server_port = self.media_server()
        yield self.start()
        proto, client = yield connect(self, self.http_port, "/call", f"id=mp1&token={TOKEN}")
        send_json(proto, {"command": "invite", "option": {"mediaPass": {
            "url": f"ws://127.0.0.1:{server_port}/media?room=7", "inputSampleRate": 8000,
            "outputSampleRate": 16000, "packetSize": 1280}}})
        yield client.wait_event("answer")
        yield client.wait_event("trackStart", trackId="server-side-track")

        # a watcher on the side, and an SSE client: both see the call from its start
        wproto, watcher = yield connect(self, self.http_port, "/call/subscribe", f"id=mp1&token={TOKEN}")
        sse = yield treq.get(self.url("/events/mp1"), headers=self.auth(), unbuffered=True, persistent=False)
        self.assertEqual(sse.code, 200)
        self.assertTrue(sse.headers.getRawHeaders("content-type")[0].startswith("text/event-stream"))
        chunks = []
        sse_done = treq.collect(sse, chunks.append)

        caller = tone(440, 1.0)
        for i in range(0, caller.size, FRAME):
            proto.sendMessage(caller[i:i + FRAME].astype("<i2").tobytes(), isBinary=True)
            yield later(0.02)
        yield until(lambda: sum(map(len, server.frames)) >= 24000, "the caller's audio at the media server")
        heard = self.check_media_server(server, 1280, 16000)
        self.assertAlmostEqual(peak_hz(heard, 16000), 440, delta=5)

        # the server's answer is the bot: it comes back on /call as binary audio (16 kHz pcm)
        yield until(lambda: sum(map(len, client.audio)) >= 32000, "the media server's answer on /call")
        back = np.frombuffer(b"".join(client.audio), dtype="<i2")
        self.assertAlmostEqual(peak_hz(back, 16000), 1000, delta=5)

        # the watcher gets both sides, prefixed: 0x01 the caller, 0x00 the bot
        yield until(lambda: sum(1 for f in watcher.audio if f[:1] == b"\x00") >= 25, "bot frames at the watcher")
        sides = {b"\x00": [], b"\x01": []}
        for frame in watcher.audio:
            self.assertEqual(len(frame), 1 + 2 * FRAME)
            sides[frame[:1]].append(frame[1:])
        self.assertAlmostEqual(peak_hz(np.frombuffer(b"".join(sides[b"\x01"]), "<i2"), 16000), 440, delta=5)
        self.assertAlmostEqual(peak_hz(np.frombuffer(b"".join(sides[b"\x00"]), "<i2"), 16000), 1000, delta=5)
        self.assertEqual([e["event"] for e in watcher.events[:2]], ["trackStart", "answer"])

        # a command over HTTP ends the call; the SSE stream carries the same events and then ends
        bad = yield treq.post(self.url("/command/mp1"), b'{"command":"nope"}', headers=self.auth(), persistent=False)
        self.assertEqual(bad.code, 400)
        self.assertIn("unknown command", (yield bad.json())["error"])
        ok = yield treq.post(self.url("/command/mp1"), b'{"command":"hangup","reason":"done"}', headers=self.auth(),
                              persistent=False)
        self.assertEqual(ok.code, 202)
        self.assertEqual((yield ok.json())["command"], "hangup")
        yield client.wait_event("end")
        yield sse_done
        text = b"".join(chunks).decode()
        events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
        ids = [int(line[4:]) for line in text.splitlines() if line.startswith("id: ")]
        self.assertEqual(ids, sorted(ids))
        names = [e["event"] for e in events]
        self.assertEqual(names[:2], ["trackStart", "answer"])
        self.assertEqual(names[-1], "end")
        self.assertIn("hangup", names)
        self.assertIn("error", names)  # the bad command's error went to every watcher
        self.assertEqual(events, [e for e in client.events if e["event"] in set(names)][:len(events)])
        yield until(lambda: watcher.closed.called, "the watcher to be closed")

    @defer.inlineCallbacks
    def test_token_and_unknown_calls(self):
        yield self.start()
        for path, method in (("/events/x", treq.get), ("/command/x", treq.post)):
            answer = yield method(self.url(path), persistent=False)
            self.assertEqual(answer.code, 401, path)
            yield answer.content()
            answer = yield method(self.url(path), headers=self.auth(), persistent=False)
            self.assertEqual(answer.code, 404, path)
            self.assertIn("no active call", (yield answer.json())["error"])
        _, watcher = yield connect(self, self.http_port, "/call/subscribe", f"id=nobody&token={TOKEN}")
        code = yield watcher.closed
        self.assertEqual(code, 4004)
        self.assertEqual(watcher.events[0]["code"], 404)

    @defer.inlineCallbacks
    def test_unreachable_media_server_is_an_error_event(self):
        yield self.start()
        port = free_port()  # nobody listens there
        proto, client = yield connect(self, self.http_port, "/call", f"id=mp2&token={TOKEN}")
        send_json(proto, {"command": "invite", "option": {"mediaPass": {
            "url": f"ws://127.0.0.1:{port}/?token=abc", "inputSampleRate": 16000, "outputSampleRate": 16000}}})
        error = yield client.wait_event("error")
        self.assertTrue(error["sender"].startswith("media_pass: ws://127.0.0.1"), error)
        self.assertNotIn("abc", error["sender"])  # the URL's secret is not echoed
        send_json(proto, {"command": "hangup"})
        yield client.wait_event("end")


class SipCallTests(MediaPassCase):
    @defer.inlineCallbacks
    def test_media_pass_and_subscribe_on_an_outbound_sip_call(self):
        server, server_port = self.media_server()
        yield self.start()
        wav = os.path.join(self.root, "tone.wav")
        write_ulaw_wav(wav, resample(tone(440, 3.0), 16000, 8000))
        with open(os.path.join(SCENARIOS, "uas_speaks.xml")) as f:
            text = f.read().replace("{SPEECH_WAV}", wav)
        scenario = os.path.join(self.root, "uas_speaks.xml")
        with open(scenario, "w") as f:
            f.write(text)
        uas_port = udp_port()
        uas = sipp(self, "-p", str(uas_port), "-mp", str(udp_port() // 2 * 2), scenario=scenario)
        yield when(port_bound(uas_port), 15, "sipp uas to bind")
        proto, client = yield connect(self, self.http_port, "/call/sip", f"id=mps&token={TOKEN}")
        send_json(proto, {"command": "invite", "option": {
            "callee": f"sip:bob@127.0.0.1:{uas_port}", "subscribe": True, "mediaPass": {
                "url": f"ws://127.0.0.1:{server_port}/media?room=7", "inputSampleRate": 8000,
                "outputSampleRate": 8000}}})
        yield client.wait_event("answer")
        yield until(lambda: sum(map(len, server.frames)) >= 16000, "the SIP party's audio at the media server")
        heard = self.check_media_server(server, 3200, 8000)
        self.assertAlmostEqual(peak_hz(heard, 8000), 440, delta=5)
        # subscribe: the control socket carries both sides, prefixed
        yield until(lambda: sum(1 for f in client.audio if f[:1] == b"\x00") >= 25, "bot frames on the control socket")
        bot = b"".join(f[1:] for f in client.audio if f[:1] == b"\x00")
        self.assertAlmostEqual(peak_hz(np.frombuffer(bot, "<i2"), 16000), 1000, delta=5)
        self.assertTrue(any(f[:1] == b"\x01" for f in client.audio))
        self.assertEqual([e for e in client.events if e["event"] == "error"], [])
        send_json(proto, {"command": "hangup"})
        yield client.wait_event("end")
        yield sipp_result(uas, timeout=15)


class WebRTCCallTests(MediaPassCase):
    """An aiortc peer stands in for the browser (its microphone: a 440 Hz tone), with ``subscribe``."""

    @defer.inlineCallbacks
    def test_media_pass_and_subscribe_on_a_webrtc_call(self):
        from tests.test_webrtc import Peer

        server, server_port = self.media_server()
        yield self.start()
        peer = Peer()
        self.addCleanup(peer.close)
        offer = yield peer.offer()
        proto, client = yield connect(self, self.http_port, "/call/webrtc", f"id=mpw&token={TOKEN}")
        send_json(proto, {"command": "invite", "option": {"sdp": offer, "codec": "pcmu", "subscribe": True,
                                                          "mediaPass": {
            "url": f"ws://127.0.0.1:{server_port}/media?room=7", "inputSampleRate": 8000,
            "outputSampleRate": 24000, "packetSize": 960}}})
        answer = yield client.wait_event("answer")
        yield peer.answer(answer["sdp"])
        yield peer.connected
        yield until(lambda: sum(map(len, server.frames)) >= 48000, "the browser's audio at the media server")
        heard = self.check_media_server(server, 960, 24000)
        self.assertAlmostEqual(peak_hz(heard[-24000:], 24000), 440, delta=5)
        # the media server's 1 kHz answer reaches the browser (PCMU, 8 kHz)
        yield until(lambda: sum(f.size for f in peer.received) >= 16000, "audio at the browser")
        at_browser = np.concatenate(peer.received)
        self.assertEqual(peer.received[-1].size, 160)  # PCMU: 20 ms at 8 kHz
        self.assertAlmostEqual(peak_hz(at_browser, 8000), 1000, delta=5)
        yield until(lambda: sum(1 for f in client.audio if f[:1] == b"\x00") >= 50, "bot frames on the control socket")
        bot = b"".join(f[1:] for f in client.audio if f[:1] == b"\x00")
        self.assertAlmostEqual(peak_hz(np.frombuffer(bot, "<i2"), 16000), 1000, delta=5)
        caller = b"".join(f[1:] for f in client.audio if f[:1] == b"\x01")
        self.assertAlmostEqual(peak_hz(np.frombuffer(caller, "<i2")[-8000:], 16000), 440, delta=5)
        self.assertEqual([e for e in client.events if e["event"] == "error"], [])
        send_json(proto, {"command": "hangup"})
        yield client.wait_event("end")
        yield peer.close()


class HttpOnlyClientTests(MediaPassCase):
    """A client with no WebSocket at all: POST /command/{id} places the call, GET /events/{id} follows it."""

    @defer.inlineCallbacks
    def test_place_follow_and_end_a_sip_call_over_http(self):
        yield self.start()
        uas_port = udp_port()
        uas = sipp(self, "-p", str(uas_port), "-mp", str(udp_port() // 2 * 2), builtin="uas")
        yield when(port_bound(uas_port), 15, "sipp uas to bind")
        nothing = yield treq.post(self.url("/command/h0"), b'{"command":"accept","option":{}}',
                                  headers=self.auth(), persistent=False)
        self.assertEqual(nothing.code, 404)  # no inbound call pending under that id: no session made
        self.assertIn("no active or pending call", (yield nothing.json())["error"])
        invite = json.dumps({"command": "invite", "option": {"callee": f"sip:bob@127.0.0.1:{uas_port}"}})
        placed = yield treq.post(self.url("/command/h1"), invite.encode(), headers=self.auth(), persistent=False)
        self.assertEqual(placed.code, 202)
        yield placed.content()
        sse = yield treq.get(self.url("/events/h1"), headers=self.auth(), unbuffered=True, persistent=False)
        chunks = []
        done = treq.collect(sse, chunks.append)
        yield until(lambda: b'"event":"answer"' in b"".join(chunks).replace(b" ", b""), "answer on the stream")
        ended = yield treq.post(self.url("/command/h1"), b'{"command":"hangup"}', headers=self.auth(),
                                persistent=False)
        self.assertEqual(ended.code, 202)
        yield ended.content()
        yield done
        names = [json.loads(line[6:])["event"] for line in b"".join(chunks).decode().splitlines()
                 if line.startswith("data: ")]
        self.assertEqual(names[0], "ringing")  # from the call's start: the backlog came first
        self.assertIn("answer", names)
        self.assertEqual(names[-2:], ["hangup", "end"])
        yield sipp_result(uas, timeout=15)


class MediaPassUnitTests(unittest.TestCase):
    """``call/media_pass.py`` on task.Clock with a fake connection: packets, mixing, bad options."""

    def make(self, **option):
        from activecall.call.media_pass import MediaPass
        from activecall.call.session import CallSession
        from activecall.protocol import commands as cmd
        from twisted.internet import task

        self.events = []
        session = CallSession("u1", "webSocket", clock=task.Clock(), emit=self.events.append, dump=False)
        self.factories = []
        values = dict(url="ws://media.example/x", inputSampleRate=16000, outputSampleRate=8000)
        values.update(option)
        bridge = MediaPass(session, cmd.MediaPassOption(**values), connect=self.factories.append)
        session.media_pass = bridge
        bridge.start()
        return session, bridge

    def test_packets_are_exactly_packet_size_at_the_output_rate(self):
        session, bridge = self.make(packetSize=200)
        sent = []

        class Conn:
            def sendMessage(self, payload, isBinary):
                sent.append(payload)

        self.assertIn("sample_rate=8000", self.factories[0].url)
        session.audio_in(tone(440, 0.02))  # before the connection: kept
        bridge.connected(Conn())
        self.assertEqual(self.events[-1].TAG, "trackStart")
        for _ in range(9):
            session.audio_in(tone(440, 0.02))
        self.assertEqual({len(p) for p in sent}, {200})
        self.assertEqual(len(sent), 10 * 160 * 2 // 200)  # 10 frames of 160 samples at 8 kHz

    def test_the_answer_is_mixed_into_the_bot_frame(self):
        session, bridge = self.make()
        stream = np.full(2 * FRAME, 1000, dtype="<i2").tobytes()
        bridge.received(stream[:641])  # a chunk may end inside a sample: the odd byte waits
        self.assertEqual(bridge.mix(None).tolist(), [1000] * FRAME)
        quiet = np.full(FRAME, 5, dtype=np.int16)
        self.assertIs(bridge.mix(quiet), quiet)  # less than 20 ms left: the bot's frame as it is
        bridge.received(stream[641:])
        loud = bridge.mix(np.full(FRAME, 32000, dtype=np.int16))
        self.assertEqual(loud.tolist(), [32767] * FRAME)  # summed and clipped, not wrapped
        self.assertIsNone(bridge.mix(None))

    def test_bad_options_are_an_error_naming_them(self):
        for option, words in (({"url": "http://x"}, "ws:// or wss://"), ({"inputSampleRate": 11025}, "sample rates"),
                              ({"packetSize": 3}, "packetSize")):
            self.make(**option)
            errors = [e for e in self.events if e.TAG == "error"]
            self.assertEqual(len(errors), 1, option)
            self.assertIn(words, errors[0].error)
            self.assertEqual(errors[0].code, 400)
            self.assertEqual(self.factories, [])
