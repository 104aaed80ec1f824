"""REGISTER client (activecall.sip.registration) on task.Clock: refresh, digest, backoff, recovery, shutdown."""

from twisted.internet import defer
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from activecall.config import Credential, RegisterUser
from activecall.metrics import Metrics
from activecall.sip import auth
from activecall.sip.message import make_response
from activecall.sip.registration import Registration, RegistrationService, account_key, registrar_uri
from tests.test_sip_useragent import Harness

ACCOUNT = RegisterUser(server="192.0.2.10:5070", username="1001", expires=120,
                       credential=Credential("1001", "secret"))


class Registrar:
    """Answers the REGISTERs the harness captured."""

    def __init__(self, harness):
        self.h = harness

    def last(self):
        return self.h.net.requests("REGISTER")[-1]

    def count(self):
        return len(self.h.net.requests("REGISTER"))

    def ok(self, expires=None, contact=True):
        request = self.last()
        headers = []
        if contact:
            value = request.headers.get("Contact")
            headers.append(("Contact", value + (f";expires={expires}" if expires is not None else "")))
        self.h.deliver(make_response(request, 200, to_tag="reg", headers=headers))

    def challenge(self, nonce="n1"):
        value = str(auth.make_challenge("pbx", nonce=nonce))
        self.h.deliver(make_response(self.last(), 401, to_tag="reg", headers=[("WWW-Authenticate", value)]))


class RegistrationTests(unittest.TestCase):
    def setUp(self):
        self.h = Harness(self)
        self.metrics = Metrics()
        self.states = {}
        self.registrar = Registrar(self.h)
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def make(self, account=ACCOUNT):
        return Registration(account, self.h.ua, self.h.clock, self.states, self.metrics.sip_registration_up)

    def gauge(self, key="1001@192.0.2.10:5070"):
        return self.metrics.sip_registration_up.labels(account=key)._value.get()

    def test_register_with_digest_then_refresh_at_80_percent(self):
        reg = self.make()
        reg.start()
        first = self.registrar.last()
        self.assertEqual(str(first.uri), "sip:192.0.2.10:5070")
        self.assertEqual(str(first.to.uri), "sip:1001@192.0.2.10")
        self.assertEqual(first.headers.get("Expires"), "120")
        self.assertEqual(self.states["1001@192.0.2.10:5070"]["state"], "registering")
        self.registrar.challenge()
        retry = self.registrar.last()
        self.assertEqual((retry.cseq.seq, retry.call_id), (first.cseq.seq + 1, first.call_id))
        self.assertTrue(auth.verify_authorization(auth.parse_authorization(retry.headers.get("Authorization")),
                                                  "secret", "REGISTER"))
        self.registrar.ok(expires=100)
        state = self.states["1001@192.0.2.10:5070"]
        self.assertEqual((state["state"], state["expires"], state["last_error"]), ("registered", 100, None))
        self.assertNotIn("secret", repr(state))
        self.assertEqual(self.gauge(), 1)
        count = self.registrar.count()
        self.h.clock.advance(79.9)
        self.assertEqual(self.registrar.count(), count)
        self.h.clock.advance(0.2)
        self.assertEqual(self.registrar.count(), count + 1)
        self.assertEqual(self.registrar.last().call_id, first.call_id)

    def test_wrong_password_logs_clearly_and_backs_off(self):
        reg = self.make()
        reg.start()
        delays = []
        for _ in range(6):
            self.registrar.challenge()
            self.registrar.challenge()  # the same realm again: the password is wrong
            self.assertEqual(reg.state, "failed")
            count = self.registrar.count()
            waited = 0
            while self.registrar.count() == count:
                self.h.clock.advance(1)
                waited += 1
            delays.append(waited)
        self.assertEqual(delays, [30, 60, 120, 240, 300, 300])
        self.assertIn("authentication failed", reg.last_error)
        self.assertEqual(self.gauge(), 0)
        errors = [e for e in self.logged if "retrying in" in e.get("log_format", "")]
        self.assertTrue(errors)
        self.assertIn("check the password", errors[0]["error"])

    def test_timeout_then_recovery_resets_backoff(self):
        reg = self.make()
        reg.start()
        self.h.clock.advance(32.1)  # Timer F
        self.assertEqual(reg.state, "failed")
        self.assertIn("timeout", reg.last_error)
        self.h.clock.advance(30)
        self.assertEqual(reg.state, "registering")
        self.registrar.ok()
        self.assertEqual((reg.state, reg.failures, reg.granted), ("registered", 0, 120))

    def test_200_without_our_contact_registers_again(self):
        reg = self.make()
        reg.start()
        first = self.registrar.last()
        self.registrar.ok(contact=False)
        again = self.registrar.last()
        self.assertEqual(self.registrar.count(), 2)
        self.assertNotEqual(again.call_id, first.call_id)
        self.registrar.ok(expires=60)
        self.assertEqual((reg.state, reg.granted), ("registered", 60))

    def test_display_name_is_in_from_and_to(self):
        account = RegisterUser(server="192.0.2.10:5070", username="1001", display_name="AI agent",
                               credential=Credential("1001", "secret"))
        self.make(account).start()
        request = self.registrar.last()
        self.assertEqual(request.from_.display_name, "AI agent")
        self.assertEqual(request.to.display_name, "AI agent")
        self.assertIn('"AI agent" <sip:1001@192.0.2.10', request.headers.get("From"))

    def test_no_password_relies_on_ip_auth(self):
        account = RegisterUser(server="192.0.2.10:5070", username="trunk", credential=None)
        reg = self.make(account)
        reg.start()
        self.registrar.ok()
        self.assertEqual(reg.state, "registered")
        self.h.clock.advance(96 * 30)  # refreshes keep going
        self.registrar.challenge()
        self.assertEqual(reg.state, "failed")
        self.assertIn("IP authentication", reg.last_error)

    def test_interval_too_brief(self):
        reg = self.make()
        reg.start()
        self.h.deliver(make_response(self.registrar.last(), 423, to_tag="r", headers=[("Min-Expires", "600")]))
        self.assertEqual(self.registrar.last().headers.get("Expires"), "600")

    def test_stop_unregisters_within_bounded_time(self):
        reg = self.make()
        reg.start()
        self.registrar.ok()
        stopped = reg.stop()
        bye = self.registrar.last()
        self.assertEqual(bye.headers.get("Expires"), "0")
        self.assertNoResult(stopped)
        self.h.clock.advance(4.1)  # the registrar never answers
        self.successResultOf(stopped)
        self.assertEqual(reg.state, "unregistered")
        self.assertEqual(self.gauge(), 0)

    def test_stop_answers_challenge(self):
        reg = self.make()
        reg.start()
        self.registrar.ok()
        stopped = reg.stop()
        self.registrar.challenge("n2")
        self.assertIn("Authorization", self.registrar.last().headers)
        self.registrar.ok(expires=0)
        self.successResultOf(stopped)

    def test_service_skips_disabled_accounts(self):
        import dataclasses

        disabled = RegisterUser(server="192.0.2.11", username="off", disabled=True)
        h = self.h
        h.ua.config = dataclasses.replace(h.config, register_users=(ACCOUNT, disabled))
        svc = RegistrationService(h.ua.config, h.ua, h.clock, self.states, self.metrics.sip_registration_up)
        svc.startService()
        self.assertEqual([str(r.uri) for r in h.net.requests("REGISTER")], ["sip:192.0.2.10:5070"])
        self.assertEqual(list(self.states), ["1001@192.0.2.10:5070"])
        self.registrar.ok()
        d = svc.stopService()
        self.registrar.ok(expires=0)
        self.successResultOf(d)

    def test_helpers(self):
        self.assertEqual(str(registrar_uri("pbx.example.com:5080")), "sip:pbx.example.com:5080")
        self.assertEqual(str(registrar_uri("sip:pbx.example.com")), "sip:pbx.example.com")
        self.assertEqual(account_key(ACCOUNT), "1001@192.0.2.10:5070")


class NatTests(unittest.TestCase):
    """The registrar says where it saw us (Via received/rport): the binding moves to that address."""

    def setUp(self):
        self.h = Harness(self)
        self.states = {}
        self.registrar = Registrar(self.h)

    def ok_seen_from(self, host, port, contact=True):
        request = self.registrar.last()
        via = request.top_via
        via.params["received"] = host
        via.params["rport"] = str(port)
        headers = [("Contact", v) for v in request.headers.get_all("Contact")] if contact else []
        response = make_response(request, 200, to_tag="reg", headers=headers)
        response.headers.set("Via", str(via))
        self.h.deliver(response)

    def test_binding_moves_to_the_public_address_and_unbinds_the_old_one(self):
        reg = Registration(ACCOUNT, self.h.ua, self.h.clock, self.states)
        reg.start()
        first = self.registrar.last()
        private = first.contacts[0].uri
        self.ok_seen_from("203.0.113.7", 40123)
        again = self.registrar.last()
        self.assertEqual(self.registrar.count(), 2)
        bindings = {(c.uri.host, c.uri.port): c.params.get("expires") for c in again.contacts}
        # the public Contact bound (Expires header), the private one unbound in the same request
        self.assertEqual(bindings, {("203.0.113.7", 40123): None, (private.host, private.port): "0"})
        self.assertEqual(again.call_id, first.call_id)
        self.ok_seen_from("203.0.113.7", 40123)  # the same address: settled
        self.assertEqual(self.registrar.count(), 2)
        self.assertEqual(reg.state, "registered")
        self.assertEqual(self.states[reg.key]["public_address"], "203.0.113.7:40123")
        self.h.clock.advance(120)  # the refresh keeps the public Contact
        refresh = self.registrar.last()
        self.assertEqual([(c.uri.host, c.uri.port) for c in refresh.contacts], [("203.0.113.7", 40123)])

    def test_a_registrar_that_keeps_changing_its_mind_moves_us_once_per_cycle(self):
        reg = Registration(ACCOUNT, self.h.ua, self.h.clock, self.states)
        reg.start()
        self.ok_seen_from("203.0.113.7", 40001)
        self.ok_seen_from("203.0.113.7", 40002)
        self.assertEqual((self.registrar.count(), reg.state), (2, "registered"))

    def test_no_nat_no_move(self):
        reg = Registration(ACCOUNT, self.h.ua, self.h.clock, self.states)
        reg.start()
        contact = self.registrar.last().contacts[0].uri
        self.ok_seen_from(contact.host, contact.port)
        self.assertEqual((self.registrar.count(), reg.state, reg.public), (1, "registered", None))

    def test_external_ip_is_trusted_over_what_the_registrar_saw(self):
        self.h.ua.config = self.h.ua.config.__class__(**{**vars(self.h.ua.config), "external_ip": "198.51.100.9"})
        reg = Registration(ACCOUNT, self.h.ua, self.h.clock, self.states)
        reg.start()
        self.ok_seen_from("203.0.113.7", 40123)
        self.assertEqual((self.registrar.count(), reg.state, reg.public), (1, "registered", None))
