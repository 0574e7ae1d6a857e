"""One decode-shaped sequence of forwards, shared by the tests that compare two runs of the engine
output for output (policies, budgets, file layouts)."""

import numpy as np


def drive(m, ids, block_length, n_steps):
    """Prefill block 0, then per block n_steps steps (each writes one of its tokens back, so the
    routing moves) and a commit; then a full logits call. Returns every output, in order."""
    m.set_block_length(block_length)
    m.reset()
    outs = []
    m.commit(ids[:block_length])
    for b in range(1, len(ids) // block_length):
        blk = ids[b * block_length:(b + 1) * block_length].copy()
        want = np.ones(block_length, bool)
        for s in range(n_steps):
            tok, prob = m.step(blk, want, step_in_block=s)
            outs += [tok, prob]
            blk[s] = tok[s]
            want[s] = False
        m.commit(blk)
    outs.append(m.logits(ids, block_length=block_length))
    return outs
