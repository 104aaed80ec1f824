"""RTP generator and sink for bench/bench_rtp_legs.py (a separate process, raw sockets, no reactor).

Reads one JSON line from stdin: ``{"targets": [[host, port], ...], "seconds": S, "streams_per_target": k}``
(and optionally ``"skip_seconds"``: arrivals in the first seconds are not analysed) (after printing ``PORT <n>`` for the socket it sends from and receives on).  For every stream it
sends one 20 ms PCMU packet (160 bytes, PT 0, its own SSRC) per 20 ms on absolute deadlines, for
``seconds``.  Every RTP packet that comes back is recorded with its *kernel* arrival time
(SO_TIMESTAMPNS), its SSRC and sequence number, so the analysis does not depend on when this
process got scheduled.  At the end it prints one JSON line of figures:

- per received SSRC stream: lateness of each packet against that stream's ideal 20 ms schedule
  (anchor = the earliest packet relative to ``seq * 20 ms``, so lateness >= 0), and packets missing
  by sequence number inside the window;
- how many packets were sent, and how late the sends themselves were (this process's own pacing).
"""

from __future__ import annotations

import json
import select
import socket
import struct
import sys
import time

import numpy as np

SO_TIMESTAMPNS = 35
FRAME = 0.020
PAYLOAD = b"\xff" * 160  # PCMU silence-ish (0xff = 0 in u-law)


def main():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024 * 1024)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024 * 1024)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    job = json.loads(sys.stdin.readline())
    targets = [tuple(t) for t in job["targets"]]
    per_target = int(job.get("streams_per_target", 1))
    seconds = float(job["seconds"])
    skip = float(job.get("skip_seconds", 0.0))  # arrivals before start + skip are not analysed (warm-up)
    streams = [(t, 0x10000000 + i * per_target + k) for i, t in enumerate(targets) for k in range(per_target)]
    headers = [struct.pack("!BB", 0x80, 0) for _ in streams]

    arrivals = []  # (ssrc, seq, t)
    sent = 0
    send_late = []
    start = time.time() + 0.1
    n = 0
    end = start + seconds
    recv = sock.recvmsg
    while True:
        now = time.time()
        if now >= end:
            break
        deadline = start + n * FRAME
        if now >= deadline:
            send_late.append(now - deadline)
            seq = n & 0xFFFF
            ts = (n * 160) & 0xFFFFFFFF
            for (addr, ssrc), head in zip(streams, headers):
                try:
                    sock.sendto(head + struct.pack("!HII", seq, ts, ssrc) + PAYLOAD, addr)
                    sent += 1
                except BlockingIOError:
                    pass
            n += 1
            continue
        select.select([sock], [], [], max(0.0, deadline - now))
        while True:
            try:
                data, anc, _f, _a = recv(2048, 64)
            except BlockingIOError:
                break
            if len(data) < 12 or data[0] >> 6 != 2 or 72 <= (data[1] & 0x7F) <= 79:
                continue  # not RTP, or RTCP
            stamp = None
            for level, kind, value in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", value[:16])
                    stamp = sec + nsec * 1e-9
            seq, _ts, ssrc = struct.unpack_from("!HII", data, 2)
            arrivals.append((ssrc, seq, stamp if stamp is not None else time.time()))
    arrivals = [a for a in arrivals if a[2] >= start + skip]
    print(json.dumps(analyse(arrivals, sent, send_late, start, end)), flush=True)


def analyse(arrivals, sent, send_late, start, end):
    out = {"sent": sent, "received": len(arrivals),
           "send_late_p99_ms": float(np.percentile(send_late, 99) * 1000) if send_late else None,
           "send_late_max_ms": float(max(send_late) * 1000) if send_late else None}
    if not arrivals:
        return out
    a = np.array(arrivals, dtype=[("ssrc", "u8"), ("seq", "i8"), ("t", "f8")])
    a = a[np.argsort(a, order=("ssrc", "t"), kind="stable")]
    lateness, missing, streams = [], 0, 0
    gaps = []
    bounds = np.flatnonzero(np.diff(a["ssrc"])) + 1
    for part in np.split(a, bounds):
        if part.size < 10:
            continue
        streams += 1
        step = np.diff(part["seq"]) % 65536
        step[step > 32768] -= 65536
        idx = np.concatenate([[0], np.cumsum(step)])
        ideal = part["t"] - idx * FRAME
        late = ideal - ideal.min()
        lateness.append(late)
        missing += int(idx.max() - idx.min() + 1 - np.unique(idx).size)
        gaps.append(np.diff(part["t"]))
    late = np.concatenate(lateness) * 1000
    gap = np.concatenate(gaps) * 1000
    out.update(streams=streams, missing=missing,
               late_p50_ms=float(np.percentile(late, 50)), late_p99_ms=float(np.percentile(late, 99)),
               late_max_ms=float(late.max()),
               gap_p01_ms=float(np.percentile(gap, 1)), gap_p99_ms=float(np.percentile(gap, 99)))
    return out


if __name__ == "__main__":
    main()
