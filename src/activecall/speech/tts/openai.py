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

from twisted.internet import defer
from zope.interface import implementer

from activecall.speech.base import ISynthesizer, SpeechError, TtsOptions
from activecall.speech.cloud import post_streaming_pcm
from activecall.speech.openai_api import From24k, api_key, api_url, error_message


DEFAULT_MODEL = "gpt-4o-mini-tts"
DEFAULT_VOICE = "alloy"


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
        return post_streaming_pcm(
            self.http, self.url,
            {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"},
            json.dumps(self.request_body(text)).encode("utf-8"), sink,
            lambda status, body: f"openai speech failed: {error_message(status, body)}",
            convert=From24k(), timeout=self.timeout)
