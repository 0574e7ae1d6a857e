"""The trainer's forward pass: tests/reference.py's model over rows of several packed sequences.

A training sequence is useful only up to the end of its noised block: blocks after it are
invisible to it (block-causal) and carry no loss. Padding every sequence of a batch to the longest
one computed a third of a step's tokens for nothing. Here each sequence is cut at the end of its
noised block and the pieces are packed into rows of a fixed length; a token attends only to its
own sequence, block-causally, with positions counted from that sequence's start. So per sequence
this is reference.forward on that sequence alone (tests/test_demo_training.py checks the logits
and gradients); only the order of float additions differs.

Attention is one scaled_dot_product_attention call per layer (GQA without copying the K/V heads),
the RoPE angles are computed once per forward instead of twice per layer, and the MoE layers go
through reference.moe (which train.py points at moe_batched's grouped matmuls).
"""

import torch
import torch.nn.functional as F

import reference


def pack(lengths, row_len):
    """First-fit decreasing: [(row, offset)] per sequence, and the row count. Every length must be
    at most row_len."""
    if max(lengths) > row_len:
        raise ValueError(f"a sequence of {max(lengths)} tokens does not fit a row of {row_len}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    free, place = [], [None] * len(lengths)
    for i in order:
        for r, room in enumerate(free):
            if room >= lengths[i]:
                break
        else:
            r = len(free)
            free.append(row_len)
        place[i] = (r, row_len - free[r])
        free[r] -= lengths[i]
    return place, len(free)


def packed_mask(seg, pos, block_length, group=None):
    """[rows, 1, L, L] bool: key j visible to query i when both are of one sequence and j's block
    is not after i's (reference.block_causal_mask within each sequence). With `group` [rows, L]
    (0: the sequence's clean tokens; g > 0: a noised copy of one block, train.Batcher): a key
    of a noised copy is visible only to its own copy, and a copy sees the clean blocks before
    its own, so each copy is reference.forward on (clean blocks before it + that block)."""
    blk = pos // block_length
    same = seg[:, :, None] == seg[:, None, :]
    if group is None:
        return (same & (blk[:, None, :] <= blk[:, :, None])).unsqueeze(1)
    clean_before = (group[:, None, :] == 0) & (blk[:, None, :] < blk[:, :, None])
    own = (group[:, None, :] == group[:, :, None]) & (blk[:, None, :] <= blk[:, :, None])
    return (same & (clean_before | own)).unsqueeze(1)


def attention(cfg, w, prefix, x, cos, sin, mask):
    """reference.attention on packed rows: its projections, RoPE from the forward's tables, and
    the core as one SDPA call."""
    rope_dim = cos.shape[-1]
    q, k, v = reference.qkv_heads(cfg, w, prefix, x)
    q, k = reference.apply_rope(q, cos, sin, rope_dim), reference.apply_rope(k, cos, sin, rope_dim)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))          # [rows, heads, L, hd]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    out = out.transpose(1, 2).flatten(-2)
    return out @ w[prefix + "attention.dense.weight"].T


def forward(cfg, w, ids, seg, pos, block_length, at=None, group=None):
    """Logits [rows, L, vocab] of packed rows: ids, seg (sequence of each token), pos (its
    position in that sequence), all [rows, L]; `group` as packed_mask's. With a bool mask `at`
    [rows, L]: only the logits of those tokens, [n, vocab] (the output projection of the others
    is never needed)."""
    _, rope_dim = reference.head_dims(cfg)
    cos, sin = reference.rope_tables(pos, rope_dim, cfg["rope_theta"])   # once, not per layer
    mask = packed_mask(seg, pos, block_length, group)
    x = w["model.word_embeddings.weight"][ids]
    x = reference.layers(cfg, w, x, lambda p, h: attention(cfg, w, p, h, cos, sin, mask))
    x = reference.rmsnorm(x if at is None else x[at], w["model.norm.weight"], cfg["rms_norm_eps"])
    return x @ w["lm_head.weight"].T
