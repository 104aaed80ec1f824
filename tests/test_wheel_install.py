"""Packaging as operators install it: the wheel, installed (not editable) into a fresh venv, runs the
systemd unit's own ``ExecStart`` line and takes a call.

``pip wheel --no-deps`` builds the wheel from a copy of this checkout (without ``build/``, ``.venv``,
compiled extensions or egg-info, so nothing left over from an earlier build can reach it, as on a fresh
clone); the wheel must hold every file under ``src/`` (but the C source, which is compiled into it), and
nothing else: no ``twisted/__init__.py``, no tests.

Then ``python -m venv`` and ``pip install <wheel>`` into it; its dependencies come from the package index
through pip's own cache and configuration, as for an operator.  The venv's ``twistd --help`` lists
``activecall``; the daemon starts from the unit's ``ExecStart`` (``/opt/activecall/.venv`` and
``/etc/activecall/activecall.toml`` replaced by the venv and a temporary configuration), in a working
directory of its own and with a systemd-like environment (no ``PYTHONPATH``: nothing comes from this
checkout), answers ``/health``, and takes a sipp call through a playbook with the silero VAD (its model is
the wheel's package data; neither torch nor the silero-vad package is installed), pocketsphinx and flite:
the caller's sentence is detected (``speaking``), transcribed, sent to a fake OpenAI-compatible LLM whose
reply ends with ``<hangup/>``, the reply is spoken and the daemon sends BYE (sipp completes).  SIGTERM
then stops it with exit 0, and the call's CDR is on disk.

Time (2 cores, dependencies from a local package cache): about 45 s for the module.  The venv and the
install of the wheel's dependencies take about 20 s of it (``python -m venv`` 4 s, ``pip install`` 15 s;
more where pip must download them: about 420 MB installed, no torch), the wheel 3 s (it compiles the C
extension), the call about 15 s (flite greeting, the caller's sentence, the reply).
"""

import glob
import importlib.machinery
import json
import os
import re
import shlex
import shutil
import sys
import zipfile

import numpy as np
import treq
from twisted.internet import defer, reactor, utils
from twisted.trial import unittest
from twisted.web import server

from activecall.audio import resample
from activecall.speech.testing import synthesize_pcm
from tests.helpers import ROOT, OutputWatcher, free_port, free_ports
from tests.test_playbook_sip_e2e import FakeOpenAI, listen
from tests.test_sip_calls import write_ulaw_wav
from tests.test_sip_integration import SCENARIOS, sipp, sipp_result, udp_port, when

UNIT = os.path.join(ROOT, "systemd", "activecall.service")
UNIT_VENV = "/opt/activecall/.venv"
UNIT_CONF = "/etc/activecall/activecall.toml"
EXTENSION = "activecall/media/_rtpcore" + importlib.machinery.EXTENSION_SUFFIXES[0]

GREETING = "Hello, this is the packaging line."
SENTENCE = "I would like to check the status of my order"
REPLY = "Thank you for calling. Goodbye!"

PLAYBOOK = """---
llm:
  provider: openai
  baseUrl: {llm}
  apiKey: sk-wheel
  model: wheel-model
  language: en
greeting: "{greeting}"
vad: {{type: silero}}
asr: {{provider: pocketsphinx}}
tts: {{provider: flite}}
interruption: {{strategy: none}}
---
You are the packaging line.
"""

#: what a fresh clone would not have (build products, environments, test output)
IGNORED = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "_trial_temp*", "*.egg-info",
                                 "__pycache__", "*.pyc", "*.so", "test-artifacts", "node_modules",
                                 "config", "var", "dropin.cache")

_cache: dict = {}


def systemd_like_env() -> dict:
    """The environment systemd gives a service: a PATH and a locale, nothing from this test run."""
    return {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "LANG": "C.UTF-8"}


@defer.inlineCallbacks
def run(argv, what, env=None, path=None):
    """Run a program to completion; fail naming ``what`` with its output unless it exits 0."""
    out, err, code = yield utils.getProcessOutputAndValue(argv[0], argv[1:], env=env or dict(os.environ),
                                                          path=path)
    if code != 0:
        raise AssertionError(f"{what} failed (exit {code}): {' '.join(argv)}\n"
                             f"{out.decode(errors='replace')[-3000:]}\n{err.decode(errors='replace')[-3000:]}")
    return out.decode(errors="replace")


@defer.inlineCallbacks
def build_wheel(testcase):
    """The wheel, built once per test process from a clean copy of the checkout: (its path, the files
    under the copy's src/ before the build, relative to src/)."""
    if "wheel" not in _cache:
        work = os.path.abspath(testcase.mktemp())
        source = os.path.join(work, "activecall")
        shutil.copytree(ROOT, source, ignore=IGNORED)
        src = os.path.join(source, "src")
        files = {os.path.relpath(os.path.join(dirpath, name), src).replace(os.sep, "/")
                 for dirpath, _, names in os.walk(src) for name in names}
        out = os.path.join(work, "wheel")
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        yield run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, source],
                  "pip wheel", env=env, path=work)
        wheels = glob.glob(os.path.join(out, "activecall-*.whl"))
        if len(wheels) != 1:
            raise AssertionError(f"pip wheel made {os.listdir(out)}, not one activecall wheel")
        _cache["wheel"] = (wheels[0], files)
    return _cache["wheel"]


def exec_start(venv: str, conf: str) -> list:
    """The unit's ExecStart, with its venv and configuration paths replaced."""
    with open(UNIT) as f:
        lines = [line for line in f.read().splitlines() if line.startswith("ExecStart=")]
    if len(lines) != 1:
        raise AssertionError(f"{UNIT} has {len(lines)} ExecStart= lines, not one")
    line = lines[0][len("ExecStart="):]
    for path in (UNIT_VENV, UNIT_CONF):
        if path not in line:
            raise AssertionError(f"{UNIT}: ExecStart no longer names {path}; update this test: {line}")
    return shlex.split(line.replace(UNIT_VENV, venv).replace(UNIT_CONF, conf))


class WheelContentsTests(unittest.TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def test_wheel_holds_every_source_file_and_nothing_else(self):
        wheel, files = yield build_wheel(self)
        with zipfile.ZipFile(wheel) as z:
            names = set(z.namelist())
            metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        shipped = {n for n in names if ".dist-info/" not in n}
        expected = {EXTENSION} | {f for f in files if not f.endswith(".c")}
        self.assertEqual(sorted(shipped - expected), [], "in the wheel but not in src/")
        self.assertEqual(sorted(expected - shipped), [], "in src/ but missing from the wheel")
        # the packages found, the plugin, the data
        for name in ("activecall/speech/asr/pocketsphinx.py", "activecall/speech/tts/flite.py",
                     "activecall/speech/vad/silero.py", "activecall/speech/vad/data/silero_vad.onnx",
                     "activecall/speech/vad/data/LICENSE.silero-vad", "activecall/static/index.html",
                     "twisted/plugins/activecall_plugin.py"):
            self.assertIn(name, shipped)
        self.assertNotIn("twisted/__init__.py", shipped)
        self.assertNotIn("twisted/plugins/__init__.py", shipped)
        self.assertFalse([n for n in shipped if n.startswith("tests/")])
        requires = re.findall(r"(?m)^Requires-Dist: ([A-Za-z0-9_.-]+)", metadata)
        self.assertIn("onnxruntime", requires)
        self.assertNotIn("torch", requires)
        self.assertNotIn("silero-vad", requires)


class FreshVenvTests(unittest.TestCase):
    """What an operator does: python3 -m venv /opt/activecall/.venv && .venv/bin/pip install ., then systemd."""

    timeout = 300

    @defer.inlineCallbacks
    def test_installed_wheel_runs_the_units_exec_start_and_takes_a_call(self):
        wheel, _ = yield build_wheel(self)
        root = os.path.abspath(self.mktemp())
        state = os.path.join(root, "var-lib-activecall")  # the unit's WorkingDirectory
        os.makedirs(os.path.join(state, "playbooks"))
        venv = os.path.join(root, "venv")
        self.addCleanup(shutil.rmtree, venv, ignore_errors=True)  # 420 MB; runs after the daemon is gone
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        yield run([sys.executable, "-m", "venv", venv], "python -m venv", env=env, path=root)
        yield run([os.path.join(venv, "bin", "python"), "-m", "pip", "install", "-q", wheel],
                  "pip install of the wheel into a fresh venv", env=env, path=root)

        # the venv's own activecall and plugin, no torch, no silero-vad
        probe = yield run([os.path.join(venv, "bin", "python"), "-c", """if 1:
            import importlib.util, json, activecall, twisted.plugins.activecall_plugin as plugin
            from activecall.speech.vad.silero import model_path
            print(json.dumps({"activecall": activecall.__file__, "plugin": plugin.__file__, "model": model_path(),
                              "torch": importlib.util.find_spec("torch") is not None,
                              "silero_vad": importlib.util.find_spec("silero_vad") is not None}))
            """], "importing activecall from the venv", env=systemd_like_env(), path=state)
        found = json.loads(probe.strip().splitlines()[-1])
        for key in ("activecall", "plugin", "model"):
            self.assertTrue(found[key].startswith(venv + os.sep), f"{key} from {found[key]}, not the venv")
        self.assertFalse(found["torch"], "torch was installed")
        self.assertFalse(found["silero_vad"], "the silero-vad package was installed")

        help_text = yield run([os.path.join(venv, "bin", "twistd"), "--help"], "twistd --help",
                              env=systemd_like_env(), path=state)
        self.assertRegex(help_text, r"\n\s+activecall\s+AI voice-agent")

        # a fake LLM, and the playbook that uses it with silero, pocketsphinx and flite
        llm = FakeOpenAI(REPLY + " <hangup/>", "summary")
        llm_port = yield listen(server.Site(llm))
        self.addCleanup(llm_port.stopListening)
        with open(os.path.join(state, "playbooks", "wheel.md"), "w") as f:
            f.write(PLAYBOOK.format(llm=f"http://127.0.0.1:{llm_port.getHost().port}/v1", greeting=GREETING))
        sip_port, http_port = free_ports(2)
        base = free_port() // 2 * 2
        conf = os.path.join(root, "activecall.toml")
        with open(conf, "w") as f:
            f.write(f'''
addr = "127.0.0.1"
udp_port = {sip_port}
tcp_port = 0
http_addr = "127.0.0.1:{http_port}"
rtp_start_port = {base}
rtp_end_port = {base + 20}
media_cache_path = "{state}/cache"
playbook_dir = "{state}/playbooks"
[handler]
type = "playbook"
default = "wheel.md"
[callrecord]
type = "local"
root = "{state}/cdr"
''')

        # the caller is quiet while the greeting plays, then says its sentence
        greeting = yield synthesize_pcm(GREETING)
        speech = yield synthesize_pcm(SENTENCE)
        pcm8k = resample(np.concatenate([np.zeros(greeting.size + 12000, np.int16), speech,
                                         np.zeros(24000, np.int16)]), 16000, 8000)
        wav = os.path.join(root, "speech.wav")
        write_ulaw_wav(wav, pcm8k)
        scenario = os.path.join(root, "uac_media_wait_bye.xml")
        with open(os.path.join(SCENARIOS, "uac_media_wait_bye.xml")) as f:
            text = f.read()
        with open(scenario, "w") as f:
            f.write(text.replace("{SPEECH_WAV}", wav).replace("{SPEECH_MS}", str(int(pcm8k.size / 8)))
                    .replace("{BYE_TIMEOUT_MS}", "30000"))

        argv = exec_start(venv, conf)
        self.assertEqual(argv[0], os.path.join(venv, "bin", "twistd"))
        daemon = OutputWatcher()
        reactor.spawnProcess(daemon, argv[0], argv, env=systemd_like_env(), path=state)
        self.addCleanup(daemon.kill)
        yield daemon.wait_for("activecall ready", timeout=60)
        resp = yield treq.get(f"http://127.0.0.1:{http_port}/health", persistent=False)
        self.assertEqual(resp.code, 200)
        health = yield resp.json()
        self.assertEqual((health["status"], health["active_calls"]), ("ok", 0))

        uac = sipp(self, f"127.0.0.1:{sip_port}", "-p", str(udp_port()), "-mp", str(udp_port() // 2 * 2),
                   "-timeout", "60s", scenario=scenario)
        body = yield when(llm.first, 60, "the LLM request with the caller's words\n" + daemon.output[-3000:])
        heard = body["messages"][-1]
        self.assertEqual(heard["role"], "user")
        self.assertTrue(heard["content"].strip(), body["messages"])
        # the reply is spoken, then the daemon's BYE completes sipp's scenario
        yield sipp_result(uac, timeout=60)

        daemon.signal("TERM")
        code = yield daemon.ended
        self.assertEqual(code, 0, daemon.output[-3000:])
        self.assertIn("activecall stopped", daemon.output)
        cdrs = glob.glob(os.path.join(state, "cdr", "*", "*.json"))
        self.assertEqual(len(cdrs), 1, daemon.output[-3000:])
        with open(cdrs[0]) as f:
            cdr = json.load(f)
        self.assertEqual(cdr["callType"], "sip")
        self.assertEqual(cdr["hangupReason"], "autohangup")
        with open(os.path.join(state, cdr["dumpEventFile"])) as f:  # relative to the WorkingDirectory
            events = [json.loads(json.loads(line)["content"]) for line in f]
        names = [e.get("event") for e in events]
        self.assertNotIn("error", names, [e for e in events if e.get("event") == "error"])
        self.assertIn("speaking", names)  # the silero VAD heard the caller
        final = next(e for e in events if e.get("event") == "asrFinal")
        self.assertEqual(final["text"], heard["content"])
