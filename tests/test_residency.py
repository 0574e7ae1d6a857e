"""Expert residency on the simulated device: lossless under every policy, budget and interval;
counters exact, and equal to the replay (tide_cpp/replay.py, the core's residency state machine
on its own) of the recorded routing trace; bad settings refused."""

import itertools
import re

import numpy as np
import pytest

import decode_drive
from tide_cpp import Model, TideError

BL = 8  # block length of the driven decode


def drive(m, ids, n_steps=5):
    return decode_drive.drive(m, ids, BL, n_steps)


def ids_for(cfg, n, seed=0):
    return np.random.default_rng(seed).integers(0, cfg["vocab_size"], n)


def budgets_for(E):
    return [0, 1, 3, E]


@pytest.fixture(scope="module")
def base(tiny_gguf):
    path, cfg, _ = tiny_gguf("wide", "bf16")
    ids = ids_for(cfg, 4 * BL, seed=1)
    with Model(path, device="cpu", n_threads=2) as m:
        want = drive(m, ids)
    return path, cfg, ids, want


CASES = ([("gpu", None, 1), ("cpu", None, 1)] +
         [(p, b, t) for p in ("static", "swap", "tide") for b in ("0", "1", "3", "all")
          for t in (1, 3) if not (p != "tide" and t == 3)])


@pytest.mark.parametrize("policy,budget,interval", CASES)
def test_lossless_on_sim(base, policy, budget, interval):
    path, cfg, ids, want = base
    E = cfg["num_experts"]
    b = {None: None, "0": 0, "1": 1, "3": 3, "all": E}[budget]
    with Model(path, device="sim", n_threads=2, policy=policy, gpu_experts=b,
               refresh_interval=interval) as m:
        got = drive(m, ids)
        st = m.stats()
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert np.array_equal(g, w), f"output {i} differs under {policy} B={b} tau={interval}"
    # every pair was computed somewhere, exactly once
    pairs = st["device_expert_tokens"] + st["host_expert_tokens"]
    n_moe = cfg["num_hidden_layers"] - cfg["first_k_dense_replace"]
    assert pairs == st["tokens_forwarded"] * cfg["num_experts_per_tok"] * n_moe


def test_lossless_per_layer_budgets(base):
    path, cfg, ids, want = base
    n_moe = cfg["num_hidden_layers"] - cfg["first_k_dense_replace"]
    budgets = [2] + [5] * (n_moe - 1)
    with Model(path, device="sim", policy="tide", gpu_experts=budgets, refresh_interval=2) as m:
        got = drive(m, ids)
        assert [l["budget"] for l in m.stats()["per_layer"]] == budgets
    for g, w in zip(got, want):
        assert np.array_equal(g, w)


def test_cpu_moves_nothing_gpu_moves_each_expert_once(base):
    path, cfg, ids, _ = base
    E = cfg["num_experts"]
    n_moe = cfg["num_hidden_layers"] - cfg["first_k_dense_replace"]
    with Model(path, device="sim", policy="cpu") as m:
        drive(m, ids)
        st = m.stats()
        assert st["h2d_bytes"] == 0 and st["experts_promoted"] == 0
        assert st["device_expert_tokens"] == 0 and st["host_expert_tokens"] > 0
        assert st["weights_h2d_bytes"] == m.hparams["nonexpert_bytes"] - \
            m.hparams["n_vocab"] * m.hparams["n_embd"] * 2  # all but token_embd (host lookup)
    with Model(path, device="sim", policy="gpu") as m:
        drive(m, ids)
        drive(m, ids)
        st = m.stats()
        assert st["experts_promoted"] == E * n_moe and st["experts_demoted"] == 0
        assert st["h2d_bytes"] == E * n_moe * m.hparams["expert_bytes"]
        assert st["host_expert_tokens"] == 0
        for l in range(n_moe):
            assert m.resident(l).all()
            assert st["per_layer"][l]["resident"] == E
    with Model(path, device="cpu", policy="gpu") as m:  # no device: nothing resident, ever
        drive(m, ids)
        st = m.stats()
        assert st["h2d_bytes"] == 0 and st["weights_h2d_bytes"] == 0
        assert st["device_expert_tokens"] == 0 and st["policy"] == "cpu"


@pytest.mark.parametrize("policy,budget,interval",
                         [("static", 3, 1), ("swap", 1, 1), ("swap", 3, 1), ("tide", 3, 1),
                          ("tide", 3, 3), ("tide", 1, 2), ("gpu", None, 1), ("cpu", None, 1)])
def test_counters_equal_replay(base, policy, budget, interval):
    from tide_cpp import replay
    path, cfg, ids, _ = base
    with Model(path, device="sim", policy=policy, gpu_experts=budget, refresh_interval=interval,
               trace=True) as m:
        drive(m, ids)
        st = m.stats()
        tr = m.trace()
        resident = np.stack([m.resident(l) for l in range(m.n_moe_layers)])
    n_moe = m.n_moe_layers
    assert tr["hits"].shape == (len(tr["kind"]), n_moe, cfg["num_experts"])
    assert (tr["hits"].sum(-1) == tr["n_tokens"][:, None] * cfg["num_experts_per_tok"]).all()
    assert list(np.unique(tr["kind"])) == [0, 1, 2]
    r = replay.replay(tr, policy, budgets=budget if budget is not None else 0,
                      refresh_interval=interval)
    tot = r.totals()
    for k, v in tot.items():
        assert st[k] == v, f"{k}: core {st[k]}, replay {v}"
    for l in range(n_moe):
        lt = r.layer_totals(l)
        for k, v in lt.items():
            assert st["per_layer"][l][k] == v, f"layer {l} {k}: core {st['per_layer'][l][k]}, replay {v}"
    assert np.array_equal(resident, r.resident)


@pytest.mark.parametrize("budget,interval,prefetch", [(1, 1, 1), (3, 1, 2), (3, 3, 3), (5, 1, 16)])
def test_prefetch_changes_no_result_and_no_residency_counter(base, budget, interval, prefetch):
    """prefetch_experts: copies ahead of a refresh into buffers that a promotion then takes as
    its slot. Outputs bit-identical, the residency module's counters those of prefetch off (the
    replay's), and the prefetch counters consistent."""
    path, cfg, ids, want = base
    kw = dict(device="sim", policy="tide", gpu_experts=budget, refresh_interval=interval)
    with Model(path, **kw) as m:
        drive(m, ids)
        off = m.stats()
    with Model(path, prefetch_experts=prefetch, **kw) as m:
        got = drive(m, ids)
        on = m.stats()
        eb = m.hparams["expert_bytes"]
    for i, (g, w) in enumerate(zip(got, want)):
        assert np.array_equal(g, w), f"output {i} differs with prefetch {prefetch}"
    for k in ("h2d_bytes", "experts_promoted", "experts_demoted", "device_expert_tokens",
              "host_expert_tokens"):
        assert on[k] == off[k], (k, on[k], off[k])
    assert off["prefetch_bytes"] == off["prefetch_used"] == 0
    assert on["prefetch_bytes"] > 0 and on["prefetch_bytes"] % eb == 0
    assert on["prefetch_used"] <= on["experts_promoted"]
    if budget >= 3:                      # predictions from the last forward do come true
        assert on["prefetch_used"] > 0
    assert on["prefetch_used"] * eb <= on["prefetch_bytes"]
    assert sum(l["prefetch_used"] for l in on["per_layer"]) == on["prefetch_used"]


def test_prefetch_buffers_count_against_device_memory(base):
    """Prefetch buffers are device memory like slots: with the largest budget that a grant
    holds, adding as many buffers as slots is refused with a clear error."""
    path, cfg, _, _ = base
    with Model(path, device="sim", policy="cpu") as m:
        need = m.stats()["weights_h2d_bytes"]
        eb = m.hparams["expert_bytes"]
    E = cfg["num_experts"]
    n_moe = cfg["num_hidden_layers"] - cfg["first_k_dense_replace"]
    mem = need + E * n_moe * eb - eb  # as test_sim_memory_budget: not every expert fits

    def opens(budget, prefetch):
        try:
            Model(path, device="sim", policy="tide", gpu_experts=budget, n_ctx=64,
                  device_memory=mem, prefetch_experts=prefetch).close()
            return True
        except TideError as e:
            assert re.search(r"need \d+ bytes|out of memory", str(e)), str(e)
            return False

    fits = [b for b in range(1, E + 1) if opens(b, 0)]
    assert fits and max(fits) < E
    b = max(fits)
    assert not opens(b, b)       # b slots + b buffers > the most slots that fit
    assert opens(b, 0)


def test_static_with_popularity_and_switch(base):
    path, cfg, ids, want = base
    E = cfg["num_experts"]
    with Model(path, device="sim", policy="static", gpu_experts=2) as m:
        n_moe = m.n_moe_layers
        pop = np.zeros((n_moe, E), np.float32)
        pop[:, 5] = 3
        pop[:, 1] = 3
        pop[:, 7] = 1
        m.set_popularity(pop)
        for l in range(n_moe):
            assert np.flatnonzero(m.resident(l)).tolist() == [1, 5]
        st = m.stats()
        assert st["experts_promoted"] == 2 * n_moe
        got = drive(m, ids)
        for l in range(n_moe):  # fixed: a profiled static set never changes
            assert np.flatnonzero(m.resident(l)).tolist() == [1, 5]
        for g, w in zip(got, want):
            assert np.array_equal(g, w)
        m.set_residency("cpu")
        st = m.stats()
        assert st["experts_demoted"] == 2 * n_moe and st["policy"] == "cpu"
        assert not any(m.resident(l).any() for l in range(n_moe))
        m.set_residency("tide", gpu_experts=4, refresh_interval=2)
        got = drive(m, ids)
        for g, w in zip(got, want):
            assert np.array_equal(g, w)
        assert all(m.resident(l).sum() <= 4 for l in range(n_moe))
        m.reset_stats()
        st = m.stats()
        assert st["experts_promoted"] == 0 and st["forwards"] == 0
        assert st["weights_h2d_bytes"] > 0


def test_sim_memory_budget(base):
    path, cfg, _, _ = base
    with Model(path, device="sim", policy="cpu") as m:
        need = m.stats()["weights_h2d_bytes"]
        eb = m.hparams["expert_bytes"]
    with pytest.raises(TideError, match="out of memory"):
        Model(path, device="sim", policy="cpu", device_memory=need // 2)
    n_moe = cfg["num_hidden_layers"] - cfg["first_k_dense_replace"]
    slots = cfg["num_experts"] * n_moe * eb
    mem = need + slots - eb  # room for the weights, the cache and activations, not every expert
    with Model(path, device="sim", policy="cpu", n_ctx=64, device_memory=mem) as m:
        m.logits(np.arange(16))
    with pytest.raises(TideError, match="policy gpu"):
        Model(path, device="sim", policy="gpu", n_ctx=64, device_memory=mem)


@pytest.mark.parametrize("kwargs,arg", [
    (dict(gpu_experts=-1, policy="tide"), "gpu_experts"),
    (dict(gpu_experts=[1, 2, 3, 4, 5], policy="tide"), "gpu_experts"),
    (dict(policy="fastest"), "policy"),
    (dict(policy="tide", gpu_experts=2, refresh_interval=0), "refresh_interval"),
    (dict(device="tpu"), "device"),
    (dict(n_threads=0), "n_threads"),
])
def test_bad_settings(tiny_gguf, kwargs, arg):
    path, _, _ = tiny_gguf("wide", "bf16")
    with pytest.raises(ValueError, match=arg):
        Model(path, **kwargs)


def test_bad_set_residency(tiny_gguf):
    path, _, _ = tiny_gguf("wide", "bf16")
    with Model(path, device="sim") as m:
        with pytest.raises(ValueError, match="refresh_interval"):
            m.set_residency("tide", 2, refresh_interval=0)
        with pytest.raises(ValueError, match="gpu_experts"):
            m.set_residency("tide", [1, 2, 3])
        with pytest.raises(ValueError, match="policy"):
            m.set_residency("lru", 2)


def test_cuda_without_gpu(tiny_gguf):
    from tide_cpp import _lib
    if _lib.cuda_available()[0]:
        pytest.skip("this machine has a GPU")
    path, _, _ = tiny_gguf("wide", "bf16")
    with pytest.raises(TideError, match="cuda"):
        Model(path, device="cuda")
    with Model(path, device="auto") as m:
        assert m.device == "cpu"


@pytest.mark.filterwarnings("ignore:policy auto")
def test_generate_lossless_and_auto(base):
    """Generation (the schedule in Python on the step API) gives the same tokens everywhere;
    policy auto runs as tide until the planner replaces its settings."""
    path, cfg, ids, _ = base
    gen = dict(max_tokens=16, block_length=8, steps=8, threshold=0.9)
    prompt = [int(i) for i in ids[:11]]
    with Model(path, device="cpu") as m:
        want = m.generate(prompt, **gen).tokens
    for kw in (dict(policy="tide", gpu_experts=2, refresh_interval=2),
               dict(policy="swap", gpu_experts=1), dict(policy="static", gpu_experts=3),
               dict(policy="auto", gpu_experts=2, refresh_interval=3)):
        with Model(path, device="sim", trace=True, **kw) as m:
            assert m.policy == kw["policy"]
            assert m.generate(prompt, **gen).tokens == want, kw
            st = m.stats()
            assert st["device_expert_tokens"] + st["host_expert_tokens"] > 0
