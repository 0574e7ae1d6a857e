"""The options of tide-cli, each defined here once, in groups the subcommands pick from: the model
and where it runs, the expert offload, generation, prompts, the hardware profile and traces.
Each option is named after its Python argument (--gpu-experts is Model(gpu_experts=...)), and a
subcommand changes only its default."""

import argparse
import sys

from ..units import fmt_bytes, parse_bytes

DEVICES = ("auto", "cuda", "sim", "cpu")
POLICIES = ("gpu", "cpu", "static", "swap", "tide", "auto")


# ---- value types --------------------------------------------------------------------------------

def parse_gpu_experts(text):
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


def size(text):
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def _policies(text):
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in POLICIES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(POLICIES)}, "
                                         f"got {text!r}")
    return names


def taus(text):
    """--taus: refresh intervals, as a comma list of numbers and ranges (1-16 or 1,2,4,8)."""
    out = set()
    try:
        for part in text.split(","):
            if "-" in part:
                a, b = part.split("-")
                out.update(range(int(a), int(b) + 1))
            elif part.strip():
                out.add(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected intervals like 1-16 or 1,2,4,8, got {text!r}")
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"intervals must be >= 1, got {text!r}")
    return sorted(out)


def _add(group, *flags, default=None, help, none_means=None, **kw):
    """One option; its help ends with its default (or, when that is None, with what None means)."""
    shown = none_means if default is None else default
    if shown is not None and kw.get("action") not in ("store_true", "store_false"):
        if isinstance(shown, (list, tuple)):
            shown = ",".join(str(x) for x in shown)
        help += f" (default: {shown})"
    group.add_argument(*flags, default=default, help=help, **kw)


# ---- the groups ---------------------------------------------------------------------------------

def add_model_option(g, required, help):
    g.add_argument("-m", "--model", required=required, metavar="GGUF", help=help)


def add_threads_option(g):
    _add(g, "-t", "--threads", type=_positive(int), metavar="N", none_means="all cores",
         help="host threads")


def add_model_options(p, required=True, n_ctx=True,
                      help="the model file (.gguf, from tide-cli convert)"):
    g = p.add_argument_group("model and device")
    add_model_option(g, required, help)
    _add(g, "--device", choices=DEVICES, default="auto",
         help="cuda (an NVIDIA GPU plus the host), sim (a simulated device in host memory: the "
              "same residency, for testing), cpu (the host only: nothing is resident), auto "
              "(cuda when a GPU is usable, else cpu)")
    add_threads_option(g)
    if n_ctx:
        _add(g, "--n-ctx", type=_positive(int), metavar="N",
             none_means="the model's own, or what fits in half of the free memory",
             help="context length in tokens")
        _add(g, "--cache-type", choices=["f32", "f16", "bf16"], none_means="f32",
             help="KV cache values: f32 (exact), f16 or bf16 (half the memory; results change "
                  "in the last bits)")
    return g


def add_prompt_cache_option(g):
    g.add_argument("--prompt-cache", metavar="FILE",
                   help="keep the prompt's cache in FILE across runs: read at start when it "
                        "exists (a file of another model or build is refused and recomputed), "
                        "written after every answer; a prompt that starts as the cached one "
                        "prefills only the rest")


def add_residency_options(p, policies=None, gpu_experts=None, refresh_interval=None,
                          prefetch_experts=None):
    """--policy, or with policies=DEFAULT a comma list --policies (bench); the other defaults
    None mean the engine's own."""
    o = p.add_argument_group("expert offload")
    what = ("gpu (all), cpu (none), static (the most popular, --popularity), swap (copy in what "
            "is needed), tide (refresh the hot set every --refresh-interval steps), auto (tide "
            "planned from the first block)")
    if policies is None:
        _add(o, "--policy", choices=POLICIES, none_means="gpu",
             help=f"which routed experts sit on the device: {what}")
    else:
        _add(o, "--policies", type=_policies, default=policies, metavar="P[,P...]",
             help=f"the policies to compare, each one of: {what}")
    _add(o, "--gpu-experts", type=parse_gpu_experts, default=gpu_experts, metavar="B[,B...]",
         none_means="0", help="device slots per MoE layer: one number, or one per MoE layer")
    _add(o, "--refresh-interval", type=_positive(int), default=refresh_interval, metavar="TAU",
         none_means="4", help="tide: refresh the resident set every TAU steps")
    _add(o, "--prefetch-experts", type=int, default=prefetch_experts, metavar="N",
         none_means="0, off",
         help="tide: at a refresh, start copying up to N experts per MoE layer (predicted from "
              "the layer's previous routing) while the layers before it compute; the answer is "
              "unchanged")
    _add(o, "--popularity", metavar="FILE.json",
         help="static: expert popularity counts (from tide-cli popularity)")
    add_device_memory_option(o, required=False)
    return o


def add_device_memory_option(g, required):
    _add(g, "--device-memory", "--gpu-memory", type=size, metavar="SIZE", dest="device_memory",
         required=required, none_means=None if required else "the device's free memory",
         help="device memory the engine may use, e.g. 8GiB (auto and the planner plan within it)")


GENERATION = ("max_tokens", "block_length", "steps", "threshold", "temperature", "top_k",
              "top_p", "seed", "minimal_topk", "eos_early_stop", "editing_threshold",
              "max_post_steps")


def add_generation_options(p, names=GENERATION, max_tokens=256):
    g = p.add_argument_group("generation (block diffusion)")
    table = {
        "max_tokens": lambda: _add(g, "--max-tokens", type=_positive(int), default=max_tokens,
                                   metavar="N", help="longest answer in tokens"),
        "block_length": lambda: _add(g, "--block-length", type=_positive(int), default=32,
                                     metavar="B", help="tokens decoded together as one block"),
        "steps": lambda: _add(g, "--steps", type=_positive(int), default=32, metavar="N",
                              help="denoising steps per block, at most the block length"),
        "threshold": lambda: _add(g, "--threshold", type=float, default=0.95, metavar="P",
                                  help="commit every token more likely than P in one step; "
                                       "lower is faster and rougher"),
        "temperature": lambda: _add(g, "--temperature", type=float, default=0.0, metavar="T",
                                    help="0 is greedy"),
        "top_k": lambda: _add(g, "--top-k", type=int, metavar="K",
                              help="sample from the K most likely tokens only"),
        "top_p": lambda: _add(g, "--top-p", type=float, metavar="P",
                              help="sample from the smallest set of tokens holding mass P"),
        "seed": lambda: _add(g, "--seed", type=int, metavar="N",
                             help="makes sampling reproducible"),
        "minimal_topk": lambda: _add(g, "--minimal-topk", type=_positive(int), default=1,
                                     metavar="K", help="cap steps per block at max-tokens // K"),
        "eos_early_stop": lambda: g.add_argument(
            "--no-eos-early-stop", dest="eos_early_stop", action="store_false",
            help="finish the block after an end-of-text instead of stopping at once"),
        "editing_threshold": lambda: _add(
            g, "--editing-threshold", type=float, metavar="E",
            none_means="off, LLaDA2.0's schedule",
            help="LLaDA2.1 decoding: also replace filled tokens of the block whose prediction "
                 "changed with probability above E"),
        "max_post_steps": lambda: _add(g, "--max-post-steps", type=int, default=16, metavar="N",
                                       help="with editing: forwards allowed after a block has "
                                            "no mask left"),
    }
    for name in names:
        table[name]()
    if "editing_threshold" in names and "threshold" in names:
        g.add_argument("--preset", choices=["quality", "speed"], action=_Preset, default=None,
                       help="LLaDA2.1 model card settings: quality = threshold 0.7, editing 0.5; "
                            "speed = threshold 0.5, editing 0.0 (both block 32, 16 post steps); "
                            "options after it override it")
    return g


class _Preset(argparse.Action):
    """--preset NAME: set the generation options of tide_cpp.generation.PRESETS[NAME] now, so
    that options given after it win."""

    def __call__(self, parser, namespace, value, option_string=None):
        from tide_cpp.generation import PRESETS

        setattr(namespace, self.dest, value)
        for name, v in PRESETS[value].items():
            setattr(namespace, name, v)


def add_prompt_options(p, many=True, chat=True):
    """-p: one prompt (many=False: '-' or left out reads standard input), or repeatable prompts
    with --prompts FILE; --chat wraps them in the model's chat template."""
    g = p.add_argument_group("prompts")
    g.add_argument("-p", "--prompt", action="append" if many else "store",
                   help="a prompt (repeatable; default: a few built in)" if many
                   else "the prompt text ('-' or left out: read standard input)")
    if many:
        g.add_argument("--prompts", metavar="FILE", help="a text file, one prompt per line")
    if chat:
        g.add_argument("--chat", action="store_true",
                       help="wrap each prompt in the model's chat template as a user message")
    return g


def add_system_option(g, help):
    g.add_argument("-s", "--system", metavar="TEXT", help=help)


def add_hw_profile_option(p, required, help):
    p.add_argument("--hw-profile", "--profile", dest="hw_profile", required=required,
                   metavar="FILE.json", help=f"hardware profile (tide-cli calibrate): {help}")


def add_trace_option(p, output):
    """--trace FILE.npz: the routing trace a run writes (output) or a command reads."""
    p.add_argument("--trace", required=not output, metavar="FILE.npz",
                   help="save the routing trace of every forward (input of tide-cli plan)"
                   if output else "routing trace (tide-cli generate --trace)")


def add_taus_option(p, default, help):
    _add(p, "--taus", type=taus, default=default, metavar="T[,T|A-B...]", help=help,
         none_means="1 to the longest block")


def add_repeat_option(p, default, help):
    _add(p, "--repeat", type=_positive(int), default=default, metavar="N", help=help)


def add_output_option(p, help):
    p.add_argument("-o", "--output", required=True, metavar="FILE.json", help=help)


# ---- from parsed options ------------------------------------------------------------------------

def prompts_of(args, default):
    """The prompts of add_prompt_options(many=True): -p, then the lines of --prompts, else default."""
    prompts = list(args.prompt or [])
    if args.prompts:
        with open(args.prompts) as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    return prompts or list(default)


def generation_kwargs(args, names=GENERATION):
    """The keyword arguments of tide_cpp.generation.generate from parsed options."""
    return {name: getattr(args, name) for name in names}


def model_kwargs(args, trace=False):
    """The keyword arguments of tide_cpp.Model from parsed options (options a subcommand does
    not have, or left out, take the engine's defaults)."""
    kw = {"device": args.device}
    for opt, name in (("threads", "n_threads"), ("n_ctx", "n_ctx"), ("policy", "policy"),
                      ("gpu_experts", "gpu_experts"), ("refresh_interval", "refresh_interval"),
                      ("prefetch_experts", "prefetch_experts"),
                      ("device_memory", "device_memory"), ("cache_type", "cache_type")):
        v = getattr(args, opt, None)
        if v is not None:
            kw[name] = v
    if getattr(args, "popularity", None):
        from ..popularity import load_popularity
        kw["popularity"] = load_popularity(args.popularity)
    if trace or kw.get("policy") == "auto":
        kw["trace"] = True  # auto plans from the routing trace of the first block
    return kw


def load_model(args, trace=False):
    """Open args.model as a tide_cpp.Model with the options given."""
    from ..model import Model
    return Model(args.model, **model_kwargs(args, trace))


def load_prompt_cache(model, args):
    """--prompt-cache FILE: the cache saved by an earlier run, when FILE exists and fits this
    model and build (else a note saying why, and the prompt is computed afresh)."""
    import os

    path = getattr(args, "prompt_cache", None)
    if not path or not os.path.exists(path):
        return
    try:
        model.load_state(path)
    except RuntimeError as e:  # TideError: another model, build, context, or a damaged file
        print(f"tide-cli: prompt cache not used: {e}", file=sys.stderr)


def save_prompt_cache(model, args):
    """--prompt-cache FILE: write the cache now (atomically)."""
    path = getattr(args, "prompt_cache", None)
    if not path:
        return
    try:
        model.save_state(path)
    except RuntimeError as e:
        print(f"tide-cli: prompt cache not saved: {e}", file=sys.stderr)


def context_line(model):
    """`context: N tokens, KV cache X` for start-up messages."""
    return (f"context: {model.n_ctx} tokens, KV cache {fmt_bytes(model.cache_bytes)} "
            f"({getattr(model, 'cache_type', 'f32')})")


def error(msg):
    print(f"tide-cli: error: {msg}", file=sys.stderr)
    return 1


def stats_lines(gen_stats, model_stats=None):
    """The closing statistics, as llama.cpp prints its timings: two or three short lines."""
    s = gen_stats
    lines = [
        f"tokens: {s['tokens']} in {s['seconds']:.2f} s ({s['tokens_per_second']:.1f} tokens/s), "
        f"prompt {s['prompt_tokens']} tokens"
        + (f" ({s['prompt_tokens_reused']} from the cache)" if s.get("prompt_tokens_reused")
           else ""),
        f"diffusion: {s['steps']} steps over {s['blocks']} blocks of {s['block_length']}, "
        f"{s['tokens_per_forward']:.2f} tokens per forward"
        + (f", {s['edits']} edits, {s['post_steps']} post steps" if "edits" in s else ""),
    ]
    if model_stats:
        m = model_stats
        dev, host = m.get("device_expert_tokens", 0), m.get("host_expert_tokens", 0)
        share = f" ({100.0 * dev / (dev + host):.1f}% on device)" if dev + host else ""
        lines.append(
            f"experts ({m.get('policy', '?')} on {m.get('device', '?')}): promoted "
            f"{m.get('experts_promoted', 0)}, demoted {m.get('experts_demoted', 0)}, H2D "
            f"{fmt_bytes(m.get('h2d_bytes', 0), 1)}; expert pairs device {dev} / host {host}{share}")
        if m.get("prefetch_bytes"):
            lines.append(f"prefetch: {fmt_bytes(m['prefetch_bytes'], 1)} copied ahead, "
                         f"{m.get('prefetch_used', 0)} of {m.get('experts_promoted', 0)} "
                         "promotions served by it")
    return lines
