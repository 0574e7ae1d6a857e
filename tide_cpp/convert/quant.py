"""Storage types: which ggml type each tensor gets, and the encoding of a slice of rows into it.

bf16 from a bf16 source keeps the source's bits; f16 is numpy's round-to-nearest-even cast
(as torch's .to(float16)); q8_0 is gguf.quants.quantize (ggml's block_q8_0, bit-identical);
q4_0, q4_k, q5_k and q6_k are the native library's quantizer (tide_quantize, the bytes of ggml's
reference quantizer), run through ctypes on its own thread pool.

The quantized outtypes are mixes named as llama.cpp's file types (docs/QUANTIZATION.md has the
table): `mix_type` is the one place the rule is written, for the converter and for
`tide-cli quantize` alike. A matrix whose rows are not a whole number of blocks of its type
falls back to the nearest type that fits (`fallback`), and the caller says so."""

import re

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import quants

from .safetensors_reader import to_f32

# outtype -> the base type of its matrices
OUTTYPES = {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0, "q4_0": QT.Q4_0,
            "q4_k_m": QT.Q4_K, "q5_k_m": QT.Q5_K, "q6_k": QT.Q6_K}
# llama.cpp's LLAMA_FTYPE numbers for general.file_type.
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32, "q4_0": 2, "q4_k_m": 15, "q5_k_m": 17,
              "q6_k": 18}
Q8_BLOCK = 32
BLOCK = {QT.F32: 1, QT.F16: 1, QT.BF16: 1, QT.Q8_0: 32, QT.Q4_0: 32, QT.Q4_K: 256, QT.Q5_K: 256,
         QT.Q6_K: 256}
BLOCK_BYTES = {QT.F32: 4, QT.F16: 2, QT.BF16: 2, QT.Q8_0: 34, QT.Q4_0: 18, QT.Q4_K: 144,
               QT.Q5_K: 176, QT.Q6_K: 210}
# Types the native quantizer writes (the rest are numpy / gguf.quants).
NATIVE = (QT.Q4_0, QT.Q4_K, QT.Q5_K, QT.Q6_K)
# When rows are not a whole number of blocks: the nearest type in bits per weight that fits.
FALLBACK = {QT.Q4_K: QT.Q4_0, QT.Q5_K: QT.Q8_0, QT.Q6_K: QT.Q8_0, QT.Q4_0: QT.F16,
            QT.Q8_0: QT.F16}

_LAYER = re.compile(r"^blk\.(\d+)\.")


def use_more_bits(layer, n_layer):
    """llama.cpp's choice of the layers whose ffn_down gets more bits in the _M mixes: the first
    and last eighth, and every third layer between."""
    return layer < n_layer // 8 or layer >= 7 * n_layer // 8 or (layer - n_layer // 8) % 3 == 2


def mix_type(name, outtype, n_layer):
    """The ggml type of matrix `name` (a GGUF tensor name) in outtype, before the block check.

    q4_k_m / q5_k_m: matrices at the base type (Q4_K / Q5_K) except attention (attn_qkv,
    attn_output) one step up (Q5_K / Q6_K), output.weight at Q6_K, every routed expert's
    ffn_down at Q6_K (one type for all experts of every layer: the engine's expert slots have one
    size), and the ffn_down of dense layers and shared experts at Q6_K in llama.cpp's
    use_more_bits layers. q4_0: Q4_0, output.weight Q6_K (as llama.cpp). q6_k: Q6_K throughout.
    """
    base = OUTTYPES[outtype]
    if outtype in ("f32", "f16", "bf16", "q8_0", "q6_k"):
        return base
    if name == "output.weight":
        return QT.Q6_K
    if outtype == "q4_0":
        return base
    up = QT.Q5_K if base == QT.Q4_K else QT.Q6_K
    if name.endswith(("attn_qkv.weight", "attn_output.weight")):
        return up
    m = _LAYER.match(name)
    if m and re.search(r"\.ffn_down\.\d+\.weight$", name):
        return QT.Q6_K
    if m and name.endswith(("ffn_down.weight", "ffn_down_shexp.weight")):
        return QT.Q6_K if use_more_bits(int(m.group(1)), n_layer) else base
    return base


def fallback(qt, cols):
    """(type, reason or None): qt when rows of cols values are whole blocks of it, else the
    nearest type that fits and why."""
    t = qt
    while cols % BLOCK[t]:
        t = FALLBACK[t]
    if t == qt:
        return qt, None
    return t, (f"rows of {cols} values are not a multiple of {qt.name.lower()}'s block of "
               f"{BLOCK[qt]}: stored as {t.name.lower()}")


def storage(entry, outtype, n_layer=1):
    """(ggml type, note or None) of entry's tensor for outtype: f32 for 1-D and 'f32' kinds;
    the mix's type otherwise, or its fallback (and why) when the rows are not whole blocks."""
    if entry.kind == "f32" or len(entry.hf_shape) < 2:
        return QT.F32, None
    return fallback(mix_type(entry.gguf, outtype, n_layer), entry.hf_shape[-1])


def storage_type(entry, outtype, n_layer=1):
    """The ggml type of storage()."""
    return storage(entry, outtype, n_layer)[0]


def report_fallbacks(names, notes, prefix, file):
    """One line per distinct fallback: how many tensors, the first one's name, the reason."""
    seen = {}
    for name, note in zip(names, notes):
        if note:
            first, n = seen.get(note, (name, 0))
            seen[note] = (first, n + 1)
    for note, (first, n) in seen.items():
        more = f" and {n - 1} more" if n > 1 else ""
        print(f"{prefix}: {first}{more}: {note}", file=file)


def keeps_f32(name, shape):
    """Whether a GGUF tensor is one that every outtype stores as f32 (tensor_map's 'f32' kind,
    told from its name and shape alone): 1-D tensors (norms, expert bias) and the router."""
    return len(shape) < 2 or name.endswith("ffn_gate_inp.weight")


def nbytes(shape, qt):
    """Bytes of a tensor of numpy shape (rows..., cols) stored as qt."""
    n = int(np.prod(shape, dtype=np.int64))
    if qt not in BLOCK:
        raise ValueError(qt)
    return n // BLOCK[qt] * BLOCK_BYTES[qt]


def native_quantize(x, qt, n_threads=0):
    """Rows of x (float32, float16, or uint16 bf16 bits) -> qt bytes by the native library."""
    from tide_cpp import _lib
    return _lib.quantize(x, int(qt), n_threads)


def encode(raw, src_dtype, qt, n_threads=0):
    """A slice of rows of raw source values (numpy, safetensors dtype src_dtype) -> the bytes of
    qt, as a numpy array to write as is."""
    if qt == QT.BF16 and src_dtype == "BF16":
        return raw  # the source's bits, untouched
    if qt in NATIVE:
        if src_dtype == "BF16":
            return native_quantize(raw.view(np.uint16), qt, n_threads)
        if src_dtype in ("F16", "F32"):
            return native_quantize(raw, qt, n_threads)
        return native_quantize(to_f32(raw, src_dtype), qt, n_threads)
    x = to_f32(raw, src_dtype)
    if qt == QT.F32:
        return x
    if qt == QT.F16:
        return x.astype(np.float16)
    return quants.quantize(x, qt)  # BF16 (round to nearest even) or Q8_0
