"""Long prompts beside llama.cpp on the same weights, in one run.

    python3 bench/bench_context.py TIDE.gguf LLAMA.gguf [--threads 2] [--sizes 512,2048,8192]

TIDE.gguf is a tide.cpp file (e.g. bench/gpu/make_random_gguf.py --layers 3: LLaDA2.0-mini's
shapes), LLAMA.gguf the same weights in llama.cpp's layout (`python -m tide_cpp.convert.llama_layout IN OUT --arch bailingmoe2`: llama-cpp-python 0.3.36 has no `llada2`). llama.cpp
runs through llama-cpp-python in its own interpreter ($LLAMA_PYTHON, default
/work/llama-venv/bin/python), never as a dependency of this package. Printed, for each engine:

- prefill of N tokens from an empty cache (tide: one multi-block commit, blocks of 32; llama.cpp:
  one llama_decode of N tokens, n_ubatch 512, logits of the last token);
- one step after N cached tokens: a 32-token block forwarded against the cache with the logits
  of all 32 rows (tide: Model.step with every row wanted, which also takes the argmax; llama.cpp:
  llama_decode of 32 tokens with logits for all of them, then the 32 rows removed again);
- tide only: generate() on prompt A + 64 tokens right after generate() on A (2048 tokens), and a
  fresh generate() of A + 64, both max_tokens 32 in 4 steps; llama.cpp: the matching prefill of
  the 64 new tokens after 2048 cached.
Both engines first run an untimed prefill of 512 tokens, so the weights are paged in before
anything is timed. Beside each figure: GFLOP/s (prefill) or GFLOP/s and GB/s (steps), against this machine's limits
measured at the start (numpy sgemm and memory copy). Times are the best of --repeat runs.
"""

import argparse
import json
import os
import subprocess
import sys
import time

BLOCK = 32
EXTEND = 64
WARMUP = 512   # tokens of an untimed first prefill: every weight page read before timing starts


# ---- the model's work, counted from its hyperparameters ---------------------------------------

def work(hp, n_new, n_cached, n_logits):
    """(FLOPs, bytes of weights and cache read) of one forward of n_new tokens after n_cached,
    block-causal in blocks of 32, with n_logits rows through lm_head."""
    H, hd, nq, nkv = hp["n_embd"], hp["head_dim"], hp["n_head"], hp["n_head_kv"]
    E, K, I, S = hp["n_expert"], hp["n_expert_used"], hp["n_ff_exp"], hp["n_expert_shared"]
    L, dense, V = hp["n_layer"], hp["n_dense_lead"], hp["n_vocab"]
    per_tok = L * (H * (nq + 2 * nkv) * hd + nq * hd * H)
    per_tok += dense * 3 * H * hp["n_ff"] + (L - dense) * (H * E + (K + S) * 3 * H * I)
    flops = 2.0 * per_tok * n_new + 2.0 * n_logits * H * V
    visible = sum(n_cached + (i // BLOCK + 1) * BLOCK for i in range(n_new))
    flops += 4.0 * L * nq * hd * visible
    # bytes: bf16 weights other than experts once, the routed experts a forward touches (at most
    # all of them), the cache once per kv head
    experts = min(E, n_new * K) * 3 * H * I * 2 * (L - dense)
    other = L * (H * (nq + 2 * nkv) * hd + nq * hd * H) * 2 + dense * 3 * H * hp["n_ff"] * 2
    other += (L - dense) * S * 3 * H * I * 2 + (V * H * 2 if n_logits else 0)
    cache = 2 * L * nkv * hd * 4 * (n_cached + n_new)
    return flops, experts + other + cache


def limits(threads):
    """Measured limits: sgemm GFLOP/s (numpy's BLAS, `threads` threads) and memory copy GB/s."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(threads))
    import numpy as np
    a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    a @ a
    best = min(_timed(lambda: a @ a) for _ in range(3))
    gflops = 2 * 2048 ** 3 / best / 1e9
    src = np.ones(1 << 27, np.float32)  # 512 MiB
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(3))
    return gflops, 2 * src.nbytes / best / 1e9


def _timed(f):
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def ids_for(n, seed):
    import numpy as np
    return np.random.default_rng(seed).integers(100, 150000, size=n).astype(np.int32)


# ---- tide ------------------------------------------------------------------------------------

def tide_side(path, threads, sizes, repeat, n_ctx):
    from tide_cpp import Model
    import numpy as np
    out = {"prefill": {}, "step": {}}
    with Model(path, device="cpu", n_threads=threads, n_ctx=n_ctx) as m:
        out["hparams"] = dict(m.hparams)
        out["cache_bytes"] = m.cache_bytes
        m.commit(ids_for(WARMUP, 1), block_length=BLOCK)   # pages the weights in, untimed
        m.reset()
        for n in sizes:
            ids = ids_for(n + BLOCK, n)
            best = 1e30
            for _ in range(repeat if n <= 2048 else 1):
                m.reset()
                best = min(best, _timed(lambda: m.commit(ids[:n], block_length=BLOCK)))
            out["prefill"][n] = best
            block = ids[n:n + BLOCK]
            want = np.ones(BLOCK, bool)
            m.step(block, want, 0)
            out["step"][n] = min(_timed(lambda: m.step(block, want, 0)) for _ in range(repeat))
        a = ids_for(2048 + EXTEND, 7)
        kw = dict(max_tokens=32, block_length=BLOCK, steps=4)
        m.reset()
        m.generate(a[:2048], **kw)
        t0 = time.perf_counter()
        g = m.generate(a, **kw)
        out["extend"] = time.perf_counter() - t0
        out["extend_reused"] = g.stats["prompt_tokens_reused"]
        m.reset()
        t0 = time.perf_counter()
        f = m.generate(a, **kw)
        out["fresh"] = time.perf_counter() - t0
        out["same_tokens"] = g.tokens == f.tokens
    return out


# ---- llama.cpp (runs under llama-cpp-python's interpreter) ---------------------------------------

def llama_side(path, threads, sizes, repeat, n_ctx):
    import ctypes

    import llama_cpp as L
    import numpy as np

    L.llama_backend_init()
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(path.encode(), mp)
    if not model:
        raise SystemExit(f"llama.cpp could not load {path}")
    cp = L.llama_context_default_params()
    cp.n_ctx = n_ctx
    cp.n_batch = n_ctx  # a prefill is one llama_decode
    cp.n_ubatch = 512
    cp.n_threads = cp.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, cp)
    mem = L.llama_get_memory(ctx)
    batch = L.llama_batch_init(cp.n_batch, 0, 1)

    def decode(ids, pos0, all_logits):
        batch.n_tokens = len(ids)
        for i, t in enumerate(ids):
            batch.token[i] = int(t)
            batch.pos[i] = pos0 + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1 if all_logits or i == len(ids) - 1 else 0
        if L.llama_decode(ctx, batch) != 0:
            raise SystemExit("llama_decode failed")
        L.llama_get_logits(ctx)  # waits for the result

    out = {"prefill": {}, "step": {}, "flash_attn": int(getattr(cp, "flash_attn_type", -1))}
    decode(ids_for(WARMUP, 1), 0, False)   # pages the weights in, untimed
    for n in sizes:
        ids = ids_for(n + BLOCK, n)
        best = 1e30
        for _ in range(repeat if n <= 2048 else 1):
            L.llama_memory_clear(mem, True)
            best = min(best, _timed(lambda: decode(ids[:n], 0, False)))
        out["prefill"][n] = best
        block = ids[n:n + BLOCK]

        def step():
            decode(block, n, True)
            L.llama_memory_seq_rm(mem, 0, n, -1)
        step()
        out["step"][n] = min(_timed(step) for _ in range(repeat))
    a = ids_for(2048 + EXTEND, 7)
    L.llama_memory_clear(mem, True)
    decode(a[:2048], 0, False)
    out["extend_prefill"] = _timed(lambda: decode(a[2048:], 2048, False))
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return out


# ---- report ----------------------------------------------------------------------------------

def report(t, l, lim, threads, sizes):
    hp = t["hparams"]
    gf, bw = lim
    lines = [f"limits ({threads} threads): sgemm {gf:.0f} GFLOP/s (numpy BLAS), memory copy "
             f"{bw:.1f} GB/s (numpy, read + write)",
             f"model: {hp['n_layer']} layers, {hp['n_expert']} experts, vocab {hp['n_vocab']}; "
             f"tide KV cache {t['cache_bytes'] / 2**30:.2f} GiB (f32)", ""]
    lines.append(f"{'':28s} {'tide':>9s} {'llama.cpp':>10s} {'ratio':>6s}   tide GFLOP/s (GB/s)")
    for n in sizes:
        fl, by = work(hp, n, 0, 0)
        a, b = t["prefill"][n], l["prefill"][n]
        lines.append(f"{'prefill ' + str(n):28s} {a:8.2f}s {b:9.2f}s {a / b:6.2f}   "
                     f"{fl / a / 1e9:6.0f}   llama.cpp {fl / b / 1e9:.0f}")
    for n in sizes:
        fl, by = work(hp, BLOCK, n, BLOCK)
        a, b = t["step"][n], l["step"][n]
        lines.append(f"{'step (32 rows) after ' + str(n):28s} {a * 1e3:7.0f}ms {b * 1e3:8.0f}ms "
                     f"{a / b:6.2f}   {fl / a / 1e9:6.0f} ({by / a / 1e9:.1f})")
    lines += ["", f"generate() of A + {EXTEND} (A = 2048 tokens) right after generate(A): "
              f"{t['extend']:.2f} s, {t['extend_reused']} prompt tokens from the cache",
              f"fresh generate() of A + {EXTEND}: {t['fresh']:.2f} s; ratio "
              f"{t['extend'] / t['fresh']:.2f}; same tokens: {t['same_tokens']}",
              f"llama.cpp: prefill of the {EXTEND} new tokens after 2048 cached: "
              f"{l['extend_prefill']:.2f} s"]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tide_gguf")
    ap.add_argument("llama_gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="512,2048,8192")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--llama-side", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    n_ctx = max(max(sizes), 2048 + EXTEND) + 2 * BLOCK + 256
    if a.llama_side:
        json.dump(llama_side(a.llama_gguf, a.threads, sizes, a.repeat, n_ctx), sys.stdout)
        return 0
    lim = limits(a.threads)
    print(f"tide.cpp: {a.tide_gguf}", flush=True)
    t = tide_side(a.tide_gguf, a.threads, sizes, a.repeat, n_ctx)
    py = os.environ.get("LLAMA_PYTHON", "/work/llama-venv/bin/python")
    print(f"llama.cpp: {a.llama_gguf} ({py})", flush=True)
    r = subprocess.run([py, os.path.abspath(__file__), a.tide_gguf, a.llama_gguf, "--threads",
                        str(a.threads), "--sizes", a.sizes, "--repeat", str(a.repeat),
                        "--llama-side"], capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        return 1
    l = json.loads(r.stdout)
    l = {k: ({int(n): x for n, x in v.items()} if isinstance(v, dict) else v) for k, v in l.items()}
    print(report(t, l, lim, a.threads, sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
