"""Long prompts and conversations: the multi-block commit (a prefill in micro-batches), the cache
kept across calls (prefix reuse, truncate) and across processes (save_state / load_state).

Exactness is checked through the cache itself: a state file holds the ids, keys and values of
every cached row, so two files with the same bytes mean bit-identical caches."""

import os

import numpy as np
import pytest

from tide_cpp import Model, TideError

B = 8


@pytest.fixture(scope="module")
def gguf(tiny_gguf):
    return tiny_gguf("base", "f32")[0]


def ids_of(n, seed=1, vocab=200):
    return np.random.default_rng(seed).integers(3, vocab, size=n).astype(np.int32)


def cache_bytes(m, path):
    m.save_state(path)
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("device", ["cpu", "sim"])
@pytest.mark.parametrize("n_batch", [8, 24, 512])
def test_multi_block_commit_is_bit_identical_to_per_block(gguf, tmp_path, device, n_batch):
    ids = ids_of(61)      # 7 whole blocks and a partial one
    full = len(ids) // B * B
    with Model(gguf, device=device, n_threads=2, n_ctx=128) as a, \
            Model(gguf, device=device, n_threads=2, n_ctx=128, n_batch=n_batch) as b:
        for i in range(0, full, B):
            a.commit(ids[i:i + B])
        b.commit(ids[:full], block_length=B)
        assert b.n_past == full
        assert b.cache_block_length == B == a.cache_block_length
        assert cache_bytes(a, tmp_path / "a") == cache_bytes(b, tmp_path / "b")
        np.testing.assert_array_equal(b.cache_tokens(), ids[:full])
        # a step against either cache gives the same bits
        block = ids[full:full + B].copy()
        block = np.concatenate([block, np.full(B - len(block), a.mask_token_id, np.int32)])
        want = np.ones(B, bool)
        ta, pa = a.step(block, want, 0)
        tb, pb = b.step(block, want, 0)
        np.testing.assert_array_equal(ta, tb)
        np.testing.assert_array_equal(pa.view(np.uint32), pb.view(np.uint32))


def test_multi_block_commit_one_forward_per_micro_batch(gguf):
    ids = ids_of(64)
    with Model(gguf, n_threads=2, n_ctx=128, n_batch=20, trace=True) as m:
        m.set_block_length(B)
        m.commit(ids, block_length=B)            # 20 rows -> 16 (whole blocks): 4 forwards
        t = m.trace()
        assert list(t["n_tokens"]) == [16, 16, 16, 16]
        assert list(t["kind"]) == [1, 1, 1, 1]
        assert list(t["block"]) == [0, 2, 4, 6]
        assert m.stats()["forwards"] == 4
        # every token-expert pair of the prefill was routed once
        used = m.hparams["n_expert_used"]
        assert int(t["hits"].sum()) == 64 * used * m.n_moe_layers


def test_commit_blocks_refuses_overflow_and_bad_block_length(gguf):
    with Model(gguf, n_threads=1, n_ctx=32) as m:
        with pytest.raises(TideError, match="context full"):
            m.commit(ids_of(40), block_length=B)
        with pytest.raises(ValueError, match="block_length"):
            m.commit(ids_of(8), block_length=0)
        assert m.n_past == 0


def test_truncate(gguf, tmp_path):
    ids = ids_of(32)
    with Model(gguf, n_threads=2, n_ctx=64) as a, Model(gguf, n_threads=2, n_ctx=64) as b:
        a.commit(ids, block_length=B)
        a.truncate(16)
        assert a.n_past == 16
        np.testing.assert_array_equal(a.cache_tokens(), ids[:16])
        a.commit(ids[16:24][::-1].copy(), block_length=B)   # overwrite the rows after 16
        b.commit(np.concatenate([ids[:16], ids[16:24][::-1]]), block_length=B)
        assert cache_bytes(a, tmp_path / "a") == cache_bytes(b, tmp_path / "b")
        with pytest.raises(TideError, match="truncate"):
            a.truncate(100)
        a.truncate(0)
        assert a.n_past == 0 and a.cache_block_length == 0


def test_reuse_prefix_rules(gguf):
    ids = ids_of(40)
    with Model(gguf, n_threads=2, n_ctx=64) as m:
        m.commit(ids[:32], block_length=B)
        other = ids.copy()
        other[19] += 1                               # diverges inside block 2
        assert m.reuse_prefix(other, B) == 16        # whole blocks before the difference
        assert m.n_past == 16
        m.commit(ids[16:32], block_length=B)
        assert m.reuse_prefix(ids, 16) == 0          # rows committed under another block length
        assert m.n_past == 0


def _generate(m, prompt, **kw):
    kw.setdefault("block_length", B)
    kw.setdefault("max_tokens", 16)
    kw.setdefault("steps", 4)
    return m.generate(prompt, **kw)


def test_generate_reuses_the_previous_prompt_with_identical_results(gguf, tmp_path):
    a = ids_of(45, seed=3)
    ab = np.concatenate([a, ids_of(21, seed=4)])
    with Model(gguf, n_threads=2, n_ctx=128) as warm, Model(gguf, n_threads=2, n_ctx=128) as fresh:
        first = _generate(warm, a)
        assert first.stats["prompt_tokens_reused"] == 0
        g = _generate(warm, ab)
        assert g.stats["prompt_tokens_reused"] == len(a) // B * B
        ref = _generate(fresh, ab)
        assert ref.stats["prompt_tokens_reused"] == 0
        assert g.tokens == ref.tokens
        # the whole cache (prompt and committed answer blocks) is the fresh model's, bit for bit
        assert cache_bytes(warm, tmp_path / "w") == cache_bytes(fresh, tmp_path / "f")
        # same prompt again: everything but the partial last block is reused
        again = _generate(warm, ab)
        assert again.tokens == ref.tokens
        assert again.stats["prompt_tokens_reused"] == len(ab) // B * B


def test_generate_with_sampling_after_reuse_matches_fresh(gguf):
    a = ids_of(40, seed=5)
    with Model(gguf, n_threads=2, n_ctx=128) as warm, Model(gguf, n_threads=1, n_ctx=128) as fresh:
        _generate(warm, a[:24])
        g = _generate(warm, a, temperature=0.8, top_k=20, seed=7)
        ref = _generate(fresh, a, temperature=0.8, top_k=20, seed=7)
        assert g.stats["prompt_tokens_reused"] == 24
        assert g.tokens == ref.tokens


def test_state_round_trip_across_models(gguf, tmp_path):
    prompt = ids_of(50, seed=6)
    path = tmp_path / "system.state"
    with Model(gguf, n_threads=2, n_ctx=128) as m:
        m.commit(prompt[:48], block_length=B)
        m.save_state(path)
        saved = path.read_bytes()
    assert not [p for p in os.listdir(tmp_path) if ".tmp." in p]   # no temporary left behind
    with Model(gguf, device="sim", n_threads=2, n_ctx=128) as m, \
            Model(gguf, n_threads=2, n_ctx=128) as fresh:
        m.load_state(path)
        assert m.n_past == 48 and m.cache_block_length == B
        np.testing.assert_array_equal(m.cache_tokens(), prompt[:48])
        assert cache_bytes(m, tmp_path / "again") == saved
        g = _generate(m, prompt)
        assert g.stats["prompt_tokens_reused"] == 48
        assert g.tokens == _generate(fresh, prompt).tokens


def test_state_refused_for_another_model_context_or_garbage(gguf, tiny_gguf, tmp_path):
    path = tmp_path / "s.state"
    with Model(gguf, n_threads=1, n_ctx=128) as m:
        m.commit(ids_of(40), block_length=B)
        m.save_state(path)
    other = tiny_gguf("base", "f32", seed=1)[0]
    with Model(other, n_threads=1, n_ctx=128) as m:
        with pytest.raises(TideError, match="another model"):
            m.load_state(path)
        assert m.n_past == 0
    with Model(gguf, n_threads=1, n_ctx=32) as m:
        with pytest.raises(TideError, match="more than n_ctx"):
            m.load_state(path)
    data = path.read_bytes()
    (tmp_path / "short").write_bytes(data[:-4])
    (tmp_path / "junk").write_bytes(b"not a state file at all, clearly" * 4)
    with Model(gguf, n_threads=1, n_ctx=128) as m:
        with pytest.raises(TideError, match="truncated"):
            m.load_state(tmp_path / "short")
        with pytest.raises(TideError, match="not a tide.cpp state file"):
            m.load_state(tmp_path / "junk")
        with pytest.raises(TideError, match="cannot open"):
            m.load_state(tmp_path / "missing")
        with pytest.raises(TideError, match="cannot create"):
            m.save_state(tmp_path / "no" / "such" / "dir")


def test_prompt_longer_than_context_is_a_clear_error(gguf):
    with Model(gguf, n_threads=1, n_ctx=64) as m:
        with pytest.raises(ValueError, match="no room in the context"):
            m.generate(ids_of(80), block_length=B, steps=4)


def test_cli_prompt_cache_across_processes(gguf, tmp_path, capsys):
    from tide_cpp import cli

    cache = tmp_path / "prompt.cache"
    prompt = "The quick brown fox jumps over the lazy dog. " * 3
    base = ["generate", "-m", gguf, "--device", "cpu", "--threads", "1", "--n-ctx", "128",
            "--block-length", str(B), "--steps", "4", "--max-tokens", "8", "-p", prompt]
    assert cli.main(base) == 0
    plain = capsys.readouterr()
    assert cli.main(base + ["--prompt-cache", str(cache)]) == 0
    first = capsys.readouterr()
    assert cache.exists() and "from the cache" not in first.err
    assert cli.main(base + ["--prompt-cache", str(cache)]) == 0
    second = capsys.readouterr()
    assert "from the cache" in second.err
    assert plain.out == first.out == second.out
    # a cache of another model is refused with the reason, and the answer is computed afresh
    cache.write_bytes(b"TIDESTAT" + b"\0" * 100)
    assert cli.main(base + ["--prompt-cache", str(cache)]) == 0
    third = capsys.readouterr()
    assert "prompt cache not used" in third.err and third.out == plain.out


def test_chat_turn_prefills_only_its_new_tokens(gguf):
    turn1 = [{"role": "system", "content": "You answer briefly. " * 4},
             {"role": "user", "content": "What is 37 plus 48?"}]
    kw = dict(max_tokens=16, block_length=B, steps=4)
    with Model(gguf, n_threads=2, n_ctx=256, trace=True) as warm, \
            Model(gguf, n_threads=2, n_ctx=256, trace=True) as fresh:
        answer = warm.create_chat_completion(turn1, **kw)["choices"][0]["message"]["content"]
        turn2 = turn1 + [{"role": "assistant", "content": answer},
                         {"role": "user", "content": "And 12 times 3?"}]
        warm.clear_trace()
        got = warm.create_chat_completion(turn2, **kw)
        ref = fresh.create_chat_completion(turn2, **kw)
        assert got["choices"][0]["message"] == ref["choices"][0]["message"]

        def prefilled(m):
            t = m.trace()
            first_step = list(t["kind"]).index(0)
            return int(t["n_tokens"][:first_step].sum())

        n_prompt = ref["usage"]["prompt_tokens"]
        assert prefilled(fresh) == n_prompt // B * B
        assert prefilled(warm) < prefilled(fresh) - 2 * B   # the first turn came from the cache


def test_n_ctx_default_explicit_and_too_large(gguf):
    with Model(gguf, n_threads=1) as m:
        assert m.n_ctx == m.hparams["n_ctx_train"]
        per = m.cache_bytes // m.n_ctx
        assert per == 2 * m.hparams["n_layer"] * m.hparams["n_head_kv"] * m.hparams["head_dim"] * 4
    # a device whose memory holds the weights and a short cache only
    with Model(gguf, device="sim", n_threads=1, n_ctx=64) as m:
        need = m.cache_bytes
        weights = m.stats()["weights_h2d_bytes"]
    budget = weights + (1 << 20) + 600 * per * 2
    with pytest.warns(RuntimeWarning, match="fits in half of the free memory"):
        m = Model(gguf, device="sim", policy="cpu", n_threads=1, device_memory=budget)
    with m:
        assert 256 <= m.n_ctx < m.hparams["n_ctx_train"] and m.n_ctx % 256 == 0
    with pytest.raises(TideError, match=r"n_ctx 4096: the KV cache needs \d+ bytes .* free on sim"):
        Model(gguf, device="sim", policy="cpu", n_threads=1, device_memory=budget, n_ctx=4096)
    assert need == 64 * per


@pytest.mark.parametrize("cache_type", ["f16", "bf16"])
def test_half_cache(gguf, tmp_path, cache_type):
    ids = ids_of(48)
    with Model(gguf, n_threads=2, n_ctx=64) as ref, \
            Model(gguf, n_threads=2, n_ctx=64, cache_type=cache_type) as half, \
            Model(gguf, device="sim", n_threads=2, n_ctx=64, cache_type=cache_type,
                  n_batch=8) as sim:
        assert half.cache_bytes * 2 == ref.cache_bytes
        block = ids[40:48].copy()
        want = np.ones(B, bool)
        out = []
        for m in (ref, half, sim):
            m.commit(ids[:40], block_length=B)
            out.append(m.step(block, want, 0))
        # rounding the cached keys and values moves the result a little, never a lot
        diff = np.abs(out[0][1] - out[1][1]).max()
        assert 0 < diff < (0.02 if cache_type == "f16" else 0.1)
        # and the half cache is as row-deterministic as the f32 one: micro-batches, device
        np.testing.assert_array_equal(out[1][0], out[2][0])
        np.testing.assert_array_equal(out[1][1].view(np.uint32), out[2][1].view(np.uint32))
        assert cache_bytes(half, tmp_path / "h") == cache_bytes(sim, tmp_path / "s")
        with pytest.raises(TideError, match=f"cache type {cache_type}, this context's is f32"):
            ref.load_state(tmp_path / "h")
    with pytest.raises(ValueError, match="cache_type"):
        Model(gguf, cache_type="q8_0")
