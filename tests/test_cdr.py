"""CDR records and writers: the JSON shape field by field, atomic local files,
multipart upload to a real local twisted.web server with retries."""

from __future__ import annotations

import email.parser
import email.policy
import json
import os
from datetime import datetime, timedelta, timezone

from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web import resource, server

from activecall import atomicfile
from activecall.call import cdr
from activecall.config import CallRecord as CallRecordSection
from activecall.protocol.commands import CallOption
from tests.helpers import free_port

START = datetime(2025, 3, 4, 5, 6, 7, 123000, tzinfo=timezone.utc)


def sync_run(f, *args):
    return defer.maybeDeferred(f, *args)


def make_record(**kw) -> cdr.CallDetailRecord:
    values = dict(
        callType="sip",
        option=CallOption.from_dict({"asr": {"provider": "tencent", "secretKey": "SECRET-ASR"},
                                     "tts": {"apiKey": "sk-SECRET"}, "sip": {"password": "SECRET-PW"},
                                     "futureKey": 1}),
        callId="abc-123",
        startTime=START,
        ringTime=START + timedelta(seconds=1),
        answerTime=START + timedelta(seconds=2),
        endTime=START + timedelta(seconds=62),
        caller="sip:alice@example.com",
        callee="sip:bot@example.com",
        statusCode=200,
        hangupReason="caller",
        extras={"X-Tenant-ID": "t1", "X-Api-Key": "SECRET-HDR", "session_id": "abc-123"},
    )
    values.update(kw)
    return cdr.CallDetailRecord(**values)


class RecordShapeTests(unittest.TestCase):
    def test_fields_camel_case_and_rfc3339(self):
        d = make_record().to_dict()
        self.assertEqual(d["callType"], "sip")
        self.assertEqual(d["callId"], "abc-123")
        self.assertEqual(d["startTime"], "2025-03-04T05:06:07.123000+00:00")
        self.assertEqual(d["ringTime"], "2025-03-04T05:06:08.123000+00:00")
        self.assertEqual(d["answerTime"], "2025-03-04T05:06:09.123000+00:00")
        self.assertEqual(d["endTime"], "2025-03-04T05:07:09.123000+00:00")
        self.assertEqual(d["caller"], "sip:alice@example.com")
        self.assertEqual(d["callee"], "sip:bot@example.com")
        self.assertEqual(d["statusCode"], 200)
        self.assertEqual(d["hangupReason"], "caller")
        self.assertEqual(d["option"]["futureKey"], 1)
        self.assertEqual(d["option"]["asr"]["provider"], "tencent")

    def test_null_and_empty_fields_are_left_out(self):
        d = make_record(ringTime=None, answerTime=None, extras=None, option=None).to_dict()
        for key in ("ringTime", "answerTime", "extras", "option", "hangupMessages", "recorder",
                    "dumpEventFile", "referCallrecord"):
            self.assertNotIn(key, d)
        self.assertNotIn("null", json.dumps(d))

    def test_recorder_and_refer_leg(self):
        leg = make_record(callType="b2bua", callId="ref-1-abc-123", extras=None)
        d = make_record(recorder=(cdr.RecorderFile(trackId="abc-123", path="/r/abc-123.wav", size=44),),
                        dumpEventFile="/r/abc-123.events.jsonl", hangupMessages=("BYE from caller",),
                        referCallrecord=leg).to_dict()
        self.assertEqual(d["recorder"], [{"trackId": "abc-123", "path": "/r/abc-123.wav", "size": 44}])
        self.assertEqual(d["dumpEventFile"], "/r/abc-123.events.jsonl")
        self.assertEqual(d["hangupMessages"], ["BYE from caller"])
        self.assertEqual(d["referCallrecord"]["callType"], "b2bua")
        self.assertNotIn("recorder", d["referCallrecord"])
        self.assertNotIn("SECRET", json.dumps(d))

    def test_secrets_never_appear(self):
        text = make_record().to_bytes().decode()
        self.assertNotIn("SECRET", text)
        d = json.loads(text)
        self.assertEqual(d["option"]["tts"]["apiKey"], "***")
        self.assertEqual(d["option"]["sip"]["password"], "***")
        self.assertEqual(d["extras"]["X-Api-Key"], "***")
        self.assertEqual(d["extras"]["X-Tenant-ID"], "t1")
        # a plain dict option is redacted just the same
        self.assertNotIn("SECRET", make_record(option={"secretKey": "SECRET"}).to_bytes().decode())


class LocalWriterTests(unittest.TestCase):
    def setUp(self):
        self.root = os.path.abspath(self.mktemp())

    @defer.inlineCallbacks
    def test_writes_dated_path_atomically(self):
        writer = cdr.LocalCdrWriter(self.root, tz=timezone.utc)  # default runner: a thread
        path = yield writer.write(make_record())
        self.assertEqual(path, os.path.join(self.root, "20250304", "20250304-050607_abc-123.json"))
        with open(path) as f:
            self.assertEqual(json.load(f), make_record().to_dict())
        self.assertEqual(os.listdir(os.path.dirname(path)), ["20250304-050607_abc-123.json"])

    def test_file_name_uses_the_zone_and_a_safe_call_id(self):
        east = timezone(timedelta(hours=8))
        writer = cdr.LocalCdrWriter("", tz=east)
        self.assertEqual(writer.path_for(make_record(callId="a-b@c.d")), "20250304-130607_a-b@c.d.json")
        name = writer.path_for(make_record(callId="../a/b@c;x"))
        self.assertRegex(name, r"^20250304-130607__a_b@c_x~[0-9a-f]{16}\.json$")
        self.assertNotIn("/", writer.path_for(make_record(callId="../../etc/passwd")))
        self.assertNotEqual(name, writer.path_for(make_record(callId="../a/b@c_x")))

    @defer.inlineCallbacks
    def test_hostile_call_ids_still_get_their_cdr(self):
        """RFC 4475 §3.1.1.11's long Call-ID (it used to fail with ENAMETOOLONG), path tricks,
        unicode, odd bytes, and a lone surrogate from an API client's JSON in the option."""
        from tests.test_filenames import HOSTILE

        writer = cdr.LocalCdrWriter(self.root, tz=timezone.utc, run=sync_run)
        paths = []
        for call_id in HOSTILE:
            record = make_record(callId=call_id, option={"note": "odd \udc80 text"})
            path = yield writer.write(record)
            paths.append(path)
            self.assertEqual(os.path.dirname(path), os.path.join(self.root, "20250304"))
            with open(path, encoding="utf-8") as f:
                written = json.load(f)
            self.assertEqual(written["callId"], call_id)  # the whole value, in the record
            self.assertEqual(written["option"]["note"], "odd \udc80 text")
        self.assertEqual(len(set(paths)), len(HOSTILE))

    def test_a_failed_write_leaves_the_old_file_and_no_temp(self):
        path = os.path.join(self.root, "x.json")
        atomicfile.write_atomically(path, b"old")
        real_fsync = os.fsync

        def broken(fd):
            raise OSError("disk full")

        os.fsync = broken
        try:
            self.assertRaises(OSError, atomicfile.write_atomically, path, b"new")
        finally:
            os.fsync = real_fsync
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"old")
        self.assertEqual(os.listdir(self.root), ["x.json"])

    def test_a_batch_is_written_whole_before_its_first_fsync(self):
        """One journal commit for the batch: every temp file holds its data when the first fsync runs,
        and no final name exists until every file is durable."""
        os.makedirs(self.root)
        items = [(os.path.join(self.root, f"{n}.json"), n.encode() * 10) for n in "abc"]
        seen = []
        real_fsync = os.fsync

        def watching(fd):
            if not seen:
                for name in os.listdir(self.root):
                    with open(os.path.join(self.root, name), "rb") as f:
                        seen.append((name, f.read()))
            return real_fsync(fd)

        os.fsync = watching
        try:
            self.assertEqual(atomicfile.write_batch(items), [None, None, None])
        finally:
            os.fsync = real_fsync
        self.assertEqual(len(seen), 3)
        self.assertTrue(all(name.endswith(".tmp") for name, _ in seen), seen)
        self.assertEqual(sorted(data for _, data in seen), [b"a" * 10, b"b" * 10, b"c" * 10])
        self.assertEqual(sorted(os.listdir(self.root)), ["a.json", "b.json", "c.json"])

    def test_a_large_batch_is_written_in_slices_of_bounded_open_files(self):
        os.makedirs(self.root)
        self.patch(atomicfile, "BATCH_FILES", 2)
        items = [(os.path.join(self.root, f"{n}.json"), n.encode()) for n in "abcde"]
        open_temps = []
        real_fsync = os.fsync

        def watching(fd):
            open_temps.append(len([n for n in os.listdir(self.root) if n.endswith(".tmp")]))
            return real_fsync(fd)

        self.patch(os, "fsync", watching)
        self.assertEqual(atomicfile.write_batch(items), [None] * 5)
        self.assertLessEqual(max(open_temps), 2)
        self.assertEqual(sorted(os.listdir(self.root)), [f"{n}.json" for n in "abcde"])

    def test_records_written_during_a_write_go_in_the_next_batch(self):
        runs = []

        def held(f, *args):
            d = defer.Deferred()
            runs.append((f, args, d))
            return d

        writer = cdr.LocalCdrWriter(self.root, tz=timezone.utc, run=held)
        first = writer.write(make_record(callId="a"))
        later = [writer.write(make_record(callId=c)) for c in ("b", "c")]
        flushed = writer.flush()
        self.assertEqual(len(runs), 1)  # b and c wait for a's batch
        f, args, d = runs[0]
        d.callback(f(*args))
        self.assertTrue(self.successResultOf(first).endswith("_a.json"))
        self.assertEqual(len(runs), 2)
        f, args, d = runs[1]
        self.assertEqual([os.path.basename(p) for p, _ in args[0]],
                         ["20250304-050607_b.json", "20250304-050607_c.json"])
        self.assertNoResult(flushed)
        d.callback(f(*args))
        self.assertEqual([os.path.basename(self.successResultOf(d)) for d in later],
                         ["20250304-050607_b.json", "20250304-050607_c.json"])
        self.successResultOf(flushed)
        self.assertEqual(sorted(os.listdir(os.path.join(self.root, "20250304"))),
                         ["20250304-050607_a.json", "20250304-050607_b.json", "20250304-050607_c.json"])

    def test_with_a_clock_batches_start_at_most_every_gather_seconds(self):
        """An idle writer writes at once; a record within ``gather`` of the last batch's start waits for the
        rest of it and goes with whatever else came meanwhile (one worker-thread job for them all)."""
        from twisted.internet import task

        clock = task.Clock()
        clock.advance(1000)
        runs = []

        def counted(f, *args):
            runs.append([os.path.basename(p) for p, _ in args[0]])
            return defer.succeed(f(*args))

        writer = cdr.LocalCdrWriter(self.root, tz=timezone.utc, run=counted, clock=clock, gather=0.05)
        self.assertTrue(self.successResultOf(writer.write(make_record(callId="a"))).endswith("_a.json"))
        self.assertEqual(runs, [["20250304-050607_a.json"]])  # at once
        clock.advance(0.02)
        later = [writer.write(make_record(callId=c)) for c in ("b", "c")]
        flushed = writer.flush()
        for d in later + [flushed]:
            self.assertNoResult(d)
        self.assertEqual(len(runs), 1)
        clock.advance(0.029)
        self.assertEqual(len(runs), 1)
        clock.advance(0.002)  # 50 ms after a's batch started
        self.assertEqual(runs[1], ["20250304-050607_b.json", "20250304-050607_c.json"])
        self.assertEqual([os.path.basename(self.successResultOf(d)) for d in later],
                         ["20250304-050607_b.json", "20250304-050607_c.json"])
        self.successResultOf(flushed)
        clock.advance(1)
        self.successResultOf(writer.write(make_record(callId="d")))  # idle again: at once
        self.assertEqual(len(runs), 3)

    def test_the_daemons_local_writer_gathers(self):
        from twisted.internet import task

        clock = task.Clock()
        writer = cdr.writer_for(CallRecordSection(type="local", root=self.root), clock)
        self.assertEqual((writer.clock, writer.gather), (clock, cdr.LOCAL_GATHER))
        self.assertEqual(cdr.writer_for(CallRecordSection(type="local", root=self.root)).gather, 0.0)

    def test_one_failed_file_in_a_batch_fails_only_its_own_write(self):
        os.makedirs(self.root)
        with open(os.path.join(self.root, "20250304"), "w"):
            pass  # a file where the day directory should be: that record cannot be written
        writer = cdr.LocalCdrWriter(self.root, tz=timezone.utc, run=sync_run)
        other = cdr.LocalCdrWriter(os.path.join(self.root, "ok"), tz=timezone.utc, run=sync_run)
        results = atomicfile.write_batch([(writer.path_for(make_record()), b"x"),
                                   (other.path_for(make_record()), b"y")])
        self.assertIsInstance(results[0], OSError)
        self.assertIsNone(results[1])
        self.failureResultOf(writer.write(make_record()), OSError)
        with open(other.path_for(make_record()), "rb") as f:
            self.assertEqual(f.read(), b"y")

    def test_writer_for_config(self):
        self.assertIsNone(cdr.writer_for(None))
        local = cdr.writer_for(CallRecordSection(type="local", root=self.root))
        self.assertIsInstance(local, cdr.LocalCdrWriter)
        http = cdr.writer_for(CallRecordSection(type="http", root=self.root, url="http://127.0.0.1:9/x",
                                                with_media=True, keep_media_copy=False), reactor)
        self.assertIsInstance(http, cdr.UploadingCdrWriter)
        self.assertIsInstance(http.store, cdr.HttpStore)
        self.assertEqual(http.local_copy.root, self.root)
        self.assertEqual(http.spool.directory, "./config/cdr-spool")
        self.assertFalse(http.keep_media_copy)
        self.assertTrue(http.store.with_media)


class UploadSink(resource.Resource):
    """A CDR receiver: records each request, answers with the next status in ``codes``."""

    isLeaf = True

    def __init__(self, codes=(200,)):
        super().__init__()
        self.codes = list(codes)
        self.requests = []

    def render_POST(self, request):
        content_type = request.getHeader("content-type")
        raw = request.content.read()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
        parts = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            parts[name] = (part.get_filename(), part.get_content_type(), part.get_payload(decode=True))
        self.requests.append({"headers": {k.decode().lower(): v[0].decode()
                                          for k, v in request.requestHeaders.getAllRawHeaders()},
                              "content_type": content_type, "parts": parts})
        request.setResponseCode(self.codes.pop(0) if len(self.codes) > 1 else self.codes[0])
        return b"ok"


class HttpWriterTests(unittest.TestCase):
    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        self.media = os.path.join(self.root, "abc-123.wav")
        with open(self.media, "wb") as f:
            f.write(b"RIFF" + bytes(range(256)) * 4)
        self.dump = os.path.join(self.root, "abc-123.events.jsonl")
        with open(self.dump, "wb") as f:
            f.write(b'{"type":"event"}\n')

    def serve(self, sink) -> str:
        port = reactor.listenTCP(0, server.Site(sink), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}/cdr"

    def writer(self, url, **kw):
        kw.setdefault("backoff", (0.01, 0.02))
        return cdr.HttpCdrWriter(url, local_copy=cdr.LocalCdrWriter(os.path.join(self.root, "cdr"), tz=timezone.utc,
                                                                    run=sync_run),
                                 spool=cdr.RecordSpool(os.path.join(self.root, "spool"), run=sync_run),
                                 reactor=reactor, **kw)

    def record(self):
        return make_record(recorder=(cdr.RecorderFile(trackId="abc-123", path=self.media, size=1028),),
                           dumpEventFile=self.dump)

    @property
    def spool_path(self):
        return os.path.join(self.root, "cdr", "20250304", "20250304-050607_abc-123.json")

    @defer.inlineCallbacks
    def test_multipart_with_media_and_headers(self):
        sink = UploadSink()
        writer = self.writer(self.serve(sink), headers=(("X-Auth-Test", "yes"),), with_media=True)
        ok = yield writer.write(self.record())
        self.assertIs(ok, True)
        self.assertEqual(len(sink.requests), 1)
        req = sink.requests[0]
        self.assertTrue(req["content_type"].startswith("multipart/form-data; boundary="))
        self.assertEqual(req["headers"]["x-auth-test"], "yes")
        parts = req["parts"]
        self.assertEqual(set(parts), {"calllog.json", "media_abc-123", "dump_events_abc-123.events.jsonl"})
        filename, _, body = parts["calllog.json"]
        self.assertIsNone(filename)  # a text field, as the original sends it
        self.assertEqual(json.loads(body), self.record().to_dict())
        self.assertNotIn(b"SECRET", body)
        filename, ctype, body = parts["media_abc-123"]
        self.assertEqual((filename, ctype), ("abc-123.wav", "application/octet-stream"))
        with open(self.media, "rb") as f:
            self.assertEqual(body, f.read())
        self.assertEqual(parts["dump_events_abc-123.events.jsonl"][2], b'{"type":"event"}\n')
        # keep_media_copy defaults to true: everything stays
        for path in (self.media, self.dump, self.spool_path):
            self.assertTrue(os.path.exists(path), path)

    @defer.inlineCallbacks
    def test_without_media_only_the_calllog_is_sent(self):
        sink = UploadSink()
        ok = yield self.writer(self.serve(sink)).write(self.record())
        self.assertIs(ok, True)
        self.assertEqual(set(sink.requests[0]["parts"]), {"calllog.json"})

    @defer.inlineCallbacks
    def test_keep_media_copy_false_removes_local_copies_after_success(self):
        sink = UploadSink()
        ok = yield self.writer(self.serve(sink), with_media=True, keep_media_copy=False).write(self.record())
        self.assertIs(ok, True)
        for path in (self.media, self.dump, self.spool_path):
            self.assertFalse(os.path.exists(path), path)

    @defer.inlineCallbacks
    def test_retries_with_backoff_until_success(self):
        sink = UploadSink(codes=(500, 503, 200))
        ok = yield self.writer(self.serve(sink), keep_media_copy=False, with_media=True).write(self.record())
        self.assertIs(ok, True)
        self.assertEqual(len(sink.requests), 3)
        self.assertFalse(os.path.exists(self.spool_path))

    @defer.inlineCallbacks
    def test_every_attempt_failing_keeps_the_spool_and_media(self):
        sink = UploadSink(codes=(500,))
        ok = yield self.writer(self.serve(sink), keep_media_copy=False, with_media=True).write(self.record())
        self.assertIs(ok, False)
        self.assertEqual(len(sink.requests), 3)
        for path in (self.media, self.dump, self.spool_path):
            self.assertTrue(os.path.exists(path), path)
        with open(self.spool_path) as f:
            self.assertEqual(json.load(f)["callId"], "abc-123")
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_unreachable_server_fails_and_flush_waits(self):
        writer = self.writer(f"http://127.0.0.1:{free_port()}/cdr", keep_media_copy=False)
        d = writer.write(self.record())
        self.assertEqual(len(writer._in_flight), 1)
        yield writer.flush()
        self.assertTrue(d.called)
        ok = yield d
        self.assertIs(ok, False)
        self.assertEqual(writer._in_flight, set())
        self.assertTrue(os.path.exists(self.spool_path))
