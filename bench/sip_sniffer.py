"""A loopback SIP timestamp recorder for the benchmarks (Linux, needs root or CAP_NET_RAW).

sipp's own response-time figures (``-trace_rtt``) are quantised to the kernel tick (4 ms
here), too coarse for a median of a few milliseconds.  This records the *kernel* receive
timestamp (SO_TIMESTAMPNS) of every INVITE and of the 200 OK that answers it, per
Call-ID, from an AF_PACKET socket on ``lo``: the figures do not depend on when sipp or
this thread got scheduled, only on when the packets crossed the loopback interface.

Used from a thread of the benchmark driver: ``SipSniffer(port).start()`` ... ``.stop()``.
"""

from __future__ import annotations

import socket
import struct
import threading

ETH_P_IP = 0x0800
SO_TIMESTAMPNS = 35
PACKET_OUTGOING = 4


class SipSniffer(threading.Thread):
    """INVITE and 200-to-INVITE times for SIP over UDP to/from ``port`` on 127.0.0.1."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port = port
        self.invites: dict[bytes, float] = {}  # Call-ID -> first INVITE seen
        self.invite_retransmissions = 0
        self.oks: dict[bytes, float] = {}  # Call-ID -> first 200 OK (CSeq INVITE)
        self.errors: dict[int, int] = {}  # final non-2xx INVITE responses by status
        self.packets = 0
        self._halt = threading.Event()
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024 * 1024)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.bind(("lo", ETH_P_IP))
        self.sock.settimeout(0.2)

    def reset(self) -> None:
        self.invites, self.oks, self.errors = {}, {}, {}
        self.invite_retransmissions = 0

    def stop(self) -> None:
        self._halt.set()
        self.join(2)
        self.sock.close()

    def run(self) -> None:
        port = self.port
        while not self._halt.is_set():
            try:
                data, anc, _flags, addr = self.sock.recvmsg(65535, 64)
            except socket.timeout:
                continue
            except OSError:
                return
            if addr[2] == PACKET_OUTGOING or len(data) < 28 or data[9] != 17:
                continue
            ihl = (data[0] & 0x0F) * 4
            sport, dport = struct.unpack_from("!HH", data, ihl)
            if sport != port and dport != port:
                continue
            stamp = None
            for level, kind, value in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", value[:16])
                    stamp = sec + nsec * 1e-9
            if stamp is None:
                continue
            self.packets += 1
            self._sip(data[ihl + 8:], stamp, to_target=dport == port)

    def _sip(self, payload: bytes, stamp: float, to_target: bool) -> None:
        head = payload[:payload.find(b"\r\n\r\n")]
        call_id = cseq = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name in (b"call-id", b"i"):
                call_id = value.strip()
            elif name == b"cseq":
                cseq = value.strip()
        if call_id is None:
            return
        if to_target and payload.startswith(b"INVITE "):
            if call_id in self.invites:
                self.invite_retransmissions += 1
            else:
                self.invites[call_id] = stamp
        elif not to_target and payload.startswith(b"SIP/2.0 ") and cseq and cseq.endswith(b"INVITE"):
            status = int(payload[8:11])
            if status == 200:
                self.oks.setdefault(call_id, stamp)
            elif status >= 300:
                self.errors[status] = self.errors.get(status, 0) + 1

    def setup_times(self) -> list[float]:
        """INVITE -> 200 OK, seconds, one per answered call."""
        return [ok - self.invites[cid] for cid, ok in self.oks.items() if cid in self.invites]
