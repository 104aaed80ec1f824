"""Deepgram streaming speech-to-text: one ``wss://api.deepgram.com/v1/listen`` WebSocket per stream.

Audio goes out as binary linear16 16 kHz mono frames (100 ms each); Deepgram
answers with ``Results`` messages.  Deepgram's own endpointing cuts the
utterances, so there is no local VAD here:

- ``is_final: false``: an interim hypothesis → ``asrDelta`` (text = the
  utterance's finalised segments so far + the interim one);
- ``is_final: true``: that segment will not change; it is added to the utterance
  (and shown as an ``asrDelta``);
- ``speech_final: true``, ``from_finalize: true`` or an ``UtteranceEnd``
  message: the utterance is over → one ``asrFinal`` with all its segments.

``end_utterance()`` sends ``{"type": "Finalize"}`` (the session's VAD heard the
end first); ``close()`` sends ``{"type": "CloseStream"}`` and waits for
Deepgram to flush its last results and close the socket.  When no audio went
out during a whole ``extra.keepalive`` period (default 4 s; Deepgram drops a
stream after 10 s without data) a ``{"type": "KeepAlive"}`` text frame is sent.

Options: ``secretKey`` (else ``DEEPGRAM_API_KEY``), ``endpoint`` (base URL,
default ``wss://api.deepgram.com``; http(s) is mapped to ws(s)), ``modelType``
(default ``nova-2``), ``language`` (``auto``/absent: Deepgram's default).
Other ``extra`` keys (``endpointing``, ``utterance_end_ms``, ``smart_format``,
``keywords``…) are passed as query parameters, except ours: ``keepalive``,
``connect_timeout``, ``close_timeout``.
"""

from __future__ import annotations

import json
import os
from urllib.parse import urlencode

from twisted.internet import task

from activecall.speech.base import SpeechError
from activecall.speech.cloud import CloudRecognizer, credential, seconds

DEFAULT_ENDPOINT = "wss://api.deepgram.com"
DEFAULT_MODEL = "nova-2"
OWN_EXTRA = ("keepalive", "connect_timeout", "close_timeout")


def ws_base(endpoint: str | None) -> str:
    base = (endpoint or DEFAULT_ENDPOINT).rstrip("/")
    if base.startswith("https://"):
        return "wss://" + base[len("https://"):]
    if base.startswith("http://"):
        return "ws://" + base[len("http://"):]
    return base


class DeepgramRecognizer(CloudRecognizer):
    name = "deepgram"
    chunk_ms = 100

    def __init__(self, options, on_result, env=os.environ, **kw):
        self.key = credential(options.secretKey, "DEEPGRAM_API_KEY", "secretKey", "deepgram", env)
        super().__init__(options, on_result, **kw)
        self.keepalive_every = seconds(options.extra, "keepalive", 4, "asr")
        self.model = options.modelType or DEFAULT_MODEL
        language = (options.language or "").strip()
        self.language = None if language.lower() in ("", "auto") else language
        self._keepalive = None
        self._audio_since_tick = False
        self._index = 0
        self._segments: list[str] = []  # finalised segments of the open utterance
        self._utt_start = None
        self._utt_end = None
        self._confidence = None

    def query(self) -> dict:
        params = {"encoding": "linear16", "sample_rate": "16000", "channels": "1", "interim_results": "true",
                  "model": self.model}
        if self.language:
            params["language"] = self.language
        for key, value in self.options.extra.items():
            if key not in OWN_EXTRA:
                params[key] = value
        return params

    def _request(self):
        url = f"{ws_base(self.options.endpoint)}/v1/listen?{urlencode(self.query())}"
        return url, {"Authorization": f"Token {self.key}"}

    def _on_open(self) -> None:
        self._audio_since_tick = True
        self._keepalive = task.LoopingCall(self._keep_alive)
        self._keepalive.clock = self.reactor
        self._keepalive.start(self.keepalive_every, now=False)
        self._ready()

    def _audio_sent(self) -> None:
        self._audio_since_tick = True

    def _keep_alive(self) -> None:
        """Every period: a KeepAlive if no audio went out since the previous one."""
        if self.state == "open" and not self._audio_since_tick:
            self._send_json({"type": "KeepAlive"})
        self._audio_since_tick = False

    def _stop(self) -> None:
        super()._stop()
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()

    def end_utterance(self) -> None:
        if self.state == "open":
            self._flush(everything=True)
            self._send_json({"type": "Finalize"})

    def _send_end(self) -> None:
        self._send_json({"type": "CloseStream"})

    def _closed_by_peer(self, was_clean, code, reason) -> None:
        # after CloseStream Deepgram sends what is left and closes with 1000
        if self.state == "closing" and code == 1000:
            self._utterance_over()
            self.state = "done"
            self._stop()
        elif code not in (1000, None):
            self._fail(SpeechError(f"deepgram closed the stream ({code}: {reason})"))

    def _on_message(self, payload: bytes, is_binary: bool) -> None:
        if is_binary:
            return
        msg = json.loads(payload)
        kind = msg.get("type")
        if kind == "Results":
            self._results(msg)
        elif kind == "UtteranceEnd":
            self._utterance_over()
        elif kind == "Error" or "err_code" in msg:
            raise SpeechError(f"deepgram: {msg.get('description') or msg.get('err_msg') or msg}")

    def _results(self, msg: dict) -> None:
        try:
            alt = msg["channel"]["alternatives"][0]
            text = (alt.get("transcript") or "").strip()
        except (KeyError, IndexError, TypeError, AttributeError):
            raise SpeechError(f"deepgram: unexpected Results message {str(msg)[:200]}") from None
        start = msg.get("start")
        duration = msg.get("duration") or 0
        if text:
            if self._utt_start is None and start is not None:
                self._utt_start = int(round(start * 1000))
            if start is not None:
                self._utt_end = int(round((start + duration) * 1000))
            self._confidence = alt.get("confidence", self._confidence)
            if msg.get("is_final"):
                self._segments.append(text)
                shown = " ".join(self._segments)
            else:
                shown = " ".join(self._segments + [text])
            if not (msg.get("is_final") and (msg.get("speech_final") or msg.get("from_finalize"))):
                self._result(self._index, shown, False, self._utt_start, self._utt_end, self._confidence)
        if msg.get("is_final") and (msg.get("speech_final") or msg.get("from_finalize")):
            self._utterance_over()

    def _utterance_over(self) -> None:
        if not self._segments:
            return
        self._result(self._index, " ".join(self._segments), True, self._utt_start, self._utt_end,
                     self._confidence)
        self._index += 1
        self._segments, self._utt_start, self._utt_end, self._confidence = [], None, None, None
