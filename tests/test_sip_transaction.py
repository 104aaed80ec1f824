"""SIP transactions (activecall.sip.transaction, client_transaction, server_transaction, transaction_base):
every timer path on task.Clock."""

from twisted.internet import defer, task
from twisted.trial import unittest

from activecall.sip.message import Target, Via, make_response, parse_message
from activecall.sip.server_transaction import TwoXXRetransmitter
from activecall.sip.transaction import ExpiryQueue, TransactionLayer, TransactionUser
from activecall.sip.transaction_base import State, TransactionTimeout, TransportError, server_key

UDP = Target("192.0.2.10", 5060, "UDP")
TCP = Target("192.0.2.10", 5060, "TCP")


def request_bytes(method="INVITE", branch="z9hG4bKabc", cseq=1, to_tag=""):
    tag = f";tag={to_tag}" if to_tag else ""
    return (
        f"{method} sip:bob@192.0.2.20 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 192.0.2.10:5060;branch={branch};rport\r\n"
        f"From: <sip:alice@192.0.2.10>;tag=fromtag\r\nTo: <sip:bob@192.0.2.20>{tag}\r\n"
        f"Call-ID: call-{branch}\r\nCSeq: {cseq} {method}\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def request(method="INVITE", **kw):
    return parse_message(request_bytes(method, **kw))


class FakeTransport:
    """Records what the layer sends, with the Clock time it was sent at."""

    def __init__(self, clock):
        self.clock = clock
        self.sent = []
        self.fail_next = None

    def local_via(self, transport):
        return Via(transport, "192.0.2.20", 5060, {"rport": None})

    def _record(self, msg, target):
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            return defer.fail(error)
        self.sent.append((self.clock.seconds(), msg, target))
        return None

    def send_request(self, request, target):
        return self._record(request, target)

    def send_response(self, response, source):
        return self._record(response, source)

    def of(self, kind):
        return [(t, m) for t, m, _ in self.sent if kind == getattr(m, "method", getattr(m, "status", None))]


class RecordingTU(TransactionUser):
    def __init__(self):
        self.requests, self.acks, self.strays, self.cancels, self.failures = [], [], [], [], []
        self.answer = None

    def request_received(self, request, transaction):
        self.requests.append((request, transaction))
        if self.answer is not None:
            transaction.respond(self.answer)

    def ack_received(self, ack, source):
        self.acks.append(ack)

    def stray_response(self, response, source):
        self.strays.append(response)

    def cancel_received(self, cancel, invite):
        self.cancels.append((cancel, invite))

    def server_transaction_failed(self, transaction, error):
        self.failures.append((transaction, error))


class LayerTestCase(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.transport = FakeTransport(self.clock)
        self.tu = RecordingTU()
        self.layer = TransactionLayer(self.transport, self.tu, reactor=self.clock)

    def outgoing(self, method="INVITE", target=UDP, **kw):
        req = request(method, **kw)
        req.headers.remove("Via")  # the layer stamps ours
        provisionals = []
        txn = self.layer.send_request(req, target, on_provisional=provisionals.append)
        return txn, provisionals

    def reply(self, txn, status, to_tag="totag"):
        response = make_response(txn.request, status, to_tag=to_tag)
        self.layer.message_received(parse_message(response.to_bytes()), ("192.0.2.10", 5060), "UDP")
        return response

    def deliver(self, data, transport="UDP"):
        self.layer.message_received(parse_message(data), ("192.0.2.10", 5060), transport)

    def advance_to(self, when, step=0.5):
        """Advance in steps: a timer re-armed inside Clock.advance counts from the new time."""
        while self.clock.seconds() + step <= when:
            self.clock.advance(step)
        self.clock.advance(when - self.clock.seconds())


class InviteClientTests(LayerTestCase):
    def test_timer_a_doubles_and_timer_b_times_out(self):
        txn, _ = self.outgoing()
        self.assertTrue(txn.request.top_via.branch.startswith("z9hG4bK"))
        self.assertEqual(txn.request.top_via.host, "192.0.2.20")
        for _ in range(70):
            self.clock.advance(0.5)
        times = [t for t, _ in self.transport.of("INVITE")]
        self.assertEqual(times, [0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5])
        self.failureResultOf(txn.final, TransactionTimeout)
        self.assertEqual(txn.state, State.TERMINATED)
        self.assertEqual(self.layer.client_transactions, {})

    def test_provisional_stops_retransmission_and_b(self):
        txn, provisionals = self.outgoing()
        self.clock.advance(0.5)
        self.reply(txn, 180)
        self.assertEqual(txn.state, State.PROCEEDING)
        self.assertEqual([r.status for r in provisionals], [180])
        self.clock.advance(100)
        self.assertEqual(len(self.transport.of("INVITE")), 2)
        self.assertNoResult(txn.final)

    def test_non_2xx_generates_ack_and_timer_d(self):
        txn, _ = self.outgoing()
        self.reply(txn, 486)
        self.assertEqual(self.successResultOf(txn.final).status, 486)
        (_, ack), = self.transport.of("ACK")
        self.assertEqual(ack.top_via.branch, txn.request.top_via.branch)
        self.assertEqual(ack.cseq.seq, txn.request.cseq.seq)
        self.assertEqual(ack.to.tag, "totag")
        self.assertEqual(txn.state, State.COMPLETED)
        # a retransmitted final: ACK again, not passed up again
        self.reply(txn, 486)
        self.assertEqual(len(self.transport.of("ACK")), 2)
        self.clock.advance(31.9)
        self.assertEqual(txn.state, State.COMPLETED)
        self.clock.advance(0.1)
        self.assertEqual(txn.state, State.TERMINATED)
        self.assertEqual(self.tu.strays, [])

    def test_2xx_accepted_then_retransmissions_go_to_tu(self):
        txn, _ = self.outgoing()
        self.reply(txn, 200)
        self.assertEqual(self.successResultOf(txn.final).status, 200)
        self.assertEqual(txn.state, State.ACCEPTED)
        self.assertEqual(self.transport.of("ACK"), [])  # the dialog ACKs a 2xx
        self.reply(txn, 200)
        self.assertEqual([r.status for r in self.tu.strays], [200])
        self.clock.advance(32)
        self.assertEqual(txn.state, State.TERMINATED)
        self.reply(txn, 200)
        self.assertEqual(len(self.tu.strays), 2)

    def test_reliable_transport_no_retransmit_and_no_timer_d(self):
        txn, _ = self.outgoing(target=TCP)
        self.assertEqual(txn.request.top_via.transport, "TCP")
        self.clock.advance(10)
        self.assertEqual(len(self.transport.of("INVITE")), 1)
        self.reply(txn, 404)
        self.assertEqual(txn.state, State.TERMINATED)

    def test_reliable_timer_b_still_applies(self):
        txn, _ = self.outgoing(target=TCP)
        self.clock.advance(32)
        self.failureResultOf(txn.final, TransactionTimeout)

    def test_transport_error(self):
        self.transport.fail_next = ConnectionRefusedError("refused")
        txn, _ = self.outgoing()
        self.failureResultOf(txn.final, TransportError)
        self.assertEqual(txn.state, State.TERMINATED)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class CancelTests(LayerTestCase):
    def test_cancel_after_provisional(self):
        txn, _ = self.outgoing()
        self.reply(txn, 180)
        d = self.layer.cancel(txn)
        (_, cancel), = self.transport.of("CANCEL")
        self.assertEqual(cancel.top_via.branch, txn.request.top_via.branch)
        self.assertEqual(cancel.cseq.seq, txn.request.cseq.seq)
        self.assertIsNone(cancel.to.tag)
        cancel_txn = self.layer.client_transactions[(cancel.top_via.branch, "CANCEL")]
        self.reply(cancel_txn, 200)
        self.assertEqual(self.successResultOf(d).status, 200)
        self.reply(txn, 487)
        self.assertEqual(self.successResultOf(txn.final).status, 487)
        self.assertEqual(len(self.transport.of("ACK")), 1)

    def test_cancel_waits_for_provisional(self):
        txn, _ = self.outgoing()
        d = self.layer.cancel(txn)
        self.assertEqual(self.transport.of("CANCEL"), [])
        self.reply(txn, 100)
        self.assertEqual(len(self.transport.of("CANCEL")), 1)
        self.assertNoResult(d)

    def test_cancel_dropped_when_final_arrives_first(self):
        txn, _ = self.outgoing()
        d = self.layer.cancel(txn)
        self.reply(txn, 603)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.transport.of("CANCEL"), [])
        self.assertIsNone(self.successResultOf(self.layer.cancel(txn)))


class NonInviteClientTests(LayerTestCase):
    def test_timer_e_capped_at_t2_and_timer_f(self):
        txn, _ = self.outgoing("OPTIONS")
        for _ in range(80):
            self.clock.advance(0.5)
        times = [t for t, _ in self.transport.of("OPTIONS")]
        self.assertEqual(times, [0, 0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5])
        self.failureResultOf(txn.final, TransactionTimeout)

    def test_proceeding_retransmits_at_t2(self):
        txn, provisionals = self.outgoing("REGISTER")
        self.clock.advance(0.5)
        self.reply(txn, 100)
        self.assertEqual(txn.state, State.PROCEEDING)
        self.advance_to(12)
        times = [t for t, _ in self.transport.of("REGISTER")]
        self.assertEqual(times, [0, 0.5, 1.5, 5.5, 9.5])
        self.assertEqual(len(provisionals), 1)

    def test_final_then_timer_k_absorbs_retransmissions(self):
        txn, _ = self.outgoing("BYE")
        self.reply(txn, 200)
        self.assertEqual(self.successResultOf(txn.final).status, 200)
        self.reply(txn, 200)
        self.assertEqual(self.tu.strays, [])
        self.clock.advance(5)
        self.assertEqual(txn.state, State.TERMINATED)
        self.reply(txn, 200)
        self.assertEqual(len(self.tu.strays), 1)

    def test_reliable_zero_k(self):
        txn, _ = self.outgoing("BYE", target=TCP)
        self.clock.advance(5)
        self.assertEqual(len(self.transport.of("BYE")), 1)
        self.reply(txn, 200)
        self.assertEqual(txn.state, State.TERMINATED)

    def test_ack_is_not_a_transaction(self):
        self.assertRaises(ValueError, self.layer.send_request, request("ACK"), UDP)
        ack = request("ACK")
        ack.headers.remove("Via")
        self.layer.send_ack(ack, UDP)
        (_, sent), = self.transport.of("ACK")
        self.assertTrue(sent.top_via.branch.startswith("z9hG4bK"))
        self.clock.advance(64)
        self.assertEqual(len(self.transport.of("ACK")), 1)


class InviteServerTests(LayerTestCase):
    def test_new_invite_gets_100_and_reaches_tu(self):
        self.deliver(request_bytes("INVITE"))
        (req, txn), = self.tu.requests
        (_, trying), = self.transport.of(100)
        self.assertIsNone(trying.to.tag)
        self.assertEqual(txn.state, State.PROCEEDING)
        self.assertEqual(txn.source, Target("192.0.2.10", 5060, "UDP"))

    def test_retransmitted_invite_absorbed_and_last_provisional_resent(self):
        self.deliver(request_bytes("INVITE"))
        (_, txn), = self.tu.requests
        txn.respond(180)
        self.deliver(request_bytes("INVITE"))
        self.assertEqual(len(self.tu.requests), 1)
        self.assertEqual(len(self.transport.of(180)), 2)

    def test_non_2xx_timer_g_and_h(self):
        self.deliver(request_bytes("INVITE"))
        (_, txn), = self.tu.requests
        txn.respond(486)
        for _ in range(70):
            self.clock.advance(0.5)
        times = [t for t, _ in self.transport.of(486)]
        self.assertEqual(times, [0, 0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5])
        self.assertEqual(txn.state, State.TERMINATED)
        (failed, error), = self.tu.failures
        self.assertIs(failed, txn)
        self.assertIsInstance(error, TransactionTimeout)

    def test_ack_confirms_and_timer_i(self):
        self.deliver(request_bytes("INVITE"))
        (_, txn), = self.tu.requests
        response = txn.respond(480)
        self.clock.advance(0.5)
        self.deliver(request_bytes("ACK", to_tag=response.to.tag))
        self.assertEqual(txn.state, State.CONFIRMED)
        self.deliver(request_bytes("ACK", to_tag=response.to.tag))  # absorbed
        self.assertEqual(self.tu.acks, [])
        self.advance_to(5.4)
        self.assertEqual(len(self.transport.of(480)), 2)  # no more G after ACK
        self.assertEqual(txn.state, State.CONFIRMED)
        self.advance_to(5.5)
        self.assertEqual(txn.state, State.TERMINATED)

    def test_reliable_server_non_2xx(self):
        self.deliver(request_bytes("INVITE"), transport="TCP")
        (_, txn), = self.tu.requests
        txn.respond(500)
        self.clock.advance(10)
        self.assertEqual(len(self.transport.of(500)), 1)
        self.deliver(request_bytes("ACK"), transport="TCP")
        self.assertEqual(txn.state, State.TERMINATED)

    def test_2xx_accepted_ack_to_tu_and_retransmitter(self):
        self.deliver(request_bytes("INVITE"))
        (_, txn), = self.tu.requests
        ok = txn.respond(200)
        self.assertEqual(txn.state, State.ACCEPTED)
        retransmitter = self.layer.retransmit_2xx(txn, ok)
        self.advance_to(8)
        times = [t for t, _ in self.transport.of(200)]
        self.assertEqual(times, [0, 0.5, 1.5, 3.5, 7.5])
        self.assertTrue(all(r.to.tag == ok.to.tag for _, r in self.transport.of(200)))
        # the ACK for a 2xx has its own branch: it goes to the TU
        self.deliver(request_bytes("ACK", branch="z9hG4bKack", to_tag=ok.to.tag))
        self.assertEqual(len(self.tu.acks), 1)
        retransmitter.ack_received()
        self.assertIsNone(self.successResultOf(retransmitter.done))
        self.clock.advance(30)
        self.assertEqual(len(self.transport.of(200)), 5)
        self.assertEqual(txn.state, State.TERMINATED)  # timer L

    def test_2xx_never_acked(self):
        self.deliver(request_bytes("INVITE"))
        (_, txn), = self.tu.requests
        retransmitter = self.layer.retransmit_2xx(txn, txn.respond(200))
        for _ in range(70):
            self.clock.advance(0.5)
        self.failureResultOf(retransmitter.done, TransactionTimeout)
        times = [t for t, _ in self.transport.of(200)]
        self.assertEqual(times, [0, 0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5])

    def test_2xx_retransmitter_reliable_waits_without_resending(self):
        retransmitter = TwoXXRetransmitter(self.clock, lambda: self.fail("resent"), reliable=True).start()
        self.clock.advance(31)
        self.assertNoResult(retransmitter.done)
        self.clock.advance(1)
        self.failureResultOf(retransmitter.done, TransactionTimeout)

    def test_tu_exception_gives_500(self):
        def boom(request, transaction):
            raise RuntimeError("bug")

        self.tu.request_received = boom
        self.deliver(request_bytes("INVITE"))
        self.assertEqual(len(self.transport.of(500)), 1)
        self.flushLoggedErrors(RuntimeError)

    def test_response_send_failure_reported(self):
        self.deliver(request_bytes("OPTIONS"))
        (_, txn), = self.tu.requests
        self.transport.fail_next = OSError("unreachable")
        txn.respond(200)
        self.assertEqual(txn.state, State.TERMINATED)
        self.assertIsInstance(self.tu.failures[0][1], TransportError)


class CancelServerTests(LayerTestCase):
    def test_cancel_gives_200_and_487(self):
        self.deliver(request_bytes("INVITE"))
        (_, invite), = self.tu.requests
        ringing = invite.respond(180)
        self.deliver(request_bytes("CANCEL"))
        (cancel, matched), = self.tu.cancels
        self.assertIs(matched, invite)
        (_, ok), = self.transport.of(200)
        self.assertEqual(ok.cseq.method, "CANCEL")
        (_, terminated), = self.transport.of(487)
        self.assertEqual(terminated.cseq.method, "INVITE")
        self.assertEqual(terminated.to.tag, ringing.to.tag)
        self.assertEqual(invite.state, State.COMPLETED)
        self.assertEqual(len(self.tu.requests), 1)  # CANCEL is not a new request for the TU

    def test_cancel_without_invite_gets_481(self):
        self.deliver(request_bytes("CANCEL"))
        self.assertEqual(len(self.transport.of(481)), 1)

    def test_cancel_after_final_only_200(self):
        self.deliver(request_bytes("INVITE"))
        (_, invite), = self.tu.requests
        invite.respond(200)
        self.deliver(request_bytes("CANCEL"))
        self.assertEqual(self.tu.cancels, [])
        self.assertEqual(len(self.transport.of(487)), 0)
        self.assertEqual([r.cseq.method for _, r in self.transport.of(200)], ["INVITE", "CANCEL"])

    def test_tu_answering_the_cancel_itself(self):
        def cancel_received(cancel, invite):
            invite.respond(487, reason="Call Cancelled")

        self.tu.cancel_received = cancel_received
        self.deliver(request_bytes("INVITE"))
        self.deliver(request_bytes("CANCEL"))
        (_, response), = self.transport.of(487)
        self.assertEqual(response.reason, "Call Cancelled")


class NonInviteServerTests(LayerTestCase):
    def test_timer_j_and_absorption(self):
        self.deliver(request_bytes("OPTIONS"))
        (_, txn), = self.tu.requests
        self.deliver(request_bytes("OPTIONS"))  # before any answer: discarded
        self.assertEqual(self.transport.sent, [])
        txn.respond(200)
        self.deliver(request_bytes("OPTIONS"))
        self.assertEqual(len(self.transport.of(200)), 2)
        self.assertEqual(len(self.tu.requests), 1)
        txn.respond(500)  # a second final is refused
        self.assertEqual(len(self.transport.of(500)), 0)
        self.clock.advance(31.9)
        self.assertEqual(txn.state, State.COMPLETED)
        self.clock.advance(0.1)
        self.assertEqual(txn.state, State.TERMINATED)
        self.deliver(request_bytes("OPTIONS"))
        self.assertEqual(len(self.tu.requests), 2)

    def test_provisional_resent_on_retransmission(self):
        self.deliver(request_bytes("REGISTER"))
        (_, txn), = self.tu.requests
        txn.respond(100)
        self.assertEqual(txn.state, State.PROCEEDING)
        self.deliver(request_bytes("REGISTER"))
        self.assertEqual(len(self.transport.of(100)), 2)

    def test_reliable_zero_j(self):
        self.deliver(request_bytes("BYE"), transport="TLS")
        (_, txn), = self.tu.requests
        txn.respond(200)
        self.assertEqual(txn.state, State.TERMINATED)

    def test_default_tu_answers_501(self):
        layer = TransactionLayer(self.transport, reactor=self.clock)
        layer.message_received(parse_message(request_bytes("MESSAGE")), ("192.0.2.10", 5060), "UDP")
        self.assertEqual(len(self.transport.of(501)), 1)


class MatchingTests(LayerTestCase):
    def test_server_key_rules(self):
        invite = request("INVITE")
        ack = request("ACK")
        self.assertEqual(server_key(invite), server_key(ack))
        self.assertNotEqual(server_key(invite), server_key(request("CANCEL")))
        other_sender = parse_message(request_bytes("INVITE").replace(b"192.0.2.10:5060;", b"192.0.2.11:5060;"))
        self.assertNotEqual(server_key(invite), server_key(other_sender))

    def test_rfc2543_fallback_key(self):
        old = parse_message(request_bytes("INVITE", branch="1"))
        self.assertEqual(server_key(old)[0], "rfc2543")
        self.deliver(request_bytes("INVITE", branch="1"))
        self.deliver(request_bytes("INVITE", branch="1"))
        self.assertEqual(len(self.tu.requests), 1)

    def test_response_for_other_method_not_matched(self):
        txn, _ = self.outgoing("INVITE")
        response = make_response(txn.request, 200)
        response.headers.set("CSeq", f"{txn.request.cseq.seq} BYE")
        self.layer.message_received(response, ("192.0.2.10", 5060), "UDP")
        self.assertNoResult(txn.final)
        self.assertEqual(len(self.tu.strays), 1)

    def test_duplicate_branch_refused(self):
        txn, _ = self.outgoing("OPTIONS")
        self.assertRaises(ValueError, self.layer.send_request, txn.request, UDP)

    def test_stray_ack_to_tu(self):
        self.deliver(request_bytes("ACK", branch="z9hG4bKnothing"))
        self.assertEqual(len(self.tu.acks), 1)


class ExpiryQueueTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.expired = []
        self.queue = ExpiryQueue(self.clock, self.expired.append)

    def test_entries_expire_in_order_on_one_delayed_call(self):
        for name in "abc":
            self.queue.add(32, name)
            self.clock.advance(1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(28.5)
        self.assertEqual(self.expired, [])
        self.clock.advance(0.5)
        self.assertEqual(self.expired, ["a"])
        self.clock.advance(2)
        self.assertEqual(self.expired, ["a", "b", "c"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel_moves_the_delayed_call_to_the_next_live_entry(self):
        a = self.queue.add(32, "a")
        self.clock.advance(10)
        b = self.queue.add(32, "b")
        self.queue.cancel(a)
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()], [42])
        self.queue.cancel(b)
        self.assertEqual(self.clock.getDelayedCalls(), [])  # nothing left: nothing pending
        self.clock.advance(60)
        self.assertEqual(self.expired, [])

    def test_clear_and_a_clock_stepping_back(self):
        self.queue.add(32, "a")
        self.clock.rightNow -= 5  # the wall clock stepped back: "b" expires with "a"
        self.queue.add(32, "b")
        self.clock.advance(37)
        self.assertEqual(self.expired, ["a", "b"])
        self.queue.add(32, "c")
        self.queue.clear()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class LayerStopTests(LayerTestCase):
    def test_stop_terminates_everything(self):
        txn, _ = self.outgoing("OPTIONS")
        self.deliver(request_bytes("INVITE"))
        self.layer.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual((self.layer.client_transactions, self.layer.server_transactions), ({}, {}))
        self.assertEqual(txn.state, State.TERMINATED)
        self.failureResultOf(txn.final, defer.CancelledError)

    def test_tu_sees_settled_transaction(self):
        txn, _ = self.outgoing("OPTIONS")
        states = []
        txn.final.addCallback(lambda r: states.append(("K" in txn.timers, txn.state)))
        self.reply(txn, 200)
        self.assertEqual(states, [(True, State.COMPLETED)])
