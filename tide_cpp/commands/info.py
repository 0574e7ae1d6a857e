"""tide-cli info MODEL.gguf: hyperparameters, tensors, bytes per weight type, expert sizes."""

import sys

from ..gguf_summary import summarize
from ..units import fmt_bytes


def add_parser(subparsers):
    p = subparsers.add_parser("info", help="describe a LLaDA2 GGUF file",
                              description="Print a GGUF's hyperparameters, tensor count, bytes "
                                          "per weight type, its layout (this project's or "
                                          "llama.cpp's) and the size of its routed experts.")
    p.add_argument("model", metavar="MODEL.gguf")
    return p


def run(args):
    try:
        s = summarize(args.model)
    except FileNotFoundError:
        print(f"error: {args.model}: no such file", file=sys.stderr)
        return 1
    except (OSError, ValueError, KeyError, IndexError) as e:
        print(f"error: {args.model}: not a readable GGUF file ({e})", file=sys.stderr)
        return 1
    meta = s["metadata"]
    arch = meta.get("general.architecture", "?")
    print(f"{s['path']}: {fmt_bytes(s['file_bytes'])}")
    for k in ("general.architecture", "general.name", "general.file_type", "general.alignment"):
        if k in meta:
            print(f"  {k} = {meta[k]}")
    print("hyperparameters:")
    for k, v in meta.items():
        if k.startswith(arch + "."):
            print(f"  {k[len(arch) + 1:]} = {v}")
    n_kv = meta.get(f"{arch}.attention.head_count_kv")
    hd = meta.get(f"{arch}.attention.key_length")
    n_layer, n_ctx = meta.get(f"{arch}.block_count"), meta.get(f"{arch}.context_length")
    if n_kv and hd and n_layer and n_ctx:
        per = 2 * n_layer * n_kv * hd * 4  # keys and values of every layer, f32
        print(f"KV cache: {fmt_bytes(per)} a token, {fmt_bytes(per * n_ctx)} at the model's context of "
              f"{n_ctx} tokens (f32; half with --cache-type f16 or bf16)")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    print(f"tokenizer: {meta.get('tokenizer.ggml.model', '?')}, {len(tokens)} tokens")
    for k in ("bos", "eos", "padding", "mask"):
        tid = meta.get(f"tokenizer.ggml.{k}_token_id")
        if tid is not None:
            text = tokens[tid] if 0 <= tid < len(tokens) else "?"
            print(f"  {k} = {tid} {text}")
    tj = "embedded" if "tokenizer.huggingface.json" in meta else "none (built from the GGML lists)"
    print(f"  tokenizer.json: {tj}")
    tpl = meta.get("tokenizer.chat_template")
    print(f"  chat template: {'yes (%d chars)' % len(tpl) if tpl else 'no'}")
    print(f"tensors: {s['n_tensors']}, {fmt_bytes(s['tensor_bytes'])} of data")
    print(f"  layout: routed experts {s['layout']['experts']}; attention "
          f"{s['layout']['attention']}")
    for t, n in sorted(s["bytes_by_type"].items(), key=lambda kv: -kv[1]):
        print(f"  {t:6s} {s['tensors_by_type'][t]:6d} tensors  {fmt_bytes(n):>12s}")
    if s["moe_layers"]:
        print(f"routed experts: {s['experts_per_layer']} per layer x {len(s['moe_layers'])} MoE "
              f"layers (blk {s['moe_layers'][0]}..{s['moe_layers'][-1]})")
        print(f"  one expert: {fmt_bytes(s['expert_bytes'])} ({s['expert_bytes']} bytes; "
              f"{fmt_bytes(s['expert_bytes_aligned'])} with alignment)")
        print(f"  all routed experts: {fmt_bytes(s['routed_expert_bytes'])} "
              f"({fmt_bytes(s['routed_expert_bytes_aligned'])} with alignment); the rest: "
              f"{fmt_bytes(s['tensor_bytes'] - s['routed_expert_bytes'])}")
    return 0
