"""The console's HTTP side: ``/`` and ``/static/*`` served from the package without the
token, ``/api/recordings`` (list + files, Range, traversal refused) behind it."""

import json
import os

from twisted.internet import defer
from twisted.trial import unittest

from activecall.web import rest
from tests.test_rest import RestTestBase

TOKEN = "console-secret"


class RecordingRouteTests(RestTestBase):
    token = TOKEN
    auth = {b"authorization": [b"Bearer " + TOKEN.encode()]}

    def setUp(self):
        super().setUp()
        rest.install_console(self.root)
        with open(os.path.join(self.recorders, "s.1.wav"), "wb") as f:
            f.write(b"RIFF" + bytes(range(60)))
        with open(os.path.join(os.path.dirname(self.recorders), "outside.wav"), "wb") as f:
            f.write(b"secret")
        os.makedirs(os.path.join(self.recorders, "sub"))

    @defer.inlineCallbacks
    def test_list_and_fetch_need_the_token(self):
        for path in (b"/api/recordings", b"/api/recordings/s.1.wav"):
            code, _, _ = yield self.fetch(b"GET", path)
            self.assertEqual(code, 401, path)
        listed = yield self.get_json(b"/api/recordings", headers=self.auth)
        self.assertEqual([(e["name"], e["size"]) for e in listed], [("s.1.wav", 64)])
        code, ctype, body = yield self.fetch(b"GET", b"/api/recordings/s.1.wav?token=" + TOKEN.encode())
        self.assertEqual((code, ctype, body[:4]), (200, "audio/x-wav", b"RIFF"))

    @defer.inlineCallbacks
    def test_range_requests_for_the_player(self):
        code, _, body = yield self.fetch(b"GET", b"/api/recordings/s.1.wav",
                                         headers={**self.auth, b"range": [b"bytes=4-7"]})
        self.assertEqual((code, body), (206, bytes(range(4))))

    @defer.inlineCallbacks
    def test_traversal_and_directories_refused(self):
        for path in (b"/api/recordings/..%2Foutside.wav", b"/api/recordings/../outside.wav",
                     b"/api/recordings/sub/x.wav", b"/api/recordings/%2E%2E", b"/api/recordings/a%5C..%5Cb"):
            code, _, body = yield self.fetch(b"GET", path, headers=self.auth)
            self.assertIn(code, (400, 404), path)
            self.assertNotIn(b"secret", body)
        code, _, _ = yield self.fetch(b"GET", b"/api/recordings/missing.wav", headers=self.auth)
        self.assertEqual(code, 404)
        code, _, _ = yield self.fetch(b"GET", b"/api/recordings/sub", headers=self.auth)
        self.assertEqual(code, 404)

    @defer.inlineCallbacks
    def test_console_served_without_the_token_and_without_listings(self):
        code, ctype, body = yield self.fetch(b"GET", b"/")
        self.assertEqual((code, ctype.split(";")[0]), (200, "text/html"))
        self.assertIn(b"/static/console.js", body)
        for name, kind in ((b"console.js", "javascript"), (b"console.css", "text/css")):
            code, ctype, body = yield self.fetch(b"GET", b"/static/" + name)
            self.assertEqual(code, 200, name)
            self.assertIn(kind, ctype)
        code, _, _ = yield self.fetch(b"GET", b"/static/")
        self.assertEqual(code, 404)
        code, _, _ = yield self.fetch(b"GET", b"/static/../api/recordings")
        self.assertNotEqual(code, 200)


class PackageDataTests(unittest.TestCase):
    def test_console_files_are_in_the_package_and_the_token_is_sent_both_ways(self):
        directory = rest.console_directory()
        for name in ("index.html", "console.js", "console.css"):
            self.assertTrue(os.path.isfile(os.path.join(directory, name)), name)
        with open(os.path.join(directory, "console.js"), encoding="utf-8") as f:
            script = f.read()
        self.assertIn('"Bearer " + token()', script)
        self.assertIn("&token=", script)
        self.assertIn(json.dumps("activecall.token"), script)
