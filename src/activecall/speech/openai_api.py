"""What the OpenAI speech clients share: base URL, API key lookup, error text, 24 kHz PCM to 16 kHz."""

from __future__ import annotations

import json
import os
from typing import Mapping, Optional

import numpy as np

from activecall.audio import SAMPLE_RATE, Resampler
from activecall.speech.base import SpeechError

DEFAULT_ENDPOINT = "https://api.openai.com/v1"
SERVICE_RATE = 24000  # the rate of OpenAI's "pcm" / "pcm16" audio, both ways


def api_url(endpoint: Optional[str], path: str) -> str:
    """``{endpoint}/{path}`` unless the endpoint already ends with the path (OpenAI-compatible servers)."""
    base = (endpoint or DEFAULT_ENDPOINT).rstrip("/")
    return base if base.endswith("/" + path) else f"{base}/{path}"


def api_key(secret_key: Optional[str], env: Mapping[str, str] = os.environ) -> str:
    key = secret_key or env.get("OPENAI_API_KEY")
    if not key:
        raise SpeechError("provider 'openai' needs secretKey in its options or the environment variable "
                          "OPENAI_API_KEY")
    return key


def error_message(status: int, body: bytes) -> str:
    """The service's own error text when it sent one (``{"error": {"message": ...}}``)."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body[:200].decode("utf-8", "replace")
    return f"HTTP {status}: {message}"


class From24k:
    """The service's 24 kHz PCM to 16 kHz as it streams, without the filter's delay (TTS and realtime)."""

    def __init__(self):
        self.resampler = Resampler(SERVICE_RATE, SAMPLE_RATE)
        self.skip = int(round(self.resampler.delay))  # leading samples that are only filter delay

    def __call__(self, pcm: np.ndarray) -> np.ndarray:
        out = self.resampler(pcm)
        if self.skip:
            dropped = min(self.skip, out.size)
            out, self.skip = out[dropped:], self.skip - dropped
        return out

    def flush(self) -> np.ndarray:
        """Push zeros through the delay line so the last few milliseconds are not lost."""
        tail = int(np.ceil(self.resampler.delay * SERVICE_RATE / SAMPLE_RATE)) + 1
        return self(np.zeros(tail, dtype=np.int16))
