"""A GGUF with LLaDA2.0-mini's exact shapes (20 layers, 256 experts of 3 x 2048 x 512, vocab
157184) and random bf16 weights, written straight from a pool of random values: no checkpoint, no
conversion, about 32 GB in a minute on a RAM disk. For speed measurements only (the text is noise,
but the routing varies from token to token as a real model's does).

    python3 bench/gpu/make_random_gguf.py OUT.gguf [--layers 20] [--outtype bf16]

Metadata, tensor names, order, alignment and the tokenizer come from the converter's own code
(tide_cpp.convert.hparams / tensor_map / tokenizer_meta) and tests/hf_checkpoint.make_tokenizer, so the
engine loads it exactly as a converted file.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf import GGUFWriter  # noqa: E402

from tide_cpp.convert.hf_to_gguf import ARCH, add_metadata, pad_to_alignment  # noqa: E402
from tide_cpp.convert.hparams import hparams  # noqa: E402
from tide_cpp.convert.quant import nbytes, storage_type  # noqa: E402
from tide_cpp.convert.tensor_map import plan  # noqa: E402
from tide_cpp.convert.tokenizer_meta import tokenizer_meta  # noqa: E402
import hf_checkpoint as hfc  # noqa: E402

MINI = dict(num_hidden_layers=20, hidden_size=2048, intermediate_size=5120,
            moe_intermediate_size=512, num_attention_heads=16, num_key_value_heads=4,
            head_dim=128, num_experts=256, num_experts_per_tok=8, num_shared_experts=1,
            n_group=8, topk_group=4, first_k_dense_replace=1, vocab_size=157184,
            max_position_embeddings=32768, routed_scaling_factor=2.5)
POOL_BYTES = 64 << 20
WRITE_BYTES = 16 << 20


def bf16_pool(rng, n_bytes, std):
    x = rng.standard_normal(n_bytes // 2, dtype=np.float32) * np.float32(std)
    return x.view(np.uint16)[1::2].copy().view(np.uint8)  # truncated to bf16 (little endian)


def f32_values(name, n, rng):
    if "norm" in name:
        return np.ones(n, np.float32)
    if "exp_probs_b" in name:
        return np.zeros(n, np.float32)
    return rng.standard_normal(n, dtype=np.float32) * np.float32(0.05)  # router


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--outtype", default="bf16", choices=["bf16"])
    ap.add_argument("--experts", type=int, default=256, help="smaller only to try the script")
    ap.add_argument("--vocab", type=int, default=157184, help="smaller only to try the script")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    t0 = time.time()
    cfg = hfc.make_config(**{**MINI, "num_hidden_layers": a.layers, "num_experts": a.experts,
                             "vocab_size": a.vocab})
    hp = hparams(cfg)
    entries = plan(hp)
    tok_json, tok_cfg = hfc.make_tokenizer(cfg["vocab_size"])
    tok = tokenizer_meta(tok_json, tok_cfg, hp["vocab_size"][0], cfg)
    types = [storage_type(e, a.outtype) for e in entries]
    sizes = [nbytes(e.hf_shape, qt) for e, qt in zip(entries, types)]
    print(f"{len(entries)} tensors, {sum(sizes) / 2**30:.2f} GiB "
          f"(metadata ready in {time.time() - t0:.1f} s)", flush=True)

    rng = np.random.default_rng(a.seed)
    pool = bf16_pool(rng, POOL_BYTES, 0.02)
    w = GGUFWriter(None, ARCH)
    add_metadata(w, f"llada2-mini-random-{a.layers}L", a.outtype, hp, tok)
    for e, qt, size in zip(entries, types, sizes):
        w.add_tensor_info(e.gguf, e.hf_shape, np.float32, size, raw_dtype=qt)
    tmp = a.out + ".tmp"
    w.open_output_file(Path(tmp))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    f = w.fout[0]
    done = 0
    for e, qt, size in zip(entries, types, sizes):
        f.write(b"\0" * (pad_to_alignment(f.tell()) - f.tell()))
        if qt == QT.F32:
            f.write(f32_values(e.gguf, size // 4, rng).tobytes())
        else:
            left = size
            while left:
                n = min(left, WRITE_BYTES)
                start = int(rng.integers(0, (POOL_BYTES - n) // 2 + 1)) * 2  # stay bf16-aligned
                f.write(memoryview(pool[start:start + n]))
                left -= n
        f.write(b"\0" * (pad_to_alignment(size) - size))
        done += size
    w.close()
    os.replace(tmp, a.out)
    dt = time.time() - t0
    print(f"wrote {a.out}: {done / 2**30:.2f} GiB in {dt:.1f} s ({done / dt / 1e9:.2f} GB/s)")


if __name__ == "__main__":
    main()
