"""RFC 4475 (SIP torture test messages) against the parser and the user agent.

The messages are ``tests/data/rfc4475/<name>.dat``, byte for byte (CRLF line ends); ``EXPECTED``
says, per message, its RFC section, whether ``parse_message`` takes it, and what the UA answers
when it arrives over UDP through the transport's receive path (``None``: nothing is sent).
"""

import dataclasses
import os

from twisted.internet import task
from twisted.trial import unittest

from activecall.config import load_config
from activecall.sip.message import (
    SIPParseError,
    Request,
    Response,
    Target,
    Via,
    format_host,
    make_request,
    parse_address,
    parse_message,
)
from activecall.sip.transport import TransportManager
from activecall.sip.useragent import UserAgent
from activecall.testing import FakeDatagramTransport

DATA = os.path.join(os.path.dirname(__file__), "data", "rfc4475")
PEER = ("192.0.2.10", 5070)
US = "192.0.2.20"

#: name -> (RFC 4475 section, parse outcome, answer).  parse: "ok" (a Request/Response), "400"
#: (SIPParseError that can be answered) or "drop" (SIPParseError that cannot).  answer: the final
#: status the UA sends (INVITEs that reach the invite handler get the test handler's 486), or None.
EXPECTED = {
    # 3.1.1 valid messages: parsed and processed
    "wsinv": ("3.1.1.1", "ok", 481),       # To-tag: a dialog we do not have
    "intmeth": ("3.1.1.2", "ok", 501),     # unknown method
    "esc01": ("3.1.1.3", "ok", 486),
    "escnull": ("3.1.1.4", "ok", 405),     # REGISTER: we are no registrar
    "esc02": ("3.1.1.5", "ok", 501),       # RE%47IST%45R is not REGISTER
    "lwsdisp": ("3.1.1.6", "ok", 200),
    "longreq": ("3.1.1.7", "ok", 486),
    "dblreq": ("3.1.1.8", "ok", 405),      # the REGISTER; the INVITE after it is discarded
    "semiuri": ("3.1.1.9", "ok", 200),
    "transports": ("3.1.1.10", "ok", 200),
    "mpart01": ("3.1.1.11", "ok", 405),  # an out-of-dialog MESSAGE; no message handler here: 405 (docs/sip.md)
    "unreason": ("3.1.1.12", "ok", None),  # a response matching nothing: dropped
    "noreason": ("3.1.1.13", "ok", None),
    # 3.1.2 invalid messages: 400 where a response can be formed, else dropped
    "badinv01": ("3.1.2.1", "400", 400),
    "clerr": ("3.1.2.2", "400", 400),
    "ncl": ("3.1.2.3", "400", 400),
    "scalar02": ("3.1.2.4", "400", 400),
    "scalarlg": ("3.1.2.5", "drop", None),
    "quotbal": ("3.1.2.6", "400", 400),
    "ltgtruri": ("3.1.2.7", "400", 400),
    "lwsruri": ("3.1.2.8", "400", 400),
    "lwsstart": ("3.1.2.9", "400", 400),
    "trws": ("3.1.2.10", "400", 400),
    "escruri": ("3.1.2.11", "400", 400),
    "baddate": ("3.1.2.12", "ok", 486),    # the Date is not ours to judge: processed
    "regbadct": ("3.1.2.13", "400", 400),
    "badaspec": ("3.1.2.14", "400", 400),
    "baddn": ("3.1.2.15", "400", 400),
    "badvers": ("3.1.2.16", "ok", 505),
    "mismatch01": ("3.1.2.17", "400", 400),
    "mismatch02": ("3.1.2.18", "ok", 501),  # the RFC prefers 501 to 400 here
    "bigcode": ("3.1.2.19", "drop", None),
    # 3.2 transaction layer
    "badbranch": ("3.2.1", "ok", 200),
    # 3.3 application layer
    "insuf": ("3.3.1", "400", 400),
    "unkscm": ("3.3.2", "ok", 416),
    "novelsc": ("3.3.3", "ok", 416),
    "unksm2": ("3.3.4", "ok", 405),
    "bext01": ("3.3.5", "ok", 420),
    "invut": ("3.3.6", "ok", 415),
    "regaut01": ("3.3.7", "ok", 405),
    "multi01": ("3.3.8", "400", 400),
    "mcl01": ("3.3.9", "400", 400),
    "bcast": ("3.3.10", "ok", None),
    "zeromf": ("3.3.11", "ok", 200),
    "cparam01": ("3.3.12", "ok", 405),
    "cparam02": ("3.3.13", "ok", 405),
    "regescrt": ("3.3.14", "ok", 405),
    "sdp01": ("3.3.15", "ok", 406),
    # 3.4 backward compatibility
    "inv2543": ("3.4.1", "ok", 486),
}


def load(name: str) -> bytes:
    with open(os.path.join(DATA, name + ".dat"), "rb") as f:
        return f.read()


class FakeNet:
    """The UA's transport: what it sends is kept as objects (some answers, e.g. insuf's 400,
    lack From/To on purpose and would not parse back)."""

    advertised_host = US

    def __init__(self):
        self.sent: list = []

    def local_via(self, transport="UDP"):
        return Via(transport, US, 5060, {"rport": None})

    def contact_uri(self, user=None, transport="UDP"):
        return f"sip:{user + '@' if user else ''}{format_host(US)}:5060"

    def send_request(self, request, target):
        self.sent.append(request)

    def send_response(self, response, source):
        self.sent.append(response)


class Harness:
    """A UA behind the transport's UDP receive path (parse, 400 or drop, Via stamping)."""

    def __init__(self):
        self.clock = task.Clock()
        cfg, _ = load_config(None, None)
        self.config = dataclasses.replace(cfg, addr=US, udp_port=5060)
        self.net = FakeNet()
        self.ua = UserAgent(self.config, self.net, reactor=self.clock)
        self.calls = []

        def handler(call):
            self.calls.append(call)
            call.reject(486)

        self.ua.invite_handler = handler
        self.manager = TransportManager(self.config, on_message=self.ua.layer.message_received, reactor=self.clock)
        self.wire = FakeDatagramTransport()
        self.manager.udp.transport = self.wire

    def receive(self, data: bytes, source=PEER) -> None:
        self.manager.udp.datagramReceived(data, source)

    def answers(self) -> list:
        """Every response sent: the transport's 400s (parsed back) and the UA's."""
        parsed = []
        for data, _ in self.wire.written:
            head = data.split(b"\r\n", 1)[0].split(b" ")
            parsed.append(int(head[1]))
        return parsed + [m.status for m in self.net.sent if isinstance(m, Response)]

    def final(self):
        finals = [status for status in self.answers() if status >= 200]
        return finals[-1] if finals else None


def _parse_test(name, section, outcome):
    def test(self):
        data = load(name)
        if outcome == "ok":
            msg = parse_message(data)
            self.assertIsInstance(msg, (Request, Response))
            check = getattr(self, f"check_{name}", None)
            if check is not None:
                check(msg)
        else:
            err = self.assertRaises(SIPParseError, parse_message, data)
            self.assertEqual(err.can_respond, outcome == "400", err.reason)
            self.assertNotIn("unparsable message", err.reason)  # never the catch-all

    test.__name__ = f"test_{section.replace('.', '_')}_{name}"
    test.__doc__ = f"RFC 4475 §{section} {name}: parse_message -> {outcome}"
    return test


def _answer_test(name, section, status):
    def test(self):
        h = Harness()
        h.receive(load(name))
        self.assertEqual(h.final(), status, f"answers: {h.answers()}")
        check = getattr(self, f"check_{name}", None)
        if check is not None:
            check(h)

    test.__name__ = f"test_{section.replace('.', '_')}_{name}"
    test.__doc__ = f"RFC 4475 §{section} {name}: the UA answers {status}"
    return test


class CorpusTests(unittest.TestCase):
    def test_every_message_is_there_once(self):
        on_disk = sorted(f[:-4] for f in os.listdir(DATA) if f.endswith(".dat"))
        self.assertEqual(on_disk, sorted(EXPECTED))
        self.assertEqual(len(on_disk), 49)

    def test_crlf_line_ends(self):
        for name in EXPECTED:
            data = load(name)
            head = data.split(b"\r\n\r\n", 1)[0]
            self.assertNotIn(b"\n", head.replace(b"\r\n", b""), name)

    def test_readme_names_every_message(self):
        with open(os.path.join(DATA, "README.md"), encoding="utf-8") as f:
            readme = f.read()
        for name, (section, _, _) in EXPECTED.items():
            self.assertIn(f"`{name}.dat`", readme)
            self.assertIn(section, readme)


class ParserTests(unittest.TestCase):
    """parse_message on each message: taken, refused answerably (400) or refused (dropped)."""

    def check_wsinv(self, msg):
        self.assertEqual(msg.method, "INVITE")
        self.assertEqual(msg.uri.params, {"unknownparam": None})
        self.assertEqual(msg.cseq.seq, 9)
        self.assertEqual(msg.headers.get("Max-Forwards"), "0068")
        self.assertEqual(msg.to.tag, "1918181833n")
        self.assertEqual(msg.from_.display_name, 'J Rosenberg \\"')
        self.assertEqual(msg.from_.tag, "98asjd8")
        self.assertEqual([v.host for v in msg.vias], ["192.0.2.2", "spindle.example.com", "192.168.255.111"])
        self.assertEqual(msg.vias[2].branch, "z9hG4bK30239")
        self.assertEqual(msg.headers.get("Subject"), "")
        self.assertEqual(msg.headers.get("NewFangledHeader"), "newfangled value continued newfangled value")
        self.assertEqual(msg.headers.get("UnknownHeaderWithUnusualValue"), ";;,,;;,;")
        contact = msg.contacts[0]
        self.assertEqual(contact.display_name, 'Quoted string ""')
        self.assertEqual(contact.params, {"newparam": "newvalue", "secondparam": None, "q": "0.33"})
        self.assertEqual(len(msg.body), 150)

    def check_intmeth(self, msg):
        self.assertEqual(msg.method.lower(), "!interesting-method0123456789_*+`.%indeed'~")
        self.assertEqual(msg.uri.user, "1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*")
        self.assertEqual(msg.uri.password, "&it+has=1,weird!*pas$wo~d_too.(doesn't-it)")
        self.assertEqual(msg.uri.host, "example.com")
        self.assertEqual(msg.to.display_name, "BEL:\x07 NUL:\x00 DEL:\x7f")
        self.assertEqual(msg.from_.display_name, "token1~` token2'+_ token3*%!.-")
        self.assertEqual(msg.from_.params["fromparam''~+*_!.-%"], '"работающий"')
        self.assertEqual(msg.headers.get("extensionHeader-!.%*+_`'~"), "\ufeff大停電")
        self.assertEqual(msg.call_id, "intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{")

    def check_esc01(self, msg):
        self.assertEqual(msg.uri.user, "sips:user@example.com")
        self.assertEqual(msg.to.uri.user, "user")
        self.assertEqual(msg.from_.uri.user, "I have spaces")
        self.assertEqual(msg.contacts[0].uri.user, "caller")

    def check_escnull(self, msg):
        self.assertEqual(msg.to.uri.user, "null-\x00-null")
        self.assertEqual([c.uri.user for c in msg.contacts], ["\x00", "\x00\x00"])

    def check_esc02(self, msg):
        self.assertEqual(msg.method, "RE%47IST%45R")
        self.assertEqual(msg.to.display_name, "%Z%45")
        self.assertEqual(len(msg.contacts), 2)  # C%6Fntact is another header

    def check_lwsdisp(self, msg):
        self.assertEqual(msg.from_.display_name, "caller")

    def check_longreq(self, msg):
        self.assertEqual(len(msg.vias), 34)
        self.assertEqual(msg.to.uri.port, 6000)
        self.assertEqual(len(msg.from_.tag), 155)
        self.assertEqual(len(msg.body), 150)

    def check_dblreq(self, msg):
        self.assertEqual(msg.method, "REGISTER")
        self.assertEqual(msg.body, b"")

    def check_semiuri(self, msg):
        self.assertEqual((msg.uri.user, msg.uri.host), ("user;par=u@example.net", "example.com"))
        self.assertEqual(msg.uri.params, {})
        self.assertEqual(len(msg.headers.get_all("Accept")), 6)

    def check_transports(self, msg):
        self.assertEqual([v.transport for v in msg.vias], ["UDP", "SCTP", "TLS", "UNKNOWN", "TCP"])

    def check_mpart01(self, msg):
        self.assertEqual(len(msg.body), 553)
        self.assertTrue(msg.body.startswith(b"--7a9cbec02ceef655\r\n"))

    def check_unreason(self, msg):
        self.assertEqual(msg.status, 200)
        self.assertEqual(msg.reason, "= 2**3 * 5**2 но сто девяносто девять - простое")

    def check_noreason(self, msg):
        self.assertEqual((msg.status, msg.reason), (100, ""))

    def check_badvers(self, msg):
        self.assertEqual(msg.version, "SIP/7.0")

    def check_mismatch02(self, msg):
        self.assertEqual((msg.method, msg.cseq.method), ("NEWMETHOD", "INVITE"))

    def check_badbranch(self, msg):
        self.assertEqual(msg.top_via.branch, "z9hG4bK")

    def check_unkscm(self, msg):
        self.assertEqual((msg.uri.scheme, msg.uri.opaque), ("nobodyknowsthisscheme", "totallyopaquecontent"))

    def check_novelsc(self, msg):
        self.assertEqual(str(msg.uri), "soap.beep://192.0.2.103:3002")

    def check_unksm2(self, msg):
        self.assertEqual(str(msg.to.uri), "isbn:2983792873")
        self.assertEqual(str(msg.from_.uri), "http://www.example.com")
        self.assertEqual(msg.from_.tag, "3234233")
        self.assertEqual(str(msg.contacts[0].uri), "name:John_Smith")

    def check_zeromf(self, msg):
        self.assertEqual(msg.headers.get("Max-Forwards"), "0")

    def check_cparam01(self, msg):
        contact = msg.contacts[0]
        self.assertEqual((contact.uri.params, contact.params), ({}, {"unknownparam": None}))

    def check_cparam02(self, msg):
        contact = msg.contacts[0]
        self.assertEqual((contact.uri.params, contact.params), ({"unknownparam": None}, {}))

    def check_regescrt(self, msg):
        self.assertEqual(msg.contacts[0].uri.headers, {"Route": "%3Csip:sip.example.com%3E"})

    def check_inv2543(self, msg):
        self.assertIsNone(msg.top_via.branch)
        self.assertIsNone(msg.from_.tag)
        self.assertNotIn("Max-Forwards", msg.headers)
        self.assertTrue(msg.body.endswith(b"m=audio 49217 RTP/AVP 0\r\n"))


class AnswerTests(unittest.TestCase):
    """Each message over UDP into the transport's receive path and the UA: the final answer."""

    def check_esc01(self, h):
        (call,) = h.calls
        self.assertEqual(call.callee, "sip:user@example.com")
        self.assertEqual(call.caller, "sip:I%20have%20spaces@example.net")

    def check_intmeth(self, h):
        (response,) = [m for m in h.net.sent if isinstance(m, Response)]
        self.assertIn("INVITE", response.headers.get("Allow"))
        # the odd To (control characters in its quoted display name) is echoed as it came
        self.assertIn("NUL:\\\x00", response.headers.get("To"))

    def check_escnull(self, h):
        (response,) = [m for m in h.net.sent if isinstance(m, Response)]
        self.assertNotIn("REGISTER", response.headers.get("Allow"))

    def check_bext01(self, h):
        (response,) = [m for m in h.net.sent if isinstance(m, Response)]
        self.assertEqual(response.headers.get("Unsupported"), "nothingSupportsThis, nothingSupportsThisEither")

    def check_invut(self, h):
        (response,) = [m for m in h.net.sent if isinstance(m, Response) and m.status >= 200]
        self.assertEqual(response.headers.get("Accept"), "application/sdp")
        self.assertEqual(h.calls, [])

    def check_sdp01(self, h):
        (response,) = [m for m in h.net.sent if isinstance(m, Response) and m.status >= 200]
        self.assertTrue(response.headers.get("Warning").startswith("399 "))

    def check_insuf(self, h):
        ((data, addr),) = h.wire.written
        self.assertEqual(addr, PEER)
        self.assertIn(b"\r\nCSeq: 193942 INVITE\r\n", data)
        self.assertNotIn(b"\r\nFrom:", data)

    def check_inv2543(self, h):
        (call,) = h.calls
        self.assertEqual(str(call.dialog.remote_target), "sip:+13035551111@ift.client.example.net;user=phone")

    def check_scalar02(self, h):
        ((data, _),) = h.wire.written
        self.assertIn(b"CSeq: 36893488147419103232 REGISTER", data)  # echoed as it came


for _name, (_section, _outcome, _status) in EXPECTED.items():
    _t = _parse_test(_name, _section, _outcome)
    setattr(ParserTests, _t.__name__, _t)
    _t = _answer_test(_name, _section, _status)
    setattr(AnswerTests, _t.__name__, _t)


def request_bytes(method="OPTIONS", uri=f"sip:bot@{US}", cseq=None, to="<sip:bot@example.com>", extra=(),
                  branch="z9hG4bK-x1", version="SIP/2.0") -> bytes:
    lines = [f"{method} {uri} {version}", f"Via: SIP/2.0/UDP {PEER[0]}:{PEER[1]};branch={branch}",
             "From: <sip:alice@example.com>;tag=a1", f"To: {to}", "Call-ID: rfc4475-extra",
             f"CSeq: {cseq or '1 ' + method}", "Max-Forwards: 70", *extra, "Content-Length: 0"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class BeyondTheCorpusTests(unittest.TestCase):
    """The cases of issue 18 around the corpus: scalars, schemes, methods, transactions."""

    def final_for(self, data):
        h = Harness()
        h.receive(data)
        return h.final()

    def test_max_forwards_over_255(self):
        self.assertEqual(self.final_for(request_bytes().replace(b"Max-Forwards: 70", b"Max-Forwards: 300")), 400)
        self.assertEqual(self.final_for(request_bytes().replace(b"Max-Forwards: 70", b"Max-Forwards: 255")), 200)

    def test_expires_beyond_32_bits(self):
        self.assertEqual(self.final_for(request_bytes(extra=["Expires: 4294967296"])), 400)
        self.assertEqual(self.final_for(request_bytes(extra=["Expires: 4294967295"])), 200)
        self.assertEqual(self.final_for(request_bytes(extra=["Expires: -1"])), 400)

    def test_cseq_from_2_to_the_31(self):
        self.assertEqual(self.final_for(request_bytes(cseq="2147483648 OPTIONS")), 400)
        self.assertEqual(self.final_for(request_bytes(cseq="2147483647 OPTIONS")), 200)

    def test_content_length_negative_or_huge(self):
        for value in (b"-1", b"99999999999", b"4294967296"):
            self.assertEqual(self.final_for(request_bytes().replace(b"Content-Length: 0", b"Content-Length: " + value)),
                             400)

    def test_raw_non_utf8_bytes_in_the_request_uri(self):
        data = request_bytes().replace(b"sip:bot@", b"sip:b\xff\xfeot@")
        self.assertTrue(self.assertRaises(SIPParseError, parse_message, data).can_respond)
        self.assertEqual(self.final_for(data), 400)

    def test_each_single_valued_header_twice(self):
        for header in (b"From: <sip:eve@example.com>;tag=e", b"To: <sip:x@example.com>", b"Call-ID: other",
                       b"CSeq: 2 OPTIONS", b"Max-Forwards: 69"):
            data = request_bytes().replace(b"Content-Length", header + b"\r\nContent-Length")
            self.assertEqual(self.final_for(data), 400, header)

    def test_to_with_an_unknown_scheme_is_processed(self):
        self.assertEqual(self.final_for(request_bytes(to="<nobodyknows:anything>")), 200)
        h = Harness()
        h.receive(request_bytes("INVITE", to="<nobodyknows:anything>",
                                extra=[f"Contact: <sip:alice@{PEER[0]}:{PEER[1]}>"]))
        (call,) = h.calls
        self.assertEqual(call.callee, "nobodyknows:anything")
        self.assertEqual(h.final(), 486)

    def test_unknown_scheme_request_uri_is_416_for_any_method(self):
        for method in ("INVITE", "OPTIONS", "MESSAGE"):
            self.assertEqual(self.final_for(request_bytes(method, uri="urn:service:sos")), 416, method)

    def test_known_but_not_allowed_methods_get_405_with_allow(self):
        for method in ("REGISTER", "SUBSCRIBE", "PUBLISH"):
            h = Harness()
            h.receive(request_bytes(method))
            (response,) = h.net.sent
            self.assertEqual(response.status, 405, method)
            self.assertIn("INVITE", response.headers.get("Allow"))

    def test_unknown_method_in_a_dialog_is_501_too(self):
        h = Harness()
        h.receive(request_bytes("NEWMETHOD", to="<sip:bot@example.com>;tag=nosuchdialog"))
        self.assertEqual(h.final(), 501)

    def test_unknown_method_transaction(self):
        """A retransmission gets the same 501 again; a CANCEL for it 200 (no effect, RFC 3261 §9.2)."""
        h = Harness()
        data = request_bytes("NEWMETHOD")
        h.receive(data)
        h.receive(data)
        self.assertEqual(h.answers(), [501, 501])
        self.assertEqual(len(h.ua.layer.server_transactions), 1)
        h.receive(request_bytes("CANCEL"))
        self.assertEqual(h.answers(), [501, 501, 200])
        h.receive(request_bytes("CANCEL", branch="z9hG4bK-none"))
        self.assertEqual(h.answers()[-1], 481)

    def test_acks_are_never_answered(self):
        for data in (request_bytes("ACK"), request_bytes("ACK", uri="nobodyknows:x"),
                     request_bytes("ACK", version="SIP/7.0"), request_bytes("ACK", to="<sip:b@h>;tag=t")):
            h = Harness()
            h.receive(data)
            self.assertEqual(h.answers(), [], data)

    def test_version_505_for_every_method_but_ack(self):
        for method in ("INVITE", "OPTIONS", "NEWMETHOD", "CANCEL"):
            self.assertEqual(self.final_for(request_bytes(method, version="SIP/3.0")), 505, method)

    def test_responses_of_another_version_are_dropped(self):
        data = b"SIP/3.0 200 OK" + load("bcast").split(b"\r\n", 1)[1]
        self.assertFalse(self.assertRaises(SIPParseError, parse_message, data).can_respond)

    def test_bcast_does_not_complete_our_transaction(self):
        """RFC 3261 §8.1.3.3: the UAC discards a response with more than one Via (RFC 4475 §3.3.10)."""
        h = Harness()
        invite = make_request(
            "INVITE", "sip:user@example.edu", via=Via("UDP", "192.0.2.198", None, {"branch": "z9hG4bK1324923"}),
            from_=parse_address("sip:user@example.com;tag=11141343"), to=parse_address("sip:user@example.edu"),
            call_id="bcast.0384840201234ksdfak3j2erwedfsASdf", cseq=35,
            contact=parse_address("<sip:user@192.0.2.198>"))
        txn = h.ua.layer.send_request(invite, Target("192.0.2.1", 5060))
        h.receive(load("bcast"))
        self.assertFalse(txn.final.called)
        # the same 200 with our one Via does complete it
        one_via = load("bcast").replace(b"Via: SIP/2.0/UDP 255.255.255.255;branch=z9hG4bK1saber23\r\n", b"")
        h.receive(one_via)
        self.assertEqual(self.successResultOf(txn.final).status, 200)
        txn.final.addErrback(lambda f: None)
        h.ua.layer.stop()

    def test_contact_required_unless_rfc2543(self):
        h = Harness()
        h.receive(request_bytes("INVITE"))
        self.assertEqual(h.final(), 400)
        self.assertEqual(h.calls, [])

    def test_multipart_or_optional_bodies_are_not_415(self):
        h = Harness()
        h.receive(request_bytes("INVITE", extra=[f"Contact: <sip:alice@{PEER[0]}>",
                                                 "Content-Type: application/isup",
                                                 "Content-Disposition: signal;handling=optional"])
                  .replace(b"Content-Length: 0\r\n\r\n", b"Content-Length: 4\r\n\r\nabcd"))
        self.assertEqual(h.final(), 486)
