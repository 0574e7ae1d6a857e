"""Converter throughput and peak memory on a synthetic checkpoint with LLaDA2.0-mini's real shapes.

    .venv/bin/python bench/bench_convert.py [--layers 3] [--outtypes bf16,q8_0] [--workdir DIR]
        [--llama-python /work/llama-venv/bin/python]

Writes (streaming, ~64 MiB at a time) a checkpoint of mini's layer shapes (hidden 2048, 256
experts of 512, dense 5120, vocab 157184, 16/4 heads of 128) with fewer layers (default 3:
1 dense + 2 MoE, about 4.6 GB of bf16) into a temporary folder, converts it in a child process
per outtype, and prints MB/s and the child's peak RSS (ru_maxrss). Everything is deleted after.
The shards were just written, so they are read from the page cache: the figure is the
converter's own speed (CPU and writing), not the disk's read speed.

With --llama-python (a Python with llama-cpp-python, never a dependency of this package), the peer
runs in the same session on the same weights: the checkpoint is converted to bf16, rewritten in
llama.cpp's layout (tide_cpp.convert.llama_layout, arch bailingmoe2, llama.cpp's default alignment
of 32: its quantizer keeps another `general.alignment` but writes at 32, a file its own loader
then refuses), and llama.cpp's quantizer
(`llama_model_quantize`, no importance matrix, as `llama-quantize` runs it) takes that bf16 GGUF
to Q4_K_M with the same thread count. Timed alone, as its users run it after their converter: the
ratio printed is tide's whole conversion (checkpoint -> q4_k_m) against that one step.
"""

import argparse
import json
import multiprocessing
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

import hf_checkpoint as hfc  # noqa: E402

MINI = dict(hidden_size=2048, head_dim=128, num_attention_heads=16, num_key_value_heads=4,
            intermediate_size=5120, moe_intermediate_size=512, num_experts=256,
            num_experts_per_tok=8, n_group=8, topk_group=4, num_shared_experts=1,
            first_k_dense_replace=1, vocab_size=157184, max_position_embeddings=32768)
SHARD_BYTES = 1 << 30
POOL_BYTES = 64 << 20


def write_checkpoint_streaming(dir, cfg):
    """Sharded safetensors of cfg's shapes, random bf16 data written in slices from a 64 MiB
    pool of random values (memory stays ~100 MB whatever the size). Returns total bytes."""
    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(POOL_BYTES // 2, dtype=np.float32) * 0.02)
    pool = (pool.view(np.uint32) >> 16).astype(np.uint16)  # truncated to bf16 bits
    norm_pool = (np.float32(1.0) + 0.1 * rng.standard_normal(8192, dtype=np.float32))
    norm_pool = (norm_pool.view(np.uint32) >> 16).astype(np.uint16)

    tensors = hfc.tensor_shapes(cfg)
    shards, cur, size = [], [], 0
    for name, shape, dt in tensors:
        nbytes = int(np.prod(shape)) * (4 if dt == "f32" else 2)
        if cur and size + nbytes > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape, dt, nbytes))
        size += nbytes
    shards.append(cur)
    weight_map, total, pos = {}, 0, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dt, nbytes in shard:
            header[name] = {"dtype": "F32" if dt == "f32" else "BF16", "shape": list(shape),
                            "data_offsets": [off, off + nbytes]}
            off += nbytes
        hjson = json.dumps(header).encode()
        hjson += b" " * (-len(hjson) % 8)
        with open(os.path.join(dir, fname), "wb") as f:
            f.write(struct.pack("<Q", len(hjson)))
            f.write(hjson)
            for name, shape, dt, nbytes in shard:
                weight_map[name] = fname
                if dt == "f32":
                    f.write((0.01 * rng.standard_normal(shape, dtype=np.float32)).tobytes())
                    continue
                if len(shape) == 1:
                    f.write(norm_pool[:shape[0]].tobytes())
                    continue
                left = nbytes // 2
                while left:
                    n = min(left, pool.size - pos)
                    f.write(pool[pos:pos + n].tobytes())
                    pos = (pos + n) % pool.size
                    left -= n
        total += off
    with open(os.path.join(dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    tj, tc = hfc.make_tokenizer(cfg["vocab_size"])
    with open(os.path.join(dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(tj)
    with open(os.path.join(dir, "tokenizer_config.json"), "w") as f:
        json.dump(tc, f, indent=2)
    return total


_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from tide_cpp.convert import convert
t0 = time.time()
r = convert(sys.argv[2], sys.argv[3], sys.argv[4], progress=sys.argv[5] == "1",
            threads=int(sys.argv[6]) or None)
r["seconds"] = time.time() - t0
r["ru_maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
r["hwm_kb"] = int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
print("RESULT " + json.dumps(r))
"""

def child_result(cmd):
    """Run a timing child; its RESULT line as a dict, or None (its output was printed)."""
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if p.returncode or "RESULT " not in p.stdout:
        print(p.stdout[-2000:])
        return None
    return json.loads(p.stdout.split("RESULT ", 1)[1])


def llama_quantize(args, src, work, threads):
    """tide bf16 -> llama.cpp layout -> llama_model_quantize to Q4_K_M; its result dict."""
    bf16 = os.path.join(work, "peer-bf16.gguf")
    lay = os.path.join(work, "peer-llama-bf16.gguf")
    out = os.path.join(work, "peer-llama-q4_k_m.gguf")
    r = child_result([sys.executable, "-c", _CHILD, ROOT, src, bf16, "bf16", "0", str(threads)])
    if r is None:
        return None
    subprocess.run([sys.executable, "-m", "tide_cpp.convert.llama_layout", bf16, lay,
                    "--arch", "bailingmoe2", "--alignment", "32"], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    os.remove(bf16)
    r = child_result([args.llama_python, os.path.join(ROOT, "bench", "llama_quantize.py"), lay, out,
                      "--type", "q4_k_m", "--threads", str(threads)])
    if r is not None:
        r["size"] = os.path.getsize(out)
    for f in (lay, out):
        if os.path.exists(f):
            os.remove(f)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=3, help="layers (first one dense; default 3)")
    ap.add_argument("--outtypes", default="bf16,q8_0")
    ap.add_argument("--workdir", default=None, help="where to put the temporary files")
    ap.add_argument("--progress", action="store_true", help="show the converter's progress bar")
    ap.add_argument("--threads", type=int, default=0, help="converter threads (0: its default)")
    ap.add_argument("--llama-python", default=None,
                    help="a Python with llama-cpp-python: also time llama.cpp's quantizer "
                    "(bf16 GGUF -> Q4_K_M) on the same weights")
    args = ap.parse_args()

    cfg = hfc.make_config(**MINI, num_hidden_layers=args.layers)
    work = tempfile.mkdtemp(prefix="tide-bench-convert-", dir=args.workdir)
    try:
        src = os.path.join(work, "ckpt")
        os.makedirs(src)
        t0 = time.time()
        # Generate in a child too, so this process stays small: Linux carries a parent's RSS at
        # fork into the child's ru_maxrss, and the converter's child should count only itself.
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(1) as pool:
            total = pool.apply(write_checkpoint_streaming, (src, cfg))
        print(f"checkpoint: {args.layers} layers of LLaDA2.0-mini's shapes, {total / 1e9:.2f} GB "
              f"bf16, written in {time.time() - t0:.1f} s", flush=True)
        seconds = {}
        for outtype in args.outtypes.split(","):
            out = os.path.join(work, f"out-{outtype}.gguf")
            r = child_result([sys.executable, "-c", _CHILD, ROOT, src, out, outtype,
                              "1" if args.progress else "0", str(args.threads)])
            if r is None:
                print(f"{outtype}: conversion failed")
                return 1
            seconds[outtype] = r["seconds"]
            size = os.path.getsize(out)
            print(f"{outtype:5s}: {r['n_tensors']} tensors, read {total / 1e6:.0f} MB, wrote "
                  f"{size / 1e6:.0f} MB in {r['seconds']:.1f} s: {total / 1e6 / r['seconds']:.0f} "
                  f"MB/s read, {size / 1e6 / r['seconds']:.0f} MB/s written; peak RSS "
                  f"{r['ru_maxrss_kb'] / 1024:.0f} MiB (ru_maxrss; VmHWM "
                  f"{r['hwm_kb'] / 1024:.0f} MiB)", flush=True)
            os.remove(out)
        if args.llama_python:
            threads = args.threads or os.cpu_count()
            r = llama_quantize(args, src, work, threads)
            if r is None or r["rc"] != 0:
                print(f"llama.cpp quantizer failed: {r}")
                return 1
            print(f"llama.cpp: llama_model_quantize bf16 GGUF -> Q4_K_M, {threads} threads: "
                  f"wrote {r['size'] / 1e6:.0f} MB in {r['seconds']:.1f} s; peak RSS "
                  f"{r['ru_maxrss_kb'] / 1024:.0f} MiB", flush=True)
            if "q4_k_m" in seconds:
                print(f"ratio tide checkpoint -> q4_k_m / llama.cpp bf16 -> Q4_K_M: "
                      f"{seconds['q4_k_m'] / r['seconds']:.2f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
