"""tide-cli: one entry point, one module per subcommand (tide_cpp/commands/<name>.py)."""

import argparse
import importlib
import sys

# name -> module under tide_cpp.commands; each has add_parser(subparsers) and run(args) -> int.
COMMANDS = [
    "convert", "quantize", "info", "generate", "chat", "bench", "popularity", "trace_stats",
    "calibrate", "plan", "serve",
]


def build_parser():
    parser = argparse.ArgumentParser(
        prog="tide-cli",
        description="tide.cpp: run LLaDA2.0 MoE diffusion LLMs exactly, with the hot experts on the GPU.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        mod = importlib.import_module(f"tide_cpp.commands.{name}")
        p = mod.add_parser(sub)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args._run(args) or 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
