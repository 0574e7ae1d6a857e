"""Tokenizer and chat template, both from the GGUF's metadata.

`Tokenizer` wraps the original `tokenizer.json` (stored verbatim as `tokenizer.huggingface.json`)
with the `tokenizers` library, so text becomes exactly the ids the released
PreTrainedTokenizerFast gives. A GGUF without it (llama.cpp's layout) has the vocabulary as GGML
lists (tokens, token types, merges, the pre-tokenizer's name): the same byte-level BPE is rebuilt
from them (`tokenizer_json_from_ggml`). `ChatTemplate` renders `tokenizer.chat_template` with
jinja2 the way transformers' `apply_chat_template` does (sandboxed, trim_blocks + lstrip_blocks,
`raise_exception`, `tojson`, the special tokens as variables).

End of generation: every token that ends an answer (`end_of_generation_ids`): the EOS and the
EOT (llama.cpp's keys; gguf has no key for a longer list); in a file without an EOT key,
`<|endoftext|>` and `<|role_end|>` (which ends every LLaDA2 chat turn) when the vocabulary has it.
"""

import json
import mmap
import os
import struct
from datetime import datetime

KEY_TOKENIZER_JSON = "tokenizer.huggingface.json"
KEY_CHAT_TEMPLATE = "tokenizer.chat_template"
KEY_IDS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
    "mask": "tokenizer.ggml.mask_token_id",
}
KEY_EOT = "tokenizer.ggml.eot_token_id"
KEY_GGML = {
    "model": "tokenizer.ggml.model",
    "pre": "tokenizer.ggml.pre",
    "tokens": "tokenizer.ggml.tokens",
    "token_type": "tokenizer.ggml.token_type",
    "merges": "tokenizer.ggml.merges",
}
# The end of a chat turn in LLaDA2's template: an end of generation in files that do not say.
ROLE_END_TEXT = "<|role_end|>"
# The texts LLaDA2 gives its special tokens (docs/MODEL.md): the fallback when no id is
# recorded.
SPECIAL_TEXTS = {
    "bos": "<|startoftext|>",
    "eos": "<|endoftext|>",
    "pad": "<|endoftext|>",
    "mask": "<|mask|>",
}


class TemplateError(ValueError):
    """The chat template failed to render (or called raise_exception)."""


class ChatTemplate:
    """A Jinja chat template rendered as transformers renders it."""

    def __init__(self, source, bos_token="", eos_token="", **special_tokens):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                              separators=separators, sort_keys=sort_keys)

        def strftime_now(fmt):
            return datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        self.source = source
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise TemplateError(f"chat template does not parse: {e}") from e
        self.variables = {"bos_token": bos_token, "eos_token": eos_token, **special_tokens}

    @classmethod
    def from_model(cls, model):
        """The template of a loaded tide_cpp.Model (through its tokenizer's special tokens)."""
        return tokenizer_of(model).chat_template

    def render(self, messages, add_generation_prompt=True, **extra):
        """The prompt text for `messages` (a list of {'role', 'content'} dicts)."""
        import jinja2

        messages = _check_messages(messages)
        try:
            return self._template.render(messages=messages,
                                         add_generation_prompt=add_generation_prompt,
                                         **{**self.variables, **extra})
        except TemplateError:
            raise
        except jinja2.TemplateError as e:
            raise TemplateError(f"chat template failed: {e}") from e

    __call__ = render


def _check_messages(messages):
    if messages is None or isinstance(messages, (str, bytes)):
        raise ValueError("messages: expected a list of {'role': ..., 'content': ...} dicts")
    messages = list(messages)
    if not messages:
        raise ValueError("messages: the list is empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"messages[{i}]: expected a dict with 'role' and 'content'")
        content = m.get("content")
        if content is None:
            content = ""
        if not isinstance(content, str):  # OpenAI's list of parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        out.append({**m, "content": content})
    return out


class Tokenizer:
    """Text <-> ids for a model, from its tokenizer.json, plus its special ids and template."""

    def __init__(self, tokenizer_json, chat_template=None, bos_token_id=None, eos_token_id=None,
                 pad_token_id=None, mask_token_id=None, add_bos=False, eot_token_id=None):
        from tokenizers import Tokenizer as HFTokenizer

        if not tokenizer_json:
            raise ValueError("tokenizer_json: empty (the GGUF has no "
                             f"{KEY_TOKENIZER_JSON} and no {KEY_GGML['tokens']}; reconvert it "
                             "with tide-cli convert)")
        self._tok = HFTokenizer.from_str(tokenizer_json)
        # Never add a post-processor's specials implicitly: LLaDA2 adds none (add_bos false).
        self.add_bos = bool(add_bos)
        ids = {"bos": bos_token_id, "eos": eos_token_id, "pad": pad_token_id,
               "mask": mask_token_id}
        for k, v in ids.items():
            if v is None or v < 0:
                ids[k] = self._tok.token_to_id(SPECIAL_TEXTS[k])
        self.bos_token_id, self.eos_token_id = ids["bos"], ids["eos"]
        self.pad_token_id, self.mask_token_id = ids["pad"], ids["mask"]
        self.special_ids = frozenset(
            t for t, added in self._tok.get_added_tokens_decoder().items() if added.special)
        self.eog_token_ids = self._end_of_generation(eot_token_id)
        self.chat_template_source = chat_template
        self._template = None

    def _end_of_generation(self, eot):
        out = {int(self.eos_token_id)} if self.eos_token_id is not None else set()
        if eot is not None:
            return frozenset(out | {int(eot)})
        role_end = self._tok.token_to_id(ROLE_END_TEXT)   # a file from before the EOT key
        return frozenset(out | ({role_end} if role_end is not None else set()))

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_metadata(cls, get):
        """From a GGUF's metadata; `get(key)` returns the value or None. Without an embedded
        tokenizer.json, the tokenizer is rebuilt from the GGML lists."""
        ids = {}
        for k, key in KEY_IDS.items():
            v = get(key)
            ids[k + "_token_id"] = None if v is None else int(v)
        tj = get(KEY_TOKENIZER_JSON)
        if not tj and get(KEY_GGML["tokens"]) is not None:
            tj = tokenizer_json_from_ggml(
                get(KEY_GGML["tokens"]), get(KEY_GGML["token_type"]),
                get(KEY_GGML["merges"]) or [], get(KEY_GGML["pre"]),
                get(KEY_GGML["model"]) or "gpt2")
        return cls(tj, chat_template=get(KEY_CHAT_TEMPLATE),
                   add_bos=bool(get("tokenizer.ggml.add_bos_token") or False),
                   eot_token_id=get(KEY_EOT), **ids)

    @classmethod
    def from_model(cls, model):
        """From a loaded tide_cpp.Model (its metadata strings and special ids; the EOT id
        and, without an embedded tokenizer.json, the GGML lists from its file)."""
        tj = model.metadata_string(KEY_TOKENIZER_JSON)
        path = getattr(model, "path", None)
        meta = {}
        if path and os.path.isfile(path):
            meta = read_gguf_metadata(path, arrays=() if tj else
                                      (KEY_GGML["tokens"], KEY_GGML["merges"]))
        if not tj and meta.get(KEY_GGML["tokens"]) is not None:
            tj = tokenizer_json_from_ggml(
                meta[KEY_GGML["tokens"]], meta.get(KEY_GGML["token_type"]),
                meta.get(KEY_GGML["merges"]) or [], meta.get(KEY_GGML["pre"]),
                meta.get(KEY_GGML["model"]) or "gpt2")
        tok = cls(tj,
                  chat_template=model.metadata_string(KEY_CHAT_TEMPLATE),
                  bos_token_id=getattr(model, "bos_token_id", None),
                  eos_token_id=getattr(model, "eos_token_id", None),
                  pad_token_id=getattr(model, "pad_token_id", None),
                  mask_token_id=getattr(model, "mask_token_id", None),
                  eot_token_id=meta.get(KEY_EOT))
        return tok

    @classmethod
    def from_gguf(cls, path):
        """Straight from a .gguf file, without the native library."""
        meta = read_gguf_metadata(path, arrays=(KEY_GGML["tokens"], KEY_GGML["merges"]))
        return cls.from_metadata(meta.get)

    # ---- text <-> ids ------------------------------------------------------------------------

    @property
    def n_vocab(self):
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text, add_special=False):
        """Ids of `text`. Special tokens written in the text (<role>, <|role_end|>) become their
        ids, as in the original. add_special: prepend BOS when the model asks for it (LLaDA2
        does not)."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special and self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, skip_special=False):
        """Text of `ids`; skip_special drops the special tokens (EOS, <role>, ...)."""
        return self._tok.decode([int(t) for t in ids], skip_special_tokens=skip_special)

    # the names tide_cpp.Model delegates to
    def tokenize(self, text, add_special=False):
        return self.encode(text, add_special=add_special)

    def detokenize(self, ids, skip_special=False):
        return self.decode(ids, skip_special=skip_special)

    def token_to_id(self, text):
        return self._tok.token_to_id(text)

    def id_to_token(self, token_id):
        return self._tok.id_to_token(int(token_id))

    # ---- chat --------------------------------------------------------------------------------

    @property
    def chat_template(self):
        if self._template is None:
            if not self.chat_template_source:
                raise ValueError("this model has no chat template (tokenizer.chat_template)")
            text = (lambda i: self._tok.id_to_token(i) if i is not None else "")
            self._template = ChatTemplate(
                self.chat_template_source, bos_token=text(self.bos_token_id),
                eos_token=text(self.eos_token_id), pad_token=text(self.pad_token_id),
                mask_token=text(self.mask_token_id))
        return self._template

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False, **extra):
        """The chat prompt as text (or ids with tokenize=True)."""
        text = self.chat_template.render(messages, add_generation_prompt, **extra)
        return self.encode(text) if tokenize else text


def tokenizer_of(model):
    """The Tokenizer of a model: `model.tokenizer` when it has one, else built (and kept on the
    model) from its metadata."""
    tok = getattr(model, "tokenizer", None)  # tide_cpp.Model keeps its own
    if tok is None:
        tok = getattr(model, "_tide_tokenizer", None)
    if tok is None:
        tok = Tokenizer.from_model(model)
        try:
            model._tide_tokenizer = tok
        except AttributeError:
            pass
    return tok


def end_of_generation_ids(model):
    """Every token id that ends an answer on `model` (a frozenset, the EOS included)."""
    ids = {int(model.eos_token_id)}
    try:
        tok = tokenizer_of(model)
    except ValueError:  # no tokenizer at all: the EOS alone
        return frozenset(ids)
    return frozenset(ids | tok.eog_token_ids)


# ---- a GGUF's metadata, read without the native library --------------------------------------

# GGUF value types -> struct format of a scalar (8: string, 9: array)
_GGUF_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                10: "<Q", 11: "<q", 12: "<d"}
_GGUF_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "u1",
               10: "<u8", 11: "<i8", 12: "<f8"}


def read_gguf_metadata(path, arrays=()):
    """{key: value} of the metadata of the GGUF file `path`: scalars, strings and numeric arrays
    (as lists); string arrays only for the keys in `arrays` (the others are skipped unread, so a
    157k-token vocabulary costs nothing unless asked for). ValueError on a file that is not GGUF
    or whose metadata is cut short."""
    import numpy as np

    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise ValueError(f"{path}: not a GGUF file ({size} bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            if mm[:4] != b"GGUF":
                raise ValueError(f"{path}: not a GGUF file (magic {bytes(mm[:4])!r})")

            def take(fmt, off):
                n = struct.calcsize(fmt)
                if off + n > size:
                    raise ValueError(f"{path}: GGUF metadata cut short at byte {off}")
                return struct.unpack_from(fmt, mm, off)[0], off + n

            def string(off, keep=True):
                n, off = take("<Q", off)
                if off + n > size:
                    raise ValueError(f"{path}: GGUF metadata cut short at byte {off}")
                return (bytes(mm[off:off + n]).decode("utf-8", "replace") if keep else None,
                        off + n)

            def value(vtype, off, keep_strings):
                if vtype in _GGUF_SCALAR:
                    return take(_GGUF_SCALAR[vtype], off)
                if vtype == 8:
                    return string(off, keep_strings)
                if vtype != 9:
                    raise ValueError(f"{path}: unknown GGUF value type {vtype} at byte {off}")
                etype, off = take("<I", off)
                n, off = take("<Q", off)
                if etype in _GGUF_NUMPY:
                    nbytes = n * np.dtype(_GGUF_NUMPY[etype]).itemsize
                    if off + nbytes > size:
                        raise ValueError(f"{path}: GGUF metadata cut short at byte {off}")
                    a = np.frombuffer(mm, dtype=_GGUF_NUMPY[etype], count=n, offset=off)
                    out = a.astype(bool) if etype == 7 else a
                    return out.tolist(), off + nbytes
                items = [] if keep_strings else None
                for _ in range(n):
                    v, off = value(etype, off, keep_strings)
                    if keep_strings:
                        items.append(v)
                return items, off

            _version, off = take("<I", 4)
            _n_tensors, off = take("<Q", off)
            n_kv, off = take("<Q", off)
            out = {}
            for _ in range(n_kv):
                key, off = string(off)
                vtype, off = take("<I", off)
                keep = vtype != 9 or key in arrays
                v, off = value(vtype, off, keep)
                if vtype == 9 and v is None:
                    continue
                out[key] = v
            return out


# ---- the byte-level BPE from GGML lists -------------------------------------------------------

# llama.cpp token types
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4
# tokenizer.ggml.pre -> the split regex of the Hugging Face pre-tokenizer it names (applied
# before the byte-level mapping). bailingmoe2: Ling 2.0's, which LLaDA2 shares: GPT-4 style
# contractions and words, digits one at a time (llama.cpp spells it with possessive quantifiers;
# the splits are the same, tests/test_tokenizer.py checks).
PRE_TOKENIZER_SPLITS = {
    "bailingmoe2": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
}


def tokenizer_json_from_ggml(tokens, token_types, merges, pre, model="gpt2"):
    """A tokenizer.json (str) equivalent to the GGML vocabulary lists: normal tokens and merges
    form the byte-level BPE; control tokens become special added tokens, user-defined ones plain
    added tokens, each at its id; unused entries (padding) are left out. ValueError naming the
    key when the lists describe a tokenizer this cannot rebuild."""
    if model != "gpt2":
        raise ValueError(f"{KEY_GGML['model']} = {model!r}: only 'gpt2' (byte-level BPE) is "
                         "supported")
    if pre not in PRE_TOKENIZER_SPLITS:
        raise ValueError(f"{KEY_GGML['pre']} = {pre!r}: unknown pre-tokenizer (known: "
                         f"{', '.join(sorted(PRE_TOKENIZER_SPLITS))})")
    tokens = list(tokens)
    types = list(token_types) if token_types is not None else [_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{KEY_GGML['token_type']}: {len(types)} entries for {len(tokens)} "
                         "tokens")
    vocab, added = {}, []
    for i, (text, ttype) in enumerate(zip(tokens, types)):
        if ttype == _NORMAL:
            vocab.setdefault(text, i)
        elif ttype in (_CONTROL, _USER_DEFINED):
            added.append({"id": i, "content": text, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": ttype == _CONTROL})
    pairs = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{KEY_GGML['merges']}: bad merge {m!r} (expected 'left right')")
        pairs.append(parts)
    doc = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": PRE_TOKENIZER_SPLITS[pre]},
             "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": pairs},
    }
    return json.dumps(doc, ensure_ascii=False)
