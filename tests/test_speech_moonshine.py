"""The moonshine recogniser (Moonshine base-en shipped by moonshine-cpp, through onnxruntime): real decoding
with generous expectations, the model rewrite at load, the protobuf helpers, scheduling and error paths."""

from __future__ import annotations

import os

import numpy as np
from twisted.internet import defer
from twisted.trial import unittest

from activecall.speech import registry
from activecall.speech.asr import moonshine
from activecall.speech.base import OptionError, SpeechError
from activecall.speech.installed import module_found
from activecall.speech.testing import frames, synthesize_pcm

needs_model = None if moonshine.available() else "onnxruntime or moonshine-cpp (its base-en model) not installed"
needs_ort = None if module_found("onnxruntime") else "onnxruntime not installed"


def _sync(f, *args):
    return defer.maybeDeferred(f, *args)


class FakeEngine:
    """Ids = [samples decoded]; records each decode's size and the draft it was given."""

    def __init__(self):
        self.calls = []
        self.drafts = []

    def decode(self, pcm, draft=()):
        self.calls.append(pcm.size)
        self.drafts.append(list(draft))
        return [pcm.size]

    def text(self, ids):
        return f"heard {ids[0]}"


def _graphs(model: bytes):
    """Every graph of a serialised ModelProto (the top graph, then its nodes' subgraphs), as bytes."""

    def walk(buf):
        yield buf
        for field, wire, payload, _ in moonshine._fields(buf):
            if field == 1 and wire == 2:  # a node: its attributes' graphs (If branches)
                for f, w, p, _ in moonshine._fields(payload):
                    if f == 5 and w == 2:
                        for f2, w2, p2, _ in moonshine._fields(p):
                            if f2 == 6 and w2 == 2:
                                yield from walk(p2)

    for field, wire, payload, _ in moonshine._fields(model):
        if field == 7 and wire == 2:
            yield from walk(payload)


def _graph_names(model: bytes) -> list:
    """Names of every graph in a serialised ModelProto (the top graph and its nodes' subgraphs)."""
    return [payload.decode() for buf in _graphs(model)
            for field, wire, payload, _ in moonshine._fields(buf) if field == 2 and wire == 2]


def _ops(model: bytes) -> dict:
    """op type -> count over every graph of a serialised ModelProto; "dequantise" counts the Casts of
    int8 weights (``*_quantized``)."""
    counts: dict = {}
    for buf in _graphs(model):
        for field, wire, payload, _ in moonshine._fields(buf):
            if field == 1 and wire == 2:
                node = moonshine._Node(payload)
                counts[node.op] = counts.get(node.op, 0) + 1
                if node.op == "Cast" and node.inputs[0].endswith("_quantized"):
                    counts["dequantise"] = counts.get("dequantise", 0) + 1
    return counts


class WireFormatTests(unittest.TestCase):
    """The protobuf helpers on hand-made messages (no model needed)."""

    def test_varints_round_trip(self):
        for value in (0, 1, 127, 128, 300, 2 ** 35 + 7):
            encoded = moonshine._encode_varint(value)
            self.assertEqual(moonshine._varint(encoded + b"\x00", 0), (value, len(encoded)))

    def test_unnamed_subgraphs_get_names_and_named_ones_keep_theirs(self):
        F = moonshine._field
        then_branch = F(1, F(4, b"Identity"))  # a graph with one node, no name
        else_branch = F(1, F(4, b"Identity")) + F(2, b"mine")
        if_node = (F(1, b"cond") + F(4, b"If")
                   + F(5, F(1, b"then_branch") + F(6, then_branch))
                   + F(5, F(1, b"else_branch") + F(6, else_branch)))
        model = moonshine._int_field(1, 10) + F(7, F(1, if_node) + F(2, b"top"))
        out = moonshine.rewrite_model(model)
        names = _graph_names(out)
        self.assertEqual(len(names), 3)
        self.assertEqual({"top", "mine"} & set(names), {"top", "mine"})
        self.assertTrue(all(names), names)
        self.assertEqual(len(set(names)), 3)
        self.assertEqual(len(_graph_names(moonshine.rewrite_model(out))), 3)  # named once: no second name
        self.assertEqual(out[:2], model[:2])  # fields other than the graph kept as they were

    def test_tensors_round_trip(self):
        for array in (np.arange(-6, 6, dtype=np.int8).reshape(3, 4), np.array(0.5, dtype=np.float32)):
            name, back = moonshine._tensor(moonshine._tensor_bytes("w", array))
            self.assertEqual(name, "w")
            np.testing.assert_array_equal(back, array)

    def test_tokens_and_detokenize(self):
        path = self.mktemp()
        pieces = [b"<unk>", b"<s>", b"</s>"] + [bytes([i]) for i in range(256)] + ["▁hello".encode(), b"," ,
                                                                                    "▁wörld".encode()]
        with open(path, "wb") as f:
            f.write(b"".join(bytes([len(p)]) + p for p in pieces))
        tokens = moonshine.load_tokens(path)
        self.assertEqual(len(tokens), len(pieces))
        self.assertEqual(moonshine.detokenize(tokens, [1, 259, 260, 261, 2]), "hello, wörld")
        self.assertEqual(moonshine.detokenize(tokens, [259, 3 + 0x41, 99999]), "helloA")  # byte token; unknown id
        with open(path, "wb") as f:
            f.write(b"\x05abc")
        with self.assertRaises(SpeechError):
            moonshine.load_tokens(path)

    def test_english_codes(self):
        self.assertEqual([moonshine.english(c) for c in ("en", "en-US", "en_GB", "auto", None, "zh-CN", "de")],
                         [True, True, True, True, True, False, False])


class SchedulingAndErrorTests(unittest.TestCase):
    skip = needs_ort

    def make(self, engine, **extra):
        results = []
        asr = registry.create_recognizer(
            {"provider": "moonshine", "model": self.model_dir(), "extra": {"endpointing": "external", **extra}},
            results.append, run_in_thread=_sync, engine=engine)
        return asr, results

    def model_dir(self):
        """A directory that looks like a Moonshine model (the fake engine never reads it)."""
        path = self.mktemp()
        os.makedirs(path)
        for name in ("encoder_model.ort", "decoder_model_merged.ort", "tokenizer.bin"):
            open(os.path.join(path, name), "wb").close()
        return path

    @defer.inlineCallbacks
    def test_partials_every_step_and_a_quiet_tail_reuses_the_last_decode(self):
        engine = FakeEngine()
        asr, results = self.make(engine, step_ms="500")
        speech = (np.sin(np.arange(16000) / 5.0) * 8000).astype(np.int16)
        for f in frames(np.concatenate([speech, np.zeros(3200, dtype=np.int16)])):
            asr.feed(f)
        asr.end_utterance()
        yield asr.close()
        self.assertEqual(engine.calls, [8000, 16000])
        self.assertEqual([(r.final, r.text) for r in results],
                         [(False, "heard 8000"), (False, "heard 16000"), (True, "heard 16000")])

    @defer.inlineCallbacks
    def test_speech_after_the_last_step_is_decoded_at_the_end(self):
        engine = FakeEngine()
        asr, results = self.make(engine, step_ms="500")
        speech = (np.sin(np.arange(19200) / 5.0) * 8000).astype(np.int16)
        for f in frames(speech):
            asr.feed(f)
        asr.end_utterance()
        yield asr.close()
        self.assertEqual(engine.calls, [8000, 16000, 19200])
        self.assertEqual(engine.drafts, [[], [8000], [16000]])  # each decode checks the one before
        self.assertEqual(results[-1].text, "heard 19200")
        self.assertTrue(results[-1].final)

    @defer.inlineCallbacks
    def test_a_new_utterance_starts_without_a_draft(self):
        engine = FakeEngine()
        asr, results = self.make(engine, step_ms="500")
        speech = (np.sin(np.arange(9600) / 5.0) * 8000).astype(np.int16)
        for _ in range(2):
            for f in frames(speech):
                asr.feed(f)
            asr.end_utterance()
        yield asr.close()
        self.assertEqual(engine.calls, [8000, 9600, 8000, 9600])
        self.assertEqual(engine.drafts, [[], [8000], [], [8000]])
        self.assertEqual([r.text for r in results if r.final], ["heard 9600", "heard 9600"])

    def test_refuses_other_languages_and_bad_options(self):
        for language in ("zh-CN", "de"):
            with self.assertRaises(SpeechError) as e:
                registry.create_recognizer({"provider": "moonshine", "language": language}, lambda r: None,
                                           engine=FakeEngine())
            self.assertIn("English-only", str(e.exception))
        for extra in ({"step_ms": "50"}, {"threads": "0"}, {"step_ms": "often"}):
            with self.assertRaises(OptionError):
                registry.create_recognizer({"provider": "moonshine", "model": self.model_dir(), "extra": extra},
                                           lambda r: None, engine=FakeEngine())
        with self.assertRaises(SpeechError) as e:
            registry.create_recognizer({"provider": "moonshine", "model": "/nonexistent"}, lambda r: None)
        self.assertIn("asr.model", str(e.exception))

    def test_set_up_never_waits_for_a_model_load_in_progress(self):
        """The recogniser is made on the reactor at call set-up; the shared model may be loading on a worker
        meanwhile (the daemon's start-up warm-up holds the engines' lock for seconds): set-up must not wait
        for that lock (it did: a call in the first seconds of the daemon held the reactor until the load
        ended, and a REFER got its 202 only after sipp's retransmissions)."""

        class LoadInProgress:
            def __enter__(self):
                raise AssertionError("call set-up waited for the engines' lock")

            def __exit__(self, *exc):
                return False

        self.patch(moonshine, "_engines_lock", LoadInProgress())
        started = []
        registry.create_recognizer({"provider": "moonshine", "model": self.model_dir(),
                                    "extra": {"endpointing": "external"}},
                                   lambda r: None, run_in_thread=lambda f, *a: started.append(f) or defer.Deferred())
        self.assertEqual(len(started), 1, "the model is loaded on the pool, not on the reactor")

    def test_no_model_installed_says_what_to_install(self):
        self.patch(moonshine, "shipped_model_dir", lambda: None)
        with self.assertRaises(SpeechError) as e:
            registry.create_recognizer({"provider": "moonshine"}, lambda r: None)
        self.assertIn("moonshine-cpp", str(e.exception))

    def test_a_broken_model_is_reported_at_load(self):
        with self.assertRaises(SpeechError) as e:
            moonshine.MoonshineEngine(self.model_dir())
        self.assertIn("asr.model", str(e.exception))


class MoonshineModelTests(unittest.TestCase):
    skip = needs_model
    timeout = 180

    def test_rewrite_feeds_int8_weights_to_int8_matmuls(self):
        """Why the rewrite exists: the shipped graphs dequantise every weight at every run (Cast, Mul, Add
        before each MatMul).  After it, every MatMul weight is read as int8, the decoder's token embedding
        is gathered as int8 rows, and only the encoder's three convolutions keep the (then constant-folded)
        dequantisation."""
        path = moonshine.shipped_model_dir()
        shipped = [_ops(moonshine.ort_as_onnx(os.path.join(path, f + ".ort"))) for f in moonshine.MODEL_FILES]
        self.assertEqual([ops["dequantise"] for ops in shipped], [51, 81])
        encoder = _ops(moonshine.ort_as_onnx(os.path.join(path, "encoder_model.ort"), "dq"))
        decoder = _ops(moonshine.ort_as_onnx(os.path.join(path, "decoder_model_merged.ort"), "nbits"))
        self.assertEqual(encoder["dequantise"], 3)  # the convolutions
        self.assertEqual(encoder["DynamicQuantizeMatMul"], 48)
        self.assertNotIn("dequantise", decoder)  # the token embedding: its gathered rows, not the table
        self.assertGreaterEqual(decoder["MatMulNBits"], 80 + 2)  # every weight, the lm_head in both branches
        self.assertEqual(decoder["MatMul"], shipped[1]["MatMul"] - decoder["MatMulNBits"])

    def test_rewritten_encoder_agrees_with_the_shipped_one(self):
        import onnxruntime as ort
        path = os.path.join(moonshine.shipped_model_dir(), "encoder_model.ort")
        rng = np.random.default_rng(3)
        audio = (np.sin(np.arange(32000) / 9.0) * 0.3 + rng.normal(0, 0.02, 32000)).astype(np.float32)[None]
        original = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"input_values": audio})[0]
        rewritten = ort.InferenceSession(moonshine.ort_as_onnx(path, "dq"), providers=["CPUExecutionProvider"]).run(
            None, {"input_values": audio})[0]
        self.assertEqual(original.shape, rewritten.shape)
        cosine = float(np.sum(original * rewritten) / np.linalg.norm(original) / np.linalg.norm(rewritten))
        self.assertGreater(cosine, 0.98)

    def test_silence_and_too_short_audio_give_no_words(self):
        engine = moonshine.shared_engine(moonshine.shipped_model_dir())
        self.assertIs(engine, moonshine.shared_engine(moonshine.shipped_model_dir()))
        self.assertEqual(engine.transcribe(np.zeros(16000, dtype=np.int16)), "")
        self.assertEqual(engine.transcribe(np.full(800, 3000, dtype=np.int16)), "")

    @defer.inlineCallbacks
    def test_a_draft_saves_steps_not_words(self):
        """An earlier decode's tokens as the draft (right, partly right, or wrong) give the plain decode."""
        speech = yield synthesize_pcm("Please send the invoice to Maria Johnson.", "rms")
        engine = moonshine.shared_engine(moonshine.shipped_model_dir())
        plain = engine.decode(speech)
        self.assertIn("invoice", engine.text(plain).lower())
        partial = engine.decode(speech[:speech.size * 2 // 3])
        for draft in (partial, plain, plain + [500, 600], [500, 600, 700], list(range(1000, 1400))):
            self.assertEqual(engine.decode(speech, draft), plain)

    @defer.inlineCallbacks
    def test_flite_speech_through_g711_is_recognised(self):
        from activecall.audio import resample, ulaw_decode, ulaw_encode
        speech = yield synthesize_pcm("My phone number is five five five, one two three four.", "rms")
        line = resample(ulaw_decode(ulaw_encode(resample(speech, 16000, 8000))), 8000, 16000)
        results = []
        asr = registry.create_recognizer({"provider": "moonshine", "extra": {"endpointing": "external"}},
                                         results.append)
        for f in frames(np.concatenate([line, np.zeros(4800, dtype=np.int16)])):
            asr.feed(f)
        yield asr.close()
        finals = [r for r in results if r.final]
        self.assertEqual(len(finals), 1)
        text = finals[0].text.lower()
        self.assertIn("phone", text)
        self.assertTrue("555" in text.replace("-", "").replace(" ", "") or "five" in text, text)
