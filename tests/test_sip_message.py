"""SIP message parsing and serialisation (activecall.sip.message)."""

import random

from twisted.trial import unittest

from activecall.sip import message as m
from activecall.sip.message import SIPParseError

INVITE = (
    b"INVITE sip:bob@biloxi.example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP pc33.atlanta.example.com:5060;branch=z9hG4bK776asdhds;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b"To: Bob <sip:bob@biloxi.example.com>\r\n"
    b'From: "Alice, A." <sip:alice@atlanta.example.com;transport=tcp>;tag=1928301774\r\n'
    b"Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n"
    b"CSeq: 314159 INVITE\r\n"
    b"Contact: <sip:alice@pc33.atlanta.example.com>\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: 4\r\n"
    b"\r\n"
    b"v=0\n"
)

COMPACT = (
    b"BYE sip:bob@[2001:db8::1]:5070;transport=udp SIP/2.0\r\n"
    b"v: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKa,SIP/2.0/TCP proxy.example.com:5080\r\n"
    b" ;branch=z9hG4bKb;received=192.0.2.7\r\n"
    b"f: sip:alice@atlanta.example.com;tag=x\r\n"
    b"t: <sip:bob@biloxi.example.com>;tag=y\r\n"
    b"i: call-1\r\n"
    b"CSeq:\t2 BYE\r\n"
    b"k: timer, 100rel\r\n"
    b"m: <sip:a@h>;expires=30, \"Quoted, name\" <sip:b@h>\r\n"
    b"x: 1800\r\n"
    b"l: 0\r\n"
    b"\r\n"
)


class URITests(unittest.TestCase):
    def test_full_sip_uri(self):
        uri = m.parse_uri("sips:al%20ice:se%3Acret@Example.com:5061;transport=tls;lr?subject=hi&x=1")
        self.assertEqual(uri.scheme, "sips")
        self.assertEqual(uri.user, "al ice")
        self.assertEqual(uri.password, "se:cret")
        self.assertEqual(uri.host, "Example.com")
        self.assertEqual(uri.port, 5061)
        self.assertEqual(uri.params, {"transport": "tls", "lr": None})
        self.assertEqual(uri.transport, "TLS")
        self.assertEqual(uri.headers, {"subject": "hi", "x": "1"})
        self.assertEqual(
            str(uri), "sips:al%20ice:se%3Acret@Example.com:5061;transport=tls;lr?subject=hi&x=1"
        )

    def test_ipv6_host(self):
        uri = m.parse_uri("sip:[2001:DB8::1]:5070")
        self.assertEqual(uri.host, "2001:db8::1")
        self.assertEqual(uri.port, 5070)
        self.assertEqual(str(uri), "sip:[2001:db8::1]:5070")
        self.assertEqual(str(m.parse_uri("sip:u@[::1]")), "sip:u@[::1]")

    def test_user_with_semicolon_and_no_user(self):
        uri = m.parse_uri("sip:+1;phone-context=x@gw.example.com;user=phone")
        self.assertEqual(uri.user, "+1;phone-context=x")
        self.assertEqual(uri.params, {"user": "phone"})
        uri = m.parse_uri("sip:registrar.example.com")
        self.assertIsNone(uri.user)
        self.assertEqual(str(uri), "sip:registrar.example.com")

    def test_tel_uri(self):
        uri = m.parse_uri("tel:+1-201-555-0123;phone-context=example.com")
        self.assertEqual((uri.scheme, uri.user), ("tel", "+1-201-555-0123"))
        self.assertEqual(str(uri), "tel:+1-201-555-0123;phone-context=example.com")

    def test_bad_uris(self):
        for text in ("<sip:a@h>", "1http:x", "http:", "http:a b", "sip:", "sip:a@", "sip:a@h:99999", "sip:a@h:x", "sip:[::1",
                     "sip:a@[zz::1]", "sip:a%zz@h", "nocolon", "sip:a@h;=x", "sip:a@h o"):
            self.assertRaises(SIPParseError, m.parse_uri, text)

    def test_copy_is_independent(self):
        uri = m.parse_uri("sip:a@h;x=1")
        other = uri.copy(port=5080)
        other.params["y"] = "2"
        self.assertEqual(str(uri), "sip:a@h;x=1")
        self.assertEqual(str(other), "sip:a@h:5080;x=1;y=2")


class AddressTests(unittest.TestCase):
    def test_name_addr_keeps_uri_params_inside(self):
        a = m.parse_address('"Alice" <sip:alice@h;transport=tcp>;tag=x')
        self.assertEqual(a.display_name, "Alice")
        self.assertEqual(a.uri.params, {"transport": "tcp"})
        self.assertEqual(a.params, {"tag": "x"})
        self.assertEqual(a.tag, "x")
        self.assertEqual(str(a), '"Alice" <sip:alice@h;transport=tcp>;tag=x')

    def test_addr_spec_params_belong_to_header(self):
        a = m.parse_address("sip:a@h;tag=x")
        self.assertIsNone(a.display_name)
        self.assertEqual(a.uri.params, {})
        self.assertEqual(a.tag, "x")
        self.assertEqual(str(a), "<sip:a@h>;tag=x")

    def test_quoted_display_with_escapes_and_specials(self):
        a = m.parse_address(r'"Bob \"the\" <Boss>, Jr" <sip:bob@h>')
        self.assertEqual(a.display_name, 'Bob "the" <Boss>, Jr')
        self.assertEqual(m.parse_address(str(a)).display_name, a.display_name)

    def test_unquoted_display_name(self):
        a = m.parse_address("Bob Smith <sip:bob@h>;expires=60")
        self.assertEqual(a.display_name, "Bob Smith")
        self.assertEqual(a.params["expires"], "60")

    def test_wildcard(self):
        self.assertTrue(m.parse_address("*").wildcard)
        self.assertEqual(str(m.parse_address(" * ")), "*")

    def test_bad_addresses(self):
        for text in ('"open <sip:a@h>', "<sip:a@h", "<sip:a@h> junk", '"x" y <sip:a@h>', ""):
            self.assertRaises(SIPParseError, m.parse_address, text)


class ViaTests(unittest.TestCase):
    def test_via_fields(self):
        v = m.parse_via("SIP / 2.0 / tcp [2001:db8::9]:5080;branch=z9hG4bKx;rport=4000;received=1.2.3.4")
        self.assertEqual(v.transport, "TCP")
        self.assertEqual((v.host, v.port), ("2001:db8::9", 5080))
        self.assertEqual(v.branch, "z9hG4bKx")
        self.assertEqual(v.rport, 4000)
        self.assertEqual(v.received, "1.2.3.4")
        self.assertEqual(str(v), "SIP/2.0/TCP [2001:db8::9]:5080;branch=z9hG4bKx;rport=4000;received=1.2.3.4")

    def test_default_ports_and_empty_rport(self):
        v = m.parse_via("SIP/2.0/TLS host.example.com;rport;branch=z9hG4bK1")
        self.assertEqual(v.sent_by, ("host.example.com", 5061))
        self.assertTrue(v.wants_rport)
        self.assertIsNone(v.rport)
        self.assertEqual(m.parse_via("SIP/2.0/UDP h").sent_by, ("h", 5060))

    def test_bad_via(self):
        for text in ("SIP/2.0 h", "HTTP/1.1/UDP h", "SIP/2.0/UDP", "SIP/2.0/UDP h:port"):
            self.assertRaises(SIPParseError, m.parse_via, text)


class ParseTests(unittest.TestCase):
    def test_invite(self):
        msg = m.parse_message(INVITE)
        self.assertIsInstance(msg, m.Request)
        self.assertEqual(msg.method, "INVITE")
        self.assertEqual(str(msg.uri), "sip:bob@biloxi.example.com")
        self.assertEqual(msg.call_id, "a84b4c76e66710@pc33.atlanta.example.com")
        self.assertEqual(msg.cseq, m.CSeq(314159, "INVITE"))
        self.assertEqual(msg.from_.display_name, "Alice, A.")
        self.assertEqual(msg.from_.tag, "1928301774")
        self.assertIsNone(msg.to.tag)
        self.assertEqual(msg.top_via.branch, "z9hG4bK776asdhds")
        self.assertEqual(msg.content_type, "application/sdp")
        self.assertEqual(msg.body, b"v=0\n")

    def test_compact_folded_and_multi_value(self):
        msg = m.parse_message(COMPACT)
        self.assertEqual(msg.uri.host, "2001:db8::1")
        vias = msg.vias
        self.assertEqual(len(vias), 2)
        self.assertEqual(vias[1].branch, "z9hG4bKb")
        self.assertEqual(vias[1].received, "192.0.2.7")
        self.assertEqual(msg.call_id, "call-1")
        self.assertEqual(msg.headers.get_all("Supported"), ["timer", "100rel"])
        self.assertEqual([c.uri.user for c in msg.contacts], ["a", "b"])
        self.assertEqual(msg.contacts[1].display_name, "Quoted, name")
        self.assertEqual(msg.headers.get("Session-Expires"), "1800")
        self.assertEqual(msg.headers.get("i"), "call-1")
        self.assertEqual(msg.body, b"")

    def test_response(self):
        data = (
            b"SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:a@h>;tag=1\r\n"
            b"To: <sip:b@h>;tag=2\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\n\r\n"
        )
        msg = m.parse_message(data)
        self.assertIsInstance(msg, m.Response)
        self.assertEqual((msg.status, msg.reason), (180, "Ringing"))
        self.assertTrue(msg.is_provisional)

    def test_typed_views_are_fresh_copies(self):
        """The parse cache behind the views never lets one caller's edits reach another."""
        first, second = m.parse_message(INVITE), m.parse_message(INVITE)
        via = first.top_via
        via.params["received"] = "203.0.113.9"
        first.from_.params["tag"] = "changed"
        first.from_.uri.params["maddr"] = "192.0.2.1"
        self.assertIsNone(first.top_via.received)
        self.assertIsNone(second.top_via.received)
        self.assertEqual(first.from_.tag, "1928301774")
        self.assertNotIn("maddr", first.from_.uri.params)
        self.assertNotIn("maddr", second.from_.uri.params)
        # an edit to the header itself shows at once
        first.headers.set("From", "<sip:carol@example.com>;tag=9")
        self.assertEqual((first.from_.uri.user, first.from_.tag), ("carol", "9"))
        self.assertEqual(second.from_.tag, "1928301774")

    def test_bad_values_fail_on_every_access(self):
        msg = m.parse_message(INVITE)
        msg.headers.set("To", "<sip:unterminated")
        for _ in range(2):
            with self.assertRaises(m.SIPParseError):
                msg.to

    def test_round_trip(self):
        msg = m.parse_message(INVITE)
        again = m.parse_message(msg.to_bytes())
        self.assertEqual(again.to_bytes(), msg.to_bytes())
        self.assertIn(b"Content-Length: 4\r\n", msg.to_bytes())
        self.assertTrue(msg.to_bytes().startswith(b"INVITE sip:bob@biloxi.example.com SIP/2.0\r\n"))
        compact = m.parse_message(COMPACT).to_bytes()
        self.assertIn(b"\r\nCall-ID: call-1\r\n", compact)
        self.assertIn(b"\r\nVia: SIP/2.0/TCP proxy.example.com:5080", compact)

    def test_bare_lf_and_leading_crlf(self):
        msg = m.parse_message(b"\r\n" + INVITE.replace(b"\r\n", b"\n"))
        self.assertEqual(msg.method, "INVITE")

    def test_extra_datagram_bytes_discarded(self):
        msg = m.parse_message(INVITE + b"garbage")
        self.assertEqual(msg.body, b"v=0\n")

    def test_no_content_length_on_datagram_takes_rest(self):
        data = INVITE.replace(b"Content-Length: 4\r\n", b"")
        self.assertEqual(m.parse_message(data).body, b"v=0\n")
        err = self.assertRaises(SIPParseError, m.parse_message, data, stream=True)
        self.assertTrue(err.can_respond)

    def test_short_body_is_answerable(self):
        err = self.assertRaises(SIPParseError, m.parse_message, INVITE[:-2])
        self.assertTrue(err.can_respond)
        response = m.make_response(err.partial, 400)
        self.assertEqual(response.headers.get("Call-ID"), "a84b4c76e66710@pc33.atlanta.example.com")

    def test_bad_request_uri_is_answerable(self):
        data = INVITE.replace(b"INVITE sip:bob@biloxi.example.com", b"INVITE sip:bob@[nope")
        err = self.assertRaises(SIPParseError, m.parse_message, data)
        self.assertTrue(err.can_respond)

    def test_cseq_method_mismatch_is_answerable(self):
        err = self.assertRaises(SIPParseError, m.parse_message, INVITE.replace(b"314159 INVITE", b"1 BYE"))
        self.assertTrue(err.can_respond)

    def test_missing_call_id_is_answerable(self):
        # RFC 4475 §3.3.1 (insuf): a 400 needs the top Via and the CSeq only
        err = self.assertRaises(SIPParseError, m.parse_message, INVITE.replace(b"Call-ID", b"X-Call-ID"))
        self.assertTrue(err.can_respond)
        response = m.make_response(err.partial, 400)
        self.assertNotIn("Call-ID", response.headers)

    def test_missing_via_or_cseq_is_not_answerable(self):
        for name in (b"Via", b"CSeq"):
            err = self.assertRaises(SIPParseError, m.parse_message, INVITE.replace(name + b":", b"X-" + name + b":"))
            self.assertFalse(err.can_respond)
            self.assertIsNone(err.partial)

    def test_opaque_uri_of_another_scheme(self):
        uri = m.parse_uri("soap.beep://192.0.2.103:3002")
        self.assertEqual((uri.scheme, uri.opaque, uri.structured), ("soap.beep", "//192.0.2.103:3002", False))
        self.assertEqual(str(uri), "soap.beep://192.0.2.103:3002")
        self.assertEqual(str(uri.copy()), "soap.beep://192.0.2.103:3002")
        self.assertRaises(SIPParseError, m.target_for_uri, uri)

    def test_bad_via_is_not_answerable(self):
        data = INVITE.replace(b"Via: SIP/2.0/UDP", b"Via: SIP/9/UDP")
        self.assertFalse(self.assertRaises(SIPParseError, m.parse_message, data).can_respond)

    def test_responses_are_never_answerable(self):
        data = b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP h\r\nFrom: <sip:a@h\r\nTo: <sip:b@h>\r\nCall-ID: c\r\nCSeq: 1 X\r\n\r\n"
        self.assertFalse(self.assertRaises(SIPParseError, m.parse_message, data).can_respond)

    def test_bad_start_lines(self):
        for data in (b"", b"\r\n\r\n", b"HELLO\r\n\r\n", b"INVITE sip:a@h SIP/3.0\r\n\r\n",
                     b"SIP/2.0 99 x\r\n\r\n", b"INVITE sip:a@h SIP/2.0\r\nVia: x"):
            self.assertRaises(SIPParseError, m.parse_message, data)


class FuzzTests(unittest.TestCase):
    """Random, truncated and mutated input raises SIPParseError or parses; nothing else."""

    def _try(self, data):
        try:
            parsed = m.parse_message(data)
        except SIPParseError as e:
            # a cause means the catch-all turned a bug into SIPParseError
            self.assertIsNone(e.__cause__, f"internal error for {data!r}")
            if e.can_respond:
                m.make_response(e.partial, 400).to_bytes()
        else:
            # whatever we accepted serialises to something we accept again
            self.assertEqual(type(m.parse_message(parsed.to_bytes())), type(parsed))
        try:
            m.frame_stream(data)
        except SIPParseError:
            pass

    def test_truncations(self):
        for data in (INVITE, COMPACT):
            for i in range(len(data) + 1):
                self._try(data[:i])

    def test_random_bytes_and_mutations(self):
        rng = random.Random(3261)
        alphabet = b"\r\n :;,<>\"@%[]=/\\\x00\xff0123456789abcSIPsip"
        for _ in range(1500):
            self._try(bytes(rng.randrange(256) for _ in range(rng.randrange(200))))
            data = bytearray(rng.choice((INVITE, COMPACT)))
            for _ in range(rng.randrange(1, 8)):
                pos = rng.randrange(len(data))
                action = rng.randrange(3)
                if action == 0:
                    data[pos] = rng.choice(alphabet)
                elif action == 1:
                    del data[pos]
                else:
                    data.insert(pos, rng.choice(alphabet))
            self._try(bytes(data))

    def test_huge_input_is_refused_quickly(self):
        self.assertRaises(SIPParseError, m.parse_message, b"A" * (m.MAX_MESSAGE_SIZE + 1))
        self.assertRaises(SIPParseError, m.frame_stream, b"A" * (m.MAX_MESSAGE_SIZE + 1))


class FramingTests(unittest.TestCase):
    def test_frame_stream(self):
        self.assertIsNone(m.frame_stream(INVITE[:20]))
        self.assertIsNone(m.frame_stream(INVITE[:-1]))
        self.assertEqual(m.frame_stream(INVITE + INVITE), len(INVITE))
        compact = COMPACT.replace(b"l: 0", b"l: 3") + b"abc"
        self.assertEqual(m.frame_stream(compact), len(compact))
        self.assertRaises(SIPParseError, m.frame_stream, INVITE.replace(b"Content-Length: 4", b"Content-Length: x"))

    def test_conflicting_content_lengths(self):
        twice = INVITE.replace(b"Content-Length: 4\r\n", b"Content-Length: 4\r\nl: 0\r\n")
        self.assertRaises(SIPParseError, m.frame_stream, twice)
        err = self.assertRaises(SIPParseError, m.parse_message, twice)
        self.assertTrue(err.can_respond)
        same = INVITE.replace(b"Content-Length: 4\r\n", b"Content-Length: 4\r\nl: 4\r\n")
        self.assertEqual(m.frame_stream(same), len(same))
        self.assertEqual(m.parse_message(same).body, b"v=0\n")

    def test_message_length_resumes_the_head_search(self):
        head_end = INVITE.index(b"\r\n\r\n") + 4
        # the blank line straddles what was searched before: still found
        self.assertEqual(m.message_length(INVITE[:head_end], searched=head_end - 2), len(INVITE))
        self.assertIsNone(m.message_length(INVITE[:head_end - 1], searched=head_end - 5))
        # the head is complete, the body is not: the length is known already
        self.assertEqual(m.message_length(INVITE[:-2]), len(INVITE))
        self.assertIsNone(m.frame_stream(INVITE[:-2]))

    def test_bare_lf_head_with_crlf_crlf_in_the_body(self):
        # the earliest blank line ends the head, whichever line ending it uses
        body = b"v=0\r\n\r\nx"
        data = INVITE.replace(b"\r\n", b"\n").replace(b"Content-Length: 4\n\nv=0\n", b"Content-Length: 8\n\n") + body
        self.assertEqual(m.parse_message(data).body, body)
        self.assertEqual(m.frame_stream(data + INVITE), len(data))


class BuildTests(unittest.TestCase):
    def test_make_response_copies_and_tags(self):
        request = m.parse_message(COMPACT)
        request.headers.set("To", "<sip:bob@biloxi.example.com>")
        response = m.make_response(request, 200, to_tag="abc", headers=[("Server", "t")])
        self.assertEqual(response.headers.get_all("Via"), request.headers.get_all("Via"))
        self.assertEqual(response.to.tag, "abc")
        self.assertEqual(response.from_.tag, "x")
        self.assertEqual(response.cseq, m.CSeq(2, "BYE"))
        self.assertEqual(response.reason, "OK")
        self.assertEqual(response.headers.get("Server"), "t")
        parsed = m.parse_message(response.to_bytes())
        self.assertEqual(parsed.status, 200)

    def test_existing_to_tag_kept_and_100_untagged(self):
        request = m.parse_message(COMPACT)
        self.assertEqual(m.make_response(request, 200, to_tag="new").to.tag, "y")
        request.headers.set("To", "<sip:bob@h>")
        self.assertIsNone(m.make_response(request, 100, to_tag="new").to.tag)

    def test_generators(self):
        branch = m.generate_branch()
        self.assertTrue(branch.startswith("z9hG4bK"))
        self.assertNotEqual(branch, m.generate_branch())
        self.assertNotEqual(m.generate_tag(), m.generate_tag())
        self.assertTrue(m.generate_call_id("h").endswith("@h"))

    def test_make_request(self):
        via = m.Via("UDP", "10.0.0.1", 5060, {"branch": m.generate_branch(), "rport": None})
        request = m.make_request(
            "options", "sip:b@h", via=via, from_=m.parse_address("<sip:a@h>;tag=1"),
            to=m.parse_address("<sip:b@h>"), call_id="c1", cseq=7,
            contact=m.parse_address("<sip:a@10.0.0.1>"), body=b"x", content_type="text/plain",
        )
        parsed = m.parse_message(request.to_bytes())
        self.assertEqual(parsed.method, "OPTIONS")
        self.assertEqual(parsed.cseq, m.CSeq(7, "OPTIONS"))
        self.assertTrue(parsed.top_via.wants_rport)
        self.assertEqual(parsed.body, b"x")
        self.assertEqual(parsed.headers.get("Max-Forwards"), "70")

    def test_copy_is_independent(self):
        request = m.parse_message(INVITE)
        twin = request.copy()
        twin.headers.set("Max-Forwards", "1")
        twin.uri.params["transport"] = "tcp"
        self.assertEqual(request.headers.get("Max-Forwards"), "70")
        self.assertEqual(request.uri.params, {})
        self.assertEqual(twin.to_bytes().count(b"\r\n"), request.to_bytes().count(b"\r\n"))
        response = m.make_response(request, 486, to_tag="t")
        echo = response.copy()
        echo.headers.remove("Via")
        self.assertEqual(len(response.headers.get_all("Via")), 1)

    def test_next_attempt_is_a_new_transaction_in_the_same_dialog(self):
        request = m.parse_message(INVITE)
        request.headers.add("Authorization", "Digest old")
        retry = m.next_attempt(request)
        self.assertEqual(retry.cseq, m.CSeq(314160, "INVITE"))
        self.assertEqual(request.cseq, m.CSeq(314159, "INVITE"))
        self.assertTrue(retry.top_via.branch.startswith(m.BRANCH_MAGIC))
        self.assertNotEqual(retry.top_via.branch, request.top_via.branch)
        self.assertTrue(retry.top_via.wants_rport)
        self.assertEqual((retry.call_id, retry.from_.tag, retry.body),
                         (request.call_id, request.from_.tag, request.body))
        self.assertEqual(m.parse_message(retry.to_bytes()).cseq.seq, 314160)

    def test_target_for_uri(self):
        target = m.target_for_uri
        self.assertEqual(target(m.parse_uri("sip:bob@pbx.example")), m.Target("pbx.example", 5060, "UDP"))
        self.assertEqual(target(m.parse_uri("sip:bob@pbx.example"), "tcp"), m.Target("pbx.example", 5060, "TCP"))
        self.assertEqual(target(m.parse_uri("sip:bob@[2001:db8::1]:5070;transport=TCP")),
                         m.Target("2001:db8::1", 5070, "TCP"))
        self.assertEqual(target(m.parse_uri("sips:bob@pbx.example")), m.Target("pbx.example", 5061, "TLS"))
        self.assertEqual(target(m.parse_uri("sips:bob@pbx.example;transport=tcp")), m.Target("pbx.example", 5061, "TLS"))
        self.assertEqual(target(m.parse_uri("sip:bob@pbx.example;maddr=192.0.2.9")), m.Target("192.0.2.9", 5060, "UDP"))
        self.assertRaises(SIPParseError, target, m.parse_uri("tel:+15551234"))

    def test_next_hop_prefers_the_first_route(self):
        request = m.parse_message(INVITE)
        self.assertEqual(m.next_hop(request), m.Target("biloxi.example.com", 5060, "UDP"))
        request.headers.add("Route", "<sip:proxy1.example:5080;transport=tcp;lr>")
        request.headers.add("Route", "<sip:proxy2.example;lr>")
        self.assertEqual(m.next_hop(request), m.Target("proxy1.example", 5080, "TCP"))

    def test_headers_api(self):
        h = m.Headers([("v", "a"), ("X-Foo", "1"), ("Via", "b")])
        self.assertEqual(h.get_all("via"), ["a", "b"])
        h.set("VIA", "c")
        self.assertEqual(list(h), [("Via", "c"), ("X-Foo", "1")])
        h.prepend("Via", "d")
        h.remove_first("Via")
        self.assertEqual(h.get_all("Via"), ["c"])
        h.remove("x-foo")
        self.assertNotIn("X-Foo", h)
        self.assertRaises(ValueError, h.add, "X-Bad", "a\r\nInjected: 1")
