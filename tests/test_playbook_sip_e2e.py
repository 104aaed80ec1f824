"""A playbook over SIP, end to end (issue 7's test): the real daemon routes sipp's INVITE to a playbook
(``[handler] type = "playbook"``) whose LLM is a fake OpenAI-compatible SSE server started here, and whose
posthook is a twisted.web server started here.

sipp answers nothing itself: it streams a flite sentence as PCMU after the greeting and then waits for the
daemon's BYE (tests/sipp/uac_media_wait_bye.xml).  The playbook greets (the greeting is in the recording's
right channel), the recogniser hears the sentence and its text reaches the fake LLM in the request body, the
LLM's streamed reply ends with ``<hangup/>``, the reply is spoken (in the right channel, after the caller's
turn), the daemon sends BYE once it has played (sipp's scenario completes, exit 0), and the posthook arrives
with ``{sessionId, summary, history, timestamp}`` (the ``short`` summary is one more, non-streamed, request
to the fake LLM).

The recogniser is a local fake (tests/cloud_helpers.FakeTranscriber) that answers the sentence for the
first utterance with sound in it: sipp paces the RTP in real time, so what pocketsphinx made of it differed
from run to run.  The audio checks are on sound, not words, for the same reason.  Telephone-band
recognition (pocketsphinx's narrowband start) is tested on fixed clips in test_speech_telephone.
"""

import glob
import json
import os
import wave

import numpy as np
from twisted.internet import defer
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial import unittest
from twisted.web import resource, server

from activecall.audio import resample
from activecall.speech.testing import synthesize_pcm
from tests.cloud_helpers import FakeTranscriber
from tests.helpers import free_port, loud_ms, spawn_daemon, write_config
from tests.test_sip_calls import write_ulaw_wav
from tests.test_sip_integration import SCENARIOS, sipp, sipp_result, udp_port, when

SENTENCE = "I would like to check the status of my order"
GREETING = "Hello, this is the order line. How can I help you?"
REPLY = "Your order has shipped and arrives tomorrow. Goodbye!"
SUMMARY = "The caller asked about an order; it has shipped."

PLAYBOOK = """---
llm:
  provider: openai
  baseUrl: {llm}
  apiKey: sk-sip-e2e
  model: e2e-model
  language: en
greeting: "{greeting}"
asr: {asr}
vad: {{type: webrtcvad}}
tts: {{provider: flite}}
interruption: {{strategy: none}}
posthook:
  url: {hook}
  summary: short
  headers: {{X-Test: sip-e2e}}
---
You are the order line of Example Shop.
"""


class FakeOpenAI(resource.Resource):
    """POST /v1/chat/completions: records each request; a stream request gets ``reply`` as SSE in small
    chunks, a plain one (the posthook's summary) gets a chat.completion JSON with ``summary``."""

    isLeaf = True

    def __init__(self, reply, summary):
        super().__init__()
        self.reply = reply
        self.summary = summary
        self.requests = []
        self.first = defer.Deferred()

    def render_POST(self, request):
        body = json.loads(request.content.read())
        self.requests.append({"path": request.path.decode(), "auth": request.getHeader("authorization"),
                              "body": body})
        if not body.get("stream"):
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"id": "x", "object": "chat.completion", "choices": [{
                "index": 0, "message": {"role": "assistant", "content": self.summary},
                "finish_reason": "stop"}]}).encode()
        request.setHeader(b"content-type", b"text/event-stream")
        for i in range(0, len(self.reply), 6):
            chunk = {"choices": [{"index": 0, "delta": {"content": self.reply[i:i + 6]}, "finish_reason": None}]}
            request.write(f"data: {json.dumps(chunk)}\n\n".encode())
        request.write(b"data: [DONE]\n\n")
        request.finish()
        if not self.first.called:
            self.first.callback(body)
        return server.NOT_DONE_YET


class Posthook(resource.Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.arrived = defer.Deferred()
        self.requests = []

    def render_POST(self, request):
        self.requests.append({"path": request.path.decode(), "headers": dict(request.requestHeaders.getAllRawHeaders()),
                              "body": json.loads(request.content.read())})
        if not self.arrived.called:
            self.arrived.callback(self.requests[-1])
        return b"ok"


@defer.inlineCallbacks
def listen(site):
    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
    return port


def voiced_spans(pcm: np.ndarray, rate: int = 16000, level: float = 200, gap_s: float = 1.0):
    """(start, end) sample ranges of sound separated by at least ``gap_s`` of quiet (20 ms windows)."""
    win = rate // 50
    n = pcm.size // win
    loud = np.abs(pcm[:n * win].astype(np.int32)).reshape(n, win).mean(axis=1) > level
    spans, start, quiet = [], None, 0
    for i, on in enumerate(loud):
        if on:
            if start is None:
                start = i
            quiet = 0
        elif start is not None:
            quiet += 1
            if quiet * win >= gap_s * rate:
                spans.append((start * win, (i - quiet + 1) * win))
                start, quiet = None, 0
    if start is not None:
        spans.append((start * win, (n - quiet) * win))
    return spans


class PlaybookOverSipTests(unittest.TestCase):
    timeout = 150

    @defer.inlineCallbacks
    def test_sipp_call_greeting_llm_turn_hangup_and_posthook(self):
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.root, "playbooks"))
        llm = FakeOpenAI(REPLY + " <hangup/>", SUMMARY)
        hook = Posthook()
        asr = FakeTranscriber(self, SENTENCE, answers=1)
        llm_port = yield listen(server.Site(llm))
        self.addCleanup(llm_port.stopListening)
        hook_port = yield listen(server.Site(hook))
        self.addCleanup(hook_port.stopListening)
        with open(os.path.join(self.root, "playbooks", "orders.md"), "w") as f:
            f.write(PLAYBOOK.format(llm=f"http://127.0.0.1:{llm_port.getHost().port}/v1", greeting=GREETING,
                                    asr=json.dumps(asr.asr_option),
                                    hook=f"http://127.0.0.1:{hook_port.getHost().port}/posthook"))

        # the caller stays quiet while the greeting plays (as long as a call's set-up and the greeting's
        # synthesis take here), then says its sentence
        greeting = yield synthesize_pcm(GREETING)
        speech = yield synthesize_pcm(SENTENCE)
        reply = yield synthesize_pcm(REPLY)
        lead = np.zeros(greeting.size + 32000, np.int16)  # + 2 s
        pcm8k = resample(np.concatenate([lead, speech, np.zeros(24000, np.int16)]), 16000, 8000)
        wav = os.path.join(self.root, "speech.wav")
        write_ulaw_wav(wav, pcm8k)
        scenario = os.path.join(self.root, "uac_media_wait_bye.xml")
        with open(os.path.join(SCENARIOS, "uac_media_wait_bye.xml")) as f:
            text = f.read()
        with open(scenario, "w") as f:
            f.write(text.replace("{SPEECH_WAV}", wav).replace("{SPEECH_MS}", str(int(pcm8k.size / 8)))
                    .replace("{BYE_TIMEOUT_MS}", "40000"))

        sip_port = udp_port()
        base = free_port() // 2 * 2
        conf = write_config(self, f'''
addr = "127.0.0.1"
udp_port = {sip_port}
tcp_port = 0
http_addr = "127.0.0.1:{free_port()}"
rtp_start_port = {base}
rtp_end_port = {base + 20}
media_cache_path = "{self.root}/cache"
playbook_dir = "{self.root}/playbooks"
[handler]
type = "playbook"
default = "orders.md"
[recording]
enabled = true
auto_start = true
path = "{self.root}/rec"
[callrecord]
type = "local"
root = "{self.root}/cdr"
''')
        daemon = spawn_daemon(self, conf)
        yield daemon.wait_for("activecall ready")
        uac = sipp(self, f"127.0.0.1:{sip_port}", "-p", str(udp_port()), "-mp", str(udp_port() // 2 * 2),
                   "-timeout", "90s", scenario=scenario)

        # the caller's words reach the LLM
        body = yield when(llm.first, 30, "the LLM request after the caller's sentence\n" + daemon.output[-3000:])
        self.assertEqual(llm.requests[0]["auth"], "Bearer sk-sip-e2e")
        self.assertEqual(llm.requests[0]["path"], "/v1/chat/completions")
        self.assertEqual(body["model"], "e2e-model")
        messages = body["messages"]
        self.assertEqual(messages[0]["role"], "system")
        self.assertIn("order line of Example Shop", messages[0]["content"])
        self.assertEqual(messages[1], {"role": "assistant", "content": GREETING})
        self.assertEqual(messages[-1]["role"], "user")
        heard = messages[-1]["content"]
        self.assertEqual(heard, SENTENCE)
        # what the recogniser was given: the caller's utterance, with most of the sentence's sound in it
        self.assertGreaterEqual(loud_ms((yield asr.answered)), loud_ms(speech) // 2)

        # the reply plays, then the daemon hangs up: sipp gets its BYE and completes
        yield sipp_result(uac, timeout=60)

        # the posthook: the summary (a second, non-streamed request), the history
        posted = yield when(hook.arrived, 15, "the posthook\n" + daemon.output[-3000:])
        self.assertEqual(posted["path"], "/posthook")
        self.assertEqual(posted["headers"].get(b"X-Test"), [b"sip-e2e"])
        report = posted["body"]
        self.assertEqual(set(report), {"sessionId", "summary", "history", "timestamp"})
        self.assertEqual(report["summary"], SUMMARY)
        self.assertFalse(llm.requests[1]["body"].get("stream"))
        self.assertEqual(report["history"], [
            {"role": "assistant", "content": GREETING},
            {"role": "user", "content": heard},
            {"role": "assistant", "content": REPLY + " <hangup/>"},
        ])
        self.assertEqual(len(hook.requests), 1)

        cdr = yield self.wait_cdr(daemon)
        self.assertEqual(cdr["callType"], "sip")
        self.assertEqual(cdr["callId"], report["sessionId"])
        self.assertEqual(cdr["hangupReason"], "autohangup")  # <hangup/>: the TTS's autoHangup, then our BYE
        with open(cdr["dumpEventFile"]) as f:
            events = [json.loads(json.loads(line)["content"]) for line in f]
        greeting_end = next(e for e in events if e["event"] == "trackEnd" and e.get("playId") == "greeting")
        reply_end = next(e for e in events if e["event"] == "trackEnd" and e.get("playId") == "llm-1")
        hangup = next(e for e in events if e["event"] == "hangup")
        self.assertEqual([e["text"] for e in events if e["event"] == "asrFinal"], [SENTENCE])  # one turn
        self.assertGreater(greeting_end["duration"], 2000)
        self.assertGreater(reply_end["duration"], 2000)  # the whole reply played...
        self.assertGreaterEqual(hangup["timestamp"], reply_end["timestamp"])  # ...before the BYE

        # the recording: the greeting, then (after the caller's turn, the longest quiet stretch of the bot's
        # channel) the reply, in the bot's (right) channel; the caller's sentence in the left.  The
        # recorder leaves silence where the reactor was late, and the caller's channel runs behind the
        # bot's by an amount that varies (RTP through the jitter buffer), so the checks are on how much
        # sound each part holds (at least half what flite made), not on words or exact places.
        with wave.open(cdr["recorder"][0]["path"]) as w:
            self.assertEqual((w.getnchannels(), w.getframerate()), (2, 16000))
            frames = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, 2)
        bot, caller = frames[:, 1].copy(), frames[:, 0].copy()
        spans = voiced_spans(bot)
        self.assertGreaterEqual(len(spans), 2, spans)
        quiet, turn = max((b[0] - a[1], i) for i, (a, b) in enumerate(zip(spans, spans[1:])))
        self.assertGreater(quiet, 16000, spans)  # the caller's turn: a sentence and the endpointing
        self.assertGreaterEqual(loud_ms(bot[:spans[turn][1]]), loud_ms(greeting) // 2)
        self.assertGreaterEqual(loud_ms(bot[spans[turn + 1][0]:]), loud_ms(reply) // 2)
        self.assertLessEqual(loud_ms(bot), (loud_ms(greeting) + loud_ms(reply)) * 3 // 2)  # nothing else spoke
        self.assertGreaterEqual(loud_ms(caller), loud_ms(speech) // 2)
        self.assertLessEqual(loud_ms(caller), loud_ms(speech) * 3 // 2)

    @defer.inlineCallbacks
    def wait_cdr(self, daemon):
        for _ in range(200):
            found = glob.glob(os.path.join(self.root, "cdr", "*", "*.json"))
            if found:
                with open(found[0]) as f:
                    return json.load(f)
            d = defer.Deferred()
            reactor.callLater(0.05, d.callback, None)
            yield d
        raise AssertionError("no CDR was written\n" + daemon.output[-3000:])
