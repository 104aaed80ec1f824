"""Aliyun DashScope paraformer realtime speech-to-text over the DashScope WebSocket.

Per stream: ``run-task`` (task_group ``audio``, task ``asr``, function
``recognition``, model ``paraformer-realtime-v2``, parameters ``format: pcm``,
``sample_rate: 16000`` and the documented ``extra`` keys), audio held until
``task-started``, then 100 ms binary frames.  Each ``result-generated`` event
carries ``payload.output.sentence`` = ``{text, begin_time, end_time,
sentence_end}``: an open sentence is an ``asrDelta``, ``sentence_end: true``
its ``asrFinal``; sentences are numbered in order.  Heartbeat results are
skipped.  ``close()`` sends ``finish-task`` and waits for ``task-finished``;
``task-failed`` is logged as a SpeechError with the service's code and message.

Options: ``secretKey`` (else ``DASHSCOPE_API_KEY``), ``endpoint`` (default
``wss://dashscope.aliyuncs.com/api-ws/v1/inference``), ``modelType`` (default
``paraformer-realtime-v2``), ``language`` (sent as ``language_hints``),
``extra``: ``max_sentence_silence``, ``vocabulary_id``,
``disfluency_removal_enabled``, ``semantic_punctuation_enabled``,
``punctuation_prediction_enabled``, ``inverse_text_normalization_enabled``,
``multi_threshold_mode_enabled``, ``heartbeat`` (strings; true/false and
numbers are sent as JSON booleans and numbers), ``connect_timeout``,
``close_timeout``.  The service cuts sentences itself, so
``end_utterance()`` does nothing.
"""

from __future__ import annotations

import os

from activecall.speech import aliyun_api as dashscope
from activecall.speech.cloud import CloudRecognizer, flag

DEFAULT_MODEL = "paraformer-realtime-v2"
PARAMETERS = ("max_sentence_silence", "vocabulary_id", "disfluency_removal_enabled",
              "semantic_punctuation_enabled", "punctuation_prediction_enabled",
              "inverse_text_normalization_enabled", "multi_threshold_mode_enabled", "heartbeat")


class AliyunRecognizer(CloudRecognizer):
    name = "aliyun"
    chunk_ms = 100

    def __init__(self, options, on_result, env=os.environ, **kw):
        self.key = dashscope.api_key(options.secretKey, env)
        super().__init__(options, on_result, **kw)
        self.url = dashscope.endpoint_url(options.endpoint)
        self.model = options.modelType or DEFAULT_MODEL
        self.task_id = dashscope.new_task_id()
        self._index = 0

    def run_task(self) -> dict:
        parameters = {"format": "pcm", "sample_rate": 16000}
        language = (self.options.language or "").strip()
        if language and language.lower() != "auto":
            parameters["language_hints"] = [language]
        for key in PARAMETERS:
            if key in self.options.extra:
                value = self.options.extra[key]
                parameters[key] = value if key == "vocabulary_id" else flag(value, key)
        return dashscope.command("run-task", self.task_id, {
            "task_group": "audio", "task": "asr", "function": "recognition", "model": self.model,
            "parameters": parameters, "input": {}})

    def _request(self):
        return self.url, dashscope.headers(self.key)

    def _on_open(self) -> None:
        self._send_json(self.run_task())

    def _send_end(self) -> None:
        self._send_json(dashscope.command("finish-task", self.task_id, {"input": {}}))

    def _on_message(self, payload: bytes, is_binary: bool) -> None:
        if is_binary:
            return
        event, msg = dashscope.parse_event(payload)
        if event == "task-started":
            self._ready()
        elif event == "result-generated":
            sentence = ((msg.get("payload") or {}).get("output") or {}).get("sentence") or {}
            if sentence.get("heartbeat"):
                return
            text = (sentence.get("text") or "").strip()
            final = bool(sentence.get("sentence_end"))
            if text:
                self._result(self._index, text, final, sentence.get("begin_time"), sentence.get("end_time"))
            if final and text:
                self._index += 1
        elif event == "task-finished":
            self._finished()
