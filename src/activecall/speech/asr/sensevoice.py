"""SenseVoice through sherpa-onnx: offline multilingual ASR (zh, en, ja, ko, yue), when a model is present.

No model ships in any registry package, so it works only when
``asr.extra.model_dir`` names a sherpa-onnx SenseVoice directory
(``model.int8.onnx`` or ``model.onnx`` plus ``tokens.txt``); otherwise the
provider refuses to start with a message naming that option.  It is an
offline (non-streaming) model: no ``asrDelta``, one ``asrFinal`` per
utterance, decoded on the worker thread when the utterance ends.

Only the error paths are tested here (no model is available offline).
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from activecall.audio import SAMPLE_RATE
from activecall.speech.asr.base import StreamingRecognizer
from activecall.speech.base import SpeechError

_recognizers: dict = {}  # model_dir -> sherpa_onnx.OfflineRecognizer, shared by calls


def find_model(model_dir: Optional[str]) -> tuple[str, str]:
    """(model file, tokens file) inside ``model_dir``, or a SpeechError naming the option."""
    if not model_dir:
        raise SpeechError("asr provider 'sensevoice' needs asr.extra.model_dir: a sherpa-onnx SenseVoice "
                          "model directory (model.int8.onnx or model.onnx, tokens.txt)")
    for name in ("model.int8.onnx", "model.onnx"):
        model = os.path.join(model_dir, name)
        if os.path.exists(model):
            break
    else:
        raise SpeechError(f"asr.extra.model_dir {model_dir!r} holds no model.int8.onnx or model.onnx")
    tokens = os.path.join(model_dir, "tokens.txt")
    if not os.path.exists(tokens):
        raise SpeechError(f"asr.extra.model_dir {model_dir!r} holds no tokens.txt")
    return model, tokens


class SenseVoiceRecognizer(StreamingRecognizer):
    name = "sensevoice"
    partial_every_ms = 10 ** 9  # offline model: gather the whole utterance

    def __init__(self, options, on_result, **kw):
        self.model_dir = options.extra.get("model_dir")
        self.model, self.tokens = find_model(self.model_dir)
        try:
            import sherpa_onnx  # noqa: F401
        except ImportError:
            raise SpeechError("asr provider 'sensevoice' needs the package sherpa-onnx") from None
        super().__init__(options, on_result, **kw)
        self.language = options.language or "auto"
        self._audio: list[np.ndarray] = []

    def _recognizer(self):
        rec = _recognizers.get(self.model_dir)
        if rec is None:
            import sherpa_onnx
            rec = sherpa_onnx.OfflineRecognizer.from_sense_voice(
                model=self.model, tokens=self.tokens, num_threads=1, language=self.language, use_itn=True)
            _recognizers[self.model_dir] = rec
        return rec

    def _begin(self) -> None:
        self._audio = []

    def _decode(self, pcm: np.ndarray) -> Optional[str]:
        self._audio.append(pcm)
        return None

    def _finish(self, pcm: np.ndarray) -> Optional[str]:
        self._audio.append(pcm)
        audio = np.concatenate(self._audio).astype(np.float32) / 32768.0
        self._audio = []
        if audio.size == 0:
            return None
        rec = self._recognizer()
        stream = rec.create_stream()
        stream.accept_waveform(SAMPLE_RATE, audio)
        rec.decode_stream(stream)
        return stream.result.text.strip() or None
