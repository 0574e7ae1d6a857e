"""The native forward pass against the PyTorch reference (tests/reference.py), on every tiny shape.

Tolerances. The core computes in f32 with the weights expanded to f32 inside each dot product;
the reference upcasts the same stored weights to f32 (`stored_weights`) and computes in f32. f16,
bf16 and q8_0 values (d * q) are exact in f32, so for every outtype both sides multiply exactly
the same numbers and differ only by f32 summation order (dot products, softmax, norms): relative
errors of ~1e-6 of the largest logit are what we see. So f32, bf16, f16 and q8_0 are all held to
1e-4 of the largest |logit| against the reference of their own stored weights; f32 must also
give the identical argmax at every position (for the quantized types a near-tie may flip it,
which says nothing about correctness, so it is not asserted).
"""

import numpy as np
import pytest
import torch

import hf_checkpoint as hfc
import reference as ref
from tide_cpp import Model

SHAPES = list(hfc.SHAPES)
BLOCKS = [1, 4, 32]
LENGTHS = [8, 37, 64]  # multiple of 1, 4; not of 4 or 32; multiple of all
TOL = 1e-4


def ids_for(cfg, n, seed=0):
    return np.random.default_rng(seed).integers(0, cfg["vocab_size"], n)


_ref_cache = {}


def ref_logits(cfg, w, outtype, ids, bl):
    key = (id(w), outtype, tuple(ids.tolist()), bl)
    if key not in _ref_cache:
        sw = ref.stored_weights(w, outtype)
        with torch.no_grad():
            _ref_cache[key] = ref.forward(cfg, sw, torch.as_tensor(ids), bl).numpy()
    return _ref_cache[key]


def rel_err(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("shape", SHAPES)
def test_logits_f32_every_shape(tiny_gguf, shape):
    path, cfg, w = tiny_gguf(shape, "f32")
    with Model(path, device="cpu", n_threads=2) as m:
        for n in LENGTHS:
            ids = ids_for(cfg, n, seed=n)
            for bl in BLOCKS:
                got = m.logits(ids, block_length=bl)
                want = ref_logits(cfg, w, "f32", ids, bl)
                assert got.shape == (n, cfg["vocab_size"]) and got.dtype == np.float32
                err = rel_err(got, want)
                assert err < TOL, f"{shape} n={n} block={bl}: relative error {err:.2e}"
                assert (got.argmax(-1) == want.argmax(-1)).all(), f"{shape} n={n} block={bl}"


@pytest.mark.parametrize("outtype", ["bf16", "f16", "q8_0"])
@pytest.mark.parametrize("shape", ["base", "wide"])
def test_logits_stored_types(tiny_gguf, shape, outtype):
    path, cfg, w = tiny_gguf(shape, outtype)
    with Model(path, device="cpu", n_threads=2) as m:
        for n, bl in [(37, 4), (64, 32), (8, 1)]:
            ids = ids_for(cfg, n, seed=n)
            got = m.logits(ids, block_length=bl)
            want = ref_logits(cfg, w, outtype, ids, bl)
            err = rel_err(got, want)
            assert err < TOL, f"{shape} {outtype} n={n} block={bl}: relative error {err:.2e}"


def test_bf16_equals_f32_file(tiny_gguf):
    """A bf16 checkpoint stored as f32 or bf16 holds the same numbers: identical logits."""
    p32, cfg, _ = tiny_gguf("base", "f32")
    p16, _, _ = tiny_gguf("base", "bf16")
    ids = ids_for(cfg, 37)
    with Model(p32) as a, Model(p16) as b:
        assert np.array_equal(a.logits(ids, 4), b.logits(ids, 4))


def softmax_top(logits):
    m = logits.max(-1, keepdims=True)
    e = np.exp((logits - m).astype(np.float64))
    return logits.argmax(-1), (1.0 / e.sum(-1)).astype(np.float32)


@pytest.mark.parametrize("shape", ["base", "dense2", "wide"])
@pytest.mark.parametrize("bl", [4, 32])
def test_kv_cache_path_equals_full_forward(tiny_gguf, shape, bl):
    """Commit the finished blocks one by one, then step the active block: the same tokens and
    probabilities as the full block-causal forward, bit for bit (row-deterministic kernels, the
    same keys in the same order); step leaves the cache as it was."""
    path, cfg, _ = tiny_gguf(shape, "f32")
    n_blocks = 3
    ids = ids_for(cfg, n_blocks * bl, seed=bl)
    with Model(path, device="cpu", n_threads=2) as m:
        full = m.logits(ids, block_length=bl)
        tok_full = full.argmax(-1).astype(np.int32)
        assert m.n_past == 0
        for b in range(n_blocks - 1):
            # each block, before it is committed, is a step against the cache so far
            blk = ids[b * bl:(b + 1) * bl]
            tok, prob = m.step(blk, np.ones(bl, bool), step_in_block=0)
            assert np.array_equal(tok, tok_full[b * bl:(b + 1) * bl])
            _, p = softmax_top(full[b * bl:(b + 1) * bl])
            np.testing.assert_allclose(prob, p, rtol=1e-5)
            m.commit(blk)
            assert m.n_past == (b + 1) * bl
        last = ids[(n_blocks - 1) * bl:]
        want = np.zeros(bl, bool)
        want[::2] = True  # lm_head only for some rows
        tok, prob = m.step(last, want, step_in_block=3)
        assert m.n_past == (n_blocks - 1) * bl
        rows = slice((n_blocks - 1) * bl, None)
        exp_tok = np.where(want, tok_full[rows], -1)
        assert np.array_equal(tok, exp_tok)
        _, p = softmax_top(full[rows])
        np.testing.assert_allclose(prob[want], p[want], rtol=1e-5)
        assert (prob[~want] == 0).all()
        tok2, prob2 = m.step(last, want, step_in_block=4)
        assert np.array_equal(tok, tok2) and np.array_equal(prob, prob2)
        # a partial last block (the prompt's end): the step sees the cache plus itself
        part = last[: bl // 2 + 1]
        full_p = m.logits(np.concatenate([ids[:(n_blocks - 1) * bl], part]), block_length=bl)
        for b in range(n_blocks - 1):
            m.commit(ids[b * bl:(b + 1) * bl])
        tok, _ = m.step(part, np.ones(part.size, bool), step_in_block=0)
        assert np.array_equal(tok, full_p[(n_blocks - 1) * bl:].argmax(-1))


def test_step_probs_exact_against_logits(tiny_gguf):
    """Greedy step probability = softmax(logits)[argmax] in f32 (the same rows, bit for bit)."""
    path, cfg, _ = tiny_gguf("base", "f32")
    ids = ids_for(cfg, 8, seed=3)
    with Model(path) as m:
        full = m.logits(ids, block_length=8)
        tok, prob = m.step(ids, np.ones(8, bool), step_in_block=0)
        assert np.array_equal(tok, full.argmax(-1))
        _, p = softmax_top(full)
        np.testing.assert_allclose(prob, p, rtol=1e-6)


@pytest.mark.parametrize("shape", ["base", "wide"])
def test_threads_bit_identical(tiny_gguf, shape):
    path, cfg, _ = tiny_gguf(shape, "bf16")
    ids = ids_for(cfg, 37, seed=5)
    outs = []
    for nt in (1, 2, 3):
        with Model(path, n_threads=nt) as m:
            lg = m.logits(ids, block_length=4)
            m.commit(ids[:32])
            tok, prob = m.step(ids[32:], np.ones(5, bool), step_in_block=0)
            outs.append((lg, tok, prob))
    for lg, tok, prob in outs[1:]:
        assert np.array_equal(lg, outs[0][0])
        assert np.array_equal(tok, outs[0][1]) and np.array_equal(prob, outs[0][2])


def test_sampling_step(tiny_gguf):
    """temperature > 0: draws are a pure function of (seed, position); top_k=1 is greedy."""
    path, cfg, _ = tiny_gguf("base", "f32")
    ids = ids_for(cfg, 8, seed=9)
    want = np.ones(8, bool)
    with Model(path) as m:
        g, gp = m.step(ids, want, 0)
        a = m.step(ids, want, 0, temperature=1.0, seed=7)
        b = m.step(ids, want, 0, temperature=1.0, seed=7)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        assert ((a[0] >= 0) & (a[0] < cfg["vocab_size"])).all()
        k1 = m.step(ids, want, 0, temperature=1.0, top_k=1, seed=3)
        assert np.array_equal(k1[0], g)
        np.testing.assert_allclose(k1[1], 1.0)


def test_context_full(tiny_gguf):
    from tide_cpp import TideError
    path, cfg, _ = tiny_gguf("base", "f32")
    with Model(path, n_ctx=16) as m:
        m.commit(ids_for(cfg, 12))
        with pytest.raises(TideError, match="12 cached \\+ 8 new tokens > n_ctx 16"):
            m.step(ids_for(cfg, 8), np.ones(8, bool), 0)
        with pytest.raises(TideError, match="n_ctx 16"):
            m.logits(ids_for(cfg, 17))
