"""The SIP core (messages, transactions, transports, digest) against real peers on loopback.

No dialog layer exists yet, so each test plays the dialog's part by hand on top
of ``TransactionLayer``: sipp's built-in ``uas`` and ``uac`` scenarios check our
requests, responses, ACKs and 2xx retransmission over UDP and TCP, and
kamailio as a registrar checks our digest answers.  Skipped when the peer
program is not installed (``tools/install-debian-deps`` installs both).
"""

from __future__ import annotations

import os
import shutil

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from activecall.config import Config
from activecall.sip.auth import DigestClient, challenges_in
from activecall.sip.message import (
    Address,
    Target,
    generate_call_id,
    generate_tag,
    make_request,
    next_attempt,
    parse_address,
    parse_uri,
)
from activecall.sip.transaction import TransactionLayer, TransactionUser
from activecall.sip.transaction_base import TransportError
from activecall.sip.transport import TransportManager
from tests.helpers import free_port, spawn

SIPP = shutil.which("sipp")
KAMAILIO = shutil.which("kamailio")

SDP = (
    b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    b"m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
)


class Recorder(TransactionUser):
    """Plays a tiny UAS: 180 + 200 to INVITE (2xx resent until ACK), 200 to BYE."""

    def __init__(self, layer_ref):
        self.layer_ref = layer_ref
        self.methods: list[str] = []
        self.strays: list = []
        self.retransmitters: list = []
        self.bye = defer.Deferred()

    def request_received(self, request, txn):
        self.methods.append(request.method)
        if request.method == "INVITE":
            layer = self.layer_ref()
            txn.respond(180)
            contact = Address(parse_uri(layer.transport.contact_uri("bot", txn.source.transport)))
            ok = txn.respond(200, headers=[("Contact", str(contact)), ("Content-Type", "application/sdp")], body=SDP)
            self.retransmitters.append(layer.retransmit_2xx(txn, ok))
        elif request.method == "BYE":
            txn.respond(200)
            if not self.bye.called:
                self.bye.callback(request)
        else:
            txn.respond(200)

    def ack_received(self, ack, source):
        self.methods.append("ACK")
        for retransmitter in self.retransmitters:
            retransmitter.ack_received()

    def stray_response(self, response, source):
        self.strays.append(response)


class CoreInteropTestCase(unittest.TestCase):
    def start_core(self, transport="UDP"):
        port = free_port()
        manager = TransportManager(Config(addr="127.0.0.1", udp_port=port, tcp_port=port))
        layer = TransactionLayer(manager)
        tu = Recorder(lambda: layer)
        layer.tu = tu
        manager.on_message = layer.message_received
        manager.startService()
        self.addCleanup(manager.stopService)
        self.addCleanup(layer.stop)
        return manager, layer, tu

    def run_peer(self, argv):
        watcher = spawn(argv)

        def stop():
            # TERM first: kamailio takes its helper processes (and their pipes) down with it
            if watcher.ended.called:
                return None
            watcher.signal("TERM")
            killer = reactor.callLater(10, watcher.signal, "KILL")

            def gone(_):
                if killer.active():
                    killer.cancel()

            return watcher.ended.addBoth(gone)

        self.addCleanup(stop)
        return watcher

    @defer.inlineCallbacks
    def send_until_listening(self, layer, request, target, on_provisional=None):
        """(transaction, final response); a refused TCP connect is retried while the peer starts.

        Over UDP the transaction's own retransmissions cover a peer that is not up yet.
        """
        for _ in range(100):
            txn = layer.send_request(request, target, on_provisional=on_provisional)
            try:
                response = yield txn.final
            except TransportError:
                yield task.deferLater(reactor, 0.1, lambda: None)
                continue
            return txn, response
        self.fail(f"nothing listening on {target}")


class SippTests(CoreInteropTestCase):
    if SIPP is None:
        skip = "sipp (Debian package sip-tester) is not installed"

    @defer.inlineCallbacks
    def _call_sipp_uas(self, transport):
        manager, layer, tu = self.start_core()
        sipp_port = free_port()
        sipp = self.run_peer([SIPP, "-sn", "uas", "-i", "127.0.0.1", "-p", str(sipp_port), "-m", "1",
                              "-t", "u1" if transport == "UDP" else "t1", "-nostdin"])
        target = Target("127.0.0.1", sipp_port, transport)
        me = parse_address(f"<sip:bot@127.0.0.1:{manager.port_for(transport)}>;tag={generate_tag()}")
        them = parse_address(f"<sip:service@127.0.0.1:{sipp_port}>")
        call_id = generate_call_id("127.0.0.1")
        contact = Address(parse_uri(manager.contact_uri("bot", transport)))
        invite = make_request("INVITE", them.uri.copy(), via=manager.local_via(transport), from_=me, to=them,
                              call_id=call_id, cseq=1, contact=contact, body=SDP, content_type="application/sdp")
        provisionals = []
        _, ok = yield self.send_until_listening(layer, invite, target, lambda r: provisionals.append(r.status))
        self.assertEqual(ok.status, 200)
        self.assertIn(180, provisionals)
        self.assertTrue(ok.to.tag)
        remote = ok.contacts[0].uri if ok.contacts else them.uri
        ack = make_request("ACK", remote.copy(), via=manager.local_via(transport), from_=me, to=ok.to,
                           call_id=call_id, cseq=1, contact=contact)
        layer.send_ack(ack, target)
        bye = make_request("BYE", remote.copy(), via=manager.local_via(transport), from_=me, to=ok.to,
                           call_id=call_id, cseq=2)
        bye_txn = layer.send_request(bye, target)
        answer = yield bye_txn.final
        self.assertEqual(answer.status, 200)
        code = yield sipp.ended
        self.assertEqual(code, 0, sipp.output[-2000:])

    def test_invite_to_sipp_uas_udp(self):
        return self._call_sipp_uas("UDP")

    def test_invite_to_sipp_uas_tcp(self):
        return self._call_sipp_uas("TCP")

    @defer.inlineCallbacks
    def _call_from_sipp_uac(self, transport):
        manager, layer, tu = self.start_core()
        sipp = self.run_peer([SIPP, "-sn", "uac", f"127.0.0.1:{manager.port_for(transport)}", "-i", "127.0.0.1",
                              "-p", str(free_port()), "-m", "1", "-t", "u1" if transport == "UDP" else "t1",
                              "-nostdin", "-timeout", "20"])
        code = yield sipp.ended
        self.assertEqual(code, 0, sipp.output[-2000:])
        self.assertEqual([m for m in tu.methods if m != "ACK"], ["INVITE", "BYE"])
        self.assertIn("ACK", tu.methods)
        self.assertTrue(tu.retransmitters[0].done.called)  # the ACK stopped the 2xx retransmission

    def test_call_from_sipp_uac_udp(self):
        return self._call_from_sipp_uac("UDP")

    def test_call_from_sipp_uac_tcp(self):
        return self._call_from_sipp_uac("TCP")


KAMAILIO_CFG = """\
#!KAMAILIO
debug=2
log_stderror=yes
fork=no
listen=udp:127.0.0.1:{port}
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "pv.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "auth.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
modparam("usrloc", "db_mode", 0)
modparam("auth", "algorithm", "{algorithm}")
request_route {{
    if (is_method("REGISTER")) {{
        if (!pv_www_authenticate("$td", "{password}", "0")) {{
            www_challenge("$td", "{qop}");
            exit;
        }}
        save("location");
        exit;
    }}
    sl_send_reply("405", "Method Not Allowed");
}}
"""


class KamailioRegistrarTests(CoreInteropTestCase):
    """REGISTER with digest against kamailio's auth module (qop=auth and legacy no-qop)."""

    if KAMAILIO is None:
        skip = "kamailio is not installed"

    def start_kamailio(self, qop="1", algorithm="MD5"):
        """kamailio on a free UDP port; ``qop``: www_challenge flags, "1" = qop=auth, "0" = none."""
        port = free_port()
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        cfg = os.path.join(workdir, "kamailio.cfg")
        with open(cfg, "w") as f:
            f.write(KAMAILIO_CFG.format(port=port, password="secret", qop=qop, algorithm=algorithm))
        pidfile = os.path.join(workdir, "kamailio.pid")
        kamailio = self.run_peer([KAMAILIO, "-f", cfg, "-P", pidfile, "-w", workdir, "-E"])
        return port, kamailio

    @defer.inlineCallbacks
    def register(self, kamailio_port, password, attempts=3):
        """REGISTER, answering challenges like a UA would; returns (final response, DigestClient)."""
        manager, layer, tu = self.start_core()
        target = Target("127.0.0.1", kamailio_port, "UDP")
        aor = parse_address("<sip:alice@127.0.0.1>")
        me = aor.copy(params={"tag": generate_tag()})
        contact = Address(parse_uri(manager.contact_uri("alice")), params={"expires": "60"})
        request = make_request("REGISTER", f"sip:127.0.0.1:{kamailio_port}", via=manager.local_via("UDP"),
                               from_=me, to=aor, call_id=generate_call_id(), cseq=1, contact=contact)
        client = DigestClient("alice", password)
        self.challenges = []
        for _ in range(attempts):
            _, response = yield self.send_until_listening(layer, request, target)
            if response.status not in (401, 407):
                break
            self.challenges += challenges_in(response)
            request = next_attempt(request)
            if not client.authorize(request, response):
                break
        defer.returnValue((response, client))

    @defer.inlineCallbacks
    def _registers(self, qop, algorithm="MD5"):
        port, kamailio = self.start_kamailio(qop, algorithm)
        response, client = yield self.register(port, "secret")
        self.assertEqual(response.status, 200, kamailio.output[-2000:])
        self.assertIsNone(client.last_error)
        self.assertTrue(any("alice@127.0.0.1" in c for c in response.headers.get_all("Contact")))
        challenge, = self.challenges
        self.assertEqual((challenge.qop, challenge.base_algorithm), (("auth",) if qop == "1" else (), algorithm))

    def test_right_password_registers_qop_auth(self):
        return self._registers("1")

    def test_right_password_registers_without_qop(self):
        return self._registers("0")

    def test_right_password_registers_sha256(self):
        return self._registers("1", "SHA-256")

    @defer.inlineCallbacks
    def test_wrong_password_is_a_clear_failure_not_a_loop(self):
        port, kamailio = self.start_kamailio()
        response, client = yield self.register(port, "wrong", attempts=5)
        self.assertEqual(response.status, 401)
        self.assertIn("rejected", client.last_error)
