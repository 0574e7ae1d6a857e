"""The MoE layer of tests/reference.py, computed as three batched matmuls for training.

reference.moe loops over the experts (three small matmuls, an index_add and a copy of the whole
output per expert): on two cores most of a training step was that loop's per-op overhead. Here
the token-expert pairs are sorted by expert and packed into one zero-padded [E, cap, H] tensor,
so each of gate/up/down is one bmm over all experts. Same routing (reference.route), same
math; only the order of float additions differs (tests/test_demo_training.py checks values and
gradients against reference.moe).
"""

import torch
import torch.nn.functional as F

import reference


def _stacked(w, prefix, E, name):
    return torch.stack([w[f"{prefix}mlp.experts.{e}.{name}.weight"] for e in range(E)])


def moe(cfg, w, prefix, x, hits=None):
    """reference.moe(cfg, w, prefix, x, hits), batched. hits[e] += pairs routed to expert e."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    E = cfg["num_experts"]
    idx, weight = reference.route(cfg, w, prefix + "mlp.", flat)        # [N, k] each
    k = idx.shape[1]
    expert = idx.reshape(-1)
    order = torch.argsort(expert, stable=True)
    expert = expert[order]
    token = order // k                                                   # pair -> its token
    counts = torch.bincount(expert, minlength=E)
    offs = torch.cumsum(counts, 0).to(torch.int32)                      # end of each expert's rows
    rows = flat[token]                                                   # pairs, grouped by expert
    g = F.grouped_mm(rows, _stacked(w, prefix, E, "gate_proj").transpose(1, 2), offs=offs)
    u = F.grouped_mm(rows, _stacked(w, prefix, E, "up_proj").transpose(1, 2), offs=offs)
    y = F.grouped_mm(F.silu(g) * u, _stacked(w, prefix, E, "down_proj").transpose(1, 2), offs=offs)
    pair_out = y * weight.reshape(-1)[order].unsqueeze(-1)
    out = torch.zeros_like(flat).index_add(0, token, pair_out)
    if hits is not None:
        for e, c in enumerate(counts.tolist()):
            if c:
                hits[e] = hits.get(e, 0) + c
    if cfg.get("num_shared_experts"):
        out = out + reference.mlp(flat, w, prefix + "mlp.shared_experts.")
    return out.view(shape)
