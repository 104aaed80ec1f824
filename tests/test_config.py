"""Configuration: every key of the guide, defaults, bad input, CLI overrides."""

import dataclasses
import os
import re

from twisted.trial import unittest

from activecall import config as C
from activecall.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "etc", "activecall.toml")


class ConfigFileMixin:
    def write(self, text: str) -> str:
        path = self.mktemp() + ".toml"
        with open(path, "w") as f:
            f.write(text)
        return path

    def load(self, text: str, overrides=None):
        return load_config(self.write(text), overrides)[0]

    def assertBad(self, text: str, key: str, reason_pattern: str, overrides=None):
        path = self.write(text)
        with self.assertRaises(ConfigError) as cm:
            load_config(path, overrides)
        err = cm.exception
        self.assertEqual(err.key, key, str(err))
        self.assertRegex(err.reason, reason_pattern)
        if not key.startswith("--"):
            self.assertIn(path, str(err))
        self.assertIn(key, str(err))
        return err


class DefaultsTests(ConfigFileMixin, unittest.TestCase):
    def test_no_file_gives_the_guides_defaults(self):
        cfg, warnings = load_config(None)
        self.assertEqual(warnings, [])
        self.assertEqual(cfg.addr, "0.0.0.0")
        self.assertEqual(cfg.http_addr, "0.0.0.0:8080")
        self.assertEqual(cfg.udp_port, 25060)
        self.assertEqual(cfg.rtp_start_port, 12000)
        self.assertEqual(cfg.rtp_end_port, 42000)
        self.assertEqual(cfg.media_cache_path, "./config/mediacache")
        self.assertIsNone(cfg.tls_port)
        self.assertFalse(cfg.enable_srtp)
        self.assertTrue(cfg.enable_rtp_latching)
        self.assertTrue(cfg.graceful_shutdown)
        self.assertEqual(cfg.accept_timeout, 60.0)
        self.assertIsNone(cfg.handler)
        self.assertIsNone(cfg.callrecord)
        self.assertFalse(cfg.recording.enabled)
        self.assertEqual(cfg.recording.path, "./config/recorders")
        self.assertEqual(cfg.codecs, C.DEFAULT_CODECS)
        self.assertTrue(cfg.useragent.startswith("activecall/"))
        self.assertEqual(cfg.sip_tcp_port, 25060)

    def test_partial_file_keeps_other_defaults(self):
        # The original fell back to *all* defaults when addr/udp_port were missing.
        cfg = self.load('http_addr = "127.0.0.1:9999"\nlog_level = "warn"\n')
        self.assertEqual(cfg.http_addr, "127.0.0.1:9999")
        self.assertEqual(cfg.log_level, "warn")
        self.assertEqual(cfg.udp_port, 25060)
        self.assertEqual(cfg.addr, "0.0.0.0")

    def test_empty_file(self):
        cfg = self.load("")
        self.assertEqual(cfg, dataclasses.replace(load_config(None)[0], source=cfg.source))

    def test_sample_configuration_loads(self):
        cfg, warnings = load_config(SAMPLE)
        self.assertEqual(warnings, [])
        self.assertIsInstance(cfg.handler, C.PlaybookHandler)
        self.assertEqual(cfg.callrecord.type, "local")

    def test_sample_configuration_mentions_every_key(self):
        with open(SAMPLE) as f:
            text = f.read()
        sections = {
            "": C.Config, "ice_servers": C.IceServer, "recording": C.Recording,
            "callrecord": C.CallRecord, "register_users": C.RegisterUser,
            "register_users.credential": C.Credential, "rewrites": C.Rewrite,
            "handler": C.WebhookHandler, "handler.rules": C.Rule, "trunk_rules": C.TrunkRule,
            "ambiance": C.Ambiance,
        }
        for section, cls in sections.items():
            for f in dataclasses.fields(cls):
                if f.metadata.get("cli_only") or dataclasses.is_dataclass(f.type):
                    continue
                if f.name in ("ice_servers", "handler", "register_users", "recording",
                              "callrecord", "rewrites", "rules", "credential", "trunk_rules", "ambiance"):
                    continue
                name = (f.metadata.get("toml_keys") or (f.name,))[0]
                self.assertRegex(text, rf"(?m)^#?\s*{name}\s*=", f"{section}.{name} missing")
        self.assertIn('default = "default.md"', text)


class GuideExamplesTests(ConfigFileMixin, unittest.TestCase):
    """The configuration guide's complete examples load as written."""

    def test_twilio_example(self):
        cert = self.write("cert")
        key = self.write("key")
        cfg = self.load(f'''
addr = "0.0.0.0"
udp_port = 5060
tls_port = 5061
tls_cert_file = "{cert}"
tls_key_file = "{key}"
enable_srtp = true
external_ip = "203.0.113.9"
rtp_start_port = 12000
rtp_end_port = 42000
''')
        self.assertEqual(cfg.tls_port, 5061)
        self.assertTrue(cfg.enable_srtp)
        self.assertEqual(cfg.external_ip, "203.0.113.9")

    def test_example_webrtc_only(self):
        cfg = self.load('''
addr = "0.0.0.0"
http_addr = "0.0.0.0:8080"
log_level = "info"
media_cache_path = "./config/mediacache"
[[ice_servers]]
urls = ["stun:stun.l.google.com:19302"]
[[ice_servers]]
urls = ["turn:turn.example.com:3478"]
username = "user"
credential = "pass"
[recording]
enabled = true
auto_start = true
[callrecord]
type = "local"
root = "./config/cdr"
''')
        self.assertEqual(len(cfg.ice_servers), 2)
        self.assertEqual(cfg.ice_servers[1].username, "user")
        self.assertEqual(cfg.ice_servers[1].credential_type, "password")
        self.assertTrue(cfg.recording.enabled and cfg.recording.auto_start)
        self.assertEqual(cfg.callrecord.root, "./config/cdr")

    def test_playbook_rules(self):
        cfg = self.load(r'''
[handler]
type = "playbook"
default = "default.md"
[[handler.rules]]
caller = "^\\+1\\d{10}$"
callee = "^sip:support@.*"
playbook = "support.md"
[[handler.rules]]
caller = "^\\+86\\d+"
playbook = "chinese.md"
[[handler.rules]]
callee = "^sip:sales@.*"
playbook = "sales.md"
''')
        h = cfg.handler
        self.assertIsInstance(h, C.PlaybookHandler)
        self.assertEqual(h.default, "default.md")
        self.assertEqual([r.playbook for r in h.rules], ["support.md", "chinese.md", "sales.md"])
        self.assertEqual(h.rules[0].caller, r"^\+1\d{10}$")
        self.assertIsNone(h.rules[1].callee)
        self.assertIsNone(h.rules[2].caller)

    def test_webhook_handler(self):
        cfg = self.load('''
[handler]
type = "webhook"
url = "http://localhost:8090/webhook"
method = "post"
headers = [["X-Test-Header", "1"]]
''')
        self.assertEqual(cfg.handler.url, "http://localhost:8090/webhook")
        self.assertEqual(cfg.handler.method, "POST")
        self.assertEqual(cfg.handler.headers, (("X-Test-Header", "1"),))

    def test_webhook_urls_and_header_table(self):
        cfg = self.load('''
[handler]
type = "webhook"
urls = ["http://a:1/w", "https://b/w"]
headers = { "X-A" = "1" }
timeout = "2s"
''')
        self.assertEqual(cfg.handler.urls, ("http://a:1/w", "https://b/w"))
        self.assertEqual(cfg.handler.headers, (("X-A", "1"),))
        self.assertEqual(cfg.handler.timeout, 2.0)

    def test_register_users(self):
        cfg = self.load('''
[[register_users]]
server = "pbx.example.com:5060"
username = "1001"
disabled = false
[register_users.credential]
username = "1001"
password = "secret123"
realm = "pbx.example.com"
[[register_users]]
server = "sip:10.0.0.1"
username = "1002"
disabled = true
''')
        a, b = cfg.register_users
        self.assertEqual(a.credential.password, "secret123")
        self.assertEqual(a.expires, 3600)
        self.assertTrue(b.disabled)
        self.assertIsNone(b.credential)
        self.assertNotIn("secret123", repr(a))
        self.assertNotIn("secret123", str(C.redacted(cfg)))

    def test_extras(self):
        cfg = self.load(r'''
accept_timeout = "1m30s"
codecs = ["PCMA", "dtmf", "opus"]
useragent = "my-agent"
graceful_shutdown = false
rtp_bind_ip = "127.0.0.1"
enable_rtp_latching = false
http_token = "tok"
http_access_skip_paths = ["/health", "/metrics*"]
log_file = "/tmp/x.log"
[[rewrites]]
match = "sip:(\\d+)@.*"
rewrite = "sip:$1@internal.net"
[recording]
path = "/var/rec"
[callrecord]
type = "http"
url = "https://cdr.example.com/up"
headers = { Authorization = "Bearer x" }
with_media = true
''')
        self.assertEqual(cfg.accept_timeout, 90.0)
        self.assertEqual(cfg.codecs, ("pcma", "telephone_event", "opus"))
        self.assertEqual(cfg.useragent, "my-agent")
        self.assertFalse(cfg.graceful_shutdown)
        self.assertEqual(cfg.rtp_bind_ip, "127.0.0.1")
        self.assertEqual(cfg.rewrites[0].rewrite, "sip:$1@internal.net")
        self.assertEqual(cfg.recording.path, "/var/rec")
        self.assertEqual(cfg.callrecord.url, "https://cdr.example.com/up")
        self.assertTrue(cfg.callrecord.with_media)
        self.assertEqual(cfg.http_token, "tok")
        self.assertNotIn("tok", str(C.redacted(cfg)).replace("http_token", ""))

    def test_g729_is_dropped_with_a_warning(self):
        cfg, warnings = load_config(self.write('codecs = ["pcmu", "g729"]'))
        self.assertEqual(cfg.codecs, ("pcmu",))
        self.assertEqual(len(warnings), 1)
        self.assertIn("g729", warnings[0])

    def test_ipv6(self):
        cfg = self.load('addr = "::1"\nhttp_addr = "[::1]:8080"\nexternal_ip = "2001:db8::1"')
        self.assertEqual(cfg.addr, "::1")
        self.assertEqual(cfg.http_host_port, ("::1", 8080))


class BadInputTests(ConfigFileMixin, unittest.TestCase):
    def test_wrong_types(self):
        self.assertBad('udp_port = "5060"', "udp_port", "expected an integer")
        self.assertBad("enable_srtp = 1", "enable_srtp", "expected a boolean")
        self.assertBad("addr = 1", "addr", "expected a string")
        self.assertBad('http_access_skip_paths = "/health"', "http_access_skip_paths", "array")
        self.assertBad("http_access_skip_paths = [1]", "http_access_skip_paths[0]", "string")
        self.assertBad('[recording]\nenabled = "yes"', "recording.enabled", "boolean")
        self.assertBad('recording = 1', "recording", "table")
        self.assertBad('ice_servers = {urls = []}', "ice_servers", "array of tables")

    def test_unparsable_addresses(self):
        self.assertBad('addr = "not-an-ip"', "addr", "not an IP address")
        self.assertBad('http_addr = "0.0.0.0"', "http_addr", "no port")
        self.assertBad('http_addr = "0.0.0.0:http"', "http_addr", "not a number")
        self.assertBad('http_addr = "nohost:8080"', "http_addr", "not an IP")
        self.assertBad('external_ip = "1.2.3.4:5060"', "external_ip", "not an IP")
        self.assertBad('rtp_bind_ip = "300.1.1.1"', "rtp_bind_ip", "not an IP")

    def test_ports_out_of_range(self):
        self.assertBad("udp_port = 70000", "udp_port", "out of range")
        self.assertBad("udp_port = 0", "udp_port", "out of range")
        self.assertBad('http_addr = "0.0.0.0:65536"', "http_addr", "out of range")
        self.assertBad("rtp_start_port = -1", "rtp_start_port", "out of range")

    def test_rtp_range(self):
        self.assertBad("rtp_start_port = 20000\nrtp_end_port = 10000", "rtp_end_port", "inverted")
        self.assertBad("rtp_start_port = 20000\nrtp_end_port = 20001", "rtp_end_port", "too small")

    def test_invalid_regexes(self):
        self.assertBad('[handler]\ntype = "playbook"\n[[handler.rules]]\ncaller = "(+"\nplaybook = "a.md"',
                       "handler.rules[0].caller", "invalid regex")
        self.assertBad('[[rewrites]]\nmatch = "[a"\nrewrite = "x"', "rewrites[0].match", "invalid regex")

    def test_rule_needs_playbook(self):
        self.assertBad('[handler]\ntype = "playbook"\n[[handler.rules]]\ncaller = "a"',
                       "handler.rules[0].playbook", "required")

    def test_handler_type(self):
        self.assertBad('[handler]\nurl = "http://x"', "handler.type", "required")
        self.assertBad('[handler]\ntype = "magic"', "handler.type", "not one of")
        self.assertBad('[handler]\ntype = "webhook"', "handler.url", "needs url")
        self.assertBad('[handler]\ntype = "webhook"\nurl = "ftp://x"', "handler.url", "http")
        self.assertBad('[handler]\ntype = "webhook"\nurl = "http://x"\nmethod = "DELETE"',
                       "handler.method", "not one of")
        self.assertBad('[handler]\ntype = "webhook"\nurl = "http://x"\nheaders = [["A"]]',
                       "handler.headers[0]", "pair")

    def test_tls_files(self):
        self.assertBad("tls_port = 5061", "tls_cert_file", "required")
        missing = os.path.join(self.mktemp(), "nope.pem")
        self.assertBad(f'tls_port = 5061\ntls_cert_file = "{missing}"\ntls_key_file = "{missing}"',
                       "tls_cert_file", "cannot read")
        cert = self.write("x")
        self.assertBad(f'tls_port = 5061\ntls_cert_file = "{cert}"\ntls_key_file = "{missing}"',
                       "tls_key_file", "cannot read")

    def test_tls_files_not_needed_without_tls_port(self):
        cfg = self.load('tls_cert_file = "/nonexistent"')
        self.assertIsNone(cfg.tls_port)

    def test_unknown_keys_suggest(self):
        err = self.assertBad("udp_prot = 5060", "udp_prot", "unknown key; did you mean 'udp_port'")
        self.assertIn("did you mean", str(err))
        self.assertBad('[recording]\nauto_strat = true', "recording.auto_strat", "did you mean 'auto_start'")
        self.assertBad('[[register_users]]\nserver = "a"\n[register_users.credential]\npasword = "x"',
                       "register_users[0].credential.pasword", "did you mean 'password'")
        self.assertBad("completely_unrelated = 1", "completely_unrelated", r"^unknown key$")

    def test_callrecord_s3(self):
        cfg, _ = load_config(self.write('''
[callrecord]
type = "s3"
vendor = "a_w_s"
bucket = "calls"
region = "eu-west-1"
access_key = "AKIDEXAMPLE"
secret_key = "very-secret-key"
root = "cdr"
with_media = true
keep_media_copy = false
spool_dir = "/var/spool/activecall"
'''))
        section = cfg.callrecord
        self.assertEqual((section.type, section.vendor, section.bucket, section.region), ("s3", "aws", "calls", "eu-west-1"))
        self.assertEqual((section.root, section.with_media, section.keep_media_copy), ("cdr", True, False))
        self.assertEqual(section.spool_dir, "/var/spool/activecall")
        self.assertIsNone(section.endpoint)
        shown = str(C.redacted(cfg))
        self.assertNotIn("very-secret-key", shown)
        self.assertNotIn("AKIDEXAMPLE", shown)
        cfg, _ = load_config(self.write('''
[callrecord]
type = "s3"
vendor = "minio"
bucket = "calls"
access_key = "a"
secret_key = "s"
endpoint = "http://127.0.0.1:9000"
'''))
        self.assertEqual(cfg.callrecord.endpoint, "http://127.0.0.1:9000")
        self.assertEqual(cfg.callrecord.spool_dir, "./config/cdr-spool")

    def test_other_bad_values(self):
        self.assertBad('log_level = "loud"', "log_level", "not one of")
        self.assertBad('accept_timeout = "soon"', "accept_timeout", "not a duration")
        self.assertBad('codecs = ["pcmu", "speex"]', "codecs", "unknown codec 'speex'")
        self.assertBad('codecs = ["dtmf"]', "codecs", "audio codec")
        self.assertBad('[[ice_servers]]\nurls = ["http://x"]', "ice_servers[0].urls", "stun")
        self.assertBad('[callrecord]\ntype = "ftp"', "callrecord.type", "not one of")
        self.assertBad('[callrecord]\ntype = "s3"', "callrecord.bucket", "required")
        self.assertBad('[callrecord]\ntype = "s3"\nbucket = "b"\naccess_key = "a"', "callrecord.secret_key", "required")
        self.assertBad('[callrecord]\ntype = "s3"\nvendor = "minio"\nbucket = "b"\naccess_key = "a"\nsecret_key = "s"',
                       "callrecord.endpoint", "required for vendor 'minio'")
        self.assertBad('[callrecord]\ntype = "s3"\nvendor = "azure"', "callrecord.vendor", "not S3-compatible")
        self.assertBad('[callrecord]\ntype = "s3"\nvendor = "ibm"', "callrecord.vendor", "not one of")
        self.assertBad('[callrecord]\ntype = "s3"\nendpoint = "minio:9000"', "callrecord.endpoint", "http")
        self.assertBad('[callrecord]\ntype = "http"', "callrecord.url", "required")
        self.assertBad('[[register_users]]\nusername = "1"', "register_users[0].server", "required")
        self.assertBad('[[register_users]]\nserver = "a b"', "register_users[0].server", "host:port")
        self.assertBad('http_token = " "', "http_token", "empty")

    def test_toml_syntax_error_names_the_file(self):
        path = self.write("udp_port = \n")
        with self.assertRaises(ConfigError) as cm:
            load_config(path)
        self.assertIn(path, str(cm.exception))
        self.assertIn("not valid TOML", str(cm.exception))

    def test_missing_file(self):
        with self.assertRaises(ConfigError) as cm:
            load_config("/nonexistent/activecall.toml")
        self.assertIn("/nonexistent/activecall.toml", str(cm.exception))
        self.assertIn("does not exist", str(cm.exception))


class DurationTests(unittest.TestCase):
    def test_durations(self):
        for text, seconds in [("60s", 60), ("1m30s", 90), ("500ms", 0.5), ("2h", 7200), ("15", 15),
                              (3, 3), (2.5, 2.5)]:
            self.assertEqual(C.parse_duration(text), seconds, text)
        for bad in ("", "abc", "10x", "-1", True):
            self.assertRaises(ValueError, C.parse_duration, bad)


class OverrideTests(ConfigFileMixin, unittest.TestCase):
    BASE = 'addr = "10.0.0.1"\nudp_port = 5060\nhttp_addr = "0.0.0.0:8080"\ncodecs = ["pcmu"]\n'

    def test_flags_override_the_file(self):
        cfg = self.load(self.BASE, {
            "http": "127.0.0.1:9090", "sip": "127.0.0.1:13050", "external-ip": "1.2.3.4",
            "codecs": "pcma,opus", "handler": "https://example.com/webhook",
            "call": "sip:1001@127.0.0.1",
        })
        self.assertEqual(cfg.http_addr, "127.0.0.1:9090")
        self.assertEqual((cfg.addr, cfg.udp_port), ("127.0.0.1", 13050))
        self.assertEqual(cfg.external_ip, "1.2.3.4")
        self.assertEqual(cfg.codecs, ("pcma", "opus"))
        self.assertEqual(cfg.handler, C.WebhookHandler(url="https://example.com/webhook"))
        self.assertEqual(cfg.call, "sip:1001@127.0.0.1")

    def test_sip_flag_forms(self):
        self.assertEqual(self.load(self.BASE, {"sip": "13050"}).udp_port, 13050)
        self.assertEqual(self.load(self.BASE, {"sip": "13050"}).addr, "10.0.0.1")
        cfg = self.load(self.BASE, {"sip": "192.168.1.5"})
        self.assertEqual((cfg.addr, cfg.udp_port), ("192.168.1.5", 5060))
        cfg = self.load(self.BASE, {"sip": "[::1]:5070"})
        self.assertEqual((cfg.addr, cfg.udp_port), ("::1", 5070))
        self.assertBad(self.BASE, "--sip", "not a port", {"sip": "nonsense:x"})
        self.assertBad(self.BASE, "--sip", "not a port", {"sip": "70000"})

    def test_handler_playbook_flag_keeps_rules(self):
        text = self.BASE + '[handler]\ntype = "playbook"\n[[handler.rules]]\ncallee = "x"\nplaybook = "x.md"\n'
        cfg = self.load(text, {"handler": "greeting.md"})
        self.assertEqual(cfg.handler.default, "greeting.md")
        self.assertEqual(len(cfg.handler.rules), 1)
        cfg = self.load(self.BASE, {"handler": "greeting.md"})
        self.assertEqual(cfg.handler, C.PlaybookHandler(default="greeting.md"))

    def test_bad_flags_name_the_flag(self):
        self.assertBad(self.BASE, "--http", "no port", {"http": "localhost"})
        self.assertBad(self.BASE, "--external-ip", "not an IP", {"external-ip": "example.com"})
        self.assertBad(self.BASE, "--codecs", "unknown codec", {"codecs": "pcmu,foo"})
        self.assertBad(self.BASE, "--handler", "neither", {"handler": "whatever"})
        self.assertBad(self.BASE, "--call", "not a SIP URI", {"call": "1001"})
        err = self.assertBad(self.BASE, "--sip", "x:y", {"sip": "x:y"})
        self.assertTrue(str(err).startswith("command line: "))

    def test_override_validated_against_file(self):
        # --codecs alone must still leave an audio codec
        self.assertBad(self.BASE, "--codecs", "audio codec", {"codecs": "dtmf"})


class ConfiguredPlaybooksTests(ConfigFileMixin, unittest.TestCase):
    """Every playbook the configuration names is checked at load time when a check is given
    (tap.py gives ``check_configured_playbook``); problems name the key and the file."""

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        self.elsewhere = os.path.abspath(self.mktemp())
        for d in (self.dir, self.elsewhere):
            os.makedirs(d)
        self.good = os.path.join(self.elsewhere, "sales.md")
        with open(self.good, "w") as f:
            f.write("---\nllm: {provider: echo}\n---\nSell.\n")
        with open(os.path.join(self.dir, "default.md"), "w") as f:
            f.write("---\nllm: {provider: echo}\n---\nHi.\n")

    def conf(self, default="default.md", rules=()):
        text = f'playbook_dir = "{self.dir}"\n[handler]\ntype = "playbook"\n'
        if default is not None:
            text += f'default = "{default}"\n'
        for callee, playbook in rules:
            text += f'[[handler.rules]]\ncallee = "{callee}"\nplaybook = "{playbook}"\n'
        return text

    def check(self, text, overrides=None):
        from activecall.playbook.start import check_configured_playbook

        return load_config(self.write(text), overrides, check_playbook=check_configured_playbook)

    def test_the_keys_that_name_playbooks(self):
        cfg = self.load(self.conf(rules=[("a", "a.md"), ("b", "/x/b.md")]))
        self.assertEqual(C.configured_playbooks(cfg), [
            ("handler.default", "default.md"), ("handler.rules[0].playbook", "a.md"),
            ("handler.rules[1].playbook", "/x/b.md")])
        self.assertEqual(C.configured_playbooks(cfg, handler_flag=True)[0], ("--handler", "default.md"))
        self.assertEqual(C.configured_playbooks(self.load('[handler]\ntype = "webhook"\nurl = "http://x"')), [])
        self.assertEqual(C.configured_playbooks(self.load("")), [])

    def test_absolute_and_relative_names_load(self):
        cfg, warnings = self.check(self.conf(default=self.good, rules=[("^sip:1@", "default.md"),
                                                                       ("^sip:2@", self.good)]))
        self.assertEqual(cfg.handler.default, self.good)  # kept as written
        self.assertEqual(warnings, [])
        cfg, _ = self.check(self.conf(), {"handler": self.good})
        self.assertEqual(cfg.handler.default, self.good)

    def test_the_samples_playbooks_pass(self):
        from activecall.playbook.start import check_configured_playbook

        cfg, _ = load_config(SAMPLE)
        named = C.configured_playbooks(cfg)
        self.assertEqual(named, [("handler.default", "default.md")])
        for _key, name in named:  # playbook_dir is relative to the repository (make run's directory)
            self.assertEqual(check_configured_playbook(os.path.join(ROOT, cfg.playbook_dir), name), [])

    def test_without_a_check_nothing_is_read(self):
        cfg, _ = load_config(self.write(self.conf(default="/nonexistent/x.md")))
        self.assertEqual(cfg.handler.default, "/nonexistent/x.md")

    def test_a_missing_playbook_names_the_key_and_the_file(self):
        path = self.write(self.conf(rules=[("a", "default.md"), ("b", "/etc/activecall-no/x.md")]))
        from activecall.playbook.start import check_configured_playbook

        with self.assertRaises(ConfigError) as cm:
            load_config(path, check_playbook=check_configured_playbook)
        self.assertEqual(str(cm.exception),
                         f"{path}: key 'handler.rules[1].playbook': /etc/activecall-no/x.md: no such file")
        with self.assertRaises(ConfigError) as cm:
            self.check(self.conf(default="gone.md"))
        self.assertEqual(cm.exception.key, "handler.default")
        self.assertIn(os.path.join(os.path.realpath(self.dir), "gone.md") + ": no such file", str(cm.exception))

    def test_an_invalid_playbook_names_the_key_the_file_and_the_line(self):
        bad = os.path.join(self.elsewhere, "bad.md")
        with open(bad, "w") as f:
            f.write("---\nllm: {provider: echo}\ndtmf:\n  '1': {action: goto, scene: nowhere}\n---\nx\n")
        with self.assertRaises(ConfigError) as cm:
            self.check(self.conf(default=bad))
        self.assertEqual(cm.exception.key, "handler.default")
        self.assertRegex(cm.exception.reason, f"^{re.escape(bad)}:4: .*nowhere")

    def test_the_handler_flag_is_named_as_the_flag(self):
        with self.assertRaises(ConfigError) as cm:
            self.check(self.conf(), {"handler": "/nonexistent/greeting.md"})
        self.assertEqual(str(cm.exception), "command line: key '--handler': /nonexistent/greeting.md: no such file")
        with self.assertRaises(ConfigError) as cm:
            self.check("", {"handler": "../greeting.md"})
        self.assertEqual(cm.exception.key, "--handler")
        self.assertIn("absolute path", cm.exception.reason)

    def test_playbook_warnings_become_configuration_warnings(self):
        noisy = os.path.join(self.elsewhere, "noisy.md")
        with open(noisy, "w") as f:
            f.write("---\nllm: {provider: echo}\nmadeUpKey: 1\n---\nx\n")
        _, warnings = self.check(self.conf(rules=[("a", noisy)]))
        [warning] = warnings
        self.assertTrue(warning.startswith("handler.rules[0].playbook: "), warning)
        self.assertIn("madeUpKey", warning)


class HelpersTests(unittest.TestCase):
    def test_parse_hostport(self):
        self.assertEqual(C.parse_hostport("1.2.3.4:5"), ("1.2.3.4", 5))
        self.assertEqual(C.parse_hostport("[::]:80"), ("::", 80))
        self.assertEqual(C.parse_hostport("pbx.example.com", 5060), ("pbx.example.com", 5060))
        self.assertRaises(ValueError, C.parse_hostport, "")
        self.assertRaises(ValueError, C.parse_hostport, "a:b")

    def test_error_message_shape(self):
        e = ConfigError("udp_port", "expected an integer", source="/etc/a.toml")
        self.assertEqual(str(e), "/etc/a.toml: key 'udp_port': expected an integer")
        self.assertTrue(re.match(r"^/etc/a\.toml: key", str(e)))
