"""A whole generate() call on the CPU: the prompt's prefill, then every denoising step, lm_head on
the rows still masked (32, 31, ..., 1 when one token is committed a step).

    python3 bench/bench_generate.py MODEL.gguf [--prompt 512] [--max-tokens 64] [--threads 2]
                                    [--steps 32] [--repeat 2]

The prompt is random token ids (seeded), so a model with random weights (bench/gpu/make_random_gguf.py)
never passes the confidence threshold and commits exactly one token a step: the most lm_head calls
on few rows a block can take. Prints the best of --repeat calls: seconds, prefill seconds, steps,
tokens per second. $TIDE_LIB picks the library, to set two builds side by side.
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tide_cpp import Model  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32, help="denoising steps per block of 32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    ids = np.random.default_rng(3).integers(1000, 100000, args.prompt).astype(np.int32)
    best = None
    with Model(args.model, device="cpu", n_threads=args.threads) as m:
        for _ in range(args.repeat):
            m.reset()
            t0 = time.perf_counter()
            g = m.generate(ids, max_tokens=args.max_tokens, block_length=32, steps=args.steps)
            dt = time.perf_counter() - t0
            if best is None or dt < best[0]:
                best = (dt, g.stats)
    dt, st = best
    print(f"{args.model}: prompt {args.prompt}, {st['tokens']} tokens in {st['blocks']} blocks, "
          f"{st['steps']} steps: best of {args.repeat} {dt:.2f} s (prefill {st['prefill_seconds']:.2f} s), "
          f"{st['tokens'] / (dt - st['prefill_seconds']):.1f} tokens/s after the prefill")
    return 0


if __name__ == "__main__":
    sys.exit(main())
