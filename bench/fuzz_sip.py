#!/usr/bin/env python3
"""Fuzz the SIP stack (issue 18, part 5): mutated SIP/SDP against the parser in-process, and
against the running daemon over UDP on 127.0.0.1.

Corpus: valid messages generated here (INVITE with SDP, OPTIONS, REGISTER, BYE, CANCEL, ACK,
INFO, REFER, PRACK, UPDATE, SUBSCRIBE, compact forms, folded headers, responses with and without
SDP, bare SDP bodies) plus RFC 4475 torture messages from ``tests/data/rfc4475/*.dat`` when that
directory exists (``--torture-dir`` to read another one).

Mutator (seeded, ``random.Random(seed)``): byte flips, random bytes, insertions, deletions,
duplicated ranges, truncation, header duplication/removal/swap, splicing two messages, long
values, numeric edge values in Content-Length / CSeq / Max-Forwards / Expires / RSeq /
Session-Expires / Via and Contact ports, line-end damage (bare LF, bare CR, NUL, folding), non
UTF-8 bytes, and SDP mutations (m= ports > 65535, bad c= addresses, bad payload types, bad rtpmap /
ptime / rtcp / crypto lines).  The same seed gives the same inputs and, in-process, the same
outcome.  ``--engine atheris`` (the default when ``atheris`` is importable) runs the in-process
mode under libFuzzer's coverage guidance with this mutator as its custom mutator.

Modes:

* ``inprocess``: ``activecall.sip.message.parse_message`` and the typed accessors, serialising
  and re-parsing what was accepted, ``make_response``, stream framing (``message_length``), and
  for SDP bodies ``sdp.parse`` + negotiation (answerer and offerer) + ``build_answer`` +
  ``sdp_offer.sdp_direction``/``with_direction``.  An exception other than the documented ones
  (``SIPParseError``; ``SDPParseError``/``NegotiationError``) is a failure; so is an internal
  exception that ``parse_message`` caught and re-raised as "unparsable message (...)" (a parser
  bug its safety net hid).  The first reproducers of each distinct failure go to ``--repro-dir``.
  Accepted-but-invalid results (a negotiated RTP port outside 0..65535) are reported apart.
* ``udp``: starts the daemon (``twistd -n activecall``, a temp config with free ports, a playbook
  route to an echo playbook so INVITEs are answered, local CDRs), sends mutated datagrams at a
  bounded rate, an OPTIONS probe every ``--probe-every`` datagrams (each probe must be answered;
  it is retransmitted like a UA's request), ACK+BYE for every INVITE the daemon answers, and
  reports datagrams sent, probes sent/answered, daemon alive, log size/lines, tracebacks and
  critical/error lines (count and first distinct), CDR files written vs CDR errors, RSS before and
  after.  Runs inside a new network namespace (``unshare -n``, loopback only) when it can, so
  nothing a mutated Via/Contact/c= line points at can leave the machine.  When a traceback or
  error appears in the log, the datagrams sent just before it are saved under ``--repro-dir``.
* ``replay``: sends each file of ``--replay`` (files or directories) alone to a fresh daemon and
  says which ones make it log an error or a traceback (triage of the udp mode's reproducers).

Exit status: 0 clean, 1 a failure (an unexpected exception, a traceback/critical/error line,
an unanswered probe, a dead daemon), 2 a usage or start-up problem.  ``--json FILE`` writes
the figures as JSON too.

    PYTHONPATH=src .venv/bin/python bench/fuzz_sip.py --mode both --datagrams 100000 --seed 1
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, OrderedDict, deque

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if os.path.join(ROOT, "src") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "src"))

BIN = os.path.dirname(sys.executable)
LOCAL = "127.0.0.1"
TORTURE_DIR = os.path.join(ROOT, "tests", "data", "rfc4475")
CODECS = ("pcmu", "pcma", "g722", "opus", "telephone_event")

# -- the corpus -------------------------------------------------------------------------------

# Placeholders, filled per datagram so every message is a new transaction and call:
# {CALLID} {BRANCH} {TAG} {TAG2} {SEQ} {HOST} (the daemon) {PORT} (its SIP port) {VPORT} (ours)


def sdp_body(rtp_port: int = 4000, addr: str = LOCAL, extra: str = "", proto: str = "RTP/AVP",
             formats: str = "0 8 101") -> str:
    return ("v=0\r\n"
            f"o=fuzz 1234 1234 IN IP4 {addr}\r\n"
            "s=-\r\n"
            f"c=IN IP4 {addr}\r\n"
            "t=0 0\r\n"
            f"m=audio {rtp_port} {proto} {formats}\r\n"
            "a=rtpmap:0 PCMU/8000\r\n"
            "a=rtpmap:8 PCMA/8000\r\n"
            "a=rtpmap:101 telephone-event/8000\r\n"
            "a=fmtp:101 0-16\r\n"
            "a=ptime:20\r\n"
            f"{extra}"
            "a=sendrecv\r\n")


SDP_VARIANTS = [
    sdp_body(),
    sdp_body(extra="a=rtcp-mux\r\na=mid:0\r\n"),
    sdp_body(extra="a=rtcp:4001 IN IP4 127.0.0.1\r\n", formats="8 0 9 18 101"),
    sdp_body(proto="RTP/SAVP",
             extra="a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz|2^20|1:4\r\n"),
    sdp_body(formats="111 0 101",
             extra="a=rtpmap:111 opus/48000/2\r\na=fmtp:111 minptime=10;useinbandfec=1\r\n")
    + "m=video 5000 RTP/AVP 96\r\na=rtpmap:96 VP8/90000\r\n",
    sdp_body(extra="a=sendonly\r\n").replace("c=IN IP4 127.0.0.1", "c=IN IP4 0.0.0.0"),
]


def _request(method: str, uri: str, extra: str = "", body: str = "", ctype: str = "application/sdp",
             cseq_method: str | None = None) -> str:
    head = (f"{method} {uri} SIP/2.0\r\n"
            "Via: SIP/2.0/UDP {HOST}:{VPORT};branch=z9hG4bK{BRANCH};rport\r\n"
            "Max-Forwards: 70\r\n"
            "From: \"Fuzz\" <sip:fuzz@{HOST}:{VPORT}>;tag={TAG}\r\n"
            "To: <sip:agent@{HOST}:{PORT}>" + (";tag={TAG2}" if method in ("BYE", "INFO", "REFER", "UPDATE",
                                                                            "PRACK") else "") + "\r\n"
            "Call-ID: {CALLID}\r\n"
            f"CSeq: {{SEQ}} {cseq_method or method}\r\n"
            "Contact: <sip:fuzz@{HOST}:{VPORT}>\r\n"
            "User-Agent: fuzz_sip\r\n"
            f"{extra}")
    if body:
        head += f"Content-Type: {ctype}\r\n"
    return head + f"Content-Length: {len(body.encode())}\r\n\r\n{body}"


def _response(status: str, method: str, extra: str = "", body: str = "") -> str:
    head = (f"SIP/2.0 {status}\r\n"
            "Via: SIP/2.0/UDP {HOST}:{PORT};branch=z9hG4bK{BRANCH};received=127.0.0.1\r\n"
            "From: <sip:agent@{HOST}:{PORT}>;tag={TAG2}\r\n"
            "To: \"Fuzz\" <sip:fuzz@{HOST}:{VPORT}>;tag={TAG}\r\n"
            "Call-ID: {CALLID}\r\n"
            f"CSeq: {{SEQ}} {method}\r\n"
            "Contact: <sip:fuzz@{HOST}:{VPORT}>\r\n"
            f"{extra}")
    if body:
        head += "Content-Type: application/sdp\r\n"
    return head + f"Content-Length: {len(body.encode())}\r\n\r\n{body}"


def seed_templates() -> list[tuple[str, str]]:
    """(name, template) of the generated valid corpus."""
    uri = "sip:agent@{HOST}:{PORT}"
    out = []
    for i, body in enumerate(SDP_VARIANTS):
        out.append((f"invite-sdp{i}", _request("INVITE", uri, "Allow: INVITE, ACK, BYE, CANCEL, OPTIONS\r\n"
                                                              "Supported: timer, 100rel\r\nSession-Expires: 1800\r\n",
                                               body)))
    out += [
        ("invite-nosdp", _request("INVITE", uri)),
        ("invite-compact", "INVITE " + uri + " SIP/2.0\r\n"
         "v: SIP/2.0/UDP {HOST}:{VPORT};branch=z9hG4bK{BRANCH};rport\r\n"
         "f: <sip:fuzz@{HOST}>;tag={TAG}\r\nt: <sip:agent@{HOST}>\r\ni: {CALLID}\r\n"
         "CSeq: {SEQ} INVITE\r\nm: <sip:fuzz@{HOST}:{VPORT}>\r\nMax-Forwards: 70\r\nc: application/sdp\r\n"
         f"l: {len(SDP_VARIANTS[0])}\r\n\r\n{SDP_VARIANTS[0]}"),
        ("invite-folded", _request("INVITE", uri, "Subject: a subject\r\n  folded over\r\n\tthree lines\r\n"
                                   "Route: <sip:{HOST}:{PORT};lr>,\r\n <sip:{HOST}:{PORT};lr>\r\n", SDP_VARIANTS[1])),
        ("options", _request("OPTIONS", uri, "Accept: application/sdp\r\n")),
        ("register", _request("REGISTER", "sip:{HOST}:{PORT}", "Expires: 3600\r\n"
                              "Authorization: Digest username=\"fuzz\", realm=\"x\", nonce=\"abc\", "
                              "uri=\"sip:{HOST}\", response=\"0123456789abcdef0123456789abcdef\"\r\n")),
        ("bye", _request("BYE", uri, "Reason: Q.850;cause=16;text=\"Normal\"\r\n")),
        ("cancel", _request("CANCEL", uri)),
        ("ack", _request("ACK", uri)),
        ("info-dtmf", _request("INFO", uri, body="Signal=5\r\nDuration=160\r\n", ctype="application/dtmf-relay")),
        ("refer", _request("REFER", uri, "Refer-To: <sip:other@{HOST}:{VPORT}?Replaces=abc%3Bto-tag%3D1>\r\n"
                           "Referred-By: <sip:fuzz@{HOST}>\r\n")),
        ("prack", _request("PRACK", uri, "RAck: 1 {SEQ} INVITE\r\n")),
        ("update", _request("UPDATE", uri, "Session-Expires: 90;refresher=uac\r\nMin-SE: 90\r\n", SDP_VARIANTS[0])),
        ("subscribe", _request("SUBSCRIBE", uri, "Event: presence\r\nExpires: 600\r\n")),
        ("message", _request("MESSAGE", uri, body="hello", ctype="text/plain")),
        ("notify", _request("NOTIFY", uri, "Event: refer\r\nSubscription-State: active;expires=60\r\n",
                            body="SIP/2.0 200 OK\r\n", ctype="message/sipfrag")),
        ("resp-100", _response("100 Trying", "INVITE")),
        ("resp-180", _response("180 Ringing", "INVITE", "RSeq: 1\r\nRequire: 100rel\r\n")),
        ("resp-183-sdp", _response("183 Session Progress", "INVITE", body=SDP_VARIANTS[0])),
        ("resp-200-sdp", _response("200 OK", "INVITE", "Session-Expires: 1800;refresher=uac\r\n", SDP_VARIANTS[1])),
        ("resp-200-bye", _response("200 OK", "BYE")),
        ("resp-401", _response("401 Unauthorized", "REGISTER",
                               "WWW-Authenticate: Digest realm=\"x\", nonce=\"n\", algorithm=MD5, qop=\"auth\"\r\n")),
        ("resp-486", _response("486 Busy Here", "INVITE")),
        ("resp-603", _response("603 Decline", "INVITE", "Retry-After: 30\r\n")),
    ]
    return out


def fill(template: str, n: int, host: str = LOCAL, port: int = 5060, vport: int = 5070) -> bytes:
    """A template with its placeholders set for datagram ``n`` (unique Call-ID, branch, tags)."""
    return (template.replace("{CALLID}", f"fz{n:08d}-{port}@fuzz").replace("{BRANCH}", f"fz{n:08d}")
            .replace("{TAG2}", f"as{n % 9973:04d}").replace("{TAG}", f"t{n:08d}").replace("{SEQ}", str(1 + n % 50))
            .replace("{HOST}", host).replace("{PORT}", str(port)).replace("{VPORT}", str(vport))).encode()


def torture_corpus(directory: str) -> list[tuple[str, bytes]]:
    """RFC 4475 torture messages (``*.dat``, the RFC's byte-exact test files), if the directory exists."""
    out = []
    for path in sorted(glob.glob(os.path.join(directory, "*.dat"))):
        with open(path, "rb") as f:
            out.append(("rfc4475/" + os.path.basename(path), f.read()))
    return out


# -- the mutator ------------------------------------------------------------------------------

EDGE_NUMBERS = [b"0", b"1", b"-1", b"00000000000000000001", b"65535", b"65536", b"70000", b"99999",
                b"2147483647", b"2147483648", b"4294967295", b"4294967296", b"9223372036854775807",
                b"18446744073709551616", b"999999999", b"1000000000", b"9" * 400, b"1e3", b"0x10",
                b" 12 ", b"+5", b"", b"NaN", b"inf", "\u0663".encode(), "\u00b2".encode(), b"12abc", b"1.5"]
NUMERIC_HEADERS = [b"Content-Length", b"l", b"CSeq", b"Max-Forwards", b"Expires", b"RSeq", b"RAck",
                   b"Session-Expires", b"Min-SE", b"Retry-After"]
BAD_HOSTS = [b"999.1.1.1", b"127.0.0.1.5", b"127.0.0", b"[::zz]", b"::1", b"[::1]", b"", b"a" * 300,
             b"127.0.0.256", b"-", b"0.0.0.0", b"127.1", b"[127.0.0.1]", b"%31%32%37.0.0.1", b"\xff\xfe"]
BAD_PORTS = [b"0", b"65535", b"65536", b"70000", b"99999", b"4294967297", b"-1", b"", b"abc", b"5060" * 20]
BAD_PTS = [b"128", b"255", b"-1", b"99999", b"abc", b"", b"0 0 0 0", b"127 " * 300, b"18", b"96",
           b"101 101", b"4294967296"]
SDP_LINES = [b"a=ptime:0", b"a=ptime:inf", b"a=ptime:nan", b"a=ptime:-20", b"a=ptime:1e400", b"a=ptime:99999999",
             b"a=rtpmap:0", b"a=rtpmap:0 PCMU", b"a=rtpmap:abc PCMU/8000", b"a=rtpmap:0 PCMU/0",
             b"a=rtpmap:101 telephone-event/99999999999", b"a=rtpmap:0 PCMU/8000/0", b"a=rtpmap:0 PCMU/8000/x",
             b"a=fmtp:101", b"a=fmtp:x y", b"a=rtcp:", b"a=rtcp:70000", b"a=rtcp:1 IN IP4", b"a=rtcp:x",
             b"a=rtcp:4001 IN IP4 999.1.1.1", b"a=crypto:", b"a=crypto:1 AES_CM_128_HMAC_SHA1_80",
             b"a=crypto:x AES_CM_128_HMAC_SHA1_80 inline:abc", b"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:!!",
             b"a=sendrecv:x", b"a=inactive", b"a=rtcp-mux", b"c=IN IP4", b"c=IN IP6 ::1", b"c=IN IP4 ::1",
             b"c=IN IP6 127.0.0.1", b"c=", b"m=", b"m=audio", b"m=audio 0 RTP/AVP", b"m=audio x RTP/AVP 0",
             b"m=audio 4000/2 RTP/AVP 0", b"m=audio 70000 RTP/AVP 0", b"m=audio 4000 RTP/SAVP 0", b"o=", b"o=a b c",
             b"v=x", b"t=", b"b=AS:99999999999", b"a=ice-ufrag:x", b"a=ice-pwd:y", b"a=fingerprint:sha-256 00",
             b"a=" + b"x" * 5000, b"q=unknown", b"=", b"a", b"m=audio 4000 RTP/AVP"]


def _lines(data: bytes) -> list[bytes]:
    return data.split(b"\n")


class Mutator:
    """Structure-aware and blind mutations, driven only by the ``random.Random`` it is handed."""

    def __init__(self, corpus: list[bytes]):
        self.corpus = corpus
        self.ops = [
            # (weight, op)
            (6, self.flip_bits), (4, self.set_bytes), (4, self.insert_bytes), (4, self.delete_range),
            (2, self.duplicate_range), (2, self.truncate), (6, self.header_duplicate), (5, self.header_remove),
            (2, self.header_swap), (4, self.splice), (4, self.long_value), (10, self.numeric_edge),
            (4, self.port_edge), (3, self.host_edge), (3, self.line_ends), (2, self.non_utf8),
            (3, self.start_line), (10, self.sdp_port), (6, self.sdp_connection), (8, self.sdp_payload_types),
            (10, self.sdp_line), (2, self.sdp_remove_line), (3, self.params),
        ]
        self.total = sum(w for w, _ in self.ops)

    def mutate(self, rng: random.Random, data: bytes, max_size: int = 70000) -> bytes:
        for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
            pick = rng.randrange(self.total)
            for weight, op in self.ops:
                pick -= weight
                if pick < 0:
                    data = op(rng, data)
                    break
        return data[:max_size]

    # blind
    def flip_bits(self, rng, d):
        if not d:
            return d
        b = bytearray(d)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b)

    def set_bytes(self, rng, d):
        if not d:
            return d
        b = bytearray(d)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.choice((0, 0x0d, 0x0a, 0x20, 0x3a, 0x3b, 0x2c, 0x22, 0x3c, 0x3e, 0x25,
                                                   0x5b, 0x5d, 0x40, 0x7f, 0x80, 0xff, rng.randrange(256)))
        return bytes(b)

    def insert_bytes(self, rng, d):
        i = rng.randint(0, len(d))
        junk = rng.choice((bytes(rng.randrange(256) for _ in range(rng.randint(1, 16))), b"\r\n", b"\r", b"\n",
                           b"\x00", b":", b";", b",", b"\"", b"<", b">", b"%", b"%zz", b"\\", b" ", b"\t",
                           b"\r\n\r\n", b"\xc3\x28", b"\xf0\x9f\x98\x80"))
        return d[:i] + junk + d[i:]

    def delete_range(self, rng, d):
        if not d:
            return d
        i = rng.randrange(len(d))
        return d[:i] + d[i + rng.randint(1, 64):]

    def duplicate_range(self, rng, d):
        if not d:
            return d
        i = rng.randrange(len(d))
        piece = d[i:i + rng.randint(1, 200)]
        return d[:i] + piece * rng.randint(2, 20) + d[i:]

    def truncate(self, rng, d):
        return d[:rng.randint(0, len(d))]

    # header structure
    def _head_body(self, d):
        i = d.find(b"\r\n\r\n")
        if i < 0:
            return d.split(b"\r\n"), None
        return d[:i].split(b"\r\n"), d[i + 4:]

    def _join(self, lines, body):
        return b"\r\n".join(lines) + (b"\r\n\r\n" + body if body is not None else b"")

    def header_duplicate(self, rng, d):
        lines, body = self._head_body(d)
        if len(lines) < 2:
            return d
        i = rng.randrange(1, len(lines))
        line = lines[i]
        if rng.random() < 0.5 and b":" in line:  # the same header, another value
            name = line.split(b":", 1)[0]
            line = name + b": " + rng.choice([b"0", b"1 INVITE", b"<sip:x@127.0.0.1>", b"SIP/2.0/UDP 127.0.0.1",
                                              b"", b"x" * rng.randint(1, 3000), rng.choice(EDGE_NUMBERS)])
        lines.insert(rng.randrange(1, len(lines) + 1), line)
        return self._join(lines, body)

    def header_remove(self, rng, d):
        lines, body = self._head_body(d)
        if len(lines) < 2:
            return d
        del lines[rng.randrange(1 if rng.random() < 0.9 else 0, len(lines))]
        return self._join(lines, body)

    def header_swap(self, rng, d):
        lines, body = self._head_body(d)
        if len(lines) < 3:
            return d
        i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
        return self._join(lines, body)

    def splice(self, rng, d):
        other = rng.choice(self.corpus)
        return d[:rng.randint(0, len(d))] + other[rng.randint(0, len(other)):]

    def long_value(self, rng, d):
        lines, body = self._head_body(d)
        size = rng.choice((256, 1024, 4096, 16384, 65000))
        filler = rng.choice((b"a", b"9", b"%41", b";", b",", b"\"", b"<", b" ", b"\xe2\x82\xac", b"/", b".."))
        value = (filler * (size // len(filler) + 1))[:size]
        i = rng.randrange(len(lines))
        if i == 0 or b":" not in lines[i]:
            lines[i] = lines[i] + value
        else:
            name = lines[i].split(b":", 1)[0]
            lines[i] = name + b": " + (lines[i].split(b":", 1)[1].strip() + value if rng.random() < 0.5 else value)
        return self._join(lines, body)

    def numeric_edge(self, rng, d):
        name = rng.choice(NUMERIC_HEADERS)
        value = rng.choice(EDGE_NUMBERS)
        pattern = re.compile(rb"(?im)^(" + re.escape(name) + rb"[ \t]*:[ \t]*)(\d+)")
        m = list(pattern.finditer(d))
        if not m:
            lines, body = self._head_body(d)
            lines.insert(max(1, len(lines) - 1), name + b": " + value)
            return self._join(lines, body)
        hit = rng.choice(m)
        return d[:hit.start(2)] + value + d[hit.end(2):]

    def port_edge(self, rng, d):
        m = list(re.finditer(rb"(?<=[0-9\]]:)(\d{1,5})(?=[;>\r\n ])", d))
        if not m:
            return d
        hit = rng.choice(m)
        return d[:hit.start()] + rng.choice(BAD_PORTS) + d[hit.end():]

    def host_edge(self, rng, d):
        m = list(re.finditer(rb"127\.0\.0\.1", d))
        if not m:
            return d
        hit = rng.choice(m)
        return d[:hit.start()] + rng.choice(BAD_HOSTS) + d[hit.end():]

    def line_ends(self, rng, d):
        choice = rng.randrange(5)
        if choice == 0:
            return d.replace(b"\r\n", b"\n")
        if choice == 1:
            return d.replace(b"\r\n", b"\r", rng.randint(1, 5))
        if choice == 2:
            i = d.find(b"\r\n", rng.randint(0, len(d)))
            return d if i < 0 else d[:i] + rng.choice((b"\r\n ", b"\r\n\t", b"\n\r", b"\r\r\n", b"\x00")) + d[i:]
        if choice == 3:
            return b"\r\n" * rng.randint(1, 5) + d
        return d + rng.choice((b"\r\n", b"garbage after", b"\r\n\r\n" + d))

    def non_utf8(self, rng, d):
        i = rng.randint(0, len(d))
        return d[:i] + rng.choice((b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xe9", b"\xfe\xff")) + d[i:]

    def start_line(self, rng, d):
        end = d.find(b"\r\n")
        end = len(d) if end < 0 else end
        line = rng.choice((b"INVITE sip:x SIP/2.0", b"INVITE  sip:x@127.0.0.1 SIP/2.0", b"INVITE sip:x@127.0.0.1 SIP/3.0",
                           b"SIP/2.0 999 Weird", b"SIP/2.0 200", b"SIP/2.0 099 Low", b"sip/2.0 200 OK",
                           b"INVITE sips:x@127.0.0.1 SIP/2.0", b"INVITE tel:+1-555 SIP/2.0",
                           b"INVITE <sip:x@127.0.0.1> SIP/2.0", b"INVITE sip:@ SIP/2.0", b"INVITE sip:x@[::1 SIP/2.0",
                           b"INVITE sip:x@127.0.0.1:99999 SIP/2.0", b"FOO sip:x@127.0.0.1 SIP/2.0",
                           b"INVITE sip:%00@127.0.0.1;transport=tcp;maddr=127.0.0.1 SIP/2.0", b"",
                           b"INVITE sip:x@127.0.0.1;lr;lr;lr=;=x SIP/2.0", b"SIP/2.0 200 OK\x00"))
        return line + d[end:]

    def params(self, rng, d):
        m = list(re.finditer(rb";(branch|tag|rport|received|lr|transport|maddr|expires|q)=?[^;\r\n>,]*", d))
        junk = rng.choice((b";", b";;", b";=", b";x=\"", b";rport=99999", b";rport=abc", b";received=999.9.9.9",
                           b";branch=", b";tag=", b";transport=tcp", b";transport=tls", b";transport=sctp",
                           b";maddr=127.0.0.1", b";ttl=999", b";expires=-1", b";q=2.5", b";" + b"p" * 2000,
                           b";received=::1", b";rport=0"))
        if m and rng.random() < 0.5:
            hit = rng.choice(m)
            return d[:hit.start()] + junk + d[hit.end():]
        m = list(re.finditer(rb"\r\n(Via|v|From|f|To|t|Contact|m):[^\r\n]*", d))
        if not m:
            return d
        hit = rng.choice(m)
        return d[:hit.end()] + junk + d[hit.end():]

    # SDP
    def sdp_port(self, rng, d):
        m = list(re.finditer(rb"(?m)^m=\w+ (\d+)", d))
        if not m:
            return d
        hit = rng.choice(m)
        return d[:hit.start(1)] + rng.choice(BAD_PORTS + [b"65536", b"70000", b"131072", b"100000"]) + d[hit.end(1):]

    def sdp_connection(self, rng, d):
        m = list(re.finditer(rb"(?m)^c=IN (IP4|IP6) ([^\r\n]*)", d))
        if not m:
            return d
        hit = rng.choice(m)
        if rng.random() < 0.3:
            return d[:hit.start(1)] + rng.choice((b"IP6", b"IP5", b"", b"IP4 IP4")) + d[hit.end(1):]
        return d[:hit.start(2)] + rng.choice(BAD_HOSTS + [b"127.0.0.1/127", b"127.0.0.1/x/y", b"127.0.0.1 junk"]) \
            + d[hit.end(2):]

    def sdp_payload_types(self, rng, d):
        m = list(re.finditer(rb"(?m)^(m=\w+ \S+ \S+)( [^\r\n]*)?", d))
        if m and rng.random() < 0.6:
            hit = rng.choice(m)
            return d[:hit.end(1)] + b" " + rng.choice(BAD_PTS) + d[hit.end():]
        m = list(re.finditer(rb"(?m)^a=(rtpmap|fmtp):(\d+)", d))
        if not m:
            return d
        hit = rng.choice(m)
        return d[:hit.start(2)] + rng.choice(BAD_PTS) + d[hit.end(2):]

    def sdp_line(self, rng, d):
        m = list(re.finditer(rb"(?m)^[vosctmab]=[^\r\n]*", d))
        if not m:
            return d
        hit = rng.choice(m)
        line = rng.choice(SDP_LINES)
        if rng.random() < 0.5:
            return d[:hit.start()] + line + d[hit.end():]  # replace a line
        return d[:hit.end()] + b"\r\n" + line + d[hit.end():]  # add one

    def sdp_remove_line(self, rng, d):
        m = list(re.finditer(rb"(?m)^[vosctmab]=[^\r\n]*\r?\n", d))
        if not m:
            return d
        hit = rng.choice(m)
        return d[:hit.start()] + d[hit.end():]


def fix_content_length(data: bytes) -> bytes:
    """Set the first Content-Length to the body's real length (half the inputs): a mutated body
    would otherwise nearly always be refused for its length before the SDP code sees it."""
    i = data.find(b"\r\n\r\n")
    if i < 0:
        return data
    body = data[i + 4:]
    return re.sub(rb"(?im)^(Content-Length|l)([ \t]*:[ \t]*)\d+", lambda m: m.group(1) + m.group(2)
                  + str(len(body)).encode(), data[:i], count=1) + data[i:]


# -- in-process targets ------------------------------------------------------------------------


class Findings:
    """Distinct failures (by signature) with their first reproducers."""

    def __init__(self, repro_dir: str | None, per_signature: int = 3, max_signatures: int = 100):
        self.repro_dir = repro_dir
        self.per_signature = per_signature
        self.max_signatures = max_signatures
        self.counts: Counter = Counter()
        self.first: OrderedDict = OrderedDict()  # signature -> {"detail", "files"}
        self.by_kind: Counter = Counter()

    def add(self, kind: str, signature: str, detail: str, data: bytes) -> None:
        key = f"{kind}: {signature}"
        self.counts[key] += 1
        self.by_kind[kind] += 1
        entry = self.first.get(key)
        if entry is None:
            if len(self.first) >= self.max_signatures:
                return
            entry = self.first[key] = {"kind": kind, "signature": signature, "detail": detail, "files": []}
        if len(entry["files"]) < self.per_signature and self.repro_dir:
            os.makedirs(self.repro_dir, exist_ok=True)
            digest = hashlib.sha1(key.encode()).hexdigest()[:10]
            path = os.path.join(self.repro_dir, f"{kind}-{digest}-{len(entry['files'])}.bin")
            with open(path, "wb") as f:
                f.write(data)
            with open(path[:-4] + ".txt", "w") as f:
                f.write(f"{key}\n\n{detail}\n")
            entry["files"].append(path)


def _signature(exc: BaseException) -> tuple[str, str]:
    """(exception type and innermost activecall frame, formatted traceback)."""
    tb = traceback.extract_tb(exc.__traceback__)
    own = [fr for fr in tb if "activecall" in fr.filename] or list(tb)
    where = f"{os.path.basename(own[-1].filename)}:{own[-1].lineno} {own[-1].name}" if own else "?"
    return f"{exc.__class__.__name__} at {where}", "".join(traceback.format_exception(exc))


CALL_ID_LINE = re.compile(rb"(?im)^(?:call-id|i)[ \t]*:([^\r\n]*)\r?$")


class InProcessTarget:
    """Everything the daemon does with a datagram's bytes before any I/O."""

    def __init__(self, findings: Findings):
        from activecall.sip import message, sdp
        from activecall.sip import sdp_offer, transport

        self.message, self.sdp, self.transport, self.sdp_offer = message, sdp, transport, sdp_offer
        self.findings = findings
        self.outcomes: Counter = Counter()

    def run(self, data: bytes) -> None:
        m = self.message
        try:
            self._sip(data)
        except Exception as e:  # noqa: BLE001 - that is the point
            sig, detail = _signature(e)
            self.findings.add("sip-exception", sig, detail, data)
            self.outcomes["sip: unexpected exception"] += 1
        try:
            total = m.message_length(data.lstrip(b"\r\n"))
            if total is not None:
                self.outcomes["stream: framed"] += 1
        except m.SIPParseError:
            self.outcomes["stream: SIPParseError"] += 1
        except Exception as e:  # noqa: BLE001
            sig, detail = _signature(e)
            self.findings.add("stream-exception", sig, detail, data)

    def _sip(self, data: bytes) -> None:
        m = self.message
        try:
            msg = m.parse_message(data)
        except m.SIPParseError as e:
            if e.__cause__ is not None and e.reason.startswith("unparsable message ("):
                sig, detail = _signature(e.__cause__)
                self.findings.add("sip-internal", sig, detail, data)
                self.outcomes["sip: internal error re-raised as SIPParseError"] += 1
                return
            self.outcomes["sip: SIPParseError"] += 1
            if e.can_respond:
                self.transport.bad_request(e)  # what the daemon sends back
            return
        self.outcomes["sip: parsed"] += 1
        for accessor in ("call_id", "cseq", "vias", "top_via", "from_", "to", "contacts", "content_type"):
            try:
                getattr(msg, accessor)
            except m.SIPParseError:
                self.outcomes[f"sip: {accessor} SIPParseError"] += 1
        wire = msg.to_bytes()
        try:
            again = m.parse_message(wire)
        except m.SIPParseError as e:
            kind = "sip-roundtrip-size" if len(wire) > m.MAX_MESSAGE_SIZE else "sip-roundtrip"
            self.findings.add(kind, normalise(e.reason)[:60], f"{e.reason}\n\nre-serialised:\n{wire[:2000]!r}", data)
            again = None
        if again is not None and again.body != msg.body:
            self.findings.add("sip-roundtrip", "body changed", f"{msg.body[:200]!r} -> {again.body[:200]!r}", data)
        if isinstance(msg, m.Request):
            try:
                self.transport.stamp_via(msg, LOCAL, 5070)
                if msg.method != "ACK":
                    response = m.make_response(msg, 200).to_bytes()
                    m.make_response(msg, 486)
                    raw = CALL_ID_LINE.search(data)
                    if raw and raw.group(1).strip() and raw.group(1).strip() not in response:
                        self.findings.add("sip-echo", "Call-ID bytes differ in the response",
                                          f"request {raw.group(1).strip()[:200]!r}, response "
                                          f"{CALL_ID_LINE.search(response).group(1)[:200]!r}", data)
            except m.SIPParseError:
                self.outcomes["sip: response SIPParseError"] += 1
        if msg.body and (msg.content_type in (None, "application/sdp")):
            self._sdp(msg.body, data)

    def _sdp(self, body: bytes, data: bytes) -> None:
        sdp = self.sdp
        try:
            self._sdp_checked(body, data)
        except (sdp.SDPParseError, sdp.NegotiationError) as e:
            self.outcomes[f"sdp: {e.__class__.__name__}"] += 1
        except Exception as e:  # noqa: BLE001
            sig, detail = _signature(e)
            self.findings.add("sdp-exception", sig, detail, data)
            self.outcomes["sdp: unexpected exception"] += 1

    def _sdp_checked(self, body: bytes, data: bytes) -> None:
        sdp, offer = self.sdp, self.sdp_offer
        session = sdp.parse(body)
        self.outcomes["sdp: parsed"] += 1
        text = session.to_text()
        try:
            sdp.parse(text)
        except sdp.SDPParseError as e:
            self.findings.add("sdp-roundtrip", str(e)[:60], f"{e}\n\nre-serialised:\n{text[:2000]!r}", data)
        sdp.is_webrtc(session)
        offer.sdp_direction(body)
        offer.with_direction(body, "sendonly")
        answer, negotiated = sdp.build_answer(session, CODECS, LOCAL, 30000)
        sdp.parse(answer.to_text())
        self.outcomes["sdp: negotiated"] += 1
        host, port = negotiated.remote_rtp
        problem = None
        if not (0 <= port <= 65535):
            problem = "remote RTP port outside 0..65535"
        elif negotiated.remote_rtcp and not (0 <= negotiated.remote_rtcp[1] <= 65535):
            problem = "remote RTCP port outside 0..65535"
        else:
            try:
                import ipaddress
                ipaddress.ip_address(host)
            except ValueError:
                problem = "remote RTP address is no IP address"
        if problem:
            self.outcomes[f"sdp: accepted, {problem}"] += 1
            self.findings.add("sdp-accepted-invalid", problem, f"remote_rtp={negotiated.remote_rtp!r} "
                              f"remote_rtcp={negotiated.remote_rtcp!r}", data)
        sdp.negotiate_as_offerer(session, CODECS)


#: failures kinds that make the in-process run fail (accepted-invalid is reported, not failed)
INPROCESS_FAILING = ("sip-exception", "stream-exception", "sip-internal", "sdp-exception", "sip-roundtrip",
                     "sdp-roundtrip", "sip-echo")


def build_corpus(torture_dir: str) -> tuple[list[bytes], list[str], int]:
    """(inputs, names, how many are torture messages)."""
    names, corpus = [], []
    for i, (name, template) in enumerate(seed_templates()):
        names.append(name)
        corpus.append(fill(template, i))
    for name, data in torture_corpus(torture_dir):
        names.append(name)
        corpus.append(data)
    sdp_only = [body.encode() for body in SDP_VARIANTS]
    return corpus + sdp_only, names + [f"sdp{i}" for i in range(len(sdp_only))], len(torture_corpus(torture_dir))


def one_input(rng: random.Random, mutator: Mutator, corpus: list[bytes]) -> bytes:
    data = mutator.mutate(rng, rng.choice(corpus))
    if rng.random() < 0.5:
        data = fix_content_length(data)
    return data


def run_inprocess(args) -> dict:
    corpus, names, torture = build_corpus(args.torture_dir)
    findings = Findings(os.path.join(args.repro_dir, "inprocess") if args.repro_dir else None)
    target = InProcessTarget(findings)
    mutator = Mutator(corpus)
    rng = random.Random(args.seed)
    n = 0
    t0 = time.monotonic()
    deadline = t0 + args.seconds if args.seconds else None
    for seed_input in corpus:  # the unmutated corpus first: valid input must pass
        target.run(seed_input)
    while n < args.inputs and (deadline is None or time.monotonic() < deadline):
        data = one_input(rng, mutator, corpus)
        if rng.random() < 0.15:  # an SDP body alone, so SDP mutations reach the SDP parser more often
            target._sdp(data.split(b"\r\n\r\n", 1)[-1], data)
        target.run(data)
        n += 1
    return inprocess_report(n, time.monotonic() - t0, corpus, torture, findings, target, "seeded", args.seed)


def inprocess_report(n, wall, corpus, torture, findings, target, engine, seed) -> dict:
    failures = sum(c for k, c in findings.counts.items() if k.split(":")[0] in INPROCESS_FAILING)
    return {
        "mode": "inprocess", "engine": engine, "seed": seed, "inputs": n, "seconds": round(wall, 1),
        "inputs_per_second": round(n / wall) if wall else None, "corpus": len(corpus), "torture_messages": torture,
        "outcomes": dict(sorted(target.outcomes.items())), "failures": failures,
        "findings": [{"what": k, "count": findings.counts[k], "detail": v["detail"].strip().splitlines()[-1][:300],
                      "reproducers": v["files"]} for k, v in findings.first.items()],
        "ok": failures == 0,
    }


def run_atheris(args) -> dict:
    """The in-process mode under libFuzzer (atheris): this mutator as the custom mutator."""
    import atheris

    corpus, names, torture = build_corpus(args.torture_dir)
    with atheris.instrument_imports():
        import activecall.sip.message  # noqa: F401
        import activecall.sip.sdp  # noqa: F401
    findings = Findings(os.path.join(args.repro_dir, "inprocess") if args.repro_dir else None)
    target = InProcessTarget(findings)
    mutator = Mutator(corpus)
    state = {"n": 0, "t0": time.monotonic()}
    deadline = state["t0"] + args.seconds if args.seconds else None
    seed_dir = tempfile.mkdtemp(prefix="fuzz-sip-seeds-")
    for i, data in enumerate(corpus):
        with open(os.path.join(seed_dir, f"{i:03d}"), "wb") as f:
            f.write(data)

    def finish():
        report = inprocess_report(state["n"], time.monotonic() - state["t0"], corpus, torture, findings, target,
                                  "atheris", args.seed)
        emit(report, args)
        shutil.rmtree(seed_dir, ignore_errors=True)
        sys.stdout.flush()
        os._exit(0 if report["ok"] else 1)

    def test_one(data: bytes):
        target.run(data)
        state["n"] += 1
        if state["n"] >= args.inputs or (deadline is not None and state["n"] % 256 == 0
                                         and time.monotonic() >= deadline):
            finish()

    def custom_mutator(data, max_size, seed):
        rng = random.Random(seed)
        if rng.random() < 0.2:
            return atheris.Mutate(data, max_size)
        out = mutator.mutate(rng, data, max_size)
        return fix_content_length(out)[:max_size] if rng.random() < 0.5 else out

    argv = [sys.argv[0], f"-seed={args.seed or 1}", f"-runs={args.inputs + len(corpus) + 100}",
            "-max_len=70000", "-rss_limit_mb=4096", "-print_final_stats=0", "-close_fd_mask=0",
            # libFuzzer saves the input it was on when the process ends (finish() ends it): keep that out of the tree
            f"-artifact_prefix={os.path.join(args.repro_dir or seed_dir, 'libfuzzer-')}", seed_dir]
    os.makedirs(args.repro_dir or seed_dir, exist_ok=True)
    if args.seconds:
        argv.insert(1, f"-max_total_time={int(args.seconds) + 60}")
    atheris.Setup(argv, test_one, custom_mutator=custom_mutator)
    atheris.Fuzz()
    finish()  # not reached: libFuzzer exits; test_one finishes first
    return {}


# -- the daemon over UDP ----------------------------------------------------------------------

PLAYBOOK = """---
llm:
  provider: echo
---
Fuzz playbook: answer and echo.
"""


def free_udp_port() -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((LOCAL, 0))
            port = u.getsockname()[1]
        with socket.socket() as t:
            try:
                t.bind((LOCAL, port))
            except OSError:
                continue
        return port


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Daemon:
    def __init__(self, work: str, log_level: str = "info"):
        self.work = work
        self.sip_port = free_udp_port()
        http_port = free_udp_port()
        self.cdr_dir = os.path.join(work, "cdr")
        self.log_path = os.path.join(work, "daemon.log")
        os.makedirs(os.path.join(work, "playbooks"), exist_ok=True)
        with open(os.path.join(work, "playbooks", "fuzz.md"), "w") as f:
            f.write(PLAYBOOK)
        self.conf = os.path.join(work, "fuzz.toml")
        with open(self.conf, "w") as f:
            f.write(f'''addr = "{LOCAL}"
udp_port = {self.sip_port}
tcp_port = 0
http_addr = "{LOCAL}:{http_port}"
rtp_start_port = 20000
rtp_end_port = 40000
media_cache_path = "{work}/cache"
playbook_dir = "{work}/playbooks"
log_level = "{log_level}"
log_file = "{self.log_path}"
accept_timeout = "10s"
graceful_shutdown_timeout = "3s"
[recording]
enabled = false
[callrecord]
type = "local"
root = "{self.cdr_dir}"
[handler]
type = "playbook"
default = "fuzz.md"
''')
        self.out = open(os.path.join(work, "daemon.out"), "w")
        self.proc = subprocess.Popen([os.path.join(BIN, "twistd"), "--nodaemon", "--pidfile=", "--reactor=asyncio",
                                      "activecall", "--conf", self.conf], stdout=self.out, stderr=subprocess.STDOUT,
                                     cwd=work, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                                         [os.path.join(ROOT, "src")] + [p for p in os.environ.get(
                                             "PYTHONPATH", "").split(os.pathsep) if p])))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if "activecall ready" in self.log_text():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.proc.kill()
        self.proc.wait()
        raise SystemExit(f"the daemon did not start:\n{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        self.out.close()
        return self.proc.returncode


RECORD_START = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[([^\]#]*)#(\w+)\] ?(.*)$")


class LogScanner:
    """Reads the daemon's log file incrementally; groups continuation lines with their record."""

    def __init__(self, path: str):
        self.path = path
        self.offset = 0
        self.partial = ""
        self.lines = 0
        self.levels: Counter = Counter()
        self.malformed = 0
        self.bad: list[dict] = []  # tracebacks, critical and error records
        self.cdr_errors = 0
        self._record: dict | None = None

    def poll(self) -> list[dict]:
        """New bad records since the last poll."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return []
        self.offset += len(chunk)
        text = self.partial + chunk.decode("utf-8", "replace")
        lines = text.split("\n")
        self.partial = lines.pop()
        new = []
        for line in lines:
            self.lines += 1
            m = RECORD_START.match(line)
            if m:
                done = self._close()
                if done:
                    new.append(done)
                self._record = {"namespace": m.group(1), "level": m.group(2), "text": m.group(3), "more": []}
                self.levels[m.group(2)] += 1
                if m.group(3).startswith("malformed message from"):
                    self.malformed += 1
            elif self._record is not None:
                self._record["more"].append(line)
        if not self.partial and lines:  # twisted writes a record (with its traceback) in one write
            done = self._close()
            if done:
                new.append(done)
        return new

    def finish(self) -> list[dict]:
        new = self.poll()
        done = self._close()
        return new + ([done] if done else [])

    def _close(self) -> dict | None:
        r, self._record = self._record, None
        if r is None:
            return None
        traceback_seen = any("Traceback (most recent call last)" in x for x in r["more"]) or \
            "Traceback (most recent call last)" in r["text"]
        if "CDR" in r["text"] and r["level"] in ("warn", "error", "critical"):
            self.cdr_errors += 1
        if traceback_seen or r["level"] in ("error", "critical"):
            r["traceback"] = traceback_seen
            exc = [x.strip() for x in r["more"] if re.match(r"^\s*[\w.]+(Error|Exception|Exit|Interrupt)\b", x)]
            frames = [x.strip() for x in r["more"] if x.strip().startswith("File ")]
            own = [x for x in frames if "/activecall/" in x] or frames
            # where it escaped: the innermost frame outside the parsers (message.py, sdp.py) that raised it
            callers = [x for x in own if not re.search(r"/activecall/sip/(message|sdp)\.py", x)] or own

            def short(frame):
                return re.sub(r'^File "[^"]*?/(src/)?(?=activecall/)|^File "', "", frame).replace('", line ', ":")
            r["exception"] = exc[-1] if exc else ""
            r["where"] = short(callers[-1]) if callers else ""
            r["raised_at"] = short(own[-1]) if own else ""
            what = f"{r['exception'].split(':')[0]} | {r['where']}" if traceback_seen else normalise(r["text"][:60])
            r["signature"] = f"[{r['namespace']}#{r['level']}] {what}"
            self.bad.append(r)
            return r
        return None


def normalise(text: str) -> str:
    """A log record without the parts that differ per call (numbers, hex, quoted values, ids)."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", text)
    text = re.sub(r"fz\d+[-\w.@]*", "<id>", text)
    return re.sub(r"\b0x[0-9a-f]+\b|\d+", "N", text)


class UdpFuzzer:
    def __init__(self, args, daemon: Daemon, repro_dir: str | None):
        self.args = args
        self.daemon = daemon
        self.repro_dir = repro_dir
        self.target = (LOCAL, daemon.sip_port)
        self.fuzz_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.fuzz_sock.bind((LOCAL, 0))
        self.fuzz_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.probe_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.probe_sock.bind((LOCAL, 0))
        self.vport = self.fuzz_sock.getsockname()[1]
        self.probe_port = self.probe_sock.getsockname()[1]
        self.recent: deque = deque(maxlen=256)  # (index, bytes) of the last datagrams sent
        self.responses: Counter = Counter()
        self.probes: dict[str, dict] = {}  # call-id -> {sent, next, interval, answered}
        self.probe_n = 0
        self.answered = 0
        self.answered_late = 0  # after at least one retransmission
        self.probe_other: Counter = Counter()  # non-200 final answers to probes, by status
        self.byes = 0
        self.invites_answered = 0
        self.send_errors: Counter = Counter()
        self.repro_saved = 0
        self.saved_signatures: set = set()
        self.in_netns = os.environ.get("FUZZ_SIP_NETNS") == "1"
        from activecall.sip import message

        self.message = message

    # probes: an OPTIONS with its own Call-ID; retransmitted at 0.5, 1, 2, 4 s (RFC 3261 timer E), given up at 8 s
    def send_probe(self, now: float) -> None:
        self.probe_n += 1
        cid = f"probe-{self.probe_n}-{os.getpid()}@fuzz"
        data = (f"OPTIONS sip:agent@{LOCAL}:{self.daemon.sip_port} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {LOCAL}:{self.probe_port};branch=z9hG4bKprobe{self.probe_n};rport\r\n"
                f"Max-Forwards: 70\r\nFrom: <sip:probe@{LOCAL}>;tag=p{self.probe_n}\r\n"
                f"To: <sip:agent@{LOCAL}>\r\nCall-ID: {cid}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n").encode()
        self.probes[cid] = {"data": data, "sent": now, "next": now + 0.5, "interval": 0.5, "tries": 1,
                            "answered": None}
        self._send(self.probe_sock, data)

    def _send(self, sock, data: bytes) -> bool:
        try:
            sock.sendto(data, self.target)
            return True
        except OSError as e:  # EMSGSIZE for > 65507 bytes; ENOBUFS
            self.send_errors[e.__class__.__name__ + ":" + str(e.errno)] += 1
            return False

    def pending_probes(self):
        return [p for p in self.probes.values() if p["answered"] is None and not p.get("lost")]

    def service(self, now: float) -> None:
        """Read what came back; retransmit or give up probes."""
        while True:
            ready, _, _ = select.select([self.fuzz_sock, self.probe_sock], [], [], 0)
            if not ready:
                break
            for sock in ready:
                try:
                    data, _ = sock.recvfrom(70000)
                except BlockingIOError:
                    continue
                if sock is self.probe_sock:
                    self._probe_answer(data, now)
                else:
                    self._fuzz_answer(data)
        for p in self.pending_probes():
            if now - p["sent"] > self.args.probe_timeout:
                p["lost"] = True
            elif now >= p["next"]:
                self._send(self.probe_sock, p["data"])
                p["tries"] += 1
                p["interval"] = min(p["interval"] * 2, 4.0)
                p["next"] = now + p["interval"]

    def _probe_answer(self, data: bytes, now: float) -> None:
        m = re.search(rb"(?im)^(?:Call-ID|i)[ \t]*:[ \t]*(\S+)", data)
        p = self.probes.get(m.group(1).decode("latin-1")) if m else None
        if p is not None and data[:8] == b"SIP/2.0 " and data[8:9] != b"1" and data[8:11] != b"200":
            self.probe_other[data[8:11].decode("latin-1")] += 1  # a final answer, but not 200
        if p is not None and p["answered"] is None and data.startswith(b"SIP/2.0 200"):
            p["answered"] = now - p["sent"]
            self.answered += 1
            if p["tries"] > 1:
                self.answered_late += 1

    def _fuzz_answer(self, data: bytes) -> None:
        m = self.message
        try:
            msg = m.parse_message(data)
        except m.SIPParseError:
            self.responses["unparsable"] += 1
            return
        if isinstance(msg, m.Request):  # the daemon's BYE for an unanswered 200, a NOTIFY...: answer 200
            self.responses[f"request {msg.method}"] += 1
            if msg.method != "ACK":
                try:
                    self._send(self.fuzz_sock, m.make_response(msg, 200).to_bytes())
                except m.SIPParseError:
                    pass
            return
        self.responses[f"{msg.status // 100}xx"] += 1
        try:
            cseq = msg.cseq
        except m.SIPParseError:
            return
        if cseq.method == "INVITE" and 200 <= msg.status < 300:
            self.invites_answered += 1
            self._ack_and_bye(msg)

    def _ack_and_bye(self, resp) -> None:
        """End a call the daemon answered (so calls do not pile up until their ACK timeout)."""
        try:
            contact = resp.contacts[0].uri if resp.contacts else None
            ruri = str(contact) if contact else f"sip:agent@{LOCAL}:{self.daemon.sip_port}"
            common = (f"Max-Forwards: 70\r\nFrom: {resp.headers.get('From')}\r\nTo: {resp.headers.get('To')}\r\n"
                      f"Call-ID: {resp.call_id}\r\n")
        except (self.message.SIPParseError, ValueError, IndexError):
            return
        # the parser keeps a peer's non-UTF-8 bytes as lone surrogates: back to the same bytes
        n = resp.cseq.seq
        ack = (f"ACK {ruri} SIP/2.0\r\nVia: SIP/2.0/UDP {LOCAL}:{self.vport};branch=z9hG4bKack{self.byes};rport\r\n"
               f"{common}CSeq: {n} ACK\r\nContent-Length: 0\r\n\r\n").encode("utf-8", "surrogateescape")
        bye = (f"BYE {ruri} SIP/2.0\r\nVia: SIP/2.0/UDP {LOCAL}:{self.vport};branch=z9hG4bKbye{self.byes};rport\r\n"
               f"{common}CSeq: {n + 1} BYE\r\nContent-Length: 0\r\n\r\n").encode("utf-8", "surrogateescape")
        self.byes += 1
        self._send(self.fuzz_sock, ack)
        self._send(self.fuzz_sock, bye)

    def save_context(self, record: dict) -> None:
        """The datagrams sent just before a bad log record, for ``--mode replay``."""
        if not self.repro_dir or self.repro_saved >= 20 or record["signature"] in self.saved_signatures:
            return
        self.saved_signatures.add(record["signature"])
        self.repro_saved += 1
        d = os.path.join(self.repro_dir, "udp", f"event-{self.repro_saved:02d}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "log-record.txt"), "w") as f:
            f.write(f"{record['signature']}\n\n"
                    f"[{record['namespace']}#{record['level']}] {record['text']}\n" + "\n".join(record["more"]))
        named = {int(x) for x in re.findall(r"fz(\d{8})", record["text"] + "\n".join(record["more"]))}
        for index, data in self.recent:
            prefix = "culprit-" if index in named else ""
            with open(os.path.join(d, f"{prefix}{index:08d}.bin"), "wb") as f:
                f.write(data)

    def run(self, scanner: LogScanner) -> dict:
        args = self.args
        templates = seed_templates()
        torture = torture_corpus(args.torture_dir)
        corpus = [fill(t, i, LOCAL, self.daemon.sip_port, self.vport) for i, (_, t) in enumerate(templates)]
        mutator = Mutator(corpus + [d for _, d in torture])
        rng = random.Random(args.seed)
        # the unmutated corpus first, so valid messages (and the torture set) are all seen once
        sent, t0 = 0, time.monotonic()
        deadline = t0 + args.seconds if args.seconds else None
        interval = 1.0 / args.rate
        oversize = 0
        while sent < args.datagrams and (deadline is None or time.monotonic() < deadline):
            now = time.monotonic()
            due = t0 + sent * interval
            if now < due:  # pace: wait for the next slot, reading replies meanwhile
                ready, _, _ = select.select([self.fuzz_sock, self.probe_sock], [], [], due - now)
                self.service(time.monotonic())
                continue
            if sent % args.probe_every == 0:
                self.send_probe(now)
            if sent < len(templates) + len(torture):
                if sent < len(templates):
                    data = fill(templates[sent][1], sent, LOCAL, self.daemon.sip_port, self.vport)
                else:
                    data = torture[sent - len(templates)][1]
            else:
                pick = rng.randrange(len(templates) + len(torture))
                if pick < len(templates):
                    base = fill(templates[pick][1], sent, LOCAL, self.daemon.sip_port, self.vport)
                else:
                    base = torture[pick - len(templates)][1]
                data = mutator.mutate(rng, base, 65507)
                if rng.random() < 0.5:
                    data = fix_content_length(data)
            if not self.in_netns:
                data = loopback_only(data)
            if len(data) > 65507:
                oversize += 1
                data = data[:65507]
            self.recent.append((sent, data))
            self._send(self.fuzz_sock, data)
            sent += 1
            if sent % 64 == 0:
                self.service(time.monotonic())
                for record in scanner.poll():
                    self.save_context(record)
                if not self.daemon.alive():
                    break
        flood_seconds = time.monotonic() - t0
        # the last probe, then wait for every outstanding probe to be answered or given up
        self.send_probe(time.monotonic())
        while self.pending_probes():
            ready, _, _ = select.select([self.fuzz_sock, self.probe_sock], [], [], 0.1)
            self.service(time.monotonic())
        for record in scanner.poll():
            self.save_context(record)
        return {"datagrams": sent, "flood_seconds": round(flood_seconds, 1),
                "rate_achieved": round(sent / flood_seconds) if flood_seconds else None, "oversize_cut": oversize,
                "send_errors": dict(self.send_errors)}


_DOTTED_QUAD = re.compile(rb"(?<![\d.])(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})(?![\d])")


def loopback_only(data: bytes) -> bytes:
    """Without a network namespace: every valid IPv4 literal outside 127/8 and 0.0.0.0 becomes a 127.x one,
    so no mutated Via, Contact, Route or c= line makes the daemon send anywhere but this machine.
    (Host names are left alone: the daemon may look them up in DNS.)"""
    def repl(m):
        octets = [int(x) for x in m.groups()]
        if max(octets) > 255 or octets[0] == 127 or octets == [0, 0, 0, 0]:
            return m.group(0)
        return b"127." + b".".join(m.groups()[1:])
    return _DOTTED_QUAD.sub(repl, data)


def netns_argv() -> list[str] | None:
    """How to re-run this command in a new network namespace with only loopback, or None."""
    if os.environ.get("FUZZ_SIP_NETNS") == "1" or not shutil.which("unshare") or not shutil.which("ip"):
        return None
    probe = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True)
    if probe.returncode != 0:
        return None
    return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "fuzz_sip"]


def run_udp(args) -> dict:
    work = tempfile.mkdtemp(prefix="fuzz-sip-", dir=args.work_parent)
    daemon = Daemon(work, args.log_level)
    try:
        return _run_udp(args, work, daemon)
    finally:  # a harness error must not leave the daemon running
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()


def _run_udp(args, work: str, daemon: Daemon) -> dict:
    scanner = LogScanner(daemon.log_path)
    scanner.poll()
    fuzzer = UdpFuzzer(args, daemon, os.path.join(args.repro_dir, "") if args.repro_dir else None)
    # warm-up: one probe answered before measuring RSS
    fuzzer.send_probe(time.monotonic())
    while fuzzer.pending_probes():
        select.select([fuzzer.probe_sock], [], [], 0.1)
        fuzzer.service(time.monotonic())
    rss_before = rss_kib(daemon.proc.pid)
    before_lines = scanner.lines
    figures = fuzzer.run(scanner)
    # let calls the flood started end (BYEs answered, CDRs written), then look again
    settle_until = time.monotonic() + args.settle
    while time.monotonic() < settle_until:
        select.select([fuzzer.fuzz_sock, fuzzer.probe_sock], [], [], 0.2)
        fuzzer.service(time.monotonic())
    alive = daemon.alive()
    rss_after = rss_kib(daemon.proc.pid) if alive else None
    exit_code = daemon.stop()
    scanner.finish()
    cdr_files = [p for p in glob.glob(os.path.join(daemon.cdr_dir, "**", "*.json"), recursive=True)]
    log_size = os.path.getsize(daemon.log_path) if os.path.exists(daemon.log_path) else 0
    distinct: OrderedDict = OrderedDict()
    for r in scanner.bad:
        entry = distinct.setdefault(r["signature"], {"count": 0, "first": r})
        entry["count"] += 1
    lost = [p for p in fuzzer.probes.values() if p["answered"] is None]
    latencies = sorted(p["answered"] for p in fuzzer.probes.values() if p["answered"] is not None)
    tracebacks = sum(1 for r in scanner.bad if r["traceback"])
    report = {
        "mode": "udp", "seed": args.seed, "rate_target": args.rate, **figures,
        "probes_sent": fuzzer.probe_n, "probes_answered": fuzzer.answered,
        "probes_answered_after_retransmission": fuzzer.answered_late, "probes_unanswered": len(lost),
        "probe_non_200_answers": dict(fuzzer.probe_other),
        "probe_latency_ms_p50_max": [round(latencies[len(latencies) // 2] * 1000, 1),
                                     round(latencies[-1] * 1000, 1)] if latencies else None,
        "responses_to_fuzz": dict(sorted(fuzzer.responses.items())), "invites_answered": fuzzer.invites_answered,
        "daemon_alive": alive, "daemon_exit_code_on_sigterm": exit_code,
        "log_bytes": log_size, "log_lines": scanner.lines, "log_lines_during_run": scanner.lines - before_lines,
        "log_levels": dict(scanner.levels), "malformed_info_lines": scanner.malformed,
        "tracebacks": tracebacks, "critical_or_error_records": sum(1 for r in scanner.bad
                                                                    if r["level"] in ("critical", "error")),
        "distinct_bad_records": [{"count": v["count"], "record": f"[{v['first']['namespace']}#{v['first']['level']}] "
                                  f"{v['first']['text'][:200]}", "exception": v["first"]["exception"][:300],
                                  "where": v["first"]["where"][:200], "raised_at": v["first"]["raised_at"][:200]}
                                 for v in list(distinct.values())[:20]],
        "distinct_bad_total": len(distinct),
        "cdr_files": len(cdr_files), "cdr_errors": scanner.cdr_errors,
        "rss_kib_before": rss_before, "rss_kib_after": rss_after, "work_dir": work,
    }
    report["ok"] = bool(alive and not lost and not scanner.bad and exit_code == 0)
    if report["ok"] and not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
        report["work_dir"] = None
    return report


def run_replay(args) -> dict:
    """Each reproducer alone against a fresh daemon: which ones make it log a traceback or an error."""
    files = []
    for item in args.replay:
        files += sorted(f for f in glob.glob(os.path.join(item, "**", "*"), recursive=True)
                        if f.endswith((".bin", ".sip"))) if os.path.isdir(item) else [item]
    work = tempfile.mkdtemp(prefix="fuzz-sip-replay-", dir=args.work_parent)
    daemon = Daemon(work, args.log_level)
    try:
        return _run_replay(args, files, work, daemon)
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()


def _run_replay(args, files, work: str, daemon: Daemon) -> dict:
    scanner = LogScanner(daemon.log_path)
    scanner.poll()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOCAL, 0))
    culprits = []
    call_ids = {}  # Call-ID -> file: a record naming a call is that file's, however late it comes

    def attribute(records, current):
        for r in records:
            text = r["text"] + "\n".join(r["more"])
            owner = next((f for cid, f in call_ids.items() if cid and cid in text), current)
            culprits.append({"file": owner, "record": r["signature"], "exception": r["exception"]})

    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        m = CALL_ID_LINE.search(data)
        if m:
            call_ids[m.group(1).strip().decode("latin-1")[:60]] = path
        if os.environ.get("FUZZ_SIP_NETNS") != "1":
            data = loopback_only(data)
        try:
            sock.sendto(data[:65507], (LOCAL, daemon.sip_port))
        except OSError as e:
            culprits.append({"file": path, "record": f"send failed: {e}"})
            continue
        end = time.monotonic() + args.replay_wait
        new = []
        while time.monotonic() < end:
            select.select([sock], [], [], 0.05)
            try:
                while True:
                    sock.recvfrom(70000, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
            new += scanner.poll()
        attribute(new, path)
        if not daemon.alive():
            culprits.append({"file": path, "record": "the daemon died"})
            break
    # calls end later (no ACK: BYE after the timeout; RTCP BYE then): keep reading for --settle seconds
    end = time.monotonic() + args.settle
    while time.monotonic() < end:
        time.sleep(0.2)
        attribute(scanner.poll(), "(after the last file)")
    daemon.stop()
    scanner.finish()
    return {"mode": "replay", "files": len(files), "culprits": culprits, "work_dir": work,
            "ok": not culprits}


# -- output -----------------------------------------------------------------------------------


def emit(report: dict, args) -> None:
    print(json.dumps(report, indent=2, default=str))
    sys.stdout.flush()
    if args.json:
        existing = []
        if os.path.exists(args.json):
            try:
                with open(args.json) as f:
                    existing = json.load(f)
            except (OSError, ValueError):
                existing = []
        with open(args.json, "w") as f:
            json.dump(existing + [report], f, indent=2, default=str)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mode", choices=("inprocess", "udp", "both", "replay"), default="both")
    p.add_argument("--datagrams", type=int, default=10000, help="datagrams to send in udp mode (default 10000)")
    p.add_argument("--inputs", type=int, default=None, help="inputs in-process (default: --datagrams)")
    p.add_argument("--seconds", type=float, default=0, help="stop each mode after this long (0: no limit)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rate", type=float, default=1000, help="datagrams per second over UDP (default 1000)")
    p.add_argument("--probe-every", type=int, default=100, help="an OPTIONS probe every K datagrams (default 100)")
    p.add_argument("--probe-timeout", type=float, default=8.0,
                   help="seconds after which an unanswered probe counts as lost (default 8)")
    p.add_argument("--settle", type=float, default=5.0, help="seconds to wait after the flood (default 5)")
    p.add_argument("--engine", choices=("auto", "seeded", "atheris"), default="auto",
                   help="in-process engine: atheris when importable (auto), or the seeded mutator alone")
    p.add_argument("--torture-dir", default=TORTURE_DIR)
    p.add_argument("--repro-dir", default=os.path.join(tempfile.gettempdir(), "fuzz-sip-repro"))
    p.add_argument("--work-parent", default=None, help="where the daemon's work directory goes (default /tmp)")
    p.add_argument("--log-level", default="info", help="the daemon's log_level (default info, as shipped)")
    p.add_argument("--netns", choices=("auto", "yes", "no"), default="auto",
                   help="run in a new loopback-only network namespace (auto: when unshare works)")
    p.add_argument("--keep-work", action="store_true", help="keep the daemon's work directory after a clean run")
    p.add_argument("--replay", nargs="*", default=[], help="files or directories of datagrams (--mode replay)")
    p.add_argument("--replay-wait", type=float, default=0.2, help="seconds to watch the log after each file")
    p.add_argument("--json", help="append the reports (a JSON list) to this file")
    args = p.parse_args(argv)
    if args.inputs is None:
        args.inputs = args.datagrams

    if args.mode in ("udp", "both", "replay") and args.netns != "no" and os.environ.get("FUZZ_SIP_NETNS") != "1":
        prefix = netns_argv()
        if prefix is None and args.netns == "yes":
            print("cannot create a network namespace (unshare -n needs root)", file=sys.stderr)
            return 2
        if prefix is not None:
            env = dict(os.environ, FUZZ_SIP_NETNS="1")
            rest = sys.argv[1:] if argv is None else list(argv)
            return subprocess.call(prefix + [sys.executable, os.path.abspath(__file__)] + rest, env=env)
        print("note: no network namespace; the daemon may send to addresses that mutated messages name "
              "(use --netns yes where unshare works)", file=sys.stderr)

    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "seeded"
    print(f"fuzz_sip: mode {args.mode}, in-process engine {engine}, seed {args.seed}, "
          f"network namespace {'yes' if os.environ.get('FUZZ_SIP_NETNS') == '1' else 'no'}, "
          f"torture messages {len(torture_corpus(args.torture_dir))} from {args.torture_dir}", file=sys.stderr)
    ok = True
    if args.mode == "replay":
        report = run_replay(args)
        emit(report, args)
        return 0 if report["ok"] else 1
    if args.mode in ("inprocess", "both"):
        if engine == "atheris":
            if args.mode == "both":  # libFuzzer ends its process: run it in a child
                child = [sys.executable, os.path.abspath(__file__), "--mode", "inprocess", "--engine", "atheris",
                         "--inputs", str(args.inputs), "--seconds", str(args.seconds), "--seed", str(args.seed),
                         "--torture-dir", args.torture_dir, "--repro-dir", args.repro_dir]
                if args.json:
                    child += ["--json", args.json]
                ok = subprocess.call(child) == 0 and ok
            else:
                run_atheris(args)
        else:
            report = run_inprocess(args)
            emit(report, args)
            ok = ok and report["ok"]
    if args.mode in ("udp", "both"):
        report = run_udp(args)
        emit(report, args)
        ok = ok and report["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
