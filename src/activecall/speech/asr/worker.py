"""An ASR worker process: pocketsphinx decoding off the daemon's process.

``python -m activecall.speech.asr.worker`` reads request frames on stdin and
writes one reply per request on stdout (``speech/asr/frames.py``).  It exists
because pocketsphinx holds the GIL while it loads and decodes: in a thread of
the daemon it stalled the reactor (and the 20 ms media clock) for up to a
second.  Blocking reads are fine here; this process does nothing else.

Decoders outlive streams: a closed stream's decoder is reset (cepstral mean
back to its start) and given to the next stream with the same options, so the
~0.35 s model load is paid once per concurrent stream per worker, not per call.
The worker exits when stdin closes (the daemon went away).
"""

from __future__ import annotations

import json
import os
import sys

from activecall.speech.asr import frames as fr

MAX_SPARE = 4  # idle decoders kept per option set (~90 MiB each)


class Decoders:
    """Streams -> decoders, with a spare list per option set."""

    def __init__(self):
        self.streams: dict[int, tuple] = {}  # id -> (key, decoder, initial cmn)
        self.spare: dict[tuple, list] = {}
        self.in_utt: set[int] = set()

    def open(self, stream: int, options: dict) -> None:
        if stream in self.streams:
            raise ValueError(f"stream {stream} is already open")
        key = tuple(sorted((k, str(v)) for k, v in options.items() if k in ("hmm", "lm", "dict", "cmninit")))
        spare = self.spare.get(key)
        if spare:
            decoder, cmn = spare.pop()
        else:
            from pocketsphinx import Decoder
            decoder = Decoder(loglevel="FATAL", **dict(key))
            cmn = decoder.get_cmn()
        self.streams[stream] = (key, decoder, cmn)

    def _decoder(self, stream: int):
        try:
            return self.streams[stream][1]
        except KeyError:
            raise ValueError(f"stream {stream} is not open") from None

    def begin(self, stream: int) -> str:
        decoder = self._decoder(stream)
        if stream in self.in_utt:
            decoder.end_utt()
        decoder.start_utt()
        self.in_utt.add(stream)
        return ""

    def audio(self, stream: int, pcm: bytes) -> str:
        decoder = self._decoder(stream)
        if stream not in self.in_utt:
            raise ValueError(f"stream {stream}: audio outside an utterance")
        if len(pcm) % 2:
            raise ValueError(f"stream {stream}: odd audio length {len(pcm)}")
        if pcm:
            decoder.process_raw(pcm, False, False)
        hyp = decoder.hyp()
        return hyp.hypstr if hyp is not None else ""

    def end(self, stream: int, pcm: bytes) -> str:
        self.audio(stream, pcm)
        decoder = self._decoder(stream)
        decoder.end_utt()
        self.in_utt.discard(stream)
        hyp = decoder.hyp()
        return hyp.hypstr if hyp is not None else ""

    def close(self, stream: int) -> str:
        key, decoder, cmn = self.streams.pop(stream, (None, None, None))
        if decoder is None:
            return ""
        if stream in self.in_utt:
            self.in_utt.discard(stream)
            decoder.end_utt()
        decoder.set_cmn(cmn)  # the next call starts where a fresh decoder would
        spare = self.spare.setdefault(key, [])
        if len(spare) < MAX_SPARE:
            spare.append((decoder, cmn))
        return ""


def handle(decoders: Decoders, kind: bytes, stream: int, payload: bytes) -> bytes:
    """One request -> its reply frame (an ``X`` frame for anything wrong with it)."""
    try:
        if kind == fr.OPEN:
            options = json.loads(payload.decode("utf-8") or "{}")
            if not isinstance(options, dict):
                raise ValueError("open: options must be a JSON object")
            decoders.open(stream, options)
            text = ""
        elif kind == fr.BEGIN:
            text = decoders.begin(stream)
        elif kind == fr.AUDIO:
            text = decoders.audio(stream, payload)
        elif kind == fr.END:
            text = decoders.end(stream, payload)
        elif kind == fr.CLOSE:
            text = decoders.close(stream)
        else:
            raise ValueError(f"unknown request kind {kind!r}")
    except Exception as e:  # the reply carries it; the worker lives on
        return fr.encode(fr.ERROR, stream, f"{type(e).__name__}: {e}".encode("utf-8", "replace"))
    return fr.encode(fr.TEXT, stream, text.encode("utf-8"))


NICE = 5  # when the CPUs are short, the daemon's media playout goes before decoding


def main() -> int:
    try:
        os.nice(NICE)
    except OSError:
        pass
    # Our replies go to a private copy of stdout; fd 1 becomes stderr, so anything a C library
    # prints cannot corrupt the frame stream.
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    stdin = sys.stdin.buffer.raw if hasattr(sys.stdin.buffer, "raw") else sys.stdin.buffer
    decoder = fr.FrameDecoder()
    decoders = Decoders()
    while True:
        data = stdin.read(65536)
        if not data:
            return 0
        try:
            requests = decoder.feed(data)
        except fr.FrameError as e:
            sys.stderr.write(f"activecall asr worker: {e}; exiting\n")
            return 2
        for request in requests:
            out.write(handle(decoders, *request))  # at once: a partial must not wait for the backlog


if __name__ == "__main__":
    sys.exit(main())
