"""SIP user agent (activecall.sip.useragent) over an in-memory transport, every timer on task.Clock."""

import dataclasses

from twisted.internet import defer, task
from twisted.trial import unittest

from activecall.config import Credential, RegisterUser, Rewrite, load_config
from activecall.sip import auth
from activecall.sip.message import Request, Response, Via, format_host, make_response, parse_message
from activecall.sip.call import reason_header
from activecall.sip.call_events import (
    CallFailed,
    Dtmf,
    Ended,
    Established,
    HoldChanged,
    Provisional,
    TransferProgress,
    TransferRequested,
    parse_dtmf_info,
)
from activecall.sip.policy import apply_rewrites, credentials_for
from activecall.sip.sdp_offer import minimal_offer, mirror_direction, sdp_direction, with_direction
from activecall.sip.useragent import UserAgent

PEER = ("192.0.2.10", 5070)
US = "192.0.2.20"


def config(**overrides):
    cfg, _ = load_config(None, None)
    return dataclasses.replace(cfg, addr=US, udp_port=5060, **overrides)


class FakeNet:
    """The transport side: every message goes through bytes and back, as on the wire."""

    advertised_host = US

    def __init__(self):
        self.sent: list = []

    def local_via(self, transport="UDP"):
        return Via(transport, US, 5060, {"rport": None})

    def contact_uri(self, user=None, transport="UDP"):
        return f"sip:{user + '@' if user else ''}{format_host(US)}:5060"

    def send_request(self, request, target):
        self.sent.append(parse_message(request.to_bytes()))

    def send_response(self, response, source):
        self.sent.append(parse_message(response.to_bytes()))

    def requests(self, method):
        return [m for m in self.sent if isinstance(m, Request) and m.method == method]

    def responses(self, status=None, method=None):
        return [m for m in self.sent if isinstance(m, Response) and (status is None or m.status == status)
                and (method is None or m.cseq.method == method)]

    def last(self):
        return self.sent[-1]


def sdp(direction="sendrecv", host="192.0.2.10", port=4000, version=1):
    return (f"v=0\r\no=peer 1 {version} IN IP4 {host}\r\ns=-\r\nc=IN IP4 {host}\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
            f"a={direction}\r\n").encode()


def peer_request(method, call_id="call-1", from_tag="peer", to_tag="", cseq=1, branch=None, body=b"",
                 content_type="application/sdp", extra=(), uri=f"sip:bot@{US}:5060"):
    branch = branch or f"z9hG4bK-{method}-{cseq}-{call_id}"
    to = f"<sip:bot@{US}>" + (f";tag={to_tag}" if to_tag else "")
    lines = [f"{method} {uri} SIP/2.0", f"Via: SIP/2.0/UDP {PEER[0]}:{PEER[1]};branch={branch};rport",
             f"From: <sip:alice@{PEER[0]}>;tag={from_tag}", f"To: {to}", f"Call-ID: {call_id}",
             f"CSeq: {cseq} {method}", f"Contact: <sip:alice@{PEER[0]}:{PEER[1]}>", "Max-Forwards: 70"]
    lines += list(extra)
    if body:
        lines.append(f"Content-Type: {content_type}")
    lines.append(f"Content-Length: {len(body)}")
    return parse_message(("\r\n".join(lines) + "\r\n\r\n").encode() + body)


class Harness:
    def __init__(self, testcase, **overrides):
        self.clock = task.Clock()
        self.net = FakeNet()
        self.config = config(**overrides)
        self.ua = UserAgent(self.config, self.net, reactor=self.clock)
        self.calls = []
        self.ua.invite_handler = self.calls.append

    def deliver(self, msg, source=PEER):
        self.ua.layer.message_received(parse_message(msg.to_bytes()), source, "UDP")

    def answer_to(self, request, status, to_tag="callee", headers=(), body=b""):
        """A response from the peer to a request we sent."""
        extra = list(headers)
        if status < 300 or status in (180, 183):
            extra.append(("Contact", f"<sip:bob@{PEER[0]}:{PEER[1]}>"))
        if body:
            extra.append(("Content-Type", "application/sdp"))
        response = make_response(request, status, to_tag=to_tag if status > 100 else None, headers=extra,
                                 body=body)
        self.deliver(response)
        return response

    def ack_for(self, response, body=b""):
        """The peer's ACK for our 2xx."""
        return peer_request("ACK", call_id=response.call_id, from_tag=response.from_.tag, to_tag=response.to.tag,
                            cseq=response.cseq.seq, branch=f"z9hG4bK-ack-{response.cseq.seq}", body=body)

    def inbound(self, body=None, **kw):
        """Deliver an INVITE; return the InboundCall the handler received."""
        invite = peer_request("INVITE", body=sdp() if body is None else body, **kw)
        self.deliver(invite)
        return self.calls[-1]

    def established_inbound(self):
        call = self.inbound()
        call.answer(minimal_offer(US, 30000, session_id=7))
        ok = self.net.responses(200, "INVITE")[-1]
        self.deliver(self.ack_for(ok))
        return call, ok


class OutOfDialogTests(unittest.TestCase):
    def test_options_gets_200_with_capabilities(self):
        h = Harness(self)
        h.deliver(peer_request("OPTIONS"))
        response = h.net.last()
        self.assertEqual(response.status, 200)
        self.assertIn("INVITE", response.headers.get_all("Allow"))
        self.assertIn("REFER", response.headers.get_all("Allow"))
        self.assertIn("application/sdp", response.headers.get_all("Accept"))
        # an empty Supported (we implement no option tags yet) vanishes when parsed; it is sent
        self.assertIn(("Supported", "timer, 100rel"), h.ua.capabilities())

    def test_bye_for_unknown_dialog_is_481(self):
        h = Harness(self)
        h.deliver(peer_request("BYE", to_tag="nosuch"))
        self.assertEqual(h.net.last().status, 481)

    def test_out_of_dialog_bye_is_481_and_unknown_method_405(self):
        h = Harness(self)
        h.deliver(peer_request("BYE"))
        self.assertEqual(h.net.last().status, 481)
        h.deliver(peer_request("SUBSCRIBE"))
        self.assertEqual(h.net.last().status, 405)
        self.assertIn("INVITE", h.net.last().headers.get_all("Allow"))


class InboundTests(unittest.TestCase):
    def test_no_handler_rejects_503_with_reason(self):
        h = Harness(self)
        h.ua.invite_handler = UserAgent(h.config, h.net, reactor=h.clock).invite_handler  # the default
        h.deliver(peer_request("INVITE", body=sdp()))
        self.assertEqual([m.status for m in h.net.responses()], [100, 503])
        self.assertIn('text="No invite handler configured"', h.net.last().headers.get("Reason"))

    def test_ringing_answer_ack(self):
        h = Harness(self)
        call = h.inbound()
        self.assertEqual(call.state, "pending")
        self.assertEqual(call.caller, f"sip:alice@{PEER[0]}")
        self.assertEqual(call.dialog_id, f"call-1-{call.dialog.local_tag}-peer")
        invite = call.incoming_invite()
        self.assertEqual(invite.dialog_id, call.dialog_id)
        self.assertIn("m=audio", invite.offer)
        call.ringing()
        ringing = h.net.last()
        self.assertEqual(ringing.status, 180)
        self.assertEqual(ringing.to.tag, call.dialog.local_tag)
        self.assertEqual(str(ringing.contacts[0].uri), f"sip:{US}:5060")
        call.ringing(early_media_sdp=minimal_offer(US, 30000))
        self.assertEqual(h.net.last().status, 183)
        self.assertEqual(h.net.last().content_type, "application/sdp")

        answered = call.answer(minimal_offer(US, 30000))
        ok = h.net.last()
        self.assertEqual((ok.status, ok.to.tag), (200, call.dialog.local_tag))
        self.assertIn(b"m=audio 30000", ok.body)
        h.clock.advance(0.5)
        h.clock.advance(1.0)
        self.assertEqual(len(h.net.responses(200, "INVITE")), 3)  # resent until the ACK
        self.assertNoResult(answered)
        h.deliver(h.ack_for(ok))
        self.successResultOf(answered)
        self.assertEqual(call.state, "confirmed")
        self.assertIsInstance(call.events[-1], Established)
        h.clock.advance(10)
        self.assertEqual(len(h.net.responses(200, "INVITE")), 3)

    def test_reject_with_reason(self):
        h = Harness(self)
        call = h.inbound()
        call.reject(486, "busy now")
        self.assertEqual(h.net.last().status, 486)
        self.assertEqual(h.net.last().headers.get("Reason"), 'SIP;cause=486;text="busy now"')
        self.assertEqual(call.end, Ended("rejected", 486, "local", "busy now"))
        self.assertEqual(h.ua.calls, [])

    def test_pending_past_accept_timeout_gets_480(self):
        h = Harness(self, accept_timeout=20.0)
        call = h.inbound()
        call.ringing()
        h.clock.advance(19.9)
        self.assertEqual(h.net.last().status, 180)
        h.clock.advance(0.2)
        self.assertEqual(h.net.last().status, 480)
        self.assertEqual(call.end.reason, "timeout")

    def test_answer_cancels_accept_timer(self):
        h = Harness(self, accept_timeout=5.0)
        call, _ = h.established_inbound()
        h.clock.advance(10)
        self.assertIsNone(call.end)
        self.assertEqual(h.net.responses(480), [])

    def test_cancel_gives_487_and_event(self):
        h = Harness(self)
        call = h.inbound()
        call.ringing()
        invite = call.invite
        cancel = peer_request("CANCEL", branch=invite.top_via.branch, body=b"")
        h.deliver(cancel)
        self.assertEqual([(m.status, m.cseq.method) for m in h.net.responses()[-2:]],
                         [(200, "CANCEL"), (487, "INVITE")])
        self.assertEqual(h.net.last().to.tag, call.dialog.local_tag)
        self.assertEqual(call.end.reason, "cancelled")
        self.assertEqual(call.end.status, 487)

    def test_no_ack_ends_with_bye(self):
        h = Harness(self)
        call = h.inbound()
        answered = call.answer(minimal_offer(US, 30000))
        h.clock.advance(32.1)
        failure = self.failureResultOf(answered, CallFailed)
        self.assertEqual(failure.value.status, 408)
        bye = h.net.requests("BYE")[-1]
        self.assertEqual(str(bye.uri), f"sip:alice@{PEER[0]}:{PEER[1]}")
        self.assertEqual(call.end.reason, "no-ack")

    def test_invite_retransmitted_after_2xx_gets_the_same_2xx(self):
        h = Harness(self)
        call, ok = h.established_inbound()
        h.clock.advance(40)  # the INVITE transaction (Timer L) is gone
        h.deliver(peer_request("INVITE", body=sdp()))
        self.assertEqual(len(h.calls), 1)  # not a new call
        again = h.net.last()
        self.assertEqual((again.status, again.to.tag), (200, ok.to.tag))

    def test_an_ended_call_is_not_kept_for_retransmissions(self):
        import gc
        import weakref

        h = Harness(self)
        call, ok = h.established_inbound()
        h.deliver(peer_request("BYE", to_tag=ok.to.tag, cseq=2, body=b""))
        ref = weakref.ref(call)
        h.calls.clear()
        del call
        gc.collect()
        self.assertIsNone(ref())  # only its CSeq and final response are remembered
        h.deliver(peer_request("INVITE", body=sdp()))  # a late retransmission of its INVITE
        self.assertEqual(h.calls, [])
        self.assertEqual((h.net.last().status, h.net.last().to.tag), (200, ok.to.tag))
        h.clock.advance(32.1)
        self.assertEqual(h.ua._inbound_origins, {})
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_remote_bye(self):
        h = Harness(self)
        call, ok = h.established_inbound()
        h.deliver(peer_request("BYE", to_tag=ok.to.tag, cseq=2, body=b""))
        self.assertEqual((h.net.last().status, h.net.last().cseq.method), (200, "BYE"))
        self.assertEqual(call.end, Ended("remote", None, "remote"))
        h.deliver(peer_request("BYE", to_tag=ok.to.tag, cseq=3, body=b""))
        self.assertEqual(h.net.last().status, 481)

    def test_local_hangup_sends_bye_with_headers(self):
        h = Harness(self)
        call, ok = h.established_inbound()
        ended = call.hangup(headers=[("X-Reason", "done")])
        bye = h.net.requests("BYE")[-1]
        self.assertEqual(bye.headers.get("X-Reason"), "done")
        self.assertEqual(bye.from_.tag, ok.to.tag)
        self.assertEqual(bye.to.tag, "peer")
        self.assertEqual(bye.cseq.seq, 1)
        self.assertNoResult(ended)
        h.deliver(make_response(bye, 200))
        self.assertEqual(self.successResultOf(ended).reason, "local")

    def test_hold_and_resume_are_mirrored_and_reported(self):
        h = Harness(self)
        call, ok = h.established_inbound()
        cseq = 1
        for offered, answered, held in [("sendonly", "recvonly", True), ("sendrecv", "sendrecv", False),
                                        ("inactive", "inactive", True), ("sendrecv", "sendrecv", False),
                                        ("sendonly", "recvonly", True), ("sendrecv", "sendrecv", False)]:
            cseq += 1
            h.deliver(peer_request("INVITE", to_tag=ok.to.tag, cseq=cseq, body=sdp(offered, version=cseq)))
            response = h.net.last()
            self.assertEqual((response.status, sdp_direction(response.body)[0]), (200, answered))
            h.deliver(h.ack_for(response))
            self.assertEqual(call.on_hold, held)
        holds = [e.on_hold for e in call.events if isinstance(e, HoldChanged)]
        self.assertEqual(holds, [True, False, True, False, True, False])
        h.clock.advance(40)
        self.assertEqual(len(h.net.responses(200, "INVITE")), 7)  # every 2xx was ACKed: no resends

    def test_hold_by_null_connection_and_update(self):
        h = Harness(self)
        call, ok = h.established_inbound()
        h.deliver(peer_request("UPDATE", to_tag=ok.to.tag, cseq=2, body=sdp(host="0.0.0.0")))
        self.assertEqual(h.net.last().status, 200)
        self.assertTrue(call.on_hold)
        h.deliver(peer_request("UPDATE", to_tag=ok.to.tag, cseq=3, body=sdp()))
        self.assertFalse(call.on_hold)

    def test_unusable_offer_is_488_and_the_call_goes_on(self):
        h = Harness(self)
        call, ok = h.established_inbound()
        h.deliver(peer_request("INVITE", to_tag=ok.to.tag, cseq=2, body=b"v=0\r\nthis is no sdp\r\n"))
        self.assertEqual(h.net.last().status, 488)
        h.deliver(peer_request("INVITE", to_tag=ok.to.tag, cseq=3, body=sdp("sendonly")))
        self.assertEqual(sdp_direction(h.net.last().body), ("recvonly", False))
        self.assertIsNone(call.end)

    def test_reinvite_with_lower_cseq_is_500(self):
        h = Harness(self)
        call, ok = h.established_inbound()
        h.deliver(peer_request("INFO", to_tag=ok.to.tag, cseq=5, body=b"Signal=1\r\n",
                               content_type="application/dtmf-relay"))
        h.deliver(peer_request("INFO", to_tag=ok.to.tag, cseq=4, body=b"Signal=2\r\n",
                               content_type="application/dtmf-relay"))
        self.assertEqual(h.net.last().status, 500)

    def test_info_signal_is_dtmf(self):
        h = Harness(self)
        call, ok = h.established_inbound()
        h.deliver(peer_request("INFO", to_tag=ok.to.tag, cseq=2, body=b"Signal=5\r\nDuration=160\r\n",
                               content_type="application/dtmf-relay"))
        self.assertEqual(h.net.last().status, 200)
        self.assertEqual([e for e in call.events if isinstance(e, Dtmf)], [Dtmf("5", 160)])

    def test_in_dialog_options(self):
        h = Harness(self)
        call, ok = h.established_inbound()
        h.deliver(peer_request("OPTIONS", to_tag=ok.to.tag, cseq=2, body=b""))
        self.assertEqual(h.net.last().status, 200)

    def test_incoming_refer_accepted_by_listener(self):
        h = Harness(self)
        call, ok = h.established_inbound()
        call.add_listener(lambda e: e.refer.accept() if isinstance(e, TransferRequested) else None)
        h.deliver(peer_request("REFER", to_tag=ok.to.tag, cseq=2, body=b"",
                               extra=[f"Refer-To: <sip:carol@{PEER[0]}>"]))
        self.assertEqual(h.net.responses(202)[-1].cseq.method, "REFER")
        notify = h.net.requests("NOTIFY")[-1]
        self.assertEqual(notify.body, b"SIP/2.0 100 Trying\r\n")
        self.assertEqual(notify.headers.get("Event"), "refer")
        refer = [e for e in call.events if isinstance(e, TransferRequested)][0].refer
        self.assertEqual(refer.refer_to.user, "carol")
        h.deliver(make_response(notify, 200))
        refer.progress(200)
        final = h.net.requests("NOTIFY")[-1]
        self.assertTrue(final.headers.get("Subscription-State").startswith("terminated"))

    def test_incoming_refer_without_taker_is_declined(self):
        h = Harness(self)
        call, ok = h.established_inbound()
        h.deliver(peer_request("REFER", to_tag=ok.to.tag, cseq=2, body=b"",
                               extra=[f"Refer-To: <sip:carol@{PEER[0]}>"]))
        self.assertEqual(h.net.last().status, 603)

    def test_incoming_refer_waiting_for_a_decision(self):
        """A listener that asks someone (``wait``) holds the REFER; nobody deciding in time -> 603.
        The Refer-To's Replaces header is unescaped and kept apart from the target."""
        h = Harness(self)
        call, ok = h.established_inbound()
        call.add_listener(lambda e: e.refer.wait(5) if isinstance(e, TransferRequested) else None)
        h.deliver(peer_request("REFER", to_tag=ok.to.tag, cseq=2, body=b"",
                               extra=[f"Refer-To: <sip:carol@{PEER[0]}?Replaces=a%40b%3Bto-tag%3D1>",
                                      "Referred-By: <sip:alice@pbx>"]))
        refer = [e for e in call.events if isinstance(e, TransferRequested)][0].refer
        self.assertEqual(refer.target, f"sip:carol@{PEER[0]}")
        self.assertEqual(refer.replaces, "a@b;to-tag=1")
        self.assertEqual(refer.referred_by, "<sip:alice@pbx>")
        self.assertEqual(h.net.responses(603), [])
        h.clock.advance(4.9)
        self.assertEqual(h.net.responses(603), [])
        h.clock.advance(0.2)
        self.assertEqual(h.net.responses(603)[-1].cseq.method, "REFER")
        self.assertTrue(refer.finished)

    def test_handler_failure_rejects_503(self):
        h = Harness(self)
        h.ua.invite_handler = lambda call: defer.fail(RuntimeError("webhook down"))
        h.deliver(peer_request("INVITE", body=sdp()))
        self.assertEqual(h.net.last().status, 503)
        self.assertIn("webhook down", h.net.last().headers.get("Reason"))
        self.flushLoggedErrors(RuntimeError)

    def test_shutdown_hangs_up_calls(self):
        h = Harness(self)
        h.ua.startService()
        call, ok = h.established_inbound()
        pending = h.inbound(call_id="call-2")
        stopped = h.ua.stopService()
        self.assertEqual(h.net.requests("BYE")[-1].call_id, "call-1")
        self.assertEqual(pending.end.status, 503)
        h.deliver(make_response(h.net.requests("BYE")[-1], 200))
        self.successResultOf(stopped)
        self.assertEqual(call.end.reason, "local")


class OutboundTests(unittest.TestCase):
    def place(self, h, target="sip:bob@192.0.2.10:5070", **kw):
        call = h.ua.place_call(target, minimal_offer(US, 30000), **kw)
        return call, h.net.requests("INVITE")[-1]

    def test_call_with_early_media_answer_and_bye(self):
        h = Harness(self)
        call, invite = self.place(h, headers={"X-Tenant": "t1"}, caller="sip:bot@example.com")
        self.assertEqual(invite.headers.get("X-Tenant"), "t1")
        self.assertEqual(str(invite.from_.uri), "sip:bot@example.com")
        self.assertEqual(str(invite.contacts[0].uri), f"sip:bot@{US}:5060")
        self.assertEqual(invite.content_type, "application/sdp")
        answered = call.when_answered()
        h.answer_to(invite, 100)
        h.answer_to(invite, 180)
        h.answer_to(invite, 183, body=sdp())
        provisional = [e for e in call.events if isinstance(e, Provisional)]
        self.assertEqual([(p.status, p.sdp is not None) for p in provisional], [(180, False), (183, True)])
        ok = h.answer_to(invite, 200, body=sdp(version=2))
        self.assertEqual(self.successResultOf(answered).status, 200)
        ack = h.net.requests("ACK")[-1]
        self.assertEqual((ack.cseq.seq, ack.to.tag, str(ack.uri)), (1, "callee", f"sip:bob@{PEER[0]}:{PEER[1]}"))
        self.assertEqual(call.dialog_id, f"{invite.call_id}-{invite.from_.tag}-callee")
        h.deliver(ok)  # a retransmitted 2xx is ACKed again
        self.assertEqual(len(h.net.requests("ACK")), 2)
        ended = call.hangup(headers=[("X-Hangup", "bye")])
        bye = h.net.requests("BYE")[-1]
        self.assertEqual((bye.headers.get("X-Hangup"), bye.cseq.seq), ("bye", 2))
        h.deliver(make_response(bye, 200))
        self.assertEqual(self.successResultOf(ended).reason, "local")

    def test_a_second_fork_answering_is_acked_and_ended(self):
        """RFC 3261 §13.2.2.4: every 2xx is ACKed; the call keeps the first, the other dialog gets a BYE."""
        h = Harness(self)
        call, invite = self.place(h)
        h.answer_to(invite, 180, to_tag="fork-a")
        h.answer_to(invite, 180, to_tag="fork-b")
        h.answer_to(invite, 200, to_tag="fork-a", body=sdp())
        self.assertEqual(call.state, "confirmed")
        second = h.answer_to(invite, 200, to_tag="fork-b", body=sdp(port=4100))
        acks = h.net.requests("ACK")
        self.assertEqual([a.to.tag for a in acks], ["fork-a", "fork-b"])
        self.assertEqual(acks[1].cseq.seq, invite.cseq.seq)
        byes = h.net.requests("BYE")
        self.assertEqual(len(byes), 1)
        self.assertEqual((byes[0].to.tag, byes[0].call_id, byes[0].cseq.seq), ("fork-b", invite.call_id, 2))
        # the call goes on in the first dialog, with the first answer
        self.assertEqual(call.dialog.remote_tag, "fork-a")
        self.assertEqual(call.state, "confirmed")
        self.assertIn(b"4000", call.remote_sdp)
        # the other fork resends its 2xx (our ACK was lost): the same ACK again, no second BYE
        h.deliver(second)
        self.assertEqual([a.to.tag for a in h.net.requests("ACK")], ["fork-a", "fork-b", "fork-b"])
        self.assertEqual(len(h.net.requests("BYE")), 1)
        h.deliver(make_response(byes[0], 200))
        self.assertIsNone(call.end)
        # the first dialog's own 2xx retransmission is still ACKed in it
        h.deliver(make_response(invite, 200, to_tag="fork-a", body=sdp()))
        self.assertEqual(h.net.requests("ACK")[-1].to.tag, "fork-a")

    def test_a_fork_answering_after_the_call_ended_is_acked_and_ended(self):
        """A 2xx to our INVITE that comes after the call is over still gets its ACK (RFC 3261
        §13.2.2.4): another fork's is ACKed and ended with a BYE, our own dialog's gets the ACK
        we sent again; after 64*T1 the INVITE is forgotten."""
        h = Harness(self)
        call, invite = self.place(h)
        h.answer_to(invite, 200, to_tag="fork-a", body=sdp())
        call.hangup()
        h.deliver(make_response(h.net.requests("BYE")[-1], 200))
        self.assertIsNotNone(call.end)
        late = h.answer_to(invite, 200, to_tag="fork-b", body=sdp())
        self.assertEqual([a.to.tag for a in h.net.requests("ACK")], ["fork-a", "fork-b"])
        byes = h.net.requests("BYE")
        self.assertEqual([(b.to.tag, b.cseq.seq) for b in byes], [("fork-a", 2), ("fork-b", 2)])
        h.deliver(late)  # its UAS resends the 2xx: the same ACK, no second BYE
        self.assertEqual([a.to.tag for a in h.net.requests("ACK")], ["fork-a", "fork-b", "fork-b"])
        self.assertEqual(len(h.net.requests("BYE")), 2)
        h.deliver(make_response(byes[1], 200))
        h.deliver(make_response(invite, 200, to_tag="fork-a", body=sdp()))  # our ACK was lost
        self.assertEqual(h.net.requests("ACK")[-1].to.tag, "fork-a")
        self.assertEqual(len(h.net.requests("ACK")), 4)
        h.clock.advance(64 * 0.5 + 1)
        h.deliver(make_response(invite, 200, to_tag="fork-c", body=sdp()))
        self.assertEqual(len(h.net.requests("ACK")), 4)
        self.assertEqual(h.ua._ended_invites, {})

    def test_proxy_challenge_answered_with_digest(self):
        h = Harness(self)
        call, invite = self.place(h, credentials=Credential("alice", "secret"))
        challenge = auth.make_challenge("pbx", nonce="n1")
        h.answer_to(invite, 407, headers=[("Proxy-Authenticate", str(challenge))])
        self.assertEqual(h.net.requests("ACK")[-1].cseq.seq, 1)  # the 407 is ACKed in its transaction
        retry = h.net.requests("INVITE")[-1]
        self.assertEqual(retry.cseq.seq, 2)
        self.assertEqual(retry.call_id, invite.call_id)
        credentials = auth.parse_authorization(retry.headers.get("Proxy-Authorization"))
        self.assertTrue(auth.verify_authorization(credentials, "secret", "INVITE"))
        h.answer_to(retry, 200, body=sdp())
        self.assertEqual(call.state, "confirmed")

    def test_second_challenge_fails_the_call(self):
        h = Harness(self)
        call, invite = self.place(h, credentials=Credential("alice", "wrong"))
        challenge = auth.make_challenge("pbx", nonce="n1")
        answered = call.when_answered()
        h.answer_to(invite, 401, headers=[("WWW-Authenticate", str(challenge))])
        h.answer_to(h.net.requests("INVITE")[-1], 401, headers=[("WWW-Authenticate", str(challenge))])
        self.assertEqual(self.failureResultOf(answered, CallFailed).value.status, 401)
        self.assertEqual(call.end.reason, "rejected")

    def test_credentials_from_register_users(self):
        account = RegisterUser(server="sip:192.0.2.10:5099", username="1001",
                               credential=Credential("1001", "pw"))
        h = Harness(self, register_users=(account,))
        call, invite = self.place(h)
        self.assertEqual(call.digest.username, "1001")
        self.assertEqual(invite.from_.uri.user, "1001")

    def test_hangup_while_ringing_cancels(self):
        h = Harness(self)
        call, invite = self.place(h)
        answered = call.when_answered()
        h.answer_to(invite, 180)
        ended = call.hangup()
        cancel = h.net.requests("CANCEL")[-1]
        self.assertEqual((cancel.cseq.seq, cancel.top_via.branch), (1, invite.top_via.branch))
        h.deliver(make_response(cancel, 200))
        h.answer_to(invite, 487)
        self.assertEqual(self.successResultOf(ended), Ended("cancelled", 487, "local", "Request Terminated"))
        self.assertEqual(self.failureResultOf(answered, CallFailed).value.status, 487)

    def test_no_response_is_408(self):
        h = Harness(self)
        call, invite = self.place(h)
        answered = call.when_answered()
        h.clock.advance(32.1)
        self.assertEqual(self.failureResultOf(answered, CallFailed).value.status, 408)
        self.assertEqual(call.end.reason, "failed")

    def test_rewrites_apply_to_target(self):
        h = Harness(self, rewrites=(Rewrite(r"sip:(\d+)@.*", "sip:$1@192.0.2.30"),))
        call, invite = self.place(h, target="sip:5551234@pbx.example.com")
        self.assertEqual(str(invite.uri), "sip:5551234@192.0.2.30")

    def test_blind_transfer_follows_notify(self):
        h = Harness(self)
        call, invite = self.place(h)
        h.answer_to(invite, 200, body=sdp())
        result = call.transfer("sip:carol@192.0.2.40")
        refer = h.net.requests("REFER")[-1]
        self.assertEqual(refer.headers.get("Refer-To"), "<sip:carol@192.0.2.40>")
        h.deliver(make_response(refer, 202))
        for cseq, (frag, state) in enumerate([(b"SIP/2.0 100 Trying", "active"),
                                              (b"SIP/2.0 180 Ringing", "active"),
                                              (b"SIP/2.0 200 OK", "terminated;reason=noresource")], 1):
            notify = peer_request("NOTIFY", call_id=invite.call_id, from_tag="callee", to_tag=invite.from_.tag,
                                  cseq=cseq, body=frag, content_type="message/sipfrag",
                                  extra=["Event: refer", f"Subscription-State: {state}"])
            h.deliver(notify)
            self.assertEqual(h.net.last().status, 200)
        self.assertEqual(self.successResultOf(result), 200)
        progress = [e.status for e in call.events if isinstance(e, TransferProgress)]
        self.assertEqual(progress, [100, 180, 200])

    def test_refused_transfer_fails(self):
        h = Harness(self)
        call, invite = self.place(h)
        h.answer_to(invite, 200, body=sdp())
        result = call.transfer("sip:carol@192.0.2.40")
        h.deliver(make_response(h.net.requests("REFER")[-1], 603))
        self.assertEqual(self.failureResultOf(result, CallFailed).value.status, 603)


class HelperTests(unittest.TestCase):
    def test_sdp_direction(self):
        self.assertEqual(sdp_direction(sdp("sendonly")), ("sendonly", True))
        self.assertEqual(sdp_direction(sdp("inactive")), ("inactive", True))
        self.assertEqual(sdp_direction(sdp("recvonly")), ("recvonly", False))
        self.assertEqual(sdp_direction(sdp("sendrecv", host="0.0.0.0")), ("sendrecv", True))
        no_attr = sdp().replace(b"a=sendrecv\r\n", b"")
        self.assertEqual(sdp_direction(no_attr), ("sendrecv", False))
        session_level = no_attr.replace(b"t=0 0\r\n", b"t=0 0\r\na=sendonly\r\n")
        self.assertEqual(sdp_direction(session_level), ("sendonly", True))

    def test_with_direction_bumps_version(self):
        out = with_direction(sdp("sendrecv", version=4), "recvonly")
        self.assertIn(b"o=peer 1 5 IN IP4", out)
        self.assertEqual(sdp_direction(out), ("recvonly", False))
        self.assertEqual(out.count(b"a=recvonly"), 1)
        self.assertNotIn(b"a=sendrecv", out)

    def test_mirror(self):
        self.assertEqual([mirror_direction(d) for d in ("sendonly", "recvonly", "inactive", "sendrecv")],
                         ["recvonly", "sendonly", "inactive", "sendrecv"])

    def test_rewrites(self):
        rules = (Rewrite(r"sip:(\d+)@.*", "sip:$1@internal.net"),)
        self.assertEqual(apply_rewrites("sip:1234@carrier.com", rules), "sip:1234@internal.net")
        self.assertEqual(apply_rewrites("sip:bob@carrier.com", rules), "sip:bob@carrier.com")
        backslash = (Rewrite(r"sip:(\w+)@10\.0\.0\.1", r"sip:\1@10.0.0.2"),)
        self.assertEqual(apply_rewrites("sip:bob@10.0.0.1:5060", backslash), "sip:bob@10.0.0.2:5060")
        chained = (Rewrite("carrier", "middle"), Rewrite("middle", "end"))
        self.assertEqual(apply_rewrites("sip:1@carrier", chained), "sip:1@end")

    def test_credentials_match_host_ignoring_port_and_scheme(self):
        from activecall.sip.message import parse_uri

        users = (RegisterUser(server="10.8.0.1:5060", username="1001", credential=Credential("1001", "a")),
                 RegisterUser(server="sip:example.com", username="u", credential=Credential("u", "b")),
                 RegisterUser(server="off.example", disabled=True, credential=Credential("x", "c")))
        self.assertEqual(credentials_for(parse_uri("sip:1001@10.8.0.1:5060"), users).password, "a")
        self.assertEqual(credentials_for(parse_uri("sip:user@example.com"), users).password, "b")
        self.assertIsNone(credentials_for(parse_uri("sip:x@off.example"), users))
        self.assertIsNone(credentials_for(parse_uri("sip:x@other.example"), users))

    def test_dtmf_info_and_reason(self):
        self.assertEqual(parse_dtmf_info(b"Signal=#\r\nDuration=100", "application/dtmf-relay"), Dtmf("#", 100))
        self.assertEqual(parse_dtmf_info(b"Signal=11", "application/dtmf-relay"), Dtmf("#"))
        self.assertIsNone(parse_dtmf_info(b"hello", "text/plain"))
        self.assertEqual(reason_header(503, 'say "no"'), 'SIP;cause=503;text="say \\"no\\""')
        self.assertEqual(reason_header(603, "Q.850;cause=16"), "Q.850;cause=16")


class RequireTests(unittest.TestCase):
    def test_an_unsupported_requirement_gets_420_naming_it(self):
        h = Harness(self)
        h.deliver(peer_request("INVITE", call_id="call-0", body=sdp(),
                               extra=["Require: foo, timer", "Require: replaces"]))
        response = h.net.responses(420)[-1]
        self.assertEqual(response.headers.get_all("Unsupported"), ["foo", "replaces"])
        self.assertEqual(h.calls, [])
        # in a dialog too
        call, ok = h.established_inbound()
        h.deliver(peer_request("UPDATE", to_tag=ok.to.tag, cseq=2, extra=["Require: foo"]))
        self.assertEqual(h.net.responses(420)[-1].headers.get("Unsupported"), "foo")
        self.assertIsNone(call.end)

    def test_require_timer_is_met(self):
        h = Harness(self)
        call = h.inbound(extra=["Require: timer", "Session-Expires: 1800"])
        call.answer(minimal_offer(US, 30000, session_id=7))
        self.assertEqual(h.net.responses(200, "INVITE")[-1].headers.get("Session-Expires"), "1800;refresher=uac")


class SessionTimerTests(unittest.TestCase):
    """RFC 4028 on task.Clock: negotiation, refreshes both ways, expiry, 422."""

    def inbound(self, h, session_expires, supported="timer", extra=()):
        headers = [f"Session-Expires: {session_expires}"] if session_expires else []
        headers += [f"Supported: {supported}"] if supported else []
        return h.inbound(extra=headers + list(extra))

    def answer(self, h, call):
        call.answer(minimal_offer(US, 30000, session_id=7))
        ok = h.net.responses(200, "INVITE")[-1]
        h.deliver(h.ack_for(ok))
        return ok

    def test_caller_refreshes_and_a_missing_refresh_ends_the_call(self):
        h = Harness(self)
        call = self.inbound(h, "1800;refresher=uac")
        ok = self.answer(h, call)
        self.assertEqual(ok.headers.get("Session-Expires"), "1800;refresher=uac")
        self.assertEqual(ok.headers.get("Require"), "timer")
        self.assertIn("timer", ok.headers.get("Supported"))
        # a refresh (re-INVITE with the same SDP) just before the deadline re-arms the timer
        h.clock.advance(1700)
        h.deliver(peer_request("INVITE", to_tag=ok.to.tag, cseq=2, body=sdp(),
                               extra=["Session-Expires: 1800;refresher=uac", "Supported: timer"]))
        refresh_ok = h.net.responses(200, "INVITE")[-1]
        self.assertEqual(refresh_ok.cseq.seq, 2)
        self.assertEqual(refresh_ok.headers.get("Session-Expires"), "1800;refresher=uac")
        h.deliver(h.ack_for(refresh_ok))
        h.clock.advance(1700)
        self.assertIsNone(call.end)
        self.assertEqual(h.net.requests("BYE"), [])
        # then none: BYE at 1800 - min(32, 1800/3) = 1768 s after the last refresh
        h.clock.advance(67)
        self.assertIsNone(call.end)
        h.clock.advance(2)
        bye = h.net.requests("BYE")[-1]
        self.assertEqual(bye.to.tag, "peer")
        self.assertEqual((call.end.reason, call.end.status), ("session-expired", 408))

    def test_refresh_by_update_without_sdp(self):
        h = Harness(self)
        call = self.inbound(h, "90;refresher=uac")
        ok = self.answer(h, call)
        h.clock.advance(50)
        h.deliver(peer_request("UPDATE", to_tag=ok.to.tag, cseq=2, extra=["Session-Expires: 90;refresher=uac"]))
        update_ok = h.net.responses(200, "UPDATE")[-1]
        self.assertEqual(update_ok.body, b"")
        self.assertEqual(update_ok.headers.get("Session-Expires"), "90;refresher=uac")
        h.clock.advance(59)  # 50 + 59 > 60 (90 - 30): still up, the UPDATE refreshed it
        self.assertIsNone(call.end)
        h.clock.advance(2)
        self.assertEqual(call.end.reason, "session-expired")

    def test_we_refresh_when_the_caller_does_not_support_timers(self):
        h = Harness(self)
        call = self.inbound(h, "600", supported=None)
        ok = self.answer(h, call)
        self.assertEqual(ok.headers.get("Session-Expires"), "600;refresher=uas")
        self.assertIsNone(ok.headers.get("Require"))
        h.clock.advance(299)
        self.assertEqual(h.net.requests("INVITE"), [])
        h.clock.advance(1)
        refresh = h.net.requests("INVITE")[-1]
        self.assertEqual(refresh.headers.get("Session-Expires"), "600;refresher=uac")
        self.assertEqual(refresh.body, call.local_sdp)
        h.deliver(make_response(refresh, 200, headers=[("Contact", f"<sip:alice@{PEER[0]}:{PEER[1]}>"),
                                                       ("Session-Expires", "600;refresher=uac")], body=sdp()))
        self.assertEqual(h.net.requests("ACK")[-1].cseq.seq, refresh.cseq.seq)
        h.clock.advance(300)
        self.assertEqual(len(h.net.requests("INVITE")), 2)  # the next refresh, half an interval later
        self.assertIsNone(call.end)

    def our_first_refresh(self, h, interval):
        """A call where we refresh, advanced to our first refresh re-INVITE: (call, that INVITE)."""
        call = self.inbound(h, f"{interval};refresher=uas")
        self.answer(h, call)
        h.clock.advance(interval / 2)
        return call, h.net.requests("INVITE")[-1]

    def test_a_refresh_answered_481_ends_the_call(self):
        h = Harness(self)
        call, refresh = self.our_first_refresh(h, 120)
        h.deliver(make_response(refresh, 481))
        self.assertEqual(h.net.requests("BYE")[-1].call_id, call.call_id)
        self.assertEqual((call.end.reason, call.end.status), ("session-expired", 481))

    def test_a_refresh_refused_491_is_tried_again_before_the_deadline(self):
        h = Harness(self)
        call, first = self.our_first_refresh(h, 800)
        h.deliver(make_response(first, 491))
        h.clock.advance(99)
        self.assertEqual(h.net.requests("INVITE")[-1].cseq.seq, first.cseq.seq)
        h.clock.advance(1)  # 800 / 8 = 100 s later
        second = h.net.requests("INVITE")[-1]
        self.assertEqual(second.cseq.seq, first.cseq.seq + 1)
        self.assertIsNone(call.end)

    def test_too_small_interval_gets_422_with_min_se(self):
        h = Harness(self)
        h.deliver(peer_request("INVITE", body=sdp(), extra=["Session-Expires: 30", "Supported: timer"]))
        response = h.net.responses(422)[-1]
        self.assertEqual(response.headers.get("Min-SE"), "90")
        self.assertEqual(h.calls, [])
        # the caller's own Min-SE raises the floor
        h.deliver(peer_request("INVITE", call_id="call-2", body=sdp(),
                               extra=["Session-Expires: 100", "Min-SE: 120"]))
        self.assertEqual(h.net.responses(422)[-1].headers.get("Min-SE"), "120")

    def test_no_session_expires_no_timer(self):
        h = Harness(self)
        call = h.inbound()
        ok = self.answer(h, call)
        self.assertIsNone(ok.headers.get("Session-Expires"))
        self.assertIsNone(call.session_timer)
        h.clock.advance(7200)
        self.assertIsNone(call.end)

    def test_outbound_call_offers_a_timer_and_follows_the_answer(self):
        h = Harness(self)
        call = h.ua.place_call("sip:bob@192.0.2.10:5070", minimal_offer(US, 30000))
        invite = h.net.requests("INVITE")[-1]
        self.assertEqual((invite.headers.get("Session-Expires"), invite.headers.get("Min-SE")), ("1800", "90"))
        self.assertIn("timer", invite.headers.get("Supported"))
        # the UAS wants a longer minimum: ask again with it (RFC 4028 7.4)
        h.answer_to(invite, 422, headers=[("Min-SE", "3600")])
        retry = h.net.requests("INVITE")[-1]
        self.assertEqual((retry.cseq.seq, retry.headers.get("Session-Expires")), (2, "3600"))
        h.answer_to(retry, 200, headers=[("Session-Expires", "3600;refresher=uac"), ("Require", "timer")],
                    body=sdp())
        self.assertEqual(call.state, "confirmed")
        h.clock.advance(1800)
        refresh = h.net.requests("INVITE")[-1]
        self.assertEqual((refresh.cseq.seq, refresh.to.tag), (3, "callee"))
        self.assertEqual(refresh.headers.get("Session-Expires"), "3600;refresher=uac")

    def test_outbound_call_where_the_callee_refreshes(self):
        h = Harness(self)
        call = h.ua.place_call("sip:bob@192.0.2.10:5070", minimal_offer(US, 30000))
        invite = h.net.requests("INVITE")[-1]
        h.answer_to(invite, 200, headers=[("Session-Expires", "90;refresher=uas")], body=sdp())
        h.clock.advance(59)
        self.assertIsNone(call.end)
        h.clock.advance(2)
        self.assertEqual(h.net.requests("BYE")[-1].to.tag, "callee")
        self.assertEqual(call.end.reason, "session-expired")


class ReliableProvisionalTests(unittest.TestCase):
    """RFC 3262 (100rel) on task.Clock: as UAS when the caller requires it, as UAC when a callee uses it."""

    def test_reliable_183_retransmitted_until_prack_and_the_200_waits_for_it(self):
        h = Harness(self)
        call = h.inbound(extra=["Require: 100rel"])
        self.assertTrue(call.reliable_provisionals)
        call.ringing(early_media_sdp=minimal_offer(US, 30000, session_id=7))
        first = h.net.responses(183)[-1]
        self.assertIn("100rel", first.headers.get_all("Require"))
        rseq = int(first.headers.get("RSeq"))
        answered = call.answer(minimal_offer(US, 30000, session_id=7))
        self.assertEqual(h.net.responses(200, "INVITE"), [])  # not before the PRACK
        h.clock.advance(0.5)
        self.assertEqual(len(h.net.responses(183)), 2)  # T1
        h.clock.advance(1.0)
        self.assertEqual(len(h.net.responses(183)), 3)  # 2*T1
        # a PRACK for another RSeq matches nothing
        h.deliver(peer_request("PRACK", to_tag=first.to.tag, cseq=2, extra=[f"RAck: {rseq + 5} 1 INVITE"]))
        self.assertEqual(h.net.responses(481, "PRACK")[-1].reason, "No Matching Provisional Response")
        h.deliver(peer_request("PRACK", to_tag=first.to.tag, cseq=3, branch="z9hG4bK-prack-ok",
                               extra=[f"RAck: {rseq} 1 INVITE"]))
        self.assertEqual(h.net.responses(200, "PRACK")[-1].cseq.seq, 3)
        ok = h.net.responses(200, "INVITE")[-1]  # the queued answer went out
        h.clock.advance(10)
        self.assertEqual(len(h.net.responses(183)), 3)  # retransmissions stopped
        h.deliver(h.ack_for(ok))
        self.assertEqual(self.successResultOf(answered).method, "ACK")
        self.assertEqual(call.state, "confirmed")

    def test_a_second_reliable_provisional_waits_for_the_first_prack(self):
        h = Harness(self)
        call = h.inbound(extra=["Require: 100rel"])
        call.ringing()
        call.ringing(early_media_sdp=minimal_offer(US, 30000, session_id=7))
        self.assertEqual([r.status for r in h.net.responses() if r.status > 100], [180])
        ringing = h.net.responses(180)[-1]
        h.deliver(peer_request("PRACK", to_tag=ringing.to.tag, cseq=2,
                               extra=[f"RAck: {ringing.headers.get('RSeq')} 1 INVITE"]))
        progress = h.net.responses(183)[-1]
        self.assertEqual(int(progress.headers.get("RSeq")), int(ringing.headers.get("RSeq")) + 1)

    def test_cancel_while_the_answer_waits_for_the_prack(self):
        h = Harness(self)
        call = h.inbound(extra=["Require: 100rel"])
        call.ringing()
        answered = call.answer(minimal_offer(US, 30000, session_id=7))
        invite = h.net.responses(180)[-1]
        h.deliver(peer_request("CANCEL", branch="z9hG4bK-INVITE-1-call-1"))
        self.assertEqual(h.net.responses(487)[-1].cseq.method, "INVITE")
        self.assertEqual(self.failureResultOf(answered, CallFailed).value.status, 487)
        h.deliver(peer_request("PRACK", to_tag=invite.to.tag, cseq=2,
                               extra=[f"RAck: {invite.headers.get('RSeq')} 1 INVITE"]))
        self.assertEqual(h.net.responses(200, "INVITE"), [])  # nothing answered after all
        self.assertEqual(call.end.reason, "cancelled")

    def test_no_prack_rejects_the_invite_with_504(self):
        h = Harness(self)
        call = h.inbound(extra=["Require: 100rel"])
        call.ringing()
        h.clock.advance(31.9)
        self.assertEqual(h.net.responses(504), [])
        h.clock.advance(0.11)  # 64*T1 after the first
        self.assertEqual(h.net.responses(504)[-1].cseq.method, "INVITE")
        self.assertEqual(call.end.reason, "rejected")
        count = len(h.net.responses(180))
        h.clock.advance(60)
        self.assertEqual(len(h.net.responses(180)), count)

    def test_plain_provisionals_when_100rel_is_only_supported(self):
        h = Harness(self)
        call = h.inbound(extra=["Supported: 100rel"])
        call.ringing()
        self.assertIsNone(h.net.responses(180)[-1].headers.get("RSeq"))
        h.clock.advance(5)
        self.assertEqual(len(h.net.responses(180)), 1)

    def test_outbound_call_pracks_a_reliable_provisional_once(self):
        h = Harness(self)
        call = h.ua.place_call("sip:bob@192.0.2.10:5070", minimal_offer(US, 30000))
        invite = h.net.requests("INVITE")[-1]
        self.assertIn("100rel", invite.headers.get_all("Supported"))
        progress = h.answer_to(invite, 183, headers=[("Require", "100rel"), ("RSeq", "7")], body=sdp())
        prack = h.net.requests("PRACK")[-1]
        self.assertEqual((prack.headers.get("RAck"), prack.to.tag, prack.cseq.seq), ("7 1 INVITE", "callee", 2))
        h.deliver(progress)  # a retransmission: no second PRACK, no second event
        self.assertEqual(len(h.net.requests("PRACK")), 1)
        self.assertEqual(len([e for e in call.events if isinstance(e, Provisional)]), 1)
        h.deliver(make_response(prack, 200))
        h.answer_to(invite, 200, body=sdp())
        self.assertEqual(call.state, "confirmed")
        self.assertEqual(h.net.requests("ACK")[-1].cseq.seq, 1)
