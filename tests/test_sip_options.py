"""``/call/sip`` options through the whole daemon, against sipp: ``option.codec`` orders the offer
(sipp checks the m= line), an unknown codec is refused before anything is sent."""

from twisted.internet import defer
from twisted.trial import unittest

from activecall.call.sip_call import offer_codecs
from tests.test_sip_calls import DaemonCase
from tests.test_sip_integration import port_bound, sipp, sipp_result, udp_port, when
from tests.wsclient import connect, send_json


class OfferCodecsTests(unittest.TestCase):
    CONFIGURED = ("pcmu", "pcma", "g722", "opus", "telephone_event")

    def test_orders_without_restricting(self):
        self.assertEqual(offer_codecs("pcma", self.CONFIGURED),
                         ("pcma", "pcmu", "g722", "opus", "telephone_event"))
        self.assertEqual(offer_codecs("G722, pcma", self.CONFIGURED),
                         ("g722", "pcma", "pcmu", "opus", "telephone_event"))
        self.assertEqual(offer_codecs(None, self.CONFIGURED), self.CONFIGURED)

    def test_unconfigured_codec_is_an_error_naming_the_configured_ones(self):
        with self.assertRaises(ValueError) as cm:
            offer_codecs("g729", self.CONFIGURED)
        self.assertIn("'g729'", str(cm.exception))
        self.assertIn("pcmu, pcma, g722, opus", str(cm.exception))
        self.assertRaises(ValueError, offer_codecs, "telephone_event", self.CONFIGURED)


class CodecOfferTests(DaemonCase):
    @defer.inlineCallbacks
    def test_option_codec_orders_the_offer(self):
        yield self.start("")
        uas_port = udp_port()
        uas = sipp(self, "-p", str(uas_port), "-mp", str(udp_port() // 2 * 2), scenario="uas_codec_order.xml")
        yield when(port_bound(uas_port), 15, "sipp uas to bind")
        proto, client = yield connect(self, self.http_port, "/call/sip", "id=codec1")
        send_json(proto, {"command": "invite", "option": {
            "callee": f"sip:bob@127.0.0.1:{uas_port}", "codec": "pcma,g722"}})
        answer = yield client.wait_event("answer")
        self.assertIn("RTP/AVP 8", answer["sdp"])
        send_json(proto, {"command": "hangup"})
        yield client.wait_event("hangup")
        yield sipp_result(uas, timeout=15)  # fails unless the INVITE's m= line was "8 9 0 ..."
        self.assertEqual([e for e in client.events if e.get("event") == "error"], [])

    @defer.inlineCallbacks
    def test_unknown_codec_is_refused(self):
        yield self.start("")
        proto, client = yield connect(self, self.http_port, "/call/sip", "id=codec2")
        send_json(proto, {"command": "invite", "option": {"callee": "sip:bob@127.0.0.1:9", "codec": "g729"}})
        error = yield client.wait_event("error")
        self.assertEqual((error["sender"], error["code"]), ("invite", 400))
        self.assertIn("'g729'", error["error"])
        yield client.wait_event("hangup")
