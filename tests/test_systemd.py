"""The systemd unit is valid (systemd-analyze verify) and hardened."""

import os
import shutil

from twisted.internet import defer, utils
from twisted.trial import unittest

from tests.helpers import ROOT, TWISTD

UNIT = os.path.join(ROOT, "systemd", "activecall.service")


class SystemdUnitTests(unittest.TestCase):
    def read(self):
        with open(UNIT) as f:
            return f.read()

    def test_unit_runs_twistd_unprivileged_and_hardened(self):
        unit = self.read()
        self.assertRegex(unit, r"(?m)^ExecStart=\S+/twistd --nodaemon --pidfile= --reactor=asyncio activecall "
                               r"--conf /etc/activecall/activecall\.toml$")
        for line in ("User=activecall", "Restart=on-failure", "NoNewPrivileges=yes",
                     "ProtectSystem=strict", "ReadWritePaths=/var/lib/activecall"):
            self.assertIn(line, unit)

    def test_stop_timeout_fits_a_drain_and_the_shutdown_after_it(self):
        """SIGTERM drains for up to graceful_shutdown_timeout, then the shutdown takes up to as long
        again (docs/scale-out.md): systemd must not SIGKILL before both are done."""
        import re

        from activecall.config import load_config

        timeout = float(re.search(r"(?m)^TimeoutStopSec=(\d+)$", self.read()).group(1))
        self.assertIn("KillSignal=SIGTERM", self.read())
        self.assertGreater(timeout, 2 * load_config(None, None)[0].graceful_shutdown_timeout)

    @defer.inlineCallbacks
    def test_systemd_analyze_verify(self):
        tool = shutil.which("systemd-analyze")
        if tool is None:
            raise unittest.SkipTest("systemd-analyze is not installed")
        # verify checks that ExecStart exists: point it at this checkout's twistd
        path = os.path.join(os.path.abspath(self.mktemp()), "activecall.service")
        os.makedirs(os.path.dirname(path))
        with open(path, "w") as f:
            f.write(self.read().replace("/opt/activecall/.venv/bin/twistd", TWISTD))
        out, err, code = yield utils.getProcessOutputAndValue(tool, ["verify", path], env=os.environ)
        self.assertEqual(code, 0, err.decode())
        self.assertEqual(err.decode().strip(), "", "systemd-analyze printed warnings")
