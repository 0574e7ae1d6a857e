"""The planner: a cost model priced by a measured hardware profile, and the program that picks the
refresh interval and one expert budget per MoE layer under the device memory the user grants.

Cost model (what the engine really does, per MoE layer and forward):
  - The router's hits decide the resident set's change (replay.py, CONTRACTS.md section 3).
    Promotions of this forward are copied host -> device on a separate stream; the device's
    expert work waits for them. Device path = n_promoted * (h2d_latency + expert_bytes /
    h2d_bandwidth) + sum over resident experts with pairs of t_dev(n).
  - Concurrently, the misses run on the host thread pool: host path = sum over non-resident
    experts with pairs of t_host(n).
  - layer time = max(device path, host path) + layer_fixed     (profile.overlap = true: cuda)
    layer time = device path + host path + layer_fixed          (overlap = false: the simulated
    device runs its "device" kernels on the same host cores, so nothing overlaps).
  - t_host(n) = a_h + b_h * n and t_dev(n) = a_d + b_d * n: a is the weight read of one expert
    (plus launch cost), b the arithmetic per token routed to it, at the profile's thread count.
  - The shared expert runs in the device path: a_s + b_s * n_tokens per layer and forward.
  - Every forward also pays the non-expert time (attention, dense layers, router, lm_head):
    a + b * n_tokens, separately for steps and for commits (commits skip lm_head).
  Time per step = (all forwards of the trace, commits included) / number of step forwards.
  One-time promotions (gpu at creation, a profiled static set) are not in the per-step time.

The program, for each candidate interval tau:
  cost[l][b] = predicted seconds of MoE layer l over the trace with budget b, for every b in 0..E.
  This is the expensive part; replay.tide_sweep() computes it exactly for all budgets of a layer
  at once (the resident sets of all budgets as one bool matrix, updated together at each refresh,
  counters of each stretch between refreshes from one matrix product), so no coarse grid is needed.
  Then: minimise sum_l cost[l][b_l] subject to sum_l b_l <= S, where S = (granted memory -
  non-expert bytes - reserve) // expert_bytes: a multiple-choice knapsack with integer weights in
  units of one expert. We solve it by dynamic programming over slots, O(L * E * S): exact (no
  relaxation, no solver tolerance), no solver dependency at run time, and at mini's size
  (19 x 257 x <= 4864) it is a few numpy operations per layer. A MILP would give the same optimum
  through scipy's HiGHS, with a dependency and a tolerance. The interval is the argmin over tau.
  The paper's plan (one budget for all layers, best tau) is computed beside it for comparison.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, asdict

import numpy as np

from .replay import KIND_STEP, Trace, replay, tide_sweep
from .units import fmt_bytes, parse_bytes

# ---- the hardware profile ----------------------------------------------------------------------

_PAIRS = ("host_expert", "device_expert", "shared_expert", "nonexpert_step", "nonexpert_commit")


@dataclass
class HardwareProfile:
    """Measured costs of one machine (JSON). Times in seconds, bandwidth in bytes/second."""
    device: str = "cuda"                # cuda | sim | cpu: what the device costs were measured on
    h2d_bandwidth: float = 12e9         # host -> device, pinned, bytes/s
    h2d_latency: float = 10e-6          # fixed cost of one expert copy, s
    host_expert: tuple = (1.0e-3, 2.0e-5)    # t_host(n) = a + b n, one expert with n tokens
    device_expert: tuple = (2.0e-5, 1.0e-6)  # t_dev(n) = a + b n
    shared_expert: tuple = (0.0, 0.0)        # device path, per MoE layer and forward: a + b * n_tokens
    nonexpert_step: tuple = (5e-3, 0.0)      # per step forward: a + b * n_tokens
    nonexpert_commit: tuple = (5e-3, 0.0)    # per commit forward: a + b * n_tokens
    layer_fixed: float = 0.0            # per MoE layer and forward (sync, scatter), s
    overlap: bool = True                # device path and host path run concurrently
    host_threads: int = 0
    expert_bytes: int | None = None     # expert size the expert costs were measured at
    method: str = ""                    # how it was measured (calibrate writes this)
    machine: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "HardwareProfile":
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known - {"schema", "comment", "fit"})
        if unknown:
            raise ValueError(f"profile: unknown keys {unknown}")
        kw = {k: v for k, v in d.items() if k in known}
        for k in _PAIRS:
            if k in kw:
                v = kw[k]
                kw[k] = (float(v["a"]), float(v["b"])) if isinstance(v, dict) else tuple(map(float, v))
        p = cls(**kw)
        if p.h2d_bandwidth <= 0:
            raise ValueError(f"profile: h2d_bandwidth must be > 0, got {p.h2d_bandwidth}")
        return p

    @classmethod
    def load(cls, src) -> "HardwareProfile":
        if isinstance(src, HardwareProfile):
            return src
        if isinstance(src, dict):
            return cls.from_dict(src)
        with open(src) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in _PAIRS:
            d[k] = {"a": d[k][0], "b": d[k][1]}
        return {"schema": 1, **d}

    def save(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    def for_expert_bytes(self, expert_bytes: int) -> "HardwareProfile":
        """Expert costs rescaled to another expert size (both the weight read and the arithmetic
        grow with the expert's bytes at a fixed weight type). Identity if sizes match or unknown."""
        if not self.expert_bytes or not expert_bytes or self.expert_bytes == expert_bytes:
            return self
        r = expert_bytes / self.expert_bytes
        d = asdict(self)
        d["host_expert"] = tuple(x * r for x in self.host_expert)
        d["device_expert"] = tuple(x * r for x in self.device_expert)
        d["shared_expert"] = tuple(x * r for x in self.shared_expert)
        d["expert_bytes"] = int(expert_bytes)
        return HardwareProfile(**d)


# ---- pricing -----------------------------------------------------------------------------------

def price_layer(profile: HardwareProfile, expert_bytes: int, promoted, device_experts,
                device_pairs, host_experts, host_pairs, n_tokens=0):
    """Seconds of one MoE layer per forward (arrays of any matching shape; n_tokens broadcasts)."""
    p = profile
    transfer = promoted * (p.h2d_latency + expert_bytes / p.h2d_bandwidth)
    dev = (transfer + p.device_expert[0] * device_experts + p.device_expert[1] * device_pairs
           + p.shared_expert[0] + p.shared_expert[1] * n_tokens)
    host = p.host_expert[0] * host_experts + p.host_expert[1] * host_pairs
    both = np.maximum(dev, host) if p.overlap else dev + host
    return both + p.layer_fixed


def nonexpert_time(profile: HardwareProfile, trace: Trace) -> np.ndarray:
    """Seconds of the non-expert work of every forward [n_forwards]."""
    step = trace.kind == KIND_STEP
    a = np.where(step, profile.nonexpert_step[0], profile.nonexpert_commit[0])
    b = np.where(step, profile.nonexpert_step[1], profile.nonexpert_commit[1])
    return a + b * trace.n_tokens


@dataclass
class Prediction:
    policy: str
    time_per_step: float      # s
    expert_time: float        # s over the trace, all MoE layers
    nonexpert_time: float     # s over the trace
    h2d_bytes_per_step: float
    host_pairs_per_step: float
    hit_rate: float
    layer_time: np.ndarray    # s per MoE layer over the trace [L]


def predict(trace, profile, policy: str, budgets=None, refresh_interval: int = 4,
            popularity=None) -> Prediction:
    """Predicted time per step of one policy over a trace (replay + pricing)."""
    tr = Trace.load(trace)
    prof = HardwareProfile.load(profile).for_expert_bytes(tr.expert_bytes)
    if policy == "cpu" or prof.device == "cpu":
        # No device at all: every expert on the host, nothing to overlap with.
        r = replay(tr, "cpu")
    else:
        r = replay(tr, policy, budgets, refresh_interval, popularity)
    t = price_layer(prof, tr.expert_bytes, r.promoted, r.device_experts, r.device_pairs,
                    r.host_experts, r.host_pairs, tr.n_tokens[:, None])
    ne = nonexpert_time(prof, tr)
    n_steps = max(tr.n_steps, 1)
    tot = r.totals(include_setup=False)
    return Prediction(policy=policy, time_per_step=(t.sum() + ne.sum()) / n_steps,
                      expert_time=float(t.sum()), nonexpert_time=float(ne.sum()),
                      h2d_bytes_per_step=tot["h2d_bytes"] / n_steps,
                      host_pairs_per_step=tot["host_expert_tokens"] / n_steps,
                      hit_rate=r.hit_rate(), layer_time=t.sum(axis=0))


# ---- the program -------------------------------------------------------------------------------

def layer_costs(trace, profile, taus, progress=None) -> np.ndarray:
    """cost[t, l, b]: predicted seconds of MoE layer l over the trace under `tide` with interval
    taus[t] and budget b (0..E). Exact: one tide_sweep per (interval, layer)."""
    tr = Trace.load(trace)
    prof = HardwareProfile.load(profile).for_expert_bytes(tr.expert_bytes)
    E, L = tr.n_expert, tr.n_layers
    bs = np.arange(E + 1)
    out = np.empty((len(taus), L, E + 1))
    for l in range(L):
        h = tr.hits[:, l, :]
        for i, tau in enumerate(taus):
            c = tide_sweep(h, tr.kind, tr.step, int(tau), bs)
            out[i, l] = price_layer(prof, tr.expert_bytes, c["promoted"], c["device_experts"],
                                    c["device_pairs"], c["host_experts"], c["host_pairs"],
                                    tr.n_tokens[None, :]).sum(axis=1)
        if progress:
            progress(l + 1, L)
    return out


def knapsack(cost: np.ndarray, slots: int):
    """Exact multiple-choice knapsack: cost [L, nB] (nB = E + 1 budgets 0..E, one slot each);
    choose b_l minimising sum_l cost[l, b_l] with sum_l b_l <= slots. Dynamic program over slots,
    O(L * nB * slots). Returns (total, budgets). Ties: the smaller budget of the last layer first,
    so the plan uses no memory it does not need."""
    L, nB = cost.shape
    S = int(min(max(slots, 0), L * (nB - 1)))
    dp = np.zeros(S + 1)  # dp[m]: best cost of the layers so far using at most m slots
    choice = np.zeros((L, S + 1), dtype=np.int32)
    for l in range(L):
        pad = np.concatenate([np.full(nB - 1, np.inf), dp])
        win = np.lib.stride_tricks.sliding_window_view(pad, nB)  # win[m, j] = dp[m - (nB-1) + j]
        tot = win + cost[l, ::-1][None, :]                       # b = nB - 1 - j
        j = (nB - 1) - np.argmin(tot[:, ::-1], axis=1)            # lowest b among ties
        choice[l] = (nB - 1) - j
        dp = tot[np.arange(S + 1), j]
    budgets = np.zeros(L, dtype=np.int64)
    m = S
    for l in range(L - 1, -1, -1):
        b = int(choice[l, m])
        budgets[l] = b
        m -= b
    return float(dp[S]), budgets


@dataclass
class PlanResult:
    refresh_interval: int
    budgets: np.ndarray           # [L] slots per MoE layer
    time_per_step: float          # s, predicted
    uniform_refresh_interval: int
    uniform_budget: int
    uniform_time_per_step: float  # s, predicted, the paper's plan (same budget everywhere)
    slots: int                    # expert slots the grant leaves after the non-expert weights
    memory_used: int              # bytes: non-expert + reserve + sum(budgets) * expert_bytes
    gpu_memory: int
    nonexpert_bytes: int
    expert_bytes: int
    taus: np.ndarray
    best_by_tau: np.ndarray       # predicted s/step of the best per-layer plan at each tau
    uniform_by_tau: np.ndarray    # [n_taus, n_budgets_shown]: uniform plans for the plot
    uniform_shown: np.ndarray     # the uniform budgets in uniform_by_tau
    n_steps: int
    policies: dict = field(default_factory=dict)  # other policies' predictions, s/step

    @property
    def gain(self) -> float:
        return self.uniform_time_per_step / self.time_per_step if self.time_per_step else float("nan")

    def summary(self) -> str:
        L = len(self.budgets)
        lines = [
            f"grant {fmt_bytes(self.gpu_memory)}: non-expert weights {fmt_bytes(self.nonexpert_bytes)}, "
            f"room for {self.slots} expert slots of {fmt_bytes(self.expert_bytes)} "
            f"({L} MoE layers, {self.n_steps} steps in the trace)",
            f"plan (per-layer budgets): refresh_interval {self.refresh_interval}, "
            f"{int(self.budgets.sum())} slots, predicted {self.time_per_step * 1e3:.2f} ms/step "
            f"({1 / self.time_per_step:.2f} steps/s)",
            "  budgets: " + " ".join(str(int(b)) for b in self.budgets),
            f"uniform plan (the paper's): refresh_interval {self.uniform_refresh_interval}, budget "
            f"{self.uniform_budget} per layer, predicted {self.uniform_time_per_step * 1e3:.2f} ms/step",
            f"predicted gain of the per-layer plan: {self.gain:.3f}x",
            f"memory used: {fmt_bytes(self.memory_used)} of {fmt_bytes(self.gpu_memory)}",
        ]
        if self.policies:
            lines.append("other policies at the uniform budget (predicted ms/step): " + ", ".join(
                f"{k} {v * 1e3:.2f}" for k, v in self.policies.items()))
        return "\n".join(lines)


def plan(trace, profile, gpu_memory, nonexpert_bytes: int | None = None, taus=None,
         reserve_bytes: int = 0, compare_policies: bool = True, progress=None) -> PlanResult:
    """The best `tide` plan: refresh interval and per-layer budgets, for the granted device memory.

    nonexpert_bytes: bytes of every tensor that is not a routed expert (resident on the device in
    every policy); from the trace's optional `nonexpert_bytes` key if not given. reserve_bytes:
    device memory kept for activations and the KV cache. Raises ValueError when the grant cannot
    hold the non-expert weights."""
    tr = Trace.load(trace)
    prof = HardwareProfile.load(profile).for_expert_bytes(tr.expert_bytes)
    grant = parse_bytes(gpu_memory)
    if nonexpert_bytes is None:
        nonexpert_bytes = tr.nonexpert_bytes
    if nonexpert_bytes is None:
        raise ValueError("nonexpert_bytes: unknown (not in the trace); pass it, or the model")
    if tr.expert_bytes <= 0:
        raise ValueError("trace: expert_bytes must be > 0 to plan memory")
    if tr.n_steps == 0:
        raise ValueError("trace: has no step forwards to plan from")
    free = grant - int(nonexpert_bytes) - int(reserve_bytes)
    if free < 0:
        raise ValueError(
            f"gpu_memory: the grant of {fmt_bytes(grant)} ({grant} B) is smaller than the non-expert "
            f"weights ({fmt_bytes(nonexpert_bytes)}, {int(nonexpert_bytes)} B)"
            + (f" plus the reserve ({fmt_bytes(reserve_bytes)})" if reserve_bytes else "")
            + f"; need at least {fmt_bytes(int(nonexpert_bytes) + int(reserve_bytes))}")
    E, L = tr.n_expert, tr.n_layers
    slots = int(min(free // tr.expert_bytes, L * E))
    if taus is None:
        # Intervals past the longest block all mean "refresh at step 0 only".
        taus = np.arange(1, tr.max_step + 2)
    taus = np.asarray(sorted(set(int(t) for t in taus)), dtype=np.int64)
    if taus.size == 0 or taus[0] < 1:
        raise ValueError("taus: need intervals >= 1")
    cost = layer_costs(tr, prof, taus, progress=progress)        # [T, L, E+1]
    ne = nonexpert_time(prof, tr).sum()
    n_steps = tr.n_steps
    best = np.empty(len(taus))
    best_budgets = []
    for i in range(len(taus)):
        tot, b = knapsack(cost[i], slots)
        best[i] = (tot + ne) / n_steps
        best_budgets.append(b)
    i_best = int(np.argmin(best))
    # The paper's plan: one budget for all layers (as large as fits, or smaller if that is better).
    bmax = min(E, slots // L)
    uni = (cost[:, :, :bmax + 1].sum(axis=1) + ne) / n_steps     # [T, bmax+1]
    iu, bu = np.unravel_index(int(np.argmin(uni)), uni.shape)
    shown = np.unique(np.clip(np.array([bmax // 8, bmax // 4, bmax // 2, bmax]), 0, bmax))
    budgets = best_budgets[i_best]
    result = PlanResult(
        refresh_interval=int(taus[i_best]), budgets=budgets, time_per_step=float(best[i_best]),
        uniform_refresh_interval=int(taus[iu]), uniform_budget=int(bu),
        uniform_time_per_step=float(uni[iu, bu]), slots=slots,
        memory_used=int(nonexpert_bytes) + int(reserve_bytes) + int(budgets.sum()) * tr.expert_bytes,
        gpu_memory=grant, nonexpert_bytes=int(nonexpert_bytes), expert_bytes=tr.expert_bytes,
        taus=taus, best_by_tau=best, uniform_by_tau=uni[:, shown], uniform_shown=shown,
        n_steps=n_steps)
    if compare_policies and prof.device != "cpu":
        pol = {"cpu": predict(tr, prof, "cpu").time_per_step}
        if bmax > 0:
            pol["static"] = predict(tr, prof, "static", bmax).time_per_step
            pol["swap"] = predict(tr, prof, "swap", bmax).time_per_step
        if slots >= L * E:
            pol["gpu"] = predict(tr, prof, "gpu").time_per_step
        result.policies = pol
    return result


def plot_plan(result: PlanResult, path, title: str = "") -> None:
    """PNG: predicted time per step against the refresh interval, for a few uniform budgets and
    for the per-layer plan; the chosen points marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7.5, 4.6), dpi=120)
    taus = result.taus
    for k, b in enumerate(result.uniform_shown):
        ax.plot(taus, result.uniform_by_tau[:, k] * 1e3, marker="o", ms=3, lw=1.2,
                label=f"uniform budget {int(b)}/layer")
    ax.plot(taus, result.best_by_tau * 1e3, color="black", lw=2.2, marker="s", ms=3.5,
            label="per-layer budgets (planner)")
    ax.scatter([result.refresh_interval], [result.time_per_step * 1e3], s=120, facecolor="none",
               edgecolor="red", lw=2, zorder=5,
               label=f"plan: tau={result.refresh_interval}, {result.time_per_step * 1e3:.1f} ms")
    ax.scatter([result.uniform_refresh_interval], [result.uniform_time_per_step * 1e3], s=90,
               marker="x", color="red", zorder=5,
               label=f"paper's plan: tau={result.uniform_refresh_interval}, B={result.uniform_budget}, "
                     f"{result.uniform_time_per_step * 1e3:.1f} ms")
    ax.set_xlabel("refresh interval tau (steps)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))      # tau is a whole number of steps
    ax.set_ylabel("predicted time per step (ms)")
    ax.set_title(title or f"TIDE plan, {fmt_bytes(result.gpu_memory)} granted, "
                          f"{result.slots} expert slots")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---- policy="auto" -----------------------------------------------------------------------------

def _model_nonexpert_bytes(model) -> tuple[int, int]:
    hp = model.hparams if not callable(getattr(model, "hparams", None)) else model.hparams()
    return int(hp["nonexpert_bytes"]), int(hp["expert_bytes"])


def default_profile(device: str):
    """A profile under profiles/ for this device kind (cuda, sim, cpu), or None. Profiles fitted
    to the engine ('engine' method) are preferred over proxies; then the newest file name."""
    import glob
    import os
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "profiles")
    found = []
    for path in sorted(glob.glob(os.path.join(here, "*.json"))):
        try:
            p = HardwareProfile.load(path)
        except (ValueError, OSError, TypeError, json.JSONDecodeError):
            continue
        if p.device == device and not p.method.startswith("assumed"):
            found.append((p.method.startswith("engine"), path, p))
    return max(found, key=lambda x: (x[0], x[1]))[2] if found else None


def plan_auto(model, trace_dict, profile=None, gpu_memory=None, reserve_bytes: int = 0):
    """policy="auto": generation calls this after the first block with that block's trace
    (Model.trace(), CONTRACTS.md section 4). Returns (refresh_interval, budgets: list[int], one
    per MoE layer); the caller applies them with model.set_residency("tide", budgets, interval).

    profile: HardwareProfile, dict or path; None -> the profile under profiles/ for the model's
    device kind (model.device). gpu_memory: bytes or a size string; None -> model.device_memory
    when the model has one, else the memory the model's current budgets occupy (non-expert
    weights + sum of budgets x expert bytes): `gpu_experts=B` with policy auto means "the memory
    of B slots per layer, spent where it helps most". Sizes come from model.hparams."""
    nonexpert, expert_bytes = _model_nonexpert_bytes(model)
    if profile is None:
        dev = getattr(model, "device", "cuda")
        profile = default_profile(dev)
        if profile is None:
            raise ValueError(f"profile: none given and no profiles/*.json for device {dev!r}; "
                             "run tide-cli calibrate")
    if gpu_memory is None:
        gpu_memory = getattr(model, "device_memory", None) or None
    if gpu_memory is None:
        budgets = None
        try:
            budgets = model.stats().get("budgets")
        except Exception:
            pass
        if not budgets:
            raise ValueError("gpu_memory: none given, and the model has neither device_memory "
                             "nor budgets to take it from")
        gpu_memory = nonexpert + int(sum(budgets)) * expert_bytes
    d = dict(trace_dict)
    d.setdefault("expert_bytes", expert_bytes)
    # prefetch buffers (at most prefetch_experts per MoE layer) come out of the same memory
    n_moe = len(d["moe_layers"]) if "moe_layers" in d else np.asarray(d["hits"]).shape[1]
    reserve_bytes += int(getattr(model, "prefetch_experts", 0) or 0) * n_moe * expert_bytes
    res = plan(d, profile, gpu_memory, nonexpert_bytes=nonexpert, reserve_bytes=reserve_bytes,
               compare_policies=False)
    return res.refresh_interval, [int(b) for b in res.budgets]
