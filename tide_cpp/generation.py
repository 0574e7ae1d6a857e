"""Block-diffusion generation: the released LLaDA2.0 and LLaDA2.1 `generate()` schedules on the
engine's step interface, with a KV cache of finished blocks (docs/GENERATION.md).

The core runs forwards; this module decides which tokens to unmask (and, for 2.1, to edit):

- Canvas = prompt + masks up to a multiple of block_length B covering prompt + max_tokens;
  blocks aligned at position 0.
- Prefill: the blocks the prompt fills completely go into the cache. A model that remembers the
  ids behind its cache (`reuse_prefix`) keeps the longest block-aligned prefix an earlier call
  left there and commits the rest in one multi-block `model.commit(ids, block_length=B)`;
  the rows are bit-identical to a fresh prefill, so the answer is the same.
- Decoding starts at the block holding the prompt's end. Each forward of a block is a *step*:
  `model.step(block ids, want, step_in_block=i, ...)` gives (token, prob) at the wanted
  positions. What a step commits is the block's *rule*:
  - `LowConfidence` (LLaDA2.0, editing_threshold None): want = the masked positions. Commit
    every mask with prob > threshold if there are at least schedule[i] of them, else the
    schedule[i] most confident (ties: lower position). schedule = B // steps tokens a step, the
    first B % steps steps one more; steps is first capped at max_tokens // minimal_topk, as
    released. The block ends when no mask is left (at most `steps` forwards).
  - `JointThreshold` (LLaDA2.1, editing_threshold E): want = every non-prompt position of the
    block. Unmask every mask with prob > threshold, or else the single most confident one;
    and *edit*: replace every already-filled, non-prompt token whose prediction differs from it
    with prob > E. Once no mask is left, each further forward is a post step; the block ends
    when a forward changes nothing, or before the forward that would exceed max_post_steps, and
    never takes more than B + max_post_steps + 1 forwards. `steps` and minimal_topk are not
    used. Prompt positions and earlier blocks are never edited.
- A finished block is committed to the cache (`model.commit`, a forward over its final tokens)
  and the next begins; the last block, and a block that ends generation, are not committed
  (nothing reads them).
- End of generation: the model's end-of-generation tokens (`<|endoftext|>`, `<|role_end|>`, ...:
  `tide_cpp.tokenizer.end_of_generation_ids`). 2.0 with eos_early_stop: when a step commits one
  and no mask precedes the first of the answer, stop. Both: after a finished block holding one,
  stop (later blocks cannot change the answer).
- The answer: generated ids before the first end-of-generation token, at most max_tokens.

`tests/reference_generate.py` (2.0) and `tests/reference_generate_editing.py` (2.1) are the same
algorithms without a cache; greedy runs agree token for token. Sampling (temperature > 0, top_k,
top_p) happens in the core; the seed of each step is derived from (seed, block, step), so a seed
reproduces a run exactly. With a model whose policy is "auto", the planner sets the residency
after the first block (`_plan_auto`).
"""

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Generation", "StepInfo", "Stream", "generate", "stream", "check_params", "PRESETS"]

_MASK64 = (1 << 64) - 1

# LLaDA2.1's decoding presets from its model card (threshold / editing threshold; both with
# block 32 and at most 16 post steps). 2.0 models keep editing_threshold None.
PRESETS = {
    "quality": dict(threshold=0.7, editing_threshold=0.5, max_post_steps=16, block_length=32),
    "speed": dict(threshold=0.5, editing_threshold=0.0, max_post_steps=16, block_length=32),
}


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
    """What `on_step` sees after every denoising step (one forward of the active block).

    A position changes in a step in one of two ways: *unmasked* (`committed`: a mask became a
    token) or, with editing (LLaDA2.1), *edited* (`edited`: a token became another token;
    `replaced` holds what was there). A live canvas can draw both from this alone."""

    block: int              # absolute index of the active block (position // block_length)
    step: int               # step within the block, from 0
    block_start: int        # position of the block's first token
    block_length: int
    prompt_length: int
    canvas: np.ndarray      # int32 ids of positions 0 .. end of the active block (masks included)
    committed: np.ndarray   # absolute positions unmasked by this step
    probs: np.ndarray       # their probabilities
    n_masked: int           # masks left in the active block
    mask_token_id: int
    eos_token_id: int
    max_tokens: int
    edited: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    # absolute positions whose token this step replaced (editing only)
    edited_probs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    replaced: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    # the tokens the edits replaced, one per `edited` position
    eog_token_ids: frozenset = frozenset()  # every token that ends the answer (EOS included)
    post_step: bool = False  # editing: a step taken after the block had no mask left

    def changes(self):
        """This step's changes as plain values, in position order (ready for JSON): dicts
        {position, token, prob, replaced}; replaced is None for an unmasked position and the
        previous token for an edited one."""
        out = [{"position": int(q), "token": int(self.canvas[q]), "prob": float(pr),
                "replaced": None} for q, pr in zip(self.committed, self.probs)]
        out += [{"position": int(q), "token": int(self.canvas[q]), "prob": float(pr),
                 "replaced": int(r)}
                for q, pr, r in zip(self.edited, self.edited_probs, self.replaced)]
        return sorted(out, key=lambda c: c["position"])


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
                 seed=None, on_step=None, editing_threshold=None, max_post_steps=16):
    """Validate and normalize the arguments of `generate`; raise ValueError naming the first bad
    one. Returns (prompt ids, dict of parameters). Nothing is computed."""
    if not _is_int(block_length) or block_length <= 0:
        raise ValueError(f"block_length must be a positive integer, got {block_length!r}")
    if not _is_int(steps) or steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if steps > block_length and editing_threshold is None:   # the 2.1 loop has no step count
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
    if editing_threshold is not None and (not _is_num(editing_threshold)
                                          or not 0.0 <= float(editing_threshold) <= 1.0):
        raise ValueError(f"editing_threshold must be in [0, 1] (or None: no editing, the "
                         f"LLaDA2.0 schedule), got {editing_threshold!r}")
    if not _is_int(max_post_steps) or max_post_steps < 0:
        raise ValueError(f"max_post_steps must be an integer >= 0, got {max_post_steps!r}")

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
                  seed=int(seed), sampling=sampling, on_step=on_step,
                  editing_threshold=(None if editing_threshold is None
                                     else float(editing_threshold)),
                  max_post_steps=int(max_post_steps))
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


# ---- the rules: what one step of a block commits ---------------------------------------------


class LowConfidence:
    """LLaDA2.0's rule: unmask by threshold, at least the schedule's count; no editing."""

    in_step_eos_check = True   # the released 2.0 loop stops mid-block on a committed EOS
    post_step = False          # every step has a mask to fill

    def __init__(self, p, mask_id, block, n_prompt):
        self.mask_id = mask_id
        self.threshold = p["threshold"]
        self.schedule = num_transfer_tokens(p["block_length"], p["steps"])
        self.finished = False

    def want(self, block, i):
        """The positions to predict at step i, or None when the block is finished."""
        masked = block == self.mask_id
        if i >= len(self.schedule) or not masked.any():
            return None
        return masked

    def apply(self, block, i, tokens, probs):
        """Write step i's choices into block; (unmasked positions, edited positions, the tokens
        the edits replaced)."""
        pos = np.nonzero(block == self.mask_id)[0]
        conf = probs[pos]
        high = pos[conf > self.threshold]
        if len(high) >= self.schedule[i]:
            chosen = high
        else:                                           # most confident first, ties: position
            k = min(self.schedule[i], len(pos))
            chosen = np.sort(pos[np.argsort(-conf, kind="stable")[:k]])
        block[chosen] = tokens[chosen]
        return chosen, _NONE, _NONE_TOK


class JointThreshold:
    """LLaDA2.1's rule (SGLang's JointThreshold): unmask by threshold (at least one), and edit
    any filled, non-prompt token whose prediction changed with prob > editing_threshold; post
    steps once no mask is left, until a step changes nothing."""

    in_step_eos_check = False  # the released 2.1 loop checks for EOS only after a block

    def __init__(self, p, mask_id, block, n_prompt):
        self.mask_id = mask_id
        self.threshold = p["threshold"]
        self.editing_threshold = p["editing_threshold"]
        self.max_post_steps = p["max_post_steps"]
        self.max_forwards = len(block) + self.max_post_steps + 1   # SGLang's cap
        self.editable = np.arange(len(block)) >= n_prompt          # prompt: never predicted
        self.post = 0
        self.post_step = False
        self.finished = False

    def want(self, block, i):
        if self.finished or i >= self.max_forwards:
            return None
        self.post_step = not (block == self.mask_id).any()
        if self.post_step:
            self.post += 1
            if self.post > self.max_post_steps:
                return None
        return self.editable

    def apply(self, block, i, tokens, probs):
        masked = block == self.mask_id
        sel = np.nonzero(masked & (probs > self.threshold))[0]
        if not len(sel) and masked.any():               # the single most confident mask
            pos = np.nonzero(masked)[0]
            sel = pos[np.argmax(probs[pos])[None]]
        edit = np.nonzero(~masked & self.editable & (probs > self.editing_threshold)
                          & (tokens != block))[0]
        replaced = block[edit].copy()
        block[sel] = tokens[sel]
        block[edit] = tokens[edit]
        if not masked.any() and not len(edit):          # stable: the block is final
            self.finished = True
        return sel, edit, replaced


_NONE = np.zeros(0, np.int64)
_NONE_TOK = np.zeros(0, np.int32)


def _rule(p):
    return LowConfidence if p["editing_threshold"] is None else JointThreshold


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
        from .tokenizer import end_of_generation_ids

        m, p = self.model, self.p
        B, P, limit = p["block_length"], len(self.ids), p["max_tokens"]
        mask_id, eos_id = int(m.mask_token_id), int(m.eos_token_id)
        eog = end_of_generation_ids(m)
        eog_arr = np.fromiter(sorted(eog), dtype=np.int64)
        rule_of = _rule(p)
        n_blocks = (P + limit + B - 1) // B
        canvas = np.full(n_blocks * B, mask_id, dtype=np.int32)
        canvas[:P] = self.ids
        on_step = p["on_step"]
        t0 = time.perf_counter()

        def first_eog():   # absolute position of the answer's first end-of-generation token
            at = np.nonzero(np.isin(canvas[P:], eog_arr))[0]
            return P + int(at[0]) if len(at) else None

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

        c = dict(steps=0, commits=0, blocks=0, edits=0, post_steps=0)
        first_eos = None
        planned = False
        stop = False
        for blk in range(P // B, n_blocks):
            start, end = blk * B, (blk + 1) * B
            block = canvas[start:end]                   # a view: commits write the canvas
            c["blocks"] += 1
            rule = rule_of(p, mask_id, block, max(0, P - start))
            i = 0
            while True:
                want = rule.want(block, i)
                if want is None:
                    break
                seed = step_seed(p["seed"], blk, i) if p["sampling"] else 0
                tokens, probs = m.step(block, want, i, temperature=p["temperature"],
                                       top_k=p["top_k"], top_p=p["top_p"], seed=seed)
                tokens = np.asarray(tokens)
                probs = np.asarray(probs, dtype=np.float32)
                post = rule.post_step     # read before apply() fills the last masks
                chosen, edited, replaced = rule.apply(block, i, tokens, probs)
                c["steps"] += 1
                c["edits"] += len(edited)
                c["post_steps"] += post
                if on_step is not None:
                    on_step(StepInfo(blk, i, start, B, P, canvas[:end].copy(), chosen + start,
                                     probs[chosen], int((block == mask_id).sum()), mask_id,
                                     eos_id, limit, edited + start, probs[edited], replaced,
                                     eog, post))
                i += 1
                if rule.in_step_eos_check and np.isin(block[chosen], eog_arr).any():
                    first_eos = first_eog()
                    if p["eos_early_stop"] and not (canvas[P:first_eos] == mask_id).any():
                        stop = True
                        break
                if rule.finished:
                    break
            first_eos = first_eog()                     # edits may have moved or removed it
            stop = stop or first_eos is not None or blk == n_blocks - 1
            if not stop:
                m.commit(block)
                c["commits"] += 1
            if not planned and getattr(m, "policy", None) == "auto":
                planned = True
                _plan_auto(m)
            answer_end = min(P + limit, end if first_eos is None else first_eos)
            answer = [int(t) for t in canvas[P:answer_end]]
            if stop:
                self.done = True
                self.result = self._finish(answer, first_eos, c, t0, t_prefill)
            yield answer
            if stop:
                return

    def _finish(self, answer, first_eos, c, t0, t_prefill):
        p = self.p
        seconds = time.perf_counter() - t0
        eos = first_eos is not None and first_eos - len(self.ids) < p["max_tokens"]
        n_steps = c["steps"]
        stats = {
            "prompt_tokens": len(self.ids),
            "tokens": len(answer),
            "blocks": c["blocks"],
            "steps": n_steps,
            "commits": c["commits"],
            "tokens_per_forward": len(answer) / n_steps if n_steps else 0.0,
            "seconds": seconds,
            "prefill_seconds": t_prefill,
            "prompt_tokens_reused": self.reused,
            "tokens_per_second": len(answer) / seconds if seconds > 0 else 0.0,
            "block_length": p["block_length"],
            "steps_per_block": p["steps"],
            "threshold": p["threshold"],
        }
        if p["editing_threshold"] is not None:
            stats.update(editing_threshold=p["editing_threshold"],
                         max_post_steps=p["max_post_steps"], edits=c["edits"],
                         post_steps=c["post_steps"])
        if p["sampling"]:
            stats["seed"] = p["seed"]
        return Generation(text=self.text_of(answer), tokens=answer,
                          finish_reason="stop" if eos else "length", stats=stats,
                          prompt_tokens=len(self.ids))


def _plan_auto(model):
    # policy="auto": after the first block, the planner (tide_cpp/planner.py)
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
             seed=None, on_step=None, editing_threshold=None, max_post_steps=16):
    """Generate an answer to `prompt` (text, or token ids) on `model`; returns a `Generation`.

    max_tokens: longest answer (None: up to the end of the context). block_length, steps:
    the block size and the denoising steps per block (steps <= block_length). threshold:
    commit every masked position more likely than this in one step (0, 1]. temperature, top_k,
    top_p: sampling (temperature 0 and no filter: greedy); seed makes it reproducible.
    minimal_topk: steps are capped at max_tokens // minimal_topk. eos_early_stop: stop as soon
    as an end-of-generation token is committed with nothing masked before it.
    editing_threshold: LLaDA2.1's decoding (token-to-token editing) in [0, 1]: filled tokens
    whose prediction changed with a probability above it are replaced; None (the default) is
    LLaDA2.0's schedule. max_post_steps: with editing, the forwards allowed after a block has no
    mask left. With editing, steps and minimal_topk are not used, and stats gains `edits` and
    `post_steps`. `PRESETS` holds the model card's settings. on_step(StepInfo) after every step.
    Bad arguments raise ValueError, naming the argument, before anything runs."""
    ids, p = check_params(model, prompt, max_tokens, block_length, steps, threshold,
                          temperature, top_k, top_p, minimal_topk, eos_early_stop, seed, on_step,
                          editing_threshold, max_post_steps)
    d = _Decoder(model, ids, p)
    for _ in d.run():
        pass
    return d.result


def stream(model, prompt, max_tokens=256, block_length=32, steps=32, threshold=0.95,
           temperature=0.0, top_k=None, top_p=None, minimal_topk=1, eos_early_stop=True,
           seed=None, on_step=None, editing_threshold=None, max_post_steps=16):
    """As `generate`, but returns a `Stream`: iterate it for the answer's text one finished
    block at a time; `.generation` holds the result afterwards. Arguments are checked now,
    the work happens while iterating."""
    ids, p = check_params(model, prompt, max_tokens, block_length, steps, threshold,
                          temperature, top_k, top_p, minimal_topk, eos_early_stop, seed, on_step,
                          editing_threshold, max_post_steps)
    return Stream(_Decoder(model, ids, p))
