"""Recording options that now have effect: ``samplerate`` (resampled from the 16 kHz pipeline),
``format`` wav/pcm, ``[recording] filename_pattern`` placeholders, ``pauseRecording`` /
``resumeRecording`` (silence in the file, the span in the CDR), and the file staying valid
after every flush (crash safety) at every rate."""

import dataclasses
import json
import os
import struct
import wave
from datetime import datetime

import numpy as np
from twisted.internet import defer, task
from twisted.trial import unittest

from activecall.audio import FRAME_SAMPLES
from activecall.call.cdr import LocalCdrWriter
from activecall.call.session import CallSession
from activecall.config import ConfigError, load_config
from activecall.filenames import check_pattern, expand_pattern
from activecall.media.recorder import BOT, CALLER, WavRecorder
from activecall.protocol import commands as cmd
from tests.test_config import ConfigFileMixin


def tone(freq, seconds, rate=16000, amplitude=8000):
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def peak_hz(samples, rate):
    spectrum = np.abs(np.fft.rfft(samples.astype(float)))
    return np.fft.rfftfreq(samples.size, 1 / rate)[int(np.argmax(spectrum))]


def read_wav(path):
    with wave.open(path) as w:
        rate = w.getframerate()
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, w.getnchannels())
    return rate, data


class RecorderFileTests(unittest.TestCase):
    def test_8khz_wav_keeps_the_tone_and_the_length(self):
        path = self.mktemp() + ".wav"
        clock = task.Clock()
        rec = WavRecorder(path, rate=8000, ptime_ms=20, clock=clock)
        caller, bot = tone(440, 1.0), tone(1000, 1.0)
        for i in range(0, caller.size, FRAME_SAMPLES):
            clock.advance(0.02)
            rec.write(CALLER, caller[i:i + FRAME_SAMPLES])
            rec.write(BOT, bot[i:i + FRAME_SAMPLES])
        rec.close()
        rate, data = read_wav(path)
        self.assertEqual(rate, 8000)
        self.assertEqual(data.shape, (8000, 2))
        self.assertAlmostEqual(peak_hz(data[:, 0], 8000), 440, delta=2)
        self.assertAlmostEqual(peak_hz(data[:, 1], 8000), 1000, delta=2)
        self.assertEqual(rec.size, os.path.getsize(path))

    def test_48khz_is_valid_after_every_flush(self):
        path = self.mktemp() + ".wav"
        rec = WavRecorder(path, rate=48000, ptime_ms=20)
        pcm = tone(300, 0.2)
        for i in range(0, pcm.size, FRAME_SAMPLES):
            rec.write(CALLER, pcm[i:i + FRAME_SAMPLES])
            # not closed: what a crash would leave must be a whole WAV whose header matches its size
            with open(path, "rb") as f:
                head = f.read(44)
                f.seek(0, os.SEEK_END)
                size = f.tell()
            self.assertEqual(head[:4], b"RIFF")
            self.assertEqual(struct.unpack("<I", head[24:28])[0], 48000)
            self.assertEqual(struct.unpack("<I", head[40:44])[0], size - 44)
        rec.close()
        rate, data = read_wav(path)
        self.assertEqual((rate, data.shape[0]), (48000, 3 * pcm.size))

    def test_pcm_is_raw_interleaved_stereo(self):
        path = self.mktemp() + ".pcm"
        rec = WavRecorder(path, ptime_ms=200, file_format="pcm")
        rec.write(CALLER, np.full(FRAME_SAMPLES, 7, dtype=np.int16))
        rec.write(BOT, np.full(FRAME_SAMPLES, -3, dtype=np.int16))
        rec.close()
        raw = np.fromfile(path, dtype="<i2").reshape(-1, 2)
        self.assertEqual(raw.shape, (FRAME_SAMPLES, 2))
        self.assertTrue((raw[:, 0] == 7).all() and (raw[:, 1] == -3).all())
        self.assertEqual(rec.size, FRAME_SAMPLES * 4)

    def test_paused_audio_is_written_as_silence(self):
        path = self.mktemp() + ".wav"
        rec = WavRecorder(path, ptime_ms=20)
        one = np.full(FRAME_SAMPLES, 5, dtype=np.int16)
        rec.write(CALLER, one)
        rec.paused = True
        rec.write(CALLER, one)
        rec.paused = False
        rec.write(CALLER, one)
        rec.close()
        _, data = read_wav(path)
        self.assertEqual(data.shape[0], 3 * FRAME_SAMPLES)
        self.assertTrue((data[:FRAME_SAMPLES, 0] == 5).all())
        self.assertFalse(data[FRAME_SAMPLES:2 * FRAME_SAMPLES, 0].any())
        self.assertTrue((data[2 * FRAME_SAMPLES:, 0] == 5).all())

    def test_bad_format_and_rate_are_refused(self):
        self.assertRaises(ValueError, WavRecorder, self.mktemp(), file_format="g722")
        self.assertRaises(ValueError, WavRecorder, self.mktemp(), rate=11025)


class PatternTests(unittest.TestCase):
    def test_placeholders(self):
        name = expand_pattern("{date}/{caller}-{callee}-{id}-{direction}", "s.1",
                              {"date": "20260101", "caller": "1001", "callee": "../etc", "direction": "inbound"})
        self.assertTrue(name.startswith("20260101/1001-"))
        self.assertNotIn("..", name.split("/", 1)[1].split("-s.1")[0].replace("~", ""))
        self.assertTrue(name.endswith("-s.1-inbound"))

    def test_unknown_placeholder_is_an_error(self):
        self.assertEqual(check_pattern("{id}_{datetime}"), "{id}_{datetime}")
        with self.assertRaises(ValueError) as cm:
            check_pattern("{uuid}")
        self.assertIn("{uuid}", str(cm.exception))


class ConfigTests(ConfigFileMixin, unittest.TestCase):
    def test_original_keys_accepted(self):
        cfg = self.load('[recording]\nfilename_pattern = "{date}/{id}"\nformat = "pcm"\nsamplerate = 8000\n')
        self.assertEqual((cfg.recording.filename_pattern, cfg.recording.format, cfg.recording.samplerate),
                         ("{date}/{id}", "pcm", 8000))

    def test_bad_values_name_the_key(self):
        self.assertBad('[recording]\nfilename_pattern = "{nope}"\n', "recording.filename_pattern", "nope")
        self.assertBad('[recording]\nformat = "mp3"\n', "recording.format", "mp3")


def immediate(f, *a, **kw):
    return defer.maybeDeferred(f, *a, **kw)


class SessionRecordingTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_767_225_600)  # 2026-01-01T00:00:00Z
        self.events = []
        root = os.path.abspath(self.mktemp())
        cfg, _ = load_config(None)
        self.cdr_root = os.path.join(root, "cdr")
        self.cfg = dataclasses.replace(cfg, recording=dataclasses.replace(
            cfg.recording, enabled=True, auto_start=True, path=os.path.join(root, "rec"),
            filename_pattern="{date}/{caller}_{id}"))
        self.cdr = LocalCdrWriter(self.cdr_root, run=immediate)

    def make(self, option):
        s = CallSession("s9", "webSocket", clock=self.clock, emit=self.events.append, config=self.cfg,
                        cdr_writer=self.cdr)
        s.option = option
        return s

    def cdr_record(self):
        found = [os.path.join(d, f) for d, _, fs in os.walk(self.cdr_root) for f in fs if f.endswith(".json")]
        self.assertEqual(len(found), 1)
        with open(found[0]) as f:
            return json.load(f)

    def test_option_samplerate_format_and_the_pattern(self):
        s = self.make(cmd.CallOption(caller="sip:alice@example.com",
                                     recorder=cmd.RecorderOption(samplerate=8000, format="pcm")))
        s.answered()
        self.assertEqual(os.path.relpath(s.recorder.path, self.cfg.recording.path), "20260101/alice_s9.pcm")
        for _ in range(50):
            s.audio_in(np.full(FRAME_SAMPLES, 100, dtype=np.int16))
            self.clock.advance(0.02)
        self.successResultOf(s.end("caller"))
        raw = np.fromfile(s.recorder.path, dtype="<i2").reshape(-1, 2)
        self.assertEqual(raw.shape[0], 8000)  # one second at 8 kHz
        self.assertEqual([e for e in self.events if e.TAG == "error"], [])
        [recording] = self.cdr_record()["recorder"]
        self.assertEqual((recording["format"], recording["samplerate"]), ("pcm", 8000))
        self.assertNotIn("pauses", recording)

    def test_pause_and_resume_commands(self):
        s = self.make(cmd.CallOption())
        s.answered()
        voice = np.full(FRAME_SAMPLES, 1000, dtype=np.int16)

        def talk(frames):
            for _ in range(frames):
                s.audio_in(voice)
                self.clock.advance(0.02)

        talk(25)
        s.receive_frame('{"command":"pauseRecording"}')
        talk(25)  # "my card number is ..."
        s.receive_frame('{"command":"resumeRecording"}')
        talk(25)
        self.successResultOf(s.end("caller"))
        rate, data = read_wav(s.recorder.path)
        self.assertEqual(rate, 16000)
        half = 25 * FRAME_SAMPLES
        self.assertEqual(data.shape[0], 3 * half)
        self.assertTrue((data[:half, 0] == 1000).all())
        self.assertFalse(data[half:2 * half, 0].any())
        self.assertTrue((data[2 * half:, 0] == 1000).all())
        [recording] = self.cdr_record()["recorder"]
        [pause] = recording["pauses"]
        start, end = (datetime.fromisoformat(pause[k]).timestamp() - 1_767_225_600 for k in ("startTime", "endTime"))
        self.assertAlmostEqual(start, 0.5, places=3)
        self.assertAlmostEqual(end, 1.0, places=3)

    def test_pause_without_recording_is_an_error(self):
        self.cfg = dataclasses.replace(self.cfg, recording=dataclasses.replace(self.cfg.recording, enabled=False))
        s = self.make(cmd.CallOption())
        s.answered()
        s.receive_frame('{"command":"pauseRecording"}')
        self.assertEqual(self.events[-1].TAG, "error")
        self.assertIn("not being recorded", self.events[-1].error)

    def test_unsupported_format_is_named(self):
        s = self.make(cmd.CallOption(recorder=cmd.RecorderOption(format="g722")))
        s.answered()
        [error] = [e for e in self.events if e.TAG == "error"]
        self.assertEqual(error.sender, "recorder")
        self.assertIn("recorder.format 'g722'", error.error)
        self.assertTrue(s.recorder.path.endswith(".wav"))
        s.end("caller")
