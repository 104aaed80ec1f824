"""REGISTER client (RFC 3261 §10) for every ``[[register_users]]`` account.

One ``Registration`` per enabled account keeps a binding alive at its PBX:
REGISTER with ``Expires``, digest on 401/407, refresh at ~80 % of the expiry
the registrar granted, retry with capped exponential backoff after a failure,
re-register when a 200 no longer lists our Contact (the PBX forgot us), and
``Expires: 0`` on shutdown within a bounded time.

Behind a NAT, the registrar's answer says where it saw us: ``received`` and
``rport`` in our Via (RFC 3581).  When that differs from our Contact and no
``external_ip`` is configured, the binding is moved to that public address
(the old Contact is unbound in the same REGISTER), so the PBX's INVITEs reach
us through the NAT's mapping.  ``external_ip``, when set, is trusted instead.  Each account's state —
never its password — is published in a dict (``/health``) and a gauge.
"""

from __future__ import annotations

import re
import time
from typing import Optional

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from activecall.sip.auth import DigestClient
from activecall.sip.message import (
    URI,
    Address,
    Request,
    Response,
    SIPParseError,
    generate_call_id,
    generate_tag,
    make_request,
    next_attempt,
    next_hop,
    parse_uri,
)
from activecall.sip.transaction_base import TransactionTimeout, TransportError

log = Logger(namespace="activecall.sip.registration")

RETRY_INITIAL = 30.0
RETRY_MAX = 300.0
REFRESH_RATIO = 0.8
UNREGISTER_TIMEOUT = 4.0


def registrar_uri(server: str) -> URI:
    """``pbx.example.com:5060`` (``sip:`` optional) -> the REGISTER Request-URI."""
    text = server.strip()
    if not re.match(r"sips?:", text, re.IGNORECASE):
        text = "sip:" + text
    return parse_uri(text)


def account_key(account) -> str:
    """How an account is named in /health and metrics: ``user@server``."""
    user = account.username or (account.credential.username if account.credential else "")
    server = re.sub(r"^sips?:", "", account.server.strip(), flags=re.IGNORECASE)
    return f"{user}@{server}" if user else server


def granted_expiry(response: Response, contact: URI, requested: int) -> Optional[int]:
    """The expiry the registrar gave our Contact, or None when our Contact is not listed.

    RFC 3261 §10.2.4: the ``expires`` param of our Contact in the 200, else the
    Expires header, else what we asked for.
    """
    try:
        contacts = response.contacts
    except SIPParseError:
        contacts = []
    for addr in contacts:
        uri = addr.uri
        if uri is None:
            continue
        if (uri.user or "") == (contact.user or "") and uri.host.lower() == contact.host.lower() \
                and (uri.port or 5060) == (contact.port or 5060):
            value = addr.params.get("expires")
            if value and value.isdigit():
                return int(value)
            header = response.headers.get("Expires")
            return int(header) if header and header.strip().isdigit() else requested
    return None


class Registration:
    """Keeps one account registered.  ``state``: idle, registering, registered, failed, unregistered."""

    def __init__(self, account, ua, reactor: Optional[IReactorTime] = None, states: Optional[dict] = None,
                 gauge=None, retry_initial: float = RETRY_INITIAL, retry_max: float = RETRY_MAX,
                 refresh_ratio: float = REFRESH_RATIO, unregister_timeout: float = UNREGISTER_TIMEOUT):
        self.account = account
        self.ua = ua
        self.reactor = reactor or ua.reactor
        self.states = states if states is not None else {}
        self.gauge = gauge
        self.retry_initial, self.retry_max = retry_initial, retry_max
        self.refresh_ratio = refresh_ratio
        self.unregister_timeout = unregister_timeout
        self.key = account_key(account)
        self.uri = registrar_uri(account.server)
        credential = account.credential
        self.auth_user = (credential.username if credential and credential.username else account.username)
        self.user = account.username or self.auth_user
        self.digest = (DigestClient(self.auth_user, credential.password, credential.realm or None)
                       if credential is not None and credential.password else None)
        self.expires = account.expires
        #: ``display_name``: the name in the REGISTER's From and To (how the PBX labels the extension)
        self.display_name = getattr(account, "display_name", None) or None
        self.call_id = generate_call_id()
        self.from_tag = generate_tag()
        self.cseq = 0
        self.state = "idle"
        self.granted: Optional[int] = None
        self.last_error: Optional[str] = None
        self.failures = 0
        self._timer = None
        self._stopping = False
        self._forgotten = False
        self.public: Optional[tuple[str, int]] = None  # where the registrar sees us, when not where we think
        self._moved = False  # the binding was moved once in this registration cycle
        self._publish()

    # -- public --

    def start(self) -> None:
        self._stopping = False
        self._register()

    def stop(self) -> defer.Deferred:
        """Unregister (``Expires: 0``) if registered; fires within ``unregister_timeout``, never fails."""
        self._stopping = True
        self._cancel_timer()
        if self.state not in ("registered", "registering"):
            self._set_state("unregistered")
            return defer.succeed(None)
        d = self._send(self._request(expires=0))

        def challenged(response):
            if response.status in (401, 407) and self.digest is not None:
                retry = self._next(response.request)
                if self.digest.authorize(retry, response):
                    return self._send(retry)
            return response

        def done(result):
            if isinstance(result, Failure):
                log.info("unregistering {key}: {err}", key=self.key, err=result.getErrorMessage())
            elif result.status >= 300:
                log.info("unregistering {key}: {status} {reason}", key=self.key, status=result.status,
                         reason=result.reason)
            else:
                log.info("unregistered {key}", key=self.key)
            self._set_state("unregistered")

        d.addCallback(challenged)
        d.addTimeout(self.unregister_timeout, self.reactor)
        return d.addBoth(done)

    def snapshot(self) -> dict:
        """What /health shows (no credentials)."""
        return {
            "state": self.state, "server": str(self.uri), "user": self.user, "expires": self.granted,
            "last_error": self.last_error,
            "public_address": f"{self.public[0]}:{self.public[1]}" if self.public else None,
        }

    # -- sending --

    def _contact(self) -> Address:
        uri = parse_uri(self.ua.transport.contact_uri(self.user or None, self._transport()))
        if self.public is not None:
            uri.host, uri.port = self.public
        return Address(uri)

    def _seen_at(self, response: Response) -> Optional[tuple[str, int]]:
        """Where the registrar saw our REGISTER come from, when that is not our Contact (a NAT); else None."""
        if self.ua.config.external_ip:
            return None  # the operator told us our public address
        try:
            via = response.top_via
        except SIPParseError:
            return None
        if via.received is None and via.rport is None:
            return None
        contact = self._contact().uri
        seen = (via.received or via.host, via.rport or via.port or contact.port or 5060)
        if (seen[0].lower(), seen[1]) == (contact.host.lower(), contact.port or 5060):
            return None
        return seen

    def _transport(self) -> str:
        return (self.uri.transport or ("TLS" if self.uri.scheme == "sips" else "UDP")).upper()

    def _request(self, expires: int, unbind: Optional[Address] = None) -> Request:
        """A REGISTER of our Contact; ``unbind``: an old Contact of ours to remove in the same request."""
        self.cseq += 1
        aor = URI(self.uri.scheme, self.user or None, self.uri.host)
        headers = [("Expires", str(expires)), ("User-Agent", self.ua.config.useragent),
                   ("Allow", "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE, REFER, NOTIFY")]
        if unbind is not None:
            headers.insert(0, ("Contact", str(Address(unbind.uri, params={"expires": "0"}))))
        request = make_request(
            "REGISTER", self.uri.copy(), via=self.ua.transport.local_via(self._transport()),
            from_=Address(aor, self.display_name, params={"tag": self.from_tag}),
            to=Address(aor.copy(), self.display_name), call_id=self.call_id,
            cseq=self.cseq, contact=self._contact(), headers=headers,
        )
        return request

    def _next(self, request: Request) -> Request:
        retry = next_attempt(request)
        self.cseq = retry.cseq.seq
        return retry

    def _send(self, request: Request) -> defer.Deferred:
        """Fires with the final response (``.request`` set on it) or fails with a transaction error."""
        txn = self.ua.layer.send_request(request, next_hop(request))

        def attach(response):
            response.request = request
            return response

        return txn.final.addCallback(attach)

    def _register(self, unbind: Optional[Address] = None) -> None:
        self._cancel_timer()
        if self._stopping:
            return
        self._set_state("registering")
        self._send(self._request(self.expires, unbind)).addCallbacks(self._response, self._failed)

    # -- responses --

    def _response(self, response: Response) -> None:
        if self._stopping:
            return
        status = response.status
        if 200 <= status < 300:
            self._registered(response)
        elif status in (401, 407):
            if self.digest is None:
                self._fail(f"{status} {response.reason}: the registrar wants authentication and the account "
                           "has no password (empty passwords rely on IP authentication)")
                return
            retry = self._next(response.request)
            if not self.digest.authorize(retry, response):
                self._fail(f"authentication failed ({self.digest.last_error}); check the password of "
                           f"[[register_users]] {self.key}")
                return
            self._send(retry).addCallbacks(self._response, self._failed)
        elif status == 423:
            minimum = response.headers.get("Min-Expires") or ""
            if minimum.strip().isdigit() and int(minimum) > self.expires:
                log.info("{key}: registrar wants Expires >= {m}", key=self.key, m=minimum)
                self.expires = int(minimum)
                self._send(self._request(self.expires)).addCallbacks(self._response, self._failed)
            else:
                self._fail(f"{status} {response.reason} without a usable Min-Expires")
        else:
            self._fail(f"{status} {response.reason}")

    def _registered(self, response: Response) -> None:
        if self.digest is not None:
            self.digest.accepted()
        seen = self._seen_at(response)
        if seen is not None and not self._moved:
            # behind a NAT: bind the address the registrar sees instead (once per cycle, so a
            # registrar that reports something new every time cannot keep us re-registering)
            old = self._contact()
            self.public = seen
            self._moved = True
            log.info("{key}: the registrar sees us at {host}:{port}, not at our Contact {old}; registering that "
                     "address (NAT)", key=self.key, host=seen[0], port=seen[1], old=str(old.uri))
            self._register(unbind=old)
            return
        self._moved = False
        expiry = granted_expiry(response, self._contact().uri, self.expires)
        if expiry is None:
            if not self._forgotten:
                # the PBX lost our binding (restart, expiry race): bind again at once, from a fresh Call-ID
                log.warn("{key}: the registrar's 200 does not list our Contact; registering again", key=self.key)
                self._forgotten = True
                self.call_id, self.from_tag = generate_call_id(), generate_tag()
                self._register()
                return
            # twice in a row: a registrar that rewrites Contacts; trust the 200
            log.warn("{key}: the registrar rewrites our Contact; assuming {s}s", key=self.key, s=self.expires)
            expiry = self.expires
        self._forgotten = False
        if expiry <= 0:
            self._fail("the registrar granted an expiry of 0")
            return
        self.granted = expiry
        self.failures = 0
        self.last_error = None
        was = self.state
        self._set_state("registered")
        refresh = max(1.0, expiry * self.refresh_ratio)
        (log.info if was != "registered" else log.debug)(
            "registered {key} at {server} for {expiry}s (refresh in {refresh:.0f}s)", key=self.key,
            server=str(self.uri), expiry=expiry, refresh=refresh)
        self._timer = self.reactor.callLater(refresh, self._register)

    def _failed(self, failure: Failure) -> None:
        if self._stopping:
            return
        if failure.check(TransactionTimeout):
            self._fail("no response from the registrar (timeout)")
        elif failure.check(TransportError):
            self._fail(f"cannot reach the registrar: {failure.getErrorMessage()}")
        elif failure.check(defer.CancelledError):
            return
        else:
            log.failure("registration of {key} failed", failure, key=self.key)
            self._fail(failure.getErrorMessage())

    def _fail(self, error: str) -> None:
        delay = min(self.retry_initial * (2 ** self.failures), self.retry_max)
        self.failures += 1
        self.last_error = error
        self.granted = None
        self._set_state("failed")
        self._cancel_timer()
        if not self._stopping:  # the retry is armed before logging: an observer may stop us
            self._timer = self.reactor.callLater(delay, self._register)
        log.error("registration of {key} at {server} failed: {error}; retrying in {delay:.0f}s", key=self.key,
                  server=str(self.uri), error=error, delay=delay)

    # -- state --

    def _set_state(self, state: str) -> None:
        self.state = state
        self._publish()

    def _publish(self) -> None:
        snapshot = self.snapshot()
        snapshot["updated_at"] = time.time()
        self.states[self.key] = snapshot
        if self.gauge is not None:
            self.gauge.labels(account=self.key).set(1 if self.state == "registered" else 0)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class RegistrationService(service.Service):
    """Registers every enabled ``[[register_users]]`` account; unregisters on stop."""

    name = "sip-registration"

    def __init__(self, config, ua, reactor: Optional[IReactorTime] = None, states: Optional[dict] = None,
                 gauge=None, **options):
        self.config = config
        self.ua = ua
        self.reactor = reactor or ua.reactor
        self.states = states if states is not None else {}
        self.gauge = gauge
        self.options = options
        self.registrations: list[Registration] = []

    def startService(self):
        super().startService()
        self.registrations = []
        for account in self.config.register_users:
            if account.disabled:
                log.info("not registering {key}: disabled", key=account_key(account))
                continue
            registration = Registration(account, self.ua, self.reactor, self.states, self.gauge, **self.options)
            self.registrations.append(registration)
            registration.start()

    def unregister(self) -> defer.Deferred:
        """Remove every binding (``Expires: 0``) and stop refreshing, the service still running: a
        draining node tells its PBXs to send it no more calls.  Fires when done (bounded, never fails)."""
        return defer.gatherResults([r.stop() for r in self.registrations]).addCallback(lambda _: None)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return self.unregister()


__all__ = ["Registration", "RegistrationService", "registrar_uri", "account_key", "granted_expiry"]
