"""One completion: the prompt made on the request side, the generation run on the engine's worker.

`prepare` tokenizes (through the chat template for chat) and checks every generation argument
with tide_cpp.generation.check_params before the request is queued, so a prompt too long for the
context is a 400 at once, never an error in the middle of a stream. `work` then runs on the
worker and emits, in order:

    ("delta", text)        answer text, one finished block at a time (stop strings cut it)
    ("step", event)        with denoise_events: the canvas change of every denoising step
    ("finish", summary)    finish_reason, usage, and the answer's figures

A step event (the web page draws it; positions are offsets in the answer):

    {"block": 0, "step": 3, "start": 0, "end": 32, "masked": 12,
     "unmasked": [[offset, text], ...],     masks that became tokens in this step
     "edited":   [[offset, text], ...],     tokens replaced by another (LLaDA2.1's editing;
                                            text null: the position went back to a mask)
     "eos": [offset, ...]}                  which of those are the end-of-text token

Edits are read off the canvas itself (a position that held a token and now holds another), so
a schedule that edits shows them with no change here.
"""

import time

import numpy as np

from .. import generation
from ..chat import _deltas as stop_deltas   # the one implementation of stop strings
from ..tokenizer import TemplateError, tokenizer_of
from .engine import Cancelled
from .errors import invalid

# Counters of Model.stats() whose change over one answer says what it cost in expert traffic.
TRAFFIC = ("experts_promoted", "experts_demoted", "h2d_bytes", "device_expert_tokens",
           "host_expert_tokens")


class ModelFacts:
    """What check_params needs of a model, read once at start-up: the request side must not
    call into the native context while the worker uses it."""

    def __init__(self, model):
        self.n_ctx = int(model.n_ctx)
        self.n_vocab = int(model.n_vocab)
        self.tokenizer = tokenizer_of(model)

    def tokenize(self, text):
        return self.tokenizer.encode(text)


def prepare(facts, req):
    """Prompt ids and the checked generation arguments of a CompletionRequest; APIError 400
    naming the field when the prompt or an argument cannot be used."""
    tok = facts.tokenizer
    if req.kind == "chat":
        try:
            ids = tok.apply_chat_template(req.messages, add_generation_prompt=True,
                                          tokenize=True)
        except TemplateError as e:
            raise invalid("messages", str(e)) from None
    elif isinstance(req.prompt, str):
        ids = tok.encode(req.prompt)
        if not ids:
            raise invalid("prompt", "the prompt is empty")
    else:
        ids = req.prompt
    try:
        ids, _ = generation.check_params(facts, ids, **req.generation)
    except ValueError as e:
        # check_params starts every message with the argument's name: that is the field
        msg = str(e)
        param = msg.split(" ", 1)[0].rstrip(":")
        known = set(req.generation) | {"prompt"}
        if param == "prompt":
            param = "messages" if req.kind == "chat" else "prompt"
        raise invalid(param if param in known | {"messages"} else None, msg) from None
    return ids


def check_defaults(facts, defaults):
    """The server's own generation settings, checked once at start-up (ValueError)."""
    generation.check_params(facts, [0], **defaults)


def _traffic(model):
    s = model.stats()
    return {k: int(s.get(k, 0)) for k in TRAFFIC}


class _Canvas:
    """Turns the StepInfo of every step into the step events described above."""

    def __init__(self, tokenizer, job):
        self.tok = tokenizer
        self.job = job
        self.steps = 0
        self.blocks = set()
        self._prev = None      # the active block as the previous step left it
        self._block = None

    def _text(self, token):
        return self.tok.decode([int(token)], skip_special=True)

    def on_step(self, info, send_events):
        self.steps += 1
        self.blocks.add(info.block)
        start, B, P = info.block_start, info.block_length, info.prompt_length
        mask, end = info.mask_token_id, info.prompt_length + info.max_tokens
        cur = info.canvas[start:start + B]
        if self._block != info.block:          # the block before its first step: masks
            prev = cur.copy()
            prev[np.asarray(info.committed, dtype=np.int64) - start] = mask
            self._block = info.block
        else:
            prev = self._prev
        self._prev = cur.copy()
        if send_events:
            pos = np.arange(start, start + B)
            answer = (pos >= P) & (pos < end)
            unmasked = answer & (prev == mask) & (cur != mask)
            edited = answer & (prev != mask) & (prev != cur)

            def text(p):
                t = cur[p - start]
                return None if t == mask else self._text(t)

            self.job.emit("step", {
                "block": int(info.block), "step": int(info.step),
                "start": int(max(start, P) - P), "end": int(min(start + B, end) - P),
                "masked": int(info.n_masked),
                "unmasked": [[int(p - P), text(p)] for p in pos[unmasked]],
                "edited": [[int(p - P), text(p)] for p in pos[edited]],
                "eos": [int(p - P) for p in pos[unmasked | edited]
                        if cur[p - start] == info.eos_token_id],
            })
        self.job.check()   # a cancelled job stops here, between two steps


def work(req, ids):
    """The job's work for the engine: generate, emit deltas / steps, then the finish summary."""

    def run(model, job):
        canvas = _Canvas(tokenizer_of(model), job)
        before = _traffic(model)
        t0 = time.perf_counter()
        st = generation.stream(model, ids, on_step=lambda info: canvas.on_step(
            info, req.denoise_events), **req.generation)
        finish = "length"
        for kind, value in stop_deltas(st, req.stops):
            job.check()
            if kind == "text":
                job.emit("delta", value)
            else:
                finish = value
        seconds = time.perf_counter() - t0
        after = _traffic(model)
        n_out = len(st.tokens)
        job.emit("finish", {
            "finish_reason": finish,
            "usage": {"prompt_tokens": len(ids), "completion_tokens": n_out,
                      "total_tokens": len(ids) + n_out},
            "tide": {"tokens": n_out, "seconds": round(seconds, 6),
                     "tokens_per_second": round(n_out / seconds, 3) if seconds > 0 else 0.0,
                     "steps": canvas.steps, "blocks": len(canvas.blocks),
                     "policy": model.policy, "device": model.device,
                     **{k: after[k] - before[k] for k in TRAFFIC}},
        })

    return run


__all__ = ["ModelFacts", "check_defaults", "prepare", "work", "Cancelled"]
