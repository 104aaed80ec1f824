"""Locating a SIP server by DNS SRV (RFC 3263 §4.2, RFC 2782).

``sip:alice@pbx.example.com`` names a *domain*; the servers that take its
calls are in ``_sip._udp.pbx.example.com`` (``_sip._tcp``, ``_sips._tcp`` for
TCP and TLS).  A target with a numeric host or an explicit port is used as
given (RFC 3263 §4.2); otherwise the SRV records pick host and port: lowest
priority first, a weighted random choice among equals; no records (or a
failed lookup) falls back to the name itself on the transport's default port.
A record whose target is ``.`` means "no SIP here" and fails the send.  The
chosen server's address comes from the same resolver (UDP, TCP); for TLS the
name is kept, since the peer's certificate is checked against it.

The choice is kept for the records' TTL (at most ``MAX_TTL``), so every
retransmission of a transaction, and the next request, goes to the same
server.  NAPTR (transport selection by DNS) is not done: the transport comes
from the URI (``transport=``, ``sips:``) or the configured default.

Lookups go through ``twisted.names`` (the system's resolv.conf by default,
or an injected resolver), never blocking the reactor.
"""

from __future__ import annotations

import ipaddress
import random
from typing import Optional

from twisted.internet import defer
from twisted.logger import Logger
from twisted.names import dns
from twisted.names.error import DNSNameError, DomainError
from twisted.python.failure import Failure

from activecall.sip.message import Target, default_port

log = Logger(namespace="activecall.sip.dns")

MAX_TTL = 300.0  # a choice is re-made at least this often
FALLBACK_TTL = 60.0  # how long "no SRV here" is remembered
LOOKUP_TIMEOUT = (1, 3)  # seconds per try: a dead DNS server delays a send by 4 s, then the name is used as is


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


class NoSipService(Exception):
    """The domain publishes an SRV record with target ``.``: it offers no SIP on this transport."""


def srv_name(target: Target) -> str:
    transport = target.transport.upper()
    service = "_sips" if transport == "TLS" else "_sip"
    proto = "_udp" if transport == "UDP" else "_tcp"
    return f"{service}.{proto}.{target.host.rstrip('.')}"


def choose(records, rng: random.Random):
    """RFC 2782: the lowest priority; among those, weighted random (weight 0 only when all are 0)."""
    best = min(r.priority for r in records)
    candidates = [r for r in records if r.priority == best]
    total = sum(r.weight for r in candidates)
    if total == 0:
        return rng.choice(candidates)
    pick = rng.uniform(0, total)
    for r in candidates:
        pick -= r.weight
        if pick <= 0:
            return r
    return candidates[-1]


class SrvLocator:
    """``locate(target)`` -> Deferred Target with the host and port to send to."""

    def __init__(self, reactor, resolver=None, rng: Optional[random.Random] = None):
        self.reactor = reactor
        self._resolver = resolver
        self.rng = rng or random.Random()
        self._chosen: dict[tuple, tuple[float, Target]] = {}  # (name, transport) -> (until, target)
        self._pending: dict[tuple, list] = {}

    @property
    def resolver(self):
        if self._resolver is None:
            from twisted.names import client

            self._resolver = client.createResolver(reactor=self.reactor)
        return self._resolver

    def locate(self, target: Target) -> defer.Deferred:
        if not target.srv or target.host.lower().rstrip(".") == "localhost" or _is_ip(target.host):
            return defer.succeed(target)
        key = (target.host.lower(), target.transport.upper())
        cached = self._chosen.get(key)
        if cached is not None and cached[0] > self.reactor.seconds():
            return defer.succeed(cached[1])
        waiting: defer.Deferred = defer.Deferred()
        if key in self._pending:  # one lookup for every send that needs it meanwhile
            self._pending[key].append(waiting)
            return waiting
        self._pending[key] = [waiting]
        name = srv_name(target)
        d = self.resolver.lookupService(name, timeout=LOOKUP_TIMEOUT)
        d.addCallback(self._found, target, name)
        d.addErrback(self._not_found, target, name)
        d.addCallback(self._address)
        d.addBoth(self._deliver, key)
        return waiting

    def _address(self, result):
        """The chosen server's address from the same resolver (UDP/TCP).  TLS keeps the name: its
        certificate is checked against it, and the connection resolves it."""
        ttl, chosen, from_srv = result
        if not from_srv or chosen.transport.upper() == "TLS":
            return ttl, chosen
        d = self.resolver.lookupAddress(chosen.host, timeout=LOOKUP_TIMEOUT)

        def addressed(result):
            addresses = [a.payload.dottedQuad() for a in result[0] if a.type == dns.A]
            return ttl, (Target(addresses[0], chosen.port, chosen.transport) if addresses else chosen)

        d.addCallback(addressed)
        d.addErrback(lambda f: (ttl, chosen))  # no A record (IPv6 only?): the transport resolves the name
        return d

    def _found(self, result, target: Target, name: str):
        answers = result[0]
        records = [(a.payload, a.ttl) for a in answers if a.type == dns.SRV]
        if not records:
            return self._fallback(target, name, "no SRV records")
        record = choose([r for r, _ in records], self.rng)
        host = str(record.target)
        if host in ("", "."):
            raise NoSipService(f"{target.host} publishes no SIP service over {target.transport} ({name} is '.')")
        ttl = min(MAX_TTL, max(1.0, float(min(t for _, t in records))))
        chosen = Target(host.rstrip("."), record.port, target.transport)
        log.debug("{name} -> {host}:{port} (priority {p}, weight {w})", name=name, host=chosen.host,
                  port=chosen.port, p=record.priority, w=record.weight)
        return ttl, chosen, True

    def _not_found(self, failure, target: Target, name: str):
        if failure.check(NoSipService):
            return failure
        if failure.check(DNSNameError, DomainError):
            return self._fallback(target, name, "no such name")
        return self._fallback(target, name, failure.getErrorMessage() or failure.type.__name__)

    def _fallback(self, target: Target, name: str, why: str):
        log.debug("{name}: {why}; using {host}:{port}", name=name, why=why, host=target.host, port=target.port)
        return FALLBACK_TTL, Target(target.host, target.port or default_port(target.transport), target.transport), False

    def _deliver(self, result, key):
        waiters = self._pending.pop(key, [])
        if isinstance(result, tuple):
            ttl, chosen = result
            self._chosen[key] = (self.reactor.seconds() + ttl, chosen)
            result = chosen
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)
        return None
