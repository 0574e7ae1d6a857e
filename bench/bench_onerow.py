"""One-row forwards through the engine: how fast the host reads a token's routed experts.

A one-row step (one masked position, or block length 1) reads each of its 8 routed experts per
MoE layer once, from DRAM: the engine's most memory-bound case. This loads a GGUF on the CPU,
first runs 32-token forwards over the vocabulary (so the experts' pages are in), then times one-token
forwards with varying tokens and prints the host experts' time per forward (the engine's own
t_host_experts), the routed expert bytes that forward read (from the file's tensor sizes), the GB/s
they make, and how much of the file's mapping is on 2 MiB pages (gguf.c asks for them). Compare
libraries with TIDE_LIB; --drop-caches (root) empties the page cache first, so the mapping's pages
are made the way this library asks for them.

With --llama LLAMA.gguf (the same weights in llama.cpp's layout: `python -m
tide_cpp.convert.llama_layout MODEL.gguf LLAMA.gguf --arch bailingmoe2`) it also sets the whole
one-token forward beside llama.cpp's: tide's wall time per forward and its parts (lm_head,
attention, dense layers, host experts), llama.cpp's one-token llama_decode (logits of that token,
an empty cache, the same token ids) through llama-cpp-python in its own interpreter ($LLAMA_PYTHON,
default /work/llama-venv/bin/python), never a dependency of this package; and the ratio.

    .venv/bin/python bench/bench_onerow.py MODEL.gguf [--forwards 300] [--reps 3] [--drop-caches]
                                           [--llama LLAMA.gguf]
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def expert_pair_bytes(path):
    """{MoE layer index: bytes of one routed expert's gate + up + down} from the file's tensors."""
    import gguf
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        parts = t.name.split(".")
        # routed experts: blk.L.ffn_{gate,up,down}.E.weight (one tensor each, this engine's
        # layout) or blk.L.ffn_{gate,up,down}_exps.weight (llama.cpp's, all experts in one)
        if parts[0] != "blk" or not parts[2].startswith(("ffn_gate", "ffn_up", "ffn_down")):
            continue
        if "shexp" in parts[2]:
            continue
        layer = int(parts[1])
        if parts[2].endswith("_exps"):
            n = int(t.shape[-1]) if len(t.shape) == 3 else 1
            out[layer] = out.get(layer, 0) + int(t.n_bytes) // n
        elif len(parts) == 5 and parts[3] == "0":
            out[layer] = out.get(layer, 0) + int(t.n_bytes)
    return out


def pages(path):
    """(MiB of the file's mapping resident, MiB of it on 2 MiB pages) in this process."""
    rss = pmd = 0
    cur = None
    with open(f"/proc/{os.getpid()}/smaps") as f:
        for line in f:
            w = line.split()
            if len(w) >= 5 and "-" in w[0]:
                cur = w[5] if len(w) >= 6 else ""
            elif cur == path and w[0] == "Rss:":
                rss += int(w[1])
            elif cur == path and w[0] == "FilePmdMapped:":
                pmd += int(w[1])
    return rss >> 10, pmd >> 10


def token(i, rep, vocab):
    """The i-th token of repetition rep: the same ids on both engines, spread over the vocab."""
    return (i * 7919 + rep * 131) % (vocab - 1) + 1


def llama_side(path, threads, forwards, reps, vocab):
    """Best mean seconds of a one-token llama_decode over `forwards` tokens (runs under
    llama-cpp-python's interpreter): each from an empty cache, as tide's one-token forwards."""
    import llama_cpp as L
    L.llama_backend_init()
    model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
    if not model:
        raise SystemExit(f"llama.cpp could not load {path}")
    cp = L.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = 64
    cp.n_threads = cp.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, cp)
    mem = L.llama_get_memory(ctx)
    batch = L.llama_batch_init(32, 0, 1)

    def decode(ids):
        L.llama_memory_clear(mem, True)
        batch.n_tokens = len(ids)
        for i, t in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == len(ids) - 1
        if L.llama_decode(ctx, batch) != 0:
            raise SystemExit("llama_decode failed")
        L.llama_get_logits(ctx)  # waits for the result
    for t in range(0, min(vocab, 8192) - 32, 32):   # the weights' pages in, as tide's warm-up
        decode(list(range(t + 1, t + 33)))
    best = float("inf")
    for rep in range(reps):
        t0 = time.perf_counter()
        for i in range(forwards):
            decode([token(i, rep, vocab)])
        best = min(best, (time.perf_counter() - t0) / forwards)
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return best


def run_llama(args, vocab):
    """llama_side in $LLAMA_PYTHON: seconds per one-token forward."""
    py = os.environ.get("LLAMA_PYTHON", "/work/llama-venv/bin/python")
    if not os.path.exists(py):
        sys.exit(f"llama.cpp side: no interpreter {py} "
                 "(set $LLAMA_PYTHON to one with llama-cpp-python)")
    r = subprocess.run([py, os.path.abspath(__file__), args.llama, "--llama-side", "--vocab",
                        str(vocab), "--forwards", str(args.forwards), "--reps", str(args.reps),
                        "--threads", str(args.threads or 2)], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"llama.cpp side ({py}) failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--forwards", type=int, default=300, help="one-token forwards per repetition")
    ap.add_argument("--reps", type=int, default=3, help="repetitions; the best is reported")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--drop-caches", action="store_true",
                    help="empty the page cache first (root: writes /proc/sys/vm/drop_caches)")
    ap.add_argument("--llama", metavar="LLAMA.gguf",
                    help="the same weights in llama.cpp's layout: its one-token forward beside")
    ap.add_argument("--llama-side", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.llama_side:
        print(json.dumps(llama_side(args.model, args.threads or 2, args.forwards, args.reps,
                                    args.vocab)))
        return 0
    path = os.path.abspath(args.model)
    if args.drop_caches:
        subprocess.run(["sh", "-c", "sync; echo 1 > /proc/sys/vm/drop_caches"], check=True)
    import tide_cpp
    pair = expert_pair_bytes(path)
    if not pair:
        sys.exit(f"{path}: no routed expert tensors (blk.N.ffn_gate.E / ffn_gate_exps)")
    with tide_cpp.Model(path, device="cpu", policy="cpu", n_threads=args.threads) as m:
        vocab = m.n_vocab
        for t in range(0, min(vocab, 8192) - 32, 32):   # the experts' pages in
            m.logits(list(range(t + 1, t + 33)), block_length=32)
        best = whole = float("inf")
        for rep in range(args.reps):
            m.reset_stats()
            t0 = time.perf_counter()
            for i in range(args.forwards):
                m.logits([token(i, rep, vocab)], block_length=1)
            wall = (time.perf_counter() - t0) / args.forwards
            st = m.stats()
            best = min(best, st["t_host_experts"] / st["forwards"])
            if wall < whole:
                whole, parts = wall, {k: st[k] / st["forwards"] for k in
                                      ("t_lm_head", "t_attention", "t_dense", "t_host_experts")}
        pairs = [lay["host_expert_tokens"] / st["forwards"] for lay in st["per_layer"]]
        read = sum(p * pair[lay["layer"]] for p, lay in zip(pairs, st["per_layer"]))
        rss, pmd = pages(path)
    print(f"{os.path.basename(path)}: one-token forward, host experts {best * 1e3:.3f} ms for "
          f"{sum(pairs):.0f} routed pairs ({read / 1e6:.1f} MB of expert weights): "
          f"{read / best / 1e9:.1f} GB/s; mapping {rss} MiB resident, {pmd} MiB of it on 2 MiB pages "
          f"(library: {os.environ.get('TIDE_LIB') or 'tide_cpp/libtide.so'})")
    split = ", ".join(f"{k[2:].replace('_', ' ')} {v * 1e3:.2f}" for k, v in parts.items())
    print(f"one-token forward (whole): tide {whole * 1e3:.2f} ms ({split} ms)", end="")
    if args.llama:
        theirs = run_llama(args, vocab)
        print(f"; llama.cpp {theirs * 1e3:.2f} ms ({os.path.basename(args.llama)}); "
              f"ratio {whole / theirs:.2f}", end="")
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
