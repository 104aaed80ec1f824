"""``--download-models``: fetch, resume, checksum, against a local HTTP server serving small files."""

from __future__ import annotations

import hashlib
import os

from twisted.internet import reactor, threads
from twisted.trial import unittest
from twisted.web import server, static

from activecall.speech import models
from activecall.tap import Options

PAYLOAD = bytes(range(256)) * 400  # 100 kB "model"
TOKENS = "<unk> 0\nhello 1\n".encode()


class DownloadTests(unittest.TestCase):
    timeout = 30

    def setUp(self):
        self.served = self.mktemp()
        os.makedirs(self.served)
        for name, data in (("model.int8.onnx", PAYLOAD), ("tokens.txt", TOKENS)):
            with open(os.path.join(self.served, name), "wb") as f:
                f.write(data)
        self.site = server.Site(static.File(self.served))
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"
        self.models_dir = self.mktemp()
        self.catalogue = {"sensevoice": models.ModelEntry(self.base, (
            models.ModelFile("model.int8.onnx", hashlib.sha256(PAYLOAD).hexdigest()),
            models.ModelFile("tokens.txt")))}
        self.lines = []

    def download(self, name="sensevoice", catalogue=None):
        return threads.deferToThread(models.download, name, self.models_dir,
                                     catalogue=catalogue or self.catalogue, log=self.lines.append)

    def test_fetch_verify_and_install(self):
        def check(results):
            d = os.path.join(self.models_dir, "sensevoice")
            self.assertEqual(models.installed_dir(self.models_dir, "sensevoice"), d)
            with open(os.path.join(d, "model.int8.onnx"), "rb") as f:
                self.assertEqual(f.read(), PAYLOAD)
            self.assertEqual([(os.path.basename(p), v) for p, _, v in results],
                             [("model.int8.onnx", True), ("tokens.txt", False)])
            with open(os.path.join(d, "tokens.txt.sha256")) as f:
                self.assertEqual(f.read().split()[0], hashlib.sha256(TOKENS).hexdigest())
            self.assertIn("not verified", self.lines[1])
            self.assertFalse([n for n in os.listdir(d) if n.endswith(".part")])
        return self.download().addCallback(check)

    def test_resume_continues_the_part_file(self):
        d = os.path.join(self.models_dir, "sensevoice")
        os.makedirs(d)
        with open(os.path.join(d, "model.int8.onnx.part"), "wb") as f:
            f.write(PAYLOAD[:30000])
        requests = []
        original = self.site.getResourceFor

        def spy(request):
            requests.append(request.getHeader("range"))
            return original(request)
        self.site.getResourceFor = spy

        def check(_):
            with open(os.path.join(d, "model.int8.onnx"), "rb") as f:
                self.assertEqual(f.read(), PAYLOAD)
            self.assertEqual(requests[0], "bytes=30000-")
        return self.download().addCallback(check)

    def test_checksum_mismatch_removes_the_file(self):
        bad = {"sensevoice": models.ModelEntry(self.base, (models.ModelFile("model.int8.onnx", "0" * 64),))}
        d = self.download(catalogue=bad)
        self.assertFailure(d, models.ModelError)

        def check(e):
            self.assertIn("checksum mismatch", str(e))
            self.assertFalse(os.listdir(os.path.join(self.models_dir, "sensevoice")))
        return d.addCallback(check)

    def test_unknown_and_missing(self):
        with self.assertRaises(models.ModelError) as e:
            models.download("supertonic", self.models_dir)
        self.assertIn("no supertonic provider", str(e.exception))
        with self.assertRaises(models.ModelError):
            models.download("whisper-large", self.models_dir)
        missing = {"sensevoice": models.ModelEntry(self.base, (models.ModelFile("nope.onnx"),))}
        d = self.download(catalogue=missing)
        return self.assertFailure(d, models.ModelError)

    def test_flags(self):
        o = Options()
        o.parseOptions(["--models-dir", "/srv/models", "--download-models", "sensevoice", "--exit-after-download"])
        self.assertEqual((o["models-dir"], o["download-models"], o["exit-after-download"]),
                         ("/srv/models", "sensevoice", 1))
        self.assertEqual(Options()["models-dir"], "./models")
