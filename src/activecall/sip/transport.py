"""SIP transports (RFC 3261 §18, RFC 3581): UDP, TCP and TLS as Twisted protocols.

``TransportManager`` is one ``Service``: it listens on UDP ``addr:udp_port``,
TCP ``addr:sip_tcp_port`` and TLS ``addr:tls_port`` (when configured), parses
everything that arrives and hands each message to one callback,
``on_message(msg, source_addr, transport)`` — normally
``TransactionLayer.message_received``.  It sends requests to a ``Target`` and
responses back the way RFC 3261 §18.2.2 and RFC 3581 say (the connection the
request came on, else ``received``/``rport`` of the top Via).

Malformed input is answered with 400 when a response can be formed and dropped
otherwise; a stream that loses framing is closed.  Nothing a peer sends can
raise out of a protocol method.  Malformed input is counted
(``activecall_sip_malformed_total{reason,transport}``) and logged through a
``SummaryLog``: the first of a reason at once, then one summary line per reason
per minute, never a line per datagram (docs/sip.md, "Hostile input").
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from typing import Callable, Optional

from twisted.application import service
from twisted.internet import defer, protocol, ssl
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from activecall.logs import SummaryLog
from activecall.sip.dns import NoSipService, SrvLocator
from activecall.sip.message import (
    MAX_MESSAGE_SIZE,
    dns_name_fits,
    Message,
    Request,
    Response,
    SIPParseError,
    Target,
    Via,
    default_port,
    format_host,
    message_length,
    make_response,
    parse_message,
    reason_detail,
)

log = Logger(namespace="activecall.sip.transport")

#: close a TCP/TLS connection after this long without traffic (seconds)
IDLE_TIMEOUT = 300.0

#: the largest UDP payload over IPv4 (65535 - 8 - 20): ``sendto()`` refuses more (MessageLengthError)
MAX_DATAGRAM = 65507

#: seconds between summary lines about malformed input (per reason)
MALFORMED_LOG_INTERVAL = 60.0

#: ``activecall_sip_malformed_total`` reasons
MALFORMED_REASONS = (
    "unparseable",  # not a SIP message we can read, no 400 possible: dropped
    "bad_request",  # a request we cannot use but can answer: 400
    "bad_via",  # the top Via cannot be stamped with received/rport: dropped
    "framing",  # a TCP/TLS stream lost its framing (bad or huge Content-Length): closed
    "invalid",  # parsed, then refused by the transaction layer (e.g. a broken CSeq or Via): dropped
)

MessageCallback = Callable[[Message, tuple, str], None]


class SendError(Exception):
    """A message could not be sent (no route, connection refused, TLS failure)."""


# -- pure helpers ----------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def is_ip(host: str) -> bool:
    """An IP literal (no name to resolve); remembered: asked for every message sent."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def stamp_via(request: Request, source_host: str, source_port: int) -> None:
    """Add ``received`` and fill ``rport`` on the top Via (RFC 3261 §18.2.1, RFC 3581 §4)."""
    via = request.top_via
    changed = False
    if via.host != source_host:
        via.params["received"] = source_host
        changed = True
    if via.wants_rport and via.rport is None:
        via.params["rport"] = str(source_port)
        via.params.setdefault("received", source_host)
        changed = True
    if changed:
        request.headers.remove_first("Via")
        request.headers.prepend("Via", str(via))


def response_target(via: Via) -> Target:
    """Where a response goes when it cannot use the request's connection.

    UDP: ``received``:``rport`` when the client asked for rport (RFC 3581 §4),
    else ``received`` (or sent-by) with the sent-by port.  TCP/TLS: a new
    connection to ``received`` (or sent-by) at the sent-by port — ``rport``
    there is the peer's ephemeral source port, which accepts no connections
    (RFC 3261 §18.2.2).
    """
    host = via.received or via.host
    sent_by_port = via.port or default_port(via.transport)
    if Target(host, 0, via.transport).reliable:
        return Target(host, sent_by_port, via.transport)
    return Target(host, via.rport or sent_by_port, via.transport)


def bad_request(error: SIPParseError, agent: str = "activecall",
                max_size: Optional[int] = None) -> Optional[Response]:
    """The 400 for a malformed request, if one can be formed.

    The problem is named twice: in the reason phrase, which every log shows,
    and in a ``Warning: 399`` header (RFC 3261 §20.43) for tools that read it.
    ``max_size``: the most the serialised 400 may take (a UDP datagram, RFC 3261
    §18.2.2); when the full one does not fit, the bare minimum (Via, From, To,
    Call-ID, CSeq, "Bad Request") is tried; None when even that does not fit.
    """
    if not error.can_respond:
        return None
    detail = reason_detail(error.reason)
    agent = "".join(ch for ch in agent if ch.isalnum() or ch in "-._!%*+`'~") or "activecall"
    try:
        response = make_response(error.partial, 400, f"Bad Request ({detail})",
                                 headers=[("Warning", f'399 {agent} "{detail}"')])
        if max_size is None or len(response.to_bytes()) <= max_size:
            return response
        response = make_response(error.partial, 400, "Bad Request")
        return response if len(response.to_bytes()) <= max_size else None
    except (SIPParseError, ValueError):
        return None


def guess_local_ip() -> str:
    """The first non-loopback IPv4 address (a UDP connect sends no packet)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


# -- protocols ----------------------------------------------------------------------------


class SIPDatagramProtocol(protocol.DatagramProtocol):
    """UDP: one datagram is one message (or a CRLF keep-alive)."""

    def __init__(self, manager: "TransportManager"):
        self.manager = manager

    def datagramReceived(self, data: bytes, addr):
        if not data.strip(b"\r\n\x00 "):
            return  # keep-alive
        self.manager._incoming(data, (addr[0], addr[1]), "UDP", reply=self._reply_to(addr))

    def _reply_to(self, addr):
        def reply(response: Response):
            self.transport.write(response.to_bytes(), addr)

        return reply


@implementer(IHandshakeListener)
class SIPStreamProtocol(protocol.Protocol, TimeoutMixin):
    """TCP/TLS: messages framed by Content-Length; CRLF keep-alives tolerated.

    ``ready`` fires once the connection can carry messages: at connect for
    TCP, after a verified handshake for TLS; it fails if the connection is
    lost first (refused, certificate rejected).
    """

    def __init__(self, manager: "TransportManager", transport_name: str):
        self.manager = manager
        self.transport_name = transport_name
        self.buffer = bytearray()
        #: length of the message being received, once its head is complete
        self._expected: Optional[int] = None
        #: bytes of the buffer already scanned for the end of the head
        self._searched = 0
        self.peer: Optional[tuple] = None
        self.ready: defer.Deferred = defer.Deferred()
        #: opened by us: someone waits on ``ready`` and must hear of a failure
        self.outbound = False
        self.callLater = manager.reactor.callLater  # TimeoutMixin's clock

    def connectionMade(self):
        peer = self.transport.getPeer()
        self.peer = (peer.host, peer.port)
        self.setTimeout(self.manager.idle_timeout)
        if not self.outbound:
            self.manager._connection_made(self)  # ours are listed once ready (verified, for TLS)
        if self.transport_name != "TLS":
            self.ready.callback(self)

    def handshakeCompleted(self):
        if not self.ready.called:
            self.ready.callback(self)

    def connectionLost(self, reason=ConnectionDone):
        self.setTimeout(None)
        self.manager._connection_lost(self)
        if self.outbound and not self.ready.called:
            self.ready.errback(SendError(f"{self.transport_name} connection to {self.peer} lost: "
                                         f"{reason.getErrorMessage() if isinstance(reason, Failure) else reason}"))

    def timeoutConnection(self):
        log.debug("closing idle {transport} connection to {peer}", transport=self.transport_name, peer=self.peer)
        self.transport.loseConnection()

    def send(self, data: bytes) -> None:
        self.resetTimeout()
        self.transport.write(data)

    def _reply(self, response: Response) -> None:
        self.send(response.to_bytes())

    def dataReceived(self, data: bytes):
        self.resetTimeout()
        self.buffer += data
        while self.buffer:
            if self._expected is None:
                if self.buffer[:1] in (b"\r", b"\n"):
                    self._keepalive()
                    if self.buffer[:1] in (b"\r", b"\n"):
                        return  # maybe the start of a double-CRLF ping
                    continue
                try:
                    self._expected = message_length(self.buffer, self._searched)
                except SIPParseError as e:
                    self.manager.report_malformed("framing", self.peer, self.transport_name,
                                                  f"{e.reason}; connection closed")
                    del self.buffer[:]
                    self.transport.loseConnection()
                    return
                if self._expected is None:
                    self._searched = len(self.buffer)
                    return
            if len(self.buffer) < self._expected:
                return
            message = bytes(self.buffer[:self._expected])
            del self.buffer[:self._expected]
            self._expected, self._searched = None, 0
            self.manager._incoming(message, self.peer, self.transport_name, reply=self._reply, stream=True)

    def _keepalive(self) -> None:
        """Consume CRLFs between messages; answer a double-CRLF ping with a pong (RFC 5626 §4.4.1)."""
        while self.buffer.startswith(b"\r\n\r\n"):
            del self.buffer[:4]
            self.transport.write(b"\r\n")
        crlfs = len(self.buffer) - len(self.buffer.lstrip(b"\r\n"))
        if crlfs == len(self.buffer) and crlfs < 4:
            return  # keep it: the rest of a ping may follow
        del self.buffer[:crlfs]


class SIPStreamFactory(protocol.Factory):
    def __init__(self, manager: "TransportManager", transport_name: str):
        self.manager = manager
        self.transport_name = transport_name

    def buildProtocol(self, addr):
        return SIPStreamProtocol(self.manager, self.transport_name)


# -- the manager ------------------------------------------------------------------------------


class TransportManager(service.Service):
    """Listeners, outbound connections and routing for every SIP transport.

    ``config_key`` names the listener being bound, so a port that cannot be
    bound stops the daemon naming the right key.
    """

    name = "sip-transport"
    config_key = "udp_port"

    def __init__(self, config, on_message: Optional[MessageCallback] = None, reactor=None,
                 idle_timeout: float = IDLE_TIMEOUT, metrics=None,
                 malformed_log_interval: float = MALFORMED_LOG_INTERVAL):
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.on_message = on_message
        self.reactor = reactor
        self.idle_timeout = idle_timeout
        self.udp = SIPDatagramProtocol(self)
        self._ports: dict[str, object] = {}
        #: bound ports (the configured ones, or what the OS picked for 0)
        self.ports: dict[str, int] = {}
        #: (transport, host, port) -> live stream protocol
        self.connections: dict[tuple, SIPStreamProtocol] = {}
        #: (transport, host, port) -> Deferreds waiting for a connection being opened
        self._connecting: dict[tuple, list] = {}
        self._server_tls = None
        self._local_ip: Optional[str] = None
        self.locator = SrvLocator(reactor)  # tests hand it a resolver for their own DNS server
        #: ``activecall_sip_malformed_total`` (a Metrics' counter), when the daemon has metrics
        self.malformed_counter = metrics.sip_malformed if metrics is not None else None
        self.malformed_log = SummaryLog(log, reactor, what="malformed SIP messages",
                                        interval=malformed_log_interval)
        #: malformed messages seen, by (reason, transport): the counter's values without metrics
        self.malformed: dict[tuple[str, str], int] = {}
        #: (exception type, file, line) of parser bugs already logged with their traceback
        self._parser_bugs: set = set()

    # -- service --

    def startService(self):
        cfg = self.config
        self.config_key = "udp_port"
        port = self.reactor.listenUDP(cfg.udp_port, self.udp, interface=cfg.addr, maxPacketSize=MAX_MESSAGE_SIZE)
        self._bound("UDP", port)
        if cfg.sip_tcp_port:
            self.config_key = "tcp_port"
            self._bound("TCP", self.reactor.listenTCP(cfg.sip_tcp_port, SIPStreamFactory(self, "TCP"), interface=cfg.addr))
        if cfg.tls_port:
            self.config_key = "tls_port"
            self._server_tls = server_tls_options(cfg.tls_cert_file, cfg.tls_key_file)
            self._bound("TLS", self.reactor.listenSSL(
                cfg.tls_port, SIPStreamFactory(self, "TLS"), self._server_tls, interface=cfg.addr
            ))
        self.config_key = "udp_port"
        super().startService()
        log.info("SIP listening on {listeners} (advertising {host})",
                 listeners=", ".join(f"{t} {cfg.addr}:{p}" for t, p in self.ports.items()),
                 host=self.advertised_host)

    def _bound(self, transport: str, port) -> None:
        self._ports[transport] = port
        self.ports[transport] = port.getHost().port

    def stopService(self):
        super().stopService()
        self.malformed_log.stop()
        waits = [defer.maybeDeferred(p.stopListening) for p in self._ports.values()]
        for conn in list(set(self.connections.values())):
            conn.transport.loseConnection()
        self._ports.clear()
        return defer.gatherResults(waits, consumeErrors=True).addCallback(lambda _: None)

    # -- addresses --

    @property
    def advertised_host(self) -> str:
        """What goes into Via and Contact: external_ip, else addr, else a local IP."""
        if self.config.external_ip:
            return self.config.external_ip
        if self.config.addr not in ("0.0.0.0", "::"):
            return self.config.addr
        if self._local_ip is None:
            self._local_ip = guess_local_ip()
        return self._local_ip

    def port_for(self, transport: str) -> int:
        transport = transport.upper()
        if transport in self.ports:
            return self.ports[transport]
        return {"UDP": self.config.udp_port, "TCP": self.config.sip_tcp_port,
                "TLS": self.config.tls_port or 5061}.get(transport, self.config.udp_port)

    def local_via(self, transport: str = "UDP") -> Via:
        """A Via for a request we send (the transaction layer adds the branch)."""
        return Via(transport.upper(), self.advertised_host, self.port_for(transport), {"rport": None})

    def contact_uri(self, user: Optional[str] = None, transport: str = "UDP") -> str:
        """``sip:user@advertised:port`` (``sips:`` and ``;transport=tls`` for TLS)."""
        transport = transport.upper()
        scheme = "sips" if transport == "TLS" else "sip"
        userpart = f"{user}@" if user else ""
        param = "" if transport == "UDP" else f";transport={transport.lower()}"
        return f"{scheme}:{userpart}{format_host(self.advertised_host)}:{self.port_for(transport)}{param}"

    # -- receiving --

    def _incoming(self, data: bytes, source: tuple, transport: str, reply, stream: bool = False) -> None:
        try:
            msg = parse_message(data, stream=stream)
        except SIPParseError as e:
            max_size = MAX_DATAGRAM if transport.upper() == "UDP" else None
            response = bad_request(e, self.config.useragent.split("/")[0], max_size)
            if response is not None:
                outcome = "; answered 400"
            elif e.can_respond:
                outcome = "; its 400 does not fit in a datagram: dropped"
            else:
                outcome = ""
            self.report_malformed("bad_request" if response is not None else "unparseable", source, transport,
                                  e.reason + outcome)
            if response is not None:
                try:
                    reply(response)
                except Exception as send_error:  # e.g. a datagram the network refuses: rate-limited
                    self.malformed_log("400 not sent", source, f"{send_error.__class__.__name__}: {send_error}")
            return
        except Exception as e:  # a parser bug: the message is dropped, the reactor never sees it
            self._parser_bug(e, source, transport)
            return
        if isinstance(msg, Request):
            try:
                stamp_via(msg, source[0], source[1])
            except SIPParseError as e:
                self.report_malformed("bad_via", source, transport, e.reason)
                return
        if self.on_message is None:
            log.warn("no SIP message handler: dropping {msg!r}", msg=msg)
            return
        try:
            self.on_message(msg, source, transport)
        except Exception:
            log.failure("SIP message handler failed on {msg!r}", msg=msg)

    def _parser_bug(self, error: Exception, source, transport: str) -> None:
        """``parse_message`` raised something other than ``SIPParseError``: a bug.  Its traceback is
        logged once per place it escaped from (a flood of the same input logs one), and the message
        is counted and summarised as unparseable."""
        tb = error.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = (error.__class__.__name__, tb.tb_frame.f_code.co_filename if tb else "", tb.tb_lineno if tb else 0)
        if where not in self._parser_bugs and len(self._parser_bugs) < 32:
            self._parser_bugs.add(where)
            log.failure("SIP parser failed on a message from {source}", Failure(error), source=source)
        self.report_malformed("unparseable", source, transport,
                              f"internal parser error {error.__class__.__name__}: {error}")

    def report_malformed(self, reason: str, source, transport: str, detail: str = "") -> None:
        """Count one malformed message (``reason``: one of ``MALFORMED_REASONS``) and log it
        rate-limited; ``detail`` is the parser's complaint (shown sanitised and shortened)."""
        transport = transport.upper()
        key = (reason, transport)
        self.malformed[key] = self.malformed.get(key, 0) + 1
        if self.malformed_counter is not None:
            self.malformed_counter.labels(reason=reason, transport=transport).inc()
        self.malformed_log(f"{reason}, {transport}", source, detail)

    def _connection_made(self, conn: SIPStreamProtocol) -> None:
        self.connections[(conn.transport_name, conn.peer[0], conn.peer[1])] = conn

    def _connection_lost(self, conn: SIPStreamProtocol) -> None:
        for key in [k for k, v in self.connections.items() if v is conn]:
            del self.connections[key]

    # -- sending --

    def send_request(self, request: Request, target: Target) -> defer.Deferred:
        """Send to ``target``; fails with ``SendError`` when that is impossible."""
        return self._send(request.to_bytes(), target)

    def send_response(self, response: Response, source: Target) -> defer.Deferred:
        """Back over the request's connection if it is alive, else per the top Via."""
        data = response.to_bytes()
        if source.reliable:
            conn = self.connections.get((source.transport, source.host, source.port))
            if conn is not None:
                conn.send(data)
                return defer.succeed(None)
        try:
            target = response_target(response.top_via)
        except SIPParseError as e:
            return defer.fail(SendError(f"response without a usable Via: {e.reason}"))
        if not source.reliable:
            target = Target(target.host, target.port, "UDP")
        return self._send(data, target)

    def _send(self, data: bytes, target: Target) -> defer.Deferred:
        if not is_ip(target.host) and not dns_name_fits(target.host):
            # a name from a parameter the parser takes as text (Via received=, a URI's maddr=) no DNS can hold
            return defer.fail(SendError(f"cannot send to {target.host[:80]!r}: not a valid host name"))
        if target.srv:  # a domain: its SIP servers come from DNS SRV (sip/dns.py)
            d = self.locator.locate(target)
            d.addCallback(lambda located: self._send(data, located))

            def no_service(failure):
                failure.trap(NoSipService)
                raise SendError(failure.getErrorMessage())

            return d.addErrback(no_service)
        transport = target.transport.upper()
        if transport == "UDP":
            return self._send_udp(data, target)
        if transport in ("TCP", "TLS"):
            d = self._connection(target)
            d.addCallback(lambda conn: conn.send(data))
            return d
        return defer.fail(SendError(f"transport {transport} is not supported"))

    def _send_udp(self, data: bytes, target: Target) -> defer.Deferred:
        if self.udp.transport is None:
            return defer.fail(SendError("the UDP transport is not listening"))
        if is_ip(target.host):
            d = defer.succeed(target.host)
        else:
            d = self.reactor.resolve(target.host)

        def write(ip):
            try:
                self.udp.transport.write(data, (ip, target.port))
            except Exception as e:
                raise SendError(f"UDP send to {ip}:{target.port} failed: {e}") from e

        def unresolved(failure):
            failure.trap(Exception)
            if failure.check(SendError):
                return failure
            raise SendError(f"cannot send to {target.host}:{target.port}: {failure.getErrorMessage()}")

        return d.addCallback(write).addErrback(unresolved)

    def _connection(self, target: Target) -> defer.Deferred:
        """A live connection to ``target``, reusing or sharing one being opened."""
        key = (target.transport.upper(), target.host, target.port)
        conn = self.connections.get(key)
        if conn is not None:
            return defer.succeed(conn)
        if key in self._connecting:
            waiting: defer.Deferred = defer.Deferred()
            self._connecting[key].append(waiting)
            return waiting
        self._connecting[key] = waiters = []
        try:
            endpoint = HostnameEndpoint(self.reactor, target.host, target.port, timeout=10)
            if key[0] == "TLS":
                endpoint = wrapClientTLS(self.client_tls_options(target.host), endpoint)
        except Exception as e:
            del self._connecting[key]
            return defer.fail(SendError(f"cannot set up {key[0]} to {target.host}: {e}"))
        proto = SIPStreamProtocol(self, key[0])
        proto.outbound = True
        d = connectProtocol(endpoint, proto)
        d.addCallback(lambda _: proto.ready)

        def connected(conn):
            self._connecting.pop(key, None)
            # listed under the name we dialled and the peer's address, and only now:
            # a TLS connection still shaking hands is not one to reuse yet
            self._connection_made(conn)
            self.connections[key] = conn
            for w in waiters:
                w.callback(conn)
            return conn

        def failed(failure):
            self._connecting.pop(key, None)
            error = SendError(f"cannot connect to {key[0]} {target.host}:{target.port}: {failure.getErrorMessage()}")
            for w in waiters:
                w.errback(Failure(error))
            raise error

        return d.addCallbacks(connected, failed)

    def client_tls_options(self, hostname: str):
        """Verify the peer against tls_ca_file or the system trust, unless disabled."""
        cfg = self.config
        client_cert = None
        if cfg.tls_cert_file and cfg.tls_key_file:
            client_cert = load_private_certificate(cfg.tls_cert_file, cfg.tls_key_file)
        if not cfg.tls_verify_peer:
            log.warn("TLS peer verification is disabled (tls_verify_peer = false)")
            kwargs = {}
            if client_cert is not None:
                kwargs = {"privateKey": client_cert.privateKey.original,
                          "certificate": client_cert.original}
            return ssl.CertificateOptions(verify=False, **kwargs)
        if cfg.tls_ca_file:
            with open(cfg.tls_ca_file, "rb") as f:
                trust = ssl.trustRootFromCertificates(
                    [ssl.Certificate.loadPEM(pem) for pem in split_pem(f.read())]
                )
        else:
            trust = ssl.platformTrust()
        return ssl.optionsForClientTLS(hostname, trustRoot=trust, clientCertificate=client_cert)


# -- TLS material ----------------------------------------------------------------------------


def split_pem(data: bytes) -> list[bytes]:
    """Every certificate block in a PEM file (a chain or a CA bundle)."""
    marker = b"-----END CERTIFICATE-----"
    return [block.strip() + b"\n" + marker + b"\n" for block in data.split(marker)[:-1]]


def load_private_certificate(cert_file: str, key_file: str) -> ssl.PrivateCertificate:
    with open(cert_file, "rb") as f:
        certs = split_pem(f.read())
    with open(key_file, "rb") as f:
        key = f.read()
    if not certs:
        raise ValueError(f"no certificate in {cert_file}")
    return ssl.PrivateCertificate.loadPEM(certs[0] + key)


def server_tls_options(cert_file: str, key_file: str) -> ssl.CertificateOptions:
    """Server context: our certificate, the rest of the file as its chain."""
    with open(cert_file, "rb") as f:
        certs = split_pem(f.read())
    private = load_private_certificate(cert_file, key_file)
    chain = [ssl.Certificate.loadPEM(pem).original for pem in certs[1:]]
    return ssl.CertificateOptions(
        privateKey=private.privateKey.original, certificate=private.original, extraCertChain=chain or None,
    )
