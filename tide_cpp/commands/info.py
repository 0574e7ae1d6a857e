"""tide-cli info MODEL.gguf: hyperparameters, tensors, bytes per weight type, expert sizes."""

import os
import re
import sys

_EXPERT = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")


def add_parser(subparsers):
    p = subparsers.add_parser("info", help="describe a tide.cpp GGUF file",
                              description="Print a GGUF's hyperparameters, tensor count, bytes "
                                          "per weight type and the size of its routed experts.")
    p.add_argument("model", metavar="MODEL.gguf")
    return p


def summarize(path):
    """A dict describing the GGUF at path (raises OSError / ValueError on unreadable files)."""
    from gguf import GGUFReader

    r = GGUFReader(path)
    meta = {}
    for name, field in r.fields.items():
        if name.startswith("GGUF."):
            continue
        meta[name] = field.contents()
    align = meta.get("general.alignment", 32)
    pad = lambda n: (n + align - 1) // align * align  # noqa: E731
    by_type = {}
    experts = {}  # layer -> {expert: [bytes, padded bytes]}
    for t in r.tensors:
        tname = t.tensor_type.name
        n, c = by_type.get(tname, (0, 0))
        by_type[tname] = (n + int(t.n_bytes), c + 1)
        m = _EXPERT.match(t.name)
        if m:
            e = experts.setdefault(int(m.group(1)), {}).setdefault(int(m.group(3)), [0, 0])
            e[0] += int(t.n_bytes)
            e[1] += pad(int(t.n_bytes))
    one = next((e for layer in sorted(experts) for e in [experts[layer].get(0)] if e), [0, 0])
    return {
        "path": path,
        "file_bytes": os.path.getsize(path),
        "metadata": meta,
        "n_tensors": len(r.tensors),
        "bytes_by_type": {k: v[0] for k, v in by_type.items()},
        "tensors_by_type": {k: v[1] for k, v in by_type.items()},
        "tensor_bytes": sum(v[0] for v in by_type.values()),
        "moe_layers": sorted(experts),
        "experts_per_layer": max((len(v) for v in experts.values()), default=0),
        "expert_bytes": one[0],
        "expert_bytes_aligned": one[1],
        "routed_expert_bytes": sum(e[0] for v in experts.values() for e in v.values()),
        "routed_expert_bytes_aligned": sum(e[1] for v in experts.values() for e in v.values()),
    }


def _size(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


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
    print(f"{s['path']}: {_size(s['file_bytes'])}")
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
        print(f"KV cache: {_size(per)} a token, {_size(per * n_ctx)} at the model's context of "
              f"{n_ctx} tokens (f32; half with --cache-type f16 or bf16)")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    print(f"tokenizer: {meta.get('tokenizer.ggml.model', '?')}, {len(tokens)} tokens")
    for k in ("bos", "eos", "padding", "mask"):
        tid = meta.get(f"tokenizer.ggml.{k}_token_id")
        if tid is not None:
            text = tokens[tid] if 0 <= tid < len(tokens) else "?"
            print(f"  {k} = {tid} {text}")
    tpl = meta.get("tokenizer.chat_template")
    print(f"  chat template: {'yes (%d chars)' % len(tpl) if tpl else 'no'}")
    print(f"tensors: {s['n_tensors']}, {_size(s['tensor_bytes'])} of data")
    for t, n in sorted(s["bytes_by_type"].items(), key=lambda kv: -kv[1]):
        print(f"  {t:6s} {s['tensors_by_type'][t]:6d} tensors  {_size(n):>12s}")
    if s["moe_layers"]:
        print(f"routed experts: {s['experts_per_layer']} per layer x {len(s['moe_layers'])} MoE "
              f"layers (blk {s['moe_layers'][0]}..{s['moe_layers'][-1]})")
        print(f"  one expert: {_size(s['expert_bytes'])} ({s['expert_bytes']} bytes; "
              f"{_size(s['expert_bytes_aligned'])} with alignment)")
        print(f"  all routed experts: {_size(s['routed_expert_bytes'])} "
              f"({_size(s['routed_expert_bytes_aligned'])} with alignment); the rest: "
              f"{_size(s['tensor_bytes'] - s['routed_expert_bytes'])}")
    return 0
