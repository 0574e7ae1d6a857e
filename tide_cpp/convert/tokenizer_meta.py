"""tokenizer.json + tokenizer_config.json -> the tokenizer.* keys of the GGUF (CONTRACTS.md §1).

The engine tokenizes with the embedded tokenizer.huggingface.json; the ggml.* arrays are there so
that gguf tools (and llama.cpp-style readers) see the vocabulary too."""

import json

from .errors import ConvertError

# llama.cpp token types
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
MASK_TEXT, EOS_TEXT, BOS_TEXT = "<|mask|>", "<|endoftext|>", "<|startoftext|>"
PRE = "bailingmoe2"  # llama.cpp's name for the Ling 2.0 pre-tokenizer that LLaDA2.0 shares


def _token_text(v):
    return v.get("content") if isinstance(v, dict) else v


def tokenizer_meta(tokenizer_json, tokenizer_config, vocab_size, config):
    """A dict {key: value} of tokenizer.* metadata (value types: str, int, bool, lists)."""
    try:
        tj = json.loads(tokenizer_json)
        model = tj["model"]
        vocab = model["vocab"]
        merges = model.get("merges", [])
    except (ValueError, KeyError, TypeError) as e:
        raise ConvertError(f"tokenizer.json: not a tokenizers BPE model ({e})") from None
    if model.get("type", "BPE") != "BPE" or not isinstance(vocab, dict):
        raise ConvertError(f"tokenizer.json: model type {model.get('type')!r} is not supported "
                           "(expected a byte-level BPE)")
    tokens = [None] * vocab_size
    types = [UNUSED] * vocab_size

    def put(tid, text, ttype, what):
        if not isinstance(tid, int) or tid < 0:
            raise ConvertError(f"tokenizer.json: {what} {text!r} has a bad id {tid!r}")
        if tid >= vocab_size:
            raise ConvertError(f"tokenizer.json: {what} {text!r} has id {tid}, beyond "
                               f"config.json vocab_size = {vocab_size}")
        tokens[tid] = text
        types[tid] = ttype

    for text, tid in vocab.items():
        put(tid, text, NORMAL, "token")
    for t in tj.get("added_tokens", []):
        put(t.get("id"), t.get("content"), CONTROL if t.get("special") else USER_DEFINED,
            "added token")
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i] = f"[PAD{i}]"
    ids = {}
    for t, i in ((t, i) for i, t in enumerate(tokens)):
        ids.setdefault(t, i)

    def find(text, what):
        if text not in ids or types[ids[text]] == UNUSED:
            raise ConvertError(f"tokenizer.json: no {what} token {text!r}")
        return ids[text]

    mask_id, eos_id, bos_id = (find(MASK_TEXT, "mask"), find(EOS_TEXT, "EOS"),
                               find(BOS_TEXT, "BOS"))
    pad_text = _token_text(tokenizer_config.get("pad_token"))
    if isinstance(pad_text, str) and pad_text in ids:
        pad_id = ids[pad_text]
    elif isinstance(config.get("pad_token_id"), int) and 0 <= config["pad_token_id"] < vocab_size:
        pad_id = config["pad_token_id"]
    else:
        pad_id = eos_id
    merge_strs = []
    for m in merges:
        if isinstance(m, str):
            merge_strs.append(m)
        elif isinstance(m, (list, tuple)) and len(m) == 2:
            merge_strs.append(f"{m[0]} {m[1]}")
        else:
            raise ConvertError(f"tokenizer.json: bad merge {m!r}")
    template = tokenizer_config.get("chat_template")
    if not template:
        raise ConvertError("tokenizer_config.json: missing field 'chat_template' (and no "
                           "chat_template.jinja)")
    add_bos = tokenizer_config.get("add_bos_token", False)
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": PRE,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merge_strs,
        "tokenizer.ggml.bos_token_id": bos_id,
        "tokenizer.ggml.eos_token_id": eos_id,
        "tokenizer.ggml.padding_token_id": pad_id,
        "tokenizer.ggml.mask_token_id": mask_id,
        "tokenizer.ggml.add_bos_token": bool(add_bos),
        "tokenizer.chat_template": template,
        "tokenizer.huggingface.json": tokenizer_json,
    }
