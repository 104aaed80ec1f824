"""Tencent Cloud basic text-to-speech: the ``TextToVoice`` action of tts.tencentcloudapi.com (API 3.0).

Each sentence (at most 150 characters, the limit for Chinese text) is one
signed POST (``TC3-HMAC-SHA256``; headers ``X-TC-Action: TextToVoice``,
``X-TC-Version: 2019-08-23``, ``X-TC-Timestamp``) with the JSON body
``{Text, SessionId, VoiceType, Codec: "pcm", SampleRate: 16000, Speed,
Volume, ModelType: 1}``.  The answer holds the whole sentence as base64
``Audio`` (16 kHz s16le), pushed to the sink in 100 ms chunks before the
next sentence is requested, so playback starts after the first sentence.
An ``Error`` in the answer becomes a SpeechError with its ``Code`` and
``Message``.  Cancelling aborts the request in flight.

Registered as ``tencent`` and ``tencent_basic``.  The original's ``tencent``
is the streaming WebSocket TTS; this one is not streaming within a sentence.

Options: ``secretKey`` (else ``TENCENT_SECRET_KEY``), the secret id from
``secretId`` / ``extra.secretId`` (else ``TENCENT_SECRET_ID``), ``endpoint``
(default ``https://tts.tencentcloudapi.com``), ``speaker`` = ``VoiceType``
(a number, default 101001), ``speed`` (0.6–2.5 → Tencent's −2…6 scale),
``volume`` 0–10 → −10…10, ``language`` (``en*`` → ``PrimaryLanguage`` 2,
else 1), ``extra.region`` (``X-TC-Region``, omitted by default),
``extra.timeout`` (seconds, default 30).
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from urllib.parse import urlsplit

import numpy as np
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from activecall.speech import tencent_api
from activecall.speech.base import ISynthesizer, OptionError, SpeechError, TtsOptions, synthesis
from activecall.speech.cloud import seconds
from activecall.speech.tts.sentences import split_sentences

DEFAULT_ENDPOINT = "https://tts.tencentcloudapi.com"
DEFAULT_VOICE = 101001
ACTION = "TextToVoice"
VERSION = "2019-08-23"
SERVICE = "tts"
CONTENT_TYPE = "application/json; charset=utf-8"
MAX_CHARS = 150
CHUNK = 1600
# Tencent's documented speed steps: Speed value -> rate
SPEED_STEPS = ((-2, 0.6), (-1, 0.8), (0, 1.0), (1, 1.2), (2, 1.5), (6, 2.5))


def tencent_speed(rate: float) -> float:
    """Our speed factor on Tencent's ``Speed`` scale (piecewise linear between the documented steps)."""
    values = [v for v, _ in SPEED_STEPS]
    rates = [r for _, r in SPEED_STEPS]
    return round(float(np.interp(rate, rates, values)), 2)


@implementer(ISynthesizer)
class TencentSynthesizer:
    name = "tencent"

    def __init__(self, options: TtsOptions, http=None, reactor=None, env=os.environ, rng=None, **_):
        secret_id = getattr(options, "secretId", None) or options.extra.get("secretId")
        self.credentials = tencent_api.credentials(None, secret_id, options.secretKey, env, need_app_id=False)
        if http is None:
            import treq as http
        self.http = http
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.url = (options.endpoint or DEFAULT_ENDPOINT).rstrip("/") + "/"
        self.host = urlsplit(self.url).netloc
        try:
            self.voice = int(options.speaker) if options.speaker else DEFAULT_VOICE
        except ValueError:
            raise OptionError(f"tts.speaker: tencent VoiceType is a number, got {options.speaker!r}") from None
        if not 0.6 <= options.speed <= 2.5:
            raise OptionError(f"tts.speed: tencent takes 0.6 to 2.5, got {options.speed}")
        self.speed = options.speed
        self.volume = max(-10, min(10, (options.volume - 5) * 2))
        language = (options.language or "").lower()
        self.primary_language = (2 if language.startswith("en") else 1) if language else None
        self.region = options.extra.get("region")
        self.timeout = seconds(options.extra, "timeout", 30, "tts")

    @property
    def cache_identity(self) -> tuple:
        return ("tencent", f"{self.voice}/{self.volume}/{self.primary_language}", self.speed)

    def body(self, text: str) -> dict:
        body = {"Text": text, "SessionId": str(uuid.uuid4()), "VoiceType": self.voice, "Codec": "pcm",
                "SampleRate": 16000, "Speed": tencent_speed(self.speed), "Volume": self.volume, "ModelType": 1}
        if self.primary_language is not None:
            body["PrimaryLanguage"] = self.primary_language
        return body

    def request_headers(self, payload: bytes) -> dict:
        timestamp = int(self.reactor.seconds())
        headers = {
            "Authorization": tencent_api.tc3_authorization(
                self.credentials.secret_id, self.credentials.secret_key, SERVICE, self.host, ACTION,
                CONTENT_TYPE, payload, timestamp),
            "Content-Type": CONTENT_TYPE, "Host": self.host, "X-TC-Action": ACTION,
            "X-TC-Timestamp": str(timestamp), "X-TC-Version": VERSION,
        }
        if self.region:
            headers["X-TC-Region"] = self.region
        return headers

    @defer.inlineCallbacks
    def _sentence(self, text: str):
        payload = json.dumps(self.body(text), ensure_ascii=False).encode("utf-8")
        response = yield self.http.post(self.url, headers=self.request_headers(payload), data=payload,
                                        timeout=self.timeout)
        content = yield response.content()
        try:
            answer = json.loads(content)["Response"]
        except (ValueError, KeyError, TypeError):
            raise SpeechError(f"tencent tts: HTTP {response.code}: unexpected answer {content[:200]!r}") from None
        if "Error" in answer:
            error = answer["Error"]
            raise SpeechError(f"tencent tts failed: {error.get('Code')}: {error.get('Message')}")
        if response.code != 200 or "Audio" not in answer:
            raise SpeechError(f"tencent tts: HTTP {response.code} without audio")
        raw = base64.b64decode(answer["Audio"])
        return np.frombuffer(raw[: len(raw) - len(raw) % 2], dtype="<i2").astype(np.int16)

    def synthesize(self, text: str, sink) -> defer.Deferred:
        @defer.inlineCallbacks
        def run(deliver):
            samples = 0
            try:
                for sentence in split_sentences(text, MAX_CHARS):
                    pcm = yield self._sentence(sentence)
                    for i in range(0, pcm.size, CHUNK):
                        deliver(pcm[i:i + CHUNK])
                    samples += pcm.size
            except SpeechError:
                raise
            except Exception:
                raise SpeechError(f"tencent tts: request failed: {Failure().getErrorMessage()}") from None
            return samples

        return synthesis(run, sink)
