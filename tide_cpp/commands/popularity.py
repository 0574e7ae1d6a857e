"""tide-cli popularity: expert popularity for the static policy: per MoE layer and expert, the
token-expert hits of traced runs of the given prompts, written as JSON ({"counts": [[...], ...]})
for --popularity."""

import sys

from . import _options

DEFAULT_PROMPTS = [
    "What is 37 plus 48?",
    "Write a haiku about the sea.",
    "Explain what a mixture of experts layer does.",
    "Translate 'good morning' into French and German.",
]


def add_parser(sub):
    p = sub.add_parser("popularity",
                       help="count how often each expert is routed to (for --policy static)",
                       description=__doc__)
    _options.add_model_options(p, n_ctx=False)
    _options.add_output_option(p, "the popularity JSON to write")
    _options.add_prompt_options(p, chat=False)
    _options.add_generation_options(p, ("max_tokens", "block_length", "steps"), max_tokens=64)
    p.add_argument("--steps-only", action="store_true",
                   help="count hits of denoising steps only (default: every forward)")
    return p


def run(args):
    from ..model import Model
    from ..popularity import popularity_counts, save_popularity

    prompts = _options.prompts_of(args, DEFAULT_PROMPTS)
    # routing does not depend on where experts run: policy cpu, nothing to move
    with Model(args.model, device=args.device, n_threads=args.threads, policy="cpu",
               trace=True) as m:
        counts = popularity_counts(m, prompts, args.steps_only,
                                   **_options.generation_kwargs(args, ("max_tokens",
                                                                       "block_length", "steps")))
        save_popularity(args.output, counts, model=args.model, prompts=len(prompts),
                        steps_only=bool(args.steps_only), moe_layers=list(m.moe_layers),
                        n_expert=int(m.hparams["n_expert"]))
    n = counts.sum(axis=1)
    print(f"wrote {args.output}: {len(prompts)} prompts, {int(n.sum())} token-expert hits over "
          f"{counts.shape[0]} MoE layers x {counts.shape[1]} experts", file=sys.stderr)
    return 0
