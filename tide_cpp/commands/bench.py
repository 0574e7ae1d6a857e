"""tide-cli bench: the same prompts under each residency policy, one table: steps/s, tokens/s,
time per step (measured, and predicted by the planner's cost model when a --hw-profile is given),
H2D bytes per step, host token-expert pairs per step, device hit rate, and whether the generated
tokens are identical to the first policy's (they must be: every policy is exact)."""

import sys
import time

from . import _options


def add_parser(sub):
    p = sub.add_parser("bench", help="compare residency policies on the same prompts", description=__doc__)
    _options.add_model_options(p, n_ctx=False)
    _options.add_residency_options(p, policies=["cpu", "static", "swap", "tide", "gpu"],
                                   gpu_experts=32, refresh_interval=4, prefetch_experts=0)
    _options.add_prompt_options(p)
    _options.add_generation_options(p, ("max_tokens", "block_length", "steps", "threshold"),
                                    max_tokens=64)
    m = p.add_argument_group("measurement")
    _options.add_hw_profile_option(m, required=False, help="add the predicted time per step")
    m.add_argument("--warmup", type=int, default=1, help="untimed runs of the first prompt per policy")
    _options.add_repeat_option(m, 1, "runs per prompt; times are their median")
    m.add_argument("--markdown", metavar="FILE", help="also write the table (markdown) to this file")
    return p


DEFAULT_PROMPTS = [
    "What is 37 plus 48?",
    "Write a short poem about the moon.",
]


def bench_policy(path, policy, budget, tau, device, threads, prompts, gen_kw, popularity=None,
                 warmup=1, device_memory=None, profile=None, repeat=1, chat=False, prefetch=0):
    """One policy over the prompts: a dict of totals, the tokens of every prompt. Each prompt
    runs `repeat` times; its time is the median of the repeats (a loaded machine is noisy).
    chat: each prompt is a user message in the model's chat template (as generate --chat)."""
    import numpy as np
    from ..model import Model
    from ..planner import predict
    from ..tokenizer import tokenizer_of
    kw = dict(device=device, n_threads=threads, policy=policy, refresh_interval=tau, trace=True)
    if prefetch and policy in ("tide", "auto"):
        kw["prefetch_experts"] = prefetch
    if policy not in ("gpu", "cpu"):
        kw["gpu_experts"] = budget
    if policy == "static" and popularity is not None:
        kw["popularity"] = popularity
    if device_memory is not None:
        kw["device_memory"] = device_memory
    tokens, wall, core, steps, ntok, pred_t = [], 0.0, 0.0, 0, 0, 0.0
    predicted = profile is not None and policy != "auto"
    with Model(path, **kw) as m:
        if chat:
            tok = tokenizer_of(m)
            prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True)
                       for p in prompts]
        for _ in range(warmup):
            m.generate(prompts[0], **gen_kw)
        m.reset_stats()
        for prompt in prompts:
            walls, cores = [], []
            for rep in range(repeat):
                m.clear_trace()
                before = m.stats()
                t = time.perf_counter()
                g = m.generate(prompt, **gen_kw)
                walls.append(time.perf_counter() - t)
                after = m.stats()
                cores.append(after["t_total"] - before["t_total"])
                if rep == 0:
                    tokens.append(list(g.tokens))
                    ntok += len(g.tokens)
                    n_steps = after["steps"] - before["steps"]
                    steps += n_steps
                    if predicted:
                        # The trace replays from R = {} (a fresh context); the bench's context
                        # carries residency over from the run before: a few promotions apart.
                        pr = predict(m.trace(), profile, policy, budget, tau, popularity)
                        pred_t += pr.time_per_step * n_steps
            wall += float(np.median(walls))
            core += float(np.median(cores))
        st = m.stats()
        eb = m.hparams["expert_bytes"]
    n_runs = max(repeat, 1)
    pairs = st["device_expert_tokens"] + st["host_expert_tokens"]
    # bytes that really crossed: promotions served by a prefetched copy moved no bytes of their
    # own, and every prefetched copy, used or not, did
    moved = st["h2d_bytes"] - st["prefetch_used"] * eb + st["prefetch_bytes"]
    return {
        "policy": policy, "steps": steps, "tokens": ntok, "wall": wall, "core": core,
        "h2d_bytes": moved / n_runs, "host_pairs": st["host_expert_tokens"] / n_runs,
        "hit_rate": st["device_expert_tokens"] / pairs if pairs else 0.0,
        "pred": pred_t if predicted else None,
        "budgets": st.get("budgets"), "refresh_interval": st.get("refresh_interval"),
    }, tokens


def run(args):
    from ..model import resolve_device
    from ..planner import HardwareProfile
    from ..popularity import load_popularity

    prompts = _options.prompts_of(args, DEFAULT_PROMPTS)
    budget = args.gpu_experts
    device = resolve_device(args.device)
    if device == "cpu":
        print("device cpu: the host alone, nothing is resident, so every policy runs as cpu; "
              "--device sim simulates a device", file=sys.stderr)
    popularity = load_popularity(args.popularity) if args.popularity else None
    profile = HardwareProfile.load(args.hw_profile) if args.hw_profile else None
    gen_kw = _options.generation_kwargs(args, ("max_tokens", "block_length", "steps", "threshold"))
    rows, ref = [], None
    for pol in args.policies:
        print(f"running {pol} ...", file=sys.stderr, flush=True)
        try:
            row, toks = bench_policy(args.model, pol, budget, args.refresh_interval, device,
                                     args.threads, prompts, gen_kw, popularity, args.warmup,
                                     args.device_memory, profile, args.repeat, args.chat,
                                     args.prefetch_experts)
        except Exception as e:  # a policy that cannot run here (gpu too large): say why, go on
            print(f"  {pol}: {type(e).__name__}: {e}", file=sys.stderr)
            rows.append({"policy": pol, "error": str(e)})
            continue
        if ref is None:
            ref = toks
        row["same"] = toks == ref
        rows.append(row)
    head = ["policy", "steps/s", "tokens/s", "ms/step", "core ms/step", "pred ms/step",
            "H2D MB/step", "host pairs/step", "hit rate", "same tokens"]
    lines = []
    for r in rows:
        if "error" in r:
            lines.append([r["policy"]] + ["-"] * 8 + [f"error: {r['error'][:40]}"])
            continue
        n = max(r["steps"], 1)
        lines.append([
            r["policy"], f"{r['steps'] / r['wall']:.2f}", f"{r['tokens'] / r['wall']:.2f}",
            f"{r['wall'] / n * 1e3:.2f}", f"{r['core'] / n * 1e3:.2f}",
            "-" if r["pred"] is None else f"{r['pred'] / n * 1e3:.2f}",
            f"{r['h2d_bytes'] / n / 1e6:.2f}", f"{r['host_pairs'] / n:.1f}",
            f"{r['hit_rate']:.3f}", "yes" if r["same"] else "NO"])
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    table = [fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(l) for l in lines]
    budget_text = ",".join(map(str, budget)) if isinstance(budget, list) else budget
    desc = (f"model {args.model}, device {device}, budget {budget_text}, refresh interval "
            f"{args.refresh_interval}, {len(prompts)} prompt(s), max_tokens {args.max_tokens}, "
            f"block {args.block_length}, steps {args.steps}, threshold {args.threshold}, "
            f"median of {args.repeat} run(s)"
            + (f", hardware profile {args.hw_profile}" if args.hw_profile else "")
            + (f", tide prefetch {args.prefetch_experts}" if args.prefetch_experts else ""))
    print(desc)
    print("\n".join(table))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(desc + "\n\n" + "\n".join(table) + "\n")
    return 0 if all(r.get("same", True) for r in rows) else 1
