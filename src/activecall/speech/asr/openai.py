"""OpenAI speech-to-text: one ``POST /v1/audio/transcriptions`` per utterance (multipart, treq).

The endpoint is not streaming, so there is no ``asrDelta``: utterances are cut
by the recogniser's endpointing (webrtcvad, or the session's ``end_utterance``)
and each one is uploaded as a 16 kHz WAV when it ends; its text becomes one
``asrFinal``.  Requests run on the reactor (no thread) but stay serial per
stream, so finals arrive in utterance order.

Options: ``secretKey`` (else the environment variable ``OPENAI_API_KEY``),
``endpoint`` (base URL, default ``https://api.openai.com/v1``; anything
OpenAI-compatible works), ``modelType`` (default ``whisper-1``), ``language``
(ISO-639-1; ``auto`` or absent lets the service detect it), ``extra.prompt``,
``extra.temperature``, ``extra.timeout`` (seconds, default 30).
A BCP-47 tag such as the guide's ``zh-CN`` is sent as its ISO-639-1 language (``zh``): the
service refuses region tags.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
from twisted.internet import defer

from activecall.audio import SAMPLE_RATE, wav_bytes
from activecall.speech.asr.base import StreamingRecognizer
from activecall.speech.base import SpeechError
from activecall.speech.openai_api import api_key, api_url, error_message


DEFAULT_MODEL = "whisper-1"
MIN_UTTERANCE_MS = 100  # the service refuses shorter files


def _on_reactor(f, *args):
    return defer.maybeDeferred(f, *args)


def iso639_1(language: str) -> str:
    """``zh-CN`` / ``zh_TW`` / ``en-US`` -> ``zh`` / ``zh`` / ``en``; ``cmn`` (Mandarin) -> ``zh``."""
    primary = language.replace("_", "-").split("-", 1)[0].lower()
    return {"cmn": "zh", "yue": "zh"}.get(primary, primary)


class OpenAIRecognizer(StreamingRecognizer):
    name = "openai"
    partial_every_ms = 10 ** 9  # gather the whole utterance: the endpoint has no partial results

    def __init__(self, options, on_result, http=None, env=os.environ, **kw):
        self.key = api_key(options.secretKey, env)
        kw["run_in_thread"] = _on_reactor  # network I/O, not CPU: stay on the reactor
        super().__init__(options, on_result, **kw)
        if http is None:
            import treq as http
        self.http = http
        self.url = api_url(options.endpoint, "audio/transcriptions")
        self.model = options.modelType or DEFAULT_MODEL
        language = (options.language or "").strip()
        self.language = None if language.lower() in ("", "auto") else iso639_1(language)
        try:
            self.timeout = float(options.extra.get("timeout", 30))
        except ValueError:
            raise SpeechError(f"asr.extra.timeout: seconds expected, got {options.extra['timeout']!r}") from None
        self._audio: list[np.ndarray] = []

    # the hooks of StreamingRecognizer, called in order on the reactor
    def _begin(self) -> None:
        self._audio = []

    def _decode(self, pcm: np.ndarray) -> None:
        self._audio.append(pcm)
        return None

    def _finish(self, pcm: np.ndarray):
        self._audio.append(pcm)
        audio, self._audio = np.concatenate(self._audio), []
        if audio.size * 1000 < MIN_UTTERANCE_MS * SAMPLE_RATE:
            return None
        return self.transcribe(audio)

    def form_fields(self) -> dict:
        fields = {"model": self.model, "response_format": "json"}
        if self.language:
            fields["language"] = self.language
        for key in ("prompt", "temperature"):
            if key in self.options.extra:
                fields[key] = self.options.extra[key]
        return fields

    @defer.inlineCallbacks
    def transcribe(self, audio: np.ndarray):
        """Deferred text of one utterance (16 kHz int16)."""
        response = yield self.http.post(
            self.url,
            headers={"Authorization": f"Bearer {self.key}"},
            data=self.form_fields(),
            files={"file": ("audio.wav", "audio/wav", io.BytesIO(wav_bytes(audio)))},
            timeout=self.timeout,
        )
        body = yield response.content()
        if response.code != 200:
            raise SpeechError(f"openai transcription failed: {error_message(response.code, body)}")
        try:
            return json.loads(body)["text"].strip()
        except (ValueError, KeyError, TypeError, AttributeError):
            raise SpeechError(f"openai transcription: unexpected answer {body[:200]!r}") from None
