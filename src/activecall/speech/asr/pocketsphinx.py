"""pocketsphinx (PyPI ``pocketsphinx`` 5.x) with its bundled US-English model: the offline default ASR.

Works with no download and no key.  Accurate on clear synthetic or careful
speech (flite rms: WER ~0.02, through a PCMU line ~0.04), weak on real
telephone speech with accents or noise; English only unless ``extra`` names
another model (``hmm``, ``lm``, ``dict`` paths).  Partial results
(``asrDelta``) come every 320 ms of speech; the final one when the utterance
ends.  The decoder (~0.3 s to load) is built on the worker thread.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from activecall.speech.asr.base import StreamingRecognizer
from activecall.speech.base import SpeechError


class PocketsphinxRecognizer(StreamingRecognizer):
    name = "pocketsphinx"

    def __init__(self, options, on_result, **kw):
        language = (options.language or "en").lower()
        if not language.startswith("en") and "hmm" not in options.extra:
            raise SpeechError(f"asr provider 'pocketsphinx' bundles only English; language {options.language!r} "
                              "needs asr.extra.hmm/lm/dict model paths")
        try:
            import pocketsphinx  # noqa: F401
        except ImportError:
            raise SpeechError("asr provider 'pocketsphinx' needs the package pocketsphinx") from None
        super().__init__(options, on_result, **kw)
        self._decoder = None
        self._started = False

    def _make_decoder(self):
        from pocketsphinx import Decoder
        config = {k: self.options.extra[k] for k in ("hmm", "lm", "dict") if k in self.options.extra}
        return Decoder(loglevel="FATAL", **config)

    def _begin(self) -> None:
        if self._decoder is None:
            self._decoder = self._make_decoder()
        self._decoder.start_utt()
        self._started = True

    def _hyp(self) -> str:
        hyp = self._decoder.hyp()
        return hyp.hypstr if hyp is not None else ""

    def _decode(self, pcm: np.ndarray) -> Optional[str]:
        if pcm.size:
            self._decoder.process_raw(pcm.astype("<i2").tobytes(), False, False)
        return self._hyp()

    def _finish(self, pcm: np.ndarray) -> Optional[str]:
        if not self._started:
            return None
        self._decode(pcm)
        self._decoder.end_utt()
        self._started = False
        return self._hyp()
