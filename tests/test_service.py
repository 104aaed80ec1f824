"""The service tree in-process: ordered graceful shutdown, the grace period,
the log observer handed to twistd, /health and /metrics resources."""

import json
import signal

from twisted.application import app, service
from twisted.internet import defer, task
from twisted.internet.base import ReactorBase
from twisted.internet.interfaces import _ISupportsExitSignalCapturing
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.trial import unittest
from twisted.web.resource import getChildForRequest
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer

from activecall.config import load_config
from activecall.logs import make_observer
from activecall.web.rest import Unauthorized
from activecall.service import ActiveCallService, exit_cleanly_after_signal
from activecall.web.site import path_skipped


class Recorder(service.Service):
    def __init__(self, name, journal, deferred=None):
        self.setName(name)
        self.journal = journal
        self.deferred = deferred

    def stopService(self):
        service.Service.stopService(self)
        self.journal.append(("stop", self.name))
        return self.deferred


def make(clock=None, **overrides):
    cfg, _ = load_config(None, None)
    import dataclasses

    cfg = dataclasses.replace(cfg, http_addr="127.0.0.1:0", **overrides)
    return ActiveCallService(cfg, reactor=clock or task.Clock())


class ShutdownTests(unittest.TestCase):
    def test_children_stop_one_by_one_in_reverse_order(self):
        clock = task.Clock()
        svc = make(clock)
        svc.removeService(svc.http_service)
        journal = []
        slow = defer.Deferred()
        Recorder("first", journal).setServiceParent(svc)
        Recorder("second", journal, slow).setServiceParent(svc)
        Recorder("third", journal).setServiceParent(svc)
        svc.startService()
        done = svc.stopService()
        # "first" waits until "second" has finished stopping
        self.assertEqual(journal, [("stop", "third"), ("stop", "second")])
        slow.callback(None)
        self.assertEqual(journal[-1], ("stop", "first"))
        self.successResultOf(done)

    def test_the_daemons_children_in_start_order(self):
        """Shutdown is the reverse (docs/architecture.md, "Start-up"): calls end and their CDRs are
        written while HTTP and SIP still run; the user agent hangs up what is left before accounts
        unregister and the transports close; the ASR workers stop last."""
        cfg, _ = load_config(None, None)
        import dataclasses

        svc = ActiveCallService(dataclasses.replace(cfg, http_addr="127.0.0.1:0"))  # a reactor with UDP: SIP too
        self.assertEqual([child.name for child in svc], [
            "asr-workers", "sip-transport", "sip-transactions", "sip-registration", "sip-useragent",
            "webrtc", "http", "calls",
        ])
        self.assertEqual([child.name for child in make()], ["asr-workers", "webrtc", "http", "calls"])

    def test_grace_period_bounds_shutdown(self):
        clock = task.Clock()
        svc = make(clock, graceful_shutdown_timeout=3.0)
        svc.removeService(svc.http_service)
        Recorder("stuck", [], defer.Deferred()).setServiceParent(svc)
        svc.startService()
        done = svc.stopService()
        self.assertNoResult(done)
        clock.advance(2.9)
        self.assertNoResult(done)
        clock.advance(0.2)
        self.successResultOf(done)

    def test_no_graceful_shutdown_stops_quickly(self):
        clock = task.Clock()
        svc = make(clock, graceful_shutdown=False)
        svc.removeService(svc.http_service)
        Recorder("stuck", [], defer.Deferred()).setServiceParent(svc)
        svc.startService()
        done = svc.stopService()
        clock.advance(0.6)
        self.successResultOf(done)

    def test_clean_signal_exit(self):
        clock = task.Clock()
        clock._exitSignal = 15
        svc = make(clock)
        svc.removeService(svc.http_service)
        svc.startService()
        self.successResultOf(svc.stopService())
        self.assertIsNone(clock._exitSignal)


@implementer(_ISupportsExitSignalCapturing)
class SignalledReactor(task.Clock):
    """A reactor whose ``run()`` is SIGTERM arriving, then twistd's ``before shutdown`` trigger
    (``IService(application).stopService``), for the daemon given as ``shutdown``."""

    _exitSignal = None

    def __init__(self):
        super().__init__()
        self.shutdown = None

    def callFromThread(self, f, *args, **kw):
        f(*args, **kw)

    def stop(self):
        pass

    def run(self):
        ReactorBase.sigTerm(self, signal.SIGTERM)  # Twisted's own handler: it records the signal
        if self.shutdown is not None:
            self.shutdown.startService()
            self.shutdown.stopService()


def twistd_exit_signal(reactor) -> int | None:
    """What twistd's runner takes from the reactor after ``reactor.run()`` and re-raises on its own
    process (``twisted.scripts.twistd.runApp``): the signal the daemon would end "killed by"."""
    runner = app.ApplicationRunner.__new__(app.ApplicationRunner)
    runner.config = {"profile": False, "debug": False, "nodaemon": True}
    runner.profiler = None
    runner.startReactor(reactor, None, None)
    return runner._exitSignal


class ExitSignalTests(unittest.TestCase):
    """Why ``exit_cleanly_after_signal`` reaches into the reactor: twistd would otherwise end a
    daemon that SIGTERM stopped gracefully with "killed by SIGTERM" instead of exit status 0."""

    def test_twistd_reraises_the_signal_that_stopped_the_reactor(self):
        self.assertEqual(twistd_exit_signal(SignalledReactor()), signal.SIGTERM)

    def test_a_completed_graceful_shutdown_exits_cleanly(self):
        reactor = SignalledReactor()
        reactor.shutdown = make(reactor)
        reactor.shutdown.removeService(reactor.shutdown.http_service)
        self.assertIsNone(twistd_exit_signal(reactor))

    def test_reactors_without_the_attribute_are_left_alone(self):
        clock = task.Clock()
        exit_cleanly_after_signal(clock)
        self.assertFalse(hasattr(clock, "_exitSignal"))


class ObserverTests(unittest.TestCase):
    def test_observer_is_given_to_the_application(self):
        cfg, _ = load_config(None)
        observer = make_observer("info")
        svc = ActiveCallService(cfg, reactor=task.Clock(), observer=observer)
        app = service.Application("activecall")
        svc.setServiceParent(app)
        self.assertIs(app.getComponent(ILogObserver), observer)

    def test_level_filter_and_log_file(self):
        import io

        path = self.mktemp()
        stream = io.StringIO()
        observer = make_observer("warn", path, stream=stream)
        for level, text in [(LogLevel.debug, "dbg"), (LogLevel.info, "inf"),
                            (LogLevel.warn, "wrn"), (LogLevel.error, "err")]:
            observer({"log_level": level, "log_format": text, "log_time": 0, "log_namespace": "t"})
        out = stream.getvalue()
        self.assertNotIn("dbg", out)
        self.assertNotIn("inf", out)
        self.assertIn("wrn", out)
        self.assertIn("err", out)
        with open(path) as f:
            self.assertEqual(f.read(), out)


    def test_time_prefix_is_twisteds_once_per_second(self):
        import io

        from twisted.logger import formatTime

        stream = io.StringIO()
        observer = make_observer("info", stream=stream)
        times = [1_700_000_000.25, 1_700_000_000.75, 1_700_000_001.5, 1_700_000_000.5]
        for t in times:
            observer({"log_level": LogLevel.info, "log_format": "x", "log_time": t, "log_namespace": "t"})
        prefixes = [line.split(" ", 1)[0] for line in stream.getvalue().splitlines()]
        self.assertEqual(prefixes, [formatTime(t) for t in times])


class HTTPResourceTests(unittest.TestCase):
    def render(self, site, path):
        request = DummyRequest([path.encode()])
        resource = site.getResourceFor(request)
        body = resource.render(request)
        return request, body

    @defer.inlineCallbacks
    def test_health(self):
        svc = make()
        svc.registrations["1001@pbx"] = {"state": "registered", "expires": 3600}
        ended = []

        class FakeCall:
            def end(self, reason, initiator=None):
                ended.append(reason)
                return defer.succeed(self)

        svc.calls["c1"] = FakeCall()
        svc.startService()
        request, body = self.render(svc.http_site, "health")
        doc = json.loads(body)
        self.assertEqual(doc["status"], "ok")
        self.assertEqual(doc["active_calls"], 1)
        self.assertEqual(doc["sip_registrations"],
                         [{"account": "1001@pbx", "state": "registered", "expires": 3600}])
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"), [b"application/json"])
        yield svc.stopService()
        self.assertEqual(ended, ["system"])  # shutdown hangs up active calls

    def test_metrics(self):
        svc = make()
        svc.metrics.calls_total.labels(call_type="sip", reason="caller").inc()
        request, body = self.render(svc.http_site, "metrics")
        text = body.decode()
        self.assertIn('activecall_calls_total{call_type="sip",reason="caller"} 1.0', text)
        self.assertIn("activecall_uptime_seconds", text)
        # the leak indicators of /health, also as gauges (bench/bench_soak.py)
        for gauge in ("activecall_media_clock_legs 0.0", "activecall_rtp_ports_in_use 0.0"):
            self.assertIn(gauge, text)
        self.assertRegex(text, r"activecall_reactor_timers \d+\.0")
        self.assertEqual(svc.health()["reactor_timers"], len(svc.reactor.getDelayedCalls()))

    def test_api_children_are_behind_the_token(self):
        from twisted.web import resource

        from activecall.web.rest import install_api
        from activecall.call.handlers import PendingPlaybooks

        cfg, _ = load_config(None, None)
        import dataclasses

        cfg = dataclasses.replace(cfg, http_token="secret")
        root = resource.Resource()
        extra = resource.Resource()
        install_api(root, cfg, None, PendingPlaybooks(task.Clock()), api_children={b"calls": extra})
        request = DummyRequest([b"api", b"calls"])
        request.args = {b"token": [b"secret"]}
        self.assertIs(getChildForRequest(root, request), extra)
        request = DummyRequest([b"api", b"calls"])
        self.assertIsInstance(getChildForRequest(root, request), Unauthorized)

    def test_access_log_skip_patterns(self):
        skip = ["/health", "/metrics*"]
        self.assertTrue(path_skipped("/health", skip))
        self.assertFalse(path_skipped("/health/x", skip))
        self.assertTrue(path_skipped("/metrics", skip))
        self.assertTrue(path_skipped("/metrics/extra", skip))
        self.assertFalse(path_skipped("/call", skip))
        self.assertFalse(path_skipped("/anything", []))

    def test_access_log_goes_to_twisted_logger(self):
        svc = make(http_access_skip_paths=("/metrics*",))
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for path in (b"/health", b"/metrics"):
            request = DummyRequest([path.strip(b"/")])
            request.path = path
            request.uri = path
            request.method = b"GET"
            request.code = 200
            request.sentLength = 10
            svc.http_site.log(request)
        lines = [e.get("uri") for e in events if e.get("log_namespace") == "activecall.http"]
        self.assertEqual(lines, ["/health"])
