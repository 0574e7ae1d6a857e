"""The replay of routing traces (tide_cpp/replay.py, a loop over the core's residency state
machine) against hand-computed counters, against a literal transcription of CONTRACTS.md section
3 (the one independent oracle of the policies), and against live contexts; the planner's
all-budgets sweep against the state machine."""

import importlib.util

import numpy as np
import pytest

from tide_cpp.replay import (Trace, replay, synthetic_trace, tide_sweep,
                             KIND_STEP, KIND_COMMIT)

EB = 1000  # expert bytes of the hand-made trace


def hand_trace():
    # One MoE layer, 4 experts: prefill commit, steps 0..2 of a block, the block's commit.
    hits = np.array([[2, 0, 1, 0], [0, 3, 1, 2], [1, 0, 0, 4], [2, 2, 0, 0], [1, 1, 1, 1]])
    return {"hits": hits[:, None, :].astype(np.int32),
            "kind": np.array([1, 0, 0, 0, 1], np.int8),
            "block": np.array([0, 1, 1, 1, 1], np.int32),
            "step": np.array([-1, 0, 1, 2, -1], np.int32),
            "n_tokens": np.array([4, 4, 4, 4, 4], np.int32),
            "expert_bytes": np.int64(EB), "n_expert": np.int32(4),
            "moe_layers": np.array([1], np.int32), "block_length": np.int32(4)}


def totals(r):
    t = r.totals()
    return (t["experts_promoted"], t["experts_demoted"], t["h2d_bytes"],
            t["device_expert_tokens"], t["host_expert_tokens"])


# Worked by hand from CONTRACTS.md section 3 (the derivations are in the comments).
def test_hand_tide_b2_tau2():
    # f0 commit: R={} host 3. f1 s0: T={1,3} +2, dev 5 host 1. f2 s1: dev 4 host 1.
    # f3 s2: T={0,1} (tie by id), +0 -3, dev 4. f4 commit: dev 2 host 2.
    r = replay(hand_trace(), "tide", 2, 2)
    assert totals(r) == (3, 1, 3 * EB, 15, 7)
    assert r.promoted[:, 0].tolist() == [0, 2, 0, 1, 0]
    assert r.demoted[:, 0].tolist() == [0, 0, 0, 1, 0]
    assert r.host_pairs[:, 0].tolist() == [3, 1, 1, 0, 2]
    assert r.resident[0].tolist() == [True, True, False, False]


def test_hand_tide_b3_tau1():
    # f1: T={1,3,2} +3. f2: T={3,0} (2 with hits), +0, room for 1: demote lowest H of {1,2},
    # both 0 -> lower id 1. f3: T={0,1}, +1, demote 2 (H 0, lower id than 3). f4: host 1 (e2).
    r = replay(hand_trace(), "tide", 3, 1)
    assert totals(r) == (5, 2, 5 * EB, 18, 4)
    assert r.demoted[:, 0].tolist() == [0, 0, 1, 1, 0]
    assert r.resident[0].tolist() == [True, True, False, True]


def test_hand_static():
    r = replay(hand_trace(), "static", 2)  # first step's top-2 = {1,3}
    assert totals(r) == (2, 0, 2 * EB, 13, 9)
    assert r.host_pairs[:, 0].tolist() == [3, 1, 1, 2, 2]
    r = replay(hand_trace(), "static", 2, popularity=[[5, 1, 1, 5]])  # {0,3} at once
    assert r.setup_promoted.tolist() == [2]
    assert r.promoted.sum() == 0
    assert totals(r) == (2, 0, 2 * EB, 13, 9)
    assert r.device_pairs[:, 0].tolist() == [2, 2, 5, 2, 2]


def test_hand_swap():
    # LRU by tick, needed experts in ascending id; worked forward by forward:
    # f0 +0 +2; f1 1 evicts 0, 3 evicts 1; f2 0 evicts 2; f3 1 evicts 3; f4 2 evicts 0, 3 evicts 1.
    r = replay(hand_trace(), "swap", 2)
    assert totals(r) == (8, 6, 8 * EB, 22, 0)
    assert r.promoted[:, 0].tolist() == [2, 2, 1, 1, 2]
    assert r.demoted[:, 0].tolist() == [0, 2, 1, 1, 2]
    assert r.resident[0].tolist() == [False, False, True, True]
    assert totals(replay(hand_trace(), "swap", 0)) == (0, 0, 0, 0, 22)


def test_hand_cpu_gpu():
    assert totals(replay(hand_trace(), "cpu")) == (0, 0, 0, 0, 22)
    r = replay(hand_trace(), "gpu")
    assert totals(r) == (4, 0, 4 * EB, 22, 0)
    assert r.budgets.tolist() == [4]
    assert r.totals(include_setup=False)["experts_promoted"] == 0


# ---- a literal transcription of section 3, the slow way, as a second opinion --------------------

def literal(tr, policy, B, tau=1):
    """Per layer, per forward, sets and ticks exactly as the words of section 3: written apart
    from residency.c on purpose, so the two cannot share a mistake."""
    F, L, E = tr.hits.shape
    out = []
    for l in range(L):
        R, last_use, tick, first_step_seen = set(), {}, 0, False
        for f in range(F):
            H = tr.hits[f, l]
            prom = dem = 0
            step = tr.kind[f] == KIND_STEP
            every_needed_on_device = False
            if policy == "static" and step and not first_step_seen:
                R = set(sorted(range(E), key=lambda e: (-H[e], e))[:B]) - {e for e in range(E) if H[e] == 0}
                prom = len(R)
            if policy == "tide" and step and tr.step[f] % tau == 0:
                T = [e for e in sorted(range(E), key=lambda e: (-H[e], e))[:B] if H[e] > 0]
                new = [e for e in T if e not in R]
                k = len(R) + len(new) - B
                if k > 0:
                    cand = sorted((e for e in R if e not in T), key=lambda e: (H[e], e))
                    for e in cand[:k]:
                        R.discard(e)
                    dem = k
                R |= set(new)
                prom = len(new)
            if policy == "swap" and B > 0:
                for e in range(E):
                    if H[e] == 0:
                        continue
                    if e in R:
                        tick += 1
                        last_use[e] = tick
                        continue
                    if len(R) >= B:
                        victim = min(R, key=lambda r: (last_use[r], r))
                        R.discard(victim)
                        dem += 1
                    R.add(e)
                    prom += 1
                    tick += 1
                    last_use[e] = tick
                every_needed_on_device = True
            if step:
                first_step_seen = True
            dev = sum(int(H[e]) for e in range(E) if H[e] > 0 and (every_needed_on_device or e in R))
            out.append((l, f, prom, dem, dev, int(H.sum()) - dev))
    return out


@pytest.mark.parametrize("policy,B,tau", [("tide", 3, 1), ("tide", 5, 2), ("tide", 8, 3),
                                          ("tide", 1, 4), ("swap", 3, 1), ("swap", 7, 1),
                                          ("static", 4, 1), ("tide", 0, 1), ("swap", 16, 1),
                                          ("swap", 0, 1), ("static", 0, 1), ("static", 30, 1),
                                          ("tide", 16, 2), ("tide", 40, 1), ("swap", 40, 1)])
@pytest.mark.parametrize("seed", [7, 8, 9])
def test_replay_equals_literal(policy, B, tau, seed):
    """The state machine (through replay) against the literal transcription, forward by forward,
    budgets 0, below, at and above n_expert."""
    tr = synthetic_trace(n_layers=2, n_expert=16, n_used=3, block_length=6, n_blocks=3,
                         steps_per_block=5, seed=seed, skew=[0.5, 1.5])
    r = replay(tr, policy, B, tau)
    for (l, f, prom, dem, dev, host) in literal(tr, policy, B, tau):
        assert (r.promoted[f, l], r.demoted[f, l], r.device_pairs[f, l], r.host_pairs[f, l]) == \
            (prom, dem, dev, host), (l, f)


@pytest.mark.parametrize("tau", [1, 2, 3, 5, 9])
def test_sweep_equals_replay_for_every_budget(tau):
    tr = synthetic_trace(n_layers=2, n_expert=24, n_used=4, block_length=8, n_blocks=3,
                         steps_per_block=8, seed=3, skew=[0.3, 1.5])
    bs = np.arange(25)
    for l in range(2):
        sw = tide_sweep(tr.hits[:, l], tr.kind, tr.step, tau, bs)
        for b in bs:
            r = replay(tr.layer(l), "tide", int(b), tau)
            for k in ("promoted", "demoted", "device_pairs", "host_pairs", "device_experts",
                      "host_experts"):
                assert np.array_equal(sw[k][b], getattr(r, k)[:, 0]), (l, b, k)


def test_per_layer_budgets_and_conservation():
    tr = synthetic_trace(n_layers=3, n_expert=16, n_used=2, seed=1)
    r = replay(tr, "tide", [0, 4, 16], 2)
    assert np.array_equal(r.device_pairs + r.host_pairs, tr.hits.sum(axis=2))
    assert r.device_pairs[:, 0].sum() == 0
    assert r.resident.sum(axis=1).tolist()[0] == 0
    assert all(r.resident[l].sum() <= b for l, b in enumerate([0, 4, 16]))
    # h2d_bytes is promotions times the expert size
    assert np.array_equal(r.h2d_bytes, r.promoted * tr.expert_bytes)


def test_trace_roundtrip(tmp_path):
    tr = synthetic_trace(seed=2, nonexpert_bytes=12345)
    p = tmp_path / "t.npz"
    tr.save(p)
    t2 = Trace.load(str(p))
    assert np.array_equal(t2.hits, tr.hits) and t2.nonexpert_bytes == 12345
    assert t2.expert_bytes == tr.expert_bytes and t2.block_length == tr.block_length
    assert totals(replay(t2, "tide", 5, 3)) == totals(replay(tr.to_dict(), "tide", 5, 3))


def test_bad_arguments():
    d = hand_trace()
    with pytest.raises(ValueError, match="policy"):
        replay(d, "lru", 2)
    with pytest.raises(ValueError, match="budgets"):
        replay(d, "tide", -1)
    with pytest.raises(ValueError, match="budgets"):
        replay(d, "tide", [1, 2])
    with pytest.raises(ValueError, match="refresh_interval"):
        replay(d, "tide", 2, 0)
    bad = dict(d, hits=d["hits"][:, 0, :])
    with pytest.raises(ValueError, match="hits"):
        replay(bad, "tide", 2)


# ---- against the core: recorded runs of the tiny models, every policy, exact ---------------------

HAVE_CORE = importlib.util.find_spec("tide_cpp.model") is not None


@pytest.mark.skipif(not HAVE_CORE, reason="tide_cpp.model not built yet")
def test_replay_equals_core(tiny_gguf_for_replay):
    import tide_cpp
    path = tiny_gguf_for_replay
    with tide_cpp.Model(path, device="sim", policy="cpu", trace=True) as m:
        n_exp = m.hparams["n_expert"]
        budgets = [0, 1, 3, n_exp]
    pop = np.random.default_rng(0).integers(0, 5, (3, n_exp)).astype(np.float32)
    cases = [("cpu", 0, 1), ("gpu", None, 1), ("static", 3, 1), ("static", 5, pop)]
    cases += [("swap", b, 1) for b in budgets]
    cases += [("tide", b, tau) for b in budgets for tau in (1, 2, 5)]
    for policy, b, tau in cases:
        kw = {} if b is None else {"gpu_experts": b}
        popularity = None
        if not isinstance(tau, int):  # static with a popularity profile
            popularity, tau = tau, 1
            kw["popularity"] = popularity
        with tide_cpp.Model(path, device="sim", policy=policy, refresh_interval=tau, trace=True,
                            **kw) as m:
            m.generate("Hello there, how are you? Tell me a story.", max_tokens=32,
                       block_length=8, steps=8, threshold=0.9)
            st = m.stats()
            tr = m.trace()
            K = m.hparams["n_expert_used"]
            assert (tr["hits"].sum(axis=2) == tr["n_tokens"][:, None] * K).all()
            assert (tr["kind"] == 0).sum() == st["steps"] > 0
            r = replay(tr, policy, b, tau, popularity)
            if policy in ("tide", "swap") and b:
                assert r.totals()["experts_promoted"] > 0
            tot = r.totals()
            for k in ("experts_promoted", "experts_demoted", "h2d_bytes",
                      "device_expert_tokens", "host_expert_tokens"):
                assert st[k] == tot[k], (policy, b, tau, k, st[k], tot[k])
            for l, pl in enumerate(st["per_layer"]):
                lt = r.layer_totals(l)
                for k in ("experts_promoted", "experts_demoted", "h2d_bytes",
                          "device_expert_tokens", "host_expert_tokens"):
                    assert pl[k] == lt[k], (policy, b, tau, l, k, pl[k], lt[k])


def build_tiny_gguf(d):
    """The "wide" tiny shape (16 experts, 4 per token) with 3 MoE layers, converted to an f32
    GGUF in directory d the way the other suites build theirs; skips when the converter is not
    there. Returns the path."""
    try:
        from tide_cpp.convert.hf_to_gguf import convert
    except Exception as e:
        pytest.skip(f"converter unavailable: {e}")
    import hf_checkpoint as hc
    hc.make_checkpoint(str(d / "hf"), shape="wide", seed=0, num_hidden_layers=4)
    out = d / "tiny.gguf"
    convert(str(d / "hf"), str(out), "f32", progress=False)
    return str(out)


@pytest.fixture(scope="module")
def tiny_gguf_for_replay(tmp_path_factory):
    return build_tiny_gguf(tmp_path_factory.mktemp("tiny_replay"))


def test_replay_phases_hand():
    # tide B=2 tau=2 for forwards 0..2, then swap B=1: the switch demotes the 2 resident.
    from tide_cpp.replay import replay_phases
    d = hand_trace()
    r = replay_phases(d, [(0, "tide", 2, 2), (3, "swap", 1, 1)])
    # phase 1 (f0..f2): +2 at f1; resident {1,3}. Switch: -2. Phase 2 (f3, f4) swap B=1 from {}:
    # f3 needs 0,1: 0 comes in (+1), then 1 evicts 0 (+1 -1); f4 needs 0..3: each evicts the
    # one before (+4 -4).
    assert r["total"]["experts_promoted"] == 2 + 2 + 4
    assert r["total"]["experts_demoted"] == 2 + 1 + 4
    assert r["total"]["host_expert_tokens"] == 3 + 1 + 1
    assert r["total"]["h2d_bytes"] == 8 * EB


@pytest.mark.skipif(not HAVE_CORE, reason="tide_cpp.model not built yet")
def test_replay_phases_equal_core_after_set_residency(tiny_gguf_for_replay):
    import tide_cpp
    from tide_cpp.replay import replay_phases
    with tide_cpp.Model(tiny_gguf_for_replay, device="sim", policy="tide", gpu_experts=2,
                        refresh_interval=1, trace=True) as m:
        m.generate("Once upon a time", max_tokens=16, block_length=8, steps=8)
        f1 = len(m.trace()["kind"])
        m.set_residency("tide", [1, 3, 5], 2)
        m.generate("The weather today", max_tokens=16, block_length=8, steps=8)
        f2 = len(m.trace()["kind"])
        m.set_residency("swap", 4, 1)
        m.generate("Numbers: 1 2 3", max_tokens=16, block_length=8, steps=8)
        st = m.stats()
        r = replay_phases(m.trace(), [(0, "tide", 2, 1), (f1, "tide", [1, 3, 5], 2),
                                      (f2, "swap", 4, 1)])
    for k, v in r["total"].items():
        assert st[k] == v, (k, st[k], v)
    for l, pl in enumerate(st["per_layer"]):
        for k, v in r["per_layer"][l].items():
            assert pl[k] == v, (l, k, pl[k], v)
