"""Replay of a routing trace through the expert-residency policies, in plain Python (numpy).

This is the second, independent implementation of docs/CONTRACTS.md section 3 (the first is the
core's residency.c). Given the hits of every forward (section 4 trace), it reproduces to the unit
the counters the core keeps: promotions, demotions, H2D bytes, device and host token-expert pairs,
per forward and per MoE layer. The planner prices these counters; the tests compare them with the
core's.

Rules, as section 3 states them (per MoE layer, independently; ties always by the lower id):
- cpu: nothing resident. gpu: all E resident from context creation (E promotions, counted once).
- static: popularity given -> top-B by count (count > 0) promoted at once; otherwise R = {} until
  the first *step* forward, where R = top-B by that forward's hits, before computing. Then fixed.
- swap: needed experts (H > 0) in ascending id; LRU on a per-layer tick; every needed expert is
  computed on the device (B = 0: everything on the host). Steps and commits alike.
- tide: at a step forward with step % tau == 0, before computing: T = top-B by H; promote T \\ R;
  demote just enough of R \\ T (lowest H first, ties lower id) to fit B.
- Pairs of experts in R after this forward's change are device pairs, the others host pairs.

replay() runs one policy over a whole trace; replay_phases() a run whose policy was switched
(tide_set_residency, as policy="auto" does); tide_sweep() one layer under `tide` for every budget
at once, which is what the planner needs.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

POLICIES = ("cpu", "gpu", "static", "swap", "tide")

KIND_STEP, KIND_COMMIT, KIND_LOGITS = 0, 1, 2

# Counter names, as the core's tide_stats / tide_layer_stats name them.
COUNTERS = ("experts_promoted", "experts_demoted", "h2d_bytes",
            "device_expert_tokens", "host_expert_tokens")


@dataclass
class Trace:
    """A routing trace (CONTRACTS.md section 4), arrays validated and typed."""
    hits: np.ndarray        # int64 [n_forwards, n_moe_layers, n_expert]
    kind: np.ndarray        # int8  [n_forwards]: 0 step, 1 commit, 2 logits
    block: np.ndarray       # int32 [n_forwards]
    step: np.ndarray        # int32 [n_forwards], -1 for commits
    n_tokens: np.ndarray    # int32 [n_forwards]
    expert_bytes: int
    n_expert: int
    moe_layers: np.ndarray  # int32 [n_moe_layers]
    block_length: int
    nonexpert_bytes: int | None = None  # optional extra key: bytes of all non-expert tensors

    @property
    def n_forwards(self) -> int:
        return self.hits.shape[0]

    @property
    def n_layers(self) -> int:
        return self.hits.shape[1]

    @property
    def n_steps(self) -> int:
        return int(np.count_nonzero(self.kind == KIND_STEP))

    @property
    def max_step(self) -> int:
        """Largest step_in_block in the trace (-1 if it has no steps)."""
        s = self.step[self.kind == KIND_STEP]
        return int(s.max()) if s.size else -1

    @classmethod
    def load(cls, src) -> "Trace":
        """From a path to an .npz, a dict of arrays (Model.trace()), or a Trace."""
        if isinstance(src, Trace):
            return src
        if isinstance(src, (str, bytes)) or hasattr(src, "__fspath__"):
            with np.load(src) as z:
                d = {k: z[k] for k in z.files}
        else:
            d = dict(src)
        missing = [k for k in ("hits", "kind", "step") if k not in d]
        if missing:
            raise ValueError(f"trace lacks {', '.join(missing)} (CONTRACTS.md section 4)")
        hits = np.asarray(d["hits"]).astype(np.int64, copy=False)
        if hits.ndim != 3:
            raise ValueError(f"trace hits must be [n_forwards, n_moe_layers, n_expert], got shape {hits.shape}")
        n_f, n_l, n_e = hits.shape
        if np.any(hits < 0):
            raise ValueError("trace hits must be >= 0")

        def arr(key, default, dtype):
            a = np.asarray(d[key] if key in d else default).astype(dtype).reshape(-1)
            if a.shape[0] != n_f:
                raise ValueError(f"trace {key} has {a.shape[0]} entries for {n_f} forwards")
            return a

        kind = arr("kind", None, np.int8)
        step = arr("step", None, np.int32)
        block = arr("block", np.zeros(n_f), np.int32)
        n_tokens = arr("n_tokens", hits[:, 0, :].sum(axis=1) if n_l else np.zeros(n_f), np.int32)
        if np.any((kind == KIND_STEP) & (step < 0)):
            raise ValueError("trace has a step forward with step < 0")
        n_expert = int(d.get("n_expert", n_e))
        if n_expert != n_e:
            raise ValueError(f"trace n_expert = {n_expert} but hits have {n_e} experts")
        ne = d.get("nonexpert_bytes")
        return cls(
            hits=hits, kind=kind, block=block, step=step, n_tokens=n_tokens,
            expert_bytes=int(d.get("expert_bytes", 0)), n_expert=n_e,
            moe_layers=np.asarray(d.get("moe_layers", np.arange(n_l))).astype(np.int32).reshape(-1),
            block_length=int(d.get("block_length", 32)),
            nonexpert_bytes=None if ne is None else int(ne),
        )

    def to_dict(self) -> dict:
        d = dict(hits=self.hits.astype(np.int32), kind=self.kind, block=self.block, step=self.step,
                 n_tokens=self.n_tokens, expert_bytes=np.int64(self.expert_bytes),
                 n_expert=np.int32(self.n_expert), moe_layers=self.moe_layers,
                 block_length=np.int32(self.block_length))
        if self.nonexpert_bytes is not None:
            d["nonexpert_bytes"] = np.int64(self.nonexpert_bytes)
        return d

    def save(self, path) -> None:
        np.savez_compressed(path, **self.to_dict())

    def layer(self, moe_layer: int) -> "Trace":
        """The trace of one MoE layer only (n_moe_layers = 1)."""
        return Trace(self.hits[:, moe_layer:moe_layer + 1, :], self.kind, self.block, self.step,
                     self.n_tokens, self.expert_bytes, self.n_expert,
                     self.moe_layers[moe_layer:moe_layer + 1], self.block_length, self.nonexpert_bytes)


@dataclass
class ReplayResult:
    """Exact counters of one policy over a trace.

    Per forward and layer ([n_forwards, n_moe_layers], int64): promoted, demoted, h2d_bytes,
    device_pairs, host_pairs (the core's counters) and, for pricing, device_experts / host_experts
    (distinct experts with pairs on each side). `setup_*` [n_moe_layers] are the promotions made
    before any forward (gpu at creation, static with a popularity profile when it is set).
    """
    policy: str
    budgets: np.ndarray            # [L] slots as the core reports them (gpu: E)
    refresh_interval: int
    expert_bytes: int
    promoted: np.ndarray
    demoted: np.ndarray
    device_pairs: np.ndarray
    host_pairs: np.ndarray
    device_experts: np.ndarray
    host_experts: np.ndarray
    setup_promoted: np.ndarray
    resident: np.ndarray           # bool [L, E] after the last forward
    kind: np.ndarray = field(repr=False, default=None)

    @property
    def h2d_bytes(self) -> np.ndarray:
        return self.promoted * self.expert_bytes

    @property
    def setup_h2d_bytes(self) -> np.ndarray:
        return self.setup_promoted * self.expert_bytes

    def layer_totals(self, moe_layer: int, include_setup: bool = True) -> dict:
        """Totals of one layer, named as tide_layer_stats names them."""
        s = int(self.setup_promoted[moe_layer]) if include_setup else 0
        prom = int(self.promoted[:, moe_layer].sum()) + s
        return {
            "experts_promoted": prom,
            "experts_demoted": int(self.demoted[:, moe_layer].sum()),
            "h2d_bytes": prom * self.expert_bytes,
            "device_expert_tokens": int(self.device_pairs[:, moe_layer].sum()),
            "host_expert_tokens": int(self.host_pairs[:, moe_layer].sum()),
            "budget": int(self.budgets[moe_layer]),
            "resident": int(self.resident[moe_layer].sum()),
        }

    def totals(self, include_setup: bool = True) -> dict:
        """Totals over all layers, named as tide_stats names them."""
        s = int(self.setup_promoted.sum()) if include_setup else 0
        prom = int(self.promoted.sum()) + s
        return {
            "experts_promoted": prom,
            "experts_demoted": int(self.demoted.sum()),
            "h2d_bytes": prom * self.expert_bytes,
            "device_expert_tokens": int(self.device_pairs.sum()),
            "host_expert_tokens": int(self.host_pairs.sum()),
        }

    def hit_rate(self) -> float:
        """Share of token-expert pairs computed on the device."""
        d, h = self.device_pairs.sum(), self.host_pairs.sum()
        return float(d / (d + h)) if d + h else 0.0


def top_b(h: np.ndarray, b: int) -> np.ndarray:
    """Ids of the top-b experts by hits, count > 0, ties by lower id (sorted by (-h, id))."""
    order = np.lexsort((np.arange(h.shape[0]), -h))  # last key is primary
    order = order[:b]
    return order[h[order] > 0]


def _budgets(budgets, n_layers: int, n_expert: int) -> np.ndarray:
    if budgets is None:
        raise ValueError("budgets: required for this policy")
    b = np.asarray(budgets, dtype=np.int64).reshape(-1)
    if b.size == 1:
        b = np.full(n_layers, int(b[0]), dtype=np.int64)
    if b.size != n_layers:
        raise ValueError(f"budgets: {b.size} entries for {n_layers} MoE layers")
    if np.any(b < 0):
        raise ValueError(f"budgets: must be >= 0, got {b.tolist()}")
    return np.minimum(b, n_expert)  # more slots than experts changes nothing in any policy


def replay(trace, policy: str, budgets=None, refresh_interval: int = 4,
           popularity=None) -> ReplayResult:
    """Replay `trace` (path, dict or Trace) through `policy` with `budgets` (int or one per MoE
    layer); `popularity` [n_moe_layers, n_expert] counts for `static`. Exact counters."""
    tr = Trace.load(trace)
    if policy not in POLICIES:
        raise ValueError(f"policy: unknown {policy!r}, expected one of {', '.join(POLICIES)}")
    F, L, E = tr.hits.shape
    if policy == "gpu":
        bud = np.full(L, E, dtype=np.int64)
    elif policy == "cpu":
        bud = np.zeros(L, dtype=np.int64) if budgets is None else _budgets(budgets, L, E)
    else:
        bud = _budgets(budgets, L, E)
    tau = int(refresh_interval)
    if policy == "tide" and tau < 1:
        raise ValueError(f"refresh_interval: must be >= 1, got {refresh_interval}")
    if popularity is not None:
        popularity = np.asarray(popularity, dtype=np.float64).reshape(L, E)

    shape = (F, L)
    out = {k: np.zeros(shape, dtype=np.int64) for k in
           ("promoted", "demoted", "device_pairs", "host_pairs", "device_experts", "host_experts")}
    setup = np.zeros(L, dtype=np.int64)
    resident = np.zeros((L, E), dtype=bool)

    for l in range(L):
        B = int(bud[l])
        R = np.zeros(E, dtype=bool)
        static_done = False
        if policy == "gpu":
            R[:] = True
            setup[l] = E
        elif policy == "static" and popularity is not None:
            R[top_b(popularity[l], B)] = True
            setup[l] = int(R.sum())
            static_done = True
        lru = OrderedDict()  # swap: resident experts, least recently used first
        for f in range(F):
            H = tr.hits[f, l]
            is_step = tr.kind[f] == KIND_STEP
            prom = dem = 0
            all_device = False
            if policy == "static" and not static_done and is_step:
                R[top_b(H, B)] = True
                prom = int(R.sum())
                static_done = True
            elif policy == "tide" and is_step and tr.step[f] % tau == 0:
                T = np.zeros(E, dtype=bool)
                T[top_b(H, B)] = True
                new = T & ~R
                n_new = int(new.sum())
                excess = int(R.sum()) + n_new - B
                if excess > 0:
                    cand = np.flatnonzero(R & ~T)
                    cand = cand[np.lexsort((cand, H[cand]))]  # lowest H first, ties lower id
                    R[cand[:excess]] = False
                    dem = excess
                R |= new
                prom = n_new
            elif policy == "swap" and B > 0:
                # LRU: ticks are unique and grow, so the order of `lru` (oldest first) is the
                # order of last_use, and its first entry is the victim.
                for e in np.flatnonzero(H > 0).tolist():  # ascending id
                    if e in lru:
                        lru.move_to_end(e)
                        continue
                    if len(lru) >= B:
                        lru.popitem(last=False)
                        dem += 1
                    lru[e] = True
                    prom += 1
                all_device = True
            need = H > 0
            dev = need if all_device else (need & R)
            out["promoted"][f, l] = prom
            out["demoted"][f, l] = dem
            out["device_pairs"][f, l] = int(H[dev].sum())
            out["host_pairs"][f, l] = int(H[need & ~dev].sum())
            out["device_experts"][f, l] = int(dev.sum())
            out["host_experts"][f, l] = int((need & ~dev).sum())
        if policy == "swap":
            R[list(lru)] = True
        resident[l] = R
    return ReplayResult(policy=policy, budgets=bud, refresh_interval=tau,
                        expert_bytes=tr.expert_bytes, setup_promoted=setup, resident=resident,
                        kind=tr.kind, **out)


# ---- the sweep the planner needs: one layer, one interval, every budget at once ---------------

_CHUNK = 4


def tide_sweep(hits: np.ndarray, kind: np.ndarray, step: np.ndarray, tau: int,
               budgets: np.ndarray) -> dict:
    """The `tide` policy on one layer (hits [F, E]) for every budget in `budgets` at once.

    Same rules as replay(); the resident sets of all budgets are one bool matrix [nb, E], updated
    together at each refresh, and the per-forward counters of a stretch between refreshes are one
    matrix product. Returns int64 arrays [nb, F]: promoted, demoted, device_pairs, host_pairs,
    device_experts, host_experts. Exact (tested equal to replay() for every budget).
    """
    hits = np.asarray(hits, dtype=np.int64)
    F, E = hits.shape
    bs = np.asarray(budgets, dtype=np.int64).reshape(-1)
    nb = bs.size
    R = np.zeros((nb, E), dtype=bool)
    promoted = np.zeros((nb, F), dtype=np.int64)
    demoted = np.zeros((nb, F), dtype=np.int64)
    dev_pairs = np.zeros((nb, F), dtype=np.int64)
    dev_exp = np.zeros((nb, F), dtype=np.int64)
    ids = np.arange(E)
    refresh = (kind == KIND_STEP) & (step % tau == 0)
    # Stretches of forwards with a fixed resident set: each starts at 0 (R = {}) or a refresh.
    bounds = sorted(set([0, F]) | set(np.flatnonzero(refresh).tolist()))
    starts, ends = bounds[:-1], bounds[1:]
    # [E, 2F]: for each forward its hits and its "has pairs" column side by side, so one product
    # gives both counters (float32 is exact: every entry and sum is an integer far below 2**24).
    both = np.ascontiguousarray(np.stack([hits, hits > 0], axis=2).astype(np.float32)
                                .reshape(F, 2 * E).reshape(F, E, 2).transpose(1, 0, 2)
                                .reshape(E, 2 * F))
    for a, z in zip(starts, ends):
        if refresh[a]:
            # Two cases make this cheap. b <= n_pos (experts with hits): T is the first b of the
            # order and fills every slot, so all of R \ T goes and R becomes T. b > n_pos: T is
            # every expert with hits, and R \ T all have H = 0, so "lowest H first, ties lower
            # id" is plain id order: keep the highest ids of R \ T that still fit.
            H = hits[a]
            P = H > 0
            n_pos = int(P.sum())
            order = np.lexsort((ids, -H))
            rank = np.empty(E, dtype=np.int64)
            rank[order] = ids
            low = bs <= n_pos
            T = (rank[None, :] < np.minimum(bs, n_pos)[:, None])
            n_old = R.sum(axis=1)
            n_new = (T & ~R).sum(axis=1)
            excess = n_old + n_new - bs
            dem = np.where(low, n_old + n_new - bs, 0)
            R[low] = T[low]
            high = np.flatnonzero(~low & (excess > 0))
            if high.size:
                cand = R[high] & ~P[None, :]
                cum = np.cumsum(cand, axis=1, dtype=np.int16)
                R[high] = (R[high] | P[None, :]) & ~(cand & (cum <= excess[high, None]))
                dem[high] = excess[high]
            rest = np.flatnonzero(~low & (excess <= 0))
            R[rest] |= P[None, :]
            demoted[:, a] = dem
            promoted[:, a] = n_new
        Rf = R.astype(np.float32)
        # Products of at most _CHUNK forwards: small enough that OpenBLAS stays on one thread
        # (its threaded path is 100x slower on a loaded machine for these shapes).
        for c in range(a, z, _CHUNK):
            c2 = min(c + _CHUNK, z)
            m = Rf @ both[:, 2 * c:2 * c2]
            dev_pairs[:, c:c2] = m[:, 0::2]
            dev_exp[:, c:c2] = m[:, 1::2]
    tot_pairs = hits.sum(axis=1)[None, :]
    tot_exp = (hits > 0).sum(axis=1)[None, :]
    return {"promoted": promoted, "demoted": demoted, "device_pairs": dev_pairs,
            "host_pairs": tot_pairs - dev_pairs, "device_experts": dev_exp,
            "host_experts": tot_exp - dev_exp}


# ---- synthetic traces (tests, benchmarks of the planner) -------------------------------------

def synthetic_trace(n_layers: int = 4, n_expert: int = 32, n_used: int = 4, block_length: int = 8,
                    n_blocks: int = 3, steps_per_block: int = 8, prefill_blocks: int = 1,
                    expert_bytes: int = 6 << 20, skew=1.0, drift: float = 0.1,
                    seed: int = 0, nonexpert_bytes: int | None = None,
                    persistence: float = 0.0) -> Trace:
    """A routing trace with the structure TIDE relies on: within a block the popularity of each
    layer's experts drifts slowly from step to step; a new block redraws it. `skew` (one value or
    one per layer) is the Zipf exponent of the popularity: 0 is uniform, larger is hotter.
    Every token picks n_used distinct experts. `persistence` is the chance that a token keeps its
    previous step's experts (real diffusion steps re-route mostly the same tokens the same way).
    Prefill and block commits are included."""
    rng = np.random.default_rng(seed)
    skews = np.broadcast_to(np.asarray(skew, dtype=np.float64), (n_layers,))
    hits, kind, block, step, ntok = [], [], [], [], []

    prev = [None]

    def route(logp, keep=0.0):
        # n tokens x n_used distinct experts by Gumbel top-k on the popularity.
        h = np.zeros((n_layers, n_expert), dtype=np.int64)
        picks = []
        for l in range(n_layers):
            g = logp[l][None, :] + rng.gumbel(size=(block_length, n_expert))
            pick = np.argpartition(-g, n_used - 1, axis=1)[:, :n_used]
            if keep > 0 and prev[0] is not None:
                stay = rng.random(block_length) < keep
                pick[stay] = prev[0][l][stay]
            picks.append(pick)
            np.add.at(h[l], pick.reshape(-1), 1)
        prev[0] = picks
        return h

    def block_pop():
        ranks = np.stack([rng.permutation(n_expert) + 1.0 for _ in range(n_layers)])
        return -skews[:, None] * np.log(ranks)

    for bi in range(prefill_blocks):
        hits.append(route(block_pop()))
        kind.append(KIND_COMMIT), block.append(bi), step.append(-1), ntok.append(block_length)
    for bi in range(prefill_blocks, prefill_blocks + n_blocks):
        logp = block_pop()
        prev[0] = None
        for s in range(steps_per_block):
            hits.append(route(logp, persistence))
            kind.append(KIND_STEP), block.append(bi), step.append(s), ntok.append(block_length)
            logp = logp + drift * rng.standard_normal(logp.shape)
        hits.append(route(logp))
        kind.append(KIND_COMMIT), block.append(bi), step.append(-1), ntok.append(block_length)
    return Trace(hits=np.stack(hits), kind=np.array(kind, np.int8), block=np.array(block, np.int32),
                 step=np.array(step, np.int32), n_tokens=np.array(ntok, np.int32),
                 expert_bytes=int(expert_bytes), n_expert=n_expert,
                 moe_layers=np.arange(1, n_layers + 1, dtype=np.int32), block_length=block_length,
                 nonexpert_bytes=nonexpert_bytes)


# ---- a run whose residency was switched (tide_set_residency, e.g. policy="auto") ---------------

def replay_phases(trace, phases) -> dict:
    """Totals of a run whose policy changed mid-way. phases: [(first_forward, policy, budgets,
    refresh_interval[, popularity]), ...] in order, the first starting at 0. At each switch the
    core demotes every resident expert (counted) and the new policy starts from R = {}
    (CONTRACTS.md section 3). Returns {"total": {...}, "per_layer": [{...}, ...]} named as the
    core's counters (setup promotions of gpu / profiled static included)."""
    tr = Trace.load(trace)
    if not phases or phases[0][0] != 0:
        raise ValueError("phases: the first phase must start at forward 0")
    L = tr.n_layers
    keys = COUNTERS
    per_layer = [{k: 0 for k in keys} for _ in range(L)]
    bounds = [p[0] for p in phases] + [tr.n_forwards]
    for i, ph in enumerate(phases):
        a, z = bounds[i], bounds[i + 1]
        if z < a:
            raise ValueError("phases: first_forward must not decrease")
        part = Trace(tr.hits[a:z], tr.kind[a:z], tr.block[a:z], tr.step[a:z], tr.n_tokens[a:z],
                     tr.expert_bytes, tr.n_expert, tr.moe_layers, tr.block_length)
        r = replay(part, ph[1], ph[2], ph[3], ph[4] if len(ph) > 4 else None)
        for l in range(L):
            t = r.layer_totals(l)
            for k in keys:
                per_layer[l][k] += t[k]
            if i + 1 < len(phases):  # the switch demotes whatever is resident
                per_layer[l]["experts_demoted"] += int(r.resident[l].sum())
    total = {k: sum(p[k] for p in per_layer) for k in keys}
    return {"total": total, "per_layer": per_layer}
