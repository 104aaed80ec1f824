"""The daemon: one MultiService whose children are the long-lived parts.

One ``build_*`` function per subsystem makes its objects and services;
``ActiveCallService`` wires them together and adds the services in start order.
Start-up and graceful shutdown are one service tree: children start in the
order they were added and stop one by one in reverse order (calls end and
their CDRs are written, HTTP closes, WebRTC peer connections close, SIP hangs
up what is left, unregisters and closes its transports, the ASR workers stop),
all within ``graceful_shutdown_timeout``.  docs/architecture.md, "Start-up".
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

from twisted.application import internet, service
from twisted.internet import defer, task
from twisted.internet.error import CannotListenError
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized

from activecall import __version__
from activecall.admission import Admission
from activecall.web.rest import Drain, SessionTable, install_api
from activecall.web.site import Admitted, ReadyResource, build_site
from activecall.web.ws import endpoint_resource
from activecall.call.cdr import writer_for
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

    What start-up built lives as long as the daemon: frozen, it is moved out of the
    collector's way, so a full collection scans only the objects calls create.  Young
    collections run every 10 000 new objects instead of 700, so a call's reference cycles
    are mostly garbage by the time they are looked at instead of being promoted and left
    for full collections, whose pauses delay call set-up and the media clock.  Measured
    in docs/benchmarks.md ("Calls per second")."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def exit_cleanly_after_signal(reactor) -> None:
    """Let a graceful shutdown that SIGTERM or SIGINT started end with exit status 0.

    Twisted's signal handlers record the signal on the reactor (``reactor._exitSignal``)
    and, once ``reactor.run()`` returns, twistd re-raises it on its own process with the
    default handler (``twisted.scripts.twistd.runApp``), so the daemon would end "killed by
    SIGTERM" even though every call was hung up and every CDR written.  Twisted offers no
    public way to say that a signal-initiated stop was a clean one (the attribute belongs to
    the private ``_ISupportsExitSignalCapturing``), so this is the one place that touches
    it; ``ExitSignalTests`` in tests/test_service.py show what twistd does without it."""
    if getattr(reactor, "_exitSignal", None) is not None:
        reactor._exitSignal = None


# -- builders: one per subsystem, each returns what it made; ActiveCallService wires them ------------


@dataclass
class Speech:
    """What calls need for speech: TTS per call, VAD/ASR per call, and the ASR worker processes."""

    synthesizer_for: Callable
    processor_factory: Callable
    #: the ASR worker processes (speech/asr/pool.py); the daemon's first child, so they stop last,
    #: after the calls' final utterances were decoded
    asr_workers: service.IService


def build_speech(config: Config) -> Speech:
    return Speech(
        synthesizer_for=synthesizer_factory(config.media_cache_path),
        processor_factory=attach_processors,
        asr_workers=AsrPoolService(),
    )


def build_cdr_writer(config: Config, reactor):
    """The writer of call detail records for ``[callrecord]``, or None without one.

    An upload spool (http, s3) that cannot be created or written stops start-up naming its key:
    records would otherwise live only in memory until the store took them."""
    section = config.callrecord
    if section is not None and section.type in ("http", "s3"):
        try:
            os.makedirs(section.spool_dir, exist_ok=True)
            if not os.access(section.spool_dir, os.W_OK | os.X_OK):
                raise PermissionError("not writable")
        except OSError as e:
            raise SystemExit(f"activecall: configuration error: {config.source}: key 'callrecord.spool_dir': "
                             f"cannot use {section.spool_dir!r}: {e.strerror or e}")
    return writer_for(section, reactor)


def build_call_manager(config: Config, reactor, media_clock: MediaClock, speech: Speech, cdr_writer,
                       sessions: dict, metrics: Metrics, pending_playbooks: PendingPlaybooks) -> CallManager:
    """The registry of live calls; ``sessions`` is the dict /list, /kill and /health read."""
    return CallManager(
        config, reactor, media_clock, sessions=sessions, metrics=metrics,
        synthesizer_for=speech.synthesizer_for, cdr_writer=cdr_writer,
        pending_playbooks=pending_playbooks, processor_factory=speech.processor_factory,
        playbook_starter=start_playbook,
    )


@dataclass
class SipStack:
    """The SIP side: transports, user agent, registrations, RTP ports and SIP calls as sessions."""

    transport: TransportManager
    user_agent: UserAgent
    registration: RegistrationService
    rtp_ports: object  # media.rtp.PortPool
    calls: object  # call.sip_call.SipCalls
    #: the services in start order: transports, transaction layer, registrations, user agent
    services: tuple


def build_sip(config: Config, reactor, call_manager: CallManager, media_clock: MediaClock,
              metrics: Metrics, registrations: dict) -> Optional[SipStack]:
    """The SIP stack, with inbound INVITEs routed to the call layer ([handler]).

    None on a reactor without UDP (a ``task.Clock`` in unit tests of the service tree has no
    network).  The services come in start order; the reverse, on shutdown, has the user agent
    hang up what is left (BYE / CANCEL / 503) before accounts unregister (Expires: 0), then the
    transactions are dropped and the transports close."""
    if not IReactorUDP.providedBy(reactor):
        return None
    transport = TransportManager(config, reactor=reactor, metrics=metrics)
    user_agent = UserAgent(config, transport, reactor=reactor)
    transport.on_message = user_agent.layer.message_received
    registration = RegistrationService(
        config, user_agent, reactor, states=registrations, gauge=metrics.sip_registration_up,
    )
    from activecall.call.sip_call import SipCalls
    from activecall.media.rtp import PortPool

    rtp_ports = PortPool(reactor, config.rtp_start_port, config.rtp_end_port,
                         interface=config.rtp_bind_ip or config.addr)
    sip_calls = SipCalls(config, user_agent, call_manager, media_clock, rtp_ports, reactor, metrics=metrics)
    # without it every inbound INVITE gets 503 "No invite handler configured"
    user_agent.invite_handler = sip_calls.on_invite
    user_agent.message_handler = sip_calls.on_message
    services = (transport, TransactionLayerService(user_agent.layer), registration, user_agent)
    return SipStack(transport, user_agent, registration, rtp_ports, sip_calls, services)


def build_webrtc(config: Config, reactor):
    """The open WebRTC peer connections (aiortc): as a service, it closes those still open once the
    calls have ended, and its own ``before shutdown`` trigger closes them if the grace period ran out
    (an open aiortc peer connection would hang the process at exit)."""
    from activecall.webrtc.leg import PeerConnections

    return PeerConnections(reactor, grace=config.graceful_shutdown_timeout)


def build_call_endpoints(config: Config, call_manager: CallManager, media_clock: MediaClock,
                         sip: Optional[SipStack], webrtc, admission: Optional[Admission] = None) -> dict:
    """The WebSocket endpoints: ``b""`` for ``/call`` itself, then ``/call/sip`` (with SIP) and
    ``/call/webrtc``, each making a session of its call type, each behind ``admission`` (a draining,
    full or overloaded node answers the upgrade 503; ``/call/sip?id=`` of a pending inbound call, which
    was admitted with its INVITE, always passes)."""
    endpoints = _call_endpoints(config, call_manager, media_clock, sip, webrtc)
    if admission is None:
        return endpoints

    def pending_inbound(request) -> bool:
        ids = (request.args or {}).get(b"id") or [b""]
        return sip is not None and ids[0].decode("utf-8", "replace") in sip.calls.pending

    return {name: Admitted(endpoint, admission.check, "websocket",
                           exempt=pending_inbound if name == b"sip" else (lambda request: False))
            for name, endpoint in endpoints.items()}


def _call_endpoints(config, call_manager, media_clock, sip, webrtc) -> dict:
    from activecall.webrtc.leg import WebRTCConnector

    endpoints = {b"": endpoint_resource(
        call_manager, "webSocket",
        lambda session, proto: WebSocketConnector(session, proto, media_clock), "/call",
    )}
    if sip is not None:
        from activecall.call.sip_call import SipConnector

        endpoints[b"sip"] = endpoint_resource(
            call_manager, "sip",
            lambda session, proto: SipConnector(session, proto, sip.calls), "/call/sip",
        )
    endpoints[b"webrtc"] = endpoint_resource(
        call_manager, "webrtc",
        lambda session, proto: WebRTCConnector(session, proto, media_clock, config, webrtc),
        "/call/webrtc",
    )
    return endpoints


def build_api_children(sip: Optional[SipStack], admission: Optional[Admission] = None,
                       drain: Optional[Callable[[str], dict]] = None) -> dict:
    """The routes under ``/api`` that need another part: ``POST /api/calls`` with SIP (behind
    ``admission``), ``POST /api/drain``."""
    children = {}
    if drain is not None:
        children[b"drain"] = Drain(drain)
    if sip is None:
        return children
    from activecall.web.originate import OriginateCall

    originate = OriginateCall(sip.calls)
    children[b"calls"] = originate if admission is None else Admitted(originate, admission.check, "originate")
    return children


def build_web(config: Config, health: Callable[[], dict], metrics: Metrics, on_metrics: Callable[[], None],
              sessions: dict, pending_playbooks: PendingPlaybooks, api_children: dict, call_endpoints: dict,
              admission: Optional[Admission] = None, clock=None, open_sip_session: Optional[Callable] = None):
    """The twisted.web Site: /health, /ready (with ``admission``), /metrics, the REST API, the /call
    endpoints, the event stream (``/events/{id}``, ``/command/{id}``, ``/call/subscribe``) and the console.

    Returns ``(site, api)``; ``api`` is what ``install_api`` made (``api.call`` is ``/call``)."""
    from activecall.web.events import CommandPost, EventStream, subscribe_resource
    from activecall.web.rest import TokenGuard, install_console

    ready = None if admission is None else ReadyResource(admission.status, admission.snapshot)
    site = build_site(health, metrics, skip_paths=config.http_access_skip_paths, on_metrics=on_metrics,
                      ready=ready)
    api = install_api(site.root, config, SessionTable(sessions), pending_playbooks, api_children=api_children)
    endpoints = dict(call_endpoints)
    api.call.websocket = endpoints.pop(b"", None)
    for name, endpoint in endpoints.items():
        api.call.putChild(name, endpoint)
    api.call.putChild(b"subscribe", subscribe_resource(sessions))
    if clock is None:
        from twisted.internet import reactor as clock
    site.root.putChild(b"events", TokenGuard(EventStream(sessions, clock), config.http_token))
    admit = admission.check if admission is not None else None
    site.root.putChild(b"command", TokenGuard(CommandPost(sessions, open_sip_session, admit), config.http_token))
    install_console(site.root)
    return site, api


def build_http_service(config: Config, site) -> internet.TCPServer:
    """The HTTP listener; a port it cannot bind stops start-up naming ``http_addr``."""
    host, port = config.http_host_port
    http = internet.TCPServer(port, site, interface=host)
    http.setName("http")
    http.config_key = "http_addr"
    return http


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
        self.pending_playbooks = PendingPlaybooks(reactor)
        self.media_clock = MediaClock(reactor)
        #: install our SIGTERM handler once running (the daemon only: not in a test process)
        self.handle_signals = False
        #: load the default voice once running, on its worker thread (the daemon only: not in a test process)
        self.warm_speech = False
        #: how a finished drain stops the daemon (tests replace it)
        self.stop_reactor: Callable[[], None] = self._stop_reactor
        self._drained: Optional[defer.Deferred] = None
        self._drain_checker: Optional[task.LoopingCall] = None
        self.admission = Admission(
            reactor, max_calls=config.max_calls, max_lag=config.max_event_loop_lag, load=self.load,
            drain_retry_after=config.graceful_shutdown_timeout,
            refused=lambda request, reason: self.metrics.refused.labels(request, reason).inc(),
        )
        speech = build_speech(config)
        self.call_manager = build_call_manager(
            config, reactor, self.media_clock, speech, build_cdr_writer(config, reactor),
            self.calls, self.metrics, self.pending_playbooks,
        )
        self.sip = build_sip(config, reactor, self.call_manager, self.media_clock, self.metrics,
                             self.registrations)
        if self.sip is not None:
            self.call_manager.sip_calls = self.sip.calls  # for refer (B2BUA) from any call type
            self.sip.user_agent.admit = self.admission.check  # 503 to new INVITEs and OPTIONS
        self.webrtc = build_webrtc(config, reactor)
        self.http_site, self.api = build_web(
            config, self.health, self.metrics, self._refresh_gauges, self.calls, self.pending_playbooks,
            api_children=build_api_children(self.sip, self.admission, self.drain),
            call_endpoints=build_call_endpoints(config, self.call_manager, self.media_clock, self.sip,
                                                self.webrtc, self.admission),
            admission=self.admission,
            clock=reactor, open_sip_session=self.sip.calls.open_session if self.sip is not None else None,
        )
        self.http_service = build_http_service(config, self.http_site)
        # Start order; shutdown stops them one by one in reverse: calls end (BYE, CDRs flushed)
        # while HTTP still answers, then HTTP closes, then WebRTC peer connections left open
        # close, then the SIP stack (see build_sip), and the ASR workers stop last.
        children = [speech.asr_workers, *(self.sip.services if self.sip else ()), self.webrtc,
                    self.http_service, CallsService(self.call_manager)]
        for child in children:
            child.setServiceParent(self)

    @property
    def sip_transport(self):
        return self.sip.transport if self.sip else None

    @property
    def user_agent(self):
        return self.sip.user_agent if self.sip else None

    @property
    def sip_registration(self):
        return self.sip.registration if self.sip else None

    @property
    def sip_calls(self):
        return self.sip.calls if self.sip else None

    @property
    def rtp_ports(self):
        return self.sip.rtp_ports if self.sip else None

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
        if self.config.call and self.sip is not None:  # --call places one outbound call once started
            self.sip.calls.place_cli_call(self.config.call)

    def _ready(self):
        if self.freeze_gc:
            tune_gc_for_daemon()
        if self.handle_signals:
            self._install_sigterm_handler()
        if self.warm_speech:
            self._warm_speech()
        self.admission.start()
        log.info("activecall ready")

    @staticmethod
    def _warm_speech():
        """The offline English voice (piper) loaded and run once on its worker thread, in the background:
        the first call's first audio does not pay the ~0.7 s of loading (docs/speech.md, TTS); likewise the
        offline English recogniser (moonshine).  Skipped when not installed; a failure is logged and the
        model loads on first use."""
        from activecall.speech.tts import piper
        if piper.available():
            piper.in_tts_thread(piper.warm).addErrback(lambda f: log.failure("warming the piper voice failed", f))
        # the offline English recogniser: Moonshine's model is rewritten at load (~2 s of CPU, more under
        # load), which the first caller's first words would otherwise wait for
        from activecall.speech.asr import moonshine
        if moonshine.available():
            moonshine.in_asr_thread(moonshine.warm).addErrback(
                lambda f: log.failure("loading the moonshine model failed", f))

    # -- drain ------------------------------------------------------------------------------------

    def _install_sigterm_handler(self):
        """SIGTERM drains instead of stopping at once (twistd's handler, installed before this runs,
        stops the reactor); a second SIGTERM stops at once, hanging up with BYEs.

        Like Twisted's own handler, it only hands the work to the reactor thread.  SIGINT keeps
        Twisted's handler: Ctrl-C stops at once, gracefully, as before."""
        import signal

        def on_sigterm(signum, frame):
            self.reactor.callFromThread(self.sigterm)

        signal.signal(signal.SIGTERM, on_sigterm)

    def sigterm(self):
        if self._drained is None and self.running:
            log.info("SIGTERM: draining (a second SIGTERM stops at once)")
            self.drain("SIGTERM")
        else:
            log.info("SIGTERM again: stopping now")
            self.stop_reactor()

    def load(self) -> int:
        """The calls this node holds: live sessions, and inbound SIP calls that have none yet (a webhook
        deciding, pending for ``/call/sip``, being answered).  Counted only with ``max_calls`` set."""
        held = len(self.calls)
        if self.sip is not None:
            from activecall.sip.uas import InboundCall

            held += sum(1 for call in self.sip.user_agent.calls
                        if isinstance(call, InboundCall) and not call.is_ended and call.dialog_id not in self.calls)
        return held

    def busy(self) -> bool:
        """Whether a call is still up: a session, or any SIP call (a pending inbound one, a transfer's leg)."""
        return bool(self.calls) or bool(self.sip is not None and self.sip.user_agent.calls)

    def drain(self, why: str = "drain") -> dict:
        """Take the node out of service: refuse new calls (SIP 503, /ready 503, WebSocket upgrades 503),
        unregister from the PBXs, let live calls go on until they end or ``graceful_shutdown_timeout``
        passes, then stop (the graceful shutdown: what is left is hung up, CDRs and recordings are
        written, exit 0).  Idempotent; returns the node's state (``POST /api/drain`` answers it)."""
        if self._drained is None:
            self.admission.drain()
            self.metrics.draining.set(1)
            wait = self.config.graceful_shutdown_timeout if self.config.graceful_shutdown else 0.0
            log.info("draining ({why}): new calls refused; waiting up to {wait}s for {n} live call(s)",
                     why=why, wait=wait, n=len(self.calls))
            # the accounts' un-REGISTERs (bounded, never failing) finish before the stop, even when no
            # call holds the node: the shutdown would drop their transactions (a digest challenge)
            unregistered = self.sip.registration.unregister() if self.sip is not None else defer.succeed(None)
            self._drained = defer.gatherResults([self._until_idle(wait), unregistered])
            self._drained.addCallback(lambda _: self.stop_reactor())
        return dict(self.admission.snapshot(), active_calls=len(self.calls))

    def _until_idle(self, wait: float) -> defer.Deferred:
        """Fires once no call is up (checked every 100 ms), or after ``wait`` seconds."""
        done = defer.Deferred()
        deadline = self.reactor.seconds() + wait

        def poll():
            if not self.busy():
                log.info("drained: no call left")
            elif self.reactor.seconds() >= deadline:
                log.info("drain: {n} call(s) still up after {wait}s; hanging up", n=len(self.calls), wait=wait)
            else:
                return
            checker.stop()
            done.callback(None)

        checker = self._drain_checker = task.LoopingCall(poll)
        checker.clock = self.reactor
        checker.start(0.1, now=True)
        return done

    def _stop_reactor(self):
        from twisted.internet.error import ReactorNotRunning

        try:
            self.reactor.stop()
        except ReactorNotRunning:  # already stopping (a second signal)
            pass

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
        self.admission.drain()  # what arrives while the calls are hung up is refused, not half set up
        self.admission.stop()
        if self._drain_checker is not None and self._drain_checker.running:
            self._drain_checker.stop()
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
        exit_cleanly_after_signal(self.reactor)

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
            # serving / draining, what the node holds, and whether it takes new calls (as /ready says)
            **self.admission.snapshot(),
            "ready": self.admission.status() is None,
            "version": __version__,
            "uptime": round(self.uptime(), 3),
            "active_calls": len(self.calls),
            "sip_registrations": [
                {"account": account, **state} for account, state in sorted(self.registrations.items())
            ],
            # leak indicators: both return to their idle values when every call has ended
            "rtp_ports_in_use": self.rtp_ports.in_use if self.rtp_ports else 0,
            "media_clock_legs": len(self.media_clock),
            "reactor_timers": self.reactor_timers(),
        }

    def reactor_timers(self) -> int:
        """Pending delayed calls on the reactor (a leak indicator like the two above)."""
        delayed = getattr(self.reactor, "getDelayedCalls", None)
        return len(delayed()) if delayed is not None else 0

    def _refresh_gauges(self):
        self.metrics.uptime_seconds.set(self.uptime())
        self.metrics.event_loop_lag_seconds.set(self.admission.lag_monitor.lag)
        self.metrics.media_clock_legs.set(len(self.media_clock))
        self.metrics.rtp_ports_in_use.set(self.rtp_ports.in_use if self.rtp_ports else 0)
        self.metrics.reactor_timers.set(self.reactor_timers())


class CallsService(service.Service):
    """Ends every call on shutdown and waits for their CDRs."""

    name = "calls"

    def __init__(self, manager):
        self.manager = manager

    def startService(self):
        service.Service.startService(self)
        resume = getattr(self.manager.cdr_writer, "resume", None)
        if resume is not None:  # http/s3 records an earlier run left in the spool go up now
            resume().addErrback(lambda f: log.failure("cannot read the call record spool", f))

    def stopService(self):
        service.Service.stopService(self)
        stop = getattr(self.manager.cdr_writer, "stop", None)
        if stop is not None:  # one attempt per record from now on; the rest stays spooled
            stop()
        return self.manager.end_all("system")


def build_service(config: Config, warnings=()) -> ActiveCallService:
    """The daemon for ``config``, with its log observer (raises OSError on log_file)."""
    observer = make_observer(config.log_level, config.log_file)
    daemon = ActiveCallService(config, warnings, observer=observer)
    daemon.freeze_gc = True
    daemon.handle_signals = True
    daemon.warm_speech = True
    return daemon
