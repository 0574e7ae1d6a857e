"""One denoising step of LLaDA2.0-mini's real shapes on the CPU backend.

A GGUF with mini's shapes (hidden 2048, 16/4 heads of 128, dense FFN 5120, 256 routed experts of
512, top-8, groups 8/4, one shared expert, vocabulary 157184) but only a few layers (default 2:
the leading dense layer and one MoE layer) is written directly with the gguf package and random
data, for each weight type. Per type and thread count: a KV prefix of 512 tokens is committed,
then a 32-token active block is stepped with every position masked (lm_head on all 32 rows, the
first step of a block). It prints ms per step, tokens/s at one token per step, the weight bytes
the step read (every non-expert tensor but the embedding table, plus each routed expert the
step's routing hit, read once), the GB/s that makes, and the machine's memory bandwidth measured
in the same run.

    .venv/bin/python bench/bench_step.py [--types f32,bf16,q8_0] [--threads 1,2] [--layers 2]
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf import GGUFWriter  # noqa: E402
from gguf import quants  # noqa: E402

MINI = dict(H=2048, n_head=16, n_kv=4, hd=128, rope_dim=64, ff=5120, ff_exp=512, E=256, K=8,
            groups=8, groups_used=4, shared=1, vocab=157184)
QTYPE = {"f32": QT.F32, "bf16": QT.BF16, "q8_0": QT.Q8_0, "f16": QT.F16}
FTYPE = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}
ALIGN = 4096


def row_bytes(qt, cols):
    return {QT.F32: 4 * cols, QT.F16: 2 * cols, QT.BF16: 2 * cols, QT.Q8_0: cols // 32 * 34}[qt]


class Source:
    """Encoded random rows per (type, cols), cycled to fill any matrix quickly: every tensor
    starts at a different row, so no two experts hold the same bytes at the same place."""

    def __init__(self, rng, rows=2048):
        self.rng, self.rows, self.cache, self.start = rng, rows, {}, 0

    def block(self, qt, cols):
        key = (qt, cols)
        if key not in self.cache:
            x = (self.rng.standard_normal((self.rows, cols), dtype=np.float32) / np.float32(np.sqrt(cols)))
            if qt == QT.F32:
                b = x.view(np.uint8).reshape(self.rows, -1)
            else:
                b = np.ascontiguousarray(quants.quantize(x, qt)).view(np.uint8).reshape(self.rows, -1)
            assert b.shape[1] == row_bytes(qt, cols)
            self.cache[key] = b
        return self.cache[key]

    def write(self, f, qt, rows, cols):
        src = self.block(qt, cols)
        self.start = (self.start + 7919) % self.rows
        for r0 in range(0, rows, 4096):
            n = min(4096, rows - r0)
            idx = (self.start + r0 + np.arange(n)) % self.rows
            f.write(memoryview(np.ascontiguousarray(src[idx])).cast("B"))


def write_model(path, outtype, n_layers, rng):
    c = MINI
    H, hd, E = c["H"], c["hd"], c["E"]
    qt = QTYPE[outtype]
    # (name, rows, cols, storage type, how to fill it: None from the random pool, or exact f32
    # "norm", "bias", "router")
    tensors = [("token_embd.weight", c["vocab"], H, qt, None)]
    for n in range(n_layers):
        p = f"blk.{n}."
        tensors += [(p + "attn_norm.weight", 1, H, QT.F32, "norm"),
                    (p + "attn_qkv.weight", (c["n_head"] + 2 * c["n_kv"]) * hd, H, qt, None),
                    (p + "attn_q_norm.weight", 1, hd, QT.F32, "norm"),
                    (p + "attn_k_norm.weight", 1, hd, QT.F32, "norm"),
                    (p + "attn_output.weight", H, c["n_head"] * hd, qt, None),
                    (p + "ffn_norm.weight", 1, H, QT.F32, "norm")]
        if n == 0:
            tensors += [(p + "ffn_gate.weight", c["ff"], H, qt, None),
                        (p + "ffn_up.weight", c["ff"], H, qt, None),
                        (p + "ffn_down.weight", H, c["ff"], qt, None)]
        else:
            fs = c["ff_exp"] * c["shared"]
            tensors += [(p + "ffn_gate_inp.weight", E, H, QT.F32, "router"),
                        (p + "exp_probs_b.bias", 1, E, QT.F32, "bias"),
                        (p + "ffn_gate_shexp.weight", fs, H, qt, None),
                        (p + "ffn_up_shexp.weight", fs, H, qt, None),
                        (p + "ffn_down_shexp.weight", H, fs, qt, None)]
            for e in range(E):
                tensors += [(p + f"ffn_gate.{e}.weight", c["ff_exp"], H, qt, None),
                            (p + f"ffn_up.{e}.weight", c["ff_exp"], H, qt, None),
                            (p + f"ffn_down.{e}.weight", H, c["ff_exp"], qt, None)]
    tensors += [("output_norm.weight", 1, H, QT.F32, "norm"),
                ("output.weight", c["vocab"], H, qt, None)]

    w = GGUFWriter(None, "llada2")
    w.add_name("bench-mini-shapes")
    w.add_custom_alignment(ALIGN)
    w.add_file_type(FTYPE[outtype])
    u32 = dict(block_count=n_layers, context_length=32768, embedding_length=H,
               feed_forward_length=c["ff"], expert_feed_forward_length=c["ff_exp"],
               expert_count=E, expert_used_count=c["K"], expert_shared_count=c["shared"],
               expert_group_count=c["groups"], expert_group_used_count=c["groups_used"],
               expert_gating_func=2, leading_dense_block_count=1, vocab_size=c["vocab"])
    u32.update({"attention.head_count": c["n_head"], "attention.head_count_kv": c["n_kv"],
                "attention.key_length": hd, "attention.value_length": hd,
                "rope.dimension_count": c["rope_dim"]})
    for k, v in u32.items():
        w.add_uint32(f"llada2.{k}", v)
    w.add_float32("llada2.expert_weights_scale", 2.5)
    w.add_bool("llada2.expert_weights_norm", True)
    w.add_bool("llada2.attention.qk_norm", True)
    w.add_float32("llada2.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32("llada2.rope.freq_base", 600000.0)
    w.add_uint32("tokenizer.ggml.eos_token_id", 156892)
    w.add_uint32("tokenizer.ggml.mask_token_id", 156895)
    sizes = []
    for name, rows, cols, t, kind in tensors:
        shape = (cols,) if rows == 1 else (rows, cols)
        size = rows * row_bytes(t, cols)
        sizes.append(size)
        w.add_tensor_info(name, shape, np.float32, size, raw_dtype=t)
    w.open_output_file(path)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    f = w.fout[0]
    src = Source(rng)
    for (name, rows, cols, t, kind), size in zip(tensors, sizes):
        f.write(b"\0" * (-f.tell() % ALIGN))
        if kind is None:
            src.write(f, t, rows, cols)
        elif kind == "norm":
            f.write((1.0 + 0.1 * rng.standard_normal(cols)).astype(np.float32).tobytes())
        elif kind == "bias":
            f.write((0.1 * rng.standard_normal(cols)).astype(np.float32).tobytes())
        else:  # router
            f.write((rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32).tobytes())
    f.write(b"\0" * (-f.tell() % ALIGN))
    w.close()


def memory_bandwidth(mb=512, reps=3):
    """(copy GB/s counting read + write, read GB/s of a sum) of numpy on one thread."""
    a = np.ones(mb * (1 << 20) // 4, dtype=np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)
    best_c = best_r = 1e9
    for _ in range(reps):
        t = time.perf_counter()
        np.copyto(b, a)
        best_c = min(best_c, time.perf_counter() - t)
        t = time.perf_counter()
        a.sum()
        best_r = min(best_r, time.perf_counter() - t)
    return 2 * a.nbytes / best_c / 1e9, a.nbytes / best_r / 1e9


def bench(path, n_threads, prefix, block, reps):
    from tide_cpp import Model

    with Model(path, device="cpu", n_threads=n_threads, n_ctx=prefix + block, trace=True) as m:
        hp = m.hparams
        rng = np.random.default_rng(1)
        ids = rng.integers(0, 150000, prefix + block).astype(np.int32)
        t = time.perf_counter()
        m.commit(ids[:prefix])
        t_prefill = time.perf_counter() - t
        blk = ids[prefix:]
        want = np.ones(block, bool)
        m.step(blk, want, step_in_block=0)  # warm-up (page cache, pool)
        m.reset_stats()
        times = []
        for s in range(reps):
            t = time.perf_counter()
            m.step(blk, want, step_in_block=s + 1)
            times.append(time.perf_counter() - t)
        st = m.stats()
        hits = m.trace()["hits"][-1]  # [n_moe, E] of the last step
        n_moe = hits.shape[0]
        distinct = int((hits > 0).sum())
        embd_row = _row_bytes_of(hp)
        weights = hp["nonexpert_bytes"] - hp["n_vocab"] * embd_row + block * embd_row
        weights += distinct * hp["expert_bytes"]
        kv = 2 * hp["n_layer"] * (prefix + block) * hp["n_head_kv"] * hp["head_dim"] * 4
        step = float(np.median(times))
        phases = {k: st[k] / reps for k in ("t_attention", "t_dense", "t_router",
                                            "t_host_experts", "t_lm_head")}
        head = hp["n_vocab"] * embd_row  # output.weight: same type and row length as token_embd
        # a late step of a block: one position still masked, lm_head on one row
        one = np.zeros(block, bool)
        one[0] = True
        t1 = []
        for s in range(reps):
            t = time.perf_counter()
            m.step(blk, one, step_in_block=reps + 1 + s)
            t1.append(time.perf_counter() - t)
        return dict(step=step, step1=float(np.median(t1)), prefill=t_prefill, weights=weights,
                    kv=kv, distinct=distinct, n_moe=n_moe, phases=phases, head=head,
                    expert_bytes=distinct * hp["expert_bytes"])


def _row_bytes_of(hp):
    t = {0: QT.F32, 1: QT.F16, 8: QT.Q8_0, 30: QT.BF16}[hp["expert_type"]]
    return row_bytes(t, hp["n_embd"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", default="f32,bf16,q8_0")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--layers", type=int, default=2, help="layers (the first is dense)")
    ap.add_argument("--prefix", type=int, default=512)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write the GGUFs (default: a temp dir)")
    args = ap.parse_args(argv)
    t_all = time.perf_counter()
    copy_bw, read_bw = memory_bandwidth()
    print(f"machine: {os.cpu_count()} CPUs; memory bandwidth (numpy, 1 thread): "
          f"copy {copy_bw:.1f} GB/s (read + write), read {read_bw:.1f} GB/s")
    print(f"model: mini shapes, {args.layers} layers (1 dense + {args.layers - 1} MoE), "
          f"KV prefix {args.prefix}, active block {args.block}, all positions masked")
    print(f"{'type':5} {'thr':>3} {'ms/step':>8} {'tok/s':>6} {'weights MB':>10} {'GB/s':>6} "
          f"{'experts':>7} {'GB/s-nohead':>11} {'exp GB/s':>8} {'ms 1-row':>8} {'GB/s':>5} | "
          f"ms: attn dense router experts lm_head | prefill s")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        for outtype in args.types.split(","):
            path = os.path.join(d, f"mini-{outtype}.gguf")
            t = time.perf_counter()
            write_model(path, outtype, args.layers, np.random.default_rng(0))
            t_write = time.perf_counter() - t
            for nt in [int(x) for x in args.threads.split(",")]:
                r = bench(path, nt, args.prefix, args.block, args.reps)
                gbs = (r["weights"] + r["kv"]) / r["step"] / 1e9
                ph = r["phases"]
                body = (r["weights"] + r["kv"] - r["head"]) / (r["step"] - ph["t_lm_head"]) / 1e9
                exp_gbs = r["expert_bytes"] / ph["t_host_experts"] / 1e9
                one_gbs = (r["weights"] + r["kv"]) / r["step1"] / 1e9
                print(f"{outtype:5} {nt:3d} {r['step'] * 1e3:8.1f} {1 / r['step']:6.2f} "
                      f"{r['weights'] / 1e6:10.0f} {gbs:6.2f} {r['distinct']:7d} {body:11.2f} {exp_gbs:8.2f} "
                      f"{r['step1'] * 1e3:8.1f} {one_gbs:5.2f} | "
                      f"{ph['t_attention'] * 1e3:.0f} {ph['t_dense'] * 1e3:.0f} "
                      f"{ph['t_router'] * 1e3:.0f} {ph['t_host_experts'] * 1e3:.0f} "
                      f"{ph['t_lm_head'] * 1e3:.0f} | {r['prefill']:.1f}", flush=True)
                rows.append((outtype, nt, r))
            os.unlink(path)
            print(f"  ({outtype}: file written in {t_write:.1f} s)", flush=True)
    print(f"GB/s = (weight bytes read + KV cache bytes) / step time; GB/s-nohead: the same "
          f"without lm_head's bytes and time (lm_head on 32 rows is compute-bound); exp GB/s: "
          f"the routed experts' bytes / their time; ms 1-row: a step with one masked position "
          f"(lm_head on one row), GB/s of it. Memory bandwidth above. "
          f"Total {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
