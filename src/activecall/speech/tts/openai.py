"""OpenAI text-to-speech: ``POST /v1/audio/speech``, streamed as raw PCM (treq).

``response_format: "pcm"`` makes the service send 24 kHz 16-bit little-endian
mono as it synthesises; each body chunk is resampled to 16 kHz (streaming
resampler, no clicks between chunks) and pushed to the sink at once, so
playback starts with the first chunk.  Cancelling the Deferred aborts the
request or the body transfer; nothing reaches the sink afterwards.

Options: ``secretKey`` (else ``OPENAI_API_KEY``), ``endpoint`` (base URL,
default ``https://api.openai.com/v1``), ``model`` (default ``gpt-4o-mini-tts``),
``speaker`` = the voice (default ``alloy``), ``speed`` (0.25–4), and
``extra.instructions``, ``extra.timeout`` (seconds to the response headers,
default 30).
"""

from __future__ import annotations

import json
import os

import numpy as np
from twisted.internet import defer, protocol
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from zope.interface import implementer

from activecall.media.codecs import Resampler
from activecall.speech.base import SAMPLE_RATE, ISynthesizer, SpeechError, TtsOptions
from activecall.speech.openai_api import api_key, api_url, error_message


SERVICE_RATE = 24000  # the rate of response_format "pcm"
DEFAULT_MODEL = "gpt-4o-mini-tts"
DEFAULT_VOICE = "alloy"


class _PcmBody(protocol.Protocol):
    """Receives the response body: whole int16 samples, resampled, to the sink as they come."""

    def __init__(self, sink, done: defer.Deferred):
        self.sink = sink
        self.done = done
        self.resampler = Resampler(SERVICE_RATE, SAMPLE_RATE)
        self.leftover = b""
        self.skip = int(round(self.resampler.delay))  # the filter's delay: leading samples to drop
        self.samples = 0
        self.stopped = False

    def dataReceived(self, data: bytes) -> None:
        if self.stopped:
            return
        data = self.leftover + data
        cut = len(data) - len(data) % 2
        self.leftover = data[cut:]
        self._push(self.resampler(np.frombuffer(data[:cut], dtype="<i2")))

    def _push(self, pcm: np.ndarray) -> None:
        if self.skip:
            dropped = min(self.skip, pcm.size)
            pcm, self.skip = pcm[dropped:], self.skip - dropped
        if pcm.size:
            self.samples += pcm.size
            self.sink(pcm)

    def stop(self) -> None:
        """Cancelled: drop the rest and abort the connection."""
        self.stopped = True
        if self.transport is not None:
            self.transport.stopProducing()

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        if self.stopped:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            # flush the filter's delay line so the last few milliseconds are not lost
            tail = int(np.ceil(self.resampler.delay * SERVICE_RATE / SAMPLE_RATE)) + 1
            self._push(self.resampler(np.zeros(tail, dtype=np.int16)))
            self.done.callback(self.samples)
        else:
            self.done.errback(reason)


@implementer(ISynthesizer)
class OpenAISynthesizer:
    name = "openai"

    def __init__(self, options: TtsOptions, http=None, env=os.environ, **_):
        self.key = api_key(options.secretKey, env)
        if http is None:
            import treq as http
        self.http = http
        self.url = api_url(options.endpoint, "audio/speech")
        self.model = options.model or DEFAULT_MODEL
        self.voice = options.speaker or DEFAULT_VOICE
        self.speed = options.speed
        self.instructions = options.extra.get("instructions")
        try:
            self.timeout = float(options.extra.get("timeout", 30))
        except ValueError:
            raise SpeechError(f"tts.extra.timeout: seconds expected, got {options.extra['timeout']!r}") from None

    @property
    def cache_identity(self) -> tuple:
        """What changes the audio, for the TTS cache key."""
        return ("openai", f"{self.model}/{self.voice}/{self.instructions or ''}", self.speed)

    def request_body(self, text: str) -> dict:
        body = {"model": self.model, "input": text, "voice": self.voice, "response_format": "pcm"}
        if self.speed != 1.0:
            body["speed"] = self.speed
        if self.instructions:
            body["instructions"] = self.instructions
        return body

    def synthesize(self, text: str, sink) -> defer.Deferred:
        state = {"request": None, "body": None, "cancelled": False}

        def cancel(_):
            state["cancelled"] = True
            if state["body"] is not None:
                state["body"].stop()
            elif state["request"] is not None:
                state["request"].cancel()

        result = defer.Deferred(cancel)

        def got_response(response):
            if state["cancelled"]:
                return None
            if response.code != 200:
                return response.content().addCallback(lambda body: defer.fail(SpeechError(
                    f"openai speech failed: {error_message(response.code, body)}")))
            done = defer.Deferred()
            state["body"] = _PcmBody(sink, done)
            response.deliverBody(state["body"])
            return done

        def finished(samples):
            if not state["cancelled"]:
                result.callback(samples)

        def failed(f):
            if not state["cancelled"]:
                result.errback(f)

        request = self.http.post(
            self.url,
            headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"},
            data=json.dumps(self.request_body(text)).encode("utf-8"),
            timeout=self.timeout,
        )
        state["request"] = request
        request.addCallback(got_response).addCallbacks(finished, failed)
        return result
