"""A small pool of ASR worker processes shared by every call (``speech/asr/worker.py``).

Why processes: pocketsphinx holds the GIL while it loads a model and decodes,
so a thread of the daemon stalled the reactor and the 20 ms media clock
(bench/bench_reactor_stall.py).  The pool holds at most one worker per CPU,
started lazily; each stream is pinned to one worker (the least loaded; a new
one is spawned while there is room and every live worker already has a stream).
Requests are pipelined: a stream's frames go out as audio arrives and the
replies come back in order.

A worker that dies fails only the utterances it was decoding: each affected
stream logs one error and its next utterance opens on a fresh worker.
``stop()`` closes every worker's stdin (they finish what they hold and exit),
kills those still alive after ``stop_timeout`` and fires once all were reaped.
The daemon stops the default pool from ``PoolService``; a ``during shutdown``
trigger kills any worker still alive as a last resort.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from collections import deque
from typing import Optional

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.logger import Logger

from activecall.speech.asr import frames as fr
from activecall.speech.base import SpeechError

log = Logger(namespace="activecall.speech.asr")

WORKER_MODULE = "activecall.speech.asr.worker"


class WorkerDied(SpeechError):
    """The worker holding a stream exited before answering."""


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _worker_env() -> dict:
    """The daemon's environment, with our package importable even from a source checkout."""
    env = dict(os.environ)
    src = os.path.dirname(os.path.dirname(os.path.abspath(sys.modules["activecall"].__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


class Worker(protocol.ProcessProtocol):
    """One worker process: writes request frames, matches replies to requests by order."""

    def __init__(self, pool: "WorkerPool"):
        self.pool = pool
        self.pid: Optional[int] = None
        self.streams: set = set()  # WorkerStreams pinned here
        self.dead = False
        self.exit_reason = ""
        self.ended = defer.Deferred()  # fires (None) once the process was reaped
        self._pending: deque = deque()  # (stream id, Deferred) in request order
        self._frames = fr.FrameDecoder()
        self._stderr = b""

    def connectionMade(self):
        self.pid = self.transport.pid

    def request(self, kind: bytes, stream: int, payload: bytes = b"") -> defer.Deferred:
        if self.dead:
            return defer.fail(WorkerDied(f"asr worker pid {self.pid} has exited ({self.exit_reason})"))
        d = defer.Deferred()
        self._pending.append((stream, d))
        self.transport.write(fr.encode(kind, stream, payload))
        return d

    def outReceived(self, data: bytes):
        try:
            replies = self._frames.feed(data)
        except fr.FrameError as e:
            return self._protocol_error(str(e))
        for kind, stream, payload in replies:
            if not self._pending:
                return self._protocol_error(f"a reply with nothing asked (kind {kind!r})")
            expected, d = self._pending.popleft()
            if stream != expected or kind not in (fr.TEXT, fr.ERROR):
                return self._protocol_error(f"reply {kind!r} for stream {stream}, expected stream {expected}")
            text = payload.decode("utf-8", "replace")
            if kind == fr.TEXT:
                d.callback(text)
            else:
                d.errback(SpeechError(f"asr worker pid {self.pid}: {text}"))

    def _protocol_error(self, why: str) -> None:
        log.error("asr worker pid {pid} broke the frame protocol ({why}); killing it", pid=self.pid, why=why)
        self.kill()

    def errReceived(self, data: bytes):
        self._stderr += data
        *lines, self._stderr = self._stderr.split(b"\n")
        for line in lines:
            if line.strip():
                log.warn("asr worker pid {pid}: {line}", pid=self.pid, line=line.decode("utf-8", "replace"))

    def kill(self) -> None:
        try:
            self.transport.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass

    def processEnded(self, reason):
        self.dead = True
        value = reason.value
        if isinstance(value, error.ProcessTerminated) and value.signal is not None:
            self.exit_reason = f"signal {value.signal}"
        else:
            self.exit_reason = f"exit code {getattr(value, 'exitCode', None)}"
        self.pool._ended(self)
        pending, self._pending = self._pending, deque()
        died = WorkerDied(f"asr worker pid {self.pid} exited ({self.exit_reason})")
        for _, d in pending:
            d.errback(died)
        self.ended.callback(None)


class WorkerStream:
    """One recogniser's stream on the pool: open on first use, pinned to one worker.

    Every method returns a Deferred firing with the reply text, or None when
    the request could not be answered; such failures are logged here, once per
    utterance, so the recogniser only sees "no text".
    """

    def __init__(self, pool: "WorkerPool", options: dict, name: str = "asr"):
        self.pool = pool
        self.options = options
        self.name = name
        self.id = next(pool._ids)
        self.worker: Optional[Worker] = None
        self.utterance: Optional[int] = None
        self._broken = False  # a request of the current utterance failed (already logged)
        self.on_error = None  # callable(message): the recogniser's owner hears of a lost utterance

    def open(self) -> None:
        """Take a worker and a decoder now (spawning or loading one if need be), not at the first utterance:
        a call opens its stream when its recogniser is made, so the caller's first words (often a barge-in
        over the greeting) do not wait for a worker process to start or a model to load."""
        if self.worker is None or self.worker.dead:
            self._broken = False
            self.worker = self.pool._assign(self)
            self._send(fr.OPEN, json.dumps(self.options).encode())

    def begin(self, utterance: int) -> defer.Deferred:
        self.utterance = utterance
        self._broken = False
        self.open()
        return self._send(fr.BEGIN)

    def audio(self, pcm: bytes) -> defer.Deferred:
        return self._send(fr.AUDIO, pcm)

    def end(self, pcm: bytes) -> defer.Deferred:
        return self._send(fr.END, pcm)

    def close(self) -> defer.Deferred:
        """Give the decoder back to the worker; fires once it answered (or at once)."""
        worker, self.worker = self.worker, None
        if worker is None or worker.dead:
            return defer.succeed(None)
        worker.streams.discard(self)
        return worker.request(fr.CLOSE, self.id).addErrback(lambda _: None).addCallback(lambda _: None)

    def _send(self, kind: bytes, payload: bytes = b"") -> defer.Deferred:
        if self.worker is None or self._broken:
            return defer.succeed(None)
        return self.worker.request(kind, self.id, payload).addErrback(self._failed, kind)

    def _failed(self, failure, kind: bytes) -> None:
        if kind == fr.OPEN and self.worker is not None and not failure.check(WorkerDied):
            self.worker.streams.discard(self)
            self.worker = None  # e.g. a bad model path: the next utterance tries (and reports) again
        if not self._broken:
            self._broken = True
            if failure.check(WorkerDied):
                self.worker = None  # the next utterance opens on a live worker
                log.error("{name}: {why}; utterance {index} is lost, the next one goes to a new worker",
                          name=self.name, why=failure.getErrorMessage(), index=self.utterance)
            else:
                log.error("{name}: utterance {index} failed: {why}", name=self.name, index=self.utterance,
                          why=failure.getErrorMessage())
            if self.on_error is not None:
                try:
                    self.on_error(f"{self.name}: utterance {self.utterance} failed: {failure.getErrorMessage()}")
                except Exception:
                    log.failure("ASR error handler failed")
        return None


class WorkerPool:
    """At most ``size`` worker processes (default: one per CPU), spawned on demand."""

    def __init__(self, size: Optional[int] = None, reactor=None, argv: Optional[list] = None,
                 stop_timeout: float = 5.0):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.size = max(1, size or cpu_count())
        self.argv = argv or [sys.executable, "-m", WORKER_MODULE]
        self.stop_timeout = stop_timeout
        self.workers: list[Worker] = []
        self._ids = itertools.count(1)
        self._stopping = False
        self._trigger = None

    def stream(self, options: dict, name: str = "asr") -> WorkerStream:
        return WorkerStream(self, options, name)

    def _assign(self, stream: WorkerStream) -> Worker:
        live = [w for w in self.workers if not w.dead]
        best = min(live, key=lambda w: len(w.streams), default=None)
        if best is None or (best.streams and len(live) < self.size):
            best = self._spawn()
        best.streams.add(stream)
        return best

    def _spawn(self) -> Worker:
        worker = Worker(self)
        self.reactor.spawnProcess(worker, self.argv[0], self.argv, env=_worker_env())
        self.workers.append(worker)
        if self._trigger is None:
            self._trigger = self.reactor.addSystemEventTrigger("during", "shutdown", self.kill_all)
        log.info("asr worker pid {pid} started ({n} of at most {size})", pid=worker.pid,
                 n=len(self.workers), size=self.size)
        return worker

    def _ended(self, worker: Worker) -> None:
        if worker in self.workers:
            self.workers.remove(worker)
        if not self._stopping:
            log.error("asr worker pid {pid} exited unexpectedly ({why}); {n} stream(s) were on it",
                      pid=worker.pid, why=worker.exit_reason, n=len(worker.streams))
        worker.streams.clear()  # their next request fails once (logged), their next utterance re-opens

    def stop(self) -> defer.Deferred:
        """Close every worker's stdin, kill stragglers after ``stop_timeout``; fires when all are reaped."""
        workers = list(self.workers)
        if not workers:
            return defer.succeed(None)
        self._stopping = True
        timer = self.reactor.callLater(self.stop_timeout, self.kill_all)
        for worker in workers:
            try:
                worker.transport.closeStdin()
            except Exception:
                worker.kill()

        def done(_):
            if timer.active():
                timer.cancel()
            self._stopping = False
            if self._trigger is not None and not self.workers:
                self.reactor.removeSystemEventTrigger(self._trigger)
                self._trigger = None
            return None

        return defer.DeferredList([w.ended for w in workers]).addCallback(done)

    def kill_all(self) -> None:
        """SIGKILL every worker still running (the last resort at reactor shutdown)."""
        self._stopping = True
        for worker in list(self.workers):
            worker.kill()


_default: Optional[WorkerPool] = None


def default_pool() -> WorkerPool:
    """The pool shared by every call of this process."""
    global _default
    if _default is None:
        _default = WorkerPool()
    return _default


class PoolService(service.Service):
    """Stops the default pool's workers when the daemon stops (added first, so it stops last)."""

    name = "asr-workers"

    def stopService(self):
        super().stopService()
        if _default is not None:
            return _default.stop()
        return None
