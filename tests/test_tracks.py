"""File playback: PyAV decoding to 16 kHz mono, http(s) fetch through the cache."""

import os
import wave

import numpy as np
from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web import resource, server

from activecall.media.tracks import (
    FRAME_SAMPLES, LEAD_IN_KEEP, LEAD_IN_MAX, FileTrack, MediaLoader, PcmBuffer, TrackError, TtsTrack, decode_file,
)


def write_tone(path, rate=8000, seconds=0.5, freq=440, channels=1):
    t = np.arange(int(rate * seconds)) / rate
    pcm = (np.sin(2 * np.pi * freq * t) * 8000).astype("<i2")
    if channels == 2:
        pcm = np.repeat(pcm, 2)
    with wave.open(path, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def dominant_hz(pcm, rate=16000):
    spectrum = np.abs(np.fft.rfft(pcm.astype(float)))
    return np.argmax(spectrum) * rate / len(pcm)


class DecodeTests(unittest.TestCase):
    def test_wav_8k_stereo_becomes_16k_mono(self):
        path = self.mktemp() + ".wav"
        write_tone(path, rate=8000, seconds=0.5, channels=2)
        pcm = decode_file(path)
        self.assertAlmostEqual(pcm.size, 8000, delta=100)
        self.assertAlmostEqual(dominant_hz(pcm), 440, delta=5)

    def test_garbage_is_a_track_error(self):
        path = self.mktemp() + ".wav"
        with open(path, "wb") as f:
            f.write(b"RIFF not really")
        self.assertRaises(TrackError, decode_file, path)

    def test_file_track_frames_and_end(self):
        track = FileTrack("b", "p", "x")
        track.set_audio(np.arange(FRAME_SAMPLES * 2 + 10, dtype=np.int16))
        frames = [track.next_frame() for _ in range(4)]
        self.assertEqual([f is None for f in frames], [False, False, False, True])
        self.assertEqual(frames[2][10:].tolist(), [0] * (FRAME_SAMPLES - 10))
        self.assertTrue(track.ended.called)
        self.assertEqual(track.played_ms, 60)

    def test_pcm_buffer(self):
        b = PcmBuffer()
        b.push(np.ones(100, dtype=np.int16))
        self.assertIsNone(b.pop_frame())
        b.push(np.ones(300, dtype=np.int16))
        self.assertEqual(b.pop_frame().size, FRAME_SAMPLES)
        self.assertEqual(len(b), 80)
        self.assertEqual(b.pop_frame(pad=True)[79:81].tolist(), [1, 0])


class LoaderTests(unittest.TestCase):
    def setUp(self):
        self.cache = os.path.abspath(self.mktemp())
        wav = self.mktemp() + ".wav"
        write_tone(wav, rate=16000, seconds=0.2, freq=1000)
        with open(wav, "rb") as f:
            body = f.read()
        self.hits = []
        hits = self.hits

        class Media(resource.Resource):
            isLeaf = True

            def render_GET(self, request):
                hits.append(request.path)
                if request.path == b"/missing.wav":
                    request.setResponseCode(404)
                    return b"no"
                return body

        self.port = reactor.listenTCP(0, server.Site(Media()), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"

    def get(self, url):
        import treq

        return treq.get(url, persistent=False)

    @defer.inlineCallbacks
    def test_url_is_fetched_once_and_cached(self):
        loader = MediaLoader(self.cache, http_get=self.get)
        pcm = yield loader.load(self.base + "/prompt.wav")
        self.assertAlmostEqual(dominant_hz(pcm), 1000, delta=10)
        pcm2 = yield loader.load(self.base + "/prompt.wav")
        np.testing.assert_array_equal(pcm, pcm2)
        self.assertEqual(self.hits, [b"/prompt.wav"])

    @defer.inlineCallbacks
    def test_http_error(self):
        loader = MediaLoader(self.cache, http_get=self.get)
        with self.assertRaises(TrackError) as cm:
            yield loader.load(self.base + "/missing.wav")
        self.assertIn("404", str(cm.exception))

    @defer.inlineCallbacks
    def test_missing_local_file(self):
        with self.assertRaises(TrackError):
            yield MediaLoader(self.cache).load("/nonexistent/file.wav")


class LeadInTests(unittest.TestCase):
    """A synthesised track starts with its first word: the near-silence before it is dropped (10 ms kept)."""

    def speech(self, lead_in: int, level: int = 5, words: int = 3200) -> np.ndarray:
        quiet = np.full(lead_in, level, dtype=np.int16)
        loud = (np.sin(np.arange(words) / 5.0) * 8000).astype(np.int16)
        loud[0] = 8000
        return np.concatenate([quiet, loud])

    def played(self, track: TtsTrack) -> np.ndarray:
        track.end_of_stream()
        frames = []
        while True:
            frame = track.next_frame()
            if frame is None:
                return np.concatenate(frames)
            frames.append(frame)

    def test_lead_in_is_trimmed_to_ten_ms(self):
        track = TtsTrack("t")
        pcm = self.speech(1920)  # 120 ms of flite-like lead-in
        track.feed(pcm, trim_lead_in=True)
        out = self.played(track)
        self.assertEqual(track.lead_in_trimmed, 1920 - LEAD_IN_KEEP)
        self.assertEqual(out[LEAD_IN_KEEP], 8000)  # the first word starts after the kept 10 ms
        np.testing.assert_array_equal(out[:LEAD_IN_KEEP + 3200], pcm[1920 - LEAD_IN_KEEP:])

    def test_lead_in_spread_over_chunks(self):
        """A streaming synthesiser's silent first chunks are held, not played, until speech comes."""
        track = TtsTrack("t")
        pcm = self.speech(4000)
        for i in range(0, pcm.size, 700):
            track.feed(pcm[i:i + 700], trim_lead_in=True)
        out = self.played(track)
        np.testing.assert_array_equal(out[:LEAD_IN_KEEP + 3200], pcm[4000 - LEAD_IN_KEEP:])

    def test_only_the_start_is_trimmed(self):
        """The silence between two sentences of the track stays."""
        track = TtsTrack("t")
        first, second = self.speech(800), self.speech(2400)
        track.feed(first, trim_lead_in=True)
        track.feed(second, trim_lead_in=True)
        out = self.played(track)
        np.testing.assert_array_equal(out[:first.size - 800 + LEAD_IN_KEEP + second.size],
                                      np.concatenate([first[800 - LEAD_IN_KEEP:], second]))

    def test_at_most_half_a_second_is_dropped(self):
        track = TtsTrack("t")
        pcm = self.speech(12000)
        track.feed(pcm, trim_lead_in=True)
        out = self.played(track)
        self.assertEqual(track.lead_in_trimmed, LEAD_IN_MAX)
        np.testing.assert_array_equal(out[:pcm.size - LEAD_IN_MAX], pcm[LEAD_IN_MAX:])

    def test_untrimmed_feed_and_silent_track(self):
        """Client PCM (no trim) plays as sent; a track that never gets loud still plays what was kept."""
        track = TtsTrack("t")
        pcm = self.speech(1920)
        track.feed(pcm)
        np.testing.assert_array_equal(self.played(track)[:pcm.size], pcm)
        silent = TtsTrack("s")
        silent.feed(np.full(3000, 3, dtype=np.int16), trim_lead_in=True)
        out = self.played(silent)
        self.assertEqual(int(np.count_nonzero(out)), LEAD_IN_KEEP)
