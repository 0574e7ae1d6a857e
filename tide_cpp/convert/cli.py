"""The converter's command line (python -m tide_cpp.convert, tide-cli convert): light imports
only, so that building tide-cli's parser does not load numpy or gguf."""

import os
import sys

OUTTYPE_NAMES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k")


def add_arguments(p):
    p.add_argument("src", metavar="SRC", help="checkpoint folder or Hugging Face repo id")
    p.add_argument("-o", "--outfile", metavar="OUT.gguf",
                   help="output file (default: <name>-<outtype>.gguf in the current folder)")
    p.add_argument("--outtype", choices=OUTTYPE_NAMES, default="bf16",
                   help="storage of the weight matrices (default bf16; norms, router and "
                        "expert bias stay f32); q4_0, q4_k_m, q5_k_m and q6_k are llama.cpp-style "
                        "mixes, see docs/QUANTIZATION.md")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit) when SRC is a repo id")
    p.add_argument("--name", help="general.name (default: the folder or repo name)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads reading and encoding tensors (default: up to 4; with a "
                        "quantized outtype, the quantizer's threads, default all CPUs)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def run_args(args):
    from .errors import ConvertError
    from .hf_to_gguf import convert

    out = args.outfile
    if out is None:
        base = os.path.basename(os.path.normpath(args.src)) or "model"
        out = f"{base}-{args.outtype}.gguf"
    try:
        r = convert(args.src, out, args.outtype, progress=not args.quiet, revision=args.revision,
                    name=args.name, threads=args.threads)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        mb = r["bytes"] / 1e6
        print(f"wrote {r['path']}: {r['n_tensors']} tensors, {mb:.1f} MB in {r['seconds']:.1f} s "
              f"({mb / max(r['seconds'], 1e-9):.0f} MB/s)", file=sys.stderr)
    return 0


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(prog="python -m tide_cpp.convert",
                                description="Convert a LLaDA2.0 HF checkpoint to GGUF.")
    add_arguments(p)
    return run_args(p.parse_args(argv))
