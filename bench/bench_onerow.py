"""One-row forwards through the engine: how fast the host reads a token's routed experts.

A one-row step (one masked position, or block length 1) reads each of its 8 routed experts per
MoE layer once, from DRAM: the engine's most memory-bound case. This loads a GGUF on the CPU,
first runs 32-token forwards over the vocabulary (so the experts' pages are in), then times one-token
forwards with varying tokens and prints the host experts' time per forward (the engine's own
t_host_experts), the routed expert bytes that forward read (from the file's tensor sizes), the GB/s
they make, and how much of the file's mapping is on 2 MiB pages (gguf.c asks for them). Compare
libraries with TIDE_LIB; --drop-caches (root) empties the page cache first, so the mapping's pages
are made the way this library asks for them.

    .venv/bin/python bench/bench_onerow.py MODEL.gguf [--forwards 300] [--reps 3] [--drop-caches]
"""

import argparse
import os
import subprocess
import sys

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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--forwards", type=int, default=300, help="one-token forwards per repetition")
    ap.add_argument("--reps", type=int, default=3, help="repetitions; the best is reported")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--drop-caches", action="store_true",
                    help="empty the page cache first (root: writes /proc/sys/vm/drop_caches)")
    args = ap.parse_args(argv)
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
        best = float("inf")
        for rep in range(args.reps):
            m.reset_stats()
            for i in range(args.forwards):
                m.logits([(i * 7919 + rep * 131) % (vocab - 1) + 1], block_length=1)
            st = m.stats()
            per = st["t_host_experts"] / st["forwards"]
            best = min(best, per)
        pairs = [lay["host_expert_tokens"] / st["forwards"] for lay in st["per_layer"]]
        read = sum(p * pair[lay["layer"]] for p, lay in zip(pairs, st["per_layer"]))
        rss, pmd = pages(path)
    print(f"{os.path.basename(path)}: one-token forward, host experts {best * 1e3:.3f} ms for "
          f"{sum(pairs):.0f} routed pairs ({read / 1e6:.1f} MB of expert weights): "
          f"{read / best / 1e9:.1f} GB/s; mapping {rss} MiB resident, {pmd} MiB of it on 2 MiB pages "
          f"(library: {os.environ.get('TIDE_LIB') or 'tide_cpp/libtide.so'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
