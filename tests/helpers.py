"""Test helpers: run the real daemon (or another program) as a subprocess and
wait on its output with Deferreds, free ports, temporary configs."""

from __future__ import annotations

import os
import re
import socket
import sys

from twisted.internet import defer, error, protocol, reactor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
TWISTD = os.path.join(BIN, "twistd")

#: The least time any wait in the tests allows (seconds).  A wait's bound only turns a hang into a
#: failure with a message; it is never a speed requirement, so it is generous: two loaded cores running
#: a browser, sipp and several daemons can take seconds for what takes milliseconds alone.  Speed is
#: measured in bench/, not here.
MIN_WAIT = 30.0


def generous(timeout: float) -> float:
    """``timeout``, raised to ``MIN_WAIT``: the bound for a wait on an event."""
    return max(float(timeout), MIN_WAIT)


def loud_ms(pcm, level: float = 300.0, frame: int = 320) -> int:
    """Milliseconds of sound in 16 kHz ``pcm``: 20 ms frames whose RMS is above ``level``.

    What a test can ask of audio that went through a real-time path (a browser's capture, RTP paced by
    sipp or baresip, the recorder): its timing, and so its words to a recogniser, differ from run to
    run, but the amount of sound in it does not drop below a fair share of what was sent."""
    import numpy as np

    pcm = np.asarray(pcm)
    usable = pcm[: pcm.size - pcm.size % frame].astype(np.float64).reshape(-1, frame)
    return int((np.sqrt((usable ** 2).mean(axis=1)) > level).sum()) * frame * 1000 // 16000


def free_port(kind=socket.SOCK_STREAM, host="127.0.0.1") -> int:
    """A port that is free right now on ``host`` for both TCP and UDP."""
    while True:
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        other = socket.SOCK_DGRAM if kind == socket.SOCK_STREAM else socket.SOCK_STREAM
        try:
            with socket.socket(socket.AF_INET, other) as s:
                s.bind((host, port))
            return port
        except OSError:
            continue


def free_ports(count: int, host="127.0.0.1", exclude=()) -> list[int]:
    """``count`` different ports, each free right now for both TCP and UDP on ``host``.

    They are held while the others are picked, so no two are the same; give every listener of a daemon
    one of them rather than ``:0``, which the kernel may hand a port that was just picked here.
    """
    held, ports = [], []
    try:
        while len(ports) < count:
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.bind((host, 0))
            port = tcp.getsockname()[1]
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                if port in exclude:
                    raise OSError("excluded")
                udp.bind((host, port))
            except OSError:
                tcp.close()
                udp.close()
                continue
            held += [tcp, udp]
            ports.append(port)
    finally:
        for s in held:
            s.close()
    return ports


class OutputWatcher(protocol.ProcessProtocol):
    """Collects a child's output; ``wait_for(regex)`` fires with the match."""

    def __init__(self, echo=False):
        self.output = ""
        self.ended = defer.Deferred()
        self.exit_code = None
        self._waiters: list[tuple[re.Pattern, defer.Deferred]] = []
        self.echo = echo

    def outReceived(self, data: bytes):
        text = data.decode("utf-8", "replace")
        if self.echo:
            sys.stderr.write(text)
        self.output += text
        for pattern, d in list(self._waiters):
            m = pattern.search(self.output)
            if m:
                self._waiters.remove((pattern, d))
                d.callback(m)

    errReceived = outReceived

    def wait_for(self, regex: str, timeout: float = MIN_WAIT) -> defer.Deferred:
        timeout = generous(timeout)
        pattern = re.compile(regex)
        m = pattern.search(self.output)
        if m:
            return defer.succeed(m)
        d = defer.Deferred()
        self._waiters.append((pattern, d))

        def on_timeout(result, _timeout):
            raise AssertionError(f"timed out waiting for {regex!r}; output so far:\n{self.output}")

        d.addTimeout(timeout, reactor, onTimeoutCancel=on_timeout)
        return d

    def processEnded(self, reason):
        self.exit_code = reason.value.exitCode
        for pattern, d in self._waiters:
            if not d.called:
                d.errback(AssertionError(
                    f"process ended (exit {self.exit_code}) before {pattern.pattern!r}:\n{self.output}"))
        self._waiters = []
        self.ended.callback(self.exit_code)

    def signal(self, name="TERM"):
        if self.exit_code is None:
            try:
                self.transport.signalProcess(name)
            except error.ProcessExitedAlready:
                pass

    def kill(self):
        """Cleanup: SIGKILL if still running; fires when the process is gone."""
        self.signal("KILL")
        return self.ended if not self.ended.called else None


def spawn(argv, env=None, path=None, echo=False) -> OutputWatcher:
    watcher = OutputWatcher(echo=echo)
    full_env = dict(os.environ)
    full_env.update(env or {})
    reactor.spawnProcess(watcher, argv[0], argv, env=full_env, path=path or ROOT)
    return watcher


def spawn_daemon(testcase, conf_path=None, *flags, reactor_name="asyncio") -> OutputWatcher:
    """Start ``twistd -n activecall`` and make sure the test cleans it up."""
    argv = [TWISTD, "--nodaemon", "--pidfile=", f"--reactor={reactor_name}", "activecall"]
    if conf_path:
        argv += ["--conf", conf_path]
    argv += list(flags)
    watcher = spawn(argv)

    testcase.addCleanup(watcher.kill)
    return watcher


def write_config(testcase, text: str) -> str:
    path = os.path.abspath(testcase.mktemp() + ".toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def loopback_config(testcase, root: str, http_port: int, rtp_ports: int = 20, sip_port: int = 0) -> str:
    """The usual daemon for an end-to-end test: SIP on a free loopback UDP port (``sip_port`` if given), no
    TCP, HTTP on ``http_port``, ``rtp_ports`` RTP ports from a free even one, cache and recordings under
    ``root``.  Returns the config's path."""
    base = free_port() // 2 * 2
    return write_config(testcase, f'''
addr = "127.0.0.1"
udp_port = {sip_port or free_port(socket.SOCK_DGRAM)}
tcp_port = 0
http_addr = "127.0.0.1:{http_port}"
rtp_start_port = {base}
rtp_end_port = {base + rtp_ports}
media_cache_path = "{root}/cache"
[recording]
path = "{root}/rec"
''')


@defer.inlineCallbacks
def speak_into_call(proto, text):
    """``text`` spoken by flite into a ``/call`` WebSocket as 16 kHz PCM frames, as fast as the socket
    takes them: 0.5 s of silence before it and 2 s after, so the VAD and the recogniser end the turn."""
    import numpy as np

    from activecall.speech.testing import synthesize_pcm

    speech = yield synthesize_pcm(text)
    silence = np.zeros(16000, dtype=np.int16)
    audio = np.concatenate([silence[:8000], speech, silence, silence])
    for i in range(0, audio.size, 320):
        proto.sendMessage(audio[i:i + 320].astype("<i2").tobytes(), isBinary=True)
