"""What TIDE's observation rests on, read from a routing trace (replay.Trace): how alike the
routing of nearby denoising steps is, and what share of token-expert pairs a budget keeps on the
device for each refresh interval (by exact replay of the tide policy)."""

import numpy as np

from .replay import KIND_STEP, tide_sweep


def cosine_by_distance(tr, max_d):
    """sim[l, d-1]: mean cosine similarity of layer l's hits between step forwards d apart within a
    block (NaN where no such pair); n[d-1]: number of pairs."""
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


def device_share(tr, budget, taus):
    """The tide policy with `budget` slots in every layer, replayed over every forward for each
    refresh interval in taus: (share of all pairs on the device [len(taus)], share per layer
    [len(taus), n_layers])."""
    L, E = tr.n_layers, tr.n_expert
    total = tr.hits.sum()
    overall = np.zeros(len(taus))
    per_layer = np.zeros((len(taus), L))
    for i, t in enumerate(taus):
        dev = 0
        for l in range(L):
            c = tide_sweep(tr.hits[:, l], tr.kind, tr.step, t, np.array([min(budget, E)]))
            d = int(c["device_pairs"].sum())
            dev += d
            lt = tr.hits[:, l].sum()
            per_layer[i, l] = d / lt if lt else 0.0
        overall[i] = dev / total if total else 0.0
    return overall, per_layer
