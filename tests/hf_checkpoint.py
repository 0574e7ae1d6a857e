"""Tiny random LLaDA2.0 checkpoints in the exact released Hugging Face layout (CONTRACTS.md §6).

    cfg = make_config(num_hidden_layers=3)            # or SHAPES["ungrouped"], ...
    tok_json, tok_cfg = make_tokenizer(cfg["vocab_size"])
    w = random_weights(cfg, seed=0)                    # name -> bf16 torch.Tensor (expert_bias f32)
    write_checkpoint(path, cfg, w, tok_json, tok_cfg)  # sharded safetensors + index + json files

Everything is deterministic: the same arguments give the same bytes. Needs torch, safetensors and
tokenizers; no network.
"""

import copy
import json
import math
import os

# The released LLaDA2.0-mini config.json, every field, with the sizes shrunk. make_config fills in
# the fields that derive from others (rotary_dim, max_window_layers, pad_token_id) unless
# overridden.
_BASE_CONFIG = {
    "architectures": ["LLaDA2MoeModelLM"],
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
        "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
        "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM",
    },
    "embedding_dropout": 0.0,
    "first_k_dense_replace": 1,
    "head_dim": 16,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 160,
    "max_position_embeddings": 2048,
    "max_window_layers": 3,
    "model_type": "llada2_moe",
    "moe_intermediate_size": 32,
    "moe_router_enable_expert_bias": True,
    "mtp_loss_scaling_factor": 0,
    "n_group": 4,
    "norm_head": False,
    "norm_softmax": False,
    "norm_topk_prob": True,
    "num_attention_heads": 4,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 3,
    "num_key_value_heads": 2,
    "num_nextn_predict_layers": 0,
    "num_shared_experts": 1,
    "output_dropout": 0.0,
    "output_router_logits": False,
    "pad_token_id": None,  # filled in by make_config: the id of <|endoftext|>
    "partial_rotary_factor": 0.5,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 600000,
    "rotary_dim": 8,
    "routed_scaling_factor": 2.5,
    "router_dtype": "fp32",
    "score_function": "sigmoid",
    "tie_word_embeddings": False,
    "topk_group": 2,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.52.3",
    "use_bias": False,
    "use_cache": True,
    "use_qkv_bias": False,
    "use_rmsnorm": True,
    "use_sliding_window": False,
    "vocab_size": 384,
}

class _Drop:
    def __repr__(self):
        return "DROP"


DROP = _Drop()  # make_config(field=DROP) removes the field


def make_config(**overrides):
    """A tiny LLaDA2MoeModelLM config.json dict; keyword arguments replace fields.

    A field set to the special value `DROP` is removed (to test the converter's errors)."""
    cfg = copy.deepcopy(_BASE_CONFIG)
    cfg.update({k: v for k, v in overrides.items() if v is not DROP})
    if "rotary_dim" not in overrides and "head_dim" in cfg:
        cfg["rotary_dim"] = int(cfg["head_dim"] * cfg.get("partial_rotary_factor", 1.0))
    if "max_window_layers" not in overrides:
        cfg["max_window_layers"] = cfg.get("num_hidden_layers", 0)
    if "pad_token_id" not in overrides:
        cfg["pad_token_id"] = special_token_ids(cfg.get("vocab_size", 384))["<|endoftext|>"]
    for k, v in overrides.items():
        if v is DROP:
            cfg.pop(k, None)
    return cfg


# ---- tokenizer ---------------------------------------------------------------------------------

# The LLaDA2 (Ling 2.0) added tokens, in their released order after the BPE vocabulary:
# <|endoftext|> is EOS and PAD, <|mask|> three after it, <|startoftext|> BOS (not added).
_SPECIAL_TOKENS = [
    ("<|startoftext|>", True),
    ("<|endoftext|>", True),
    ("<|arithmetic_start|>", True),
    ("<|arithmetic_end|>", True),
    ("<|mask|>", True),
    ("<|number_start|>", True),
    ("<|number_end|>", True),
    ("<|role_end|>", True),
    ("<role>", True),
    ("</role>", True),
    ("<think>", False),   # added but not special: token type "user defined"
    ("</think>", False),
]
_N_PAD = 16  # entries of vocab_size that the tokenizer leaves unused (the GGUF pads them)

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{ '<role>SYSTEM</role>' + message['content'] + '<|role_end|>' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ '<role>HUMAN</role>' + message['content'] + '<|role_end|>' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '<role>ASSISTANT</role>' + message['content'] + '<|role_end|>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<role>ASSISTANT</role>' }}{%- endif -%}"
)

_TRAIN_TEXT = """\
The quick brown fox jumps over the lazy dog. A diffusion language model writes a whole block of
text at once: it starts from masks and fills in the tokens it is most sure of, step after step.
What is 37 plus 48? It is 85. What is the capital of France? Paris is the capital of France.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 2024 3.14159. Mixture of experts layers send each
token to a few experts; the router picks them by score. Hello, world! How are you today? I am
fine, thank you. The weather is nice and the sun is shining over the hills and the river.
Once upon a time there was a little model that wanted to answer every question correctly.
She sells sea shells by the sea shore. Peter Piper picked a peck of pickled peppers.
<role>SYSTEM</role>You are a helpful assistant.<|role_end|><role>HUMAN</role>Hi!<|role_end|>
<role>ASSISTANT</role>Hello! How can I help you?<|role_end|>
def add(a, b):
    return a + b
for i in range(10):
    print(i * i)
Caf\u00e9, na\u00efve, \u00fcber, \u00e9t\u00e9, \u4f60\u597d, \u3053\u3093\u306b\u3061\u306f, \u041f\u0440\u0438\u0432\u0435\u0442.
"""

# The Ling/LLaDA2 pre-tokenizer regex (GPT-4 style splitting, then byte-level).
_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def special_token_ids(vocab_size):
    """The ids make_tokenizer(vocab_size) gives its added tokens: {text: id}."""
    first = vocab_size - _N_PAD - len(_SPECIAL_TOKENS)
    return {text: first + i for i, (text, _) in enumerate(_SPECIAL_TOKENS)}


def make_tokenizer(vocab_size):
    """A byte-level BPE tokenizer.json (str) and tokenizer_config.json (dict) for vocab_size,
    trained on a small mixed text (prose, numbers, code, non-Latin scripts)."""
    return train_bpe_tokenizer([_TRAIN_TEXT] * 4, vocab_size, min_frequency=1)


def train_bpe_tokenizer(lines, vocab_size, min_frequency=1):
    """A byte-level BPE in the LLaDA2 layout trained on `lines`: (tokenizer.json str,
    tokenizer_config.json dict). Deterministic for the same lines.

    The BPE part has vocab_size - 16 - 12 entries (the Ling pre-tokenizer regex: digits split one
    per token), then the 12 LLaDA2 added tokens; the last 16 ids are unused, as the released
    vocabulary is padded past its tokenizer. The models/demo tokenizer is built by this too."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    n_bpe = vocab_size - _N_PAD - len(_SPECIAL_TOKENS)
    if n_bpe < 256 + 8:
        raise ValueError(f"vocab_size {vocab_size} too small for a byte-level BPE (>= 292)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=n_bpe, min_frequency=min_frequency, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    tok.train_from_iterator(lines, trainer=trainer)
    # The trainer may stop short of n_bpe merges on a small text: pad the BPE vocabulary with
    # never-merged filler tokens so the added tokens land on fixed ids.
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    i = 0
    while len(vocab) < n_bpe:
        filler = f"\u0120filler{i}"
        i += 1
        if filler not in vocab:
            vocab[filler] = len(vocab)
    tok = Tokenizer.from_str(json.dumps(data, ensure_ascii=False))
    for text, special in _SPECIAL_TOKENS:
        t = AddedToken(text, special=special, normalized=False, single_word=False,
                       lstrip=False, rstrip=False)
        if special:
            tok.add_special_tokens([t])
        else:
            tok.add_tokens([t])
    ids = special_token_ids(vocab_size)
    for text, want in ids.items():
        if tok.token_to_id(text) != want:
            raise RuntimeError(f"added token {text!r} got id {tok.token_to_id(text)}, "
                               f"expected {want}")
    return tok.to_str(pretty=True), make_tokenizer_config(vocab_size)


def make_tokenizer_config(vocab_size):
    """tokenizer_config.json of a tokenizer made with the LLaDA2 special tokens at their ids
    (special_token_ids): added_tokens_decoder, the chat template, the special token names."""
    ids = special_token_ids(vocab_size)
    added = {}
    for text, special in _SPECIAL_TOKENS:
        added[str(ids[text])] = {
            "content": text, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": special,
        }
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "bos_token": "<|startoftext|>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "cls_token": "[CLS]",
        "eos_token": "<|endoftext|>",
        "fast_tokenizer": True,
        "gmask_token": "[gMASK]",
        "mask_token": "<|mask|>",
        "merges_file": None,
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "trust_remote_code": True,
        "vocab_file": None,
    }


# ---- weights -----------------------------------------------------------------------------------

def tensor_shapes(config):
    """[(name, shape, dtype_name)] of every tensor of the checkpoint, in the released order."""
    H = config["hidden_size"]
    hd = config["head_dim"]
    nq, nkv = config["num_attention_heads"], config["num_key_value_heads"]
    V = config["vocab_size"]
    inter, moe_i = config["intermediate_size"], config["moe_intermediate_size"]
    E, n_sh = config["num_experts"], config["num_shared_experts"]
    out = [("model.word_embeddings.weight", (V, H), "bf16")]
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [
            (p + "input_layernorm.weight", (H,), "bf16"),
            (p + "attention.query_key_value.weight", ((nq + 2 * nkv) * hd, H), "bf16"),
            (p + "attention.query_layernorm.weight", (hd,), "bf16"),
            (p + "attention.key_layernorm.weight", (hd,), "bf16"),
            (p + "attention.dense.weight", (H, nq * hd), "bf16"),
            (p + "post_attention_layernorm.weight", (H,), "bf16"),
        ]
        if n < config["first_k_dense_replace"]:
            out += [
                (p + "mlp.gate_proj.weight", (inter, H), "bf16"),
                (p + "mlp.up_proj.weight", (inter, H), "bf16"),
                (p + "mlp.down_proj.weight", (H, inter), "bf16"),
            ]
        else:
            out += [
                (p + "mlp.gate.weight", (E, H), "bf16"),
                (p + "mlp.gate.expert_bias", (E,), "f32"),
            ]
            for e in range(E):
                q = p + f"mlp.experts.{e}."
                out += [
                    (q + "gate_proj.weight", (moe_i, H), "bf16"),
                    (q + "up_proj.weight", (moe_i, H), "bf16"),
                    (q + "down_proj.weight", (H, moe_i), "bf16"),
                ]
            if n_sh > 0:
                q = p + "mlp.shared_experts."
                out += [
                    (q + "gate_proj.weight", (moe_i * n_sh, H), "bf16"),
                    (q + "up_proj.weight", (moe_i * n_sh, H), "bf16"),
                    (q + "down_proj.weight", (H, moe_i * n_sh), "bf16"),
                ]
    out += [
        ("model.norm.weight", (H,), "bf16"),
        ("lm_head.weight", (V, H), "bf16"),
    ]
    return out


def _std(name, shape, config):
    """The scale of a random tensor: norms near 1, matrices ~1/sqrt(fan_in), sharper lm_head."""
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        return None  # 1 + 0.1 N(0, 1)
    if name.endswith("expert_bias"):
        return 0.1
    if name == "model.word_embeddings.weight":
        return 1.0
    if name == "lm_head.weight":
        return 3.0 / math.sqrt(shape[1])
    return 1.0 / math.sqrt(shape[1])


def random_weights(config, seed=0):
    """{HF name: torch.Tensor}: bf16 weights (expert_bias f32), deterministic in seed."""
    import torch

    g = torch.Generator().manual_seed(int(seed))
    out = {}
    for name, shape, dt in tensor_shapes(config):
        x = torch.randn(shape, generator=g, dtype=torch.float32)
        std = _std(name, shape, config)
        x = 1.0 + 0.1 * x if std is None else x * std
        out[name] = x if dt == "f32" else x.to(torch.bfloat16)
    return out


# ---- writing -----------------------------------------------------------------------------------

def write_checkpoint(dir, config, weights, tokenizer_json, tokenizer_config, n_shards=2):
    """Write the checkpoint folder as released: model-0000K-of-0000N.safetensors shards with
    model.safetensors.index.json, config.json, generation_config.json, tokenizer.json,
    tokenizer_config.json, special_tokens_map.json. Returns dir."""
    from safetensors.torch import save_file

    os.makedirs(dir, exist_ok=True)
    names = list(weights)
    sizes = [weights[n].numel() * weights[n].element_size() for n in names]
    total = sum(sizes)
    n_shards = max(1, min(int(n_shards), len(names)))
    # Consecutive runs of tensors, cut where the running size passes k/n of the total.
    shards = [[] for _ in range(n_shards)]
    acc = 0
    for n, s in zip(names, sizes):
        k = min(n_shards - 1, int(acc * n_shards // max(total, 1)))
        shards[k].append(n)
        acc += s
    shards = [s for s in shards if s]
    n_shards = len(shards)
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({n: weights[n].contiguous() for n in shard}, os.path.join(dir, fname),
                  metadata={"format": "pt"})
        for n in shard:
            weight_map[n] = fname
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _write_json(os.path.join(dir, "model.safetensors.index.json"), index)
    _write_json(os.path.join(dir, "config.json"), config)
    _write_json(os.path.join(dir, "generation_config.json"),
                {"_from_model_config": True, "transformers_version": config.get(
                    "transformers_version", "4.52.3")})
    with open(os.path.join(dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(tokenizer_json)
    _write_json(os.path.join(dir, "tokenizer_config.json"), tokenizer_config)
    _write_json(os.path.join(dir, "special_tokens_map.json"), {
        k: tokenizer_config[k] for k in ("bos_token", "eos_token", "pad_token", "mask_token",
                                         "cls_token", "gmask_token") if k in tokenizer_config})
    return dir


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def make_checkpoint(dir, shape="base", seed=0, n_shards=2, **overrides):
    """One call: config of SHAPES[shape] (plus make_config overrides), tokenizer, random
    weights, written to dir. Returns (config, weights)."""
    cfg = make_config(**{**SHAPE_OVERRIDES[shape], **overrides})
    tok_json, tok_cfg = make_tokenizer(cfg["vocab_size"])
    w = random_weights(cfg, seed)
    write_checkpoint(dir, cfg, w, tok_json, tok_cfg, n_shards=n_shards)
    return cfg, w


# Named tiny shapes, each a full config. "base": grouped routing (4 groups, keep 2), 3 layers of
# which 1 dense, 8 experts top-2, 1 shared expert, GQA 4/2 heads of 16, hidden 64, vocab 384.
# ungrouped: n_group = topk_group = 1, top-3; dense2: 2 dense layers of 4; shared2: 2 shared
# experts; mha: 4/4 heads; wide: hidden 128, heads of 32 (GQA 4/1), 16 experts top-4 in 8 groups.
SHAPE_OVERRIDES = {
    "base": {},
    "ungrouped": dict(n_group=1, topk_group=1, num_experts_per_tok=3),
    "dense2": dict(num_hidden_layers=4, first_k_dense_replace=2),
    "shared2": dict(num_shared_experts=2),
    "mha": dict(num_key_value_heads=4),
    "wide": dict(hidden_size=128, head_dim=32, num_attention_heads=4, num_key_value_heads=1,
                 intermediate_size=320, moe_intermediate_size=64, num_experts=16,
                 num_experts_per_tok=4, n_group=8, topk_group=4, num_hidden_layers=2,
                 vocab_size=576),
}
SHAPES = {name: make_config(**o) for name, o in SHAPE_OVERRIDES.items()}


# ---- the family's other config and tensor layouts ------------------------------------------

# The fields of LLaDA2.0-mini's released config.json (2.1 has the same), exactly: no
# use_qk_norm (the modeling code defaults it to true), no rope_scaling, no norm_head.
RELEASED_MINI_KEYS = (
    "architectures", "attention_dropout", "auto_map", "embedding_dropout",
    "first_k_dense_replace", "head_dim", "hidden_act", "hidden_size", "intermediate_size",
    "max_position_embeddings", "max_window_layers", "model_type", "moe_intermediate_size",
    "moe_router_enable_expert_bias", "n_group", "norm_softmax", "norm_topk_prob",
    "num_attention_heads", "num_experts", "num_experts_per_tok", "num_hidden_layers",
    "num_key_value_heads", "num_shared_experts", "output_dropout", "output_router_logits",
    "pad_token_id", "partial_rotary_factor", "rms_norm_eps", "rope_theta", "rotary_dim",
    "routed_scaling_factor", "router_dtype", "score_function", "sliding_window",
    "tie_word_embeddings", "topk_group", "torch_dtype", "transformers_version", "use_bias",
    "use_cache", "use_qkv_bias", "use_rmsnorm", "use_sliding_window",
    "using_split_qkv_in_self_attention", "vocab_size",
)
_RELEASED_VALUES = {"sliding_window": 4096, "max_window_layers": 28, "use_cache": False,
                    "using_split_qkv_in_self_attention": False}


def released_mini_config(**overrides):
    """A config.json dict with exactly the fields of LLaDA2.0-mini's released one
    (RELEASED_MINI_KEYS), the sizes shrunk as make_config's."""
    base = {**make_config(**overrides), **_RELEASED_VALUES}
    cfg = {k: base[k] for k in RELEASED_MINI_KEYS}
    assert set(cfg) == set(RELEASED_MINI_KEYS)
    return cfg


def with_rope_parameters(cfg, rope_type="default"):
    """cfg as newer transformers write it: rope_theta and partial_rotary_factor moved into
    rope_parameters {rope_type, rope_theta, partial_rotary_factor}."""
    cfg = dict(cfg)
    rp = {"rope_type": rope_type, "rope_theta": cfg.pop("rope_theta")}
    if "partial_rotary_factor" in cfg:
        rp["partial_rotary_factor"] = cfg.pop("partial_rotary_factor")
    cfg["rope_parameters"] = rp
    return cfg


def merge_experts(config, weights):
    """(config, weights) of a dFactory (VeOmni) training checkpoint: model_type
    llada2_moe_veomni, each MoE layer's routed experts stacked into one tensor per projection,
    `model.layers.N.mlp.experts.{gate_proj,up_proj}` [E, moe_I, H] and `...down_proj`
    [E, H, moe_I] (the fused experts module's parameters)."""
    import torch

    config = {**config, "model_type": "llada2_moe_veomni"}
    out = {}
    for name, t in weights.items():
        if ".mlp.experts." not in name:
            out[name] = t
    for n in range(config["first_k_dense_replace"], config["num_hidden_layers"]):
        p = f"model.layers.{n}.mlp.experts."
        for proj in ("gate_proj", "up_proj", "down_proj"):
            out[p + proj] = torch.stack([weights[f"{p}{e}.{proj}.weight"]
                                         for e in range(config["num_experts"])])
    return config, out
