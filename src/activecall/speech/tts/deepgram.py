"""Deepgram text-to-speech: ``POST /v1/speak`` (Aura voices), the body streamed as raw 16 kHz PCM (treq).

The query asks for ``encoding=linear16&sample_rate=16000&container=none``, so
the body is exactly the samples we play; they reach the sink as they arrive
(a WAV header, should a server send one anyway, is skipped).  Texts longer
than Deepgram's 2000-character limit go out as several requests, whole
sentences each, one after the other.  Cancelling aborts the request or the
transfer at once.

Options: ``secretKey`` (else ``DEEPGRAM_API_KEY``), ``endpoint`` (base URL,
default ``https://api.deepgram.com``), ``speaker`` = the Aura model, sent as
the ``model`` query parameter as the original does (else ``model``, default
``aura-asteria-en``), ``extra.timeout`` (seconds to the response headers,
default 30).  ``speed`` and ``volume`` have no Deepgram equivalent and are
ignored.
"""

from __future__ import annotations

import json
import os
from urllib.parse import urlencode

from twisted.internet import defer
from zope.interface import implementer

from activecall.speech.base import ISynthesizer, TtsOptions, synthesis
from activecall.speech.cloud import credential, json_error_text, post_streaming_pcm, seconds
from activecall.speech.tts.sentences import split_sentences

DEFAULT_ENDPOINT = "https://api.deepgram.com"
DEFAULT_MODEL = "aura-asteria-en"
MAX_CHARS = 2000


def text_parts(text: str, limit: int = MAX_CHARS) -> list[str]:
    """Whole sentences packed into requests of at most ``limit`` characters."""
    parts: list[str] = []
    for sentence in split_sentences(text, limit):
        if parts and len(parts[-1]) + 1 + len(sentence) <= limit:
            parts[-1] += " " + sentence
        else:
            parts.append(sentence)
    return parts


@implementer(ISynthesizer)
class DeepgramSynthesizer:
    name = "deepgram"

    def __init__(self, options: TtsOptions, http=None, env=os.environ, **_):
        self.key = credential(options.secretKey, "DEEPGRAM_API_KEY", "secretKey", "deepgram", env)
        if http is None:
            import treq as http
        self.http = http
        self.base = (options.endpoint or DEFAULT_ENDPOINT).rstrip("/")
        self.model = options.speaker or options.model or DEFAULT_MODEL
        self.timeout = seconds(options.extra, "timeout", 30, "tts")

    @property
    def cache_identity(self) -> tuple:
        return ("deepgram", self.model, 1.0)

    @property
    def url(self) -> str:
        query = {"model": self.model, "encoding": "linear16", "sample_rate": "16000", "container": "none"}
        return f"{self.base}/v1/speak?{urlencode(query)}"

    def synthesize(self, text: str, sink) -> defer.Deferred:
        @defer.inlineCallbacks
        def run(deliver):
            samples = 0
            for part in text_parts(text):
                samples += yield post_streaming_pcm(
                    self.http, self.url,
                    {"Authorization": f"Token {self.key}", "Content-Type": "application/json"},
                    json.dumps({"text": part}).encode("utf-8"), deliver,
                    lambda status, body: "deepgram speak failed: " + json_error_text(
                        status, body, "err_msg", "reason", "message"),
                    timeout=self.timeout)
            return samples

        return synthesis(run, sink)
