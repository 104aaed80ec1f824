"""``[[trunk_rules]]``: From / To / Contact of outgoing INVITEs and REFERs rewritten per trunk, as they go
on the wire (the in-memory transport parses what we send), and the start-up checks of the table."""

import os

from twisted.trial import unittest

from activecall.config import ConfigError, TrunkRule, load_config
from activecall.sip.message import make_response
from activecall.sip.sdp_offer import minimal_offer
from tests.test_sip_useragent import US, Harness, sdp

CARRIER = TrunkRule(match=r"^sip:(\d+)@carrier\.example", from_='"ACME" <sip:+15550100@carrier.example>',
                    to="sip:+1$1@carrier.example", contact="<sip:trunk-acme@203.0.113.5:5060>")


class WireTests(unittest.TestCase):
    def place(self, h, target):
        call = h.ua.place_call(target, minimal_offer(US, 30000), caller="sip:bot@example.com")
        return call, h.net.requests("INVITE")[-1]

    def test_invite_to_the_trunk_is_rewritten(self):
        h = Harness(self, trunk_rules=(CARRIER,))
        call, invite = self.place(h, "sip:5551234@carrier.example")
        self.assertEqual(str(invite.uri), "sip:5551234@carrier.example")  # the target is [[rewrites]]' job
        self.assertEqual(invite.from_.display_name, "ACME")
        self.assertEqual(str(invite.from_.uri), "sip:+15550100@carrier.example")
        self.assertTrue(invite.from_.tag)
        self.assertEqual(str(invite.to.uri), "sip:+15551234@carrier.example")
        self.assertIsNone(invite.to.tag)
        self.assertEqual(str(invite.contacts[0].uri), "sip:trunk-acme@203.0.113.5:5060")
        # the dialog follows what went on the wire: the BYE carries the rewritten From with its tag
        h.answer_to(invite, 200, body=sdp())
        call.hangup()
        bye = h.net.requests("BYE")[-1]
        self.assertEqual(str(bye.from_.uri), "sip:+15550100@carrier.example")
        self.assertEqual(bye.from_.tag, invite.from_.tag)

    def test_other_targets_are_left_alone(self):
        h = Harness(self, trunk_rules=(CARRIER,))
        call, invite = self.place(h, "sip:bob@192.0.2.10:5070")
        self.assertEqual(str(invite.from_.uri), "sip:bot@example.com")
        self.assertEqual(str(invite.to.uri), "sip:bob@192.0.2.10:5070")
        self.assertNotIn("203.0.113.5", invite.headers.get("Contact"))

    def test_refer_is_rewritten_with_the_dialog_tags_kept(self):
        rule = TrunkRule(match=r"@192\.0\.2\.10", from_="sip:agent@trunk.example", contact="sip:t@203.0.113.9")
        h = Harness(self, trunk_rules=(rule,))
        call, invite = self.place(h, "sip:bob@192.0.2.10:5070")
        h.answer_to(invite, 200, body=sdp())
        call.transfer("sip:carol@192.0.2.40")
        refer = h.net.requests("REFER")[-1]
        self.assertEqual(str(refer.from_.uri), "sip:agent@trunk.example")
        self.assertEqual(refer.from_.tag, invite.from_.tag)
        self.assertEqual(refer.to.tag, "callee")
        self.assertEqual(str(refer.contacts[0].uri), "sip:t@203.0.113.9")
        h.deliver(make_response(refer, 202))

    def test_methods_limit_the_rule(self):
        """A REFER-only rule leaves the INVITE alone (an INVITE rule's From is the dialog's anyway)."""
        rule = TrunkRule(match=r"@192\.0\.2\.10", from_="sip:agent@trunk.example", methods=("REFER",))
        h = Harness(self, trunk_rules=(rule,))
        call, invite = self.place(h, "sip:bob@192.0.2.10:5070")
        self.assertEqual(str(invite.from_.uri), "sip:bot@example.com")
        h.answer_to(invite, 200, body=sdp())
        call.transfer("sip:carol@192.0.2.40")
        refer = h.net.requests("REFER")[-1]
        self.assertEqual(str(refer.from_.uri), "sip:agent@trunk.example")
        self.assertEqual(refer.from_.tag, invite.from_.tag)


class ConfigTests(unittest.TestCase):
    def load(self, text):
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(text)
        return load_config(path)[0]

    def error(self, text) -> ConfigError:
        with self.assertRaises(ConfigError) as ctx:
            self.load(text)
        return ctx.exception

    def test_the_table_loads(self):
        cfg = self.load('[[trunk_rules]]\nmatch = "@carrier"\nfrom = "sip:+1555@carrier"\n'
                        'contact = "<sip:t@203.0.113.5>"\nmethods = ["invite"]\n')
        self.assertEqual(cfg.trunk_rules, (TrunkRule(match="@carrier", from_="sip:+1555@carrier",
                                                     contact="<sip:t@203.0.113.5>", methods=("INVITE",)),))

    def test_bad_values_stop_start_up_naming_the_key(self):
        cases = [
            ('match = "(" \nfrom = "sip:a@b"', "trunk_rules[0].match"),
            ('match = "x"\nfrom = "alice"', "trunk_rules[0].from"),
            ('match = "x"\nto = "tel:+1"', "trunk_rules[0].to"),
            ('from = "sip:a@b"', "trunk_rules[0].match"),
            ('match = "x"', "trunk_rules[0]"),
            ('match = "x"\nfrom = "sip:a@b"\nmethods = ["BYE"]', "trunk_rules[0].methods"),
            ('match = "x"\nfrom = "sip:a@b"\nheaders = "x"', "trunk_rules[0].headers"),
        ]
        for body, key in cases:
            e = self.error("[[trunk_rules]]\n" + body + "\n")
            self.assertEqual(e.key, key, f"{body!r}: {e}")
