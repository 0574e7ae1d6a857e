"""HF tensor names -> GGUF tensor names, shapes and storage kinds, in the file's order
(CONTRACTS.md §1): a list of Entry, one per output tensor, one per routed expert matrix."""

from .errors import ConvertError
from .safetensors_reader import DTYPES


class Entry:
    """One output tensor. hf_shape is the checkpoint's (rows, cols); kind is 'f32' (norms, router,
    expert bias: always f32) or 'w' (a matrix stored as the outtype)."""
    __slots__ = ("gguf", "hf", "hf_shape", "kind")

    def __init__(self, gguf, hf, hf_shape, kind):
        self.gguf, self.hf, self.hf_shape, self.kind = gguf, hf, tuple(hf_shape), kind

    def __repr__(self):
        return f"Entry({self.gguf!r} <- {self.hf!r} {self.hf_shape} {self.kind})"


def plan(hp):
    """The ordered list of Entry for the hyperparameters hp (from hparams.hparams)."""
    g = lambda k: hp[k][0]  # noqa: E731
    H, V, L = g("embedding_length"), g("vocab_size"), g("block_count")
    hd, nq, nkv = g("_head_dim"), g("attention.head_count"), g("attention.head_count_kv")
    inter, moe_i = g("feed_forward_length"), g("expert_feed_forward_length")
    E, n_sh, n_dense = g("expert_count"), g("expert_shared_count"), g("leading_dense_block_count")
    qk_norm = g("attention.qk_norm")

    out = [Entry("token_embd.weight", "model.word_embeddings.weight", (V, H), "w")]
    for n in range(L):
        p, b = f"model.layers.{n}.", f"blk.{n}."
        out += [
            Entry(b + "attn_norm.weight", p + "input_layernorm.weight", (H,), "f32"),
            Entry(b + "attn_qkv.weight", p + "attention.query_key_value.weight",
                  ((nq + 2 * nkv) * hd, H), "w"),
        ]
        if qk_norm:
            out += [
                Entry(b + "attn_q_norm.weight", p + "attention.query_layernorm.weight", (hd,),
                      "f32"),
                Entry(b + "attn_k_norm.weight", p + "attention.key_layernorm.weight", (hd,),
                      "f32"),
            ]
        out += [
            Entry(b + "attn_output.weight", p + "attention.dense.weight", (H, nq * hd), "w"),
            Entry(b + "ffn_norm.weight", p + "post_attention_layernorm.weight", (H,), "f32"),
        ]
        if n < n_dense:
            out += [
                Entry(b + "ffn_gate.weight", p + "mlp.gate_proj.weight", (inter, H), "w"),
                Entry(b + "ffn_up.weight", p + "mlp.up_proj.weight", (inter, H), "w"),
                Entry(b + "ffn_down.weight", p + "mlp.down_proj.weight", (H, inter), "w"),
            ]
            continue
        out += [
            Entry(b + "ffn_gate_inp.weight", p + "mlp.gate.weight", (E, H), "f32"),
            Entry(b + "exp_probs_b.bias", p + "mlp.gate.expert_bias", (E,), "f32"),
        ]
        if n_sh:
            s = p + "mlp.shared_experts."
            out += [
                Entry(b + "ffn_gate_shexp.weight", s + "gate_proj.weight", (moe_i * n_sh, H), "w"),
                Entry(b + "ffn_up_shexp.weight", s + "up_proj.weight", (moe_i * n_sh, H), "w"),
                Entry(b + "ffn_down_shexp.weight", s + "down_proj.weight", (H, moe_i * n_sh), "w"),
            ]
        # Routed experts last: gate.0, up.0, down.0, gate.1, ... one contiguous range per layer.
        for e in range(E):
            x = p + f"mlp.experts.{e}."
            out += [
                Entry(b + f"ffn_gate.{e}.weight", x + "gate_proj.weight", (moe_i, H), "w"),
                Entry(b + f"ffn_up.{e}.weight", x + "up_proj.weight", (moe_i, H), "w"),
                Entry(b + f"ffn_down.{e}.weight", x + "down_proj.weight", (H, moe_i), "w"),
            ]
    out += [
        Entry("output_norm.weight", "model.norm.weight", (H,), "f32"),
        Entry("output.weight", "lm_head.weight", (V, H), "w"),
    ]
    return out


def bind(entries, tensors):
    """Check that every entry's HF tensor exists with its shape; {gguf name: TensorRef}."""
    refs = {}
    for e in entries:
        ref = tensors.get(e.hf)
        if ref is None:
            raise ConvertError(f"missing tensor {e.hf!r} (for {e.gguf})")
        if ref.shape != e.hf_shape:
            raise ConvertError(f"{ref.path}: tensor {e.hf!r} has shape {list(ref.shape)}, "
                               f"the config says {list(e.hf_shape)}")
        if ref.dtype not in DTYPES:
            raise ConvertError(f"{ref.path}: tensor {e.hf!r} has dtype {ref.dtype}, which the "
                               f"converter does not read (it reads {', '.join(DTYPES)})")
        refs[e.gguf] = ref
    return refs
