"""PyTorch reference of LLaDA2.1's `generate()`: block diffusion with token-to-token editing
(SGLang's JointThreshold), on `reference.forward`, with **no cache**.

The oracle for `tide_cpp/generation.py` with `editing_threshold` set. Written from the published
description of the algorithm; every forward re-runs the whole window (prompt + blocks so far)
with the block-causal mask. Per block (window = everything up to the block's end):

    post = 0
    loop, at most block_length + max_post_steps + 1 forwards (SGLang's cap):
        old = block tokens; m = (old == MASK)
        if no m: post += 1
        if post > max_post_steps: break                     (checked before the forward)
        x0, p = token and its probability at every block position
        sel = (p > threshold) & m  if that selects >= 1 position, else the single most
              confident mask (torch.argmax: the lowest position among equals)
        edit = ~m & ~prompt & (p > editing_threshold) & (x0 != old)
        block[sel | edit] = x0[sel | edit]
        if no m and no edit: break                          (stable: the block is final)
    after the block: if the generated part holds an EOS, stop (earlier blocks are never edited,
    so later blocks cannot change the answer; the released loop stops here with
    eos_early_stop when no mask precedes it, and the answer is the same either way)

There is no in-step EOS check. `steps` and `minimal_topk` do not exist in this loop. The answer
is the generated part up to the first EOS (excluded), at most gen_length tokens.
"""

import torch

import reference
from reference_generate import answer, eos_ids, sample_tokens


def generate(cfg, w, prompt_ids, gen_length, *, mask_id, eos_id, block_length=32,
             threshold=0.7, editing_threshold=0.5, max_post_steps=16, temperature=0.0,
             top_k=None, top_p=None, eos_early_stop=True, generator=None, forward=None):
    """LLaDA2.1's generate(), without a cache. Returns the dict of reference_generate.generate
    plus `edits` (tokens replaced), `post_steps` (forwards after a block had no mask) and
    `forwards_per_block` (a list, one count per decoded block). eos_early_stop changes
    nothing here: the answer ends at the first EOS whether later blocks are decoded or not, and
    this reference (like tide_cpp.generation) stops after the block that holds it."""
    B = int(block_length)
    P = len(prompt_ids)
    n_blocks = (P + gen_length + B - 1) // B
    x = torch.full((n_blocks * B,), mask_id, dtype=torch.long)
    x[:P] = torch.as_tensor(list(prompt_ids), dtype=torch.long)
    eos = eos_ids(eos_id)
    if forward is None:
        def forward(ids):
            with torch.no_grad():
                return reference.forward(cfg, w, ids, B)

    n_steps = n_edits = n_post = 0
    per_block = []
    for blk in range(P // B, n_blocks):
        start, end = blk * B, (blk + 1) * B
        prompt = torch.arange(start, end) < P
        post = forwards = 0
        while forwards < B + max_post_steps + 1:
            old = x[start:end].clone()
            m = old == mask_id
            if not m.any():
                post += 1
            if post > max_post_steps:
                break
            logits = forward(x[:end])[start:end]
            forwards += 1
            x0, p = sample_tokens(logits, temperature, top_k, top_p, generator)
            sel = (p > threshold) & m
            if not sel.any() and m.any():
                conf = torch.where(m, p, torch.tensor(float("-inf")))
                sel = torch.zeros(B, dtype=torch.bool)
                sel[int(torch.argmax(conf))] = True
            edit = ~m & ~prompt & (p > editing_threshold) & (x0 != old)
            change = sel | edit
            x[start:end][change] = x0[change]
            n_edits += int(edit.sum())
            n_post += int(not m.any())
            if not m.any() and not edit.any():
                break
        n_steps += forwards
        per_block.append(forwards)
        if bool(torch.isin(x[P:end], eos).any()):
            break

    out = answer(x, P, gen_length, eos, n_steps, len(per_block))
    out.update(edits=n_edits, post_steps=n_post, forwards_per_block=per_block)
    return out
