"""What the OpenAI speech clients share: base URL, API key lookup, error text."""

from __future__ import annotations

import json
import os
from typing import Mapping, Optional

from activecall.speech.base import SpeechError

DEFAULT_ENDPOINT = "https://api.openai.com/v1"


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
