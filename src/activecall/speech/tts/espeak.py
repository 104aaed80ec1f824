"""espeak-ng (Debian package ``espeak-ng``): the offline voice for languages flite cannot speak.

Why: no registry package ships a Chinese neural voice that runs here, and the guide's Chinese default
(aliyun) needs a key.  espeak-ng's ``cmn`` voice speaks Mandarin from Chinese characters; it is formant
synthesis (robotic), but it is offline and intelligible enough to be recognised (docs/speech.md,
"Evaluation").  For English it is worse than flite (measured), so it is never the English default.

One process per sentence like flite (``reactor.spawnProcess``, WAV on stdout at 22.05 kHz, resampled,
``cancel()`` kills it).  ``speaker`` = an espeak-ng voice (default from ``language``: ``zh*`` -> ``cmn``,
``en*`` -> ``en-us``, else the language tag itself); ``speed`` scales 175 words per minute.
"""

from __future__ import annotations

from typing import Optional

from activecall.speech.base import SpeechError, TtsOptions
from activecall.speech.tts.flite import FliteSynthesizer, _which

VOICES_BY_LANGUAGE = {"zh": "cmn", "cmn": "cmn", "en": "en-us"}
WORDS_PER_MINUTE = 175


def voice_for(language: Optional[str]) -> str:
    primary = (language or "en").replace("_", "-").split("-", 1)[0].lower()
    return VOICES_BY_LANGUAGE.get(primary, primary)


def available() -> bool:
    return _which("espeak-ng") is not None


class EspeakSynthesizer(FliteSynthesizer):
    name = "espeak"

    def __init__(self, options: TtsOptions, reactor=None, executable: Optional[str] = None):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.executable = executable or _which("espeak-ng")
        if not self.executable:
            raise SpeechError("tts provider 'espeak' needs the espeak-ng program (Debian: apt-get install espeak-ng)")
        self.voice = options.speaker or voice_for(options.language)
        if not self.voice.replace("-", "").replace("_", "").replace("+", "").isalnum():
            raise SpeechError(f"tts.speaker: {self.voice!r} is not an espeak-ng voice name")
        self.speed = options.speed
        self.processes_spawned = 0

    def _to_16k(self, pcm, rate: int):
        """espeak-ng writes 22.05 kHz."""
        from activecall.audio import resample
        return resample(pcm, rate, 16000)

    @property
    def cache_identity(self) -> tuple:
        return ("espeak", self.voice, self.speed)

    def _argv(self, sentence: str) -> list[str]:
        # a sentence starting with "-" must not read as an option
        text = " " + sentence if sentence.startswith("-") else sentence
        return [self.executable, "-v", self.voice, "-s", str(int(WORDS_PER_MINUTE * self.speed)),
                "--stdout", text]
