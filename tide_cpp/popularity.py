"""Expert popularity: per MoE layer and routed expert, the token-expert hits of traced runs. The
`static` policy keeps the most popular experts of each layer resident (Model(popularity=...)).

The file format (JSON) is {"counts": [[...], ...], ...}: one row per MoE layer, one count per
expert, with a few fields saying how it was made (model, prompts, steps_only)."""

import json

import numpy as np

from .replay import KIND_STEP


def popularity_counts(model, prompts, steps_only=False, **gen_kw):
    """Hits per [MoE layer, expert] over one run of each prompt on an open Model(trace=True).
    steps_only: count denoising steps only (not the forwards that commit a finished block)."""
    total = None
    for prompt in prompts:
        model.clear_trace()
        model.reset()
        model.generate(prompt, **gen_kw)
        tr = model.trace()
        h = tr["hits"]
        if steps_only:
            h = h[tr["kind"] == KIND_STEP]
        c = h.sum(axis=0).astype(np.int64)
        total = c if total is None else total + c
    return total


def save_popularity(path, counts, **about):
    """Write counts [n_moe_layers, n_expert] and the fields in `about` as the popularity JSON."""
    with open(path, "w") as f:
        json.dump({**about, "counts": np.asarray(counts).tolist()}, f)


def load_popularity(path):
    """The counts array [n_moe_layers, n_expert] of a popularity JSON (or of a bare list)."""
    with open(path) as f:
        d = json.load(f)
    return np.asarray(d["counts"] if isinstance(d, dict) else d, dtype=np.float32)
