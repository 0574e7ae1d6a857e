"""Finding a checkpoint: a local folder or a Hugging Face repo id, and its files.

load_checkpoint(src) -> Checkpoint(dir, config, tensors, tokenizer_json, tokenizer_config).
"""

import json
import os
import re

from .errors import ConvertError
from .safetensors_reader import read_header

# What the converter reads from a repo; nothing else is downloaded.
HUB_PATTERNS = [
    "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
]
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class Checkpoint:
    def __init__(self, dir, name, config, tensors, tokenizer_json, tokenizer_config):
        self.dir = dir                      # local folder holding the files
        self.name = name                    # for general.name
        self.config = config                # config.json dict
        self.tensors = tensors              # {HF name: TensorRef}
        self.tokenizer_json = tokenizer_json      # tokenizer.json text, verbatim
        self.tokenizer_config = tokenizer_config  # tokenizer_config.json dict (+ chat template)


def resolve(src, revision=None, progress=True):
    """A local folder for src: src itself, or a snapshot of the Hub repo src."""
    if os.path.isdir(src):
        return os.path.abspath(src), os.path.basename(os.path.abspath(src))
    if os.path.exists(src):
        raise ConvertError(f"{src}: not a folder (SRC is a checkpoint folder or a Hugging Face "
                           "repo id)")
    if not _REPO_ID.match(src):
        raise ConvertError(f"{src}: no such folder, and not a Hugging Face repo id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConvertError(f"{src}: no such folder (huggingface-hub is not installed to "
                           "download it)") from None
    if not progress:
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    try:
        path = snapshot_download(repo_id=src, revision=revision, allow_patterns=HUB_PATTERNS)
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one clear line
        kind = type(e).__name__
        msg = str(e).strip().splitlines()[0] if str(e).strip() else kind
        msg = msg[len("Got: "):] if msg.startswith("Got: ") else msg
        if "RepositoryNotFound" in kind or "RevisionNotFound" in kind:
            raise ConvertError(f"{src}: not found on the Hugging Face Hub ({msg})") from None
        if "GatedRepo" in kind:
            raise ConvertError(f"{src}: gated repo, log in with `hf auth login` and accept "
                               f"its terms ({msg})") from None
        if "LocalEntryNotFound" in kind or "Offline" in kind or "Connect" in kind:
            raise ConvertError(f"{src}: cannot download (offline, and not in the local Hugging "
                               f"Face cache): {msg}") from None
        raise ConvertError(f"{src}: download failed: {kind}: {msg}") from None
    return path, src.split("/")[-1]


def _read_json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConvertError(f"{path}: missing ({what})") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConvertError(f"{path}: cannot read {what}: {e}") from None


def _tensor_index(dir):
    """{HF name: TensorRef} over all shards: via model.safetensors.index.json, or the lone
    model.safetensors, or every *.safetensors of the folder."""
    index_path = os.path.join(dir, "model.safetensors.index.json")
    if os.path.exists(index_path):
        index = _read_json(index_path, "the shard index")
        wmap = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wmap, dict):
            raise ConvertError(f"{index_path}: no 'weight_map'")
        files = sorted(set(wmap.values()))
    else:
        files = sorted(f for f in os.listdir(dir) if f.endswith(".safetensors"))
        wmap = None
        if not files:
            raise ConvertError(f"{dir}: no *.safetensors files and no "
                               "model.safetensors.index.json")
    headers = {}
    for fname in files:
        path = os.path.join(dir, fname)
        if not os.path.exists(path):
            raise ConvertError(f"{path}: missing (listed in model.safetensors.index.json)")
        headers[fname] = read_header(path)
    tensors = {}
    if wmap is not None:
        for name, fname in wmap.items():
            ref = headers[fname].get(name)
            if ref is None:
                raise ConvertError(f"{os.path.join(dir, fname)}: missing tensor {name!r} "
                                   "(model.safetensors.index.json puts it there)")
            tensors[name] = ref
    else:
        for fname in files:
            for name, ref in headers[fname].items():
                if name in tensors:
                    raise ConvertError(f"tensor {name!r} appears in both {tensors[name].path} "
                                       f"and {ref.path}")
                tensors[name] = ref
    return tensors


def _chat_template(dir, tokenizer_config):
    jinja = os.path.join(dir, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    tpl = tokenizer_config.get("chat_template")
    if isinstance(tpl, list):  # [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default") or next(iter(named.values()), None)
    return tpl if isinstance(tpl, str) and tpl else None


def load_checkpoint(src, revision=None, progress=True):
    dir, name = resolve(src, revision=revision, progress=progress)
    config = _read_json(os.path.join(dir, "config.json"), "the model config")
    if not isinstance(config, dict):
        raise ConvertError(f"{os.path.join(dir, 'config.json')}: not a JSON object")
    tok_path = os.path.join(dir, "tokenizer.json")
    try:
        with open(tok_path, encoding="utf-8") as f:
            tokenizer_json = f.read()
    except FileNotFoundError:
        raise ConvertError(f"{tok_path}: missing (the tokenizer)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConvertError(f"{tok_path}: cannot read the tokenizer: {e}") from None
    tc_path = os.path.join(dir, "tokenizer_config.json")
    tokenizer_config = _read_json(tc_path, "the tokenizer config")
    if not isinstance(tokenizer_config, dict):
        raise ConvertError(f"{tc_path}: not a JSON object")
    tokenizer_config = dict(tokenizer_config)
    tokenizer_config["chat_template"] = _chat_template(dir, tokenizer_config)
    return Checkpoint(dir, name, config, None, tokenizer_json, tokenizer_config)


def load_tensors(ckpt):
    ckpt.tensors = _tensor_index(ckpt.dir)
    return ckpt.tensors
