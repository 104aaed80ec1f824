"""Codec round trips (decoded PCM compared with tolerance, never encoded bytes), resampler continuity."""

import av
import numpy as np
from twisted.trial import unittest

from activecall.media import codecs

RATE = codecs.SAMPLE_RATE


def tones(seconds=2.0, freqs=((440, 6000), (1234, 4000), (2900, 2000))):
    t = np.arange(int(RATE * seconds)) / RATE
    return sum(np.sin(2 * np.pi * f * t + i) * a for i, (f, a) in enumerate(freqs)).astype(np.int16)


def round_trip(name, pcm):
    enc, dec = codecs.create(name), codecs.create(name)
    return np.concatenate([dec.decode(enc.encode(pcm[i:i + 320])) for i in range(0, len(pcm), 320)])


def best_snr(reference, decoded, max_delay=600, skip=4000, length=20000):
    """SNR in dB at the codec's delay (searched), after the start-up transient."""
    ref = reference[skip:skip + length].astype(float)

    def snr(d):
        err = decoded[skip + d:skip + d + length].astype(float) - ref
        return 10 * np.log10((ref ** 2).sum() / max((err ** 2).sum(), 1e-9))
    return max(snr(d) for d in range(max_delay))


def dominant(pcm, rate=RATE):
    spectrum = np.abs(np.fft.rfft(pcm * np.hanning(len(pcm))))
    return np.argmax(spectrum) * rate / len(pcm)


class RoundTripTests(unittest.TestCase):
    thresholds = {"pcmu": 25, "pcma": 25, "g722": 30, "opus": 10, "l16": 90}

    def test_frames_are_20ms_and_round_trips_meet_snr(self):
        x = tones()
        for name, threshold in self.thresholds.items():
            y = round_trip(name, x)
            self.assertEqual(len(y), len(x), name)
            self.assertGreater(best_snr(x, y), threshold, name)

    def test_a_tone_keeps_its_frequency(self):
        for name in self.thresholds:
            for freq in (300, 1000, 3000):
                y = round_trip(name, tones(1.0, ((freq, 8000),)))
                self.assertAlmostEqual(dominant(y[4000:12000]), freq, delta=4, msg=(name, freq))

    def test_payload_sizes_and_clocks(self):
        frame = tones(0.02)
        cases = {"pcmu": (160, 8000, 160), "pcma": (160, 8000, 160), "g722": (160, 8000, 160),
                 "l16": (640, 16000, 320)}
        for name, (size, clock, step) in cases.items():
            codec = codecs.create(name)
            self.assertEqual(len(codec.encode(frame)), size, name)
            self.assertEqual((codec.clock_rate, codec.timestamp_step), (clock, step), name)
        opus = codecs.create("opus")
        self.assertEqual((opus.clock_rate, opus.timestamp_step, opus.payload_type), (48000, 960, 111))
        self.assertLess(len(opus.encode(frame)), 200)

    def test_l16_is_big_endian(self):
        codec = codecs.create("l16")
        self.assertEqual(codec.encode(np.array([1, -2] * 160, dtype=np.int16))[:4], b"\x00\x01\xff\xfe")
        self.assertEqual(codecs.create("l16").decode(b"\x00\x01\xff\xfe").tolist()[:2], [1, -2])

    def test_l16_at_8khz(self):
        codec = codecs.create("l16", clock_rate=8000)
        self.assertEqual((codec.clock_rate, codec.timestamp_step), (8000, 160))
        self.assertEqual(len(codec.encode(tones(0.02))), 320)

    def test_opus_decodes_stereo_from_other_encoders(self):
        # a stereo 48 kHz stream, as a browser or FreeSWITCH may send: downmixed to 16 kHz mono
        enc = av.CodecContext.create("libopus", "w")
        enc.sample_rate, enc.layout, enc.format = 48000, "stereo", "s16"
        t = np.arange(960 * 50) / 48000
        left = (np.sin(2 * np.pi * 700 * t) * 8000).astype(np.int16)
        stereo = np.stack([left, left]).T.reshape(1, -1)
        dec = codecs.create("opus")
        out = []
        for i in range(50):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(stereo[:, i * 1920:(i + 1) * 1920]),
                                               format="s16", layout="stereo")
            frame.sample_rate, frame.pts = 48000, i * 960
            for packet in enc.encode(frame):
                out.append(dec.decode(bytes(packet)))
        y = np.concatenate(out)
        self.assertGreater(len(y), 320 * 40)
        self.assertAlmostEqual(dominant(y[3200:]), 700, delta=4)
        self.assertGreater(np.abs(y[3200:]).max(), 4000)

    def test_opus_garbage_is_a_codec_error(self):
        dec = codecs.create("opus")
        with self.assertRaises(codecs.CodecError):
            dec.decode(b"\xff" * 3)

    def test_registry(self):
        self.assertIsInstance(codecs.create("PCMA"), codecs.PcmaCodec)
        self.assertEqual(codecs.create_for_payload(0).name, "pcmu")
        self.assertEqual(codecs.create_for_payload(9).name, "g722")
        opus = codecs.create_for_payload(109, "opus", 48000)
        self.assertEqual((opus.name, opus.payload_type), ("opus", 109))
        self.assertEqual(codecs.create_for_payload(97, "L16", 8000).clock_rate, 8000)
        self.assertRaises(codecs.CodecError, codecs.create, "g729")
        self.assertRaises(codecs.CodecError, codecs.create_for_payload, 18)
        self.assertRaises(codecs.CodecError, codecs.create_for_payload, 97, "iLBC", 8000)
        self.assertIsInstance(codecs.CodecError("x"), ValueError)  # the WS layer catches ValueError

    def test_conceal_is_one_frame(self):
        self.assertEqual(codecs.create("pcmu").conceal().shape, (320,))


class G711Tests(unittest.TestCase):
    def ffmpeg(self, name, direction, data):
        ctx = av.CodecContext.create(name, direction)
        ctx.sample_rate, ctx.layout = 8000, "mono"
        if direction == "w":
            ctx.format = "s16"
            frame = av.AudioFrame.from_ndarray(data.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = 8000
            return np.frombuffer(b"".join(bytes(p) for p in ctx.encode(frame)), dtype=np.uint8)
        return np.concatenate([f.to_ndarray().reshape(-1) for f in ctx.decode(av.Packet(data))])

    def test_decode_tables_match_ffmpeg(self):
        every_code = bytes(range(256))
        np.testing.assert_array_equal(codecs.ulaw_decode(every_code), self.ffmpeg("pcm_mulaw", "r", every_code))
        np.testing.assert_array_equal(codecs.alaw_decode(every_code), self.ffmpeg("pcm_alaw", "r", every_code))

    def test_encoders_agree_with_ffmpeg_within_one_step(self):
        # encoders may round differently (ecosystem.md §2): compare decoded PCM with a tolerance
        x = np.arange(-32768, 32768, 7, dtype=np.int16)
        for name, encode, decode in (("pcm_mulaw", codecs.ulaw_encode, codecs.ulaw_decode),
                                     ("pcm_alaw", codecs.alaw_encode, codecs.alaw_decode)):
            ours = decode(encode(x)).astype(int)
            theirs = decode(self.ffmpeg(name, "w", x).tobytes()).astype(int)
            tolerance = np.abs(x.astype(int)) // 16 + 32
            self.assertTrue(np.all(np.abs(ours - theirs) <= tolerance), name)
            self.assertTrue(np.all(np.abs(ours - x) <= tolerance), name)

    def test_silence_codes(self):
        self.assertEqual(codecs.ulaw_encode(np.zeros(2, dtype=np.int16)), b"\xff\xff")
        self.assertEqual(codecs.alaw_encode(np.zeros(2, dtype=np.int16)), b"\xd5\xd5")


class ResamplerTests(unittest.TestCase):
    def test_chunking_does_not_change_the_output(self):
        x = tones(0.5)
        for src, dst in ((16000, 8000), (8000, 16000), (48000, 16000), (16000, 48000), (16000, 22050)):
            whole = codecs.Resampler(src, dst)(x)
            pieces = codecs.Resampler(src, dst)
            chunked = np.concatenate([pieces(x[i:i + 77]) for i in range(0, len(x), 77)])
            np.testing.assert_array_equal(whole, chunked, err_msg=f"{src}->{dst}")
            self.assertLessEqual(abs(len(whole) - len(x) * dst / src), 1)

    def test_no_click_at_frame_edges(self):
        # a continuous tone through frame-by-frame resampling has no sample-to-sample jump bigger than the tone's
        x = tones(0.5, ((500, 10000),))
        down, up = codecs.Resampler(16000, 8000), codecs.Resampler(8000, 16000)
        y = np.concatenate([up(down(x[i:i + 320])) for i in range(0, len(x), 320)])[400:]
        max_step = 10000 * 2 * np.pi * 500 / 16000
        self.assertLess(np.abs(np.diff(y.astype(int))).max(), max_step * 1.1)

    def test_anti_alias(self):
        # 6 kHz cannot exist at 8 kHz: it must be filtered, not folded to 2 kHz
        y = codecs.Resampler(16000, 8000)(tones(0.5, ((6000, 10000),)))
        self.assertLess(np.abs(y[200:]).max(), 300)


class WholeBufferResampleTests(unittest.TestCase):
    """``audio.resample`` (TTS output, fixtures): one matrix product per buffer, equal to its definition:
    upsample by zero stuffing, the low-pass filter ("same" convolution), keep every down-th sample."""

    def test_equals_upsample_filter_decimate(self):
        from math import gcd

        from activecall import audio
        rng = np.random.default_rng(7)
        for src, dst in ((22050, 16000), (16000, 8000), (8000, 16000), (24000, 16000), (16000, 22050)):
            g = gcd(src, dst)
            up, down = dst // g, src // g
            h = audio._lowpass(1.0 / max(up, down), 24 * max(up, down) | 1) * up
            for n in (1, 3, 441, 2000):
                x = rng.normal(0, 6000, n).astype(np.int16)
                # output m = the kept sample m*down + (len(h)-1)//2 of the full convolution, where the
                # zero-stuffed input is x[j] at position j*up
                t = np.arange(-(-n * up // down)) * down + (h.size - 1) // 2
                k = t[:, None] - np.arange(n)[None, :] * up
                taps = np.where((k >= 0) & (k < h.size), h[np.clip(k, 0, h.size - 1)], 0.0)
                want = np.clip(np.rint(taps @ x.astype(np.float64)), -32768, 32767).astype(np.int16)
                got = audio.resample(x, src, dst)
                self.assertEqual(got.shape, want.shape, f"{src}->{dst}, {n}")
                self.assertLessEqual(np.abs(got.astype(int) - want.astype(int)).max(), 1, f"{src}->{dst}, {n}")


class BatchTests(unittest.TestCase):
    """encode_frames/decode_payloads: many legs' G.711 in one matrix product, same result as one by one."""

    def legs(self, n=12):
        kinds = ("pcmu", "pcma", "pcmu", "g722", "l16")
        return ([codecs.create(kinds[i % len(kinds)]) for i in range(n)],
                [codecs.create(kinds[i % len(kinds)]) for i in range(n)])

    def frames(self, n, k):
        t = (np.arange(codecs.FRAME_SAMPLES) + k * codecs.FRAME_SAMPLES) / RATE
        return [(np.sin(2 * np.pi * (200 + 150 * i) * t) * (3000 + 500 * i)).astype(np.int16) for i in range(n)]

    def test_batch_matches_one_by_one_across_frames(self):
        single, batched = self.legs()
        for k in range(6):  # the filter history carries over between frames in both paths
            frames = self.frames(len(single), k)
            want = [c.encode(f) for c, f in zip(single, frames)]
            got = codecs.encode_frames(batched, frames)
            for w, g in zip(want, got):
                diff = np.abs(np.frombuffer(w, np.uint8).astype(int) - np.frombuffer(g, np.uint8).astype(int))
                self.assertLessEqual(diff.max(), 1)  # float32 product vs float64 convolution: a code at most
            want_pcm = [c.decode(p) for c, p in zip(single, want)]
            got_pcm = codecs.decode_payloads(batched, want)
            for w, g in zip(want_pcm, got_pcm):
                self.assertEqual((g.dtype, g.shape), (w.dtype, w.shape))
                self.assertLessEqual(np.abs(w.astype(int) - g.astype(int)).max(), 1)

    def test_a_batch_larger_than_a_slice_is_coded_in_slices(self):
        """More legs than ``BATCH_ROWS``: coded slice by slice (cache-sized products), A-law and
        u-law rows kept apart in each slice, the same codes as one by one."""
        self.patch(codecs, "BATCH_ROWS", 3)
        self.assertEqual([len(p) for p in codecs._slices(list(range(10)))], [3, 3, 3, 1])
        self.assertEqual([len(p) for p in codecs._slices(list(range(7)))], [3, 3, 1])
        self.test_batch_matches_one_by_one_across_frames()

    def test_the_blocked_product_is_the_dense_one(self):
        """The banded resampling matrices multiplied block by block give the dense product."""
        rng = np.random.default_rng(1)
        for m, blocks in zip(codecs._g711_matrices(), codecs._g711_blocks()):
            self.assertLess(sum(sub.size for *_, sub in blocks), m.size / 2)  # the point of it
            x = rng.uniform(-30000, 30000, (7, m.shape[0])).astype(np.float32)
            got = codecs._banded_product(x, blocks, m.shape[1])
            np.testing.assert_allclose(got, x @ m, rtol=0, atol=0.05)

    def test_a_leg_moves_between_paths_without_a_click(self):
        (a,), (b,) = [codecs.create("pcmu")], [codecs.create("pcmu")]
        others = [codecs.create("pcmu") for _ in range(3)]
        tone = np.concatenate(self.frames(1, 0) + self.frames(1, 1) + self.frames(1, 2) + self.frames(1, 3))
        want = b"".join(a.encode(tone[i:i + 320]) for i in range(0, 1280, 320))
        got = b.encode(tone[:320])  # one by one
        got += codecs.encode_frames([b] + others, [tone[320:640]] + self.frames(3, 1))[0]  # batched
        got += b.encode(tone[640:960])  # one by one again, from the batch's history
        got += codecs.encode_frames([b] + others, [tone[960:1280]] + self.frames(3, 3))[0]
        diff = np.abs(np.frombuffer(want, np.uint8).astype(int) - np.frombuffer(got, np.uint8).astype(int))
        self.assertLessEqual(diff.max(), 1)

    def test_odd_sizes_and_refused_payloads(self):
        legs = [codecs.create("pcmu") for _ in range(3)] + [codecs.create("opus")]
        frames = [np.zeros(320, np.int16), np.zeros(100, np.int16), np.zeros(320, np.int16), np.zeros(320, np.int16)]
        out = codecs.encode_frames(legs, frames)
        self.assertEqual([len(p) for p in out[:3]], [160, 50, 160])  # a short frame goes one by one
        self.assertTrue(out[3])
        decoded = codecs.decode_payloads(legs, [b"\xff" * 160, b"\xff" * 80, b"\xff" * 160, b"\xff\xfe\xfd"])
        self.assertEqual([len(p) for p in decoded[:3]], [320, 160, 320])
        self.assertIsNone(decoded[3])  # a payload libopus refuses: None for that leg, the others decoded

    def test_filter_histories_live_in_shared_rows_given_back_with_the_codec(self):
        """Every G.711 codec's resampling histories are rows of two shared matrices (the batch
        reads and writes them with one indexed copy); a dropped codec's rows are zeroed and reused,
        and the matrices grow when every row is taken."""
        import gc
        bank = codecs._DOWN_BANK
        many = [codecs.create("pcma") for _ in range(bank.matrix.shape[0] + 5)]  # more than it had
        rows = {c.downsampler.row for c in many}
        self.assertEqual(len(rows), len(many))
        self.assertGreaterEqual(bank.matrix.shape[0], len(many))
        frames = self.frames(len(many), 0)
        codecs.encode_frames(many, frames)
        last = many[-1]
        self.assertTrue(np.any(last.downsampler._history != 0))
        np.testing.assert_array_equal(last.downsampler._history, bank.matrix[last.downsampler.row])
        row = last.downsampler.row
        del many, last
        gc.collect()
        self.assertFalse(np.any(bank.matrix[row] != 0))
        fresh = codecs.create("pcmu")
        self.assertIn(fresh.downsampler.row, rows)  # a free row is used again
        self.assertFalse(np.any(fresh.downsampler._history != 0))
