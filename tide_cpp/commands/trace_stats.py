"""tide-cli trace-stats: what TIDE's observation rests on, read from a routing trace: per MoE
layer, the cosine similarity of expert-activation counts between steps 1..8 apart within a block,
and the share of token-expert pairs a budget B keeps on the device for each refresh interval
(by exact replay of the tide policy)."""

import sys


def add_parser(sub):
    p = sub.add_parser("trace-stats", help="step-to-step similarity of routing and hit rate by interval",
                       description=__doc__)
    p.add_argument("trace", help="routing trace .npz")
    p.add_argument("-B", "--budget", type=int, action="append",
                   help="expert slots per layer (repeatable; default: E/8 and E/4)")
    p.add_argument("--max-distance", type=int, default=8, help="largest step distance (default 8)")
    p.add_argument("--taus", default="1,2,3,4,6,8,12,16,32", help="refresh intervals to show")
    p.add_argument("--per-layer", action="store_true", help="hit rates per layer too")
    return p


def cosine_by_distance(tr, max_d):
    """sim[l, d-1]: mean cosine similarity of layer l's hits between step forwards d apart within a
    block (NaN where no such pair); n[d-1]: number of pairs."""
    import numpy as np
    from ..replay import KIND_STEP
    L = tr.n_layers
    sums = np.zeros((L, max_d))
    cnt = np.zeros(max_d, dtype=np.int64)
    steps = np.flatnonzero(tr.kind == KIND_STEP)
    h = tr.hits.astype(np.float64)
    norm = np.linalg.norm(h, axis=2)
    by_block = {}
    for f in steps:
        by_block.setdefault(int(tr.block[f]), {})[int(tr.step[f])] = f
    for blk in by_block.values():
        for s, f in blk.items():
            for d in range(1, max_d + 1):
                g = blk.get(s + d)
                if g is None:
                    continue
                den = norm[f] * norm[g]
                c = np.where(den > 0, (h[f] * h[g]).sum(axis=1) / np.where(den > 0, den, 1), 0.0)
                sums[:, d - 1] += c
                cnt[d - 1] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / cnt[None, :], cnt


def run(args):
    import numpy as np
    from ..replay import Trace, tide_sweep

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
    taus = [t for t in (int(x) for x in args.taus.split(",")) if t >= 1]
    total = tr.hits.sum()
    print("\nshare of token-expert pairs on the device (tide policy, every forward)")
    print("budget " + "".join(f"  tau={t:<3d}" for t in taus))
    for b in budgets:
        rates = []
        per_layer = np.zeros((len(taus), L))
        for i, t in enumerate(taus):
            dev = 0
            for l in range(L):
                c = tide_sweep(tr.hits[:, l], tr.kind, tr.step, t, np.array([min(b, E)]))
                d = int(c["device_pairs"].sum())
                dev += d
                lt = tr.hits[:, l].sum()
                per_layer[i, l] = d / lt if lt else 0.0
            rates.append(dev / total if total else 0.0)
        print(f"{b:6d} " + "".join(f"  {r:7.3f}" for r in rates))
        if args.per_layer:
            for l in range(L):
                print(f"  L{int(tr.moe_layers[l]):<3d} " + "".join(f"  {x:7.3f}" for x in per_layer[:, l]))
    return 0
