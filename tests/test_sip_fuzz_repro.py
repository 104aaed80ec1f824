"""Regression tests for the reproducers in bench/fuzz_repro/ (issue 18), each with its own bytes,
parsed in-process or sent through the UDP transport and the UA over in-memory transports."""

import os

from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest

from activecall.sip import sdp, session_timer
from activecall.sip import transport as t
from activecall.sip.digits import is_number
from activecall.sip.message import (
    SIPParseError, make_response, message_length, parse_message, split_head,
)
from activecall.sip.useragent import UserAgent
from tests.helpers import ROOT
from tests.test_sip_transport import FakeDatagramTransport, manager
from tests.test_sip_useragent import Harness, config, peer_request

REPRO = os.path.join(ROOT, "bench", "fuzz_repro")
SOURCE = ("198.51.100.7", 5070)


def repro(prefix: str) -> bytes:
    name, = [n for n in os.listdir(REPRO) if n.startswith(prefix + "-")]
    with open(os.path.join(REPRO, name), "rb") as f:
        return f.read()


class Failures:
    """Log events at error level or with a traceback, collected for the test's duration."""

    def __init__(self, testcase):
        self.events = []
        observer = lambda e: (e.get("log_failure") is not None or e.get("log_level") in (LogLevel.error,
                                                                                          LogLevel.critical)) \
            and self.events.append(e)
        globalLogPublisher.addObserver(observer)
        testcase.addCleanup(globalLogPublisher.removeObserver, observer)


class DigitsTests(unittest.TestCase):
    def test_ascii_digits_only(self):
        for text in ("0", "5060", "0042"):
            self.assertTrue(is_number(text))
        for text in ("", "\u00b2", "\u0665", "1\u00b2", "+1", "-1", " 1", "1.0", "\uff11"):
            self.assertFalse(is_number(text), text)


class UnicodeDigitTests(unittest.TestCase):
    """01, 02: '²' in CSeq or Content-Length is a SIPParseError the parser raises on purpose."""

    def assert_deliberate_400(self, data):
        with self.assertRaises(SIPParseError) as caught:
            parse_message(data)
        self.assertIsNone(caught.exception.__cause__)
        self.assertTrue(caught.exception.can_respond)
        return caught.exception

    def test_01_cseq(self):
        self.assertIn("CSeq", self.assert_deliberate_400(repro("01")).reason)

    def test_02_content_length(self):
        self.assertIn("Content-Length", self.assert_deliberate_400(repro("02")).reason)

    def test_02_content_length_frames_no_stream(self):
        with self.assertRaises(SIPParseError):
            message_length(repro("02"))

    def test_02_over_tcp_closes_the_connection(self):
        m = manager(task.Clock())
        proto = t.SIPStreamProtocol(m, "TCP")
        wire = StringTransport(peerAddress=IPv4Address("TCP", *SOURCE))
        proto.makeConnection(wire)
        proto.dataReceived(repro("02"))  # must not raise into the reactor
        self.assertTrue(wire.disconnecting)
        self.assertEqual(m.malformed[("framing", "TCP")], 1)
        m.malformed_log.stop()

    def test_other_numbers(self):
        base = repro("13").replace(b"\xe9", b"x")
        for old, new in ((b"Max-Forwards: 70", "Max-Forwards: \u0667\u0660".encode()),
                         (b"CSeq: 1 OPTIONS", "CSeq: \u0661 OPTIONS".encode()),
                         (b"127.0.0.1:5070;branch", "127.0.0.1:\u0665\u0660\u0667\u0660;branch".encode())):
            data = base.replace(old, new)
            self.assertNotEqual(data, base)
            with self.assertRaises(SIPParseError) as caught:
                parse_message(data)
            self.assertIsNone(caught.exception.__cause__)

    def test_udp_gets_a_400(self):
        m = manager(task.Clock())
        wire = FakeDatagramTransport()
        m.udp.makeConnection(wire)
        for prefix in ("01", "02"):
            m.udp.datagramReceived(repro(prefix), SOURCE)
        self.assertEqual([d.split(b" ", 2)[1] for d, _ in wire.written], [b"400", b"400"])  # echoes the bad CSeq
        m.malformed_log.stop()


class PtimeTests(unittest.TestCase):
    """03: a=ptime:inf (nan, 1e400, huge) is ignored, never an OverflowError."""

    def test_03_ptime_inf(self):
        _, body = split_head(repro("03"))
        session = sdp.parse(body)
        self.assertIsNone(session.media[0].ptime)

    def test_other_ptimes(self):
        _, body = split_head(repro("03"))
        for value, expected in ((b"nan", None), (b"-inf", None), (b"1e400", None), (b"9" * 400, None),
                                (b"20", 20), (b"30.0", 30)):
            session = sdp.parse(body.replace(b"a=ptime:inf", b"a=ptime:" + value))
            self.assertEqual(session.media[0].ptime, expected, value)


class BadHeaderTests(unittest.TestCase):
    """08-11 and their kin: a bad header on a request path is a 400 with a short reason, no traceback."""

    def setUp(self):
        self.failures = Failures(self)

    def deliver_raw(self, h, data):
        h.ua.layer.message_received(parse_message(data), ("127.0.0.1", 5070), "UDP")
        return h.net.last()

    def test_08_09_contact_is_a_400_from_the_transport(self):
        m = manager(task.Clock())
        wire = FakeDatagramTransport()
        m.udp.makeConnection(wire)
        for prefix in ("08", "09"):
            m.udp.datagramReceived(repro(prefix), SOURCE)
        reasons = [parse_message(d) for d, _ in wire.written]
        self.assertEqual([r.status for r in reasons], [400, 400])
        self.assertIn("port out of range", reasons[0].reason)
        self.assertIn("junk after", reasons[1].reason)
        self.assertEqual(m.on_message.messages, [])
        m.malformed_log.stop()

    def test_10_session_expires(self):
        h = Harness(self)
        response = self.deliver_raw(h, repro("10"))
        self.assertEqual(response.status, 400)
        self.assertIn("Session-Expires", response.reason)
        self.assertEqual(h.calls, [])
        self.assertEqual(self.failures.events, [])

    def test_11_min_se(self):
        h = Harness(self)
        response = self.deliver_raw(h, repro("11"))
        self.assertEqual(response.status, 400)
        self.assertIn("Min-SE", response.reason)
        self.assertEqual(h.calls, [])
        self.assertEqual(self.failures.events, [])

    def test_min_se_parser(self):
        msg = peer_request("INVITE", extra=["Min-SE: \u00b2"])
        with self.assertRaises(SIPParseError):
            session_timer._min_se_of(msg)
        self.assertEqual(session_timer._min_se_of(peer_request("INVITE")), 0)
        self.assertEqual(session_timer._min_se_of(peer_request("INVITE", extra=["Min-SE: 120"])), 120)

    def test_host_names_too_long_for_dns(self):
        # found by the seed-1 medium run: a Via or Contact host with a 64-character label reached
        # getaddrinfo, whose IDNA step raised inside Twisted's resolver ("Unhandled error in Deferred")
        label = "a" * 64
        with self.assertRaises(SIPParseError) as caught:
            peer_request("INVITE", extra=[f"Record-Route: <sip:{label}.example.com;lr>"])
        self.assertTrue(caught.exception.can_respond)
        data = repro("13").replace(b"Via: SIP/2.0/UDP 127.0.0.1:5070", b"Via: SIP/2.0/UDP " + label.encode() + b":5070")
        with self.assertRaises(SIPParseError) as caught:
            parse_message(data)
        self.assertFalse(caught.exception.can_respond)  # nowhere to send a 400: dropped
        long_name = ".".join(["a" * 60] * 5)  # labels fine, 304 characters
        with self.assertRaises(SIPParseError):
            peer_request("INVITE", extra=[f"Contact: <sip:{long_name}>"])
        peer_request("INVITE", extra=[f"Contact: <sip:{'a' * 63}.example.com>"])

    def test_record_route_and_route(self):
        for header in ("Record-Route: <sip:p1.example.com;lr>//", "Route: <sip:p1.example.com:65536;lr>"):
            with self.assertRaises(SIPParseError) as caught:
                peer_request("INVITE", extra=[header])
            self.assertTrue(caught.exception.can_respond)

    def test_bad_refer_to_in_dialog(self):
        h = Harness(self)
        call, ok = h.established_inbound()
        refer = peer_request("REFER", call_id=ok.call_id, from_tag=ok.from_.tag, to_tag=ok.to.tag, cseq=2,
                             extra=["Refer-To: <sip:carol@example.com>junk"])
        h.deliver(refer)
        self.assertEqual(h.net.last().status, 400)
        self.assertEqual(h.net.last().reason, "Bad Refer-To")
        self.assertEqual(self.failures.events, [])

    def test_a_tu_parse_error_is_a_400_not_a_traceback(self):
        h = Harness(self)

        def broken(request, txn):
            raise SIPParseError("bad Whatever 'x'")

        h.ua.request_received = broken
        h.ua.layer.tu = h.ua
        h.deliver(peer_request("OPTIONS"))
        self.assertEqual(h.net.last().status, 400)
        self.assertEqual(h.net.last().reason, "Bad Request (bad Whatever 'x')")
        self.assertEqual(self.failures.events, [])


class ByteExactEchoTests(unittest.TestCase):
    """13: a request that is not valid UTF-8 gets a response echoing its header bytes exactly."""

    def test_13_parse_and_serialise(self):
        data = repro("13")
        request = parse_message(data)
        self.assertEqual(request.to_bytes(), data)
        response = make_response(request, 200).to_bytes()
        for name in (b"Call-ID", b"From", b"To", b"Via"):
            line = [ln for ln in data.split(b"\r\n") if ln.startswith(name + b":")][0]
            self.assertIn(line, response)

    def test_13_through_the_transport_and_ua(self):
        clock = task.Clock()
        m = manager(clock)
        wire = FakeDatagramTransport()
        m.udp.makeConnection(wire)
        ua = UserAgent(config(), m, reactor=clock)
        m.on_message = ua.layer.message_received
        data = repro("13")
        m.udp.datagramReceived(data, ("127.0.0.1", 5070))
        (sent, addr), = wire.written
        self.assertEqual(parse_message(sent).status, 200)
        call_id = [ln for ln in data.split(b"\r\n") if ln.startswith(b"Call-ID:")][0]
        self.assertIn(b"\xe9", call_id)  # Latin-1 e-acute: no UTF-8
        self.assertIn(call_id, sent)
        self.assertIn([ln for ln in data.split(b"\r\n") if ln.startswith(b"From:")][0], sent)
        ua.layer.stop()
        m.malformed_log.stop()

    def test_only_lws_is_stripped_from_a_value(self):
        # found by the seed-1 medium run: str.strip() took a trailing \x1d off the Call-ID
        data = repro("13").replace(b"Call-ID: repro12-\xe9-1@fuzz", b"Call-ID: repro12-1@fuzz\x1d")
        request = parse_message(data)
        self.assertEqual(request.call_id, "repro12-1@fuzz\x1d")
        self.assertIn(b"Call-ID: repro12-1@fuzz\x1d\r\n", make_response(request, 200).to_bytes())

    def test_non_utf8_request_uri_is_still_a_400(self):
        data = repro("13").replace(b"OPTIONS sip:agent@", b"OPTIONS sip:ag\xffent@")
        with self.assertRaises(SIPParseError) as caught:
            parse_message(data)
        self.assertTrue(caught.exception.can_respond)


class DatagramSizeTests(unittest.TestCase):
    """14: the 400 to a near-64 KB request fits in a datagram, or is not sent; never a traceback."""

    def setUp(self):
        self.failures = Failures(self)
        self.manager = manager(task.Clock())
        self.wire = FakeDatagramTransport()
        self.manager.udp.makeConnection(self.wire)

    def tearDown(self):
        self.manager.malformed_log.stop()

    def test_14_answered_within_a_datagram(self):
        self.manager.udp.datagramReceived(repro("14"), SOURCE)
        (sent, _), = self.wire.written
        self.assertLessEqual(len(sent), t.MAX_DATAGRAM)
        self.assertTrue(sent.startswith(b"SIP/2.0 400 Bad Request"))  # it echoes the bad From
        self.assertEqual(self.failures.events, [])

    def big_request(self, total):
        """A malformed request of ``total`` bytes, nearly all of it in its Via, without Content-Length
        (optional over UDP): its minimal 400 is a few bytes longer than itself."""
        lines = [b"OPTIONS sip:agent@127.0.0.1 SIP/2.0",
                 b"Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKbig;x=",
                 b"From: <sip:fuzz@127.0.0.1>;tag=t", b"To: <sip:agent@127.0.0.1>", b"Call-ID: big@fuzz",
                 b"CSeq: 1 INVITE"]  # does not match the method: 400
        pad = total - len(b"\r\n".join(lines) + b"\r\n\r\n")
        lines[1] += b"v" * pad
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def test_the_minimum_400_when_the_full_one_does_not_fit(self):
        data = self.big_request(65400)
        self.assertLessEqual(len(data), t.MAX_DATAGRAM)
        full = t.bad_request(_error(data))
        self.assertGreater(len(full.to_bytes()), t.MAX_DATAGRAM)
        self.manager.udp.datagramReceived(data, SOURCE)
        (sent, _), = self.wire.written
        self.assertLessEqual(len(sent), t.MAX_DATAGRAM)
        response = parse_message(sent)
        self.assertEqual((response.status, response.reason), (400, "Bad Request"))
        self.assertNotIn("Warning", response.headers)

    def test_dropped_when_even_the_minimum_does_not_fit(self):
        data = self.big_request(t.MAX_DATAGRAM)
        self.assertGreater(len(_minimal(data)), t.MAX_DATAGRAM)
        for _ in range(100):
            self.manager.udp.datagramReceived(data, SOURCE)
        self.assertEqual(self.wire.written, [])
        self.assertEqual(self.manager.malformed[("unparseable", "UDP")], 100)
        self.assertEqual(self.failures.events, [])

    def test_a_refused_send_is_summarised(self):
        lines = []
        observer = lambda e: e.get("log_namespace") == "activecall.sip.transport" and lines.append(e)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

        class Refusing:
            def write(self, data, addr):
                raise OSError("Message too long")

        self.manager.udp.transport = Refusing()
        for _ in range(100):
            self.manager.udp.datagramReceived(repro("01"), SOURCE)
        self.assertEqual(self.failures.events, [])
        self.assertLessEqual(len(lines), 2)  # the first bad_request and the first "400 not sent"


class ParserBugGuardTests(unittest.TestCase):
    """No catch-all in parse_message; the transport still keeps a parser bug from the reactor and
    logs its traceback once, not per datagram."""

    def test_parser_bug_logged_once(self):
        failures = Failures(self)
        m = manager(task.Clock())
        m.udp.makeConnection(FakeDatagramTransport())
        self.patch(t, "parse_message", lambda data, stream=False: 1 / 0)
        for _ in range(50):
            m.udp.datagramReceived(repro("13"), SOURCE)
        self.assertEqual(len(failures.events), 1)
        self.assertEqual(m.malformed[("unparseable", "UDP")], 50)
        self.flushLoggedErrors(ZeroDivisionError)
        m.malformed_log.stop()


def _minimal(data):
    return make_response(_error(data).partial, 400, "Bad Request").to_bytes()


def _error(data):
    try:
        parse_message(data)
    except SIPParseError as e:
        return e
    raise AssertionError("parsed")


