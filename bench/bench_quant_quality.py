"""Quantizer quality and speed beside ggml's own, on LLaDA2.0-mini's routed-expert shapes.

    .venv/bin/python bench/bench_quant_quality.py --llama-python /path/to/venv/bin/python \
        [--experts 8] [--seed 0]

For each type (q4_k, q5_k, q6_k, q4_0, q8_0) and each expert matrix (gate/up [512 x 2048], down
[2048 x 512]) of `--experts` random experts (bf16 values, normal with a few heavy-tailed rows,
as trained weights look), it quantizes the same bf16 data with tide.cpp's quantizer (tide_quantize,
one thread) and with ggml's (ggml_quantize_chunk of the ggml library that llama-cpp-python ships,
no importance matrix: what llama.cpp's quantizer does per tensor, one thread), and prints
- whether the bytes are identical,
- the RMS error of each against its bf16 source (dequantized by gguf.quants),
- the quantization speed of each (million weights per second of CPU time).
ggml runs in the other Python (it is not a dependency of this project); the data goes through
.npy files in a temporary folder.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import quants

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tide_cpp import _lib  # noqa: E402

TYPES = [QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q4_0, QT.Q8_0]
SHAPES = {"gate/up": (512, 2048), "down": (2048, 512)}

_GGML = r"""
import ctypes, glob, os, sys, time
import numpy as np
import llama_cpp
lib_dir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
lib = ctypes.CDLL(glob.glob(os.path.join(lib_dir, "libggml-base.so*"))[0])
lib.ggml_quantize_chunk.restype = ctypes.c_size_t
lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                    ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
src, t, dst = sys.argv[1], int(sys.argv[2]), sys.argv[3]
x = np.load(src)
rows, cols = x.shape
out = np.zeros(rows * cols * 2, np.uint8)
c0 = time.process_time()
n = lib.ggml_quantize_chunk(t, x.ctypes.data, out.ctypes.data, 0, rows, cols, None)
dt = time.process_time() - c0
np.save(dst, out[:n])
print(dt)
"""


def bf16_weights(rng, rows, cols):
    """bf16 bits (uint16) of a trained-looking matrix: normal, some rows heavy-tailed."""
    x = rng.standard_normal((rows, cols)).astype(np.float32) * 0.02
    heavy = rng.random(rows) < 0.05
    x[heavy] = (rng.standard_t(3, (int(heavy.sum()), cols)) * 0.02).astype(np.float32)
    return (x.view(np.uint32) >> 16).astype(np.uint16)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-python", required=True,
                    help="a Python with llama-cpp-python installed (ggml's quantizer)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    mats = []
    for e in range(a.experts):
        for role, (rows, cols) in (("gate", SHAPES["gate/up"]), ("up", SHAPES["gate/up"]),
                                   ("down", SHAPES["down"])):
            mats.append((f"expert {e} {role}", bf16_weights(rng, rows, cols)))
    n_w = sum(m.size for _, m in mats)
    print(f"{len(mats)} routed-expert matrices of LLaDA2.0-mini's shapes, {n_w / 1e6:.1f} M weights "
          "(bf16); one thread each side")
    print(f"{'type':5s} {'identical':>10s} {'rms tide':>10s} {'rms ggml':>10s} {'worst ratio':>11s} "
          f"{'tide Mw/s':>10s} {'ggml Mw/s':>10s}")
    with tempfile.TemporaryDirectory(prefix="tide-bench-quant-") as tmp:
        for qt in TYPES:
            same, rms_t, rms_g, worst, t_tide, t_ggml = 0, [], [], 0.0, 0.0, 0.0
            for name, bf in mats:
                x = (bf.astype(np.uint32) << 16).view(np.float32)
                c0 = time.process_time()
                ours = _lib.quantize(bf, int(qt), n_threads=1)
                t_tide += time.process_time() - c0
                src, dst = os.path.join(tmp, "x.npy"), os.path.join(tmp, "q.npy")
                np.save(src, x)
                p = subprocess.run([a.llama_python, "-c", _GGML, src, str(int(qt)), dst],
                                   capture_output=True, text=True)
                if p.returncode:
                    print(p.stderr, file=sys.stderr)
                    return 1
                t_ggml += float(p.stdout.strip().splitlines()[-1])
                theirs = np.load(dst)
                same += int(np.array_equal(ours, theirs))
                rows = x.shape[0]
                et = quants.dequantize(ours.reshape(rows, -1), qt) - x
                eg = quants.dequantize(theirs.reshape(rows, -1), qt) - x
                rt, rg = float(np.sqrt(np.mean(et * et))), float(np.sqrt(np.mean(eg * eg)))
                rms_t.append(rt)
                rms_g.append(rg)
                worst = max(worst, rt / rg if rg else 1.0)
            print(f"{qt.name.lower():5s} {same:>4d} / {len(mats):<3d} {np.mean(rms_t):10.3e} "
                  f"{np.mean(rms_g):10.3e} {worst:11.4f} {n_w / t_tide / 1e6:10.1f} "
                  f"{n_w / t_ggml / 1e6:10.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
