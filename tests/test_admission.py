"""Admission of new calls (activecall/admission.py): the event-loop-lag guard on task.Clock, max_calls, the
draining state; the SIP user agent's 503 + Retry-After to INVITE and OPTIONS before any call exists; the
daemon's drain (SIGTERM, POST /api/drain) with its clock injected; /ready and the guarded /call* routes."""

import dataclasses
import json

from twisted.internet import task
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyRequest

from activecall.admission import Admission, LagMonitor, Refusal
from activecall.config import ConfigError, load_config
from activecall.service import ActiveCallService
from activecall.web.site import Admitted, ReadyResource
from tests.test_sip_useragent import Harness, peer_request


class LagMonitorTests(unittest.TestCase):
    def test_on_time_timers_are_no_lag(self):
        clock = task.Clock()
        monitor = LagMonitor(clock, interval=0.1)
        monitor.start()
        clock.pump([0.1] * 20)
        self.assertEqual((monitor.last, monitor.lag), (0.0, 0.0))
        monitor.stop()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_a_late_timer_is_measured_and_smoothed(self):
        clock = task.Clock()
        samples = []
        monitor = LagMonitor(clock, interval=0.1, smoothing=0.5, on_sample=samples.append)
        monitor.start()
        clock.advance(1.1)  # the loop was busy for a second: the timer due at 0.1 runs at 1.1
        self.assertAlmostEqual(monitor.last, 1.0)
        self.assertAlmostEqual(monitor.lag, 0.5)
        clock.advance(0.1)  # the next one is on time
        self.assertEqual(monitor.last, 0.0)
        self.assertAlmostEqual(monitor.lag, 0.25)
        self.assertEqual(len(samples), 2)

    def test_a_sample_counts_for_at_most_the_cap(self):
        clock = task.Clock()
        monitor = LagMonitor(clock, interval=0.1, smoothing=0.5, cap=0.2)
        monitor.start()
        clock.advance(5.1)
        self.assertAlmostEqual(monitor.last, 5.0)
        self.assertAlmostEqual(monitor.lag, 0.1)


def admission(clock=None, **kw):
    clock = clock or task.Clock()
    refused = []
    a = Admission(clock, refused=lambda request, reason: refused.append((request, reason)), **kw)
    return a, clock, refused


class AdmissionTests(unittest.TestCase):
    def test_serving_admits(self):
        a, _, refused = admission(max_calls=2, load=lambda: 1)
        self.assertIsNone(a.check("invite"))
        self.assertEqual(refused, [])

    def test_max_calls_refuses_at_the_cap(self):
        load = [2]
        a, _, refused = admission(max_calls=2, load=lambda: load[0])
        self.assertEqual(a.check("invite"), Refusal("max_calls", 5, "Too Many Calls"))
        load[0] = 1
        self.assertIsNone(a.check("websocket"))
        self.assertEqual(refused, [("invite", "max_calls")])

    def test_no_cap_never_counts(self):
        def load():
            raise AssertionError("load() must not run without max_calls")

        a, _, _ = admission(load=load)
        self.assertIsNone(a.check("invite"))

    def test_draining_comes_first_and_says_when_to_come_back(self):
        a, _, refused = admission(max_calls=1, load=lambda: 5, drain_retry_after=7.2)
        a.drain()
        self.assertEqual(a.check("options"), Refusal("draining", 8, "Draining"))
        self.assertEqual(refused, [("options", "draining")])
        self.assertEqual(a.snapshot()["state"], "draining")

    def test_a_loop_that_keeps_running_late_trips_the_guard_which_clears_at_half(self):
        a, clock, refused = admission(max_lag=0.5, lag_interval=0.1)
        a.start()
        clock.advance(0.1)
        self.assertIsNone(a.check("invite"))
        # one stall, however long (a collection, a model loaded once), never trips it on its own
        clock.advance(30.0)
        self.assertAlmostEqual(a.lag_monitor.last, 29.9)
        self.assertFalse(a.overloaded)
        self.assertIsNone(a.check("invite"))
        clock.pump([0.1] * 20)
        # the loop keeps running ~0.6 s late: the smoothed lag passes 0.5 s after a few samples
        for _ in range(3):
            clock.advance(0.7)
            self.assertFalse(a.overloaded)
        clock.pump([0.7] * 3)
        self.assertTrue(a.overloaded)
        self.assertEqual(a.check("invite"), Refusal("overload", 5, "Overloaded"))
        self.assertEqual(a.check("options").reason, "overload")
        # on time again: it clears once the smoothed lag is under half the limit
        clock.advance(0.1)
        self.assertTrue(a.overloaded)
        clock.pump([0.1] * 10)
        self.assertFalse(a.overloaded)
        self.assertIsNone(a.check("invite"))
        self.assertEqual(refused, [("invite", "overload"), ("options", "overload")])
        a.stop()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_lag_guard_off(self):
        a, clock, _ = admission(max_lag=0.0)
        a.start()
        self.assertFalse(a.lag_monitor.running)
        self.assertEqual(clock.getDelayedCalls(), [])


class ConfigTests(unittest.TestCase):
    def test_defaults(self):
        cfg, _ = load_config(None, None)
        self.assertEqual((cfg.max_calls, cfg.max_event_loop_lag), (0, 0.5))

    def test_bad_values_name_the_key(self):
        import os

        for text, key in (("max_calls = -1\n", "max_calls"), ('max_event_loop_lag = "soon"\n', "max_event_loop_lag")):
            path = os.path.abspath(self.mktemp() + ".toml")
            with open(path, "w") as f:
                f.write(text)
            with self.assertRaises(ConfigError) as caught:
                load_config(path, None)
            self.assertIn(key, str(caught.exception))


class UserAgentRefusalTests(unittest.TestCase):
    """A refused INVITE or OPTIONS gets 503 with Retry-After; no call is made, the handler never sees it."""

    def harness(self, refusal):
        h = Harness(self)
        asked = []
        h.ua.admit = lambda request: (asked.append(request), refusal)[1]
        return h, asked

    def test_invite_refused_before_any_call_exists(self):
        h, asked = self.harness(Refusal("draining", 10, "Draining"))
        h.deliver(peer_request("INVITE"))
        response = h.net.responses(method="INVITE")[-1]
        self.assertEqual((response.status, response.reason), (503, "Draining"))
        self.assertEqual(response.headers.get("Retry-After"), "10")
        self.assertEqual((h.calls, h.ua.calls, asked), ([], [], ["invite"]))

    def test_options_refused(self):
        h, asked = self.harness(Refusal("max_calls", 5, "Too Many Calls"))
        h.deliver(peer_request("OPTIONS"))
        response = h.net.last()
        self.assertEqual((response.status, response.headers.get("Retry-After")), (503, "5"))
        self.assertEqual(asked, ["options"])

    def test_admitted_invite_and_options_as_before(self):
        h, asked = self.harness(None)
        h.deliver(peer_request("OPTIONS"))
        self.assertEqual(h.net.last().status, 200)
        call = h.inbound()
        self.assertIs(h.ua.calls[0], call)
        self.assertEqual(asked, ["options", "invite"])

    def test_in_dialog_requests_of_a_live_call_still_pass_while_draining(self):
        h, _ = self.harness(None)
        call, ok = h.established_inbound()
        h.ua.admit = lambda request: Refusal("draining", 10, "Draining")
        h.deliver(peer_request("BYE", call_id=ok.call_id, from_tag=ok.from_.tag, to_tag=ok.to.tag, cseq=2))
        self.assertEqual(h.net.responses(method="BYE")[-1].status, 200)
        self.assertTrue(call.is_ended)


def make_service(**overrides):
    cfg, _ = load_config(None, None)
    cfg = dataclasses.replace(cfg, http_addr="127.0.0.1:0", **overrides)
    clock = task.Clock()
    svc = ActiveCallService(cfg, reactor=clock)  # a Clock has no UDP: no SIP stack
    svc.removeService(svc.http_service)
    stops = []
    svc.stop_reactor = lambda: stops.append(clock.seconds())
    svc.startService()
    return svc, clock, stops


class ServiceDrainTests(unittest.TestCase):
    def test_an_idle_node_stops_at_once(self):
        svc, clock, stops = make_service()
        state = svc.drain("test")
        self.assertEqual((state["state"], state["active_calls"]), ("draining", 0))
        self.assertEqual(stops, [0.0])
        self.assertEqual(svc.health()["state"], "draining")
        self.assertFalse(svc.health()["ready"])
        self.assertEqual(svc.metrics.draining._value.get(), 1)

    def test_live_calls_go_on_until_they_end(self):
        svc, clock, stops = make_service(graceful_shutdown_timeout=60.0)
        svc.calls["a"] = object()
        svc.drain("test")
        clock.pump([0.1] * 100)
        self.assertEqual(stops, [])
        del svc.calls["a"]
        clock.advance(0.1)
        self.assertEqual(len(stops), 1)
        self.assertAlmostEqual(stops[0], 10.1)
        svc.drain("again")  # idempotent
        self.assertEqual(len(stops), 1)

    def test_at_most_graceful_shutdown_timeout(self):
        svc, clock, stops = make_service(graceful_shutdown_timeout=3.0)
        svc.calls["a"] = object()
        svc.drain("test")
        clock.pump([0.1] * 29)
        self.assertEqual(stops, [])
        clock.pump([0.1] * 2)
        self.assertEqual(len(stops), 1)

    def test_the_accounts_unregister_before_the_stop(self):
        """An idle node still waits for its un-REGISTERs (a digest challenge takes a round trip more)."""
        from types import SimpleNamespace

        from twisted.internet import defer

        svc, clock, stops = make_service()
        unregistered = defer.Deferred()
        svc.sip = SimpleNamespace(registration=SimpleNamespace(unregister=lambda: unregistered),
                                  user_agent=SimpleNamespace(calls=[]))
        svc.drain("test")
        clock.advance(1)
        self.assertEqual(stops, [])
        unregistered.callback(None)
        self.assertEqual(stops, [1.0])

    def test_second_sigterm_stops_at_once(self):
        svc, clock, stops = make_service(graceful_shutdown_timeout=60.0)
        svc.calls["a"] = object()
        svc.sigterm()
        self.assertTrue(svc.admission.draining)
        self.assertEqual(stops, [])
        clock.advance(1)
        svc.sigterm()
        self.assertEqual(stops, [1.0])

    def test_without_graceful_shutdown_sigterm_stops_at_once(self):
        svc, clock, stops = make_service(graceful_shutdown=False)
        svc.calls["a"] = object()
        svc.sigterm()
        self.assertEqual(stops, [0.0])

    def test_shutdown_refuses_what_arrives_meanwhile(self):
        svc, clock, _ = make_service()
        svc.stopService()
        self.assertEqual(svc.admission.status().reason, "draining")


def render(resource, path=b"/", method=b"GET", args=None):
    request = DummyRequest([path])
    request.method = method
    request.args = args or {}
    body = resource.render(request)
    return request, (body if isinstance(body, bytes) else b"".join(request.written))


class WebTests(unittest.TestCase):
    def test_ready_200_then_503_with_the_reason(self):
        a, _, refused = admission()
        ready = ReadyResource(a.status, a.snapshot)
        request, body = render(ready)
        self.assertEqual(request.responseCode or 200, 200)
        self.assertTrue(json.loads(body)["ready"])
        a.drain()
        request, body = render(ready)
        self.assertEqual(request.responseCode, 503)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"retry-after"), [b"10"])
        document = json.loads(body)
        self.assertEqual((document["ready"], document["reason"], document["state"]), (False, "draining", "draining"))
        self.assertEqual(refused, [])  # a probe is not a refused call

    def test_a_guarded_route_is_refused_before_it_runs(self):
        ran = []

        class Endpoint(Resource):
            isLeaf = True

            def render(self, request):
                ran.append(request)
                return b"upgraded"

        a, _, refused = admission(max_calls=1, load=lambda: 1)
        guarded = Admitted(Endpoint(), a.check, "websocket")
        request, body = render(guarded)
        self.assertEqual(request.responseCode, 503)
        self.assertEqual(json.loads(body)["reason"], "max_calls")
        self.assertEqual((ran, refused), ([], [("websocket", "max_calls")]))
        exempt = Admitted(Endpoint(), a.check, "websocket", exempt=lambda request: True)
        self.assertEqual(render(exempt)[1], b"upgraded")
