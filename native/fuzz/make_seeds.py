"""Write the seed corpus of the GGUF fuzzer (native/fuzz/seeds/) with the gguf package.

Small, valid files that reach every part of the parser: every metadata type, string and
numeric arrays, every tensor type the engine computes (q4_0 and the k-quants in a file of their
own, quantized by the native library), two alignments, a file with no tensors.
Run: .venv/bin/python native/fuzz/make_seeds.py
"""
import os

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")


def metadata(w):
    w.add_name("seed")
    w.add_uint8("t.u8", 7)
    w.add_int8("t.i8", -7)
    w.add_uint16("t.u16", 700)
    w.add_int16("t.i16", -700)
    w.add_uint32("llada2.block_count", 2)
    w.add_int32("t.i32", -70000)
    w.add_float32("llada2.rope.freq_base", 600000.0)
    w.add_bool("llada2.expert_weights_norm", True)
    w.add_uint64("t.u64", 1 << 40)
    w.add_int64("t.i64", -(1 << 40))
    w.add_float64("t.f64", 0.5)
    w.add_array("tokenizer.ggml.tokens", ["<|mask|>", "a", "bc", ""])
    w.add_array("tokenizer.ggml.token_type", [3, 1, 1, 5])
    w.add_array("t.floats", [1.0, 2.5])


def tensors(w, rng):
    w.add_tensor("token_embd.weight", rng.standard_normal((4, 8)).astype(np.float32))
    w.add_tensor("blk.0.attn_norm.weight", rng.standard_normal(8).astype(np.float16))
    x = rng.standard_normal((2, 64)).astype(np.float32)
    w.add_tensor("blk.1.ffn_gate.0.weight", gguf.quants.quantize(x, T.Q8_0), raw_dtype=T.Q8_0)
    bf = gguf.quants.quantize(rng.standard_normal((2, 2, 4)).astype(np.float32), T.BF16)
    w.add_tensor("blk.1.ffn_up.0.weight", bf, raw_dtype=T.BF16)


def quant_tensors(w, rng):
    """One tensor of each block type the engine computes besides q8_0, bytes from tide_quantize."""
    from tide_cpp import _lib
    for qt, rows, cols in ((T.Q4_0, 3, 64), (T.Q4_K, 2, 256), (T.Q5_K, 1, 512), (T.Q6_K, 2, 256)):
        x = rng.standard_normal((rows, cols)).astype(np.float32)
        q = _lib.quantize(x, int(qt)).reshape(rows, -1)
        w.add_tensor(f"blk.1.ffn_down.{int(qt)}.weight", q, raw_dtype=qt)


def write(name, alignment, with_tensors):
    path = os.path.join(HERE, name)
    w = gguf.GGUFWriter(path, "llada2")
    if alignment != 32:
        w.data_alignment = alignment
        w.add_custom_alignment(alignment)
    metadata(w)
    if with_tensors:
        (quant_tensors if with_tensors == "quant" else tensors)(w, np.random.default_rng(0))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(path, os.path.getsize(path))


if __name__ == "__main__":
    os.makedirs(HERE, exist_ok=True)
    write("align32.gguf", 32, True)
    write("align64.gguf", 64, True)
    write("metadata_only.gguf", 32, False)
    write("quant_types.gguf", 32, "quant")
