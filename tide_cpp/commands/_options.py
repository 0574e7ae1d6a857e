"""Options shared by `tide-cli generate` and `tide-cli chat`: the model and where it runs, the
expert offload, and every knob of generation, each named as its Python argument."""

import argparse
import sys


def gpu_experts(text):
    """--gpu-experts: one budget for every MoE layer (`32`) or one per layer (`32,16,...`)."""
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or a comma list, got {text!r}")
    if any(p < 0 for p in parts):
        raise argparse.ArgumentTypeError("budgets must be >= 0")
    return parts[0] if len(parts) == 1 else parts


def _positive(kind):
    def parse(text):
        v = kind(text)
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return v
    return parse


def add_model_options(p):
    g = p.add_argument_group("model and device")
    g.add_argument("-m", "--model", required=True, metavar="GGUF",
                   help="the model file (.gguf, from tide-cli convert)")
    g.add_argument("--device", choices=["cpu", "sim", "cuda", "auto"], default="auto",
                   help="cuda (an NVIDIA GPU plus the host), sim (a simulated device in "
                        "host memory: same residency, for testing), cpu (the host only), auto "
                        "(cuda when a GPU is usable, else cpu) (default: auto)")
    g.add_argument("--threads", type=_positive(int), default=None, metavar="N",
                   help="host threads (default: all cores)")
    g.add_argument("--n-ctx", type=_positive(int), default=None, metavar="N",
                   help="context length in tokens (default: the model's own, or what fits in half "
                        "of the free memory)")
    g.add_argument("--cache-type", choices=["f32", "f16", "bf16"], default=None,
                   help="KV cache values: f32 (exact, the default), f16 or bf16 (half the "
                        "memory, results change in the last bits)")
    g.add_argument("--prompt-cache", default=None, metavar="FILE",
                   help="keep the prompt's cache in FILE across runs: read at start when it "
                        "exists (a file of another model or build is refused and recomputed), "
                        "written after every answer; a prompt that starts as the cached one "
                        "prefills only the rest")
    o = p.add_argument_group("expert offload")
    o.add_argument("--policy", choices=["gpu", "cpu", "static", "swap", "tide", "auto"],
                   default=None,
                   help="which routed experts sit on the device: gpu (all), cpu (none), static "
                        "(a fixed set), swap (copy in what is needed), tide (refresh the hot "
                        "set every --refresh-interval steps), auto (tide planned from the "
                        "first block) (default: the engine's, gpu)")
    o.add_argument("--gpu-experts", type=gpu_experts, default=None, metavar="B[,B...]",
                   help="device slots per MoE layer: one number, or one per MoE layer")
    o.add_argument("--refresh-interval", type=_positive(int), default=None, metavar="TAU",
                   help="tide: refresh the resident set every TAU steps (default: 4)")
    o.add_argument("--prefetch-experts", type=int, default=None, metavar="N",
                   help="tide: at a refresh, start copying up to N experts per MoE layer "
                        "(predicted from the layer's previous routing) while the layers before "
                        "it compute; the answer is unchanged (default: 0, off)")


def add_generation_options(p, max_tokens=256):
    g = p.add_argument_group("generation (block diffusion)")
    g.add_argument("--max-tokens", type=_positive(int), default=max_tokens, metavar="N",
                   help=f"longest answer in tokens (default: {max_tokens})")
    g.add_argument("--block-length", type=_positive(int), default=32, metavar="B",
                   help="tokens decoded together as one block (default: 32)")
    g.add_argument("--steps", type=_positive(int), default=32, metavar="N",
                   help="denoising steps per block, at most the block length (default: 32)")
    g.add_argument("--threshold", type=float, default=0.95, metavar="P",
                   help="commit every token more likely than P in one step; lower is faster "
                        "and rougher (default: 0.95)")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="0 is greedy (default: 0)")
    g.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="sample from the K most likely tokens only")
    g.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="sample from the smallest set of tokens holding mass P")
    g.add_argument("--seed", type=int, default=None, metavar="N",
                   help="makes sampling reproducible")
    g.add_argument("--minimal-topk", type=_positive(int), default=1, metavar="K",
                   help="cap steps per block at max-tokens // K (default: 1)")
    g.add_argument("--no-eos-early-stop", dest="eos_early_stop", action="store_false",
                   help="finish the block after an end-of-text instead of stopping at once")


def generation_kwargs(args):
    """The keyword arguments of tide_cpp.generation.generate from parsed options."""
    return dict(max_tokens=args.max_tokens, block_length=args.block_length, steps=args.steps,
                threshold=args.threshold, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed, minimal_topk=args.minimal_topk,
                eos_early_stop=args.eos_early_stop)


def load_model(args, trace=False):
    """Open args.model as a tide_cpp.Model with the device and offload options given (options
    left out take the engine's defaults)."""
    from tide_cpp.model import Model

    kw = {"device": args.device}
    for opt, name in (("threads", "n_threads"), ("n_ctx", "n_ctx"), ("policy", "policy"),
                      ("gpu_experts", "gpu_experts"), ("refresh_interval", "refresh_interval"),
                      ("prefetch_experts", "prefetch_experts"), ("cache_type", "cache_type")):
        v = getattr(args, opt, None)
        if v is not None:
            kw[name] = v
    if trace or kw.get("policy") == "auto":
        kw["trace"] = True  # auto plans from the routing trace of the first block
    return Model(args.model, **kw)


def load_prompt_cache(model, args, err=sys.stderr):
    """--prompt-cache FILE: the cache saved by an earlier run, when FILE exists and fits this
    model and build (else a note saying why, and the prompt is computed afresh)."""
    import os

    path = getattr(args, "prompt_cache", None)
    if not path or not os.path.exists(path):
        return
    try:
        model.load_state(path)
    except RuntimeError as e:  # TideError: another model, build, context, or a damaged file
        print(f"tide-cli: prompt cache not used: {e}", file=err)


def save_prompt_cache(model, args, err=sys.stderr):
    """--prompt-cache FILE: write the cache now (atomically)."""
    path = getattr(args, "prompt_cache", None)
    if not path:
        return
    try:
        model.save_state(path)
    except RuntimeError as e:
        print(f"tide-cli: prompt cache not saved: {e}", file=err)


def context_line(model):
    """`context: N tokens, KV cache X` for start-up messages."""
    return (f"context: {model.n_ctx} tokens, KV cache {fmt_bytes(model.cache_bytes)} "
            f"({getattr(model, 'cache_type', 'f32')})")


def error(msg):
    print(f"tide-cli: error: {msg}", file=sys.stderr)
    return 1


def fmt_bytes(n):
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def stats_lines(gen_stats, model_stats=None):
    """The closing statistics, as llama.cpp prints its timings: two or three short lines."""
    s = gen_stats
    lines = [
        f"tokens: {s['tokens']} in {s['seconds']:.2f} s ({s['tokens_per_second']:.1f} tokens/s), "
        f"prompt {s['prompt_tokens']} tokens"
        + (f" ({s['prompt_tokens_reused']} from the cache)" if s.get("prompt_tokens_reused")
           else ""),
        f"diffusion: {s['steps']} steps over {s['blocks']} blocks of {s['block_length']}, "
        f"{s['tokens_per_forward']:.2f} tokens per forward",
    ]
    if model_stats:
        m = model_stats
        dev, host = m.get("device_expert_tokens", 0), m.get("host_expert_tokens", 0)
        share = f" ({100.0 * dev / (dev + host):.1f}% on device)" if dev + host else ""
        lines.append(
            f"experts ({m.get('policy', '?')} on {m.get('device', '?')}): promoted "
            f"{m.get('experts_promoted', 0)}, demoted {m.get('experts_demoted', 0)}, H2D "
            f"{fmt_bytes(m.get('h2d_bytes', 0))}; expert pairs device {dev} / host {host}{share}")
        if m.get("prefetch_bytes"):
            lines.append(f"prefetch: {fmt_bytes(m['prefetch_bytes'])} copied ahead, "
                         f"{m.get('prefetch_used', 0)} of {m.get('experts_promoted', 0)} "
                         "promotions served by it")
    return lines
