"""tide_cpp.Model: a GGUF loaded by the native core, and the step layer that generation drives.

    with Model("model.gguf", device="auto", policy="tide", gpu_experts=32) as m:
        logits = m.logits(ids, block_length=32)          # [len(ids), n_vocab] float32
        m.commit(prompt_block)                           # a finished block into the KV cache
        tokens, probs = m.step(block, want, step_in_block=0)
        print(m.stats())

User-level methods (tokenize, generate, create_chat_completion, ...) live in their own modules
and are delegated from here.
"""

import ctypes
import os

import numpy as np

from . import _lib
from ._lib import TideError

_ERR_LEN = 1024


def _i32_ptr(a):
    return a.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))


def _check_int(name, v):
    """An int for a C int field (the library checks its range)."""
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
        raise ValueError(f"{name}: {v!r}, must be an int")


def _ids_array(ids, name="ids"):
    a = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))
    if a.size == 0:
        raise ValueError(f"{name}: empty")
    if a.min() < np.iinfo(np.int32).min or a.max() > np.iinfo(np.int32).max:
        raise ValueError(f"{name}: token id out of range")
    return a.astype(np.int32)


class ArgumentError(TideError, ValueError):
    """A bad argument the native library refused (status ERR_ARG): a TideError, and a ValueError
    like the ones raised here before anything reaches the library. The message names the
    argument as Model knows it (gpu_experts, not the C field budgets)."""


# C parameter names -> the Python argument users passed
_ARG_NAMES = {"budget": "gpu_experts", "budgets": "gpu_experts", "prefetch": "prefetch_experts"}


def _error(status, message):
    if status != _lib.ERR_ARG:
        return TideError(status, message)
    name, sep, rest = message.partition(":")
    field = name.split("[")[0]
    if sep and field in _ARG_NAMES:
        message = f"{_ARG_NAMES[field]}: {message}"
    return ArgumentError(status, message)


def resolve_device(device):
    """The device `auto` means here: cuda when a GPU is usable, else cpu. Other names unchanged
    (cuda raises when no GPU is usable)."""
    if device not in _lib.DEVICES and device != "auto":
        raise ValueError(f"device: unknown device {device!r} (cpu, sim, cuda or auto)")
    if device == "auto":
        return "cuda" if _lib.cuda_available()[0] else "cpu"
    if device == "cuda":
        ok, why = _lib.cuda_available()
        if not ok:
            raise TideError(_lib.ERR_UNSUPPORTED, f"device='cuda' but no usable GPU: {why}")
    return device


class Model:
    """A LLaDA2.0 GGUF on a backend: device cpu | sim | cuda | auto (cuda when a GPU is usable,
    else cpu).

    policy gpu | cpu | static | swap | tide decides which routed experts sit on the device;
    gpu_experts is the slot budget of every MoE layer (an int) or one per MoE layer (a list);
    refresh_interval is TIDE's tau. prefetch_experts=N (tide): at a refresh, up to N experts per
    MoE layer, predicted from the layer's previous routing, are copied while the layers before
    it compute; promotions they predicted need no copy of their own (stats: prefetch_bytes,
    prefetch_used). trace=True records the routing of every forward (CONTRACTS.md section 4).
    n_ctx: the context (None: the model's own, or what fits in half of the free memory).
    cache_type "f32" (exact) or "f16" / "bf16": a KV cache of half the memory, whose keys and
    values are rounded when stored, so results change in the last bits. n_batch: rows per
    forward of a prefill (micro-batch, whole blocks; default 512)."""

    def __init__(self, path, device="cpu", n_threads=None, n_ctx=None, policy="gpu",
                 gpu_experts=None, refresh_interval=4, trace=False, device_memory=None,
                 popularity=None, prefetch_experts=0, n_batch=None, cache_type="f32"):
        self._model = None
        self._ctx = None
        self._lib = _lib.lib()
        device = resolve_device(device)
        if n_threads is not None and (not isinstance(n_threads, (int, np.integer)) or n_threads < 1):
            raise ValueError(f"n_threads: {n_threads!r}, must be a positive int or None")
        if n_ctx is not None and (not isinstance(n_ctx, (int, np.integer)) or n_ctx < 1):
            raise ValueError(f"n_ctx: {n_ctx!r}, must be a positive int or None")
        _check_int("prefetch_experts", prefetch_experts)
        if n_batch is not None and (not isinstance(n_batch, (int, np.integer))
                                    or isinstance(n_batch, bool) or n_batch < 1):
            raise ValueError(f"n_batch: {n_batch!r}, must be a positive int or None")
        if cache_type not in _lib.CACHE_TYPES:
            raise ValueError(f"cache_type: {cache_type!r}, expected one of "
                             f"{', '.join(_lib.CACHE_TYPES)}")
        if device_memory is not None and device_memory < 0:  # the C field is unsigned
            raise ValueError(f"device_memory: {device_memory!r} is negative")
        self.device = device
        self.path = os.fspath(path)

        err = ctypes.create_string_buffer(_ERR_LEN)
        mp = ctypes.c_void_p()
        st = self._lib.tide_model_load(self.path.encode(), ctypes.byref(mp), err, _ERR_LEN)
        _lib.check(st, lambda: f"{self.path}: {err.value.decode('utf-8', 'replace')}")
        self._model = mp
        hp = _lib.tide_hparams()
        self._lib.tide_model_hparams(self._model, ctypes.byref(hp))
        self.hparams = _lib.struct_dict(hp)
        self.n_moe_layers = hp.n_layer - hp.n_dense_lead
        self.moe_layers = list(range(hp.n_dense_lead, hp.n_layer))

        try:
            policy_id, budget, budgets, interval = self._check_residency(policy, gpu_experts,
                                                                        refresh_interval)
        except ValueError:
            self.close()
            raise
        p = self._lib.tide_context_default_params()
        p.device = _lib.DEVICES[device]
        p.n_threads = int(n_threads or 0)
        p.n_ctx = int(n_ctx or 0)
        p.policy = policy_id
        p.budget = budget
        if budgets is not None:
            p.budgets = _i32_ptr(budgets)
            p.n_budgets = len(budgets)
        p.refresh_interval = interval
        p.trace = 1 if trace else 0
        p.device_memory = int(device_memory or 0)
        p.prefetch = int(prefetch_experts)
        p.n_batch = int(n_batch or 0)
        p.cache_type = _lib.CACHE_TYPES[cache_type]
        cp = ctypes.c_void_p()
        st = self._lib.tide_context_create(self._model, ctypes.byref(p), ctypes.byref(cp), err,
                                           _ERR_LEN)
        if st != _lib.OK:
            self.close()
            raise _error(st, err.value.decode("utf-8", "replace"))
        self._ctx = cp
        if n_ctx is None and self.n_ctx < hp.n_ctx_train:
            import warnings
            warnings.warn(f"n_ctx: {self.n_ctx} tokens, not the model's {hp.n_ctx_train}: that is "
                          f"what fits in half of the free memory of {device} (KV cache "
                          f"{self.cache_bytes / 2**30:.2f} GiB); pass n_ctx to choose",
                          RuntimeWarning, stacklevel=2)
        self._policy = policy if device != "cpu" else "cpu"
        self._refresh_interval = interval
        self._trace_on = bool(trace)
        self.device_memory = int(device_memory) if device_memory else None
        self.prefetch_experts = int(prefetch_experts)
        self.cache_type = cache_type
        self._trace = {"hits": [], "kind": [], "block": [], "step": [], "n_tokens": []}
        self._block_length = None
        if popularity is not None:
            self.set_popularity(popularity)

    # ---- checks ---------------------------------------------------------------------------
    # Python values -> the C parameters. Ranges (budgets >= 0, one per MoE layer, interval >= 1,
    # prefetch >= 0) are the library's to check: it refuses with ERR_ARG, raised as ArgumentError.
    def _check_residency(self, policy, gpu_experts, refresh_interval):
        # `auto` runs as `tide`; generation asks the planner for the interval and budgets after
        # the first block (tide_cpp.generation._plan_auto) and switches with set_residency.
        if policy not in _lib.POLICIES and policy != "auto":
            raise ValueError(f"policy: unknown policy {policy!r} "
                             f"({', '.join(list(_lib.POLICIES) + ['auto'])})")
        _check_int("refresh_interval", refresh_interval)
        budget, budgets = 0, None
        if gpu_experts is None:
            pass
        elif isinstance(gpu_experts, (int, np.integer)) and not isinstance(gpu_experts, bool):
            budget = int(gpu_experts)
        else:
            try:
                budgets = np.ascontiguousarray([int(b) for b in gpu_experts], dtype=np.int32)
            except (TypeError, ValueError):
                raise ValueError(f"gpu_experts: {gpu_experts!r}, expected an int or a list of ints")
        native = _lib.POLICIES["tide" if policy == "auto" else policy]
        return native, budget, budgets, int(refresh_interval)

    def _check_open(self):
        if self._ctx is None:
            raise ValueError("the model is closed")

    def _fail(self, st):
        msg = self._lib.tide_context_error(self._ctx)
        raise _error(st, msg.decode("utf-8", "replace") if msg else "")

    # ---- properties -----------------------------------------------------------------------
    @property
    def n_past(self):
        self._check_open()
        return self._lib.tide_n_past(self._ctx)

    @property
    def n_ctx(self):
        self._check_open()
        return self._lib.tide_n_ctx(self._ctx)

    @property
    def cache_bytes(self):
        """Bytes of the KV cache (keys and values of every layer, n_ctx tokens)."""
        self._check_open()
        return int(self._lib.tide_cache_bytes(self._ctx))

    @property
    def policy(self):
        """The residency policy by name (`cpu` on device cpu: nothing can be resident)."""
        return self._policy

    @property
    def n_vocab(self):
        return self.hparams["n_vocab"]

    eos_token_id = property(lambda self: self.hparams["eos_id"])
    mask_token_id = property(lambda self: self.hparams["mask_id"])
    bos_token_id = property(lambda self: self.hparams["bos_id"])
    pad_token_id = property(lambda self: self.hparams["pad_id"])

    def metadata_string(self, key):
        """A string metadata value of the GGUF, or None when absent (or not a string)."""
        if self._model is None:
            raise ValueError("the model is closed")
        p, n = ctypes.c_void_p(), ctypes.c_size_t()
        st = self._lib.tide_model_meta_string(self._model, key.encode(), ctypes.byref(p),
                                              ctypes.byref(n))
        if st != _lib.OK:
            return None
        return ctypes.string_at(p, n.value).decode("utf-8", "replace")

    # ---- the step layer -------------------------------------------------------------------
    def reset(self):
        self._check_open()
        self._lib.tide_reset(self._ctx)

    def _record(self, kind, block, step, n):
        if not self._trace_on:
            return
        E = self.hparams["n_expert"]
        hits = np.zeros(self.n_moe_layers * E, dtype=np.int32)
        if self.n_moe_layers:
            st = self._lib.tide_last_hits(self._ctx, _i32_ptr(hits), hits.size)
            if st != _lib.OK:
                self._fail(st)
        t = self._trace
        t["hits"].append(hits.reshape(self.n_moe_layers, E))
        t["kind"].append(kind)
        t["block"].append(block)
        t["step"].append(step)
        t["n_tokens"].append(n)

    def commit(self, ids, block_length=None):
        """Forward finished tokens at n_past and append their keys/values to the cache.

        block_length None: ids are one block (every token sees every other). Else ids span any
        number of blocks of block_length aligned at position 0 (a token sees its own block and
        every earlier one): a prefill, run as micro-batches of whole blocks (n_batch rows), each
        one forward of the trace and the residency. Bit-identical to one commit per block."""
        self._check_open()
        a = _ids_array(ids)
        if block_length is None:
            n_past = self.n_past
            st = self._lib.tide_commit(self._ctx, _i32_ptr(a), a.size)
            if st != _lib.OK:
                self._fail(st)
            bl = self._block_length or a.size
            self._record(1, n_past // bl, -1, a.size)
            return
        if not isinstance(block_length, (int, np.integer)) or block_length < 1:
            raise ValueError(f"block_length: {block_length!r}, must be an int >= 1")
        B = int(block_length)
        if self.n_past + a.size > self.n_ctx:
            raise TideError(_lib.ERR_CONTEXT, f"context full: {self.n_past} cached + {a.size} "
                                              f"new tokens > n_ctx {self.n_ctx}")
        done = 0
        while done < a.size:
            # one micro-batch per call, so the trace records every forward
            m = self._lib.tide_commit_batch_end(self._ctx, a.size - done, B)
            n_past = self.n_past
            chunk = np.ascontiguousarray(a[done:done + m])
            st = self._lib.tide_commit_blocks(self._ctx, _i32_ptr(chunk), m, B)
            if st != _lib.OK:
                self._fail(st)
            self._record(1, n_past // (self._block_length or B), -1, m)
            done += m

    # ---- the cache across calls -----------------------------------------------------------
    def cache_tokens(self):
        """np.int32[n_past]: the token ids behind the cache."""
        self._check_open()
        out = np.empty(max(self.n_past, 1), dtype=np.int32)
        st = self._lib.tide_cache_tokens(self._ctx, _i32_ptr(out), out.size)
        if st != _lib.OK:
            self._fail(st)
        return out[:self.n_past].copy()

    @property
    def cache_block_length(self):
        """Block length the cached rows were committed under (0 empty, -1 mixed)."""
        self._check_open()
        return self._lib.tide_cache_block_length(self._ctx)

    def truncate(self, n):
        """Keep the first n cached tokens, forget the rest."""
        self._check_open()
        st = self._lib.tide_truncate(self._ctx, int(n))
        if st != _lib.OK:
            self._fail(st)

    def reuse_prefix(self, ids, block_length):
        """Keep the longest prefix of the cache that ids start with, whole blocks of
        block_length only (and only if the cache was committed under that block length); drop
        the rest. Returns how many tokens of ids are already cached. The kept rows are exactly
        what committing ids[:kept] afresh would write."""
        self._check_open()
        a = np.asarray(ids, dtype=np.int64).reshape(-1)
        cached = self.cache_tokens()
        kept = 0
        if cached.size and self.cache_block_length == int(block_length):
            n = min(cached.size, a.size)
            diff = np.nonzero(cached[:n] != a[:n])[0]
            common = int(diff[0]) if diff.size else n
            kept = common // int(block_length) * int(block_length)
        self.truncate(kept)
        return kept

    def save_state(self, path):
        """Write the cache (ids, keys, values) to path atomically; load_state reads it back in
        another process of the same model and build."""
        self._check_open()
        st = self._lib.tide_state_save(self._ctx, os.fspath(path).encode())
        if st != _lib.OK:
            self._fail(st)

    def load_state(self, path):
        """Replace the cache by the one saved in path (refused, with the reason, when it was
        written for another model, build or cache type)."""
        self._check_open()
        st = self._lib.tide_state_load(self._ctx, os.fspath(path).encode())
        if st != _lib.OK:
            self._fail(st)

    def step(self, ids, want, step_in_block, temperature=0.0, top_k=None, top_p=None, seed=0,
             block_length=None):
        """Forward the active block against the cache (the cache is not changed).

        want: bools, one per position: which positions get a token. Returns (tokens int32[n],
        probs float32[n]); positions not wanted get -1 / 0."""
        self._check_open()
        a = _ids_array(ids)
        w = np.ascontiguousarray(np.asarray(want, dtype=bool).reshape(-1)).astype(np.uint8)
        if w.size != a.size:
            raise ValueError(f"want: {w.size} entries for {a.size} ids")
        s = _lib.tide_sampling(float(temperature), int(top_k or 0),
                               float(1.0 if top_p is None else top_p), int(seed) & (2**64 - 1))
        tok = np.empty(a.size, dtype=np.int32)
        prob = np.empty(a.size, dtype=np.float32)
        n_past = self.n_past
        st = self._lib.tide_step(self._ctx, _i32_ptr(a), a.size,
                                 w.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), int(step_in_block),
                                 ctypes.byref(s), _i32_ptr(tok),
                                 prob.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
        if st != _lib.OK:
            self._fail(st)
        bl = block_length or self._block_length or a.size
        self._record(0, n_past // bl, int(step_in_block), a.size)
        return tok, prob

    def logits(self, ids, block_length=32):
        """Block-causal forward of ids from position 0: float32 [len(ids), n_vocab]. Clears
        the cache."""
        self._check_open()
        a = _ids_array(ids)
        _check_int("block_length", block_length)
        out = np.empty((a.size, self.n_vocab), dtype=np.float32)
        st = self._lib.tide_logits(self._ctx, _i32_ptr(a), a.size, int(block_length),
                                   out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
        if st != _lib.OK:
            self._fail(st)
        self._record(2, 0, -1, a.size)
        return out

    # ---- residency ------------------------------------------------------------------------
    def set_residency(self, policy, gpu_experts=None, refresh_interval=4):
        self._check_open()
        policy_id, budget, budgets, interval = self._check_residency(policy, gpu_experts,
                                                                    refresh_interval)
        st = self._lib.tide_set_residency(
            self._ctx, policy_id, budget, _i32_ptr(budgets) if budgets is not None else None,
            len(budgets) if budgets is not None else 0, interval)
        if st != _lib.OK:
            self._fail(st)
        if self.device != "cpu":
            self._policy = policy
        self._refresh_interval = interval

    def set_popularity(self, counts):
        """Popularity profile for `static`: counts [n_moe_layers, n_expert]."""
        self._check_open()
        c = np.ascontiguousarray(np.asarray(counts, dtype=np.float32))
        want = (self.n_moe_layers, self.hparams["n_expert"])
        if c.shape != want:
            raise ValueError(f"popularity: shape {c.shape}, expected {want}")
        if not np.all(np.isfinite(c)) or (c < 0).any():
            raise ValueError("popularity: counts must be finite and >= 0")
        st = self._lib.tide_set_popularity(self._ctx, c.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                           c.size)
        if st != _lib.OK:
            self._fail(st)

    def resident(self, moe_layer):
        """np.bool_[n_expert]: which experts of MoE layer moe_layer (0-based) are resident."""
        self._check_open()
        if not 0 <= moe_layer < self.n_moe_layers:
            raise ValueError(f"moe_layer: {moe_layer} outside 0..{self.n_moe_layers - 1}")
        out = np.zeros(self.hparams["n_expert"], dtype=np.uint8)
        st = self._lib.tide_resident(self._ctx, int(moe_layer),
                                     out.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), out.size)
        if st != _lib.OK:
            self._fail(st)
        return out.astype(bool)

    # ---- counters and trace ---------------------------------------------------------------
    def stats(self):
        self._check_open()
        s = _lib.tide_stats()
        self._lib.tide_get_stats(self._ctx, ctypes.byref(s))
        out = _lib.struct_dict(s)
        per = []
        for i in range(self.n_moe_layers):
            ls = _lib.tide_layer_stats()
            st = self._lib.tide_get_layer_stats(self._ctx, i, ctypes.byref(ls))
            if st != _lib.OK:
                self._fail(st)
            d = _lib.struct_dict(ls)
            d["layer"] = self.moe_layers[i]
            per.append(d)
        out["per_layer"] = per
        out["policy"] = self._policy
        out["refresh_interval"] = self._refresh_interval
        out["budgets"] = [d["budget"] for d in per]  # the core's budget rule, not a copy
        out["device"] = self.device
        return out

    def reset_stats(self):
        self._check_open()
        self._lib.tide_stats_reset(self._ctx)

    def trace(self):
        """The routing trace (CONTRACTS.md section 4) as a dict of numpy arrays."""
        if not self._trace_on:
            raise ValueError("trace: the model was opened without trace=True")
        t = self._trace
        E = self.hparams["n_expert"]
        hits = (np.stack(t["hits"]) if t["hits"]
                else np.zeros((0, self.n_moe_layers, E), dtype=np.int32))
        return {
            "hits": hits.astype(np.int32),
            "kind": np.asarray(t["kind"], dtype=np.int8),
            "block": np.asarray(t["block"], dtype=np.int32),
            "step": np.asarray(t["step"], dtype=np.int32),
            "n_tokens": np.asarray(t["n_tokens"], dtype=np.int32),
            "expert_bytes": np.int64(self.hparams["expert_bytes"]),
            "nonexpert_bytes": np.int64(self.hparams["nonexpert_bytes"]),
            "n_expert": np.int32(E),
            "moe_layers": np.asarray(self.moe_layers, dtype=np.int32),
            "block_length": np.int32(self._block_length or self._guess_block_length()),
        }

    def _guess_block_length(self):
        """Without set_block_length: the size of the steps' active block (full blocks), or 32."""
        t = self._trace
        sizes = [n for k, n in zip(t["kind"], t["n_tokens"]) if k == 0]
        return max(sizes) if sizes else 32

    def clear_trace(self):
        for v in self._trace.values():
            v.clear()

    def save_trace(self, path):
        np.savez(path, **self.trace())

    def set_block_length(self, block_length):
        """Tell the trace the block length generation uses (block = position // block_length)."""
        self._block_length = int(block_length)

    # ---- user methods, delegated ----------------------------------------------------------
    @property
    def tokenizer(self):
        """The GGUF's tokenizer (tide_cpp.tokenizer.Tokenizer): the embedded tokenizer.json, or
        the byte-level BPE rebuilt from its GGML token and merge lists."""
        if getattr(self, "_tok", None) is None:
            from .tokenizer import Tokenizer
            self._tok = Tokenizer.from_model(self)
        return self._tok

    def tokenize(self, text, add_special=False):
        return self.tokenizer.tokenize(text, add_special=add_special)

    def detokenize(self, ids):
        return self.tokenizer.detokenize(ids)

    def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs):
        from .tokenizer import ChatTemplate
        if getattr(self, "_chat_template", None) is None:
            self._chat_template = ChatTemplate.from_model(self)
        return self._chat_template.render(messages, add_generation_prompt=add_generation_prompt,
                                          **kwargs)

    def generate(self, prompt_or_ids, **kwargs):
        """tide_cpp.generation.generate on this model (editing_threshold=E, max_post_steps=N:
        LLaDA2.1's token-to-token editing)."""
        from . import generation
        return generation.generate(self, prompt_or_ids, **kwargs)

    def create_chat_completion(self, messages, **kwargs):
        from . import chat
        return chat.create_chat_completion(self, messages, **kwargs)

    # ---- lifetime -------------------------------------------------------------------------
    def close(self):
        if getattr(self, "_ctx", None) is not None:
            self._lib.tide_context_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None) is not None:
            self._lib.tide_model_free(self._model)
            self._model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
