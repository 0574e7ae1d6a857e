"""The planner (tide_cpp/planner.py): the knapsack is exact, the program finds optima known by
construction, plans respect the grant, pricing is consistent with the replay."""

import itertools
import json
import re

import numpy as np
import pytest

from tide_cpp.planner import HardwareProfile, knapsack, plan, plan_auto, plot_plan, predict
from tide_cpp.replay import Trace, synthetic_trace
from tide_cpp.units import fmt_bytes, parse_bytes

EB = 1 << 20


def constant_trace(layer_hits, n_blocks=2, steps=4):
    """Every forward of layer l has the same hits layer_hits[l] (so a budget b keeps its top-b
    forever and the cost of a layer is known in closed form)."""
    lh = np.asarray(layer_hits)
    L, E = lh.shape
    kinds, steps_, blocks = [1], [-1], [0]
    for b in range(1, n_blocks + 1):
        for s in range(steps):
            kinds.append(0), steps_.append(s), blocks.append(b)
        kinds.append(1), steps_.append(-1), blocks.append(b)
    F = len(kinds)
    return Trace(hits=np.broadcast_to(lh, (F, L, E)).copy(), kind=np.array(kinds, np.int8),
                 block=np.array(blocks, np.int32), step=np.array(steps_, np.int32),
                 n_tokens=np.full(F, 8, np.int32), expert_bytes=EB, n_expert=E,
                 moe_layers=np.arange(1, L + 1, dtype=np.int32), block_length=8,
                 nonexpert_bytes=10 * EB)


# No overlap and free transfers: a layer's cost is the sum over its experts of the host or device
# cost, so the optimum is the greedy choice of the largest savings (a_h - a_d) + (b_h - b_d) n.
SERIAL = HardwareProfile(device="sim", h2d_bandwidth=1e30, h2d_latency=0.0,
                         host_expert=(1e-3, 1e-4), device_expert=(1e-5, 1e-6),
                         nonexpert_step=(1e-3, 0.0), nonexpert_commit=(1e-3, 0.0), overlap=False)


def greedy_optimum(layer_hits, slots, prof=SERIAL):
    sav = []
    for l, h in enumerate(layer_hits):
        for e, n in enumerate(h):
            if n > 0:
                s = (prof.host_expert[0] - prof.device_expert[0]) + \
                    (prof.host_expert[1] - prof.device_expert[1]) * n
                sav.append((-s, l, e))
    sav.sort()
    b = np.zeros(len(layer_hits), int)
    for _, l, _ in sav[:slots]:
        b[l] += 1
    return b


def test_hot_layer_gets_more_budget():
    rng = np.random.default_rng(0)
    E, L = 32, 4
    hits = np.ones((L, E), int)                    # uniform layers: every expert one pair
    hits[0] = 0
    hits[0, :6] = [40, 30, 25, 20, 15, 10]         # one hot layer: few experts, many pairs
    hits[1:] += rng.integers(0, 2, (L - 1, E))     # a little variety, still near uniform
    tr = constant_trace(hits)
    for slots in (4, 6, 10, 40):
        r = plan(tr, SERIAL, (10 + slots) * EB, compare_policies=False)
        assert r.budgets.sum() <= slots
        want = greedy_optimum(hits, slots)        # an optimum (ties between layers 1..3 exist)
        assert r.time_per_step == pytest.approx(
            predict(tr, SERIAL, "tide", want, r.refresh_interval).time_per_step, rel=1e-12)
        assert r.budgets[0] == want[0]
        if slots <= 6:
            assert r.budgets[0] == slots            # every slot to the hot layer
        assert r.budgets[0] == min(slots, 6)       # the hot layer is served first, fully
        if slots <= 10:
            assert r.budgets[0] > r.budgets[1:].max()


def test_equal_layers_get_equal_budgets():
    E, L = 24, 5
    h = np.arange(E, 0, -1)                        # strictly decreasing: a unique optimum
    tr = constant_trace(np.tile(h, (L, 1)))
    for per_layer in (0, 3, 7, 24):
        r = plan(tr, SERIAL, (10 + L * per_layer) * EB, compare_policies=False)
        assert r.budgets.tolist() == [per_layer] * L
    # A synthetic trace with identical layers (the same routing copied): equal budgets too.
    t0 = synthetic_trace(n_layers=1, n_expert=16, n_used=2, block_length=8, n_blocks=3,
                         steps_per_block=6, seed=4, expert_bytes=EB)
    d = t0.to_dict()
    d["hits"] = np.repeat(d["hits"], 3, axis=1)
    d["moe_layers"] = np.arange(1, 4, dtype=np.int32)
    r = plan(d, SERIAL, 30 * EB, nonexpert_bytes=0, compare_policies=False)
    assert len(set(r.budgets.tolist())) == 1


def test_knapsack_is_exact_against_brute_force():
    rng = np.random.default_rng(1)
    for trial in range(30):
        L, nB = 3, 5
        cost = rng.random((L, nB)) * 10            # any shape, not convex
        slots = int(rng.integers(0, L * (nB - 1) + 2))
        tot, b = knapsack(cost, slots)
        best = min(sum(cost[l, c[l]] for l in range(L))
                   for c in itertools.product(range(nB), repeat=L) if sum(c) <= slots)
        assert b.sum() <= slots
        assert tot == pytest.approx(best)
        assert sum(cost[l, b[l]] for l in range(L)) == pytest.approx(best)


def test_plan_never_exceeds_the_grant():
    tr = synthetic_trace(n_layers=4, n_expert=16, n_used=3, block_length=8, n_blocks=2,
                         steps_per_block=6, seed=5, expert_bytes=EB, skew=[0.2, 0.8, 1.5, 0.5])
    prof = HardwareProfile(device="cuda", h2d_bandwidth=2e9, h2d_latency=1e-5,
                           host_expert=(4e-4, 2e-5), device_expert=(5e-6, 1e-7))
    for grant in (5 * EB, 7 * EB + 123, 13 * EB, 33 * EB, 80 * EB, 1000 * EB):
        r = plan(tr, prof, grant, nonexpert_bytes=5 * EB, compare_policies=False)
        assert r.memory_used <= grant
        assert 5 * EB + r.budgets.sum() * EB <= grant
        assert r.budgets.max() <= 16
        assert r.uniform_budget * 4 * EB + 5 * EB <= grant
        assert r.time_per_step <= r.uniform_time_per_step + 1e-12  # uniform is one candidate


def test_grant_too_small_is_a_clear_error():
    tr = synthetic_trace(n_layers=2, n_expert=8, n_used=2, expert_bytes=EB)
    with pytest.raises(ValueError, match=r"gpu_memory.*smaller than the non-expert weights"):
        plan(tr, SERIAL, "1MiB", nonexpert_bytes=3 * EB)
    with pytest.raises(ValueError, match="3.00 MiB"):
        plan(tr, SERIAL, 2 * EB, nonexpert_bytes=3 * EB)
    with pytest.raises(ValueError, match="nonexpert_bytes"):
        plan(tr, SERIAL, 8 * EB)


def test_plan_time_equals_replay_pricing():
    tr = synthetic_trace(n_layers=3, n_expert=16, n_used=3, block_length=8, n_blocks=2,
                         steps_per_block=8, seed=6, expert_bytes=EB)
    prof = HardwareProfile(device="cuda", h2d_bandwidth=1e9, h2d_latency=2e-5,
                           host_expert=(5e-4, 3e-5), device_expert=(1e-5, 2e-7),
                           nonexpert_step=(2e-3, 1e-5), nonexpert_commit=(1e-3, 1e-5),
                           layer_fixed=1e-5)
    r = plan(tr, prof, 30 * EB, nonexpert_bytes=4 * EB)
    p = predict(tr, prof, "tide", r.budgets, r.refresh_interval)
    assert p.time_per_step == pytest.approx(r.time_per_step, rel=1e-9)
    pu = predict(tr, prof, "tide", r.uniform_budget, r.uniform_refresh_interval)
    assert pu.time_per_step == pytest.approx(r.uniform_time_per_step, rel=1e-9)
    assert set(r.policies) >= {"cpu", "static", "swap"}
    assert "refresh_interval" in r.summary()


def test_profile_json_roundtrip_and_scaling(tmp_path):
    p = HardwareProfile(device="sim", h2d_bandwidth=5e9, host_expert=(1e-3, 1e-5),
                        expert_bytes=EB, machine={"cpu": "x"})
    f = tmp_path / "p.json"
    p.save(f)
    d = json.loads(f.read_text())
    assert d["host_expert"] == {"a": 1e-3, "b": 1e-5} and d["schema"] == 1
    q = HardwareProfile.load(str(f))
    assert q == p
    s = q.for_expert_bytes(2 * EB)
    assert s.host_expert == pytest.approx((2e-3, 2e-5))
    with pytest.raises(ValueError, match="unknown keys"):
        HardwareProfile.from_dict({"h2d_bandwith": 1})


def test_parse_bytes():
    assert parse_bytes("8GiB") == 8 << 30
    assert parse_bytes("1.5 GB") == 1_500_000_000
    assert parse_bytes(123) == 123
    assert parse_bytes(np.int64(7)) == 7
    with pytest.raises(ValueError):
        parse_bytes("lots")


def test_fmt_bytes():
    assert fmt_bytes(512) == "512 B"
    assert fmt_bytes(1536) == "1.50 KiB"
    assert fmt_bytes(768 << 10, digits=1) == "768.0 KiB"
    assert fmt_bytes(3 << 40) == "3.00 TiB"


def test_plot(tmp_path):
    tr = synthetic_trace(n_layers=2, n_expert=8, n_used=2, expert_bytes=EB)
    r = plan(tr, SERIAL, 12 * EB, nonexpert_bytes=2 * EB)
    out = tmp_path / "plan.png"
    plot_plan(r, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_auto_with_a_model_like_object():
    class FakeModel:
        hparams = {"nonexpert_bytes": 3 * EB, "expert_bytes": EB}
        device = "sim"
        device_memory = 20 * EB
    tr = synthetic_trace(n_layers=3, n_expert=8, n_used=2, block_length=8, n_blocks=1,
                         steps_per_block=8, expert_bytes=EB)
    tau, budgets = plan_auto(FakeModel(), tr.to_dict(), SERIAL)
    assert isinstance(tau, int) and tau >= 1
    assert len(budgets) == 3 and sum(budgets) <= 17 and all(isinstance(b, int) for b in budgets)


def test_plan_auto_takes_memory_from_the_budgets():
    class FakeModel:
        hparams = {"nonexpert_bytes": 3 * EB, "expert_bytes": EB}
        device = "sim"

        def stats(self):
            return {"budgets": [2, 2, 2]}
    tr = synthetic_trace(n_layers=3, n_expert=8, n_used=2, block_length=8, n_blocks=1,
                         steps_per_block=8, expert_bytes=EB, skew=[0.0, 0.5, 2.0])
    tau, budgets = plan_auto(FakeModel(), tr.to_dict(), SERIAL)
    assert sum(budgets) <= 6


# ---- the commands ----------------------------------------------------------------------------------

def _cli(argv, capsys):
    from tide_cpp.cli import main
    rc = main(argv)
    return rc, capsys.readouterr()


def test_cli_plan_and_trace_stats(tmp_path, capsys):
    tr = synthetic_trace(n_layers=3, n_expert=16, n_used=2, block_length=8, n_blocks=2,
                         steps_per_block=6, expert_bytes=EB, nonexpert_bytes=4 * EB,
                         persistence=0.8, seed=9)
    tp = tmp_path / "t.npz"
    tr.save(tp)
    pp = tmp_path / "p.json"
    HardwareProfile(device="cuda", h2d_bandwidth=2e9, host_expert=(4e-4, 2e-5),
                    device_expert=(5e-6, 1e-7)).save(pp)
    rc, out = _cli(["plan", "--trace", str(tp), "--hw-profile", str(pp), "--device-memory",
                    "20MiB", "--json", str(tmp_path / "plan.json")], capsys)
    assert rc == 0, out.err
    assert "uniform plan" in out.out and "refresh_interval" in out.out
    assert (tmp_path / "t.plan.png").exists()          # default: beside the trace
    d = json.loads((tmp_path / "plan.json").read_text())
    assert sum(d["budgets"]) * EB + 4 * EB <= 20 << 20
    # the old spellings --profile and --gpu-memory still work
    rc, out = _cli(["plan", "--trace", str(tp), "--profile", str(pp), "--gpu-memory", "2MiB",
                    "--no-plot"], capsys)
    assert rc == 2 and "smaller than the non-expert weights" in out.err
    rc, out = _cli(["trace-stats", str(tp), "-B", "4", "--taus", "1,2,4"], capsys)
    assert rc == 0
    assert "cosine similarity" in out.out and "tau=4" in out.out


def test_shipped_profiles_load():
    import glob
    import os
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "profiles")
    paths = glob.glob(os.path.join(here, "*.json"))
    for p in paths:
        prof = HardwareProfile.load(p)
        assert prof.method and prof.machine and prof.h2d_bandwidth > 0


# ---- on the engine ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from test_replay import build_tiny_gguf
    return build_tiny_gguf(tmp_path_factory.mktemp("tiny_planner"))


def test_engine_commands(tiny_gguf, tmp_path, capsys):
    prof = tmp_path / "prof.json"
    rc, out = _cli(["calibrate", "-m", tiny_gguf, "--device", "sim", "-t", "1", "-o", str(prof),
                    "--max-tokens", "8", "--block-lengths", "4,8", "--repeat", "1"], capsys)
    assert rc == 0, out.err
    p = HardwareProfile.load(str(prof))
    assert p.method.startswith("engine") and p.device == "sim" and not p.overlap
    pop = tmp_path / "pop.json"
    rc, out = _cli(["popularity", "-m", tiny_gguf, "--device", "cpu", "-o", str(pop), "-p",
                    "Hello", "--max-tokens", "8", "--block-length", "8", "--steps", "8"], capsys)
    assert rc == 0, out.err
    counts = np.asarray(json.loads(pop.read_text())["counts"])
    assert counts.shape == (3, 16) and counts.sum() > 0
    rc, out = _cli(["bench", "-m", tiny_gguf, "--device", "sim", "-t", "1",
                    "--policies", "cpu,static,swap,tide,gpu", "--gpu-experts", "3",
                    "--refresh-interval", "2", "--max-tokens", "8", "--block-length", "8",
                    "--steps", "8", "-p", "Hello", "--popularity", str(pop), "--hw-profile", str(prof),
                    "--warmup", "0"], capsys)
    assert rc == 0, out.out + out.err
    rows = [l for l in out.out.splitlines() if l.startswith("|") and "---" not in l][1:]
    assert len(rows) == 5 and all(l.rstrip(" |").endswith("yes") for l in rows)


def test_plan_takes_the_nonexpert_bytes_from_the_model(tiny_gguf, tmp_path, capsys):
    """plan -m: the library's count of the weights that are not routed experts, which is every
    tensor of the file but blk.N.ffn_{gate,up,down}.E.weight."""
    from gguf import GGUFReader
    want = sum(int(t.n_bytes) for t in GGUFReader(tiny_gguf).tensors
               if not re.fullmatch(r"blk\.\d+\.ffn_(gate|up|down)\.\d+\.weight", t.name))
    tr = synthetic_trace(n_layers=3, n_expert=16, n_used=2, block_length=8, n_blocks=1,
                         steps_per_block=4, expert_bytes=EB, seed=1)
    tp = tmp_path / "t.npz"
    tr.save(tp)
    pp = tmp_path / "p.json"
    HardwareProfile(device="sim", h2d_bandwidth=2e9, host_expert=(4e-4, 2e-5)).save(pp)
    rc, out = _cli(["plan", "--trace", str(tp), "--hw-profile", str(pp), "--device-memory",
                    "64MiB", "-m", tiny_gguf, "--no-plot", "--json", str(tmp_path / "p.out")],
                   capsys)
    assert rc == 0, out.err
    d = json.loads((tmp_path / "p.out").read_text())
    assert d["memory_used"] == want + sum(d["budgets"]) * EB


def test_engine_plan_auto(tiny_gguf):
    import tide_cpp
    prof = HardwareProfile(device="sim", h2d_bandwidth=1e10, host_expert=(1e-3, 1e-4),
                           device_expert=(1e-6, 1e-7), overlap=False)
    with tide_cpp.Model(tiny_gguf, device="sim", policy="tide", gpu_experts=4, trace=True) as m:
        m.generate("Hello", max_tokens=8, block_length=8, steps=8)
        tau, budgets = plan_auto(m, m.trace(), prof)
        assert len(budgets) == 3 and sum(budgets) <= 12
        assert sum(budgets) > 0          # a device this cheap is worth using
        m.set_residency("tide", budgets, tau)
