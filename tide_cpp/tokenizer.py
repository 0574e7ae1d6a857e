"""Tokenizer and chat template, both from the GGUF's metadata.

`Tokenizer` wraps the original `tokenizer.json` (stored verbatim as `tokenizer.huggingface.json`)
with the `tokenizers` library, so text becomes exactly the ids the released
PreTrainedTokenizerFast gives. `ChatTemplate` renders `tokenizer.chat_template` with jinja2 the
way transformers' `apply_chat_template` does (sandboxed, trim_blocks + lstrip_blocks,
`raise_exception`, `tojson`, the special tokens as variables).
"""

import json
from datetime import datetime

KEY_TOKENIZER_JSON = "tokenizer.huggingface.json"
KEY_CHAT_TEMPLATE = "tokenizer.chat_template"
KEY_IDS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
    "mask": "tokenizer.ggml.mask_token_id",
}
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
                 pad_token_id=None, mask_token_id=None, add_bos=False):
        from tokenizers import Tokenizer as HFTokenizer

        if not tokenizer_json:
            raise ValueError("tokenizer_json: empty (the GGUF has no "
                             f"{KEY_TOKENIZER_JSON}; reconvert it with tide-cli convert)")
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
        self.chat_template_source = chat_template
        self._template = None

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_metadata(cls, get):
        """From a GGUF's metadata; `get(key)` returns the value or None."""
        ids = {}
        for k, key in KEY_IDS.items():
            v = get(key)
            ids[k + "_token_id"] = None if v is None else int(v)
        return cls(get(KEY_TOKENIZER_JSON), chat_template=get(KEY_CHAT_TEMPLATE),
                   add_bos=bool(get("tokenizer.ggml.add_bos_token") or False), **ids)

    @classmethod
    def from_model(cls, model):
        """From a loaded tide_cpp.Model (its metadata strings and special ids)."""
        tok = cls(model.metadata_string(KEY_TOKENIZER_JSON),
                  chat_template=model.metadata_string(KEY_CHAT_TEMPLATE),
                  bos_token_id=getattr(model, "bos_token_id", None),
                  eos_token_id=getattr(model, "eos_token_id", None),
                  pad_token_id=getattr(model, "pad_token_id", None),
                  mask_token_id=getattr(model, "mask_token_id", None))
        return tok

    @classmethod
    def from_gguf(cls, path):
        """Straight from a .gguf file (gguf-py's reader), without the native library."""
        from gguf import GGUFReader

        reader = GGUFReader(str(path), "r")

        def get(key):
            field = reader.get_field(key)
            if field is None:
                return None
            value = field.contents()
            return value

        return cls.from_metadata(get)

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

    def token_text(self, token_id):
        """The text one token shows on its own (for the visual canvas)."""
        return self._tok.decode([int(token_id)], skip_special_tokens=False)

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
