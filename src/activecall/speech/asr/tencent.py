"""Tencent Cloud realtime speech-to-text over WebSocket (``wss://asr.cloud.tencent.com/asr/v2/<appid>``).

The URL carries the request: ``secretid``, ``timestamp``, ``expired`` (+24 h),
``nonce``, ``engine_model_type``, ``voice_id``, ``voice_format=1`` (PCM),
``needvad=1``, any ``extra`` parameters, and ``signature`` (HMAC-SHA1 over
the sorted query, see ``tencent_api``).  After the service's first message
(``code: 0``) audio goes out in 40 ms binary frames, as Tencent recommends.
Results carry ``result.slice_type`` 0 (sentence begins) / 1 (in progress) →
``asrDelta``, 2 (sentence over) → ``asrFinal``, with the sentence ``index``,
``start_time`` and ``end_time``.  ``close()`` sends ``{"type": "end"}`` and
waits for the message with ``final: 1``.  A message with ``code`` ≠ 0 is a
SpeechError with that code and message (it is logged; the key never is).

Options: ``appId`` / ``secretId`` / ``secretKey`` (else ``TENCENT_APPID`` /
``TENCENT_SECRET_ID`` / ``TENCENT_SECRET_KEY``), ``endpoint`` (default
``wss://asr.cloud.tencent.com``), ``modelType`` = ``engine_model_type``
(default ``16k_zh_en``), ``extra``: query parameters such as
``hotword_id``, ``vad_silence_time``, ``filter_punc``, ``convert_num_mode``,
``word_info``…, plus our own ``connect_timeout`` / ``close_timeout``.
"""

from __future__ import annotations

import json
import os
import random
import uuid
from urllib.parse import quote, urlencode, urlsplit

from activecall.speech import tencent_api
from activecall.speech.base import SpeechError
from activecall.speech.cloud import CloudRecognizer

DEFAULT_ENDPOINT = "wss://asr.cloud.tencent.com"
DEFAULT_MODEL = "16k_zh_en"
OWN_EXTRA = ("connect_timeout", "close_timeout")


class TencentRecognizer(CloudRecognizer):
    name = "tencent"
    chunk_ms = 40

    def __init__(self, options, on_result, env=os.environ, rng=None, **kw):
        self.credentials = tencent_api.credentials(options.appId, options.secretId, options.secretKey, env)
        super().__init__(options, on_result, **kw)
        self.base = (options.endpoint or DEFAULT_ENDPOINT).rstrip("/")
        self.model = options.modelType or DEFAULT_MODEL
        self.rng = rng or random.SystemRandom()
        self.voice_id = str(uuid.uuid4())
        self._handshake_done = False

    def params(self) -> dict:
        now = int(self.reactor.seconds())
        params = {"secretid": self.credentials.secret_id, "timestamp": now, "expired": now + 86400,
                  "nonce": self.rng.randint(1, 9999999999), "engine_model_type": self.model,
                  "voice_id": self.voice_id, "voice_format": 1, "needvad": 1}
        for key, value in self.options.extra.items():
            if key not in OWN_EXTRA:
                params[key] = value
        return params

    def _request(self):
        parts = urlsplit(self.base)
        path = f"/asr/v2/{self.credentials.app_id}"
        params = self.params()
        signature = tencent_api.asr_signature(self.credentials.secret_key, parts.netloc, path, params)
        query = urlencode(sorted(params.items())) + "&signature=" + quote(signature, safe="")
        return f"{self.base}{path}?{query}", {}

    def _on_open(self) -> None:
        pass  # audio waits for the service's first message

    def _send_end(self) -> None:
        self._send_json({"type": "end"})

    def _on_message(self, payload: bytes, is_binary: bool) -> None:
        if is_binary:
            return
        msg = json.loads(payload)
        code = msg.get("code", 0)
        if code != 0:
            raise SpeechError(f"tencent asr error {code}: {msg.get('message', 'no message')}")
        if not self._handshake_done:
            self._handshake_done = True
            self._ready()
        result = msg.get("result")
        if result:
            text = (result.get("voice_text_str") or "").strip()
            if text:
                self._result(int(result.get("index", 0)), text, result.get("slice_type") == 2,
                             result.get("start_time"), result.get("end_time"))
        if msg.get("final") == 1:
            self._finished()
