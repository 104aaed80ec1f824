"""The scale-out recipe, tested (docs/scale-out.md): kamailio with ``etc/kamailio/kamailio.cfg`` (dispatcher,
OPTIONS probing, record-route, failover on 503/timeout) in front of two daemons for SIP, and HAProxy with
``etc/haproxy/haproxy.cfg`` (``/ready`` health check, routing by session id) in front of them for WebSocket
sessions; every process real, on loopback.  One node is drained with SIGTERM in the middle of the traffic:
no call fails, the drained node's calls finish (their BYEs through the proxy), it exits 0 once idle, new
calls go to the other node, and after a restart it is back in rotation.

The files under etc/ are used as shipped: their settings come from kamailio's ``-A`` defines and HAProxy's
environment variables.  Every wait polls for a condition with a generous bound; nothing asks for a speed."""

import glob
import json
import os
import re
import shutil

import treq
from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests.helpers import MIN_WAIT, ROOT, free_port, free_ports, spawn, spawn_daemon, write_config
from tests.test_sip_integration import (KAMAILIO, LOCAL, port_bound, require, sipp, sipp_result, terminate,
                                        udp_port, when)
from tests.wsclient import connect, send_json

KAMAILIO_CFG = os.path.join(ROOT, "etc", "kamailio", "kamailio.cfg")
HAPROXY_CFG = os.path.join(ROOT, "etc", "haproxy", "haproxy.cfg")
HAPROXY = "/usr/sbin/haproxy"

PLAYBOOK = """---
llm:
  provider: echo
tts:
  provider: flite
vad:
  type: webrtcvad
---
You repeat what the caller says.
"""

#: the SIP traffic: CALLS calls, RATE new calls a second, each CALL_MS long (sipp hangs up)
CALLS, RATE, CALL_MS = 20, 4, 2500


def later(seconds):
    d = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


@defer.inlineCallbacks
def poll(check, what: str, every: float = 0.1, timeout: float = MIN_WAIT):
    """Call ``check()`` (a value or a Deferred) until it is true; its value.  ``timeout`` bounds a hang."""
    deadline = reactor.seconds() + timeout
    while True:
        value = yield defer.maybeDeferred(check)
        if value:
            return value
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        yield later(every)


@defer.inlineCallbacks
def http_json(url):
    response = yield treq.get(url, persistent=False)
    body = yield response.content()
    return response.code, (json.loads(body) if body.strip().startswith(b"{") else body)


class Node:
    """One daemon of the pool: its ports and files stay the same across restarts."""

    def __init__(self, testcase, name: str):
        self.testcase = testcase
        self.name = name
        self.root = os.path.abspath(testcase.mktemp())
        os.makedirs(os.path.join(self.root, "playbooks"))
        with open(os.path.join(self.root, "playbooks", "echo.md"), "w") as f:
            f.write(PLAYBOOK)
        self.sip_port, self.http_port = udp_port(), free_port()
        base = free_port() // 2 * 2
        self.conf = write_config(testcase, f'''
addr = "{LOCAL}"
udp_port = {self.sip_port}
tcp_port = 0
http_addr = "{LOCAL}:{self.http_port}"
rtp_start_port = {base}
rtp_end_port = {base + 99}
media_cache_path = "{self.root}/cache"
playbook_dir = "{self.root}/playbooks"
graceful_shutdown_timeout = "60s"
[handler]
type = "playbook"
default = "echo.md"
[callrecord]
type = "local"
root = "{self.root}/cdr"
''')
        self.daemon = None
        self.runs = []

    @property
    def base(self) -> str:
        return f"http://{LOCAL}:{self.http_port}"

    def start(self):
        self.daemon = spawn_daemon(self.testcase, self.conf)
        self.runs.append(self.daemon)
        return self.daemon.wait_for("activecall ready", timeout=60)

    @defer.inlineCallbacks
    def health(self):
        code, document = yield http_json(self.base + "/health")
        return document

    @defer.inlineCallbacks
    def session_ids(self):
        code, document = yield http_json(self.base + "/list")
        return {call["id"] for call in document["active_calls"]}

    def cdrs(self) -> int:
        return len(glob.glob(os.path.join(self.root, "cdr", "*", "*.json")))


@defer.inlineCallbacks
def start_kamailio(testcase, nodes, ping_interval=1):
    """kamailio with the shipped configuration, the nodes (or bare SIP ports) in its dispatcher list,
    probing every ``ping_interval`` seconds."""
    binary = require(KAMAILIO, "kamailio")
    port = udp_port()
    workdir = os.path.abspath(testcase.mktemp())
    os.makedirs(workdir)
    listing = os.path.join(workdir, "dispatcher.list")
    with open(listing, "w") as f:
        f.write("".join(f"1 sip:{LOCAL}:{getattr(node, 'sip_port', node)}\n" for node in nodes))
    defines = [f"LISTEN=udp:{LOCAL}:{port}", f'DISPATCHER_LIST="{listing}"', f"DS_PING_INTERVAL={ping_interval}",
               f'PING_FROM="sip:dispatcher@{LOCAL}:{port}"']
    argv = [binary, "-f", KAMAILIO_CFG, "-P", os.path.join(workdir, "kamailio.pid"), "-w", workdir,
            "-Y", workdir, "-E", "-DD"]
    for define in defines:
        argv += ["-A", define]
    watcher = spawn(argv, path=workdir)
    testcase.addCleanup(terminate, watcher)
    yield watcher.wait_for(r"Listening on", timeout=8)
    yield when(port_bound(port), 15, "kamailio to bind its port")
    return watcher, port


@defer.inlineCallbacks
def start_haproxy(testcase, nodes):
    """HAProxy with the shipped configuration in front of the nodes; returns (watcher, port, stats port)."""
    binary = require(HAPROXY, "haproxy")
    port, stats = free_ports(2, exclude=tuple(n.http_port for n in nodes))
    env = {"ACTIVECALL_BIND": f"{LOCAL}:{port}", "ACTIVECALL_STATS": f"{LOCAL}:{stats}",
           "ACTIVECALL_NODE1": f"{LOCAL}:{nodes[0].http_port}", "ACTIVECALL_NODE2": f"{LOCAL}:{nodes[1].http_port}"}
    workdir = os.path.abspath(testcase.mktemp())
    os.makedirs(workdir)
    watcher = spawn([binary, "-db", "-f", HAPROXY_CFG], env=env, path=workdir)
    testcase.addCleanup(terminate, watcher)
    def stats_page():
        if watcher.ended.called:
            raise AssertionError(f"haproxy exited:\n{watcher.output}")
        return server_states(stats).addErrback(lambda f: None)

    yield poll(stats_page, "HAProxy's stats page")
    return watcher, port, stats


@defer.inlineCallbacks
def server_states(stats_port) -> dict:
    """node name -> HAProxy's status of it (UP, NOLB, DOWN, ...), from the stats page's CSV."""
    response = yield treq.get(f"http://{LOCAL}:{stats_port}/stats;csv", persistent=False)
    text = (yield response.text()).lstrip("# ")
    rows = [line.split(",") for line in text.splitlines() if line]
    header = rows[0]
    states = {}
    for row in rows[1:]:
        record = dict(zip(header, row))
        if record.get("pxname") == "activecall_nodes" and record.get("svname", "").startswith("node"):
            states[record["svname"]] = record["status"]
    return states


class ScaleOutTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.nodes = [Node(self, "node1"), Node(self, "node2")]
        return defer.gatherResults([node.start() for node in self.nodes])

    @defer.inlineCallbacks
    def test_sip_drain_through_kamailio(self):
        a, b = self.nodes
        kamailio, kport = yield start_kamailio(self, self.nodes)
        log = kamailio  # its output is the routing record
        uac = sipp(self, f"{LOCAL}:{kport}", "-p", str(udp_port()), "-mp", str(udp_port() // 2 * 2),
                   "-r", str(RATE), "-rp", "1000", "-m", str(CALLS), "-d", str(CALL_MS), "-timeout", "60s",
                   scenario="uac_proxied.xml")
        # drain node a while it holds a call
        yield poll(lambda: a.health().addCallback(lambda h: h["active_calls"] >= 1), "a call on node a")
        first_run = a.daemon
        first_run.signal("TERM")
        yield sipp_result(uac, timeout=60)  # sipp exits 0 only if every call succeeded

        code = yield when(first_run.ended, 60, "the drained node to exit once idle")
        self.assertEqual(code, 0, first_run.output[-3000:])
        self.assertIn("drained: no call left", first_run.output)

        routes = self.routes(log.output)
        answered = routes["answered"]
        self.assertEqual(len(answered), CALLS, log.output[-3000:])
        on_a = {ci for ci, port in answered.items() if port == a.sip_port}
        on_b = {ci for ci, port in answered.items() if port == b.sip_port}
        self.assertTrue(on_a and on_b, answered)
        self.assertEqual(on_a | on_b, set(answered))
        # the drained node's calls completed: each BYE came through the proxy to the node holding the call
        for ci, port in answered.items():
            self.assertEqual(routes["bye"].get(ci), port, f"the BYE of {ci}")
        self.assertEqual(a.cdrs(), len(on_a))
        # once node a refused (503) or was probed down, no new call went to it
        out_at = routes["a_out_at"](a.sip_port)
        self.assertIsNotNone(out_at, log.output[-3000:])
        later_to_a = [line for line in log.output[out_at:].splitlines()
                      if re.search(rf"scaleout: (new|retry) .*-> sip:{LOCAL}:{a.sip_port}\b", line)]
        self.assertEqual(later_to_a, [])

        # restarted, node a is probed up again and takes calls
        yield a.start()
        yield log.wait_for(rf"scaleout: node up .*sip:{LOCAL}:{a.sip_port}", timeout=30)
        mark = len(log.output)
        uac = sipp(self, f"{LOCAL}:{kport}", "-p", str(udp_port()), "-mp", str(udp_port() // 2 * 2),
                   "-r", str(RATE), "-rp", "1000", "-m", "6", "-d", "300", "-timeout", "60s", scenario="uac_proxied.xml")
        yield sipp_result(uac, timeout=60)
        answered = self.routes(log.output[mark:])["answered"]
        self.assertEqual(len(answered), 6)
        self.assertIn(a.sip_port, set(answered.values()))
        self.assertIn(b.sip_port, set(answered.values()))

    @defer.inlineCallbacks
    def test_a_node_that_does_not_answer_is_failed_over(self):
        """A dead node first in the list (nothing on its port; no probe within the test): the INVITE sent
        to it gets no answer, kamailio gives up after FR_TIMEOUT, marks it down and sends the call on."""
        b = self.nodes[1]
        dead = udp_port()
        kamailio, kport = yield start_kamailio(self, [dead, b], ping_interval=60)
        uac = sipp(self, f"{LOCAL}:{kport}", "-p", str(udp_port()), "-mp", str(udp_port() // 2 * 2),
                   "-r", "2", "-rp", "1000", "-m", "4", "-d", "300", "-timeout", "60s", scenario="uac_proxied.xml")
        yield sipp_result(uac, timeout=60)
        answered = self.routes(kamailio.output)["answered"]
        self.assertEqual(set(answered.values()), {b.sip_port})
        self.assertEqual(len(answered), 4)
        failed_over = re.findall(rf"scaleout: (\S+) refused by sip:{LOCAL}:{dead} \(408\)", kamailio.output)
        # the calls sent to it before the first one timed out (FR_TIMEOUT) all went on to node b
        self.assertTrue(failed_over, kamailio.output[-3000:])
        self.assertLessEqual(set(failed_over), set(answered))

    @staticmethod
    def routes(text: str) -> dict:
        """What kamailio's log says: Call-ID -> the port of the node that answered it, Call-ID -> the
        port its BYE was relayed to, and where in the log a node first went out of rotation."""
        answered, bye = {}, {}
        for m in re.finditer(r"scaleout: answered (\S+) by [\d.]+:(\d+)", text):
            answered[m.group(1)] = int(m.group(2))
        for m in re.finditer(r"scaleout: in-dialog BYE (\S+) -> sip:[^@\s]*?@?[\d.]+:(\d+)", text):
            bye[m.group(1)] = int(m.group(2))

        def out_at(port):
            m = re.search(rf"scaleout: (\S+ refused by sip:{LOCAL}:{port}\b|node down .*sip:{LOCAL}:{port}\b)", text)
            return None if m is None else m.start()

        return {"answered": answered, "bye": bye, "a_out_at": out_at}

    @defer.inlineCallbacks
    def test_websocket_drain_through_haproxy(self):
        a, b = self.nodes
        proxy, port, stats = yield start_haproxy(self, self.nodes)
        yield poll(lambda: server_states(stats).addCallback(lambda s: s == {"node1": "UP", "node2": "UP"}),
                   "both nodes UP in HAProxy")

        @defer.inlineCallbacks
        def session(call_id):
            proto, client = yield connect(self, port, "/call", f"id={call_id}&ping=0")
            send_json(proto, {"command": "invite", "option": {"codec": "pcm"}})
            yield client.wait_event("answer")
            return proto, client

        @defer.inlineCallbacks
        def owner(call_id):
            for node in self.nodes:
                if call_id in (yield node.session_ids()):
                    return node
            return None

        # a session on node a (round robin: one of two consecutive sessions lands there)
        live = {}
        for n in range(2):
            live[f"ws-{n}"] = yield session(f"ws-{n}")
        drained_id = None
        for call_id in live:
            if (yield owner(call_id)) is a:
                drained_id = call_id
        self.assertIsNotNone(drained_id, "no session landed on node a")
        proto, client = live[drained_id]

        first_run = a.daemon
        first_run.signal("TERM")
        yield poll(lambda: http_json(a.base + "/ready").addCallback(lambda r: r[0] == 503), "node a draining")
        # new sessions go to node b, whether HAProxy has seen node a's /ready yet or not (a 503 at the
        # upgrade is retried on the other node)
        for n in range(3):
            call_id = f"new-{n}"
            live[call_id] = yield session(call_id)
            self.assertIs((yield owner(call_id)), b, call_id)
        states = yield poll(lambda: server_states(stats).addCallback(lambda s: s if s["node1"] != "UP" else None),
                            "HAProxy to see node a leave the rotation")
        self.assertEqual(states, {"node1": "NOLB", "node2": "UP"})
        for n in range(3, 5):
            call_id = f"new-{n}"
            live[call_id] = yield session(call_id)
            self.assertIs((yield owner(call_id)), b, call_id)

        # the session on the draining node goes on; a request naming it reaches its node through HAProxy
        send_json(proto, {"command": "history", "speaker": "user", "text": "still here"})
        self.assertEqual((yield client.wait_event("addHistory"))["text"], "still here")
        response = yield treq.get(f"http://{LOCAL}:{port}/kill/{drained_id}", persistent=False)
        self.assertEqual(response.code, 200, (yield response.text()))
        yield client.wait_event("hangup")
        code = yield when(first_run.ended, 60, "the drained node to exit once idle")
        self.assertEqual(code, 0, first_run.output[-3000:])
        self.assertIn("drained: no call left", first_run.output)

        # restarted, node a is back in rotation
        yield a.start()
        yield poll(lambda: server_states(stats).addCallback(lambda s: s == {"node1": "UP", "node2": "UP"}),
                   "node a UP again in HAProxy")
        placed = []
        for n in range(2):
            call_id = f"again-{n}"
            live[call_id] = yield session(call_id)
            placed.append((yield owner(call_id)))
        self.assertIn(a, placed)
        # every other session ends the ordinary way: hangup, and the node closes the socket
        open_ones = [(p, c) for call_id, (p, c) in live.items() if call_id != drained_id]
        for other, _ in open_ones:
            send_json(other, {"command": "hangup"})
        yield defer.gatherResults([c.closed for _, c in open_ones])
        yield client.closed
