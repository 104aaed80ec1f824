"""DNS SRV server location (activecall.sip.dns, RFC 3263 §4.2): record choice, caching for the TTL,
fallbacks on task.Clock with a scripted resolver; then a real DNS server (twisted.names on loopback)
sending a call for ``sip:service@voice.test`` to sipp's uas on the port its SRV record names."""

import random
from collections import Counter

from twisted.internet import defer, reactor, task
from twisted.names import client, common, dns, error, server
from twisted.trial import unittest

from activecall.sip.dns import NoSipService, SrvLocator, choose, srv_name
from activecall.sip.message import Target, parse_uri, target_for_uri
from tests.test_sip_integration import LOCAL, LoopbackUA, minimal_offer, port_bound, sipp, sipp_result, udp_port, when


def srv(name, target, port, priority=10, weight=10, ttl=300):
    return dns.RRHeader(name, dns.SRV, dns.IN, ttl, dns.Record_SRV(priority, weight, port, target, ttl))


class Zone(common.ResolverBase):
    """A resolver answering from a dict: (name, type) -> [RRHeader]; counts the questions it got."""

    def __init__(self, records):
        super().__init__()
        self.records = records
        self.asked = Counter()

    def _lookup(self, name, cls, type, timeout):
        name = name.decode() if isinstance(name, bytes) else str(name)
        self.asked[(name, type)] += 1
        answers = self.records.get((name, type))
        if answers is None:
            return defer.fail(error.DNSNameError(name))
        return defer.succeed((answers, [], []))


class TargetTests(unittest.TestCase):
    def test_only_names_without_a_port_are_looked_up(self):
        self.assertTrue(target_for_uri(parse_uri("sip:bob@voice.test")).srv)
        self.assertFalse(target_for_uri(parse_uri("sip:bob@voice.test:5080")).srv)
        self.assertFalse(target_for_uri(parse_uri("sip:bob@192.0.2.1")).srv)
        self.assertFalse(target_for_uri(parse_uri("sip:bob@[2001:db8::1]")).srv)
        self.assertEqual(target_for_uri(parse_uri("sip:bob@voice.test")), Target("voice.test", 5060, "UDP"))

    def test_service_names(self):
        self.assertEqual(srv_name(Target("voice.test", 5060, "UDP")), "_sip._udp.voice.test")
        self.assertEqual(srv_name(Target("voice.test", 5060, "TCP")), "_sip._tcp.voice.test")
        self.assertEqual(srv_name(Target("voice.test.", 5061, "TLS")), "_sips._tcp.voice.test")

    def test_lowest_priority_then_weighted(self):
        records = [dns.Record_SRV(20, 100, 1, "backup"), dns.Record_SRV(10, 30, 2, "a"),
                   dns.Record_SRV(10, 10, 3, "b"), dns.Record_SRV(10, 0, 4, "never")]
        rng = random.Random(7)
        picks = Counter(str(choose(records, rng).target) for _ in range(4000))
        self.assertEqual(set(picks), {"a", "b"})  # never the backup; weight 0 among weighted ones: never
        self.assertTrue(abs(picks["a"] / 4000 - 0.75) < 0.04, picks)  # weights 30:10
        zero = [dns.Record_SRV(5, 0, 1, "x"), dns.Record_SRV(5, 0, 2, "y")]
        self.assertEqual({str(choose(zero, rng).target) for _ in range(50)}, {"x", "y"})


class LocatorTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.zone = Zone({
            ("_sip._udp.voice.test", dns.SRV): [srv("_sip._udp.voice.test", "sip1.voice.test", 5070, ttl=120)],
            ("_sip._udp.gone.test", dns.SRV): [srv("_sip._udp.gone.test", "", 0)],
        })
        self.locator = SrvLocator(self.clock, self.zone, random.Random(1))

    def locate(self, host, port=5060, transport="UDP"):
        return self.successResultOf(self.locator.locate(Target(host, port, transport, srv=True)))

    def test_srv_record_chosen_and_kept_for_its_ttl(self):
        self.assertEqual(self.locate("voice.test"), Target("sip1.voice.test", 5070, "UDP"))
        self.clock.advance(119)
        self.locate("voice.test")
        self.assertEqual(self.zone.asked[("_sip._udp.voice.test", dns.SRV)], 1)  # retransmissions: same server
        self.clock.advance(2)
        self.locate("voice.test")
        self.assertEqual(self.zone.asked[("_sip._udp.voice.test", dns.SRV)], 2)

    def test_no_records_fall_back_to_the_name_on_the_default_port(self):
        self.assertEqual(self.locate("plain.test", 5061, "TLS"), Target("plain.test", 5061, "TLS"))
        self.assertEqual(self.zone.asked[("_sips._tcp.plain.test", dns.SRV)], 1)

    def test_a_dot_target_means_no_sip_there(self):
        failure = self.failureResultOf(self.locator.locate(Target("gone.test", 5060, "UDP", srv=True)), NoSipService)
        self.assertIn("gone.test", str(failure.value))

    def test_concurrent_sends_share_one_lookup(self):
        slow = defer.Deferred()
        self.zone._lookup = lambda name, cls, type, timeout: slow if type == dns.SRV else defer.fail(
            error.DNSNameError(name))
        first = self.locator.locate(Target("voice.test", 5060, "UDP", srv=True))
        second = self.locator.locate(Target("voice.test", 5060, "UDP", srv=True))
        slow.callback(([srv("_sip._udp.voice.test", "sip2.voice.test", 5080)], [], []))
        a, b = self.successResultOf(first), self.successResultOf(second)
        self.assertEqual((a, a.port), (b, 5080))

    def test_addresses_and_explicit_ports_are_used_as_given(self):
        self.assertEqual(self.locate("192.0.2.1"), Target("192.0.2.1", 5060, "UDP"))
        target = Target("voice.test", 5090, "UDP")  # srv=False: the URI named its port
        self.assertIs(self.successResultOf(self.locator.locate(target)), target)
        self.assertEqual(sum(self.zone.asked.values()), 0)


class RealDnsTests(unittest.TestCase):
    """A DNS server on loopback answers SRV and A over the real protocol; sipp's uas takes the call."""

    @defer.inlineCallbacks
    def test_call_to_a_domain_reaches_the_server_its_srv_record_names(self):
        sipp_port = udp_port()
        zone = Zone({
            ("_sip._udp.voice.test", dns.SRV): [srv("_sip._udp.voice.test", "uas.voice.test", sipp_port)],
            ("uas.voice.test", dns.A): [dns.RRHeader("uas.voice.test", dns.A, dns.IN, 300,
                                                     dns.Record_A(LOCAL, 300))],
        })
        factory = server.DNSServerFactory(authorities=[zone])
        listening = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface=LOCAL)
        self.addCleanup(listening.stopListening)
        resolver = client.Resolver(servers=[(LOCAL, listening.getHost().port)], reactor=reactor)
        self.addCleanup(lambda: [p.transport.stopListening() for p in resolver._connectedProtocols]
                        if hasattr(resolver, "_connectedProtocols") else None)

        uas = sipp(self, "-p", str(sipp_port), builtin="uas")
        yield when(port_bound(sipp_port), 15, "sipp uas to bind its port")
        peer = LoopbackUA(self)
        peer.transport.locator = SrvLocator(reactor, resolver)
        call = peer.ua.place_call("sip:service@voice.test", minimal_offer(LOCAL, 30000))
        response = yield when(call.when_answered(), 8, "the 200 from sipp uas via the SRV record")
        self.assertEqual(response.status, 200)
        self.assertEqual(zone.asked[("_sip._udp.voice.test", dns.SRV)], 1)
        ended = yield when(call.hangup(), 5, "the BYE to be answered")
        self.assertEqual(ended.status, 200)
        yield sipp_result(uas)
