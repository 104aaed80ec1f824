"""SDP parse/build and RFC 3264 negotiation, including active-call's answer-ordering cases (docs/media.md)."""

from twisted.trial import unittest

from activecall.sip import sdp

CODECS = ("pcmu", "pcma", "g722", "opus", "telephone_event")


def offer_with(formats, rtpmaps, extra=""):
    lines = ["v=0", "o=- 1 1 IN IP4 192.0.2.10", "s=-", "c=IN IP4 192.0.2.10", "t=0 0",
             f"m=audio 30000 RTP/AVP {formats}"]
    lines += [f"a=rtpmap:{r}" for r in rtpmaps]
    return ("\r\n".join(lines) + "\r\n" + extra).encode()


PCMA_PCMU_DTMF = offer_with("8 0 101", ["8 PCMA/8000", "0 PCMU/8000", "101 telephone-event/8000"],
                            "a=fmtp:101 0-16\r\na=sendrecv\r\n")

FREESWITCH = b"""v=0
o=FreeSWITCH 1732516789 1732516790 IN IP4 203.0.113.5
s=FreeSWITCH
c=IN IP4 203.0.113.5
t=0 0
m=audio 24680 RTP/AVP 0 101
a=rtpmap:0 PCMU/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-16
a=ptime:20
a=sendrecv
"""


class ParseTests(unittest.TestCase):
    def test_freeswitch_style_sdp(self):
        # §6 item 14: port, RTCP = port+1, session-level c=, PCMU + telephone-event
        s = sdp.parse(FREESWITCH)
        self.assertEqual(s.origin.username, "FreeSWITCH")
        self.assertEqual(s.origin.session_version, "1732516790")
        _, m = sdp.audio_media(s)
        self.assertEqual(m.port, 24680)
        self.assertEqual(m.ptime, 20)
        self.assertEqual(m.direction, "sendrecv")
        rtp, rtcp = sdp.remote_addresses(s, m)
        self.assertEqual(rtp, ("203.0.113.5", 24680))
        self.assertEqual(rtcp, ("203.0.113.5", 24681))
        names = [f.name for f in sdp.payload_formats(m)]
        self.assertEqual(names, ["pcmu", "telephone_event"])

    def test_media_level_connection_wins_and_a_rtcp(self):
        body = FREESWITCH.replace(b"a=ptime:20\n", b"c=IN IP4 198.51.100.7\na=rtcp:5000 IN IP4 198.51.100.8\n")
        s = sdp.parse(body)
        _, m = sdp.audio_media(s)
        self.assertEqual(sdp.remote_addresses(s, m), (("198.51.100.7", 24680), ("198.51.100.8", 5000)))
        body = FREESWITCH.replace(b"a=ptime:20\n", b"a=rtcp:24690\n")
        s = sdp.parse(body)
        self.assertEqual(sdp.remote_addresses(s, s.media[0])[1], ("203.0.113.5", 24690))

    def test_rtcp_mux_means_no_separate_rtcp(self):
        s = sdp.parse(FREESWITCH.replace(b"a=ptime:20\n", b"a=rtcp-mux\n"))
        self.assertTrue(s.media[0].rtcp_mux)
        self.assertIsNone(sdp.remote_addresses(s, s.media[0])[1])

    def test_static_payload_types_without_rtpmap(self):
        s = sdp.parse(offer_with("0 8 9 18", []))
        self.assertEqual([f.name for f in sdp.payload_formats(s.media[0])], ["pcmu", "pcma", "g722", None])

    def test_round_trip_keeps_unknown_lines(self):
        body = (b"v=0\r\no=- 5 6 IN IP4 192.0.2.1\r\ns=call\r\ni=info\r\nc=IN IP4 192.0.2.1\r\nb=AS:64\r\n"
                b"t=0 0\r\na=group:BUNDLE 0\r\nm=audio 4000 RTP/SAVP 0\r\nb=TIAS:64000\r\na=rtpmap:0 PCMU/8000\r\n"
                b"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz|2^20|1:4\r\n"
                b"a=x-custom:yes\r\na=recvonly\r\n")
        s = sdp.parse(body)
        self.assertEqual(s.media[0].crypto[0].suite, "AES_CM_128_HMAC_SHA1_80")
        self.assertEqual(s.media[0].crypto[0].key_params.split("|")[1:], ["2^20", "1:4"])
        self.assertEqual(s.media[0].attribute("x-custom"), "yes")
        self.assertEqual(sdp.parse(s.to_bytes()), s)
        self.assertIn(b"b=TIAS:64000", s.to_bytes())

    def test_session_level_direction(self):
        s = sdp.parse(FREESWITCH.replace(b"t=0 0\n", b"t=0 0\na=sendonly\n").replace(b"a=sendrecv\n", b""))
        self.assertEqual(s.direction, "sendonly")
        self.assertEqual(sdp.media_direction(s, s.media[0]), "sendonly")

    def test_garbage_is_a_parse_error(self):
        for body in (b"hello", b"v=0\r\ns=-\r\n", b"v=0\r\no=- 1\r\n", b"v=0\r\no=- 1 1 IN IP4 a\r\nm=audio x RTP/AVP 0\r\n",
                     b"v=0\r\no=- 1 1 IN IP4 a\r\nm=audio 1 RTP/AVP 0\r\na=rtpmap:zero\r\n"):
            self.assertRaises(sdp.SDPParseError, sdp.parse, body)

    def test_webrtc_offer_detected(self):
        body = FREESWITCH + b"a=ice-ufrag:abcd\na=ice-pwd:secretsecretsecret\na=fingerprint:sha-256 AA:BB\n"
        self.assertTrue(sdp.is_webrtc(sdp.parse(body)))
        self.assertFalse(sdp.is_webrtc(sdp.parse(FREESWITCH)))


class AnswerTests(unittest.TestCase):
    def answer(self, offer, codecs=CODECS, **kw):
        return sdp.build_answer(sdp.parse(offer), codecs, "10.0.0.2", 12000, session_id=7, **kw)

    def test_answer_keeps_the_offer_order(self):
        # §6 item 12: offer 8 0 101 -> answer 8 0 101; item 13: send PCMA
        answer, neg = self.answer(PCMA_PCMU_DTMF)
        self.assertEqual(answer.media[0].formats, ("8", "0", "101"))
        self.assertEqual(neg.send_codec.name, "pcma")
        self.assertEqual(neg.send_codec.payload_type, 8)
        self.assertEqual(neg.dtmf_payload_type, 101)
        self.assertIn(b"a=fmtp:101 0-16", answer.to_bytes())

    def test_telephone_event_first_is_skipped_for_sending(self):
        offer = offer_with("101 0 8", ["101 telephone-event/8000", "0 PCMU/8000", "8 PCMA/8000"])
        answer, neg = self.answer(offer)
        self.assertEqual(answer.media[0].formats, ("101", "0", "8"))
        self.assertEqual(neg.send_codec.name, "pcmu")

    def test_opus_dynamic_pt(self):
        offer = offer_with("111 101", ["111 opus/48000/2", "101 telephone-event/8000"], "a=fmtp:111 useinbandfec=1\r\n")
        answer, neg = self.answer(offer)
        self.assertEqual(neg.send_codec.payload_type, 111)
        self.assertEqual(neg.send_codec.name, "opus")
        self.assertEqual(neg.send_codec.clock_rate, 48000)
        self.assertEqual(answer.media[0].rtpmap(111), sdp.RtpMap(111, "opus", 48000, 2))
        self.assertEqual(answer.media[0].fmtp(111), "useinbandfec=1")

    def test_dropped_payload_types_lose_rtpmap_and_fmtp(self):
        offer = offer_with("18 8 97 0 101", ["18 G729/8000", "8 PCMA/8000", "97 iLBC/8000", "0 PCMU/8000",
                                             "101 telephone-event/8000"],
                           "a=fmtp:18 annexb=no\r\na=fmtp:97 mode=30\r\na=fmtp:101 0-15\r\n")
        answer, neg = self.answer(offer, codecs=("pcmu", "telephone_event", "pcma"))
        body = answer.to_bytes()
        self.assertEqual(answer.media[0].formats, ("8", "0", "101"))
        for dropped in (b"G729", b"annexb", b"iLBC", b"mode=30"):
            self.assertNotIn(dropped, body)
        self.assertEqual(neg.send_codec.name, "pcma")  # the offer's order wins when answering

    def test_dynamic_telephone_event_pt_is_kept(self):
        offer = offer_with("0 96", ["0 PCMU/8000", "96 telephone-event/8000"])
        answer, neg = self.answer(offer)
        self.assertEqual(neg.dtmf_payload_type, 96)
        self.assertEqual(neg.receive_payload_types, frozenset({0, 96}))

    def test_telephone_event_only_when_configured(self):
        answer, neg = self.answer(PCMA_PCMU_DTMF, codecs=("pcmu", "pcma"))
        self.assertEqual(answer.media[0].formats, ("8", "0"))
        self.assertIsNone(neg.dtmf_payload_type)

    def test_no_common_codec_is_a_negotiation_error(self):
        offer = offer_with("18", ["18 G729/8000"])
        self.assertRaises(sdp.NegotiationError, self.answer, offer)

    def test_answer_addresses_and_external_ip(self):
        answer, neg = self.answer(PCMA_PCMU_DTMF, external_ip="203.0.113.99")
        text = answer.to_text()
        self.assertIn("o=- 7 8 IN IP4 203.0.113.99\r\n", text)
        self.assertIn("c=IN IP4 203.0.113.99\r\n", text)
        self.assertIn("m=audio 12000 RTP/AVP 8 0 101\r\n", text)
        self.assertEqual(neg.remote_rtp, ("192.0.2.10", 30000))
        self.assertEqual(neg.remote_rtcp, ("192.0.2.10", 30001))

    def test_direction_is_mirrored(self):
        for offered, expected in (("sendonly", "recvonly"), ("recvonly", "sendonly"),
                                  ("inactive", "inactive"), ("sendrecv", "sendrecv")):
            offer = PCMA_PCMU_DTMF.replace(b"a=sendrecv", f"a={offered}".encode())
            answer, neg = self.answer(offer)
            self.assertEqual(answer.media[0].direction, expected)
            self.assertEqual(neg.local_direction, expected)
        answer, _ = self.answer(PCMA_PCMU_DTMF.replace(b"a=sendrecv\r\n", b""))
        self.assertEqual(answer.media[0].direction, "sendrecv")

    def test_other_streams_are_refused_with_port_zero(self):
        offer = PCMA_PCMU_DTMF + b"m=video 30002 RTP/AVP 96\r\na=rtpmap:96 VP8/90000\r\n"
        answer, _ = self.answer(offer)
        self.assertEqual([(m.media, m.port) for m in answer.media], [("audio", 12000), ("video", 0)])
        self.assertEqual(sdp.parse(answer.to_bytes()), answer)

    def test_srtp_offer_needs_crypto(self):
        offer = PCMA_PCMU_DTMF.replace(b"RTP/AVP", b"RTP/SAVP")
        self.assertRaises(sdp.NegotiationError, self.answer, offer)
        crypto = sdp.Crypto(1, "AES_CM_128_HMAC_SHA1_80", "inline:" + "A" * 40)
        answer, neg = self.answer(offer, crypto=[crypto])
        self.assertEqual(answer.media[0].proto, "RTP/SAVP")
        self.assertEqual(answer.media[0].crypto, (crypto,))
        self.assertRaises(sdp.NegotiationError, self.answer, PCMA_PCMU_DTMF, crypto=[crypto])


class HoldTests(unittest.TestCase):
    # §6 item 9
    def test_hold_detection(self):
        cases = {b"a=sendonly": True, b"a=inactive": True, b"a=sendrecv": False, b"a=recvonly": False}
        for line, held in cases.items():
            s = sdp.parse(PCMA_PCMU_DTMF.replace(b"a=sendrecv", line))
            self.assertEqual(sdp.is_hold(s), held, line)

    def test_null_connection_at_session_or_media_level(self):
        s = sdp.parse(PCMA_PCMU_DTMF.replace(b"c=IN IP4 192.0.2.10", b"c=IN IP4 0.0.0.0"))
        self.assertTrue(sdp.is_hold(s))
        s = sdp.parse(PCMA_PCMU_DTMF + b"c=IN IP4 0.0.0.0\r\n")
        self.assertTrue(sdp.is_hold(s))

    def test_session_level_inactive_is_hold(self):
        s = sdp.parse(PCMA_PCMU_DTMF.replace(b"a=sendrecv\r\n", b"").replace(b"t=0 0\r\n", b"t=0 0\r\na=inactive\r\n"))
        self.assertTrue(sdp.is_hold(s))


class OfferTests(unittest.TestCase):
    def test_offer_in_configured_order(self):
        offer = sdp.build_offer(("g722", "pcmu", "telephone_event", "opus"), "10.0.0.2", 12000,
                                session_id=100, ssrc=1234, cname="abc")
        text = offer.to_text()
        self.assertIn("m=audio 12000 RTP/AVP 9 0 101 111\r\n", text)
        self.assertIn("a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\n", text)
        self.assertIn("a=rtpmap:111 opus/48000/2\r\na=fmtp:111 minptime=10;useinbandfec=1\r\n", text)
        self.assertIn("a=rtcp-mux\r\n", text)
        self.assertIn("a=sendrecv\r\n", text)
        self.assertIn("a=ssrc:1234 cname:abc\r\n", text)
        self.assertIn("o=- 100 101 IN IP4 10.0.0.2\r\n", text)
        self.assertEqual(sdp.parse(offer.to_bytes()), offer)

    def test_offer_with_external_ip_ptime_and_crypto(self):
        crypto = sdp.Crypto(1, "AES_CM_128_HMAC_SHA1_32", "inline:" + "B" * 40)
        offer = sdp.build_offer(("pcma", "l16"), "10.0.0.2", 12002, external_ip="203.0.113.1", ptime=20,
                                crypto=[crypto], rtcp_mux=False)
        text = offer.to_text()
        self.assertIn("c=IN IP4 203.0.113.1\r\n", text)
        self.assertIn("m=audio 12002 RTP/SAVP 8 96\r\n", text)
        self.assertIn("a=rtpmap:96 L16/16000\r\n", text)
        self.assertIn("a=ptime:20\r\n", text)
        self.assertIn(f"a=crypto:{crypto}\r\n", text)
        self.assertNotIn("rtcp-mux", text)

    def test_offer_needs_an_audio_codec(self):
        self.assertRaises(sdp.NegotiationError, sdp.build_offer, ("telephone_event",), "10.0.0.2", 1)

    def test_answer_to_our_offer_prefers_our_order(self):
        # we offered pcmu,pcma; the peer answers "8 0 101": we still send PCMU (first of ours present)
        answer = sdp.parse(PCMA_PCMU_DTMF)
        neg = sdp.negotiate_as_offerer(answer, ("pcmu", "pcma", "telephone_event"))
        self.assertEqual(neg.send_codec.name, "pcmu")
        self.assertEqual(neg.dtmf_payload_type, 101)
        neg = sdp.negotiate_as_offerer(answer, ("g722", "pcma", "pcmu"))
        self.assertEqual(neg.send_codec.name, "pcma")

    def test_answer_without_our_codecs_fails(self):
        answer = sdp.parse(offer_with("18", ["18 G729/8000"]))
        self.assertRaises(sdp.NegotiationError, sdp.negotiate_as_offerer, answer, CODECS)

    def test_answer_direction_applied_to_ours(self):
        answer = sdp.parse(PCMA_PCMU_DTMF.replace(b"a=sendrecv", b"a=recvonly"))
        self.assertEqual(sdp.negotiate_as_offerer(answer, CODECS).local_direction, "sendonly")
        answer = sdp.parse(PCMA_PCMU_DTMF.replace(b"a=sendrecv", b"a=inactive"))
        neg = sdp.negotiate_as_offerer(answer, CODECS)
        self.assertEqual(neg.local_direction, "inactive")
        self.assertTrue(neg.on_hold)

    def test_ipv6(self):
        offer = sdp.build_offer(("pcmu",), "2001:db8::1", 12000, session_id=1)
        self.assertIn("c=IN IP6 2001:db8::1\r\n", offer.to_text())
        neg = sdp.negotiate_as_answerer(sdp.parse(offer.to_bytes()), CODECS)
        self.assertEqual(neg.remote_rtp, ("2001:db8::1", 12000))
        self.assertIsNone(neg.remote_rtcp)


def hostile(port="30000", address="192.0.2.10", formats="0", rtpmaps=("0 PCMU/8000",), extra=""):
    lines = ["v=0", "o=- 1 1 IN IP4 192.0.2.10", "s=-", f"c=IN IP4 {address}", "t=0 0",
             f"m=audio {port} RTP/AVP {formats}"]
    lines += [f"a=rtpmap:{r}" for r in rtpmaps]
    return ("\r\n".join(lines) + "\r\n" + extra).encode()


class HostileSdpTests(unittest.TestCase):
    """What the RTP path cannot send to is refused at negotiation (NegotiationError: 488, or the
    call ends), and nothing in an SDP raises anything but SDPParseError / NegotiationError."""

    def refused(self, body, pattern=None):
        with self.assertRaises((sdp.NegotiationError, sdp.SDPParseError)) as caught:
            sdp.build_answer(sdp.parse(body), CODECS, "127.0.0.1", 40000)
        with self.assertRaises((sdp.NegotiationError, sdp.SDPParseError)):
            sdp.negotiate_as_offerer(sdp.parse(body), CODECS)
        if pattern:
            self.assertRegex(str(caught.exception), pattern)
        self.assertTrue(str(caught.exception).isascii())
        return caught.exception

    def test_ports_outside_the_udp_range(self):
        for port in ("65536", "70000", "99999999999", "4294967297"):
            self.refused(hostile(port=port), "port")
        self.refused(hostile(port="65535"), "RTCP")  # its RTCP would be 65536
        self.refused(hostile(extra="a=rtcp:70000\r\n"), "RTCP port")
        self.refused(hostile(extra="a=rtcp:30001 IN IP4 not-an-ip\r\n"), "RTCP address")
        for port in ("-5", "+5", "\u0665", "\u00b2", "5_0", "0x10"):
            self.refused(hostile(port=port), "port")
        _, n = sdp.build_answer(sdp.parse(hostile(port="65534", extra="a=rtcp-mux\r\n")), CODECS,
                                "127.0.0.1", 40000)
        self.assertEqual((n.remote_rtp, n.remote_rtcp), (("192.0.2.10", 65534), None))

    def test_a_port_of_zero_is_a_rejected_stream(self):
        self.refused(hostile(port="0"), "no audio stream")

    def test_unusable_connection_addresses(self):
        for address in ("999.1.1.1", "host.example.com", "exa\u00e9mple", "1.2.3", "::g", "-", "a" * 300,
                        "\u00ff\u00fe"):
            self.refused(hostile(address=address), "address")

    def test_usable_addresses(self):
        for address, rtp in (("203.0.113.5", "203.0.113.5"), ("0.0.0.0", "0.0.0.0"),
                             ("2001:db8::1", "2001:db8::1")):
            _, n = sdp.build_answer(sdp.parse(hostile(address=address)), CODECS, "127.0.0.1", 40000)
            self.assertEqual(n.remote_rtp, (rtp, 30000))

    def test_payload_types_outside_0_127_are_not_used(self):
        self.refused(hostile(formats="128", rtpmaps=("128 PCMU/8000",)), "no common audio codec")
        self.refused(hostile(formats="256", rtpmaps=()), "no common audio codec")  # 256 & 0x7f == 0
        answer, n = sdp.build_answer(sdp.parse(hostile(formats="200 8", rtpmaps=("200 PCMU/8000",))), CODECS,
                                     "127.0.0.1", 40000)
        self.assertEqual(n.send_codec.payload_type, 8)
        self.assertIn("m=audio 40000 RTP/AVP 8\r\n", answer.to_text())
        for fmt in ("\u00b2", "\u0665"):  # str.isdigit says yes, int refuses or misreads
            self.refused(hostile(formats=fmt, rtpmaps=()), "no common audio codec")

    def test_rtpmap_sanity(self):
        for rtpmap in ("0 PCMU/0", "0 PCMU/16000", "0 PCMU/8000/2", "96 opus/48000/9", "96 L16/1",
                       "96 L16/99999999", "96 G722/16000"):
            pt = rtpmap.split()[0]
            self.refused(hostile(formats=pt, rtpmaps=(rtpmap,)), "no common audio codec|no codec we offered")
        for rtpmap in ("0 PCMU/\u00b2", "0 PCMU/8000/\u00b2", "\u00b2 PCMU/8000", "0 PCMU"):
            self.refused(hostile(rtpmaps=(rtpmap,)), "rtpmap")
        _, n = sdp.build_answer(sdp.parse(hostile(formats="96", rtpmaps=("96 opus/48000/2",))), CODECS,
                                "127.0.0.1", 40000)
        self.assertEqual(n.send_codec.name, "opus")

    def test_odd_attributes_do_not_raise(self):
        for extra in ("a=ptime:inf\r\n", "a=ptime:nan\r\n", "a=fmtp:\u00b2 x\r\n", "a=crypto:\u00b2 a b\r\n",
                      "a=rtcp:\u00b2\r\n"):
            try:
                sdp.build_answer(sdp.parse(hostile(extra=extra)), CODECS, "127.0.0.1", 40000)
            except (sdp.NegotiationError, sdp.SDPParseError):
                pass
        _, n = sdp.build_answer(sdp.parse(hostile(extra="a=ptime:-20\r\n")), CODECS, "127.0.0.1", 40000)
        self.assertEqual(n.ptime, 20)
        self.assertEqual(sdp.parse(b"v=\u00b2\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\n".decode()).version, 0)
