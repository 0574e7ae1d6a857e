"""tide-cli convert SRC -o OUT.gguf --outtype f32|f16|bf16|q8_0|q4_0|q4_k_m|q5_k_m|q6_k: HF checkpoint to GGUF."""

from tide_cpp.convert.cli import add_arguments, run_args


def add_parser(subparsers):
    p = subparsers.add_parser(
        "convert", help="convert a LLaDA2.0 Hugging Face checkpoint (folder or repo id) to GGUF",
        description="Convert a LLaDA2.0 checkpoint (local folder or Hugging Face repo id) to one "
                    "GGUF file with one tensor per routed expert, streamed tensor by tensor.")
    add_arguments(p)
    return p


def run(args):
    return run_args(args)
