"""The MoE layer of tests/reference.py, computed as two grouped matmuls for training.

reference.moe loops over the experts (three small matmuls, an index_add and a copy of the whole
output per expert): on two cores most of a training step was that loop's per-op overhead. Here
the token-expert pairs are sorted by expert, gate and up together are one grouped matmul over
all experts, and down another. Same routing (reference.route), same math; only the order of
float additions differs (tests/test_demo_training.py checks values and gradients against
reference.moe).
"""

import torch
import torch.nn.functional as F

import reference


def _stacked(w, prefix, E, name):
    return torch.stack([w[f"{prefix}mlp.experts.{e}.{name}.weight"] for e in range(E)])


def stacked_key(prefix, name):
    """Where w may hold a layer's experts stacked: "gate_up" [E, 2 * I, H] (gate rows, then up
    rows) or "down" [E, H, I]. The trainer keeps its expert weights so (stack_experts) and
    the per-expert HF names as views of them; without them they are stacked on each call."""
    return f"{prefix}mlp.experts.{name}.stacked"


def stack_experts(cfg, w, requires_grad=False):
    """Make each MoE layer's expert matrices two stacked leaf tensors in w (stacked_key), with
    the HF names views into them: one tensor per layer and role for the optimizer, no stack per
    step. The leaves get requires_grad before the views are taken (a view taken earlier would
    not carry gradients to them). Returns the stacked keys."""
    E, keys = cfg["num_experts"], []
    for n in range(cfg.get("first_k_dense_replace", 0), cfg["num_hidden_layers"]):
        prefix = f"model.layers.{n}."
        for name, parts in (("gate_up", ("gate_proj", "up_proj")), ("down", ("down_proj",))):
            big = torch.cat([_stacked(w, prefix, E, part) for part in parts], 1).detach().clone()
            big.requires_grad_(requires_grad)
            rows = big.shape[1] // len(parts)
            for e in range(E):
                for i, part in enumerate(parts):
                    w[f"{prefix}mlp.experts.{e}.{part}.weight"] = big[e, i * rows:(i + 1) * rows]
            w[stacked_key(prefix, name)] = big
            keys.append(stacked_key(prefix, name))
    return keys


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
    gate_up = w.get(stacked_key(prefix, "gate_up"))
    if gate_up is None:
        gate_up = torch.cat([_stacked(w, prefix, E, "gate_proj"),
                             _stacked(w, prefix, E, "up_proj")], 1)
    down = w.get(stacked_key(prefix, "down"))
    if down is None:
        down = _stacked(w, prefix, E, "down_proj")
    g, u = F.grouped_mm(rows, gate_up.transpose(1, 2), offs=offs).chunk(2, dim=1)
    y = F.grouped_mm(F.silu(g) * u, down.transpose(1, 2), offs=offs)
    pair_out = y * weight.reshape(-1)[order].unsqueeze(-1)
    out = torch.zeros_like(flat).index_add(0, token, pair_out)
    if hits is not None:
        for e, c in enumerate(counts.tolist()):
            if c:
                hits[e] = hits.get(e, 0) + c
    if cfg.get("num_shared_experts"):
        out = out + reference.mlp(flat, w, prefix + "mlp.shared_experts.")
    return out.view(shape)
