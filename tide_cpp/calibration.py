"""Calibration: measure on the machine at hand the costs the planner's model needs
(planner.HardwareProfile), and write them as JSON.

Two ways, and the profile says which one made it (`method`):

- `engine` (with a model): the costs are fitted to the engine's own per-layer counters and phase
  timers, so they price the kernels that really run. Runs of the same prompt under
  - policy cpu (every expert on the host) at a few block lengths: per MoE layer, the seconds in
    host experts against (experts with pairs, pairs) from the exact replay of the run's trace
    -> t_host(n) = a + b n by non-negative least squares;
  - the shared expert runs in the device phase: fitted on the cpu runs, where it is alone there
    (`shared_expert`, a + b * tokens);
  - policy gpu (every expert resident): device experts likewise, after the shared expert;
  - policy swap with a small budget: seconds waiting for transfers per expert copied -> the
    H2D cost of one expert (bandwidth = expert_bytes / that; per-copy latency folded in);
  - every run: t_total minus the expert phases = non-expert time, fitted as a + b * tokens per
    forward.
  On the simulated device, "device" work runs on the host cores too, so `overlap` is false.
- `proxy` (no model): a numpy FFN of the given expert shape in f32 for t_host(n) and memcpy for
  the H2D copy. This is not the engine's kernel (numpy's BLAS, f32 weights); it is a stand-in
  to plan with before a model exists, and it says so.
"""

from __future__ import annotations

import os
import platform
import time

import numpy as np

from .planner import HardwareProfile
from .replay import replay


def machine_description(n_threads=None) -> dict:
    d = {"hostname": platform.node(), "system": f"{platform.system()} {platform.release()}",
         "machine": platform.machine(), "python": platform.python_version(),
         "cpus": os.cpu_count(), "numpy": np.__version__}
    try:
        d["cpus_usable"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    d["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if n_threads:
        d["threads"] = int(n_threads)
    d["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return d


def _nnls(A, y):
    from scipy.optimize import nnls
    A = np.asarray(A, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    scale = np.maximum(np.abs(A).max(axis=0), 1e-30)  # columns of very different magnitudes
    x, _ = nnls(A / scale, y)
    return x / scale


# ---- the proxy: no model needed ------------------------------------------------------------------

def measure_memcpy(nbytes: int, reps: int = 20) -> float:
    """Seconds for one host-to-host copy of nbytes (the simulated device's transfer)."""
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = []
    for _ in range(reps):
        t = time.perf_counter()
        np.copyto(dst, src)
        best.append(time.perf_counter() - t)
    return float(np.median(best))


def measure_numpy_expert(hidden: int, ff: int, tokens=(1, 2, 4, 8, 16, 32), reps: int = 5):
    """(a, b) of t(n) = a + b n for a numpy SwiGLU expert (f32), a stand-in for the host kernel."""
    rng = np.random.default_rng(0)
    wg = rng.standard_normal((ff, hidden), dtype=np.float32)
    wu = rng.standard_normal((ff, hidden), dtype=np.float32)
    wd = rng.standard_normal((hidden, ff), dtype=np.float32)
    rows, ys = [], []
    for n in tokens:
        x = rng.standard_normal((n, hidden), dtype=np.float32)
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            g = x @ wg.T
            u = x @ wu.T
            h = g / (1 + np.exp(-np.clip(g, -60, 60))) * u
            _ = h @ wd.T
            ts.append(time.perf_counter() - t)
        rows.append([1.0, n])
        ys.append(float(np.median(ts)))
    a, b = _nnls(rows, ys)
    return float(a), float(b)


def calibrate_proxy(hidden=2048, ff=512, weight_bytes_per_value=2, device="sim") -> HardwareProfile:
    expert_bytes = 3 * hidden * ff * weight_bytes_per_value
    t_copy = measure_memcpy(expert_bytes)
    a, b = measure_numpy_expert(hidden, ff)
    # The proxy's f32 expert reads twice the bytes of a bf16 one: scale to the real expert size.
    r = expert_bytes / (3 * hidden * ff * 4)
    return HardwareProfile(
        device=device, h2d_bandwidth=expert_bytes / t_copy, h2d_latency=0.0,
        host_expert=(a * r, b * r), device_expert=(a * r, b * r) if device == "sim" else (0.0, 0.0),
        nonexpert_step=(0.0, 0.0), nonexpert_commit=(0.0, 0.0), layer_fixed=0.0,
        overlap=device == "cuda", host_threads=os.cpu_count() or 0, expert_bytes=expert_bytes,
        method=f"proxy: numpy f32 SwiGLU {hidden}x{ff} scaled to {weight_bytes_per_value}-byte "
               f"weights, memcpy of one expert; no engine kernels, no non-expert time",
        machine=machine_description())


# ---- the engine: fitted to the core's counters -----------------------------------------------------

DEFAULT_PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain why the sky is blue, in three sentences.",
]


_TIMERS = ("t_total", "t_attention", "t_dense", "t_router", "t_device_experts",
           "t_host_experts", "t_transfer_wait", "t_lm_head")


def _run(model_path, device, n_threads, policy, budget, prompt, max_tokens, block_length,
         steps, threshold=0.95, repeat=1):
    """One traced run on a fresh context; with repeat > 1 the same run again (each on its own
    fresh context, so the counters are identical) and every timer, total and per layer, the
    median over the repeats."""
    from .model import Model
    kw = dict(device=device, n_threads=n_threads, policy=policy, trace=True)
    if budget is not None:
        kw["gpu_experts"] = budget
    runs = []
    for _ in range(max(repeat, 1)):
        with Model(model_path, **kw) as m:
            m.reset_stats()
            m.generate(prompt, max_tokens=max_tokens, block_length=block_length, steps=steps,
                       threshold=threshold)
            runs.append(m.stats())
            if len(runs) == 1:
                trace = m.trace()
            hp = dict(m.hparams)
    st = runs[0]
    for k in _TIMERS:
        st[k] = float(np.median([r[k] for r in runs]))
    for l, pl in enumerate(st["per_layer"]):
        for k in ("t_device_experts", "t_host_experts", "t_transfer_wait"):
            pl[k] = float(np.median([r["per_layer"][l][k] for r in runs]))
    return st, trace, hp


def _layer_rows(stats, trace, policy, budget):
    """Per MoE layer: replayed (device experts, device pairs, host experts, host pairs, promoted,
    tokens) summed over the run, and the measured phase seconds."""
    r = replay(trace, policy, budget)
    tok = int(np.sum(trace["n_tokens"]))
    rows = []
    for l, pl in enumerate(stats["per_layer"]):
        rows.append(dict(
            dev_exp=int(r.device_experts[:, l].sum()), dev_pairs=int(r.device_pairs[:, l].sum()),
            host_exp=int(r.host_experts[:, l].sum()), host_pairs=int(r.host_pairs[:, l].sum()),
            promoted=int(r.promoted[:, l].sum()), tokens=tok, forwards=len(trace["kind"]),
            t_dev=pl["t_device_experts"], t_host=pl["t_host_experts"],
            t_wait=pl["t_transfer_wait"]))
    return rows


def calibrate_engine(model_path, device="sim", n_threads=None, prompts=None, max_tokens=32,
                     block_lengths=(4, 8, 32), steps=None, repeat=3, log=print) -> HardwareProfile:
    prompts = prompts or DEFAULT_PROMPTS[:1]
    host_rows, dev_rows, wait_rows, ne_rows = [], [], [], []
    hp = None
    for bl in block_lengths:
        st_ = steps or bl
        for prompt in prompts:
            for policy, budget in (("cpu", None), ("gpu", None)):
                if device == "cpu" and policy == "gpu":
                    continue
                t = time.perf_counter()
                stats, trace, hp = _run(model_path, device, n_threads, policy, budget, prompt,
                                        max_tokens, bl, st_, repeat=repeat)
                log(f"  {policy:4s} block {bl:3d}: {stats['steps']} steps, "
                    f"{stats['t_total']:.3f} s in the core ({time.perf_counter() - t:.1f} s wall)")
                rows = _layer_rows(stats, trace, policy, budget)
                for r in rows:
                    if policy == "cpu":
                        host_rows.append(r)
                    else:
                        dev_rows.append(r)
                expert_phases = sum(r["t_dev"] + r["t_host"] + r["t_wait"] for r in rows)
                ne_rows.append((stats["forwards"], stats["tokens_forwarded"],
                                stats["t_total"] - expert_phases, policy))
    E = hp["n_expert"]
    expert_bytes = int(hp["expert_bytes"])
    if device != "cpu":
        swap_b = max(1, E // 8)
        stats, trace, _ = _run(model_path, device, n_threads, "swap", swap_b, prompts[0],
                               max_tokens, block_lengths[-1], steps or block_lengths[-1],
                               repeat=repeat)
        log(f"  swap budget {swap_b}: {stats['experts_promoted']} experts copied, "
            f"{stats['t_transfer_wait']:.3f} s waiting")
        wait_rows = _layer_rows(stats, trace, "swap", swap_b)

    # host experts: t_host = a * experts + b * pairs (the cpu runs; the shared expert is in t_dev)
    a_h, b_h = _nnls([[r["host_exp"], r["host_pairs"]] for r in host_rows],
                     [r["t_host"] for r in host_rows])
    # The shared expert is the only thing in the device phase of the cpu runs (no expert is
    # resident): a + b * tokens per layer and forward. (In the gpu runs it cannot be told apart
    # from the routed experts: there device pairs are always tokens * k.)
    s_a, s_b = _nnls([[r["forwards"], r["tokens"]] for r in host_rows],
                     [r["t_dev"] for r in host_rows])
    if dev_rows:
        a_d, b_d = _nnls([[r["dev_exp"], r["dev_pairs"]] for r in dev_rows],
                         [max(r["t_dev"] - s_a * r["forwards"] - s_b * r["tokens"], 0.0)
                          for r in dev_rows])
    else:
        a_d = b_d = 0.0
    if wait_rows and sum(r["promoted"] for r in wait_rows):
        per_copy = sum(r["t_wait"] for r in wait_rows) / sum(r["promoted"] for r in wait_rows)
        bw = expert_bytes / max(per_copy, 1e-12)
    else:
        per_copy = measure_memcpy(expert_bytes)
        bw = expert_bytes / per_copy
    # non-expert: the rest of t_total, per forward and per token (steps and commits alike)
    ne_a, ne_b = _nnls([[f, tk] for f, tk, _, _ in ne_rows], [max(t, 0.0) for _, _, t, _ in ne_rows])
    prof = HardwareProfile(
        device=device, h2d_bandwidth=float(bw), h2d_latency=0.0,
        host_expert=(float(a_h), float(b_h)), device_expert=(float(a_d), float(b_d)),
        shared_expert=(float(s_a), float(s_b)),
        nonexpert_step=(float(ne_a), float(ne_b)), nonexpert_commit=(float(ne_a), float(ne_b)),
        layer_fixed=0.0, overlap=(device == "cuda"), host_threads=int(n_threads or 0),
        expert_bytes=expert_bytes,
        method=(f"engine: fitted to the core's per-layer timers on device={device}: policy cpu "
                f"(host experts) and gpu (device experts + shared expert) at block lengths "
                f"{list(block_lengths)}, swap for the H2D copy time; non-expert = t_total minus "
                f"expert phases; {len(prompts)} prompt(s), max_tokens {max_tokens}, timers the "
                f"median of {repeat} repeats"),
        machine={**machine_description(n_threads), "model": os.path.basename(str(model_path)),
                 "n_expert": E, "n_embd": hp["n_embd"], "n_ff_exp": hp["n_ff_exp"],
                 "expert_type": hp.get("expert_type")})
    return prof
