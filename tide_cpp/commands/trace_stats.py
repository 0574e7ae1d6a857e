"""tide-cli trace-stats: what TIDE's observation rests on, read from a routing trace: per MoE
layer, the cosine similarity of expert-activation counts between steps 1..8 apart within a block,
and the share of token-expert pairs a budget B keeps on the device for each refresh interval
(by exact replay of the tide policy)."""

from . import _options


def add_parser(sub):
    p = sub.add_parser("trace-stats", help="step-to-step similarity of routing and hit rate by interval",
                       description=__doc__)
    p.add_argument("trace", metavar="FILE.npz", help="routing trace (tide-cli generate --trace)")
    p.add_argument("-B", "--budget", type=int, action="append",
                   help="expert slots per layer (repeatable; default: E/8 and E/4)")
    p.add_argument("--max-distance", type=int, default=8, help="largest step distance (default 8)")
    _options.add_taus_option(p, [1, 2, 3, 4, 6, 8, 12, 16, 32], "refresh intervals to show")
    p.add_argument("--per-layer", action="store_true", help="hit rates per layer too")
    return p


def run(args):
    import numpy as np
    from ..replay import Trace
    from ..routing_stats import cosine_by_distance, device_share

    tr = Trace.load(args.trace)
    L, E = tr.n_layers, tr.n_expert
    print(f"{args.trace}: {tr.n_forwards} forwards, {tr.n_steps} steps, {len(set(tr.block.tolist()))} "
          f"blocks, {L} MoE layers x {E} experts; longest block {tr.max_step + 1} steps")
    sim, cnt = cosine_by_distance(tr, args.max_distance)
    ds = [d for d in range(1, args.max_distance + 1) if cnt[d - 1] > 0]
    print("\ncosine similarity of activation counts, steps d apart within a block")
    print("layer " + "".join(f"  d={d:<4d}" for d in ds))
    for l in range(L):
        print(f"{int(tr.moe_layers[l]):5d} " + "".join(f"  {sim[l, d - 1]:6.3f}" for d in ds))
    if ds:
        print(" mean " + "".join(f"  {np.nanmean(sim[:, d - 1]):6.3f}" for d in ds))
        print("pairs" + "".join(f"  {cnt[d - 1]:6d}" for d in ds))

    budgets = args.budget or sorted({max(1, E // 8), max(1, E // 4)})
    taus = args.taus
    print("\nshare of token-expert pairs on the device (tide policy, every forward)")
    print("budget " + "".join(f"  tau={t:<3d}" for t in taus))
    for b in budgets:
        rates, per_layer = device_share(tr, b, taus)
        print(f"{b:6d} " + "".join(f"  {r:7.3f}" for r in rates))
        if args.per_layer:
            for l in range(L):
                print(f"  L{int(tr.moe_layers[l]):<3d} " + "".join(f"  {x:7.3f}" for x in per_layer[:, l]))
    return 0
