"""llama.cpp's quantizer on a GGUF in llama.cpp's layout, for benchmarks beside tide.cpp's own.

    /work/llama-venv/bin/python bench/llama_quantize.py IN.gguf OUT.gguf [--type q4_k_m] [--threads 2]

Runs `llama_model_quantize` of llama-cpp-python (the function behind `llama-quantize`; no
importance matrix) in the Python it is started with: the peer's own environment, never a
dependency of this package. Prints the wall time and this process's peak RSS as a last line
`RESULT {json}` for bench/bench_convert.py.
"""

import argparse
import json
import resource
import sys
import time

# llama.cpp's LLAMA_FTYPE_MOSTLY_* of the outtypes tide.cpp also writes
FTYPES = {"q4_0": 2, "q8_0": 7, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--type", default="q4_k_m", choices=sorted(FTYPES))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = args.threads
    params.ftype = FTYPES[args.type]
    t0 = time.time()
    rc = llama_cpp.llama_model_quantize(args.src.encode(), args.dst.encode(), params)
    r = {"rc": rc, "seconds": time.time() - t0,
         "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    print(f"llama_model_quantize {args.src} -> {args.dst} ({args.type}, {args.threads} threads): "
          f"rc {rc}, {r['seconds']:.1f} s, peak RSS {r['ru_maxrss_kb'] / 1024:.0f} MiB")
    print("RESULT " + json.dumps(r))
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
