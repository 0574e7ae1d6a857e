"""Block-diffusion generation: the released LLaDA2.0 `generate()` schedule on the engine's step
interface, with a KV cache of finished blocks (../shared/LLADA2.md section 4).

The core runs forwards; this module decides which tokens to unmask:

- Canvas = prompt + masks up to a multiple of block_length B covering prompt + max_tokens;
  blocks aligned at position 0.
- Prefill: the blocks the prompt fills completely go into the cache. A model that remembers the
  ids behind its cache (`reuse_prefix`) keeps the longest block-aligned prefix an earlier call
  left there and commits the rest in one multi-block `model.commit(ids, block_length=B)`;
  the rows are bit-identical to a fresh prefill, so the answer is the same.
- Decoding starts at the block holding the prompt's end. Step i of a block:
  `model.step(block ids, want = masked positions, step_in_block=i, ...)` gives (token, prob) at
  every masked position. Commit every masked position with prob > threshold if there are at
  least schedule[i] of them, else the schedule[i] most confident (ties: lower position).
  schedule = B // steps tokens a step, the first B % steps steps one more; steps is first capped
  at max_tokens // minimal_topk, as released.
- A block with no mask left is committed to the cache (`model.commit`) and the next begins;
  the last block, and a block that ends generation, are not committed (nothing reads them).
- eos_early_stop: when a step commits an EOS and no mask precedes the first EOS of the answer,
  stop. After any finished block holding an EOS, stop (later blocks cannot change it).
- The answer: generated ids before the first EOS, at most max_tokens.

`tests/reference_generate.py` is the same algorithm without a cache; greedy runs agree token for
token. Sampling (temperature > 0, top_k, top_p) happens in the core; the seed of each step is
derived from (seed, block, step), so a seed reproduces a run exactly. With a model whose
policy is "auto", the planner sets the residency after the first block (`_plan_auto`).
"""

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Generation", "StepInfo", "Stream", "generate", "stream", "check_params"]

_MASK64 = (1 << 64) - 1


@dataclass
class Generation:
    """The result of `generate`."""

    text: str
    tokens: list            # generated ids after the prompt, before the first EOS, <= max_tokens
    finish_reason: str      # "stop" (an EOS ended it) or "length" (max_tokens or the context)
    stats: dict = field(default_factory=dict)
    prompt_tokens: int = 0


@dataclass
class StepInfo:
    """What `on_step` sees after every denoising step."""

    block: int              # absolute index of the active block (position // block_length)
    step: int               # step within the block, from 0
    block_start: int        # position of the block's first token
    block_length: int
    prompt_length: int
    canvas: np.ndarray      # int32 ids of positions 0 .. end of the active block (masks included)
    committed: np.ndarray   # absolute positions committed by this step
    probs: np.ndarray       # their probabilities
    n_masked: int           # masks left in the active block
    mask_token_id: int
    eos_token_id: int
    max_tokens: int


class Stream:
    """Iterates the answer's text one finished block at a time (str deltas, never empty).
    After the iteration, `.generation` holds the full `Generation`. `close()` stops early."""

    def __init__(self, decoder):
        self._decoder = decoder
        self._it = None
        self.generation = None
        self.tokens = []        # the answer's tokens so far (all of them once finished)
        self.prompt_tokens = len(decoder.ids)

    def __iter__(self):
        if self._it is None:
            self._it = self._deltas()
        return self._it

    def _deltas(self):
        d = self._decoder
        emitted = ""
        for tokens in d.run():
            self.tokens = tokens
            text = d.text_of(tokens)
            if d.done:   # the last block: everything, replacement chars included
                delta = text[len(emitted):] if text.startswith(emitted) else ""
            else:        # hold back a trailing incomplete UTF-8 sequence
                stable = text.rstrip("\ufffd")
                delta = stable[len(emitted):] if stable.startswith(emitted) else ""
            if delta:
                emitted += delta
                yield delta
        self.generation = d.result

    def close(self):
        if self._it is not None:
            self._it.close()


# ---- parameters ------------------------------------------------------------------------------


def _is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v):
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _n_ctx(model):
    n = getattr(model, "n_ctx", None)
    return int(n() if callable(n) else n)


def check_params(model, prompt, max_tokens=256, block_length=32, steps=32, threshold=0.95,
                 temperature=0.0, top_k=None, top_p=None, minimal_topk=1, eos_early_stop=True,
                 seed=None, on_step=None):
    """Validate and normalize the arguments of `generate`; raise ValueError naming the first bad
    one. Returns (prompt ids, dict of parameters). Nothing is computed."""
    if not _is_int(block_length) or block_length <= 0:
        raise ValueError(f"block_length must be a positive integer, got {block_length!r}")
    if not _is_int(steps) or steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if steps > block_length:
        raise ValueError(f"steps ({steps}) must not exceed block_length ({block_length}): a "
                         "step commits at least one token")
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens <= 0):
        raise ValueError(f"max_tokens must be a positive integer (or None), got {max_tokens!r}")
    if not _is_num(threshold) or not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    if not _is_num(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        raise ValueError(f"top_k must be an integer >= 0 (0 or None: off), got {top_k!r}")
    if top_p is not None and (not _is_num(top_p) or not 0.0 < float(top_p) <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] (or None: off), got {top_p!r}")
    if not _is_int(minimal_topk) or minimal_topk <= 0:
        raise ValueError(f"minimal_topk must be a positive integer, got {minimal_topk!r}")
    if seed is not None and (not _is_int(seed) or not 0 <= seed <= _MASK64):
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    if on_step is not None and not callable(on_step):
        raise ValueError("on_step must be callable")

    if isinstance(prompt, str):
        ids = list(model.tokenize(prompt))
    elif isinstance(prompt, (bytes, bytearray)) or prompt is None:
        raise ValueError("prompt must be a str or a sequence of token ids")
    else:
        try:
            ids = [int(t) for t in prompt]
        except (TypeError, ValueError):
            raise ValueError("prompt must be a str or a sequence of token ids") from None
        n_vocab = getattr(model, "n_vocab", None)
        bad = [t for t in ids if t < 0 or (n_vocab is not None and t >= n_vocab)]
        if bad:
            raise ValueError(f"prompt: token id {bad[0]} out of range [0, {n_vocab})")

    B = int(block_length)
    P = len(ids)
    usable = (_n_ctx(model) // B) * B  # the canvas is whole blocks
    if P // B >= usable // B:
        raise ValueError(f"prompt: {P} tokens leave no room in the context of {_n_ctx(model)} "
                         f"tokens (blocks of {B})")
    room = usable - P
    limit = room if max_tokens is None else min(int(max_tokens), room)
    sampling = float(temperature) > 0 or bool(top_k) or (top_p is not None and top_p < 1.0)
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") if sampling else 0
    params = dict(max_tokens=limit, requested_max_tokens=max_tokens, block_length=B,
                  steps=max(1, min(int(steps), limit // int(minimal_topk))),
                  threshold=float(threshold), temperature=float(temperature),
                  top_k=int(top_k) if top_k else None,
                  top_p=float(top_p) if top_p is not None and top_p < 1.0 else None,
                  minimal_topk=int(minimal_topk), eos_early_stop=bool(eos_early_stop),
                  seed=int(seed), sampling=sampling, on_step=on_step)
    return ids, params


def num_transfer_tokens(block_length, steps):
    """Tokens committed at each step of a block: B // steps, the first B % steps one more."""
    base, extra = divmod(block_length, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def _splitmix64(x):
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_seed(seed, block, step):
    """The core's seed for one step: a pure function of (seed, block, step). The core then
    draws each position from (this seed, position in block)."""
    return _splitmix64(_splitmix64(_splitmix64(seed) ^ block) ^ (step + (1 << 32)))


# ---- the schedule ----------------------------------------------------------------------------


class _Decoder:
    """One generation: state, the schedule as a generator of finished blocks, the result."""

    def __init__(self, model, prompt_ids, p):
        self.model = model
        self.ids = prompt_ids
        self.p = p
        self.done = False
        self.result = None

    def text_of(self, tokens):
        if not tokens:
            return ""
        from .tokenizer import tokenizer_of
        # special tokens (<|role_end|>, ...) are not part of the answer's text
        return tokenizer_of(self.model).decode(tokens, skip_special=True)

    def run(self):
        """Yield the answer's tokens so far after every finished block; the last yield has
        `self.done` set and `self.result` the Generation."""
        m, p = self.model, self.p
        B, P, limit = p["block_length"], len(self.ids), p["max_tokens"]
        mask_id, eos_id = int(m.mask_token_id), int(m.eos_token_id)
        schedule = num_transfer_tokens(B, p["steps"])
        n_blocks = (P + limit + B - 1) // B
        canvas = np.full(n_blocks * B, mask_id, dtype=np.int32)
        canvas[:P] = self.ids
        on_step = p["on_step"]
        t0 = time.perf_counter()

        if hasattr(m, "set_block_length"):  # the trace's block index is position // B
            m.set_block_length(B)
        full = P // B * B                               # the blocks the prompt fills
        if hasattr(m, "reuse_prefix"):
            # the cache of an earlier call serves the common prefix; one multi-block commit
            # prefills the rest
            reused = m.reuse_prefix(canvas[:full], B)
            if reused < full:
                m.commit(canvas[reused:full], block_length=B)
        else:
            reused = 0
            m.reset()
            for blk in range(P // B):                   # one commit per full block
                m.commit(canvas[blk * B:(blk + 1) * B])
        self.reused = reused
        t_prefill = time.perf_counter() - t0

        n_steps = n_commits = n_blocks_done = 0
        first_eos = None   # absolute position of the answer's first EOS (>= P)
        planned = False
        stop = False
        for blk in range(P // B, n_blocks):
            start, end = blk * B, (blk + 1) * B
            block = canvas[start:end]                   # a view: commits write the canvas
            n_blocks_done += 1
            for i in range(p["steps"]):
                masked = block == mask_id
                if not masked.any():
                    break
                seed = step_seed(p["seed"], blk, i) if p["sampling"] else 0
                tokens, probs = m.step(block, masked, i, temperature=p["temperature"],
                                       top_k=p["top_k"], top_p=p["top_p"], seed=seed)
                n_steps += 1
                tokens = np.asarray(tokens)
                probs = np.asarray(probs, dtype=np.float32)
                pos = np.nonzero(masked)[0]
                conf = probs[pos]
                high = pos[conf > p["threshold"]]
                if len(high) >= schedule[i]:
                    chosen = high
                else:                                   # most confident first, ties: position
                    k = min(schedule[i], len(pos))
                    chosen = np.sort(pos[np.argsort(-conf, kind="stable")[:k]])
                block[chosen] = tokens[chosen]
                if on_step is not None:
                    on_step(StepInfo(blk, i, start, B, P, canvas[:end].copy(), chosen + start,
                                     probs[chosen], int((block == mask_id).sum()), mask_id,
                                     eos_id, limit))
                if (block[chosen] == eos_id).any():
                    eos_at = np.nonzero(canvas[P:] == eos_id)[0]
                    first_eos = P + int(eos_at[0])
                    if p["eos_early_stop"] and not (canvas[P:first_eos] == mask_id).any():
                        stop = True
                        break
            stop = stop or first_eos is not None or blk == n_blocks - 1
            if not stop:
                m.commit(block)
                n_commits += 1
            if not planned and getattr(m, "policy", None) == "auto":
                planned = True
                _plan_auto(m)
            answer_end = min(P + limit, end if first_eos is None else first_eos)
            answer = [int(t) for t in canvas[P:answer_end]]
            if stop:
                self.done = True
                self.result = self._finish(answer, first_eos, n_blocks_done, n_steps,
                                           n_commits, t0, t_prefill)
            yield answer
            if stop:
                return

    def _finish(self, answer, first_eos, n_blocks, n_steps, n_commits, t0, t_prefill):
        p = self.p
        seconds = time.perf_counter() - t0
        eos = first_eos is not None and first_eos - len(self.ids) < p["max_tokens"]
        stats = {
            "prompt_tokens": len(self.ids),
            "tokens": len(answer),
            "blocks": n_blocks,
            "steps": n_steps,
            "commits": n_commits,
            "tokens_per_forward": len(answer) / n_steps if n_steps else 0.0,
            "seconds": seconds,
            "prefill_seconds": t_prefill,
            "prompt_tokens_reused": self.reused,
            "tokens_per_second": len(answer) / seconds if seconds > 0 else 0.0,
            "block_length": p["block_length"],
            "steps_per_block": p["steps"],
            "threshold": p["threshold"],
        }
        if p["sampling"]:
            stats["seed"] = p["seed"]
        return Generation(text=self.text_of(answer), tokens=answer,
                          finish_reason="stop" if eos else "length", stats=stats,
                          prompt_tokens=len(self.ids))


def _plan_auto(model):
    # policy="auto": after the first block, the planner (tide_cpp/planner.py, its own issue)
    # picks the refresh interval and per-layer budgets from the routing trace so far, and the
    # rest of the answer runs as `tide` with them. Skipped when this build has no planner; a
    # planner that cannot plan (no hardware profile) leaves the policy as it is, with a warning.
    try:
        from tide_cpp.planner import plan_auto
    except ImportError:
        return
    import warnings
    try:
        interval, budgets = plan_auto(model, model.trace())
    except (ValueError, OSError) as e:
        warnings.warn(f"policy auto: no plan ({e}); residency left as it is", RuntimeWarning)
        return
    model.set_residency("tide", budgets, interval)


# ---- entry points ----------------------------------------------------------------------------


def generate(model, prompt, max_tokens=256, block_length=32, steps=32, threshold=0.95,
             temperature=0.0, top_k=None, top_p=None, minimal_topk=1, eos_early_stop=True,
             seed=None, on_step=None):
    """Generate an answer to `prompt` (text, or token ids) on `model`; returns a `Generation`.

    max_tokens: longest answer (None: up to the end of the context). block_length, steps:
    the block size and the denoising steps per block (steps <= block_length). threshold:
    commit every masked position more likely than this in one step (0, 1]. temperature, top_k,
    top_p: sampling (temperature 0 and no filter: greedy); seed makes it reproducible.
    minimal_topk: steps are capped at max_tokens // minimal_topk. eos_early_stop: stop as soon
    as an EOS is committed with nothing masked before it. on_step(StepInfo) after every step.
    Bad arguments raise ValueError, naming the argument, before anything runs."""
    ids, p = check_params(model, prompt, max_tokens, block_length, steps, threshold,
                          temperature, top_k, top_p, minimal_topk, eos_early_stop, seed, on_step)
    d = _Decoder(model, ids, p)
    for _ in d.run():
        pass
    return d.result


def stream(model, prompt, max_tokens=256, block_length=32, steps=32, threshold=0.95,
           temperature=0.0, top_k=None, top_p=None, minimal_topk=1, eos_early_stop=True,
           seed=None, on_step=None):
    """As `generate`, but returns a `Stream`: iterate it for the answer's text one finished
    block at a time; `.generation` holds the result afterwards. Arguments are checked now,
    the work happens while iterating."""
    ids, p = check_params(model, prompt, max_tokens, block_length, steps, threshold,
                          temperature, top_k, top_p, minimal_topk, eos_early_stop, seed, on_step)
    return Stream(_Decoder(model, ids, p))
