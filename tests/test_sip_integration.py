"""The SIP user agent on loopback against real peers: sipp (Debian ``sip-tester``) as UAC and UAS, kamailio
as a registrar with digest auth.  A missing peer binary fails the test: the project's setup installs them."""

import dataclasses
import json
import os
import shutil
import socket

from twisted.internet import defer, reactor
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from twisted.web.client import Agent, readBody

from activecall.config import Credential, RegisterUser, load_config
from activecall.sip import auth
from activecall.sip.call_events import Ended, Established, ForkEnded, HoldChanged
from activecall.sip.registration import RegistrationService
from activecall.sip.sdp_offer import minimal_offer
from activecall.sip.transport import TransportManager
from activecall.sip.useragent import UserAgent
from tests.helpers import MIN_WAIT, ROOT, free_port, generous, spawn, spawn_daemon, write_config

SIPP = "/usr/bin/sipp"
KAMAILIO = "/usr/sbin/kamailio"
KAMAILIO_MODULES = "/usr/lib/x86_64-linux-gnu/kamailio/modules"
SCENARIOS = os.path.join(ROOT, "tests", "sipp")
LOCAL = "127.0.0.1"


def require(binary: str, package: str) -> str:
    path = binary if os.path.exists(binary) else shutil.which(os.path.basename(binary))
    if not path:
        raise AssertionError(f"{binary} is missing: install the Debian package {package!r} "
                             f"(apt-get install --no-install-recommends {package})")
    return path


def udp_port() -> int:
    return free_port(socket.SOCK_DGRAM)


def when(deferred: defer.Deferred, timeout: float, what: str) -> defer.Deferred:
    """``deferred`` bounded in time, failing with a message that says what did not happen.

    The bound is at least ``MIN_WAIT`` (tests/helpers.py): it turns a hang into a failure, it is not a
    speed requirement."""
    timeout = generous(timeout)

    def timed_out(result, _timeout):
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    return deferred.addTimeout(timeout, reactor, onTimeoutCancel=timed_out)


class LoopbackUA:
    """A user agent (transports + UA + optional registration) on a free loopback port, in this process."""

    def __init__(self, testcase, advertise=None, **overrides):
        cfg, _ = load_config(None, None)
        self.port = udp_port()
        overrides.setdefault("addr", LOCAL)
        self.config = dataclasses.replace(cfg, udp_port=self.port, tcp_port=0, **overrides)
        self.transport = TransportManager(self.config)
        if advertise is not None:  # bound on 0.0.0.0 but believing our address is this one (a NAT's inside)
            self.transport._local_ip = advertise
        self.ua = UserAgent(self.config, self.transport, shutdown_timeout=2.0)
        self.transport.on_message = self.ua.layer.message_received
        self.states: dict = {}
        self.registration = RegistrationService(self.config, self.ua, states=self.states,
                                                retry_initial=0.5, retry_max=2.0)
        self.calls = []
        self.transport.startService()
        self.ua.startService()
        self.registration.startService()
        testcase.addCleanup(self.stop)

    @defer.inlineCallbacks
    def stop(self):
        yield self.ua.stopService()
        yield self.registration.stopService()
        self.ua.layer.stop()
        yield self.transport.stopService()

    def answer_calls(self, ring_first=True):
        """Invite handler for tests: ring, then answer with a PCMU offer."""
        def handler(call):
            self.calls.append(call)
            if ring_first:
                call.ringing()
            call.answer(minimal_offer(LOCAL, 30000)).addErrback(lambda f: None)

        self.ua.invite_handler = handler

    def ring_only(self):
        def handler(call):
            self.calls.append(call)
            call.ringing()

        self.ua.invite_handler = handler


def port_bound(port: int, host: str = LOCAL) -> defer.Deferred:
    """Fires once something has bound UDP ``port`` (sipp prints nothing without a terminal)."""
    d: defer.Deferred = defer.Deferred()

    def check():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                d.callback(port)
                return
        reactor.callLater(0.02, check)

    check()
    return d


def sipp(testcase, *args, scenario=None, builtin=None, calls=1, timeout=f"{MIN_WAIT:.0f}s") -> "OutputWatcher":
    """Run sipp in a temporary directory; the test kills it if it is still running at cleanup.
    ``timeout``: sipp's whole-run limit (a failure when reached; a bound on a hang, not a speed bar)."""
    binary = require(SIPP, "sip-tester")
    workdir = os.path.abspath(testcase.mktemp())
    os.makedirs(workdir)
    argv = [binary]
    argv += ["-sf", os.path.join(SCENARIOS, scenario)] if scenario else ["-sn", builtin]
    argv += ["-i", LOCAL, "-m", str(calls), "-nostdin", "-timeout", timeout, "-timeout_error",
             "-trace_err", "-error_file", os.path.join(workdir, "errors.log")] + list(args)
    watcher = spawn(argv, path=workdir)
    watcher.workdir = workdir
    testcase.addCleanup(watcher.kill)
    return watcher


@defer.inlineCallbacks
def sipp_result(watcher, timeout=9.0):
    """Wait for sipp to exit; fail with its error log unless every call succeeded.

    Waits longer than sipp's own default limit, so a stuck call fails with sipp's error log."""
    code = yield when(watcher.ended, max(timeout, MIN_WAIT + 15), "sipp to finish")
    if code != 0:
        errors = ""
        path = os.path.join(watcher.workdir, "errors.log")
        if os.path.exists(path):
            with open(path) as f:
                errors = f.read()[-3000:]
        raise AssertionError(f"sipp exited {code}\n{watcher.output[-3000:]}\n{errors}")
    return code


class SippUACTests(unittest.TestCase):
    """sipp calls the user agent."""

    @defer.inlineCallbacks
    def test_basic_call_answered_then_bye(self):
        peer = LoopbackUA(self)
        peer.answer_calls()
        yield sipp_result(sipp(self, f"{LOCAL}:{peer.port}", "-p", str(udp_port()), builtin="uac"))
        call = peer.calls[0]
        ended = yield when(call.when_ended(), 2, "the call to end")
        self.assertEqual((ended.reason, ended.by), ("remote", "remote"))
        self.assertTrue(any(isinstance(e, Established) for e in call.events))

    @defer.inlineCallbacks
    def test_cancel_before_answer_gets_487(self):
        peer = LoopbackUA(self)
        peer.ring_only()
        yield sipp_result(sipp(self, f"{LOCAL}:{peer.port}", "-p", str(udp_port()), scenario="uac_cancel.xml"))
        ended = yield when(peer.calls[0].when_ended(), 2, "the cancelled call to end")
        self.assertEqual((ended.reason, ended.status), ("cancelled", 487))

    @defer.inlineCallbacks
    def test_reinvite_hold_resume_directions(self):
        peer = LoopbackUA(self)
        peer.answer_calls(ring_first=False)
        yield sipp_result(sipp(self, f"{LOCAL}:{peer.port}", "-p", str(udp_port()), scenario="uac_hold.xml"))
        call = peer.calls[0]
        yield when(call.when_ended(), 2, "the call to end")
        holds = [(e.on_hold, e.direction) for e in call.events if isinstance(e, HoldChanged)]
        self.assertEqual(holds, [(True, "sendonly"), (False, "sendrecv"), (True, "inactive")])

    @defer.inlineCallbacks
    def test_session_timer_422_then_negotiated_and_refreshed(self):
        """uac_session_timer.xml checks the 422's Min-SE, the 2xx's Session-Expires/Require and the
        refresh UPDATE's answer; here: one call, with the caller as refresher, ended by its BYE."""
        peer = LoopbackUA(self)
        peer.answer_calls(ring_first=False)
        yield sipp_result(sipp(self, f"{LOCAL}:{peer.port}", "-p", str(udp_port()),
                               scenario="uac_session_timer.xml"))
        self.assertEqual(len(peer.calls), 1)
        call = peer.calls[0]
        ended = yield when(call.when_ended(), 2, "the call to end")
        self.assertEqual((ended.reason, ended.by), ("remote", "remote"))
        self.assertEqual((call.session_timer.negotiated.interval, call.session_timer.we_refresh), (90, False))
        self.assertFalse(call.session_timer.active)

    @defer.inlineCallbacks
    def test_reliable_ringing_pracked_before_the_answer(self):
        """uac_100rel.xml requires 100rel: it checks the 180's Require/RSeq, PRACKs it and expects the
        PRACK's 200 before the INVITE's (the answer waited for the PRACK)."""
        peer = LoopbackUA(self)
        peer.answer_calls(ring_first=True)
        yield sipp_result(sipp(self, f"{LOCAL}:{peer.port}", "-p", str(udp_port()), scenario="uac_100rel.xml"))
        call = peer.calls[0]
        ended = yield when(call.when_ended(), 2, "the call to end")
        self.assertEqual((ended.reason, ended.by), ("remote", "remote"))
        self.assertTrue(call.reliable_provisionals)
        self.assertTrue(any(isinstance(e, Established) for e in call.events))

    @defer.inlineCallbacks
    def test_out_of_dialog_options(self):
        peer = LoopbackUA(self)
        yield sipp_result(sipp(self, f"{LOCAL}:{peer.port}", "-p", str(udp_port()), scenario="options.xml"))


class SippUASTests(unittest.TestCase):
    """The user agent calls sipp."""

    @defer.inlineCallbacks
    def test_outbound_call_to_builtin_uas(self):
        peer = LoopbackUA(self)
        port = udp_port()
        uas = sipp(self, "-p", str(port), builtin="uas")
        yield when(port_bound(port), 15, "sipp uas to bind its port")
        call = peer.ua.place_call(f"sip:service@{LOCAL}:{port}", minimal_offer(LOCAL, 30000),
                                  headers={"X-Test": "1"})
        response = yield when(call.when_answered(), 5, "the 200 from sipp uas")
        self.assertEqual(response.status, 200)
        ended = yield when(call.hangup(), 5, "the BYE to be answered")
        self.assertEqual((ended.reason, ended.status), ("local", 200))
        yield sipp_result(uas)

    @defer.inlineCallbacks
    def test_a_second_fork_answering_is_acked_and_ended(self):
        """sipp answers as two forks (uas_forked.xml checks that each 2xx is ACKed in its own dialog and
        that fork b gets a BYE); the call goes on with fork a's answer and ends in fork a."""
        peer = LoopbackUA(self)
        port = udp_port()
        uas = sipp(self, "-p", str(port), scenario="uas_forked.xml")
        yield when(port_bound(port), 15, "sipp uas to bind its port")
        call = peer.ua.place_call(f"sip:service@{LOCAL}:{port}", minimal_offer(LOCAL, 30000))
        response = yield when(call.when_answered(), 5, "the first 200 from sipp")
        self.assertIn(b"o=forka", response.body)
        fork_ended = defer.Deferred()
        call.add_listener(lambda e: isinstance(e, ForkEnded) and not fork_ended.called and fork_ended.callback(e))
        event = yield when(fork_ended, 5, "the second fork's 2xx to be ACKed and its BYE answered")
        self.assertEqual((event.tag, event.status), ("forkb", 200))
        self.assertIsNone(call.end)
        self.assertIn(b"o=forka", call.remote_sdp)
        self.assertEqual(call.state, "confirmed")
        ended = yield when(call.hangup(), 5, "the BYE in fork a to be answered")
        self.assertEqual((ended.reason, ended.status), ("local", 200))
        yield sipp_result(uas)

    @defer.inlineCallbacks
    def test_a_fork_answering_after_the_call_ended_is_acked_and_ended(self):
        """sipp's fork b answers only after the call in fork a is over (uas_late_fork.xml): its 2xx
        is still ACKed in its own dialog and that dialog ended with a BYE, or sipp fails."""
        peer = LoopbackUA(self)
        port = udp_port()
        uas = sipp(self, "-p", str(port), scenario="uas_late_fork.xml")
        yield when(port_bound(port), 15, "sipp uas to bind its port")
        call = peer.ua.place_call(f"sip:service@{LOCAL}:{port}", minimal_offer(LOCAL, 30000))
        response = yield when(call.when_answered(), 5, "fork a's 200 from sipp")
        self.assertIn(b"o=forka", response.body)
        ended = yield when(call.hangup(), 5, "the BYE in fork a to be answered")
        self.assertEqual((ended.reason, ended.status), ("local", 200))
        yield sipp_result(uas)
        self.assertEqual(peer.ua.calls, [])

    @defer.inlineCallbacks
    def test_proxy_challenge_407_answered_with_digest(self):
        peer = LoopbackUA(self)
        port = udp_port()
        uas = sipp(self, "-p", str(port), scenario="uas_auth.xml")
        yield when(port_bound(port), 15, "sipp uas to bind its port")
        call = peer.ua.place_call(f"sip:service@{LOCAL}:{port}", minimal_offer(LOCAL, 30000),
                                  credentials=Credential("alice", "secret"))
        response = yield when(call.when_answered(), 5, "the 200 after the digest retry")
        self.assertEqual(response.status, 200)
        self.assertEqual(call.invite.cseq.seq, 2)
        credentials = auth.parse_authorization(call.invite.headers.get("Proxy-Authorization"))
        self.assertEqual((credentials.realm, credentials.nonce), ("sipp.test", "4a7b1c2d3e"))
        self.assertTrue(auth.verify_authorization(credentials, "secret", "INVITE"))
        yield when(call.hangup(), 5, "the BYE to be answered")
        yield sipp_result(uas)

    @defer.inlineCallbacks
    def test_daemon_call_flag_places_a_call_and_byes_on_shutdown(self):
        port = udp_port()
        uas = sipp(self, "-p", str(port), builtin="uas")
        yield when(port_bound(port), 15, "sipp uas to bind its port")
        conf = write_config(self, "\n".join([
            'addr = "127.0.0.1"', f"udp_port = {udp_port()}", "tcp_port = 0", f'http_addr = "127.0.0.1:{free_port()}"',
            'log_level = "debug"',  # the call's events and its "ended" line are logged at debug
            "",
        ]))
        daemon = spawn_daemon(self, conf, "--call", f"sip:service@{LOCAL}:{port}")
        # the call is a full session with RTP media: its events go to the log
        yield daemon.wait_for(r'answer: \{"event":"answer"', timeout=8)
        daemon.signal("TERM")
        yield when(daemon.ended, 8, "the daemon to stop")
        # shutdown hung the call up with a BYE (sipp answers 200; it lingers before exiting: not awaited)
        self.assertRegex(daemon.output, r'hangup: \{"event":"hangup".*"reason":"system"')
        self.assertRegex(daemon.output, r"outbound call c\.\S+ ended: local \(200\)")  # sipp's 200 to our BYE
        self.assertRegex(daemon.output, r"UDP Port \d+ Closed")  # the RTP ports were released

    @defer.inlineCallbacks
    def test_daemon_call_flag_runs_a_handler_playbook_given_by_absolute_path(self):
        """``--call … --handler /abs/greeting.md``: the playbook (outside ``playbook_dir``) is checked at
        start-up and loaded for the call, which is then placed (a playbook that cannot be loaded ends the
        call before its INVITE)."""
        playbook = os.path.abspath(self.mktemp() + ".md")
        with open(playbook, "w") as f:
            f.write("---\nllm: {provider: echo}\ngreeting: Hi.\ntts: {provider: flite}\n---\nEcho.\n")
        port = udp_port()
        uas = sipp(self, "-p", str(port), builtin="uas")
        yield when(port_bound(port), 15, "sipp uas to bind its port")
        conf = write_config(self, "\n".join([
            'addr = "127.0.0.1"', f"udp_port = {udp_port()}", "tcp_port = 0", f'http_addr = "127.0.0.1:{free_port()}"',
            'log_level = "debug"', "",
        ]))
        daemon = spawn_daemon(self, conf, "--call", f"sip:service@{LOCAL}:{port}", "--handler", playbook)
        yield daemon.wait_for(r'answer: \{"event":"answer"', timeout=8)
        daemon.signal("TERM")
        yield when(daemon.ended, 8, "the daemon to stop")
        self.assertNotIn("cannot run playbook", daemon.output)

    @defer.inlineCallbacks
    def test_www_challenge_verified_by_sipp(self):
        peer = LoopbackUA(self)
        port = udp_port()
        uas = sipp(self, "-p", str(port), scenario="uas_auth401.xml")
        yield when(port_bound(port), 15, "sipp uas to bind its port")
        call = peer.ua.place_call(f"sip:service@{LOCAL}:{port}", minimal_offer(LOCAL, 30000),
                                  credentials=Credential("alice", "secret"))
        response = yield when(call.when_answered(), 5, "the 200 after sipp verified the digest")
        self.assertEqual(response.status, 200)
        yield when(call.hangup(), 5, "the BYE to be answered")
        yield sipp_result(uas)


KAMAILIO_CFG = """#!KAMAILIO
debug=2
log_stderror=yes
children=1
disable_tcp=yes
listen=udp:127.0.0.1:{port}
mpath="{modules}"
loadmodule "kex.so"
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "xlog.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
loadmodule "auth.so"
modparam("usrloc", "db_mode", 0)

request_route {{
    if (!mf_process_maxfwd_header("10")) {{ sl_send_reply("483", "Too Many Hops"); exit; }}
    if (is_method("REGISTER")) {{
        if (!pv_www_authenticate("$td", "{password}", "0")) {{ www_challenge("$td", "0"); exit; }}
        if (!save("location")) {{ sl_reply_error(); }}
        xlog("L_INFO", "registered $tu\\n");
        exit;
    }}
    if (has_totag()) {{
        if (uri == myself) {{ lookup("location"); }}
        t_relay();
        exit;
    }}
    if (!lookup("location")) {{ sl_send_reply("404", "Not Found"); exit; }}
    t_relay();
}}
"""


@defer.inlineCallbacks
def start_kamailio(testcase, password="secret"):
    """kamailio on a free loopback port as a registrar that knows one password; returns (watcher, port)."""
    binary = require(KAMAILIO, "kamailio")
    port = udp_port()
    workdir = os.path.abspath(testcase.mktemp())
    os.makedirs(workdir)
    cfg = os.path.join(workdir, "kamailio.cfg")
    with open(cfg, "w") as f:
        f.write(KAMAILIO_CFG.format(port=port, modules=KAMAILIO_MODULES, password=password))
    watcher = spawn([binary, "-f", cfg, "-P", os.path.join(workdir, "kamailio.pid"), "-w", workdir,
                     "-Y", workdir, "-E", "-DD"], path=workdir)
    testcase.addCleanup(terminate, watcher)
    yield watcher.wait_for(r"Listening on", timeout=8)
    yield when(port_bound(port), 15, "kamailio to bind its port")
    return watcher, port


def terminate(watcher) -> defer.Deferred:
    """SIGTERM (kamailio's main process then stops its children), SIGKILL if it lingers."""
    if watcher.ended.called:
        return defer.succeed(None)
    watcher.signal("TERM")
    d: defer.Deferred = defer.Deferred()
    watcher.ended.addBoth(lambda _: d.called or d.callback(None))
    timer = reactor.callLater(3, lambda: d.called or (watcher.signal("KILL"), watcher.ended.addBoth(
        lambda _: d.called or d.callback(None))))
    d.addBoth(lambda r: timer.active() and timer.cancel())
    return d


class KamailioTests(unittest.TestCase):
    """kamailio as registrar and proxy with digest authentication."""

    def account(self, kport, password):
        return RegisterUser(server=f"{LOCAL}:{kport}", username="alice", expires=60,
                            credential=Credential("alice", password))

    @defer.inlineCallbacks
    def test_register_then_call_through_kamailio_reaches_us(self):
        kamailio, kport = yield start_kamailio(self)
        peer = LoopbackUA(self, register_users=(self.account(kport, "secret"),))
        peer.answer_calls()
        key = f"alice@{LOCAL}:{kport}"
        registered = defer.Deferred()

        def poll():
            if peer.states.get(key, {}).get("state") == "registered":
                registered.callback(None)
            else:
                reactor.callLater(0.05, poll)

        poll()
        yield when(registered, 5, f"{key} to register (states: {peer.states})")
        self.assertEqual(peer.states[key]["expires"], 60)
        # a call for our AOR sent to kamailio is relayed to our Contact
        yield sipp_result(sipp(self, f"{LOCAL}:{kport}", "-p", str(udp_port()), "-s", "alice", builtin="uac"))
        self.assertEqual(len(peer.calls), 1)
        self.assertEqual(peer.calls[0].invite.uri.host, LOCAL)
        self.assertEqual(peer.calls[0].invite.uri.port, peer.port)

    @defer.inlineCallbacks
    def test_behind_a_nat_the_binding_moves_to_where_kamailio_sees_us(self):
        """We believe our address is 192.0.2.55 (unroutable: the inside of a NAT) while our packets
        reach kamailio from 127.0.0.1.  kamailio's Via received/rport says so; we re-register that
        address, so a call kamailio relays to our AOR reaches us (at our believed address it could not)."""
        kamailio, kport = yield start_kamailio(self)
        peer = LoopbackUA(self, advertise="192.0.2.55", addr="0.0.0.0",
                          register_users=(self.account(kport, "secret"),))
        peer.answer_calls()
        key = f"alice@{LOCAL}:{kport}"
        settled = defer.Deferred()

        def poll():
            state = peer.states.get(key, {})
            if state.get("state") == "registered" and state.get("public_address"):
                settled.callback(None)
            else:
                reactor.callLater(0.05, poll)

        poll()
        yield when(settled, 5, f"{key} to register from its public address (states: {peer.states})")
        self.assertEqual(peer.states[key]["public_address"], f"{LOCAL}:{peer.port}")
        yield sipp_result(sipp(self, f"{LOCAL}:{kport}", "-p", str(udp_port()), "-s", "alice", builtin="uac"))
        self.assertEqual(len(peer.calls), 1)
        self.assertEqual((peer.calls[0].invite.uri.host, peer.calls[0].invite.uri.port), (LOCAL, peer.port))

    @defer.inlineCallbacks
    def test_wrong_password_logged_clearly_and_retried(self):
        kamailio, kport = yield start_kamailio(self)
        errors = []
        retried = defer.Deferred()

        def observe(event):
            if "retrying in" in event.get("log_format", "") and event.get("key", "").startswith("alice@"):
                errors.append(event)
                if len(errors) == 2 and not retried.called:
                    retried.callback(None)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        peer = LoopbackUA(self, register_users=(self.account(kport, "wrong"),))
        yield when(retried, 5, "two failed registration attempts")
        self.assertIn("authentication failed", errors[0]["error"])
        self.assertIn("check the password", errors[0]["error"])
        state = peer.states[f"alice@{LOCAL}:{kport}"]
        self.assertIn(state["state"], ("failed", "registering"))
        self.assertNotIn("wrong", json.dumps(state))

    @defer.inlineCallbacks
    def test_daemon_health_shows_registration(self):
        kamailio, kport = yield start_kamailio(self)
        http = free_port()
        conf = write_config(self, "\n".join([
            'addr = "127.0.0.1"', f"udp_port = {udp_port()}", "tcp_port = 0", f'http_addr = "127.0.0.1:{http}"',
            "[[register_users]]", f'server = "127.0.0.1:{kport}"', 'username = "alice"', "expires = 60",
            "[register_users.credential]", 'username = "alice"', 'password = "secret"', "",
        ]))
        daemon = spawn_daemon(self, conf)
        yield daemon.wait_for("registered alice@", timeout=8)
        body = yield readBody((yield Agent(reactor).request(b"GET", f"http://127.0.0.1:{http}/health".encode())))
        regs = json.loads(body)["sip_registrations"]
        self.assertEqual([(r["account"], r["state"]) for r in regs], [(f"alice@127.0.0.1:{kport}", "registered")])
        daemon.signal("TERM")
        yield when(daemon.ended, 8, "the daemon to stop")
        self.assertIn("unregistered alice@", daemon.output)
