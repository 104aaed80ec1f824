"""Call records uploaded to a store (``[callrecord] type = "http"`` / ``"s3"``): the durable spool,
the retry schedule on an injected clock, the SigV4 signer, and real uploads to a local S3 server
(moto in server mode, started here) — including a store that is down and a writer restarted over
the same spool."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from datetime import datetime, timezone

from twisted.internet import defer, reactor, task, threads
from twisted.logger import globalLogPublisher, formatEvent
from twisted.trial import unittest

from activecall import s3
from activecall.call import cdr
from activecall.config import CallRecord as CallRecordSection
from tests.helpers import free_port, spawn
from tests.test_cdr import START, make_record, sync_run

ACCESS = "AKIDTESTACCESS"
SECRET = "wJalrXUtnFEMI-TEST-SECRET-never-logged"


class FakeStore:
    """A store whose uploads fail ``failures`` times, then succeed; records when each attempt ran."""

    def __init__(self, clock, failures=0, with_files=()):
        self.clock = clock
        self.failures = failures
        self.attempts = []
        self.uploaded = []
        self.files = list(with_files)

    def upload(self, item):
        self.attempts.append(self.clock.seconds())
        if self.failures:
            self.failures -= 1
            return defer.fail(cdr.UploadError("store down"))
        self.uploaded.append(json.loads(item.body)["callId"])
        return defer.succeed(None)

    def uploaded_files(self, fields):
        return self.files


def spooled(directory):
    return sorted(n for n in os.listdir(directory) if n.endswith(".json")) if os.path.isdir(directory) else []


class SpoolAndRetryTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.dir = os.path.abspath(self.mktemp())

    def writer(self, store, **kw):
        kw.setdefault("backoff", (1.0, 2.0, 4.0))
        return cdr.UploadingCdrWriter(store, cdr.RecordSpool(self.dir, run=sync_run), clock=self.clock, **kw)

    def test_retry_schedule_then_the_spool_keeps_it_until_a_rescan_succeeds(self):
        store = FakeStore(self.clock, failures=5)
        writer = self.writer(store, rescan_interval=60.0)
        writer.resume()
        results = []
        writer.write(make_record()).addCallback(results.append)
        self.assertEqual(store.attempts, [0.0])
        self.clock.advance(1.0)
        self.clock.advance(2.0)
        self.clock.advance(4.0)
        self.assertEqual(store.attempts, [0.0, 1.0, 3.0, 7.0])  # the backoff waits, on the injected clock
        self.assertEqual(results, [False])
        self.assertEqual(len(spooled(self.dir)), 1)  # every attempt failed: the record stays
        self.clock.advance(60.0 - 7.0)  # a re-scan: one attempt per spooled record (1 failure left)
        self.assertEqual(store.attempts[4:], [60.0])
        self.clock.advance(59.0)
        self.assertEqual(store.attempts[4:], [60.0])  # the re-scan interval is the backoff now
        self.clock.advance(1.0)
        self.assertEqual(store.attempts[4:], [60.0, 120.0])
        self.assertEqual(store.uploaded, ["abc-123"])
        self.assertEqual(spooled(self.dir), [])
        writer.stop()

    def test_the_record_is_durable_in_the_spool_before_the_first_attempt(self):
        seen = []

        class Watching(FakeStore):
            def upload(inner, item):
                with open(item.path, "rb") as f:
                    seen.append(f.read())
                return super().upload(item)

        store = Watching(self.clock)
        record = make_record()
        writer = self.writer(store)
        ok = self.successResultOf(writer.write(record))
        self.assertIs(ok, True)
        self.assertEqual(seen, [record.to_bytes()])
        self.assertEqual(spooled(self.dir), [])

    def test_a_new_writer_over_the_same_spool_uploads_what_was_left(self):
        down = FakeStore(self.clock, failures=100)
        first = self.writer(down, backoff=())
        for i in range(3):
            self.assertIs(self.successResultOf(first.write(make_record(callId=f"call-{i}"))), False)
        first.stop()
        self.assertEqual(len(spooled(self.dir)), 3)
        # a restart: a new writer over the same directory
        up = FakeStore(self.clock)
        second = self.writer(up)
        self.assertEqual(self.successResultOf(second.resume()), 3)
        self.successResultOf(second.flush())
        self.assertEqual(sorted(up.uploaded), ["call-0", "call-1", "call-2"])
        self.assertEqual(spooled(self.dir), [])
        second.stop()

    def test_stopping_gives_one_attempt_and_keeps_the_rest_spooled(self):
        store = FakeStore(self.clock, failures=100)
        writer = self.writer(store)
        d = writer.write(make_record())
        self.assertEqual(store.attempts, [0.0])
        writer.stop()  # shutdown: the wait before the second attempt ends now
        self.assertIs(self.successResultOf(d), False)
        self.assertIs(self.successResultOf(writer.write(make_record(callId="later"))), False)
        self.assertEqual(len(store.attempts), 2)
        self.assertEqual(len(spooled(self.dir)), 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_keep_media_copy_false_removes_the_uploaded_files(self):
        media = os.path.join(os.path.abspath(self.mktemp()))
        with open(media, "wb") as f:
            f.write(b"RIFF")
        store = FakeStore(self.clock, with_files=[media])
        self.assertIs(self.successResultOf(self.writer(store, keep_media_copy=False).write(make_record())), True)
        self.assertFalse(os.path.exists(media))

    def test_an_unreadable_spool_file_is_left_alone(self):
        os.makedirs(self.dir)
        with open(os.path.join(self.dir, "20250101-000000_bad_00000000.json"), "wb") as f:
            f.write(b"{not json")
        store = FakeStore(self.clock)
        writer = self.writer(store)
        self.assertEqual(self.successResultOf(writer.resume()), 0)
        self.assertEqual(len(spooled(self.dir)), 1)
        writer.stop()
        self.flushLoggedErrors()


class SignerTests(unittest.TestCase):
    def test_aws_published_example(self):
        # "Signature Calculations for the Authorization Header", example GET Object
        headers = s3.sign("GET", "https://examplebucket.s3.amazonaws.com/test.txt", {"Range": "bytes=0-9"},
                          s3.EMPTY_SHA256, "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                          "us-east-1", datetime(2013, 5, 24, tzinfo=timezone.utc))
        self.assertEqual(
            headers["Authorization"],
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,"
            "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,"
            "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41")

    def test_same_signature_as_botocore_for_a_put_with_odd_key_characters(self):
        try:
            from botocore.auth import S3SigV4Auth
            from botocore.awsrequest import AWSRequest
            from botocore.credentials import Credentials
        except ImportError:
            raise unittest.SkipTest("botocore (installed with moto, requirements-test.txt) is missing")
        import hashlib

        body = b"{\"callId\": \"x\"}\n"
        url = "http://127.0.0.1:9000/records/cdr/20250304/20250304-050607_a%20b%2Bc~%C3%A9.json"
        digest = hashlib.sha256(body).hexdigest()
        request = AWSRequest(method="PUT", url=url, data=body,
                             headers={"Content-Type": "application/json", "x-amz-content-sha256": digest})
        S3SigV4Auth(Credentials(ACCESS, SECRET), "s3", "eu-west-1").add_auth(request)
        theirs = request.headers["Authorization"]
        # sign at the time botocore took from its own clock
        when = datetime.strptime(request.headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
        ours = s3.sign("PUT", url, {"Content-Type": "application/json"}, digest, ACCESS, SECRET, "eu-west-1", when)
        ours_sig = ours["Authorization"].rsplit("Signature=", 1)[1]
        theirs_sig = theirs.rsplit("Signature=", 1)[1]
        self.assertEqual(ours_sig, theirs_sig, (ours["Authorization"], theirs))

    def test_the_secret_is_nowhere_in_the_headers_or_repr(self):
        headers = s3.sign("PUT", "http://h/b/k", {}, s3.EMPTY_SHA256, ACCESS, SECRET, "us-east-1",
                          datetime(2025, 1, 1, tzinfo=timezone.utc))
        self.assertNotIn(SECRET, json.dumps(headers))
        client = s3.S3Client("b", ACCESS, SECRET, endpoint="http://h", reactor=task.Clock(), http_client=object())
        self.assertNotIn(SECRET, repr(client))
        self.assertNotIn(ACCESS, repr(client))


class S3KeyTests(unittest.TestCase):
    def test_keys_stay_under_the_prefix_whatever_the_call_id(self):
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        wav = os.path.join(root, "rec.wav")
        open(wav, "wb").close()
        store = cdr.S3Store(client=None, root="/../calls/./2025/", with_media=True, tz=timezone.utc)
        fields = make_record(callId="../../etc/passwd", recorder=(cdr.RecorderFile(trackId="../x", path=wav),)).to_dict()
        record_key, media = store.keys(fields)
        self.assertTrue(record_key.startswith("calls/2025/20250304/20250304-050607_"), record_key)
        for key in [record_key] + [k for k, _ in media]:
            self.assertNotIn("..", key.split("/"))
            self.assertTrue(key.startswith("calls/2025/20250304/"), key)
        self.assertEqual(len(media), 1)

    def test_vendor_endpoints(self):
        section = CallRecordSection(type="s3", vendor="aws", bucket="bkt", region="eu-west-1", access_key=ACCESS,
                                    secret_key=SECRET)
        writer = cdr.S3CdrWriter(section, reactor=task.Clock(), http_client=object())
        self.assertEqual(writer.store.client.url_for("a/b c.json"), "https://bkt.s3.eu-west-1.amazonaws.com/a/b%20c.json")
        section = CallRecordSection(type="s3", vendor="minio", bucket="bkt", access_key=ACCESS, secret_key=SECRET,
                                    endpoint="http://127.0.0.1:9000/")
        writer = cdr.S3CdrWriter(section, reactor=task.Clock(), http_client=object())
        self.assertEqual(writer.store.client.url_for("a.json"), "http://127.0.0.1:9000/bkt/a.json")
        self.assertEqual(writer.store.client.region, "us-east-1")
        # keep_media_copy unset: removed after an s3 upload (the original's default), kept after an http one
        self.assertFalse(writer.keep_media_copy)
        self.assertTrue(cdr.writer_for(CallRecordSection(type="http", url="http://127.0.0.1:9/x"),
                                       task.Clock()).keep_media_copy)
        self.assertTrue(cdr.S3CdrWriter(dataclasses.replace(section, keep_media_copy=True), reactor=task.Clock(),
                                        http_client=object()).keep_media_copy)


class SpoolDirTests(unittest.TestCase):
    def test_a_spool_dir_that_cannot_be_made_stops_start_up_naming_the_key(self):
        import dataclasses

        from activecall.config import load_config
        from activecall.service import build_cdr_writer

        blocker = os.path.abspath(self.mktemp())
        open(blocker, "w").close()
        cfg, _ = load_config(None)
        section = CallRecordSection(type="s3", vendor="minio", bucket="b", access_key=ACCESS, secret_key=SECRET,
                                    endpoint="http://127.0.0.1:9", spool_dir=os.path.join(blocker, "spool"))
        with self.assertRaises(SystemExit) as cm:
            build_cdr_writer(dataclasses.replace(cfg, callrecord=section), task.Clock())
        self.assertIn("callrecord.spool_dir", str(cm.exception))
        self.assertNotIn(SECRET, str(cm.exception))
        good = os.path.abspath(self.mktemp())
        writer = build_cdr_writer(dataclasses.replace(cfg, callrecord=dataclasses.replace(section, spool_dir=good)),
                                  task.Clock())
        self.assertTrue(os.path.isdir(good))
        self.assertEqual(writer.spool.directory, good)


# -- a real S3 server -------------------------------------------------------------------------------


@defer.inlineCallbacks
def start_moto(testcase, port: int):
    """moto's S3 in server mode on loopback ``port``; fires once it listens."""
    server = spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)])
    testcase.addCleanup(server.kill)
    yield server.wait_for(r"Running on", timeout=60)
    return server


def boto(port: int):
    import boto3

    return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id=ACCESS,
                        aws_secret_access_key=SECRET, region_name="us-east-1")


def objects(port: int, bucket: str) -> dict:
    """key -> content of every object in the bucket (boto3, an independent client)."""
    client = boto(port)
    listing = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listing}


class MotoS3Tests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        try:
            import boto3  # noqa: F401
            import moto.server  # noqa: F401
        except ImportError:
            raise unittest.SkipTest("moto[server] is not installed (requirements-test.txt)")
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        self.spool_dir = os.path.join(self.root, "spool")
        self.logged = []
        observer = lambda event: self.logged.append(formatEvent(event) or "")  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def recording(self, call_id):
        wav = os.path.join(self.root, f"{call_id}.wav")
        with open(wav, "wb") as f:
            f.write(b"RIFF" + os.urandom(70000))  # larger than one read: streamed and hashed in pieces
        events = os.path.join(self.root, f"{call_id}.events.jsonl")
        with open(events, "wb") as f:
            f.write(b'{"type":"event","content":"{}"}\n')
        return make_record(callId=call_id, recorder=(cdr.RecorderFile(trackId=call_id, path=wav, size=70004),),
                           dumpEventFile=events)

    def writer(self, port, **kw):
        section = CallRecordSection(type="s3", vendor="minio", bucket="records", region="us-east-1",
                                    access_key=ACCESS, secret_key=SECRET, endpoint=f"http://127.0.0.1:{port}",
                                    root="cdr", with_media=True, keep_media_copy=False)
        kw.setdefault("backoff", (0.05, 0.1))
        return cdr.S3CdrWriter(section, reactor=reactor, spool=cdr.RecordSpool(self.spool_dir), tz=timezone.utc, **kw)

    @defer.inlineCallbacks
    def test_records_and_media_land_with_their_keys(self):
        port = free_port()
        yield start_moto(self, port)
        yield threads.deferToThread(lambda: boto(port).create_bucket(Bucket="records"))
        record = self.recording("call-1")
        with open(record.recorder[0].path, "rb") as f:
            wav = f.read()
        writer = self.writer(port)
        ok = yield writer.write(record)
        self.assertIs(ok, True)
        stored = yield threads.deferToThread(objects, port, "records")
        self.assertEqual(set(stored), {"cdr/20250304/20250304-050607_call-1.json",
                                       "cdr/20250304/call-1_call-1_call-1.wav",
                                       "cdr/20250304/call-1.jsonl"})
        self.assertEqual(json.loads(stored["cdr/20250304/20250304-050607_call-1.json"]), record.to_dict())
        self.assertEqual(stored["cdr/20250304/call-1_call-1_call-1.wav"], wav)
        self.assertEqual(stored["cdr/20250304/call-1.jsonl"], b'{"type":"event","content":"{}"}\n')
        self.assertNotIn(b"SECRET", stored["cdr/20250304/20250304-050607_call-1.json"])
        # keep_media_copy = false: the local files and the spool entry are gone
        self.assertFalse(os.path.exists(record.recorder[0].path))
        self.assertFalse(os.path.exists(record.dumpEventFile))
        self.assertEqual(spooled(self.spool_dir), [])
        self.assertFalse(any(SECRET in line for line in self.logged))

    @defer.inlineCallbacks
    def test_store_down_then_a_restarted_writer_uploads_the_spool(self):
        port = free_port()
        first = self.writer(port)  # nothing listens there yet: the store is down
        results = yield defer.gatherResults([first.write(self.recording(f"call-{i}")) for i in range(3)])
        self.assertEqual(results, [False, False, False])
        first.stop()
        self.assertEqual(len(spooled(self.spool_dir)), 3)
        for i in range(3):  # the recordings stay until they are uploaded
            self.assertTrue(os.path.exists(os.path.join(self.root, f"call-{i}.wav")))
        # the store comes back; a new writer (a restarted daemon) over the same spool
        yield start_moto(self, port)
        yield threads.deferToThread(lambda: boto(port).create_bucket(Bucket="records"))
        second = self.writer(port)
        started = yield second.resume()
        self.assertEqual(started, 3)
        yield second.flush()
        second.stop()
        stored = yield threads.deferToThread(objects, port, "records")
        self.assertEqual(sorted(k for k in stored if k.endswith(".json")),
                         [f"cdr/20250304/20250304-050607_call-{i}.json" for i in range(3)])
        self.assertEqual(len(stored), 9)  # each record, its recording and its event journal
        self.assertEqual(spooled(self.spool_dir), [])
        self.assertFalse(any(SECRET in line for line in self.logged))
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_a_wrong_bucket_is_an_error_that_keeps_the_record(self):
        port = free_port()
        yield start_moto(self, port)
        writer = self.writer(port, backoff=())
        ok = yield writer.write(self.recording("call-x"))  # no bucket "records" on this server
        self.assertIs(ok, False)
        self.assertEqual(len(spooled(self.spool_dir)), 1)
        self.assertTrue(any("NoSuchBucket" in line for line in self.logged), self.logged[-5:])
        self.assertFalse(any(SECRET in line for line in self.logged))
        writer.stop()
        self.flushLoggedErrors()



class DaemonS3Tests(unittest.TestCase):
    """The daemon end to end: a call's record spooled while the store is down, kept across a
    SIGTERM, uploaded by the restarted daemon; then a call with the store up lands at once."""

    timeout = 180

    def setUp(self):
        try:
            import boto3  # noqa: F401
            import moto.server  # noqa: F401
        except ImportError:
            raise unittest.SkipTest("moto[server] is not installed (requirements-test.txt)")

    @defer.inlineCallbacks
    def call(self, http_port, call_id):
        from tests.wsclient import connect, send_json

        proto, f = yield connect(self, http_port, "/call", f"id={call_id}")
        send_json(proto, {"command": "invite", "option": {"codec": "pcm"}})
        yield f.wait_event("answer")
        proto.sendMessage(b"\x01\x00" * 320, isBinary=True)
        send_json(proto, {"command": "hangup"})
        yield f.wait_event("hangup")

    @defer.inlineCallbacks
    def wait_objects(self, port, count):
        for _ in range(200):
            try:
                stored = yield threads.deferToThread(objects, port, "records")
            except Exception:
                stored = {}
            if len(stored) >= count:
                return stored
            yield task.deferLater(reactor, 0.1, lambda: None)
        raise AssertionError(f"fewer than {count} objects in the bucket: {sorted(stored)}")

    @defer.inlineCallbacks
    def test_spooled_across_a_restart_then_uploaded(self):
        from tests.helpers import spawn_daemon, write_config

        root = os.path.abspath(self.mktemp())
        s3_port, http_port = free_port(), free_port()
        spool_dir = os.path.join(root, "spool")
        conf = write_config(self, f'''
addr = "127.0.0.1"
udp_port = {free_port()}
tcp_port = 0
http_addr = "127.0.0.1:{http_port}"
media_cache_path = "{root}/cache"
graceful_shutdown_timeout = "5s"
[recording]
path = "{root}/rec"
[callrecord]
type = "s3"
vendor = "minio"
bucket = "records"
access_key = "{ACCESS}"
secret_key = "{SECRET}"
endpoint = "http://127.0.0.1:{s3_port}"
root = "cdr"
spool_dir = "{spool_dir}"
''')
        daemon = spawn_daemon(self, conf)
        yield daemon.wait_for("activecall ready")
        yield self.call(http_port, "down-1")  # the store is down
        for _ in range(100):
            if spooled(spool_dir):
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        daemon.signal("TERM")
        code = yield daemon.ended
        self.assertEqual(code, 0)
        self.assertEqual(len(spooled(spool_dir)), 1)
        with open(os.path.join(spool_dir, spooled(spool_dir)[0])) as f:
            self.assertEqual(json.load(f)["callId"], "down-1")

        yield start_moto(self, s3_port)
        yield threads.deferToThread(lambda: boto(s3_port).create_bucket(Bucket="records"))
        again = spawn_daemon(self, conf)
        yield again.wait_for("activecall ready")
        stored = yield self.wait_objects(s3_port, 1)
        [key] = stored
        self.assertRegex(key, r"^cdr/\d{8}/\d{8}-\d{6}_down-1\.json$")
        self.assertEqual(json.loads(stored[key])["callId"], "down-1")
        yield again.wait_for("CDR of down-1 uploaded")
        self.assertEqual(spooled(spool_dir), [])

        yield self.call(http_port, "up-1")  # the store is up: the record lands at once
        stored = yield self.wait_objects(s3_port, 2)
        self.assertEqual(sorted(json.loads(v)["callId"] for v in stored.values()), ["down-1", "up-1"])
        again.signal("TERM")
        yield again.ended
        self.assertNotIn(SECRET, daemon.output + again.output)
