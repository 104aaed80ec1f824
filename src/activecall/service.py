"""The daemon: one MultiService whose children are the long-lived parts.

Start-up and graceful shutdown are one service tree.  Children start in the
order they were added and stop one by one in reverse order (first stop
accepting work, then end calls, unregister, flush CDRs), all within
``graceful_shutdown_timeout``.
"""

from __future__ import annotations

import gc
import os
import time
from typing import Optional

from twisted.application import internet, service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized

from activecall import __version__
from activecall.web.rest import SessionTable, install_api
from activecall.web.site import build_site
from activecall.web.ws import endpoint_resource
from activecall.call.handlers import PendingPlaybooks
from activecall.call.manager import CallManager
from activecall.call.speech import attach_processors, synthesizer_factory
from activecall.call.websocket_call import WebSocketConnector
from activecall.media.clock import MediaClock
from activecall.playbook.start import start_playbook
from activecall.speech.asr.pool import PoolService as AsrPoolService
from activecall.config import Config, redacted
from activecall.logs import make_observer
from activecall.metrics import Metrics
from activecall.sip.registration import RegistrationService  # SIP block
from activecall.sip.transport import TransportManager  # SIP block
from activecall.sip.useragent import TransactionLayerService, UserAgent  # SIP block
from twisted.internet.interfaces import IReactorUDP  # SIP block

log = Logger(namespace="activecall")


def tune_gc_for_daemon() -> None:
    """The collector settings of a running daemon (called once start-up is done).

    What start-up built lives as long as the daemon: moved out of the collector's way,
    every full collection scans only the objects calls create (it scanned ~90 000 more).
    Young collections every 10 000 new objects instead of 700: a call's reference cycles
    are then mostly garbage by the time they are looked at, instead of being promoted and
    left for full collections (at 300 calls/s: a 50-70 ms full collection every 3-4 s
    before, p99 setup 28 ms; one in 40 s after, young ones 2-3 ms)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


class ActiveCallService(service.MultiService):
    """The whole daemon.  ``reactor`` is injected so tests can use their own."""

    def __init__(self, config: Config, warnings=(), reactor=None, observer=None):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.reactor = reactor
        self.warnings = list(warnings)
        self.observer = observer
        #: ``gc.freeze()`` and GC thresholds once running (the daemon only: not in a test process)
        self.freeze_gc = False
        self.metrics = Metrics()
        self.started_at: Optional[float] = None
        #: session id -> call session (filled by the call layer)
        self.calls: dict = {}
        #: account -> registration state (filled by the SIP registration client)
        self.registrations: dict = {}
        self.http_site = build_site(
            self.health,
            self.metrics,
            skip_paths=config.http_access_skip_paths,
            on_metrics=self._refresh_gauges,
        )
        self.pending_playbooks = PendingPlaybooks(reactor)
        self.api = install_api(
            self.http_site.root, config, SessionTable(self.calls), self.pending_playbooks
        )
        # -- calls: sessions, the /call WebSocket endpoint, speech -----------------
        self.media_clock = MediaClock(reactor)
        self.call_manager = CallManager(
            config, reactor, self.media_clock, sessions=self.calls, metrics=self.metrics,
            synthesizer_for=synthesizer_factory(config.media_cache_path),
            pending_playbooks=self.pending_playbooks, processor_factory=attach_processors,
            playbook_starter=start_playbook,
        )
        self.api.call.websocket = endpoint_resource(
            self.call_manager, "webSocket",
            lambda session, proto: WebSocketConnector(session, proto, self.media_clock), "/call",
        )
        # -- ASR worker processes (speech/asr/pool.py): the first child, so they stop last, after
        # the calls' final utterances were decoded.
        AsrPoolService().setServiceParent(self)
        # -- SIP (issue 3): transports, user agent, registration -----------------------
        # Added before HTTP and the calls service, so on shutdown call sessions end first,
        # then the user agent hangs up what is left (BYE / CANCEL / 503), then accounts
        # unregister (Expires: 0), then transactions are dropped and the transports close.
        # The call layer plugs in with ``self.user_agent.invite_handler = callable(InboundCall)``;
        # until then every inbound INVITE gets 503 "No invite handler configured".  A task.Clock
        # reactor (unit tests of the service tree) has no network, so SIP is left out there.
        self.sip_transport = self.user_agent = self.sip_registration = None
        if IReactorUDP.providedBy(reactor):
            self.sip_transport = TransportManager(config, reactor=reactor, metrics=self.metrics)
            self.user_agent = UserAgent(config, self.sip_transport, reactor=reactor)
            self.sip_transport.on_message = self.user_agent.layer.message_received
            self.sip_registration = RegistrationService(
                config, self.user_agent, reactor, states=self.registrations,
                gauge=self.metrics.sip_registration_up,
            )
            self.sip_transport.setServiceParent(self)
            TransactionLayerService(self.user_agent.layer).setServiceParent(self)
            self.sip_registration.setServiceParent(self)
            self.user_agent.setServiceParent(self)
            # SIP calls as sessions: inbound routing ([handler]) and the /call/sip endpoint
            from activecall.call.sip_call import SipCalls, SipConnector
            from activecall.media.rtp import PortPool

            self.rtp_ports = PortPool(reactor, config.rtp_start_port, config.rtp_end_port,
                                      interface=config.rtp_bind_ip or config.addr)
            self.sip_calls = SipCalls(config, self.user_agent, self.call_manager, self.media_clock,
                                      self.rtp_ports, reactor, metrics=self.metrics)
            self.user_agent.invite_handler = self.sip_calls.on_invite
            self.call_manager.sip_calls = self.sip_calls  # for refer (B2BUA) from any call type
            from activecall.web.originate import OriginateCall

            self.api.guarded[b"api"].wrapped.putChild(b"calls", OriginateCall(self.sip_calls))
            self.api.call.putChild(b"sip", endpoint_resource(
                self.call_manager, "sip",
                lambda session, proto: SipConnector(session, proto, self.sip_calls), "/call/sip",
            ))
        # -- end of the SIP block ------------------------------------------------------------
        # -- WebRTC (issue 6): /call/webrtc over aiortc, and the browser console at / --------
        # PeerConnections is added before HTTP and the calls service, so on shutdown it stops
        # after every call has ended and closes any peer connection still open; its own
        # ``before shutdown`` trigger also closes them if the grace period runs out (an open
        # aiortc peer connection would hang the process at exit).
        from activecall.web.rest import install_console
        from activecall.webrtc.leg import PeerConnections, WebRTCConnector

        self.webrtc = PeerConnections(reactor, grace=config.graceful_shutdown_timeout)
        self.webrtc.setServiceParent(self)
        self.api.call.putChild(b"webrtc", endpoint_resource(
            self.call_manager, "webrtc",
            lambda session, proto: WebRTCConnector(session, proto, self.media_clock, config, self.webrtc),
            "/call/webrtc",
        ))
        install_console(self.http_site.root)
        # -- end of the WebRTC block ---------------------------------------------------------
        host, port = config.http_host_port
        self.http_service = internet.TCPServer(port, self.http_site, interface=host)
        self.http_service.setName("http")
        self.http_service.config_key = "http_addr"
        self.http_service.setServiceParent(self)
        # added after http, so on shutdown calls end (BYE, CDRs flushed) before HTTP closes
        CallsService(self.call_manager).setServiceParent(self)

    # -- twistd integration ---------------------------------------------------

    def setServiceParent(self, parent):
        """Give twistd's application our log observer (level filter + log_file)."""
        if self.observer is not None and isinstance(parent, Componentized):
            if parent.getComponent(ILogObserver, None) is None:
                parent.setComponent(ILogObserver, self.observer)
        return super().setServiceParent(parent)

    # -- lifecycle ----------------------------------------------------------------

    def startService(self):
        self.started_at = time.monotonic()
        for w in self.warnings:
            log.warn("configuration: {warning}", warning=w)
        log.info(
            "activecall {version} starting (config {source}, pid {pid})",
            version=__version__, source=self.config.source, pid=os.getpid(),
        )
        log.debug("configuration: {cfg}", cfg=redacted(self.config))
        service.Service.startService(self)
        self._start_children("startService")
        log.info("HTTP listening on {addr}", addr=self.http_address())
        # after-startup: signal handlers are installed by then, so SIGTERM is graceful
        when_running = getattr(self.reactor, "callWhenRunning", lambda f: f())  # task.Clock has none
        when_running(self._ready)
        if self.config.call:  # SIP block: --call places one outbound call once started
            if self.user_agent is not None:
                self.sip_calls.place_cli_call(self.config.call)

    def _ready(self):
        if self.freeze_gc:
            tune_gc_for_daemon()
        log.info("activecall ready")

    def privilegedStartService(self):
        service.Service.privilegedStartService(self)
        self._start_children("privilegedStartService")

    def _start_children(self, method: str):
        """Start each child; a port we cannot bind stops start-up naming its key."""
        for child in self:
            try:
                getattr(child, method)()
            except CannotListenError as e:
                key = getattr(child, "config_key", child.name)
                where = f"{e.interface or '0.0.0.0'}:{e.port}"
                raise SystemExit(f"activecall: cannot listen on {key} {where}: {e.socketError}")

    def stopService(self):
        """Stop children one by one in reverse order, within the grace period."""
        log.info("activecall stopping")
        self.running = 0
        timeout = self.config.graceful_shutdown_timeout if self.config.graceful_shutdown else 0.5

        @defer.inlineCallbacks
        def stop_in_order():
            for child in reversed(list(self)):
                try:
                    yield defer.maybeDeferred(child.stopService)
                except defer.CancelledError:
                    raise  # the grace period ran out
                except Exception:
                    log.failure("stopping {name} failed", name=child.name)

        d = stop_in_order()
        d.addTimeout(timeout, self.reactor)

        def timed_out(failure):
            failure.trap(defer.TimeoutError, defer.CancelledError)
            log.warn("graceful shutdown took longer than {t}s; stopping anyway", t=timeout)

        d.addErrback(timed_out)
        d.addCallback(self._stopped)
        return d

    def _stopped(self, _):
        self.pending_playbooks.clear()
        self.media_clock.close()  # every call has ended; its timerfd goes
        log.info("activecall stopped")
        # twistd re-raises the signal that stopped it so the exit status says
        # "killed by SIGTERM"; a completed graceful shutdown is a clean exit 0.
        if getattr(self.reactor, "_exitSignal", None) is not None:
            self.reactor._exitSignal = None

    # -- status ----------------------------------------------------------------------

    def uptime(self) -> float:
        return 0.0 if self.started_at is None else time.monotonic() - self.started_at

    def http_address(self) -> str:
        port = getattr(self.http_service, "_port", None)
        if port is None:
            return self.config.http_addr
        addr = port.getHost()
        return f"{addr.host}:{addr.port}"

    def health(self) -> dict:
        """The /health document."""
        return {
            "status": "ok" if self.running else "stopping",
            "version": __version__,
            "uptime": round(self.uptime(), 3),
            "active_calls": len(self.calls),
            "sip_registrations": [
                {"account": account, **state} for account, state in sorted(self.registrations.items())
            ],
            # leak indicators: both return to their idle values when every call has ended
            "rtp_ports_in_use": self.rtp_ports.in_use if getattr(self, "rtp_ports", None) else 0,
            "media_clock_legs": len(self.media_clock),
        }

    def _refresh_gauges(self):
        self.metrics.uptime_seconds.set(self.uptime())


class CallsService(service.Service):
    """Ends every call on shutdown and waits for their CDRs."""

    name = "calls"

    def __init__(self, manager):
        self.manager = manager

    def stopService(self):
        service.Service.stopService(self)
        return self.manager.end_all("system")


def build_service(config: Config, warnings=()) -> ActiveCallService:
    """The daemon for ``config``, with its log observer (raises OSError on log_file)."""
    observer = make_observer(config.log_level, config.log_file)
    daemon = ActiveCallService(config, warnings, observer=observer)
    daemon.freeze_gc = True
    return daemon
