"""config.json -> the llada2.* hyperparameters of the GGUF (CONTRACTS.md §1), validated.

Every field the forward pass depends on is read here; a missing one, a value of the wrong type,
or a value the engine does not implement is refused with the field's name.
"""

import numbers

from .errors import ConvertError

ARCH = "LLaDA2MoeModelLM"
GATING_SIGMOID = 2  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID

# GGUF key (without the llada2. prefix) -> (type, config field)
_REQUIRED_INT = {
    "block_count": "num_hidden_layers",
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "expert_feed_forward_length": "moe_intermediate_size",
    "expert_count": "num_experts",
    "expert_used_count": "num_experts_per_tok",
    "expert_shared_count": "num_shared_experts",
    "expert_group_count": "n_group",
    "expert_group_used_count": "topk_group",
    "leading_dense_block_count": "first_k_dense_replace",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "vocab_size": "vocab_size",
}
_REQUIRED_FLOAT = {
    "expert_weights_scale": "routed_scaling_factor",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
}
# Fields whose value must be one the engine implements: field -> (allowed values, default when
# absent; _REQ when the field must be present).
_REQ = object()
_FIXED = {
    "score_function": (("sigmoid",), _REQ),
    "hidden_act": (("silu",), "silu"),
    "moe_router_enable_expert_bias": ((True,), True),
    "use_qkv_bias": ((False,), False),
    "use_bias": ((False,), False),
    "tie_word_embeddings": ((False,), False),
    "rope_scaling": ((None,), None),
    "use_sliding_window": ((False,), False),
    "norm_head": ((False,), False),
    "router_dtype": (("fp32", "float32", None), None),
}


# Fields of the released config.json that change nothing the engine computes (training, serving,
# remote code); any field outside these and the ones read above is reported as unused.
_IGNORED = {
    "architectures", "model_type", "auto_map", "attention_dropout", "embedding_dropout",
    "output_dropout", "initializer_range", "max_window_layers", "mtp_loss_scaling_factor",
    "num_nextn_predict_layers", "norm_softmax", "output_router_logits", "pad_token_id",
    "bos_token_id", "eos_token_id", "torch_dtype", "dtype", "transformers_version", "use_cache",
    "use_rmsnorm", "sliding_window", "head_dim", "partial_rotary_factor", "rotary_dim",
    "norm_topk_prob", "use_qk_norm", "moe_shared_expert_intermediate_size",
    "using_split_qkv_in_self_attention", "_name_or_path",
}


def unused_fields(cfg):
    """Fields of cfg that the converter neither reads nor knows to be irrelevant."""
    known = set(_REQUIRED_INT.values()) | set(_REQUIRED_FLOAT.values()) | set(_FIXED) | _IGNORED
    return sorted(set(cfg) - known)


def _field(cfg, name):
    if name not in cfg:
        raise ConvertError(f"config.json: missing field '{name}'")
    return cfg[name]


def _int(cfg, name, minimum=1):
    v = _field(cfg, name)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum:
        raise ConvertError(f"config.json: field '{name}' = {v!r} is not an integer >= {minimum}")
    return int(v)


def _float(cfg, name):
    v = _field(cfg, name)
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (v == v) or v <= 0:
        raise ConvertError(f"config.json: field '{name}' = {v!r} is not a positive number")
    return float(v)


def _bool(cfg, name, default):
    v = cfg.get(name, default)
    if not isinstance(v, bool):
        raise ConvertError(f"config.json: field '{name}' = {v!r} is not true or false")
    return v


def _unsupported(name, v, why):
    raise ConvertError(f"config.json: field '{name}' = {v!r} is not supported ({why})")


def check_architecture(cfg):
    archs = _field(cfg, "architectures")
    if not isinstance(archs, list) or not archs:
        raise ConvertError(f"config.json: field 'architectures' = {archs!r} is not a list")
    if archs != [ARCH]:
        raise ConvertError(f"unsupported architecture {', '.join(map(str, archs))}: "
                           f"tide.cpp converts {ARCH} (LLaDA2.0) only")
    mt = cfg.get("model_type", "llada2_moe")
    if mt != "llada2_moe":
        _unsupported("model_type", mt, "expected 'llada2_moe'")


def hparams(cfg):
    """{gguf key without prefix: (value, kind)} with kind in u32, f32, bool; plus derived sizes
    under '_' keys (head_dim, rotary_dim) for the tensor plan."""
    check_architecture(cfg)
    out = {}
    for key, field in _REQUIRED_INT.items():
        minimum = 0 if field in ("first_k_dense_replace", "num_shared_experts") else 1
        out[key] = (_int(cfg, field, minimum), "u32")
    for key, field in _REQUIRED_FLOAT.items():
        out[key] = (_float(cfg, field), "f32")
    for field, (allowed, default) in _FIXED.items():
        v = _field(cfg, field) if default is _REQ else cfg.get(field, default)
        if v not in allowed or type(v) is not type(allowed[0]) and v is not None:
            _unsupported(field, v, "expected " + " or ".join(repr(a) for a in allowed))
    out["expert_weights_norm"] = (_bool(cfg, "norm_topk_prob", True), "bool")
    out["expert_gating_func"] = (GATING_SIGMOID, "u32")
    out["attention.qk_norm"] = (_bool(cfg, "use_qk_norm", True), "bool")

    H, nq = out["embedding_length"][0], out["attention.head_count"][0]
    nkv = out["attention.head_count_kv"][0]
    hd = _int(cfg, "head_dim") if "head_dim" in cfg and cfg["head_dim"] is not None else H // nq
    out["attention.key_length"] = (hd, "u32")
    out["attention.value_length"] = (hd, "u32")
    if "partial_rotary_factor" in cfg:
        prf = _float(cfg, "partial_rotary_factor")
        if prf > 1:
            _unsupported("partial_rotary_factor", prf, "must be in (0, 1]")
        rot = int(hd * prf)
        if "rotary_dim" in cfg and cfg["rotary_dim"] is not None and \
                _int(cfg, "rotary_dim") != rot:
            _unsupported("rotary_dim", cfg["rotary_dim"],
                         f"disagrees with head_dim * partial_rotary_factor = {rot}")
    elif "rotary_dim" in cfg and cfg["rotary_dim"] is not None:
        rot = _int(cfg, "rotary_dim")
    else:
        raise ConvertError("config.json: missing field 'partial_rotary_factor'")
    if rot % 2 or rot < 2 or rot > hd:
        _unsupported("partial_rotary_factor", cfg.get("partial_rotary_factor"),
                     f"rotary dims {rot} must be even and within head_dim {hd}")
    out["rope.dimension_count"] = (rot, "u32")

    # Consistency the engine relies on.
    L = out["block_count"][0]
    E = out["expert_count"][0]
    k = out["expert_used_count"][0]
    g, gk = out["expert_group_count"][0], out["expert_group_used_count"][0]
    if nq % nkv:
        _unsupported("num_key_value_heads", nkv, f"must divide num_attention_heads = {nq}")
    if out["leading_dense_block_count"][0] > L:
        _unsupported("first_k_dense_replace", out["leading_dense_block_count"][0],
                     f"more than num_hidden_layers = {L}")
    if k > E:
        _unsupported("num_experts_per_tok", k, f"more than num_experts = {E}")
    if E % g:
        _unsupported("n_group", g, f"must divide num_experts = {E}")
    if gk > g:
        _unsupported("topk_group", gk, f"more than n_group = {g}")
    if g > 1 and E // g < 2:
        _unsupported("n_group", g, "each group needs at least 2 experts (group score = top-2 sum)")
    if gk * (E // g) < k:
        _unsupported("topk_group", gk, f"the kept groups hold fewer than num_experts_per_tok = {k}"
                     " experts")
    out["_head_dim"] = (hd, None)
    out["_rotary_dim"] = (rot, None)
    return out
