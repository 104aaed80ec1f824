"""flite (Debian package ``flite``): the offline default TTS.

Chosen by intelligibility, measured with pocketsphinx (docs/speech.md): the
``rms`` and ``kal16`` voices come back with a word error rate of about 0.02,
espeak-ng's en-us about 0.6.  English only.

One ``flite`` process per sentence, started with ``reactor.spawnProcess``
(never blocking), writing a WAV to its stdout; each sentence's audio is pushed
to the sink as soon as its process exits, so the first sentence plays while
the rest is synthesised.  Cancelling the Deferred kills the running process
and stops at once.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Optional

import numpy as np
from twisted.internet import defer, error, protocol
from twisted.logger import Logger
from zope.interface import implementer

from activecall.audio import SAMPLE_RATE, WavError, parse_wav_header, resample
from activecall.speech.base import ISynthesizer, SpeechError, TtsOptions, synthesis
from activecall.speech.tts.sentences import split_sentences

log = Logger(namespace="activecall.speech.tts.flite")

VOICES = ("rms", "kal16", "slt", "awb", "kal", "awb_time")
DEFAULT_VOICE = "rms"
CHUNK = 1600  # 100 ms at 16 kHz


class _FliteProcess(protocol.ProcessProtocol):
    """Collects one flite run's stdout; ``done`` fires with the WAV bytes once the process has ended.

    ``wav`` fires with the same outcome, but cancelling it kills the process
    at once (``done`` still fires when the killed process is reaped).
    """

    def __init__(self):
        self.done = defer.Deferred()
        self.wav = defer.Deferred(self._kill)
        self._out: list[bytes] = []
        self._err: list[bytes] = []

    def _kill(self, _) -> None:
        try:
            self.transport.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass

    def outReceived(self, data: bytes) -> None:
        self._out.append(data)

    def errReceived(self, data: bytes) -> None:
        self._err.append(data)

    def processEnded(self, reason) -> None:
        pending = [d for d in (self.done, self.wav) if not d.called]
        if reason.check(error.ProcessDone):
            for d in pending:
                d.callback(b"".join(self._out))
        else:
            err = b"".join(self._err).decode("utf-8", "replace").strip()
            for d in pending:
                d.errback(SpeechError(f"flite failed ({reason.value}): {err or 'no message'}"))


def decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Mono int16 samples and rate of a complete 16-bit WAV."""
    try:
        fmt = parse_wav_header(data)
    except WavError as e:
        raise SpeechError(f"flite wrote no usable WAV: {e}") from None
    if fmt is None:
        raise SpeechError("flite wrote a truncated WAV")
    end = fmt.data_offset + fmt.data_size if 0 < fmt.data_size < 0xFFFFFFFF else len(data)
    raw = data[fmt.data_offset:end]
    pcm = np.frombuffer(raw[: len(raw) - len(raw) % 2], dtype="<i2")
    if fmt.channels > 1:
        pcm = pcm[: pcm.size - pcm.size % fmt.channels].reshape(-1, fmt.channels).mean(axis=1)
    return pcm.astype(np.int16), fmt.sample_rate


_FOUND: dict[str, tuple[float, str]] = {}
_RECHECK = 10.0  # seconds a found program is trusted without looking at it again


def _which(name: str) -> Optional[str]:
    """``shutil.which``, remembered once found: a synthesiser is made per call, and a PATH scan (or
    even one ``access`` check) per call showed in a playbook call's profile (docs/benchmarks.md).
    A program found is checked again after ``_RECHECK`` seconds; one not found yet is looked for every time."""
    now = time.monotonic()
    known = _FOUND.get(name)
    if known is not None and now - known[0] < _RECHECK:
        return known[1]
    path = known[1] if known is not None and os.access(known[1], os.X_OK) else shutil.which(name)
    if path:
        _FOUND[name] = (now, path)
    else:
        _FOUND.pop(name, None)
    return path


@implementer(ISynthesizer)
class FliteSynthesizer:
    name = "flite"

    def __init__(self, options: TtsOptions, reactor=None, executable: Optional[str] = None):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.executable = executable or _which("flite")
        if not self.executable:
            raise SpeechError("tts provider 'flite' needs the flite program (Debian: apt-get install flite)")
        self.voice = options.speaker or DEFAULT_VOICE
        if self.voice not in VOICES and not os.path.exists(self.voice):
            raise SpeechError(f"tts.speaker: flite has no voice {self.voice!r}; voices: {', '.join(VOICES)}")
        self.speed = options.speed
        self.processes_spawned = 0  # for tests and metrics: the cache must keep this at 0

    @property
    def cache_identity(self) -> tuple:
        """What changes the audio, for the TTS cache key."""
        return ("flite", self.voice, self.speed)

    def _argv(self, sentence: str) -> list[str]:
        argv = [self.executable, "-voice", self.voice]
        if self.speed != 1.0:
            argv += ["--setf", f"duration_stretch={1.0 / self.speed:.3f}"]
        return argv + ["-t", sentence, "-o", "/dev/stdout"]

    def _run_flite(self, sentence: str) -> defer.Deferred:
        """One flite process for ``sentence``: a Deferred of its WAV; cancelling it kills the process."""
        proto = _FliteProcess()
        transport = self.reactor.spawnProcess(
            proto, self.executable, self._argv(sentence), env={"PATH": os.environ.get("PATH", "")},
            childFDs={0: "w", 1: "r", 2: "r"})
        self.processes_spawned += 1
        transport.closeStdin()
        proto.done.addErrback(lambda _: None)  # the outcome travels through proto.wav (a kill fails done, too)
        return proto.wav

    def _to_16k(self, pcm: np.ndarray, rate: int) -> np.ndarray:
        return resample(pcm, rate, SAMPLE_RATE)

    def synthesize(self, text: str, sink) -> defer.Deferred:
        @defer.inlineCallbacks
        def run(deliver):
            samples = 0
            for sentence in split_sentences(text):
                wav = yield self._run_flite(sentence)
                pcm, rate = decode_wav(wav)
                pcm = self._to_16k(pcm, rate)
                for i in range(0, pcm.size, CHUNK):
                    deliver(pcm[i:i + CHUNK])
                samples += pcm.size
            return samples

        return synthesis(run, sink)
