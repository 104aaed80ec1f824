"""SIP transports (activecall.sip.transport): in-memory protocols and real loopback sockets."""

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from activecall.config import Config
from activecall.sip import transport as t
from activecall.sip.message import SIPParseError, Target, make_response, parse_message, parse_via
from activecall.testing import FakeDatagramTransport
from tests.helpers import free_port

INVITE = (
    b"INVITE sip:bob@127.0.0.1 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 10.9.9.9:5062;branch=z9hG4bKtest;rport\r\n"
    b"From: <sip:alice@10.9.9.9>;tag=a\r\nTo: <sip:bob@127.0.0.1>\r\n"
    b"Call-ID: transport-test\r\nCSeq: 1 INVITE\r\nContent-Length: 3\r\n\r\nabc"
)


class Collector:
    def __init__(self):
        self.messages = []
        self.waiting = []

    def __call__(self, msg, source, transport):
        self.messages.append((msg, source, transport))
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback((msg, source, transport))

    def next(self, timeout=5):
        d = defer.Deferred()
        self.waiting.append(d)
        return d.addTimeout(timeout, reactor)


class PureTests(unittest.TestCase):
    def test_stamp_via_received_and_rport(self):
        request = parse_message(INVITE)
        t.stamp_via(request, "203.0.113.5", 40000)
        via = request.top_via
        self.assertEqual((via.received, via.rport), ("203.0.113.5", 40000))
        self.assertEqual(t.response_target(via), Target("203.0.113.5", 40000, "UDP"))

    def test_stamp_via_same_host_without_rport(self):
        request = parse_message(INVITE.replace(b";rport", b""))
        t.stamp_via(request, "10.9.9.9", 40000)
        self.assertNotIn("received", request.top_via.params)
        self.assertEqual(t.response_target(request.top_via), Target("10.9.9.9", 5062, "UDP"))

    def test_response_target_defaults(self):
        self.assertEqual(t.response_target(parse_via("SIP/2.0/TLS [2001:db8::1]")),
                         Target("2001:db8::1", 5061, "TLS"))
        self.assertEqual(t.response_target(parse_via("SIP/2.0/TCP h;received=192.0.2.1")),
                         Target("192.0.2.1", 5060, "TCP"))

    def test_response_target_reliable_ignores_rport(self):
        # over TCP/TLS rport is the peer's ephemeral port: a new connection goes to the sent-by port
        via = parse_via("SIP/2.0/TCP pbx.example:5070;branch=z9hG4bKx;rport=40123;received=192.0.2.7")
        self.assertEqual(t.response_target(via), Target("192.0.2.7", 5070, "TCP"))
        via = parse_via("SIP/2.0/UDP pbx.example:5070;branch=z9hG4bKx;rport=40123;received=192.0.2.7")
        self.assertEqual(t.response_target(via), Target("192.0.2.7", 40123, "UDP"))

    def test_bad_request_names_the_problem_in_a_warning(self):
        error = None
        try:
            parse_message(INVITE.replace(b"1 INVITE", b"1 BYE"))
        except SIPParseError as e:
            error = e
        response = t.bad_request(error, 'active"call/1.0')
        warning, = response.headers.get_all("Warning")
        self.assertTrue(warning.startswith('399 activecall1.0 "CSeq method'), warning)
        self.assertEqual(parse_message(response.to_bytes()).headers.get_all("Warning"), [warning])
        self.assertIsNone(t.bad_request(SIPParseError("garbage")))

    def test_split_pem(self):
        pem = b"-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n" * 2
        self.assertEqual(len(t.split_pem(pem)), 2)


def manager(clock=None, **overrides):
    values = dict(addr="127.0.0.1", udp_port=5060, tcp_port=0)
    values.update(overrides)
    return t.TransportManager(Config(**values), Collector(), reactor=clock or reactor)


class DatagramTests(unittest.TestCase):
    def setUp(self):
        self.manager = manager(task.Clock())
        self.wire = FakeDatagramTransport()
        self.manager.udp.makeConnection(self.wire)

    def test_request_is_stamped_and_delivered(self):
        self.manager.udp.datagramReceived(INVITE, ("198.51.100.7", 7777))
        (msg, source, transport), = self.manager.on_message.messages
        self.assertEqual((source, transport), (("198.51.100.7", 7777), "UDP"))
        self.assertEqual(msg.top_via.received, "198.51.100.7")
        self.assertEqual(msg.top_via.rport, 7777)
        self.assertEqual(msg.body, b"abc")

    def test_malformed_answerable_gets_400_to_source(self):
        self.manager.udp.datagramReceived(INVITE.replace(b"1 INVITE", b"1 BYE"), ("198.51.100.7", 7777))
        (data, addr), = self.wire.written
        self.assertEqual(addr, ("198.51.100.7", 7777))
        response = parse_message(data)
        self.assertEqual(response.status, 400)
        self.assertIn("CSeq", response.reason)
        self.assertIn("CSeq method", response.headers.get("Warning"))
        self.assertEqual(self.manager.on_message.messages, [])

    def test_garbage_and_keepalives_dropped(self):
        for data in (b"\r\n\r\n", b"\x00", b"GET / HTTP/1.1\r\n\r\n", os.urandom(300), INVITE[:40]):
            self.manager.udp.datagramReceived(data, ("198.51.100.7", 7777))
        self.assertEqual(self.wire.written, [])
        self.assertEqual(self.manager.on_message.messages, [])

    def test_handler_exception_is_contained(self):
        def boom(*args):
            raise RuntimeError("handler bug")

        self.manager.on_message = boom
        self.manager.udp.datagramReceived(INVITE, ("198.51.100.7", 7777))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_send_response_udp_uses_received_rport(self):
        self.manager.udp.datagramReceived(INVITE, ("198.51.100.7", 7777))
        (msg, _, _), = self.manager.on_message.messages
        d = self.manager.send_response(make_response(msg, 180, to_tag="x"), Target("198.51.100.7", 7777, "UDP"))
        self.successResultOf(d)
        (data, addr), = self.wire.written
        self.assertEqual(addr, ("198.51.100.7", 7777))
        self.assertEqual(parse_message(data).status, 180)

    def test_local_via_and_contact_use_external_ip(self):
        m = manager(task.Clock(), external_ip="203.0.113.9", udp_port=5070, tcp_port=5071)
        self.assertEqual(str(m.local_via("TCP")), "SIP/2.0/TCP 203.0.113.9:5071;rport")
        self.assertEqual(m.contact_uri("bot"), "sip:bot@203.0.113.9:5070")
        self.assertEqual(m.contact_uri(transport="TCP"), "sip:203.0.113.9:5071;transport=tcp")

    def test_advertised_host_for_wildcard_addr(self):
        m = manager(task.Clock(), addr="0.0.0.0")
        self.assertNotEqual(m.advertised_host, "0.0.0.0")


class StreamTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.manager = manager(self.clock)
        self.proto = t.SIPStreamFactory(self.manager, "TCP").buildProtocol(None)
        self.wire = StringTransport(peerAddress=IPv4Address("TCP", "198.51.100.8", 40001))
        self.proto.makeConnection(self.wire)

    def test_framing_across_chunks_with_keepalives(self):
        data = b"\r\n" + INVITE + INVITE.replace(b"z9hG4bKtest", b"z9hG4bKtwo")
        for i in range(0, len(data), 7):
            self.proto.dataReceived(data[i:i + 7])
        self.assertEqual([m.top_via.branch for m, _, _ in self.manager.on_message.messages],
                         ["z9hG4bKtest", "z9hG4bKtwo"])
        self.assertEqual(self.manager.on_message.messages[0][1:], (("198.51.100.8", 40001), "TCP"))
        self.assertEqual(self.proto.buffer, b"")

    def test_byte_by_byte_with_pings_between_messages(self):
        # one byte per segment: the head search resumes where it stopped, and a ping
        # split across segments is still a ping
        data = INVITE + b"\r\n\r\n" + INVITE.replace(b"z9hG4bKtest", b"z9hG4bKtwo") + b"\r\n"
        for i in range(len(data)):
            self.proto.dataReceived(data[i:i + 1])
        self.assertEqual([m.top_via.branch for m, _, _ in self.manager.on_message.messages],
                         ["z9hG4bKtest", "z9hG4bKtwo"])
        self.assertEqual(self.wire.value(), b"\r\n")
        self.assertEqual(self.proto.buffer, b"\r\n")  # a lone CRLF waits: it may be half a ping

    def test_ping_pong(self):
        self.proto.dataReceived(b"\r\n\r\n")
        self.assertEqual(self.wire.value(), b"\r\n")

    def test_response_goes_back_on_the_connection(self):
        self.proto.dataReceived(INVITE)
        (msg, source, transport), = self.manager.on_message.messages
        response = make_response(msg, 200, to_tag="x")
        self.successResultOf(self.manager.send_response(response, Target(source[0], source[1], transport)))
        self.assertEqual(parse_message(self.wire.value(), stream=True).status, 200)

    def test_missing_content_length_gets_400_but_stream_continues(self):
        bad = INVITE.replace(b"Content-Length: 3\r\n", b"")[:-3]
        self.proto.dataReceived(bad + INVITE)
        response = parse_message(self.wire.value(), stream=True)
        self.assertEqual(response.status, 400)
        self.assertEqual(len(self.manager.on_message.messages), 1)

    def test_bad_content_length_closes(self):
        self.proto.dataReceived(INVITE.replace(b"Content-Length: 3", b"Content-Length: -1"))
        self.assertTrue(self.wire.disconnecting)

    def test_oversized_header_closes(self):
        self.proto.dataReceived(b"A" * (70000))
        self.assertTrue(self.wire.disconnecting)

    def test_idle_close(self):
        self.clock.advance(t.IDLE_TIMEOUT - 1)
        self.proto.dataReceived(b"\r\n\r\n")
        self.clock.advance(t.IDLE_TIMEOUT - 1)
        self.assertFalse(self.wire.disconnecting)
        self.clock.advance(1)
        self.assertTrue(self.wire.disconnecting)

    def test_outbound_connection_listed_only_when_ready(self):
        # a TLS connection we opened is not reused while its certificate is unverified
        proto = t.SIPStreamProtocol(self.manager, "TLS")
        proto.outbound = True
        proto.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "198.51.100.9", 5061)))
        self.assertNotIn(("TLS", "198.51.100.9", 5061), self.manager.connections)
        self.assertNoResult(proto.ready)
        proto.handshakeCompleted()
        self.assertIs(self.successResultOf(proto.ready), proto)

    def test_connection_table(self):
        self.assertIs(self.manager.connections[("TCP", "198.51.100.8", 40001)], self.proto)
        self.proto.connectionLost(None)
        self.assertEqual(self.manager.connections, {})


# -- real sockets ----------------------------------------------------------------------------------


def make_ca_and_cert(directory):
    """A throwaway CA and a server certificate for 127.0.0.1/localhost, as PEM files."""
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder().subject_name(name("activecall test CA")).issuer_name(name("activecall test CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {name: os.path.join(directory, name) for name in ("ca.pem", "cert.pem", "key.pem")}
    with open(paths["ca.pem"], "wb") as f:
        f.write(ca_cert.public_bytes(serialization.Encoding.PEM))
    with open(paths["cert.pem"], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(paths["key.pem"], "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return paths


class LoopbackTests(unittest.TestCase):
    """Two managers talking over real sockets on 127.0.0.1."""

    def start(self, **overrides):
        port = free_port()
        m = manager(udp_port=port, tcp_port=port, **overrides)
        m.startService()
        self.addCleanup(m.stopService)
        return m

    @defer.inlineCallbacks
    def test_a_host_name_no_dns_can_hold_fails_the_send_at_once(self):
        """A name from a header parameter (Via received=, a URI's maddr=) with a label over 63 characters is
        never handed to the resolver: getaddrinfo's IDNA step raises for it inside Twisted's resolver
        (an unhandled error, and a send that never completes) -- found by bench/fuzz_sip.py."""
        from activecall.sip.transport import SendError

        a = self.start()
        resolved = []
        self.patch(a.reactor, "resolve", lambda name, *rest: resolved.append(name))
        # IDNA: label too long / empty; a byte that is no ASCII (kept as a surrogate) or a space
        for host in ("a" * 70 + ".example", "a..example", ".example", "x" * 254, "pbx\udcff.example", "a b.example"):
            for transport in ("UDP", "TCP"):
                with self.assertRaises(SendError):
                    yield a.send_request(self.request_from(a, "UDP"), Target(host, 5060, transport))
        self.assertEqual(resolved, [])

    def request_from(self, sender, transport):
        request = parse_message(INVITE)
        request.headers.set("Via", str(sender.local_via(transport)) + ";branch=z9hG4bKloop")
        return request

    @defer.inlineCallbacks
    def round_trip(self, transport, a, b):
        arrived = b.on_message.next()
        yield a.send_request(self.request_from(a, transport), Target("127.0.0.1", b.port_for(transport), transport))
        msg, source, got_transport = yield arrived
        self.assertEqual(got_transport, transport)
        self.assertEqual(msg.body, b"abc")
        answered = a.on_message.next()
        yield b.send_response(make_response(msg, 486, to_tag="b"), Target(source[0], source[1], transport))
        response, _, _ = yield answered
        self.assertEqual(response.status, 486)
        defer.returnValue(source)

    @defer.inlineCallbacks
    def test_udp(self):
        a, b = self.start(), self.start()
        source = yield self.round_trip("UDP", a, b)
        self.assertEqual(source, ("127.0.0.1", a.port_for("UDP")))

    @defer.inlineCallbacks
    def test_tcp_connection_reuse(self):
        a, b = self.start(), self.start()
        yield self.round_trip("TCP", a, b)
        yield self.round_trip("TCP", a, b)
        self.assertEqual(len(set(a.connections.values())), 1)
        self.assertEqual(len(set(b.connections.values())), 1)

    @defer.inlineCallbacks
    def test_tcp_connect_refused(self):
        a = self.start()
        yield self.assertFailure(a.send_request(parse_message(INVITE), Target("127.0.0.1", free_port(), "TCP")),
                                 t.SendError)

    def tls_pair(self, **client):
        paths = make_ca_and_cert(self._tmpdir())
        server = self.start(tls_port=free_port(), tls_cert_file=paths["cert.pem"], tls_key_file=paths["key.pem"])
        client = self.start(**{k: (paths["ca.pem"] if v == "CA" else v) for k, v in client.items()})
        return client, server

    def _tmpdir(self):
        path = self.mktemp()
        os.makedirs(path)
        return path

    @defer.inlineCallbacks
    def test_tls_verified_with_ca_file(self):
        client, server = self.tls_pair(tls_ca_file="CA")
        yield self.round_trip("TLS", client, server)
        conn, = set(client.connections.values())  # under the dialled name and the peer address
        self.assertIn(("TLS", "127.0.0.1", server.port_for("TLS")), client.connections)
        self.assertTrue(conn.ready.called)

    @defer.inlineCallbacks
    def test_tls_unknown_ca_refused(self):
        client, server = self.tls_pair()  # system trust does not know our throwaway CA
        request = self.request_from(client, "TLS")
        yield self.assertFailure(client.send_request(request, Target("127.0.0.1", server.port_for("TLS"), "TLS")),
                                 t.SendError)
        self.assertEqual(server.on_message.messages, [])
        self.assertEqual(client.connections, {})

    @defer.inlineCallbacks
    def test_tls_verification_disabled_for_lab(self):
        client, server = self.tls_pair(tls_verify_peer=False)
        yield self.round_trip("TLS", client, server)

    def test_bind_failure_names_the_key(self):
        a = self.start()
        clash = manager(udp_port=free_port(), tcp_port=a.port_for("TCP"))
        self.assertRaises(CannotListenError, clash.startService)
        self.assertEqual(clash.config_key, "tcp_port")
        return clash.stopService()


class LayerOverLoopbackTests(unittest.TestCase):
    """TransactionLayer on top of two real TransportManagers: OPTIONS, and an INVITE cancelled while ringing."""

    start = LoopbackTests.start

    @defer.inlineCallbacks
    def _options(self, transport):
        from activecall.sip.message import make_request, parse_address
        from activecall.sip.transaction import TransactionLayer, TransactionUser

        class Answer(TransactionUser):
            def request_received(self, request, txn):
                txn.respond(200, headers=[("Allow", "INVITE, ACK, BYE, CANCEL, OPTIONS")])

        a, b = self.start(), self.start()
        layer_a = TransactionLayer(a)
        layer_b = TransactionLayer(b, Answer())
        self.addCleanup(layer_a.stop)
        self.addCleanup(layer_b.stop)
        a.on_message, b.on_message = layer_a.message_received, layer_b.message_received
        options = make_request(
            "OPTIONS", f"sip:127.0.0.1:{b.port_for(transport)}", via=a.local_via(transport),
            from_=parse_address("<sip:probe@127.0.0.1>;tag=p"), to=parse_address("<sip:127.0.0.1>"),
            call_id="options-1", cseq=1,
        )
        txn = layer_a.send_request(options, Target("127.0.0.1", b.port_for(transport), transport))
        response = yield txn.final
        self.assertEqual(response.status, 200)
        self.assertEqual(response.headers.get_all("Allow")[-1], "OPTIONS")
        self.assertTrue(response.top_via.branch.startswith("z9hG4bK"))

    def test_options_udp(self):
        return self._options("UDP")

    def test_options_tcp(self):
        return self._options("TCP")

    @defer.inlineCallbacks
    def _cancelled_invite(self, transport):
        """INVITE -> 100/180 -> CANCEL -> 200 + 487 -> ACK (inside the transaction), over real sockets."""
        from activecall.sip.message import make_request, parse_address
        from activecall.sip.transaction import TransactionLayer, TransactionUser
        from activecall.sip.transaction_base import State

        ringing, cancelled = [], []

        class Ring(TransactionUser):
            def request_received(self, request, txn):
                ringing.append(txn)
                txn.respond(180)

            def cancel_received(self, cancel, invite):
                cancelled.append(invite)

        a, b = self.start(), self.start()
        layer_a, layer_b = TransactionLayer(a), TransactionLayer(b, Ring())
        self.addCleanup(layer_a.stop)
        self.addCleanup(layer_b.stop)
        acked = defer.Deferred()

        def b_receives(msg, source, via_transport):
            layer_b.message_received(msg, source, via_transport)
            if getattr(msg, "method", None) == "ACK" and not acked.called:
                acked.callback(msg)

        a.on_message, b.on_message = layer_a.message_received, b_receives
        target = Target("127.0.0.1", b.port_for(transport), transport)
        invite = make_request(
            "INVITE", f"sip:bot@127.0.0.1:{target.port}", via=a.local_via(transport),
            from_=parse_address("<sip:caller@127.0.0.1>;tag=c"), to=parse_address("<sip:bot@127.0.0.1>"),
            call_id=f"cancel-{transport}", cseq=1, body=b"v=0\r\n", content_type="application/sdp",
        )
        provisionals, cancel_answers = [], []

        def provisional(response):
            provisionals.append(response.status)
            if response.status == 180:
                cancel_answers.append(layer_a.cancel(txn))

        txn = layer_a.send_request(invite, target, on_provisional=provisional)
        final = yield txn.final
        cancel_response = yield cancel_answers[0]
        ack = yield acked
        self.assertEqual(final.status, 487)
        self.assertEqual(cancel_response.status, 200)
        self.assertIn(180, provisionals)
        self.assertEqual(cancelled, ringing)
        self.assertEqual(ack.cseq.seq, 1)
        self.assertEqual(ack.top_via.branch, invite.top_via.branch)  # the non-2xx ACK is hop-by-hop
        self.assertEqual(ack.to.tag, final.to.tag)
        self.assertIn(ringing[0].state, (State.CONFIRMED, State.TERMINATED))

    def test_cancelled_invite_udp(self):
        return self._cancelled_invite("UDP")

    def test_cancelled_invite_tcp(self):
        return self._cancelled_invite("TCP")


class MalformedInputTests(unittest.TestCase):
    """A flood of malformed input is counted, and logged as a few summary lines, not a line each."""

    def setUp(self):
        from twisted.logger import globalLogPublisher

        from activecall.metrics import Metrics

        self.clock = task.Clock()
        self.metrics = Metrics()
        self.manager = t.TransportManager(Config(addr="127.0.0.1", udp_port=5060, tcp_port=0), Collector(),
                                          reactor=self.clock, metrics=self.metrics)
        self.wire = FakeDatagramTransport()
        self.manager.udp.makeConnection(self.wire)
        self.lines = []
        observer = lambda event: (event.get("log_namespace") == "activecall.sip.transport"
                                  and self.lines.append(event))
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def count(self, reason, transport="UDP"):
        return self.metrics.registry.get_sample_value("activecall_sip_malformed_total",
                                                      {"reason": reason, "transport": transport})

    def test_ten_thousand_malformed_datagrams(self):
        from twisted.logger import formatEvent

        for i in range(10_000):
            source = (f"198.51.100.{i % 50}", 5060 + i % 7)
            self.manager.udp.datagramReceived(b"\x16\x03\x01 not SIP %d\r\n\r\n" % i, source)
            if i == 5000:
                self.clock.advance(30)
        self.assertEqual(self.count("unparseable"), 10_000)
        self.assertEqual(self.manager.malformed[("unparseable", "UDP")], 10_000)
        self.assertEqual(len(self.lines), 1)  # the first one, at once
        self.clock.advance(30)  # the interval ends: one summary
        self.assertEqual(len(self.lines), 2)
        summary = formatEvent(self.lines[1])
        self.assertIn("dropped 9999 malformed SIP messages (unparseable, UDP) from 350 sources in the last 60 s",
                      summary)
        self.assertIn("e.g. from 198.51.100.1:5061: ", summary)
        self.clock.advance(60)  # a quiet interval: nothing to say, and the timer stops
        self.assertEqual(len(self.lines), 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.manager.udp.datagramReceived(b"garbage again", ("203.0.113.1", 1))
        self.assertEqual(len(self.lines), 3)  # after a quiet interval the next one shows at once
        self.assertEqual(self.wire.written, [])
        self.manager.malformed_log.stop()

    def test_each_reason_is_counted_and_summarised_on_its_own(self):
        from twisted.logger import formatEvent

        bad_cseq = INVITE.replace(b"1 INVITE", b"1 BYE")
        for _ in range(100):
            self.manager.udp.datagramReceived(bad_cseq, ("198.51.100.7", 7777))
            self.manager.udp.datagramReceived(b"\x00\x01junk\r\n\r\n", ("198.51.100.8", 7777))
        self.assertEqual(self.count("bad_request"), 100)
        self.assertEqual(self.count("unparseable"), 100)
        self.assertEqual(len(self.wire.written), 100)  # every answerable one still gets its 400
        self.assertEqual(len(self.lines), 2)
        self.manager.stopService()  # logs what is pending and stops the timer
        self.assertEqual(len(self.lines), 4)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        text = "\n".join(formatEvent(e) for e in self.lines)
        self.assertIn("dropped 99 malformed SIP messages (bad_request, UDP) from 1 sources", text)
        self.assertNotIn("\x00", text)

    def test_a_stream_losing_its_framing_is_counted(self):
        proto = t.SIPStreamProtocol(self.manager, "TCP")
        wire = StringTransport(peerAddress=IPv4Address("TCP", "198.51.100.7", 40000))
        proto.makeConnection(wire)
        proto.dataReceived(b"INVITE sip:x SIP/2.0\r\nContent-Length: -5\r\n\r\n")
        self.assertTrue(wire.disconnecting)
        self.assertEqual(self.count("framing", "TCP"), 1)
        self.assertEqual(len(self.lines), 1)
        self.manager.malformed_log.stop()

    def test_the_transaction_layer_reports_through_the_transport(self):
        from activecall.sip.transaction import TransactionLayer

        layer = TransactionLayer(self.manager, reactor=self.clock)
        for _ in range(1000):
            msg = parse_message(INVITE)
            msg.headers.remove_first("Via")  # parsed, then unusable to the transaction layer
            layer.message_received(msg, ("198.51.100.7", 7777), "UDP")
        self.assertEqual(self.count("invalid"), 1000)
        self.assertEqual(len(self.lines), 1)
        self.manager.malformed_log.stop()


class SummaryLogTests(unittest.TestCase):
    def test_bounded_lines_sources_and_reasons(self):
        from twisted.logger import Logger, formatEvent

        from activecall.logs import SummaryLog

        events = []
        clock = task.Clock()
        summary = SummaryLog(Logger(observer=events.append), clock, what="junk", interval=10,
                             max_sources=5, max_reasons=3)
        for i in range(1000):
            summary(f"r{i % 4}", (f"2001:db8::{i}", 9), "line\r\nforged: yes \x1b[31m" + "x" * 500)
        self.assertEqual(len(events), 4)  # r0, r1, r2 at once, and r3 folded into "other"
        self.assertIn("(other)", formatEvent(events[3]))
        clock.advance(10)
        texts = [formatEvent(e) for e in events]
        self.assertEqual(len(events), 8)  # one summary each
        self.assertTrue(all("\n" not in t and "\r" not in t and "\x1b" not in t for t in texts))
        self.assertTrue(all(len(t) < 400 for t in texts))
        self.assertIn("dropped 249 junk (r0) from 5+ sources in the last 10 s", texts[4])
        self.assertIn("[2001:db8::", texts[0])
        summary.stop()
        self.assertEqual(clock.getDelayedCalls(), [])
