"""Tencent Cloud signing and credentials, shared by the Tencent ASR and TTS clients (pure functions).

- Realtime ASR (``wss://asr.cloud.tencent.com/asr/v2/<appid>?...``): the
  signature is base64(HMAC-SHA1(SecretKey, host + path + "?" + the query
  without ``signature``, sorted by key, values not URL-encoded)), then
  URL-encoded into the query.
- Cloud API 3.0 (``TextToVoice``): ``TC3-HMAC-SHA256`` over the canonical
  request (signed headers ``content-type;host;x-tc-action``), with a key
  derived from ``"TC3" + SecretKey`` → date → service → ``tc3_request``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Mapping, Optional

from activecall.speech.cloud import credential


@dataclass(frozen=True)
class Credentials:
    app_id: str
    secret_id: str
    secret_key: str

    def __repr__(self) -> str:  # never print the key
        return f"Credentials(app_id={self.app_id!r}, secret_id={self.secret_id!r}, secret_key=...)"


def credentials(app_id: Optional[str], secret_id: Optional[str], secret_key: Optional[str],
                env: Mapping[str, str] = os.environ, need_app_id: bool = True) -> Credentials:
    return Credentials(
        credential(app_id, "TENCENT_APPID", "appId", "tencent", env) if need_app_id else (app_id or ""),
        credential(secret_id, "TENCENT_SECRET_ID", "secretId", "tencent", env),
        credential(secret_key, "TENCENT_SECRET_KEY", "secretKey", "tencent", env),
    )


def asr_sign_text(host: str, path: str, params: Mapping[str, object]) -> str:
    query = "&".join(f"{k}={params[k]}" for k in sorted(params) if k != "signature")
    return f"{host}{path}?{query}"


def asr_signature(secret_key: str, host: str, path: str, params: Mapping[str, object]) -> str:
    digest = hmac.new(secret_key.encode("utf-8"), asr_sign_text(host, path, params).encode("utf-8"),
                      hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hmac256(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


def tc3_authorization(secret_id: str, secret_key: str, service: str, host: str, action: str,
                      content_type: str, payload: bytes, timestamp: int) -> str:
    """The ``Authorization`` header of a Cloud API 3.0 POST to ``/``."""
    canonical = "\n".join([
        "POST", "/", "",
        f"content-type:{content_type}\nhost:{host}\nx-tc-action:{action.lower()}\n",
        "content-type;host;x-tc-action",
        _sha256_hex(payload),
    ])
    date = datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d")
    scope = f"{date}/{service}/tc3_request"
    to_sign = "\n".join(["TC3-HMAC-SHA256", str(timestamp), scope, _sha256_hex(canonical.encode("utf-8"))])
    key = _hmac256(_hmac256(_hmac256(("TC3" + secret_key).encode("utf-8"), date), service), "tc3_request")
    signature = hmac.new(key, to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
    return (f"TC3-HMAC-SHA256 Credential={secret_id}/{scope}, SignedHeaders=content-type;host;x-tc-action, "
            f"Signature={signature}")
