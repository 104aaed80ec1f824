"""Moonshine base-en through onnxruntime: offline English ASR whose cost follows the utterance's length.

Why: Whisper's encoder reads a fixed window (12 s here, 30 s as trained) however short the utterance, so
the final of a 3 s turn costs a whole window's encoder run after the caller stopped.  Moonshine's encoder
is variable-length (its cost grows with the audio), so a short turn's final is cheaper
(docs/speech.md, "Moonshine").

The model: ``asr.model`` = a directory with ``encoder_model.ort`` (or ``.onnx``), ``decoder_model_merged.ort``
(or ``.onnx``) and ``tokenizer.bin``; by default the one the registry package ``moonshine-cpp`` ships
(``moonshine_cpp/models/base-en``; MIT, Moonshine AI).  Only its files are used: the package's own
Python module is never imported (it loads a second onnxruntime, 1.22, through ctypes, and its
non-English paths download models).  No model is ever downloaded.

**Why the model is rewritten at load.**  The shipped ``.ort`` files keep their weights as int8 and
dequantise them *inside the graph* (Cast → Mul → Add before every MatMul), and onnxruntime does not
constant-fold an ORT-format model, so every run dequantised all the weights again: ~60 ms per decoder
step (~40 M weights), 0.6 s for a 3 s utterance, in onnxruntime 1.32 and in the wheel's own
``libmoonshine.so`` alike.  At load the graph is written back out as ONNX by onnxruntime itself
(``optimized_model_filepath``, to a temporary file that is removed at once), its If branches given the
names ONNX requires, and every int8 weight fed to an int8 operator instead of being dequantised
(``_Rewrite``: ``DynamicQuantizeMatMul`` in the encoder, 8-bit ``MatMulNBits`` in the decoder, the
token embedding gathered as int8 rows) — protobuf wire format, no ``onnx`` package.  A decoder step then
costs ~6.5 ms, a 3 s utterance ~90 ms (~12 ms and ~150 ms with the weights folded to float32, tried
first, at +770 MB).  Memory: ~+220 MB resident for the loaded model, growing by onnxruntime's arena with
the longest utterance decoded (~+100 MB after a 10 s one).

A decode starts from a **draft**: the previous decode of the same utterance, checked in one decoder pass;
the tokens the model agrees with are kept without a step each (``MoonshineEngine.decode``).

Decoding is greedy (start token 1, end token 2), the decoder's key/value cache fed back each step
(``use_cache_branch``); the cross-attention keys and values are computed at the first step only.  The
streaming strategy is whisper's (``speech/asr/whisper.py``): the utterance so far is decoded again every
``extra.step_ms`` of speech on the ``activecall-asr`` pool (text = ``asrDelta``), and when only quiet
came after the last decode, that decode is the final.  English only: another ``language`` is refused.
"""

from __future__ import annotations

import os
import tempfile
import threading
from typing import Optional

import numpy as np

from activecall.audio import SAMPLE_RATE
from activecall.speech.asr.whisper import WhisperRecognizer, in_asr_thread
from activecall.speech.base import OptionError, SpeechError
from activecall.speech.installed import module_found, remembered

START, END = 1, 2  # the decoder's start and end tokens
SPECIAL = 3  # ids below are <unk>, <s>, </s>
MIN_SAMPLES = SAMPLE_RATE // 10  # the encoder needs ~0.06 s; shorter audio holds no words anyway
MAX_SECONDS = 30  # longer audio keeps its last 30 s (the model was trained on up to ~30 s)
TOKENS_PER_SECOND = 8  # greedy decoding stops here at the latest (English speech: < ~5 tokens/s)
MODEL_FILES = ("encoder_model", "decoder_model_merged")


@remembered
def shipped_model_dir() -> Optional[str]:
    """``moonshine_cpp/models/base-en`` of the installed ``moonshine-cpp`` package (found without importing
    it), or None."""
    try:
        import importlib.util
        spec = importlib.util.find_spec("moonshine_cpp")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "models", "base-en")
    return path if model_paths(path) else None


def model_paths(path: str) -> Optional[tuple[str, str, str]]:
    """(encoder, decoder, tokenizer) files of a Moonshine model directory (``.ort`` or ``.onnx``), or None."""
    found = []
    for name in MODEL_FILES:
        for ext in (".onnx", ".ort"):
            if os.path.isfile(os.path.join(path, name + ext)):
                found.append(os.path.join(path, name + ext))
                break
        else:
            return None
    tokenizer = os.path.join(path, "tokenizer.bin")
    return (found[0], found[1], tokenizer) if os.path.isfile(tokenizer) else None


def available() -> bool:
    """onnxruntime importable and the shipped model present (no import; remembered a few seconds)."""
    return module_found("onnxruntime") and shipped_model_dir() is not None


def english(language: Optional[str]) -> bool:
    return not language or language.lower() == "auto" or language.replace("_", "-").split("-")[0].lower() == "en"


# -- the tokenizer ----------------------------------------------------------------------------------

def load_tokens(path: str) -> list[bytes]:
    """``tokenizer.bin``: one entry per token id, each a length (one byte; a varint above 127) and that
    many bytes of UTF-8 (SentencePiece's ``▁`` for a space; ids 3..258 are the raw bytes 0..255)."""
    with open(path, "rb") as f:
        data = f.read()
    tokens, i = [], 0
    while i < len(data):
        length, i = _varint(data, i)
        if i + length > len(data):
            raise SpeechError(f"asr.model: {path} is not a Moonshine tokenizer.bin (truncated)")
        tokens.append(data[i:i + length])
        i += length
    if len(tokens) < SPECIAL + 256:
        raise SpeechError(f"asr.model: {path} is not a Moonshine tokenizer.bin ({len(tokens)} tokens)")
    return tokens


def detokenize(tokens: list[bytes], ids) -> str:
    raw = b"".join(tokens[i] for i in ids if SPECIAL <= i < len(tokens))
    return raw.decode("utf-8", errors="replace").replace("\u2581", " ").strip()


# -- the ORT-format model as ONNX, its weights kept int8 (protobuf wire format) ---------------------
#
# ONNX messages and fields used (onnx.proto): ModelProto.graph = 7; GraphProto node = 1, name = 2,
# initializer = 5; NodeProto input = 1, output = 2, name = 3, op_type = 4, attribute = 5, domain = 7;
# AttributeProto name = 1, i = 3, g = 6, graphs = 11, type = 20; TensorProto dims = 1, data_type = 2,
# name = 8, raw_data = 9.

INT8, UINT8, FLOAT = 3, 2, 1  # TensorProto data types
BLOCK = 128  # MatMulNBits block length (every block of a weight has the weight's one scale)


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b, value = value & 0x7F, value >> 7
        out.append(b | 0x80 if value else b)
        if not value:
            return bytes(out)


def _fields(buf: bytes):
    """(field number, wire type, payload of a length-delimited field or None, the field's raw bytes)."""
    i = 0
    while i < len(buf):
        start = i
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        payload = None
        if wire == 0:
            _, i = _varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            length, j = _varint(buf, i)
            i = j + length
            payload = buf[j:i]
        else:
            raise SpeechError(f"asr.model: unexpected protobuf wire type {wire}")
        yield field, wire, payload, buf[start:i]


def _field(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | 2) + _encode_varint(len(payload)) + payload


def _int_field(number: int, value: int) -> bytes:
    return _encode_varint(number << 3) + _encode_varint(value)


class _Node:
    """A NodeProto's names (its other fields kept as they were)."""

    def __init__(self, raw: bytes):
        self.raw = raw
        self.inputs, self.outputs, self.op, self.domain = [], [], "", ""
        for field, wire, payload, _ in _fields(raw):
            if wire != 2:
                continue
            if field == 1:
                self.inputs.append(payload.decode())
            elif field == 2:
                self.outputs.append(payload.decode())
            elif field == 4:
                self.op = payload.decode()
            elif field == 7:
                self.domain = payload.decode()


def _node_bytes(op: str, inputs: list, outputs: list, name: str, domain: str = "", **ints) -> bytes:
    parts = [_field(1, i.encode()) for i in inputs] + [_field(2, o.encode()) for o in outputs]
    parts += [_field(3, name.encode()), _field(4, op.encode())]
    parts += [_field(5, _field(1, k.encode()) + _int_field(3, v) + _int_field(20, 2)) for k, v in ints.items()]
    if domain:
        parts.append(_field(7, domain.encode()))
    return b"".join(parts)


def _tensor_bytes(name: str, array: np.ndarray) -> bytes:
    dtype = {np.dtype(np.int8): INT8, np.dtype(np.uint8): UINT8, np.dtype(np.float32): FLOAT}[array.dtype]
    return (b"".join(_int_field(1, d) for d in array.shape) + _int_field(2, dtype) + _field(8, name.encode())
            + _field(9, np.ascontiguousarray(array).tobytes()))


def _tensor(raw: bytes) -> tuple[str, Optional[np.ndarray]]:
    """(name, array) of a TensorProto; the array None unless its data is ``raw_data`` of int8 or float."""
    name, dims, dtype, data = "", [], 0, None
    i = 0
    while i < len(raw):
        key, i = _varint(raw, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(raw, i)
            if field == 1:
                dims.append(value)
            elif field == 2:
                dtype = value
        elif wire == 2:
            length, i = _varint(raw, i)
            payload, i = raw[i:i + length], i + length
            if field == 1:  # packed dims
                j = 0
                while j < len(payload):
                    value, j = _varint(payload, j)
                    dims.append(value)
            elif field == 8:
                name = payload.decode()
            elif field == 9:
                data = payload
        else:
            i += 8 if wire == 1 else 4
    kind = {INT8: np.int8, FLOAT: np.float32}.get(dtype)
    if kind is None or data is None or len(data) != int(np.prod(dims, dtype=np.int64)) * np.dtype(kind).itemsize:
        return name, None
    return name, np.frombuffer(data, dtype=kind).reshape(dims)


class _Rewrite:
    """Weights stored as int8 with an in-graph dequantisation (``W = Cast(q) * scale + zero``, a Cast, a Mul
    and an Add per weight, run at every inference) feed their MatMuls as int8 instead:
    ``DynamicQuantizeMatMul`` (the encoder: long inputs, int8 GEMM) or 8-bit ``MatMulNBits`` (the
    decoder: one token a step, the weights read once a step); the token embedding's Gather takes its rows
    from the int8 table and dequantises only them.  A weight used otherwise (the encoder's convolutions)
    keeps its dequantisation, which onnxruntime folds into a float constant once."""

    def __init__(self, graph: bytes, kind: str):
        self.kind = kind
        self.tensors: dict[str, np.ndarray] = {}
        for field, wire, payload, _ in _fields(graph):
            if field == 5 and wire == 2:
                name, array = _tensor(payload)
                if array is not None and (array.size <= 1 or name.endswith("_quantized")):
                    self.tensors[name] = array
        self.weights: dict[str, str] = {}  # dequantised output -> base name
        producers = {}
        for field, wire, payload, _ in _fields(graph):
            if field == 1 and wire == 2:
                node = _Node(payload)
                producers.update({o: node for o in node.outputs})
        for out, node in producers.items():
            if node.op == "Add" and out.endswith("_add_tensor") and node.inputs[0].endswith("_mul_tensor"):
                base = out[:-len("_add_tensor")]
                if self._usable(base):
                    self.weights[out] = base
        self.uses: dict[str, set] = {}
        self.transposed: dict[str, str] = {}  # Transpose(dequantised) output -> base
        self._count(graph)
        self.matmul = {w for w, uses in self.uses.items() if w in self.weights and uses == {("MatMul", 1)}}
        if kind == "nbits":
            self.matmul |= {t for t, uses in self.uses.items() if t in self.transposed and uses == {("MatMul", 1)}}
        # a weight only gathered (and transposed into MatMuls above): rows gathered as int8, then dequantised
        self.gathered = {w for w in self.weights if kind == "nbits" and ("Gather", 0) in self.uses.get(w, set())
                         and self.uses[w] <= {("Gather", 0), ("Transpose", 0)}}
        self.new_tensors: dict[str, bytes] = {}

    def _usable(self, base: str) -> bool:
        q, scale, zero = (self.tensors.get(base + s) for s in ("_quantized", "_scale", "_zero_point"))
        if q is None or scale is None or zero is None or q.ndim != 2 or scale.size != 1 or zero.size != 1:
            return False
        zp = -float(zero.reshape(())) / float(scale.reshape(()))
        return float(scale.reshape(())) > 0 and abs(zp - round(zp)) < 1e-3 and -128 <= round(zp) <= 127

    def _count(self, graph: bytes) -> None:
        for field, wire, payload, _ in _fields(graph):
            if field == 1 and wire == 2:
                node = _Node(payload)
                for k, name in enumerate(node.inputs):
                    self.uses.setdefault(name, set()).add((node.op, k))
                if node.op == "Transpose" and node.inputs and node.inputs[0] in self.weights:
                    self.transposed[node.outputs[0]] = self.weights[node.inputs[0]]
                for f, w, p, _ in _fields(payload):
                    if f == 5 and w == 2:
                        for f2, w2, p2, _ in _fields(p):
                            if f2 in (6, 11) and w2 == 2:
                                self._count(p2)

    def _base(self, name: str) -> tuple[str, bool]:
        return (self.transposed[name], True) if name in self.transposed else (self.weights[name], False)

    def node(self, node: _Node, name: str):
        """The replacement of ``node``: its bytes, a list of nodes' bytes, b"" (drop it), or None (keep it)."""
        if node.op == "MatMul" and len(node.inputs) == 2 and node.inputs[1] in self.matmul:
            base, transposed = self._base(node.inputs[1])
            q = self.tensors[base + "_quantized"]
            scale = np.float32(self.tensors[base + "_scale"].reshape(()))
            zp = int(round(-float(self.tensors[base + "_zero_point"].reshape(())) / float(scale)))
            if self.kind == "dq":
                self.new_tensors.setdefault(base + "_s", _tensor_bytes(base + "_s", np.array(scale)))
                self.new_tensors.setdefault(base + "_z", _tensor_bytes(base + "_z", np.array(zp, dtype=np.int8)))
                return _node_bytes("DynamicQuantizeMatMul", [node.inputs[0], base + "_quantized", base + "_s",
                                                             base + "_z"], node.outputs, name, "com.microsoft")
            n_by_k = q if transposed else q.T  # MatMulNBits wants B as N x K, unsigned
            n, k = n_by_k.shape
            blocks = -(-k // BLOCK)
            if base + "_nb" not in self.new_tensors:
                packed = np.full((n, blocks * BLOCK), zp + 128, dtype=np.uint8)
                packed[:, :k] = (n_by_k.astype(np.int16) + 128).astype(np.uint8)
                self.new_tensors[base + "_nb"] = _tensor_bytes(base + "_nb", packed.reshape(n, blocks, BLOCK))
                self.new_tensors[base + "_nbs"] = _tensor_bytes(base + "_nbs", np.full(n * blocks, scale, np.float32))
                self.new_tensors[base + "_nbz"] = _tensor_bytes(base + "_nbz",
                                                                np.full(n * blocks, zp + 128, np.uint8))
            return _node_bytes("MatMulNBits", [node.inputs[0], base + "_nb", base + "_nbs", base + "_nbz"],
                               node.outputs, name, "com.microsoft", K=k, N=n, bits=8, block_size=BLOCK,
                               accuracy_level=4)
        if node.op == "Gather" and len(node.inputs) == 2 and node.inputs[0] in self.gathered:
            base, out = self.weights[node.inputs[0]], node.outputs[0]
            return [_node_bytes("Gather", [base + "_quantized", node.inputs[1]], [out + "_q"], name, axis=0),
                    _node_bytes("Cast", [out + "_q"], [out + "_c"], name + "_cast", to=FLOAT),
                    _node_bytes("Mul", [out + "_c", base + "_scale"], [out + "_m"], name + "_mul"),
                    _node_bytes("Add", [out + "_m", base + "_zero_point"], [out], name + "_add")]
        if node.op == "Transpose" and node.outputs and node.outputs[0] in self.matmul:
            return b""
        if node.outputs and node.outputs[0].endswith(("_cast_tensor", "_mul_tensor", "_add_tensor")):
            base = node.outputs[0].rsplit("_", 2)[0]
            if base + "_add_tensor" in self.weights and self._all_rewritten(base + "_add_tensor"):
                return b""
        return None

    def _all_rewritten(self, weight: str) -> bool:
        uses = self.uses.get(weight, set())
        if weight in self.matmul:
            return True
        transposes = [t for t, b in self.transposed.items() if b == self.weights[weight]]
        if weight in self.gathered:
            uses = uses - {("Gather", 0)}
        return uses <= {("Transpose", 0)} and all(t in self.matmul for t in transposes)

    def dropped_tensor(self, name: str) -> bool:
        for suffix in ("_quantized", "_scale", "_zero_point"):
            if name.endswith(suffix):
                base = name[:-len(suffix)]
                weight = base + "_add_tensor"
                if weight in self.weights and self._all_rewritten(weight) and weight not in self.gathered:
                    return suffix != "_quantized" or self.kind == "nbits"
        return False


def _graph(buf: bytes, name: str, rewrite: Optional[_Rewrite] = None, top: bool = False) -> bytes:
    """The GraphProto ``buf`` with its (and its subgraphs') nodes rewritten and every graph named."""
    out, named = [], False
    for k, (field, wire, payload, raw) in enumerate(_fields(buf)):
        if field == 1 and wire == 2:
            node = _Node(payload)
            new = rewrite.node(node, f"{name}_{k}") if rewrite is not None else None
            if new is None:
                new = _subgraphs(payload, f"{name}_{k}", rewrite)
                out.append(raw if new is payload else _field(1, new))
            elif isinstance(new, list):
                out.extend(_field(1, n) for n in new)
            elif new:
                out.append(_field(1, new))
        elif field == 5 and wire == 2 and top and rewrite is not None and rewrite.dropped_tensor(_tensor_name(payload)):
            continue
        else:
            named = named or (field == 2 and wire == 2 and bool(payload))
            out.append(raw)
    if top and rewrite is not None:
        out.extend(_field(5, t) for t in rewrite.new_tensors.values())
    if not named:
        out.append(_field(2, name.encode()))
    return b"".join(out)


def _tensor_name(raw: bytes) -> str:
    for field, wire, payload, _ in _fields(raw):
        if field == 8 and wire == 2:
            return payload.decode()
    return ""


def _subgraphs(buf: bytes, name: str, rewrite: Optional[_Rewrite]) -> bytes:
    """A NodeProto with the graphs in its attributes passed through ``_graph``."""
    out, changed = [], False
    for field, wire, payload, raw in _fields(buf):
        if field == 5 and wire == 2:
            attr, attr_changed = [], False
            for k, (f, w, p, r) in enumerate(_fields(payload)):
                if f in (6, 11) and w == 2:
                    attr.append(_field(f, _graph(p, f"{name}_g{k}", rewrite)))
                    attr_changed = True
                else:
                    attr.append(r)
            if attr_changed:
                out.append(_field(5, b"".join(attr)))
                changed = True
                continue
        out.append(raw)
    return b"".join(out) if changed else buf


def rewrite_model(model: bytes, kind: Optional[str] = None) -> bytes:
    """A serialised ModelProto with every subgraph named (onnxruntime writes an ORT-format model's If
    branches without one, which ONNX refuses when it is loaded again) and, with ``kind`` ("dq" or
    "nbits"), its int8 weights fed to int8 MatMuls (``_Rewrite``)."""
    out = []
    for field, wire, payload, raw in _fields(model):
        if field == 7 and wire == 2:
            out.append(_field(7, _graph(payload, "main", _Rewrite(payload, kind) if kind else None, top=True)))
        else:
            out.append(raw)
    return b"".join(out)


def ort_as_onnx(path: str, kind: Optional[str] = None) -> bytes:
    """The ORT-format model at ``path`` as ONNX bytes (written by onnxruntime to a temporary file, removed),
    through ``rewrite_model``."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    with tempfile.TemporaryDirectory(prefix="activecall-moonshine-") as tmp:
        options.optimized_model_filepath = os.path.join(tmp, "model.onnx")
        ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        with open(options.optimized_model_filepath, "rb") as f:
            return rewrite_model(f.read(), kind)


# -- the engine -------------------------------------------------------------------------------------

def _release_freed_memory() -> None:
    """Give the rewrite's freed buffers (the ONNX bytes, read twice) back to the system: glibc keeps them
    otherwise (~70 MB of RSS here).  Elsewhere than glibc: nothing to do."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MoonshineEngine:
    """One loaded model (encoder, merged decoder, tokens); thread-safe (onnxruntime sessions take
    concurrent runs)."""

    def __init__(self, path: str, threads: int = 1):
        import onnxruntime as ort

        paths = model_paths(path)
        if paths is None:
            raise SpeechError(f"asr.model {path!r} is not a Moonshine model directory (encoder_model.ort/.onnx, "
                              "decoder_model_merged.ort/.onnx, tokenizer.bin)")
        self.path = path
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.encoder, self.decoder = (
                ort.InferenceSession(ort_as_onnx(p, kind) if p.endswith(".ort") else p, options,
                                     providers=["CPUExecutionProvider"])
                for p, kind in zip(paths[:2], ("dq", "nbits")))
        except SpeechError:
            raise
        except Exception as e:
            raise SpeechError(f"asr.model {path!r}: onnxruntime cannot load it: {e}") from None
        self.tokens = load_tokens(paths[2])
        inputs = {i.name: i for i in self.decoder.get_inputs()}
        past = [n for n in inputs if n.startswith("past_key_values.")]
        needed = {"input_ids", "encoder_hidden_states", "use_cache_branch"}
        if not past or not needed <= set(inputs) or [i.name for i in self.encoder.get_inputs()] != ["input_values"]:
            raise SpeechError(f"asr.model {path!r}: not a Moonshine encoder / merged decoder pair")
        heads, head_dim = inputs[past[0]].shape[1], inputs[past[0]].shape[3]
        self.empty = {n: np.zeros((1, heads, 0, head_dim), dtype=np.float32) for n in past}
        self.outputs = [o.name for o in self.decoder.get_outputs()]
        self.presents = [(k, n.replace("present.", "past_key_values.", 1), ".encoder." in n)
                         for k, n in enumerate(self.outputs) if n.startswith("present.")]
        _release_freed_memory()

    def transcribe(self, pcm: np.ndarray) -> str:
        """Text of ``pcm`` (16 kHz int16; longer than 30 s keeps its last 30 s)."""
        return detokenize(self.tokens, self.decode(pcm))

    def text(self, ids: list) -> str:
        return detokenize(self.tokens, ids)

    def decode(self, pcm: np.ndarray, draft=()) -> list:
        """Greedy token ids of ``pcm``.  ``draft`` (the ids of an earlier decode of the same utterance's
        beginning) is checked in one decoder pass: the longest prefix the model itself would have chosen
        is kept as it is, so only the tokens after it cost a step each.  The result is the plain greedy
        decode's (a draft only saves steps), up to floating-point ties."""
        audio = pcm.astype(np.float32)[-MAX_SECONDS * SAMPLE_RATE:] / 32768.0
        if audio.size < MIN_SAMPLES:
            return []
        limit = int(audio.size / SAMPLE_RATE * TOKENS_PER_SECOND) + 4
        draft = [int(t) for t in draft][:limit - 1]
        [hidden] = self.encoder.run(None, {"input_values": audio[None, :]})
        feeds = dict(self.empty)
        feeds["encoder_hidden_states"] = hidden
        feeds["input_ids"] = np.array([[START] + draft], dtype=np.int64)
        feeds["use_cache_branch"] = np.array([False])
        out = self.decoder.run(None, feeds)
        predicted = out[0][0].argmax(-1)  # the token after each position
        kept = 0
        while kept < len(draft) and predicted[kept] == draft[kept]:
            kept += 1
        ids = draft[:kept]
        token = int(predicted[kept])
        for k, name, cross in self.presents:  # the self-attention cache up to the kept prefix
            feeds[name] = out[k] if cross or kept == len(draft) else np.ascontiguousarray(out[k][:, :, :kept + 1])
        feeds["use_cache_branch"] = np.array([True])
        while token != END and len(ids) < limit:
            ids.append(token)
            feeds["input_ids"] = np.array([[token]], dtype=np.int64)
            out = self.decoder.run(None, feeds)
            token = int(out[0][0, -1].argmax())
            for k, name, cross in self.presents:
                if not cross:  # the cross-attention cache is made at the first pass only
                    feeds[name] = out[k]
        return ids


_engines: dict = {}
_engines_lock = threading.Lock()


def shared_engine(path: str, threads: int = 1) -> MoonshineEngine:
    """One engine per (model, threads) in the process, loaded on first use (on a worker)."""
    key = (path, threads)
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = MoonshineEngine(path, threads)
        return engine


def warm() -> None:
    """Load the shipped model as the recogniser's default options will use it (daemon start-up, on the pool)."""
    path = shipped_model_dir()
    if path is not None:
        shared_engine(path, 1).decode(np.zeros(SAMPLE_RATE, dtype=np.int16))


class MoonshineRecognizer(WhisperRecognizer):
    """Whisper's streaming (re-decode the utterance so far every ``step_ms``; a quiet tail reuses the last
    decode as the final) over the Moonshine engine."""

    name = "moonshine"

    def __init__(self, options, on_result, run_in_thread=None, engine=None, **kw):
        if not module_found("onnxruntime"):
            raise SpeechError("asr provider 'moonshine' needs the package onnxruntime")
        if not english(options.language):
            raise SpeechError(f"asr provider 'moonshine': the Moonshine model is English-only; language "
                              f"{options.language!r} needs another recogniser (e.g. sensevoice or aliyun for zh)")
        self.model_dir = options.modelType or shipped_model_dir()
        if not self.model_dir:
            raise SpeechError("asr provider 'moonshine' needs a model: install the package moonshine-cpp "
                              "or set asr.model to a Moonshine model directory")
        if model_paths(self.model_dir) is None:
            raise SpeechError(f"asr.model {self.model_dir!r} is not a Moonshine model directory "
                              "(encoder_model.ort/.onnx, decoder_model_merged.ort/.onnx, tokenizer.bin)")
        extra = options.extra
        try:
            self.step_ms = int(extra.get("step_ms", 500))
            self.threads = int(extra.get("threads", 1))
        except ValueError as e:
            raise OptionError(f"asr.extra: moonshine step_ms/threads: {e}") from None
        if self.step_ms < 100 or self.threads < 1:
            raise OptionError("asr.extra: moonshine step_ms >= 100, threads >= 1")
        self.language = "en"
        self.partial_every_ms = self.step_ms
        super(WhisperRecognizer, self).__init__(options, on_result, run_in_thread=run_in_thread or in_asr_thread,
                                                **kw)
        self._engine = engine
        if engine is None and not self._take_loaded_engine():
            # load (and rewrite) the shared model now, on the pool, while the call is set up: not on the
            # caller's first utterance (a failure shows again, and is reported, at the first decode)
            self.run_in_thread(self.engine).addErrback(lambda failure: None)
        self._audio = np.zeros(0, dtype=np.int16)
        self._decoded = 0
        self._decoded_text = ""
        self._queued = 0
        self._lock = threading.Lock()

    def _take_loaded_engine(self) -> bool:
        # no lock: ``shared_engine`` holds it for the whole load (seconds, on a worker) and this runs on the
        # reactor at call set-up; an engine is put in the dict only once it is built
        engine = _engines.get((self.model_dir, self.threads))
        self._engine = engine
        return engine is not None

    def engine(self) -> MoonshineEngine:
        if self._engine is None:
            self._engine = shared_engine(self.model_dir, self.threads)
        return self._engine

    def _begin(self) -> None:
        super()._begin()
        self._draft: list = []

    def _transcribe(self) -> str:
        """The utterance so far, the last decode's tokens as the draft (a partial's words are mostly the
        next decode's first words, so the final costs the encoder, one decoder pass and a few steps)."""
        engine = self.engine()
        self._draft = engine.decode(self._audio, getattr(self, "_draft", []))
        text = engine.text(self._draft)
        self._decoded, self._decoded_text = self._audio.size, text
        return text
