"""The real daemon as a subprocess: plugin discovery, start, /health, /metrics,
SIGTERM, bad configuration, log_file, the ``active-call`` console script."""

import json
import os
import re

import treq
from twisted.internet import defer, utils
from twisted.trial import unittest

from tests.helpers import BIN, ROOT, TWISTD, free_port, free_ports, spawn, spawn_daemon, write_config

LISTENING = r"HTTP listening on 127\.0\.0\.1:(\d+)"


def base_config(http_port=None, **extra) -> str:
    """A minimal configuration; ``http_port``: one the test picked (and gives with ``--http``)."""
    # not http :0, which the kernel may hand the port just picked for SIP
    sip_port, picked = free_ports(2, exclude=(http_port,))
    http_port = http_port or picked
    lines = [
        'addr = "127.0.0.1"',
        f"udp_port = {sip_port}",
        f'http_addr = "127.0.0.1:{http_port}"',
        "rtp_start_port = 30000",
        "rtp_end_port = 30100",
    ]
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


class PluginDiscoveryTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_twistd_lists_activecall(self):
        out = yield utils.getProcessOutput(TWISTD, ["--help"], env=os.environ, path=ROOT)
        self.assertRegex(out.decode(), r"\n\s+activecall\s+AI voice-agent")

    @defer.inlineCallbacks
    def test_plugin_options_are_the_guides_flags(self):
        out = yield utils.getProcessOutput(TWISTD, ["activecall", "--help"], env=os.environ, path=ROOT)
        for flag in ("--conf", "--http", "--sip", "--handler", "--call", "--external-ip", "--codecs"):
            self.assertIn(flag + "=", out.decode())


class DaemonLifecycleTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_start_health_metrics_sigterm(self):
        log_file = os.path.abspath(self.mktemp() + ".log")
        conf = write_config(self, base_config(log_file=log_file, http_access_skip_paths=["/metrics*"]))
        daemon = spawn_daemon(self, conf)
        m = yield daemon.wait_for(LISTENING)
        yield daemon.wait_for("activecall ready")
        base = f"http://127.0.0.1:{m.group(1)}"

        resp = yield treq.get(base + "/health", persistent=False)
        self.assertEqual(resp.code, 200)
        self.assertEqual(resp.headers.getRawHeaders("content-type"), ["application/json"])
        health = yield resp.json()
        self.assertEqual(health["status"], "ok")
        self.assertEqual(health["active_calls"], 0)
        self.assertEqual(health["sip_registrations"], [])
        self.assertIn("version", health)
        self.assertGreaterEqual(health["uptime"], 0)

        resp = yield treq.get(base + "/metrics", persistent=False)
        self.assertEqual(resp.code, 200)
        self.assertTrue(resp.headers.getRawHeaders("content-type")[0].startswith("text/plain"))
        body = (yield resp.text())
        self.assertIn("# TYPE process_resident_memory_bytes gauge", body)
        self.assertIn("activecall_uptime_seconds", body)
        self.assertIn("# TYPE activecall_calls_active gauge", body)

        yield daemon.wait_for(r'"GET /health" 200')
        daemon.signal("TERM")
        code = yield daemon.ended
        self.assertEqual(code, 0, daemon.output)
        self.assertIn("activecall stopped", daemon.output)
        # the access log skipped /metrics*, and log_file received the same lines
        self.assertNotIn('"GET /metrics"', daemon.output)
        with open(log_file) as f:
            logged = f.read()
        self.assertIn('"GET /health" 200', logged)
        self.assertIn("activecall stopped", logged)

    @defer.inlineCallbacks
    def test_sigint_also_exits_cleanly(self):
        daemon = spawn_daemon(self, write_config(self, base_config()))
        yield daemon.wait_for("activecall ready")
        daemon.signal("INT")
        code = yield daemon.ended
        self.assertEqual(code, 0, daemon.output)

    @defer.inlineCallbacks
    def test_log_level_filters(self):
        port = free_port()
        quiet = spawn_daemon(self, write_config(self, base_config(port, log_level="warn",
                                                                  codecs=["pcmu", "g729"])),
                             "--http", f"127.0.0.1:{port}")
        chatty = spawn_daemon(self, write_config(self, base_config(log_level="debug")))  # its own ports
        yield quiet.wait_for(r"'g729' is not supported")  # a warning passes the filter
        # an answer means the quiet daemon's reactor runs (its info lines are filtered)
        resp = yield treq.get(f"http://127.0.0.1:{port}/health", persistent=False)
        yield resp.content()
        yield chatty.wait_for(r"configuration: \{")  # debug detail
        yield chatty.wait_for("activecall ready")
        for d in (quiet, chatty):
            d.signal("TERM")
        codes = yield defer.gatherResults([quiet.ended, chatty.ended])
        self.assertEqual(codes, [0, 0])
        self.assertNotIn("HTTP listening", quiet.output)  # info is filtered out
        self.assertNotIn("configuration: {", quiet.output)

    @defer.inlineCallbacks
    def test_cli_flags_override_file(self):
        port = free_port()
        conf = write_config(self, base_config(port))
        daemon = spawn_daemon(self, conf, "--http", f"127.0.0.1:{port}")
        yield daemon.wait_for(rf"HTTP listening on 127\.0\.0\.1:{port}")
        yield daemon.wait_for("activecall ready")
        resp = yield treq.get(f"http://127.0.0.1:{port}/health", persistent=False)
        self.assertEqual(resp.code, 200)
        yield resp.content()
        daemon.signal("TERM")
        self.assertEqual((yield daemon.ended), 0)

    @defer.inlineCallbacks
    def test_console_script_runs_the_same_daemon(self):
        port = free_port()
        conf = write_config(self, base_config(port))
        daemon = spawn([os.path.join(BIN, "active-call"), "--conf", conf, "--http", f"127.0.0.1:{port}"])
        self.addCleanup(daemon.kill)
        yield daemon.wait_for(rf"HTTP listening on 127\.0\.0\.1:{port}")
        self.assertIn("AsyncioSelectorReactor", daemon.output)
        yield daemon.wait_for("activecall ready")
        resp = yield treq.get(f"http://127.0.0.1:{port}/health", persistent=False)
        self.assertEqual((yield resp.json())["status"], "ok")
        daemon.signal("TERM")
        self.assertEqual((yield daemon.ended), 0)


class BadConfigTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def assertStartFails(self, conf_text, *flags, expect):
        conf = write_config(self, conf_text) if conf_text is not None else None
        daemon = spawn_daemon(self, conf, *flags)
        code = yield daemon.ended
        self.assertNotEqual(code, 0)
        self.assertIn(expect, daemon.output)
        self.assertNotIn("Traceback", daemon.output)
        return daemon.output

    @defer.inlineCallbacks
    def test_bad_key_exits_nonzero_naming_it(self):
        out = yield self.assertStartFails(
            base_config() + 'external_ip = "nope"\n', expect="key 'external_ip'")
        self.assertIn("configuration error", out)

    @defer.inlineCallbacks
    def test_unknown_key_suggests(self):
        yield self.assertStartFails(base_config() + "udp_prot = 1\n", expect="did you mean 'udp_port'")

    @defer.inlineCallbacks
    def test_bad_flag(self):
        yield self.assertStartFails(base_config(), "--sip", "nope:x", expect="key '--sip'")

    @defer.inlineCallbacks
    def test_missing_file(self):
        yield self.assertStartFails(None, "--conf", "/nonexistent.toml", expect="does not exist")

    @defer.inlineCallbacks
    def test_unwritable_log_file(self):
        yield self.assertStartFails(
            base_config(log_file="/nonexistent/dir/a.log"), expect="key 'log_file'")

    @defer.inlineCallbacks
    def test_a_missing_configured_playbook_stops_start_up(self):
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        with open(os.path.join(root, "default.md"), "w") as f:
            f.write("---\nllm: {provider: echo}\n---\nHi.\n")
        missing = os.path.join(root, "elsewhere", "sales.md")
        out = yield self.assertStartFails(
            base_config(playbook_dir=root) + (
                '[handler]\ntype = "playbook"\ndefault = "default.md"\n'
                '[[handler.rules]]\ncallee = "^1001$"\nplaybook = "default.md"\n'
                f'[[handler.rules]]\ncallee = "^1002$"\nplaybook = "{missing}"\n'),
            expect=f"key 'handler.rules[1].playbook': {missing}: no such file")
        self.assertRegex(out, r"activecall: configuration error: /\S+\.toml: key 'handler\.rules\[1\]")
        self.assertNotIn("activecall ready", out)

    @defer.inlineCallbacks
    def test_an_invalid_playbook_from_the_handler_flag_stops_start_up(self):
        bad = os.path.abspath(self.mktemp() + ".md")
        with open(bad, "w") as f:
            f.write("---\nllm: [\n---\nx\n")
        yield self.assertStartFails(
            base_config(), "--handler", bad,
            expect=f"configuration error: command line: key '--handler': {bad}:2: invalid YAML")

    @defer.inlineCallbacks
    def test_port_in_use(self):
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        self.addCleanup(s.close)
        port = s.getsockname()[1]
        yield self.assertStartFails(
            re.sub(r'http_addr = "[^"]*"', f'http_addr = "127.0.0.1:{port}"', base_config()),
            expect=f"cannot listen on http_addr 127.0.0.1:{port}")
