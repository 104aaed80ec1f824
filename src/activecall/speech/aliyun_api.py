"""DashScope's WebSocket inference protocol, shared by Aliyun ASR (paraformer) and TTS (CosyVoice).

One socket per task at ``wss://dashscope.aliyuncs.com/api-ws/v1/inference``
with ``Authorization: bearer <key>``.  The client sends ``run-task`` (header
``{action, task_id, streaming: "duplex"}`` and the task's payload), waits for
the ``task-started`` event, streams (binary audio or ``continue-task`` text),
sends ``finish-task`` and reads events until ``task-finished`` or
``task-failed`` (whose ``error_code`` / ``error_message`` we report).
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Mapping, Optional
from urllib.parse import urlsplit

from activecall.speech.base import SpeechError
from activecall.speech.cloud import credential

DEFAULT_ENDPOINT = "wss://dashscope.aliyuncs.com/api-ws/v1/inference"
PATH = "/api-ws/v1/inference"


def endpoint_url(endpoint: Optional[str]) -> str:
    """The inference URL; a bare ``ws(s)://host[:port]`` gets the standard path."""
    if not endpoint:
        return DEFAULT_ENDPOINT
    endpoint = endpoint.rstrip("/")
    return endpoint + PATH if urlsplit(endpoint).path in ("", "/") else endpoint


def api_key(secret_key: Optional[str], env: Mapping[str, str] = os.environ) -> str:
    return credential(secret_key, "DASHSCOPE_API_KEY", "secretKey", "aliyun", env)


def headers(key: str) -> dict:
    return {"Authorization": f"bearer {key}"}


def new_task_id() -> str:
    return uuid.uuid4().hex


def command(action: str, task_id: str, payload: dict) -> dict:
    return {"header": {"action": action, "task_id": task_id, "streaming": "duplex"}, "payload": payload}


def parse_event(payload: bytes) -> tuple[str, dict]:
    """``(event name, message)``; ``task-failed`` becomes a SpeechError with the service's code and text."""
    try:
        msg = json.loads(payload)
        header = msg["header"]
        event = header["event"]
    except (ValueError, KeyError, TypeError):
        raise SpeechError(f"aliyun: unexpected message {payload[:200]!r}") from None
    if event == "task-failed":
        raise SpeechError(f"aliyun task failed: {header.get('error_code', '?')}: "
                          f"{header.get('error_message', 'no message')}")
    return event, msg
