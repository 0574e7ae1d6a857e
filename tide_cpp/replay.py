"""Replay of a routing trace through the expert-residency policies.

The policies (CONTRACTS.md section 3) have one implementation, the core's residency.c; tide.h
exports it as a state machine (tide_residency_*) that needs no model and no device. replay()
feeds it the hits of every forward of a trace (section 4) and collects what it did, per forward
and per MoE layer: promotions, demotions, H2D bytes, device and host token-expert pairs, the
same counters a context keeps. The planner prices these counters; the tests compare them with a
live context's.

replay() runs one policy over a whole trace; replay_phases() a run whose policy was switched
(tide_set_residency, as policy="auto" does); tide_sweep() one layer under `tide` for every budget
at once, which is what the planner needs (numpy, tested equal to the state machine).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import numpy as np

from . import _lib

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
    budgets: np.ndarray            # [L] slots as the core reports them (gpu: E, cpu: 0)
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


class Residency:
    """The core's residency state machine (tide_residency_*): n_layers MoE layers of n_expert
    experts. Closed when garbage collected, or with close() / a with block."""

    def __init__(self, n_layers: int, n_expert: int, policy: str, budgets=None,
                 refresh_interval: int = 4, expert_bytes: int = 0):
        self._lib = _lib.lib()
        self._r = None
        self.n_layers, self.n_expert = int(n_layers), int(n_expert)
        b, nb = self._budgets(budgets)
        err = ctypes.create_string_buffer(512)
        r = ctypes.c_void_p()
        st = self._lib.tide_residency_new(self.n_layers, self.n_expert, _policy_id(policy), b, nb,
                                          int(refresh_interval), int(expert_bytes),
                                          ctypes.byref(r), err, len(err))
        if st != _lib.OK:
            raise _error(st, err.value.decode("utf-8", "replace"))
        self._r = r
        self._delta = (_lib.tide_residency_delta * self.n_layers)()
        self._stats = _lib.tide_layer_stats()

    def _budgets(self, budgets):
        """An int (every layer), one per layer, or None (0 each) -> (int32 pointer, count)."""
        if budgets is None:
            return None, 0
        b = np.asarray(budgets, dtype=np.int64).reshape(-1)
        if b.size == 1:
            b = np.full(self.n_layers, int(b[0]), dtype=np.int64)
        self._keep = np.ascontiguousarray(b, dtype=np.int32)
        return self._keep.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), int(b.size)

    def _check(self, st):
        if st != _lib.OK:
            msg = self._lib.tide_residency_error(self._r)
            raise _error(st, msg.decode("utf-8", "replace") if msg else "")

    def set_policy(self, policy: str, budgets=None, refresh_interval: int = 4):
        b, nb = self._budgets(budgets)
        self._check(self._lib.tide_residency_set_policy(self._r, _policy_id(policy), b, nb,
                                                        int(refresh_interval)))

    def set_popularity(self, counts):
        c = np.ascontiguousarray(counts, dtype=np.float32).reshape(-1)
        self._check(self._lib.tide_residency_set_popularity(
            self._r, c.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), c.size))

    def forward(self, hits, kind: int, step_in_block: int) -> np.ndarray:
        """One forward: hits [n_layers, n_expert]. Returns int64 [n_layers, 6]: promoted,
        demoted, device_pairs, host_pairs, device_experts, host_experts."""
        h = np.ascontiguousarray(hits, dtype=np.int32)
        self._check(self._lib.tide_residency_forward(
            self._r, h.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), h.size, int(kind),
            int(step_in_block), self._delta))
        return np.ctypeslib.as_array(self._delta).view(np.int64).reshape(self.n_layers, 6)

    def layer_stats(self, layer: int) -> dict:
        self._check(self._lib.tide_residency_layer_stats(self._r, int(layer),
                                                         ctypes.byref(self._stats)))
        return _lib.struct_dict(self._stats)

    def resident(self, layer: int) -> np.ndarray:
        out = np.zeros(self.n_expert, dtype=np.uint8)
        self._check(self._lib.tide_residency_resident(
            self._r, int(layer), out.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), out.size))
        return out.astype(bool)

    def close(self):
        if self._r is not None:
            self._lib.tide_residency_free(self._r)
            self._r = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()


def _policy_id(policy: str) -> int:
    if policy not in _lib.POLICIES:
        raise ValueError(f"policy: unknown {policy!r}, expected one of {', '.join(POLICIES)}")
    return _lib.POLICIES[policy]


def _error(status, message):
    """Bad arguments are the caller's ValueError; anything else the core's TideError."""
    return ValueError(message) if status == _lib.ERR_ARG else _lib.TideError(status, message)


def replay(trace, policy: str, budgets=None, refresh_interval: int = 4,
           popularity=None) -> ReplayResult:
    """Replay `trace` (path, dict or Trace) through `policy` with `budgets` (int or one per MoE
    layer; None: 0) and `popularity` [n_moe_layers, n_expert] counts for `static`: every forward
    through the core's state machine. Exact counters."""
    tr = Trace.load(trace)
    F, L, E = tr.hits.shape
    out = np.zeros((6, F, L), dtype=np.int64)
    with Residency(L, E, policy, budgets, refresh_interval, tr.expert_bytes) as r:
        if popularity is not None:
            r.set_popularity(popularity)
        setup = np.array([r.layer_stats(l)["experts_promoted"] for l in range(L)], np.int64)
        hits = np.ascontiguousarray(tr.hits, dtype=np.int32)
        for f in range(F):
            out[:, f, :] = r.forward(hits[f], tr.kind[f], tr.step[f]).T
        bud = np.array([r.layer_stats(l)["budget"] for l in range(L)], np.int64)
        resident = np.stack([r.resident(l) for l in range(L)]) if L else np.zeros((0, E), bool)
    names = ("promoted", "demoted", "device_pairs", "host_pairs", "device_experts",
             "host_experts")
    return ReplayResult(policy=policy, budgets=bud, refresh_interval=int(refresh_interval),
                        expert_bytes=tr.expert_bytes, setup_promoted=setup, resident=resident,
                        kind=tr.kind, **dict(zip(names, out)))


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
    refresh_interval[, popularity]), ...] in order, the first starting at 0. Each switch is the
    state machine's set_policy, as tide_set_residency does it (every resident expert demoted,
    counted; the new policy starts from R = {}). Returns {"total": {...}, "per_layer": [{...},
    ...]} named as the core's counters (setup promotions of gpu / profiled static included)."""
    tr = Trace.load(trace)
    if not phases or phases[0][0] != 0:
        raise ValueError("phases: the first phase must start at forward 0")
    bounds = [p[0] for p in phases] + [tr.n_forwards]
    if any(z < a for a, z in zip(bounds, bounds[1:])):
        raise ValueError("phases: first_forward must not decrease")
    hits = np.ascontiguousarray(tr.hits, dtype=np.int32)
    first = phases[0]
    with Residency(tr.n_layers, tr.n_expert, first[1], first[2], first[3], tr.expert_bytes) as r:
        for i, ph in enumerate(phases):
            if i:
                r.set_policy(ph[1], ph[2], ph[3])
            if len(ph) > 4 and ph[4] is not None:
                r.set_popularity(ph[4])
            for f in range(bounds[i], bounds[i + 1]):
                r.forward(hits[f], tr.kind[f], tr.step[f])
        per_layer = [{k: int(r.layer_stats(l)[k]) for k in COUNTERS} for l in range(tr.n_layers)]
    total = {k: sum(p[k] for p in per_layer) for k in COUNTERS}
    return {"total": total, "per_layer": per_layer}
