"""PyTorch reference of LLaDA2.0's released `generate()` (block diffusion), on `reference.forward`.

The oracle for `tide_cpp/generation.py`. Written from docs/GENERATION.md and the
released `LLaDA2MoeModelLM.generate` / `_sample_with_temperature_topk_topp`. Like the released
code it keeps **no cache**: every step re-runs the whole window (prompt + blocks so far) with the
block-causal mask, which is what the cached engine must reproduce token for token.

The algorithm, and the choices made where the released code is loose:

- `steps = min(steps, gen_length // minimal_topk)`, as released (minimal_topk caps the number
  of steps for short answers). Released code divides by zero when gen_length < minimal_topk;
  here steps is kept >= 1.
- Canvas = prompt + `mask_id` up to a multiple of `block_length` covering prompt + gen_length;
  blocks aligned at position 0. Blocks the prompt fills completely are not decoded (prefill);
  decoding starts at the block holding the prompt's end (it may hold prompt tokens).
- Schedule: `block_length // steps` tokens a step, the first `block_length % steps` steps one
  more. Step i of every block uses schedule[i], also in the first, partly-prompt block.
- Each step: forward the window, take (token, prob) at every position of the active block
  (`sample_tokens`), confidence = prob at masked positions, -inf elsewhere. If at least
  schedule[i] masked positions have confidence `> threshold`, commit exactly those; else commit
  the top min(schedule[i], n_masked) by confidence (torch.topk). At most `steps` steps a block;
  the block is done when no mask is left (the schedule sums to block_length, so it always is).
- eos_early_stop, as released: when a step commits an EOS, find the first EOS of the generated
  part; if no mask precedes it, stop. The released code searches the whole canvas, prompt
  included (a prompt holding an EOS would end generation before it starts); here only the
  generated part (positions >= prompt length) is searched.
- After a finished block, if the generated part up to the block's end holds an EOS, stop (as
  released, with or without eos_early_stop: later blocks cannot change earlier tokens).
- The answer: generated positions prompt_len .. prompt_len + gen_length, cut before the first
  EOS (the EOS itself excluded, unlike the released return value which keeps it).
- Sampling (`sample_tokens`) is `_sample_with_temperature_topk_topp`: logits / temperature
  (when > 0 and != 1), top-k (ties at the k-th value kept), top-p (keep the smallest prefix of
  the sorted distribution whose mass reaches top_p, the first token always kept), softmax;
  temperature 0 takes the argmax (first index of the max) of that distribution, else one
  `torch.multinomial` draw; the prob is the chosen token's prob in that same distribution.
  At temperature 0 with no filter this is the greedy token and its plain softmax prob.

`ReferenceModel` exposes the engine's step interface (CONTRACTS.md section 5) on top of
`reference.forward`, recomputing the whole window at each call: `tide_cpp.generation` run on it
must equal `generate` here exactly, and the CLI tests can use it without the native library.
"""

import hashlib

import numpy as np
import torch
import torch.nn.functional as F

import reference

# The tiny models are far too small for threads to pay: one thread is ~50x faster than two on a
# loaded machine.
torch.set_num_threads(1)


# ---- sampling --------------------------------------------------------------------------------


def top_k_logits(logits, k):
    """Keep the logits >= the k-th largest (ties kept), -inf elsewhere. k None or <= 0: all."""
    if k is None or k <= 0:
        return logits
    k = min(int(k), logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1)[0][..., -1:]
    return torch.where(logits < kth, torch.full_like(logits, float("-inf")), logits)


def top_p_logits(logits, p):
    """Nucleus filter: drop a token once the mass of the tokens sorted before it exceeds p."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    drop_sorted = cum > p
    drop_sorted[..., 1:] = drop_sorted[..., :-1].clone()
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def filtered_probs(logits, temperature=0.0, top_k=None, top_p=None):
    """The distribution the released sampler draws from: [..., V] f32."""
    logits = logits.float()
    if temperature and temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logits = top_p_logits(top_k_logits(logits, top_k), top_p)
    return F.softmax(logits, dim=-1)


def sample_tokens(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """(tokens [N], probs [N]) for logits [N, V], as `_sample_with_temperature_topk_topp`."""
    probs = filtered_probs(logits, temperature, top_k, top_p)
    if not temperature or temperature <= 0:
        tok = torch.argmax(probs, dim=-1, keepdim=True)
    else:
        tok = torch.multinomial(probs, 1, generator=generator)
    return tok.squeeze(-1), probs.gather(-1, tok).squeeze(-1)


def num_transfer_tokens(block_length, steps):
    """Tokens to commit at each step of a block: B // steps, the first B % steps one more."""
    base, extra = divmod(block_length, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def effective_steps(steps, gen_length, minimal_topk):
    return max(1, min(steps, gen_length // max(1, minimal_topk)))


# ---- generate --------------------------------------------------------------------------------


def generate(cfg, w, prompt_ids, gen_length, *, mask_id, eos_id, block_length=32, steps=32,
             threshold=0.95, temperature=0.0, top_k=None, top_p=None, minimal_topk=1,
             eos_early_stop=True, generator=None, forward=None):
    """The released generate(), without a cache. Returns a dict:

    tokens: the answer (generated ids before the first EOS, at most gen_length), list of int;
    canvas: the final canvas (list of int, masks where nothing was decoded);
    steps: denoising forwards; blocks: blocks decoded; eos: whether an EOS ended the answer.
    `forward(ids) -> logits [T, V]` replaces reference.forward (for a stored-weights variant)."""
    B = int(block_length)
    P = len(prompt_ids)
    steps = effective_steps(int(steps), int(gen_length), int(minimal_topk))
    schedule = num_transfer_tokens(B, steps)
    n_blocks = (P + gen_length + B - 1) // B
    x = torch.full((n_blocks * B,), mask_id, dtype=torch.long)
    x[:P] = torch.as_tensor(list(prompt_ids), dtype=torch.long)
    if forward is None:
        def forward(ids):
            with torch.no_grad():
                return reference.forward(cfg, w, ids, B)

    def first_eos():
        hits = (x[P:] == eos_id).nonzero()
        return P + int(hits[0]) if len(hits) else None

    n_steps = n_blocks_done = 0
    stopped = False
    for blk in range(P // B, n_blocks):
        end = (blk + 1) * B
        n_blocks_done += 1
        for i in range(steps):
            active = x[end - B:end] == mask_id
            if not active.any():
                break
            logits = forward(x[:end])[end - B:end]
            n_steps += 1
            x0, p0 = sample_tokens(logits, temperature, top_k, top_p, generator)
            conf = torch.where(active, p0, torch.tensor(float("-inf")))
            high = conf > threshold
            transfer = torch.zeros(B, dtype=torch.bool)
            if int(high.sum()) >= schedule[i]:
                transfer = high
            else:
                k = min(schedule[i], int(active.sum()))
                transfer[torch.topk(conf, k)[1]] = True
            x[end - B:end][transfer] = x0[transfer]
            if eos_early_stop and bool((x0[transfer] == eos_id).any()):
                e = first_eos()
                if e is not None and not bool((x[P:e] == mask_id).any()):
                    stopped = True
                    break
        if stopped or first_eos() is not None:  # only masks lie past `end`
            break

    gen = x[P:P + gen_length].tolist()
    eos = eos_id in gen
    tokens = gen[:gen.index(eos_id)] if eos else gen
    return {"tokens": tokens, "canvas": x.tolist(), "steps": n_steps, "blocks": n_blocks_done,
            "eos": eos}


# ---- the engine's step interface on the reference --------------------------------------------


def uniform(seed, position):
    """A counter-based uniform in [0, 1) from (seed, position): the fake's stand-in for the
    core's draw (CONTRACTS.md section 2). Not the core's hash: sampled tokens differ."""
    h = hashlib.blake2b(f"{int(seed)}:{int(position)}".encode(), digest_size=8).digest()
    return (int.from_bytes(h, "little") >> 11) / float(1 << 53)


class ReferenceModel:
    """The step API of tide_cpp.Model (CONTRACTS.md section 5) over reference.forward.

    No cache: `commit` appends ids to a list and every `step` re-runs committed + block from
    position 0, so results are the reference's own. Blocks of the step length are assumed for
    the block-causal mask (commits come a block at a time, as generation makes them)."""

    policy = "gpu"

    def __init__(self, cfg, weights, tokenizer_json=None, chat_template=None, n_ctx=None,
                 step_delay=0.0):
        from hf_checkpoint import special_token_ids

        self.cfg = cfg
        self.w = weights
        self.n_vocab = cfg["vocab_size"]
        ids = special_token_ids(self.n_vocab)
        self.eos_token_id = ids["<|endoftext|>"]
        self.pad_token_id = ids["<|endoftext|>"]
        self.mask_token_id = ids["<|mask|>"]
        self.bos_token_id = ids["<|startoftext|>"]
        self.n_ctx = n_ctx or cfg.get("max_position_embeddings", 2048)
        self._meta = {}
        if tokenizer_json is not None:
            self._meta["tokenizer.huggingface.json"] = tokenizer_json
        if chat_template is not None:
            self._meta["tokenizer.chat_template"] = chat_template
        self.step_delay = step_delay
        self._tokenizer = None
        self._past = []
        self.calls = []  # ("commit", n) / ("step", n, step_in_block): the order of forwards
        self.closed = False

    # core step layer
    def reset(self):
        self._past = []

    @property
    def n_past(self):
        return len(self._past)

    def metadata_string(self, key):
        return self._meta.get(key)

    def commit(self, ids):
        ids = [int(t) for t in ids]
        if self.n_past + len(ids) > self.n_ctx:
            raise ValueError("context full")
        self._past += ids
        self.calls.append(("commit", len(ids)))

    def _window_logits(self, ids):
        window = self._past + [int(t) for t in ids]
        with torch.no_grad():
            return reference.forward(self.cfg, self.w, window, len(ids))[-len(ids):]

    def step(self, ids, want, step_in_block, temperature=0.0, top_k=None, top_p=None, seed=0):
        if self.step_delay:
            import time
            time.sleep(self.step_delay)
        n = len(ids)
        self.calls.append(("step", n, int(step_in_block)))
        logits = self._window_logits(ids)
        probs = filtered_probs(logits, temperature, top_k, top_p)
        want = np.asarray(want, dtype=bool)
        tokens = np.full(n, -1, dtype=np.int32)
        out_p = np.zeros(n, dtype=np.float32)
        for i in np.nonzero(want)[0]:
            if not temperature or temperature <= 0:
                t = int(torch.argmax(probs[i]))
            else:
                cdf = torch.cumsum(probs[i].double(), 0)
                u = uniform(seed, i) * float(cdf[-1])
                t = min(int(torch.searchsorted(cdf, torch.tensor([u], dtype=cdf.dtype))[0]),
                        self.n_vocab - 1)
            tokens[i] = t
            out_p[i] = float(probs[i, t])
        return tokens, out_p

    def logits(self, ids, block_length=32):
        self._past = []
        with torch.no_grad():
            return reference.forward(self.cfg, self.w, list(ids), block_length).numpy()

    def stats(self):
        return {"steps": sum(1 for c in self.calls if c[0] == "step"),
                "forwards": len(self.calls), "experts_promoted": 0, "experts_demoted": 0,
                "h2d_bytes": 0, "device_expert_tokens": 0, "host_expert_tokens": 0,
                "policy": self.policy}

    def reset_stats(self):
        self.calls = []

    # user layer, delegated as tide_cpp.Model does
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from tide_cpp.tokenizer import Tokenizer
            self._tokenizer = Tokenizer.from_model(self)
        return self._tokenizer

    def tokenize(self, text, add_special=False):
        return self.tokenizer.encode(text, add_special=add_special)

    def detokenize(self, ids):
        return self.tokenizer.decode(ids)

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt)

    def generate(self, prompt, **kw):
        from tide_cpp import generation
        return generation.generate(self, prompt, **kw)

    def create_chat_completion(self, messages, **kw):
        from tide_cpp import chat
        return chat.create_chat_completion(self, messages, **kw)

    def close(self):
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def tiny_model(seed=0, eos_bias=None, n_ctx=None, step_delay=0.0, **overrides):
    """(cfg, weights, ReferenceModel) for a tiny checkpoint, tokenizer and template included.
    eos_bias: add this times the mean lm_head row to the EOS row, so EOS shows up mid-answer."""
    import hf_checkpoint as hc

    cfg = hc.make_config(**overrides)
    tok_json, tok_cfg = _tokenizer_cached(cfg["vocab_size"])
    w = hc.random_weights(cfg, seed)
    if eos_bias is not None:
        w = bias_eos(cfg, w, eos_bias)
    m = ReferenceModel(cfg, w, tok_json, tok_cfg["chat_template"], n_ctx=n_ctx,
                       step_delay=step_delay)
    return cfg, w, m


def bias_eos(cfg, w, scale, like=None):
    """Weights whose lm_head EOS row is `scale` times the row of token `like` (default: a
    common BPE token): EOS then wins where that token is likely, mid-answer, not everywhere."""
    import hf_checkpoint as hc

    eos = hc.special_token_ids(cfg["vocab_size"])["<|endoftext|>"]
    w = dict(w)
    head = w["lm_head.weight"].clone()
    src = head[like if like is not None else 300].float()
    head[eos] = (src * scale).to(head.dtype)
    w["lm_head.weight"] = head
    return w


_TOK_CACHE = {}


def _tokenizer_cached(vocab_size):
    if vocab_size not in _TOK_CACHE:
        import hf_checkpoint as hc
        _TOK_CACHE[vocab_size] = hc.make_tokenizer(vocab_size)
    return _TOK_CACHE[vocab_size]


def write_tiny_gguf(dir, name="tiny", seed=0, eos_bias=None, outtype="f32", **overrides):
    """Write the tiny checkpoint (EOS-biased when eos_bias = (like, scale)) and convert it:
    (cfg, weights, path of the .gguf). Needs the converter (tide_cpp/convert/)."""
    import os

    import hf_checkpoint as hc
    from tide_cpp.convert.hf_to_gguf import convert

    cfg = hc.make_config(**overrides)
    tok_json, tok_cfg = _tokenizer_cached(cfg["vocab_size"])
    w = hc.random_weights(cfg, seed)
    if eos_bias is not None:
        w = bias_eos(cfg, w, eos_bias[1], like=eos_bias[0])
    src = os.path.join(str(dir), name + "-hf")
    hc.write_checkpoint(src, cfg, w, tok_json, tok_cfg)
    out = os.path.join(str(dir), name + ".gguf")
    convert(src, out, outtype, progress=False)
    return cfg, w, out
