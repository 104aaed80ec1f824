"""A short, fixed-seed run of bench/fuzz_sip.py (issue 18): the parser in-process and the real
daemon over UDP on 127.0.0.1 (in a loopback-only network namespace where ``unshare -n`` works).

One harness run (about 10 s of fuzzing) serves every test here; each test asserts on one kind of bad
outcome (a known bug was once marked ``todo`` on exactly the test it tripped).  The assertions are on counts of
bad outcomes, never on speed: a slow machine sends the same datagrams (same seed, same order), only
later.
"""

import json
import os
import re
import sys

from twisted.internet import defer
from twisted.trial import unittest

from tests.helpers import ROOT, spawn

HARNESS = os.path.join(ROOT, "bench", "fuzz_sip.py")
SEED = 18
ARGS = ["--mode", "both", "--engine", "seeded", "--seed", str(SEED),
        "--inputs", "6000",  # in-process: a count, not a time, so every machine runs the same inputs
        "--datagrams", "1500", "--rate", "300", "--probe-every", "50",
        "--probe-timeout", "30", "--settle", "3"]

_result = {}  # the one harness run's reports, shared by the tests below


@defer.inlineCallbacks
def fuzz_reports(testcase):
    """{"inprocess": report, "udp": report} of the shared run (started by the first test that asks)."""
    if not _result:
        out = os.path.abspath(testcase.mktemp() + ".json")
        repro = os.path.abspath(testcase.mktemp())
        run = spawn([sys.executable, HARNESS] + ARGS + ["--json", out, "--repro-dir", repro],
                    env={"PYTHONPATH": os.path.join(ROOT, "src")})
        code = yield run.ended
        if not os.path.exists(out):
            raise AssertionError(f"fuzz_sip.py wrote no report (exit {code}):\n{run.output[-5000:]}")
        with open(out) as f:
            for report in json.load(f):
                _result[report["mode"]] = report
        _result["exit_code"] = code
        _result["output"] = run.output
    return _result


def findings(report, *kinds):
    return [f for f in report["findings"] if f["what"].split(":")[0] in kinds]


def bad_records(report, where=None, exclude=()):
    """The distinct bad log records whose escape point ("where") matches ``where`` and none of ``exclude``."""
    out = []
    for r in report["distinct_bad_records"]:
        if where is not None and not re.search(where, r["where"]):
            continue
        if any(re.search(x, r["where"]) for x in exclude):
            continue
        out.append(r)
    return out


KNOWN_RTP = r"activecall/media/rtp_leg\.py:\d+, in _send(_rtcp)?$"  # the RTP/RTCP send path
KNOWN_CDR = r"activecall/atomicfile\.py:\d+, in write_batch$"  # a long Call-ID in the CDR file name


class InProcessFuzzTests(unittest.TestCase):
    timeout = 300

    @defer.inlineCallbacks
    def test_ran_the_inputs(self):
        r = (yield fuzz_reports(self))["inprocess"]
        self.assertEqual(r["inputs"], 6000)
        self.assertGreater(r["outcomes"].get("sip: parsed", 0), 0)
        self.assertGreater(r["outcomes"].get("sdp: negotiated", 0), 0)

    @defer.inlineCallbacks
    def test_no_unexpected_exception(self):
        """Only SIPParseError from the SIP parser, SDPParseError/NegotiationError from the SDP code."""
        r = (yield fuzz_reports(self))["inprocess"]
        self.assertEqual(findings(r, "sip-exception", "stream-exception", "sdp-exception"), [])

    @defer.inlineCallbacks
    def test_no_internal_error_behind_sipparseerror(self):
        """parse_message's catch-all must not be what stops a malformed message."""
        r = (yield fuzz_reports(self))["inprocess"]
        self.assertEqual(findings(r, "sip-internal"), [])

    @defer.inlineCallbacks
    def test_accepted_messages_round_trip(self):
        """What is accepted re-serialises to something accepted, and a response echoes the Call-ID bytes."""
        r = (yield fuzz_reports(self))["inprocess"]
        self.assertEqual(findings(r, "sip-roundtrip", "sdp-roundtrip", "sip-echo"), [])


class UdpFuzzTests(unittest.TestCase):
    timeout = 300

    @defer.inlineCallbacks
    def test_every_probe_answered(self):
        r = (yield fuzz_reports(self))["udp"]
        self.assertGreater(r["datagrams"], 0)
        self.assertGreaterEqual(r["probes_sent"], 2)
        self.assertEqual(r["probes_unanswered"], 0)
        self.assertEqual(r["probes_answered"], r["probes_sent"])

    @defer.inlineCallbacks
    def test_daemon_alive_and_stops_cleanly(self):
        r = (yield fuzz_reports(self))["udp"]
        self.assertTrue(r["daemon_alive"])
        self.assertEqual(r["daemon_exit_code_on_sigterm"], 0)

    @defer.inlineCallbacks
    def test_no_traceback_from_the_rtp_send_path(self):
        r = (yield fuzz_reports(self))["udp"]
        self.assertEqual(bad_records(r, where=KNOWN_RTP), [])

    @defer.inlineCallbacks
    def test_cdr_written_without_errors(self):
        r = (yield fuzz_reports(self))["udp"]
        self.assertEqual(bad_records(r, where=KNOWN_CDR), [])
        self.assertEqual(r["cdr_errors"], 0)

    @defer.inlineCallbacks
    def test_no_other_traceback_or_error(self):
        r = (yield fuzz_reports(self))["udp"]
        self.assertEqual(bad_records(r, exclude=(KNOWN_RTP, KNOWN_CDR)), [])
        self.assertLessEqual(r["distinct_bad_total"], 20)  # the report lists 20 at most

    @defer.inlineCallbacks
    def test_malformed_datagrams_do_not_log_a_line_each(self):
        r = (yield fuzz_reports(self))["udp"]
        self.assertLessEqual(r["malformed_info_lines"], max(20, r["datagrams"] // 100))

