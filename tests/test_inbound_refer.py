"""An inbound SIP REFER (RFC 3515) through the whole daemon, against sipp: a PBX (sipp's UAC scenario
``uac_refer.xml``) calls us and transfers the call to a target (sipp's UAS ``uas_transfer_target.xml``,
which checks Referred-By and the Replaces header taken from the Refer-To).

- a /call/sip client sees ``transferRequest`` and answers ``acceptTransfer``: 202, NOTIFY 100 / 180 / 200
  (message/sipfrag, checked by the PBX scenario), our BYE on the old dialog, ``answer{refer: true}``, and
  the call goes on with the target until the client hangs up (the target gets our BYE);
- ``rejectTransfer``: 603, and the call goes on until the PBX hangs up;
- a target that refuses (486): the final NOTIFY carries 486, ``reject{refer: true}``, the call goes on;
- a playbook with ``sip.transfer_requests: accept`` carries the transfer out with no client.
"""

import json
import os
import wave

import numpy as np
from twisted.internet import defer, reactor
from twisted.web import resource, server

from tests.helpers import loud_ms
from tests.test_sip_calls import DaemonCase, _later
from tests.test_sip_integration import LoopbackUA, port_bound, sipp, sipp_result, udp_port, when
from tests.wsclient import connect, send_json

REPLACES = "abc@pbx;to-tag=7;from-tag=9"

ACCEPTING_PLAYBOOK = """---
llm:
  provider: echo
  greeting: "Hello."
tts:
  provider: flite
sip:
  transfer_requests: accept
---
You repeat what the caller says.
"""


class InboundReferTests(DaemonCase):
    timeout = 90

    @defer.inlineCallbacks
    def webhook(self):
        hooks = []

        class Hook(resource.Resource):
            isLeaf = True

            def render_POST(self, request):
                hooks.append(json.loads(request.content.read()))
                return b"{}"

        port = reactor.listenTCP(0, server.Site(Hook()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        yield self.start(f'[handler]\ntype = "webhook"\nurl = "http://127.0.0.1:{port.getHost().port}/hook"\n')
        return hooks

    @defer.inlineCallbacks
    def target(self):
        port = udp_port()
        uas = sipp(self, "-p", str(port), "-mp", str(udp_port() // 2 * 2), "-rtp_echo",
                   scenario="uas_transfer_target.xml")
        yield when(port_bound(port), 15, "sipp's transfer target to bind")
        return port, uas

    @defer.inlineCallbacks
    def pending_call(self, hooks):
        for _ in range(200):
            if hooks:
                break
            yield _later(0.05)
        self.assertTrue(hooks, "the webhook was not called\n" + self.daemon.output[-2000:])
        dialog_id = hooks[0]["dialogId"]
        proto, client = yield connect(self, self.http_port, "/call/sip", f"id={dialog_id}")
        send_json(proto, {"command": "accept", "option": {"codec": "pcmu"}})
        yield client.wait_event("answer")
        return proto, client

    @defer.inlineCallbacks
    def test_client_accepts_the_transfer(self):
        hooks = yield self.webhook()
        target_port, uas = yield self.target()
        pbx = sipp(self, f"127.0.0.1:{self.sip_port}", "-p", str(udp_port()), "-mp", str(udp_port() // 2 * 2),
                   "-key", "target", f"127.0.0.1:{target_port}", scenario="uac_refer.xml")
        proto, client = yield self.pending_call(hooks)
        request = yield client.wait_event("transferRequest")
        self.assertEqual(request["referTo"], f"sip:carol@127.0.0.1:{target_port}")
        self.assertEqual(request["referredBy"], "<sip:alice@pbx.example>")
        self.assertEqual(request["replaces"], REPLACES)
        send_json(proto, {"command": "acceptTransfer"})
        answer = yield client.wait_event("answer", refer=True)
        self.assertIn("m=audio", answer["sdp"])
        # the PBX saw 202, NOTIFY 100 Trying / 180 Ringing / 200 OK (sipfrag) and our BYE
        yield sipp_result(pbx, timeout=20)
        yield _later(0.3)
        self.assertEqual([e for e in client.events if e["event"] == "hangup"], [],
                         "the transferred call must go on")
        # the media moved: a 440 Hz tone played on the call reaches the target, whose echo comes back
        # into the call (the recording's caller channel; the PBX sent no audio at all)
        tone_path = os.path.join(self.root, "tone.wav")
        t = np.arange(16000) / 16000
        with wave.open(tone_path, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(16000)
            w.writeframes((np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").tobytes())
        send_json(proto, {"command": "play", "url": tone_path})
        yield client.wait_event("trackEnd", playId=tone_path)
        yield _later(0.5)
        send_json(proto, {"command": "hangup"})
        hangup = yield client.wait_event("hangup")
        self.assertEqual(hangup["reason"], "system")
        yield sipp_result(uas, timeout=20)  # the target checked the headers and got our BYE
        cdr = yield self.wait_cdr()
        self.assertEqual(cdr["extras"].get("transferred_to"), f"sip:carol@127.0.0.1:{target_port}")
        with wave.open(cdr["recorder"][0]["path"]) as w:
            frames = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, 2)
        caller = frames[:, 0].astype(float)
        self.assertGreater(loud_ms(frames[:, 0]), 400, "no echo of the tone came back from the target")
        spectrum = np.abs(np.fft.rfft(caller)) ** 2
        freqs = np.fft.rfftfreq(caller.size, 1 / 16000)
        self.assertLess(abs(freqs[np.argmax(spectrum)] - 440), 10)

    @defer.inlineCallbacks
    def test_client_refuses_the_transfer(self):
        hooks = yield self.webhook()
        pbx = sipp(self, f"127.0.0.1:{self.sip_port}", "-p", str(udp_port()), "-mp", str(udp_port() // 2 * 2),
                   "-key", "target", "127.0.0.1:9", scenario="uac_refer_refused.xml")
        proto, client = yield self.pending_call(hooks)
        yield client.wait_event("transferRequest")
        send_json(proto, {"command": "rejectTransfer"})
        yield sipp_result(pbx, timeout=20)  # 603, then the PBX hangs up
        hangup = yield client.wait_event("hangup")
        self.assertEqual(hangup["reason"], "caller")

    @defer.inlineCallbacks
    def test_target_refuses_the_call_stays(self):
        hooks = yield self.webhook()
        target = LoopbackUA(self)

        def busy(call):
            target.calls.append(call)
            call.reject(486, "Busy Here")

        target.ua.invite_handler = busy
        pbx = sipp(self, f"127.0.0.1:{self.sip_port}", "-p", str(udp_port()), "-mp", str(udp_port() // 2 * 2),
                   "-key", "target", f"127.0.0.1:{target.port}", scenario="uac_refer_failed.xml")
        proto, client = yield self.pending_call(hooks)
        yield client.wait_event("transferRequest")
        send_json(proto, {"command": "acceptTransfer", "headers": {"X-Transfer": "1"}})
        reject = yield client.wait_event("reject", refer=True)
        self.assertEqual(reject["code"], 486)
        invite = target.calls[0].invite
        self.assertEqual(invite.headers.get("X-Transfer"), "1")
        self.assertEqual(invite.headers.get("Replaces"), REPLACES)
        yield sipp_result(pbx, timeout=20)  # 202, NOTIFY 100, NOTIFY 486 (terminated); then its own BYE
        hangup = yield client.wait_event("hangup")
        self.assertEqual(hangup["reason"], "caller")

    @defer.inlineCallbacks
    def test_playbook_accepts_the_transfer(self):
        from tests import test_sip_calls

        self.patch(test_sip_calls, "PLAYBOOK", ACCEPTING_PLAYBOOK)
        yield self.start('[handler]\ntype = "playbook"\ndefault = "test.md"\n')
        target_port, uas = yield self.target()
        pbx = sipp(self, f"127.0.0.1:{self.sip_port}", "-p", str(udp_port()), "-mp", str(udp_port() // 2 * 2),
                   "-key", "target", f"127.0.0.1:{target_port}", scenario="uac_refer.xml")
        yield sipp_result(pbx, timeout=20)
        cdr = yield self.wait_cdr_or_none()
        self.assertIsNone(cdr, "the transferred call must go on after the old dialog's BYE")
        # end the daemon: the transferred call ends with a BYE to the target
        self.daemon.signal("TERM")
        yield sipp_result(uas, timeout=20)

    @defer.inlineCallbacks
    def wait_cdr_or_none(self):
        import glob
        import os

        yield _later(0.5)
        found = glob.glob(os.path.join(self.root, "cdr", "*", "*.json"))
        return found[0] if found else None
