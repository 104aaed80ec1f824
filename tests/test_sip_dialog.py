"""SIP dialogs (activecall.sip.dialog): ids, route sets, targets, CSeq, in-dialog requests."""

from twisted.trial import unittest

from activecall.sip.dialog import Dialog, DialogId, DialogState, DialogTable, request_dialog_id
from activecall.sip.message import Address, make_response, parse_message, parse_uri

INVITE = (
    "INVITE sip:bot@192.0.2.20 SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKp1\r\n"
    "Via: SIP/2.0/UDP 192.0.2.10:5070;branch=z9hG4bKa1\r\n"
    "Record-Route: <sip:192.0.2.1;lr>\r\nRecord-Route: <sip:192.0.2.2;lr>\r\n"
    "From: \"Alice\" <sip:alice@example.com>;tag=a1\r\nTo: <sip:bot@example.com>\r\n"
    "Call-ID: cid-1\r\nCSeq: 7 INVITE\r\nContact: <sip:alice@192.0.2.10:5070>\r\nContent-Length: 0\r\n\r\n"
).encode()

US = Address(parse_uri("sip:192.0.2.20:5060"))


class UASDialogTests(unittest.TestCase):
    def setUp(self):
        self.invite = parse_message(INVITE)
        self.dialog = Dialog.as_uas(self.invite, "b2", US)

    def test_id_is_call_id_our_tag_their_tag(self):
        self.assertEqual(self.dialog.id, DialogId("cid-1", "b2", "a1"))
        self.assertEqual(str(self.dialog.id), "cid-1-b2-a1")
        self.assertEqual(self.dialog.state, DialogState.EARLY)

    def test_bye_uses_contact_routes_and_tags(self):
        bye = self.dialog.create_request("BYE", headers=[("X-Why", "done")])
        self.assertEqual(str(bye.uri), "sip:alice@192.0.2.10:5070")
        self.assertEqual(bye.headers.get_all("Route"), ["<sip:192.0.2.1;lr>", "<sip:192.0.2.2;lr>"])
        self.assertEqual((bye.from_.tag, bye.to.tag), ("b2", "a1"))
        self.assertEqual(bye.from_.uri.user, "bot")
        self.assertEqual(bye.to.display_name, "Alice")
        self.assertEqual(bye.cseq.seq, 1)
        self.assertEqual(bye.headers.get("X-Why"), "done")
        self.assertNotIn("Via", bye.headers)  # the transaction layer stamps ours
        self.assertEqual(self.dialog.target_for(bye).address, ("192.0.2.1", 5060))
        self.assertEqual(self.dialog.create_request("INFO").cseq.seq, 2)

    def test_remote_cseq_must_grow(self):
        def req(seq, method="INFO"):
            return parse_message(INVITE.replace(b"7 INVITE", f"{seq} {method}".encode())
                                 .replace(b"INVITE sip", f"{method} sip".encode()))

        self.assertFalse(self.dialog.accept_remote_cseq(req(7)))
        self.assertTrue(self.dialog.accept_remote_cseq(req(8)))
        self.assertFalse(self.dialog.accept_remote_cseq(req(8)))
        self.assertTrue(self.dialog.accept_remote_cseq(req(7, "ACK")))

    def test_target_refresh(self):
        reinvite = parse_message(INVITE.replace(b"192.0.2.10:5070>", b"192.0.2.99:6000>"))
        self.dialog.refresh_target(reinvite)
        self.assertEqual(str(self.dialog.create_request("BYE").uri), "sip:alice@192.0.2.99:6000")

    def test_without_contact_no_dialog(self):
        from activecall.sip.message import SIPParseError

        bare = parse_message(INVITE.replace(b"Contact: <sip:alice@192.0.2.10:5070>\r\n", b""))
        self.assertRaises(SIPParseError, Dialog.as_uas, bare, "b2", US)


class UACDialogTests(unittest.TestCase):
    def setUp(self):
        self.invite = parse_message(INVITE.replace(b"To: <sip:bot@example.com>", b"To: <sip:bot@example.com>"))
        ok = make_response(self.invite, 200, to_tag="b9",
                           headers=[("Record-Route", "<sip:192.0.2.1;lr>"), ("Record-Route", "<sip:192.0.2.2;lr>"),
                                    ("Contact", "<sip:bot@192.0.2.30:5080>")])
        self.ok = ok
        self.dialog = Dialog.as_uac(self.invite, ok)

    def test_route_set_reversed_and_cseq_continues(self):
        self.assertEqual(self.dialog.id, DialogId("cid-1", "a1", "b9"))
        self.assertEqual(self.dialog.state, DialogState.CONFIRMED)
        bye = self.dialog.create_request("BYE")
        self.assertEqual(bye.headers.get_all("Route"), ["<sip:192.0.2.2;lr>", "<sip:192.0.2.1;lr>"])
        self.assertEqual(str(bye.uri), "sip:bot@192.0.2.30:5080")
        self.assertEqual(bye.cseq.seq, 8)
        ack = self.dialog.create_ack(7)
        self.assertEqual((ack.method, ack.cseq.seq, ack.cseq.method), ("ACK", 7, "ACK"))
        self.assertIsNone(self.dialog.remote_cseq)

    def test_strict_route(self):
        ok = make_response(self.invite, 200, to_tag="b9",
                           headers=[("Record-Route", "<sip:192.0.2.5>"), ("Contact", "<sip:bot@192.0.2.30>")])
        dialog = Dialog.as_uac(self.invite, ok)
        bye = dialog.create_request("BYE")
        self.assertEqual(str(bye.uri), "sip:192.0.2.5")
        self.assertEqual(bye.headers.get_all("Route"), ["<sip:bot@192.0.2.30>"])

    def test_early_dialog_takes_route_set_from_2xx(self):
        ringing = make_response(self.invite, 180, to_tag="b9", headers=[("Contact", "<sip:bot@192.0.2.31>")])
        dialog = Dialog.as_uac(self.invite, ringing)
        self.assertEqual(dialog.state, DialogState.EARLY)
        dialog.confirm(self.ok)
        self.assertEqual(dialog.state, DialogState.CONFIRMED)
        self.assertEqual(str(dialog.remote_target), "sip:bot@192.0.2.30:5080")
        self.assertEqual(len(dialog.route_set), 2)


class TableTests(unittest.TestCase):
    def test_lookup_from_requests_and_responses(self):
        invite = parse_message(INVITE)
        table = DialogTable()
        uas = Dialog.as_uas(invite, "b2", US)
        table.add(uas)
        bye = parse_message(INVITE.replace(b"To: <sip:bot@example.com>", b"To: <sip:bot@example.com>;tag=b2"))
        self.assertEqual(request_dialog_id(bye), uas.id)
        self.assertIs(table.for_request(bye), uas)
        self.assertIsNone(table.for_request(invite))
        ours = uas.create_request("BYE")
        ours.headers.add("Via", "SIP/2.0/UDP 192.0.2.20;branch=z9hG4bKx")
        self.assertIs(table.for_response(make_response(ours, 200)), uas)
        table.remove(uas)
        self.assertEqual(len(table), 0)
