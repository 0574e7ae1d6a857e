"""tide-cli profile: a popularity profile for the static policy: per MoE layer and expert, the
token-expert hits of traced runs of the given prompts (JSON: {"counts": [[...], ...]})."""

import json
import sys


def add_parser(sub):
    p = sub.add_parser("profile", help="expert popularity profile (for --policy static)", description=__doc__)
    p.add_argument("-m", "--model", required=True, help="GGUF model")
    p.add_argument("-o", "--output", required=True, help="popularity JSON to write")
    p.add_argument("--prompts", help="text file, one prompt per line (default: a few built in)")
    p.add_argument("-p", "--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--device", default="cpu", help="device for the runs (routing does not depend on it)")
    p.add_argument("-t", "--threads", type=int)
    p.add_argument("--steps-only", action="store_true",
                   help="count hits of denoising steps only (default: every forward)")
    return p


DEFAULT_PROMPTS = [
    "What is 37 plus 48?",
    "Write a haiku about the sea.",
    "Explain what a mixture of experts layer does.",
    "Translate 'good morning' into French and German.",
]


def load_prompts(args):
    prompts = list(args.prompt or [])
    if args.prompts:
        with open(args.prompts) as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    return prompts or DEFAULT_PROMPTS


def popularity_counts(model, prompts, steps_only=False, **gen_kw):
    """Hits per [moe layer, expert] over traced runs of `prompts` on an open traced model."""
    import numpy as np
    total = None
    for prompt in prompts:
        model.clear_trace()
        model.reset()
        model.generate(prompt, **gen_kw)
        tr = model.trace()
        h = tr["hits"]
        if steps_only:
            h = h[tr["kind"] == 0]
        c = h.sum(axis=0).astype(np.int64)
        total = c if total is None else total + c
    return total


def run(args):
    from ..model import Model
    prompts = load_prompts(args)
    with Model(args.model, device=args.device, n_threads=args.threads, policy="cpu", trace=True) as m:
        counts = popularity_counts(m, prompts, args.steps_only, max_tokens=args.max_tokens,
                                   block_length=args.block_length, steps=args.steps)
        out = {"model": args.model, "prompts": len(prompts), "steps_only": bool(args.steps_only),
               "moe_layers": list(m.moe_layers), "n_expert": int(m.hparams["n_expert"]),
               "counts": counts.tolist()}
    with open(args.output, "w") as f:
        json.dump(out, f)
    n = counts.sum(axis=1)
    print(f"wrote {args.output}: {len(prompts)} prompts, {int(n.sum())} token-expert hits over "
          f"{counts.shape[0]} MoE layers x {counts.shape[1]} experts", file=sys.stderr)
    return 0


def load_popularity(path):
    """The counts array [n_moe_layers, n_expert] of a profile written by `tide-cli profile`."""
    import numpy as np
    with open(path) as f:
        d = json.load(f)
    return np.asarray(d["counts"] if isinstance(d, dict) else d, dtype=np.float32)
