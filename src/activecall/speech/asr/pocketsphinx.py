"""pocketsphinx (PyPI ``pocketsphinx`` 5.x) with its bundled US-English model: the offline default ASR.

Works with no download and no key.  Accurate on clear synthetic or careful
speech (flite rms: WER ~0.02, through a PCMU line ~0.04), weak on real
telephone speech with accents or noise; English only unless ``extra`` names
another model (``hmm``, ``lm``, ``dict`` paths).

Telephone legs: the first utterance of a call carried by G.711 (8 kHz,
upsampled to 16 kHz) is badly recognised with the model's default cepstral
mean (WER ~0.6 on flite speech), because the empty 4–8 kHz band moves the mean
far from where live CMN starts and it adapts only during that utterance.
``extra.cmninit = "narrowband"`` starts from a mean measured on that path
(first-utterance WER ~0.1–0.4); it hurts wideband audio, so set it only for
8 kHz legs.  A raw 13-value comma-separated vector is accepted too.  Partial results
(``asrDelta``) come every 320 ms of speech; the final one when the utterance
ends.  Decoding runs in the shared worker processes (``pool.py``,
``worker.py``), never in the daemon's process: pocketsphinx holds the GIL
while it loads (~0.35 s) and decodes, which stalled the reactor from a thread.
"""

from __future__ import annotations

import importlib.util

import numpy as np

from activecall.speech.asr.base import StreamingRecognizer, report_error
from activecall.speech.asr.pool import default_pool
from activecall.speech.base import OptionError, SpeechError

#: Cepstral mean of flite speech (awb, slt; 4 sentences) after PCMU 8 kHz and the daemon's
#: 8 -> 16 kHz resampler, read from a warmed decoder with ``get_cmn`` (bench/bench_speech_cmn.py).
NARROWBAND_CMN = "47.46,31.90,-24.71,50.20,-14.99,0.41,12.22,-11.27,7.68,-5.03,4.52,4.63,2.23"


def cmn_init(value):
    """The decoder's ``cmninit`` for ``asr.extra.cmninit`` (None: the model's default)."""
    if value in (None, ""):
        return None
    if value == "narrowband":
        return NARROWBAND_CMN
    try:
        parts = [float(v) for v in str(value).split(",")]
    except ValueError:
        parts = []
    if len(parts) != 13:
        raise OptionError(f"asr.extra.cmninit: 'narrowband' or 13 comma-separated numbers, got {value!r}")
    return ",".join(repr(v) for v in parts)


class PocketsphinxRecognizer(StreamingRecognizer):
    """Utterances found here (on the reactor), decoded by a worker process of ``pool`` (default: the shared one)."""

    name = "pocketsphinx"

    def __init__(self, options, on_result, pool=None, **kw):
        language = (options.language or "en").lower()
        if not language.startswith("en") and "hmm" not in options.extra:
            raise SpeechError(f"asr provider 'pocketsphinx' bundles only English; language {options.language!r} "
                              "needs asr.extra.hmm/lm/dict model paths")
        if importlib.util.find_spec("pocketsphinx") is None:  # found, not loaded: the workers load it
            raise SpeechError("asr provider 'pocketsphinx' needs the package pocketsphinx")
        self.cmninit = cmn_init(options.extra.get("cmninit"))
        super().__init__(options, on_result, **kw)
        config = {k: str(options.extra[k]) for k in ("hmm", "lm", "dict") if k in options.extra}
        if self.cmninit:
            config["cmninit"] = self.cmninit
        self.pool = pool if pool is not None else default_pool()
        self._stream = self.pool.stream(config, self.name)
        self._stream.on_error = lambda message: report_error(self, message)
        self._utterance = 0
        self._stream.open()  # the decoder is ready before the caller's first words

    def close(self):
        """Finalise an open utterance, then give the worker its decoder back."""
        return super().close().addCallback(lambda _: self._stream.close())

    def _run(self, fn, *args):
        return fn(*args)  # the hooks send to the worker at once; its replies come back in order

    def _start(self, start_sample, pcm):
        self._utterance = self._next_index
        super()._start(start_sample, pcm)

    def _begin(self):
        return self._stream.begin(self._utterance)

    def _decode(self, pcm: np.ndarray):
        return self._stream.audio(pcm.astype("<i2").tobytes())

    def _finish(self, pcm: np.ndarray):
        return self._stream.end(pcm.astype("<i2").tobytes())
