"""`create_chat_completion`: OpenAI-shaped chat results, as llama-cpp-python returns them.

    out = model.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=64)
    out["choices"][0]["message"]["content"]

    for chunk in model.create_chat_completion(messages, stream=True):
        print(chunk["choices"][0]["delta"].get("content", ""), end="")

The prompt is the model's chat template (with the generation prompt) over `messages`; the answer
is generated with `tide_cpp.generation` and streamed one finished block at a time. Both forms
run the same stream, so the chunks concatenate to exactly the non-streamed content.
"""

import os
import time
import uuid

from . import generation
from .tokenizer import _check_messages, tokenizer_of

__all__ = ["create_chat_completion"]


def create_chat_completion(model, messages, max_tokens=None, temperature=0.0, top_p=None,
                           top_k=None, stream=False, seed=None, stop=None, block_length=32,
                           steps=32, threshold=0.95, minimal_topk=1, eos_early_stop=True,
                           on_step=None, model_name=None, editing_threshold=None,
                           max_post_steps=16, **ignored):
    """A chat completion for `messages` ([{'role': 'system'|'user'|'assistant', 'content'}]).

    max_tokens None: up to the end of the context. stop: a string or a list of strings that
    end the answer (not included). Diffusion knobs as `tide_cpp.generation.generate`
    (editing_threshold / max_post_steps: LLaDA2.1's token-to-token editing).
    Other OpenAI / llama-cpp-python arguments (frequency_penalty, ...) are accepted and
    ignored. Returns the `chat.completion` dict, or with stream=True an iterator of
    `chat.completion.chunk` dicts. Bad arguments raise ValueError before anything runs."""
    messages = _check_messages(messages)
    stops = _check_stop(stop)
    prompt = tokenizer_of(model).apply_chat_template(messages, add_generation_prompt=True,
                                                     tokenize=True)
    st = generation.stream(model, prompt, max_tokens=max_tokens, block_length=block_length,
                           steps=steps, threshold=threshold, temperature=temperature,
                           top_k=top_k, top_p=top_p, minimal_topk=minimal_topk,
                           eos_early_stop=eos_early_stop, seed=seed, on_step=on_step,
                           editing_threshold=editing_threshold, max_post_steps=max_post_steps)
    meta = {"id": "chatcmpl-" + uuid.uuid4().hex, "created": int(time.time()),
            "model": model_name or _model_name(model)}
    if stream:
        return _chunks(st, stops, meta)
    parts = []
    finish = "length"
    for kind, value in _deltas(st, stops):
        if kind == "text":
            parts.append(value)
        else:
            finish = value
    n_out = len(st.tokens)
    return {
        **{"id": meta["id"], "object": "chat.completion", "created": meta["created"],
           "model": meta["model"]},
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": "".join(parts)},
            "logprobs": None,
            "finish_reason": finish,
        }],
        "usage": {"prompt_tokens": st.prompt_tokens, "completion_tokens": n_out,
                  "total_tokens": st.prompt_tokens + n_out},
    }


def _chunks(st, stops, meta):
    def chunk(delta, finish=None):
        return {"id": meta["id"], "object": "chat.completion.chunk", "created": meta["created"],
                "model": meta["model"],
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish}]}

    yield chunk({"role": "assistant"})
    for kind, value in _deltas(st, stops):
        if kind == "text":
            yield chunk({"content": value})
        else:
            yield chunk({}, value)


def _deltas(st, stops):
    """('text', delta) items, then one ('finish', reason). Stop strings end the answer: text
    that could begin one is held back until it is known not to."""
    pending = ""
    try:
        for d in st:
            pending += d
            hit = [i for i in (pending.find(s) for s in stops) if i >= 0]
            if hit:
                if min(hit):
                    yield "text", pending[:min(hit)]
                yield "finish", "stop"
                return
            keep = _partial_stop(pending, stops)
            out, pending = pending[:len(pending) - keep], pending[len(pending) - keep:]
            if out:
                yield "text", out
        if pending:
            yield "text", pending
        yield "finish", st.generation.finish_reason
    finally:
        st.close()  # a stop string, or a consumer that stops reading: no more blocks


def _partial_stop(text, stops):
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def _check_stop(stop):
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    try:
        stops = list(stop)
    except TypeError:
        raise ValueError("stop: expected a string or a list of strings") from None
    if not all(isinstance(s, str) for s in stops):
        raise ValueError("stop: expected a string or a list of strings")
    return [s for s in stops if s]


def _model_name(model):
    path = getattr(model, "path", None)
    return os.path.basename(path) if path else "tide"
