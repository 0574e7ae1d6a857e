"""tide-cli quantize IN.gguf OUT.gguf TYPE: re-quantize a tide.cpp GGUF of f32/f16/bf16 weights
(as llama-quantize does), so one conversion serves every quantized type."""

import sys

from tide_cpp.convert.cli import OUTTYPE_NAMES

from . import _options


def add_parser(subparsers):
    p = subparsers.add_parser(
        "quantize", help="re-quantize a tide.cpp GGUF of f32/f16/bf16 weights (q4_k_m, ...)",
        description="Re-quantize a tide.cpp GGUF whose matrices are f32, f16 or bf16 into "
                    "another type or quantized mix (docs/QUANTIZATION.md): the same file "
                    "`tide-cli convert --outtype TYPE` writes from the checkpoint.")
    p.add_argument("src", metavar="IN.gguf", help="the f32/f16/bf16 model file")
    p.add_argument("out", metavar="OUT.gguf", help="the file to write (atomically)")
    p.add_argument("type", metavar="TYPE", choices=OUTTYPE_NAMES,
                   help=f"one of {', '.join(OUTTYPE_NAMES)}")
    _options.add_threads_option(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def run(args):
    from tide_cpp.convert.errors import ConvertError
    from tide_cpp.convert.requantize import requantize

    try:
        r = requantize(args.src, args.out, args.type, threads=args.threads,
                       progress=not args.quiet)
    except ConvertError as e:
        print(f"tide-cli: error: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        mb = r["bytes"] / 1e6
        print(f"wrote {r['path']}: {r['n_tensors']} tensors, {mb:.1f} MB in {r['seconds']:.1f} s",
              file=sys.stderr)
    return 0
