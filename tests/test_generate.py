"""Block-diffusion generation (tide_cpp/generation.py) against the released algorithm
(tests/reference_generate.py, no cache).

Two layers:
- the schedule on `ReferenceModel` (the step API over reference.forward, full recompute) must
  give exactly the reference's tokens and step count: this checks the cache bookkeeping, prefill,
  the commit rule, minimal_topk and EOS handling without the native core;
- the native engine (`tide_cpp.Model` on a converted tiny checkpoint) must give the reference's
  greedy tokens too. Skipped when the library is not built.
"""

import numpy as np
import pytest

import reference_generate as rg
from tide_cpp import generation

B = 8
EOS_BIAS = (287, 1.05)  # EOS row = 1.05 x the row of a frequent token: EOS lands mid-answer


@pytest.fixture(scope="module")
def tiny():
    cfg, w, m = rg.tiny_model(seed=0)
    return cfg, w, m


@pytest.fixture(scope="module")
def tiny_eos():
    cfg, w, m = rg.tiny_model(seed=0)
    m.w = rg.bias_eos(cfg, w, EOS_BIAS[1], like=EOS_BIAS[0])
    return cfg, m.w, m


TEXT = ("The quick brown fox jumps over the lazy dog. What is 37 plus 48? Hello, world! "
        "How are you today?")


def prompt_ids(m, n):
    ids = m.tokenize(TEXT)
    assert len(ids) >= n
    return ids[:n]


def with_context(m, n_ctx):
    small = rg.ReferenceModel(m.cfg, m.w, m.metadata_string("tokenizer.huggingface.json"),
                              m.metadata_string("tokenizer.chat_template"), n_ctx=n_ctx)
    return small


def run_both(cfg, w, m, ids, **kw):
    kw.setdefault("block_length", B)
    ref = rg.generate(cfg, w, ids, kw.get("max_tokens", 256), mask_id=m.mask_token_id,
                      eos_id=m.eos_token_id,
                      **{k: v for k, v in kw.items() if k not in ("max_tokens",)})
    m.reset_stats()
    got = generation.generate(m, ids, **kw)
    return ref, got


# ---- the schedule on the reference model -------------------------------------------------------

# prompt shorter than a block, equal, longer ending mid-block, longer ending on a block edge
@pytest.mark.parametrize("n_prompt", [5, 8, 13, 16])
@pytest.mark.parametrize("threshold", [0.5, 0.95, 1.0])
def test_schedule_equals_reference(tiny, n_prompt, threshold):
    cfg, w, m = tiny
    ids = prompt_ids(m, n_prompt)
    ref, got = run_both(cfg, w, m, ids, max_tokens=20, steps=B, threshold=threshold)
    assert got.tokens == ref["tokens"]
    assert got.stats["steps"] == ref["steps"]
    assert got.stats["blocks"] == ref["blocks"]
    assert len(got.tokens) == 20 and got.finish_reason == "length"
    # prefill: one commit per block the prompt fills, before any step
    calls = m.calls
    n_prefill = n_prompt // B
    assert calls[:n_prefill] == [("commit", B)] * n_prefill
    assert calls[n_prefill][0] == "step" and calls[n_prefill][2] == 0
    # every finished block but the last is committed once
    assert sum(c[0] == "commit" for c in calls) == n_prefill + ref["blocks"] - 1


@pytest.mark.parametrize("steps", [3, 5])
def test_fewer_steps_than_block(tiny, steps):
    cfg, w, m = tiny
    ids = prompt_ids(m, 13)
    ref, got = run_both(cfg, w, m, ids, max_tokens=19, steps=steps, threshold=0.95)
    assert got.tokens == ref["tokens"] and got.stats["steps"] == ref["steps"]
    assert got.stats["steps"] <= steps * got.stats["blocks"]


def test_threshold_one_follows_the_schedule_exactly(tiny):
    # threshold 1.0: nothing beats it, so each step commits exactly schedule[i] tokens
    cfg, w, m = tiny
    ids = prompt_ids(m, 8)
    seen = []
    got = generation.generate(m, ids, max_tokens=16, block_length=B, steps=3, threshold=1.0,
                              on_step=lambda s: seen.append(len(s.committed)))
    assert seen == [3, 3, 2] * 2
    assert got.stats["steps"] == 6


def test_minimal_topk_caps_steps(tiny):
    cfg, w, m = tiny
    ids = prompt_ids(m, 5)
    # steps = min(8, 6 // 2) = 3
    ref, got = run_both(cfg, w, m, ids, max_tokens=6, steps=8, minimal_topk=2, threshold=1.0)
    assert got.tokens == ref["tokens"]
    assert got.stats["steps_per_block"] == 3
    assert got.stats["steps"] == ref["steps"] <= 3 * got.stats["blocks"]


def test_empty_prompt(tiny):
    cfg, w, m = tiny
    ref, got = run_both(cfg, w, m, [], max_tokens=10, steps=4, threshold=0.5)
    assert got.tokens == ref["tokens"] and len(got.tokens) == 10


@pytest.mark.parametrize("n_prompt,steps", [(13, 8), (16, 8), (26, 3)])
def test_eos_early_stop(tiny_eos, n_prompt, steps):
    cfg, w, m = tiny_eos
    ids = prompt_ids(m, n_prompt)
    results = {}
    for early in (True, False):
        ref, got = run_both(cfg, w, m, ids, max_tokens=40, steps=steps, threshold=0.95,
                            eos_early_stop=early)
        assert got.tokens == ref["tokens"]
        assert got.stats["steps"] == ref["steps"]
        assert ref["eos"] and got.finish_reason == "stop"
        assert 0 < len(got.tokens) < 40          # the EOS is mid-answer
        assert m.eos_token_id not in got.tokens
        results[early] = got
    assert results[True].tokens == results[False].tokens
    assert results[True].stats["steps"] <= results[False].stats["steps"]


def test_eos_early_stop_saves_steps(tiny_eos):
    cfg, w, m = tiny_eos
    ids = prompt_ids(m, 16)
    early = generation.generate(m, ids, max_tokens=40, block_length=B, steps=B)
    late = generation.generate(m, ids, max_tokens=40, block_length=B, steps=B,
                               eos_early_stop=False)
    assert early.tokens == late.tokens and early.finish_reason == "stop"
    assert early.stats["steps"] < late.stats["steps"]


def test_on_step_sees_the_canvas(tiny):
    cfg, w, m = tiny
    ids = prompt_ids(m, 13)
    seen = []
    got = generation.generate(m, ids, max_tokens=12, block_length=B, steps=4, threshold=0.95,
                              on_step=seen.append)
    assert len(seen) == got.stats["steps"]
    first, last = seen[0], seen[-1]
    assert first.block == 1 and first.step == 0 and first.block_start == 8
    assert list(first.canvas[:13]) == ids
    assert first.n_masked == 16 - 13 - len(first.committed)
    assert last.n_masked == 0
    assert list(last.canvas[13:25]) == got.tokens
    for s in seen:
        assert np.all(s.canvas[s.committed] != m.mask_token_id)
        assert np.all((s.probs >= 0) & (s.probs <= 1))


def test_stream_deltas_concatenate(tiny):
    cfg, w, m = tiny
    ids = prompt_ids(m, 13)
    full = generation.generate(m, ids, max_tokens=30, block_length=B, steps=4)
    st = generation.stream(m, ids, max_tokens=30, block_length=B, steps=4)
    parts = list(st)
    assert "".join(parts) == full.text
    assert st.generation.tokens == full.tokens
    assert len(parts) >= 2 and all(parts)


def test_max_tokens_clamped_by_context(tiny):
    cfg, w, m = tiny
    small = with_context(m, 32)
    got = generation.generate(small, list(range(20)), max_tokens=100, block_length=B, steps=4)
    assert len(got.tokens) == 12 and got.finish_reason == "length"


def test_sampling_on_reference_model(tiny):
    cfg, w, m = tiny
    ids = prompt_ids(m, 13)
    kw = dict(max_tokens=16, block_length=B, steps=4, temperature=1.0, top_k=50, top_p=0.9)
    a = generation.generate(m, ids, seed=1, **kw)
    b = generation.generate(m, ids, seed=1, **kw)
    c = generation.generate(m, ids, seed=2, **kw)
    assert a.tokens == b.tokens and a.tokens != c.tokens
    assert a.stats["seed"] == 1
    assert generation.step_seed(1, 0, 0) != generation.step_seed(1, 0, 1)
    assert generation.step_seed(1, 0, 1) != generation.step_seed(1, 1, 0)


# ---- validation ------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,name", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(block_length=0), "block_length"),
    (dict(steps=0), "steps"),
    (dict(steps=9, block_length=8), "steps"),
    (dict(threshold=0.0), "threshold"),
    (dict(threshold=1.5), "threshold"),
    (dict(threshold=float("nan")), "threshold"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.2), "top_p"),
    (dict(minimal_topk=0), "minimal_topk"),
    (dict(seed=-1), "seed"),
    (dict(on_step=3), "on_step"),
])
def test_invalid_arguments(tiny, kw, name):
    cfg, w, m = tiny
    m.reset_stats()
    with pytest.raises(ValueError, match=name):
        generation.generate(m, [1, 2, 3], **kw)
    with pytest.raises(ValueError, match=name):
        generation.stream(m, [1, 2, 3], **kw)
    assert m.calls == []  # nothing computed


def test_prompt_too_long(tiny):
    cfg, w, m = tiny
    small = with_context(m, 32)
    for n in (32, 40):
        with pytest.raises(ValueError, match="prompt"):
            generation.generate(small, [5] * n, block_length=B, steps=B)
    with pytest.raises(ValueError, match="prompt"):
        generation.generate(small, [10_000], block_length=B, steps=B)
    assert small.calls == []


# ---- the native engine -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine_models(tmp_path_factory):
    """{name: (cfg, weights, Model)}: the tiny checkpoint converted to an f32 GGUF, plain and
    with the EOS bias, loaded on the CPU backend."""
    from tide_cpp.model import Model

    out = {}
    root = tmp_path_factory.mktemp("engine")
    for name, bias in (("plain", None), ("eos", EOS_BIAS)):
        cfg, w, path = rg.write_tiny_gguf(root, name, eos_bias=bias)
        out[name] = (cfg, w, Model(path, device="cpu", n_threads=1))
    yield out
    for _, _, model in out.values():
        model.close()


def engine_vs_reference(engine_models, name, n_prompt, **kw):
    cfg, w, model = engine_models[name]
    ids = prompt_ids(model, n_prompt)
    kw.setdefault("block_length", B)
    max_tokens = kw.pop("max_tokens")
    ref = rg.generate(cfg, w, ids, max_tokens, mask_id=model.mask_token_id,
                      eos_id=model.eos_token_id, **kw)
    got = model.generate(ids, max_tokens=max_tokens, **kw)
    assert got.tokens == ref["tokens"], (n_prompt, kw)
    assert got.stats["steps"] == ref["steps"]
    return ref, got


@pytest.mark.parametrize("n_prompt", [5, 8, 13, 16])
@pytest.mark.parametrize("threshold", [0.5, 0.95, 1.0])
def test_engine_greedy_equals_reference(engine_models, n_prompt, threshold):
    engine_vs_reference(engine_models, "plain", n_prompt, max_tokens=20, steps=B,
                        threshold=threshold)


@pytest.mark.parametrize("steps", [3, 8])
@pytest.mark.parametrize("early", [True, False])
def test_engine_eos_equals_reference(engine_models, steps, early):
    ref, got = engine_vs_reference(engine_models, "eos", 13, max_tokens=40, steps=steps,
                                   threshold=0.95, eos_early_stop=early)
    assert ref["eos"] and got.finish_reason == "stop" and 0 < len(got.tokens) < 40


def test_engine_block_32_defaults(engine_models):
    # the released defaults: block 32, 32 steps, threshold 0.95; prompt spans two blocks
    engine_vs_reference(engine_models, "plain", 37, max_tokens=40, block_length=32, steps=32)


def test_engine_seeded_sampling(engine_models):
    cfg, w, model = engine_models["plain"]
    ids = prompt_ids(model, 13)
    kw = dict(max_tokens=24, block_length=B, steps=4, temperature=0.8, top_p=0.95)
    a = model.generate(ids, seed=7, **kw)
    b = model.generate(ids, seed=7, **kw)
    c = model.generate(ids, seed=8, **kw)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


def test_policy_auto_plans_after_the_first_block(tiny, monkeypatch):
    import tide_cpp.planner as planner

    cfg, w, m = tiny
    events = []

    class AutoModel(rg.ReferenceModel):
        policy = "auto"

        def trace(self):
            events.append(("trace", self.n_past))
            return {"hits": np.zeros((1, 2, 8), np.int32)}

        def set_residency(self, policy, gpu_experts=None, refresh_interval=4):
            events.append(("set_residency", policy, gpu_experts, refresh_interval))
            self.policy = policy

    am = AutoModel(cfg, w, m.metadata_string("tokenizer.huggingface.json"))
    monkeypatch.setattr(planner, "plan_auto", lambda model, trace: (3, [2, 5]), raising=False)
    ids = prompt_ids(m, 13)
    got = generation.generate(am, ids, max_tokens=20, block_length=B, steps=4)
    # after the first decoded block (committed: prompt block + it), once
    assert events == [("trace", 16), ("set_residency", "tide", [2, 5], 3)]
    assert got.tokens == generation.generate(m, ids, max_tokens=20, block_length=B,
                                             steps=4).tokens


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (0.0, None, None), (0.7, None, None), (1.0, 5, None), (1.3, None, 0.8), (0.8, 20, 0.9),
    (0.0, 3, None),
])
def test_engine_step_samples_from_the_released_distribution(engine_models, temperature, top_k,
                                                            top_p):
    import torch
    import reference

    cfg, w, model = engine_models["plain"]
    ids = prompt_ids(model, 8)
    block = [model.mask_token_id] * B
    with torch.no_grad():
        logits = reference.forward(cfg, w, ids + block, B)[-B:]
    probs = rg.filtered_probs(logits, temperature, top_k, top_p)
    model.reset()
    model.commit(ids)
    for seed in (1, 2):
        tok, p = model.step(block, [True] * B, 0, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed)
        for i in range(B):
            assert probs[i, tok[i]] > 0                                   # a kept token
            assert abs(float(probs[i, tok[i]]) - float(p[i])) < 1e-4      # its filtered prob
            if temperature == 0:
                assert tok[i] == int(torch.argmax(probs[i]))


@pytest.mark.parametrize("policy,budget", [("tide", 2), ("static", 1), ("swap", 2), ("cpu", None)])
def test_engine_offload_policies_give_the_same_tokens(engine_models, policy, budget):
    # lossless: experts on the (simulated) device or the host, the answer is the reference's
    from tide_cpp.model import Model

    cfg, w, plain = engine_models["plain"]
    with Model(plain.path, device="sim", n_threads=1, policy=policy, gpu_experts=budget,
               refresh_interval=2) as m:
        ids = prompt_ids(m, 13)
        ref = rg.generate(cfg, w, ids, 20, mask_id=m.mask_token_id, eos_id=m.eos_token_id,
                          block_length=B, steps=4)
        got = m.generate(ids, max_tokens=20, block_length=B, steps=4)
        assert got.tokens == ref["tokens"]
        s = m.stats()
        if policy == "swap":  # every needed expert is brought in, evicting others: none on the host
            assert s["host_expert_tokens"] == 0 and s["experts_demoted"] > 0
        else:
            assert s["host_expert_tokens"] > 0
