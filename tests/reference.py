"""PyTorch reference of LLaDA2.0 (LLaDA2MoeModelLM), written from docs/MODEL.md.

The oracle for the converter, the CPU backend and the CUDA backend: weights are taken by their
Hugging Face names, upcast to f32, and every operation runs in f32. It is plain and slow on
purpose. `forward` is differentiable, so the demo model's trainer (models/) uses it too.
Generation (the released `generate()`, without a cache) lives in `reference_generate.py`.
"""

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

# ---- checkpoint ------------------------------------------------------------------------------


def load_checkpoint(path):
    """(config dict, {hf name: tensor}) from an HF folder (sharded safetensors + index)."""
    from safetensors.torch import load_file

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    weights = {}
    for f in sorted(path.glob("*.safetensors")):
        weights.update(load_file(str(f)))
    return config, weights


def stored_weights(weights, outtype):
    """The weights as a GGUF of `outtype` stores them, back in f32: what the engine computes with.

    f32/bf16 keep a bf16 checkpoint exactly; f16 rounds matrices to f16; q8_0 quantizes them
    with ggml's block format. 1-D tensors and the router stay f32, as the converter writes them.
    """
    import numpy as np

    out = {}
    for name, t in weights.items():
        t32 = t.float()
        is_matrix = t.dim() == 2 and not name.endswith("mlp.gate.weight")
        if not is_matrix or outtype in ("f32", "bf16"):
            out[name] = t32
        elif outtype == "f16":
            out[name] = t32.half().float()
        elif outtype == "q8_0":
            from gguf.constants import GGMLQuantizationType as Q
            from gguf.quants import dequantize, quantize

            a = t32.numpy()
            out[name] = torch.from_numpy(np.ascontiguousarray(
                dequantize(quantize(a, Q.Q8_0), Q.Q8_0).reshape(a.shape)).astype(np.float32))
        else:
            raise ValueError(f"outtype {outtype!r}")
    return out


# ---- the layers ------------------------------------------------------------------------------


def rmsnorm(x, w, eps):
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.float()


def rope_tables(pos, rope_dim, theta):
    """cos and sin [..., 1, rope_dim] of the NeoX angles at positions pos [...]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))
    freqs = pos.float()[..., None] * inv_freq
    angles = torch.cat([freqs, freqs], -1)[..., None, :]
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin, rope_dim):
    """NeoX-style rotation of the first rope_dim dims of each head by rope_tables' cos and sin."""
    half = rope_dim // 2
    xr, xp = x[..., :rope_dim], x[..., rope_dim:]
    rotated = torch.cat([-xr[..., half:], xr[..., :half]], -1)
    return torch.cat([xr * cos + rotated * sin, xp], -1)


def head_dims(cfg):
    """(head_dim, rope_dim): the per-head width and how many of its dims RoPE rotates."""
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return hd, int(hd * cfg.get("partial_rotary_factor", 1.0))


def block_causal_mask(T, block_length):
    """mask[i, j] = key j visible to query i: j's block is not after i's (blocks from 0)."""
    b = torch.arange(T) // block_length
    return b[None, :] <= b[:, None]


def qkv_heads(cfg, w, prefix, x):
    """q, k, v [..., T, heads, head_dim] of the fused projection, q and k RMS-normed (QK-norm),
    before RoPE."""
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, _ = head_dims(cfg)
    eps = cfg["rms_norm_eps"]
    qkv = x @ w[prefix + "attention.query_key_value.weight"].float().T
    qkv = qkv.view(*x.shape[:-1], nh + 2 * nkv, hd)
    q, k, v = qkv.split([nh, nkv, nkv], dim=-2)
    if cfg.get("use_qk_norm", True):
        q = rmsnorm(q, w[prefix + "attention.query_layernorm.weight"], eps)
        k = rmsnorm(k, w[prefix + "attention.key_layernorm.weight"], eps)
    return q, k, v


def attention(cfg, w, prefix, x, pos, mask):
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, rope_dim = head_dims(cfg)
    q, k, v = qkv_heads(cfg, w, prefix, x)                      # [..., T, heads, hd]
    cos, sin = rope_tables(pos, rope_dim, cfg["rope_theta"])
    q, k = apply_rope(q, cos, sin, rope_dim), apply_rope(k, cos, sin, rope_dim)
    rep = nh // nkv
    k = k.repeat_interleave(rep, dim=-2)
    v = v.repeat_interleave(rep, dim=-2)
    q, k, v = (t.transpose(-3, -2) for t in (q, k, v))          # [..., heads, T, hd]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    out = out.transpose(-3, -2).reshape(*x.shape[:-1], nh * hd)
    return out @ w[prefix + "attention.dense.weight"].float().T


def mlp(x, w, prefix):
    g = x @ w[prefix + "gate_proj.weight"].float().T
    u = x @ w[prefix + "up_proj.weight"].float().T
    return (F.silu(g) * u) @ w[prefix + "down_proj.weight"].float().T


def route(cfg, w, prefix, x):
    """Sigmoid group-limited router. x: [N, H] -> (expert ids [N, k], weights [N, k]) in the
    router's order (descending biased score)."""
    E, k = cfg["num_experts"], cfg["num_experts_per_tok"]
    n_group, topk_group = cfg.get("n_group") or 1, cfg.get("topk_group") or 1
    logits = x.float() @ w[prefix + "gate.weight"].float().T
    scores = torch.sigmoid(logits)
    bias = w.get(prefix + "gate.expert_bias")
    choice = scores + (bias.float() if bias is not None else 0.0)
    if n_group > 1:
        group_scores = choice.view(-1, n_group, E // n_group).topk(2, dim=-1)[0].sum(-1)
        group_idx = torch.topk(group_scores, k=topk_group, dim=-1)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
        score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, E // n_group).reshape(-1, E)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    idx = torch.topk(choice, k=k, dim=-1)[1]
    weight = scores.gather(1, idx)
    if k > 1 and cfg.get("norm_topk_prob", True):
        weight = weight / (weight.sum(-1, keepdim=True) + 1e-20)
    return idx, weight * cfg.get("routed_scaling_factor", 1.0)


def moe(cfg, w, prefix, x, hits=None):
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    idx, weight = route(cfg, w, prefix + "mlp.", flat)
    out = torch.zeros_like(flat)
    for e in torch.unique(idx).tolist():
        tok, slot = (idx == e).nonzero(as_tuple=True)
        y = mlp(flat[tok], w, f"{prefix}mlp.experts.{e}.")
        out = out.index_add(0, tok, y * weight[tok, slot].unsqueeze(-1))
        if hits is not None:
            hits[e] = hits.get(e, 0) + len(tok)
    if cfg.get("num_shared_experts"):
        out = out + mlp(flat, w, prefix + "mlp.shared_experts.")
    return out.view(shape)


# ---- the model -------------------------------------------------------------------------------


def layers(cfg, w, x, attend):
    """The decoder layers over hidden states x: pre-norm attention (attend(prefix, normed x)),
    then the dense MLP (first_k_dense_replace layers) or the MoE, each added to the residual."""
    eps = cfg["rms_norm_eps"]
    first_moe = cfg.get("first_k_dense_replace", 0)
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        x = x + attend(p, rmsnorm(x, w[p + "input_layernorm.weight"], eps))
        h = rmsnorm(x, w[p + "post_attention_layernorm.weight"], eps)
        x = x + (mlp(h, w, p + "mlp.") if n < first_moe else moe(cfg, w, p, h))
    return x


def forward(cfg, w, ids, block_length, return_hidden=False):
    """Block-causal forward from position 0. ids: [T] or [batch, T] -> logits [.., T, vocab]."""
    ids = torch.as_tensor(ids)
    T = ids.shape[-1]
    pos = torch.arange(T)
    mask = block_causal_mask(T, block_length)
    eps = cfg["rms_norm_eps"]
    x = w["model.word_embeddings.weight"].float()[ids]
    x = layers(cfg, w, x, lambda p, h: attention(cfg, w, p, h, pos, mask))
    x = rmsnorm(x, w["model.norm.weight"], eps)
    if return_hidden:
        return x
    return x @ w["lm_head.weight"].float().T
