"""Aliyun CosyVoice text-to-speech over the DashScope WebSocket.

One socket per ``synthesize``: ``run-task`` (task ``tts``, function
``SpeechSynthesizer``, parameters ``text_type: PlainText``, ``voice``,
``format: pcm``, ``sample_rate: 16000``, ``volume``, ``rate``, ``pitch``),
then on ``task-started`` one ``continue-task`` with the text and
``finish-task``.  The service streams binary 16 kHz s16le frames while it
synthesises; each goes to the sink at once.  ``task-finished`` ends it,
``task-failed`` fails it with the service's code and message.  Cancelling
aborts the socket at once; nothing more reaches the sink.

Options: ``secretKey`` (else ``DASHSCOPE_API_KEY``), ``endpoint`` (default
``wss://dashscope.aliyuncs.com/api-ws/v1/inference``), ``model`` (default
``cosyvoice-v2``, the original's), ``speaker`` = the voice (default
``longyumi_v2``), ``speed`` → ``rate`` (0.5–2), ``volume`` 0–10 → 0–100,
``extra.pitch`` (0.5–2), ``extra.connect_timeout``.
"""

from __future__ import annotations

import os

import numpy as np
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from activecall.speech import aliyun_api as dashscope
from activecall.speech.base import ISynthesizer, OptionError, SpeechError, TtsOptions, synthesis
from activecall.speech.cloud import connect_websocket, flag, network_of, seconds

log = Logger(namespace="activecall.speech.tts.aliyun")

DEFAULT_MODEL = "cosyvoice-v2"
DEFAULT_VOICE = "longyumi_v2"


class _Task:
    """One synthesis on one socket: the handler of ``connect_websocket``.

    ``result`` fires with the sample count; cancelling it aborts the connect
    or drops the socket, and the task then ignores everything it hears.
    """

    def __init__(self, synth: "AliyunSynthesizer", text: str, sink):
        self.synth = synth
        self.text = text
        self.sink = sink
        self.task_id = dashscope.new_task_id()
        self.ws = None
        self.leftover = b""
        self.samples = 0
        self.outcome = None  # None while running; then the sample count or a SpeechError
        self.result = defer.Deferred(self.cancel)
        self.connecting = connect_websocket(synth.network, synth.url, dashscope.headers(synth.key), self,
                                            timeout=synth.connect_timeout)
        self.connecting.addCallbacks(self.opened, self.failed)

    def send(self, obj) -> None:
        import json
        self.ws.sendMessage(json.dumps(obj, ensure_ascii=False).encode("utf-8"), isBinary=False)

    def opened(self, ws) -> None:
        self.connecting = None
        self.ws = ws
        self.send(self.synth.run_task(self.task_id))

    def ws_message(self, payload: bytes, is_binary: bool) -> None:
        if self.outcome is not None or self.result.called:
            return
        if is_binary:
            data = self.leftover + payload
            cut = len(data) - len(data) % 2
            self.leftover = data[cut:]
            if cut:
                pcm = np.frombuffer(data[:cut], dtype="<i2").astype(np.int16)
                self.samples += pcm.size
                self.sink(pcm)
            return
        try:
            event, _ = dashscope.parse_event(payload)
        except SpeechError as e:
            return self.end(e)
        if event == "task-started":
            self.send(dashscope.command("continue-task", self.task_id, {"input": {"text": self.text}}))
            self.send(dashscope.command("finish-task", self.task_id, {"input": {}}))
        elif event == "task-finished":
            self.end(self.samples)

    def end(self, outcome) -> None:
        """Remember the outcome and close the socket; the Deferred fires once it is closed."""
        self.outcome = outcome
        if isinstance(outcome, SpeechError):
            self.ws.dropConnection(abort=True)
        else:
            self.ws.sendClose(1000)

    def ws_closed(self, was_clean, code, reason) -> None:
        if self.result.called:  # cancelled
            return
        outcome = self.outcome
        if outcome is None:
            outcome = SpeechError(f"aliyun tts: the service closed the connection ({code}: {reason})")
        if isinstance(outcome, SpeechError):
            self.result.errback(outcome)
        else:
            self.result.callback(outcome)

    def failed(self, failure) -> None:
        self.connecting = None
        if not self.result.called:
            self.result.errback(failure)

    def cancel(self, _) -> None:
        if self.connecting is not None:
            self.connecting.cancel()
        elif self.ws is not None:
            self.ws.dropConnection(abort=True)


@implementer(ISynthesizer)
class AliyunSynthesizer:
    name = "aliyun"

    def __init__(self, options: TtsOptions, reactor=None, network=None, env=os.environ, **_):
        self.key = dashscope.api_key(options.secretKey, env)
        self.network = network or network_of(reactor)
        self.url = dashscope.endpoint_url(options.endpoint)
        self.model = options.model or DEFAULT_MODEL
        self.voice = options.speaker or DEFAULT_VOICE
        self.rate = options.speed
        if not 0.5 <= self.rate <= 2.0:
            raise OptionError(f"tts.speed: CosyVoice takes 0.5 to 2, got {self.rate}")
        if not 0 <= options.volume <= 10:
            raise OptionError(f"tts.volume: 0 to 10 expected, got {options.volume}")
        self.volume = options.volume * 10
        self.pitch = flag(options.extra.get("pitch", "1.0"), "pitch")
        if not isinstance(self.pitch, (int, float)) or isinstance(self.pitch, bool):
            raise OptionError(f"tts.extra.pitch: a number expected, got {self.pitch!r}")
        self.connect_timeout = seconds(options.extra, "connect_timeout", 10, "tts")

    @property
    def cache_identity(self) -> tuple:
        return ("aliyun", f"{self.model}/{self.voice}/{self.volume}/{self.pitch}", self.rate)

    def run_task(self, task_id: str) -> dict:
        return dashscope.command("run-task", task_id, {
            "task_group": "audio", "task": "tts", "function": "SpeechSynthesizer", "model": self.model,
            "parameters": {"text_type": "PlainText", "voice": self.voice, "format": "pcm", "sample_rate": 16000,
                           "volume": self.volume, "rate": self.rate, "pitch": self.pitch},
            "input": {}})

    def synthesize(self, text: str, sink) -> defer.Deferred:
        return synthesis(lambda deliver: _Task(self, text, deliver).result, sink)
