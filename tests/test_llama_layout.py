"""GGUFs in llama.cpp's layout (merged routed experts ffn_{gate,up,down}_exps, fused attn_qkv or
split attn_q/k/v, no embedded tokenizer.json, keys llama.cpp may leave out): written from the
test checkpoints by tide_cpp.convert.llama_layout, they load, and their outputs are bit-identical
to the same weights in this project's layout on cpu and sim under every residency policy."""

import struct

import numpy as np
import pytest

import decode_drive
from tide_cpp import Model, TideError
from tide_cpp import _lib
from tide_cpp.convert import llama_layout

BL = 8


@pytest.fixture(scope="module")
def llama_gguf(tiny_gguf, tmp_path_factory):
    """llama_gguf(shape, outtype, **options) -> (path in llama.cpp's layout, path in ours, cfg)."""
    root = tmp_path_factory.mktemp("llama_layout")
    cache = {}

    def get(shape="base", outtype="f32", **kw):
        key = (shape, outtype, tuple(sorted((k, repr(v)) for k, v in kw.items())))
        if key not in cache:
            src, cfg, _ = tiny_gguf(shape, outtype)
            dst = str(root / f"{shape}-{outtype}-{len(cache)}.gguf")
            llama_layout.convert(src, dst, **kw)
            cache[key] = (dst, src, cfg)
        return cache[key]

    return get


def drive(m, ids, n_steps=4):
    return decode_drive.drive(m, ids, BL, n_steps)


def run(path, ids, **kw):
    with Model(path, n_threads=2, **kw) as m:
        return drive(m, ids), m.hparams


def assert_same(got, want, what):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and np.array_equal(g, w), f"output {i} differs: {what}"


SIM_POLICIES = [("gpu", None, 1), ("cpu", None, 1), ("static", 3, 1), ("swap", 3, 1),
                ("tide", 3, 2), ("tide", 0, 1)]
LAYOUTS = {
    "merged": dict(),
    "merged-split-attn-align32": dict(split_attention=True, alignment=32),
}


@pytest.mark.parametrize("outtype", ["f32", "bf16", "q8_0"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_bit_identical_every_policy(llama_gguf, outtype, layout):
    llama, ours, cfg = llama_gguf("wide", outtype, **LAYOUTS[layout])
    ids = np.random.default_rng(1).integers(0, cfg["vocab_size"], 3 * BL)
    want, hp_ours = run(ours, ids, device="cpu")
    got, hp = run(llama, ids, device="cpu")
    assert_same(got, want, f"{layout} {outtype} on cpu")
    for k in ("expert_bytes", "nonexpert_bytes", "expert_type", "n_layer", "qk_norm", "mask_id"):
        assert hp[k] == hp_ours[k], k
    for policy, budget, tau in SIM_POLICIES:
        got, _ = run(llama, ids, device="sim", policy=policy, gpu_experts=budget,
                     refresh_interval=tau)
        assert_same(got, want, f"{layout} {outtype} on sim, {policy} B={budget} tau={tau}")


def test_shapes_and_tokenizer(llama_gguf):
    """Other shapes (2 shared experts, MHA, 2 dense layers) and the tokenizer from the GGML lists:
    same logits, same tokens, same chat prompt."""
    for shape in ("shared2", "mha", "dense2"):
        llama, ours, cfg = llama_gguf(shape, "bf16", split_attention=shape == "mha")
        ids = np.random.default_rng(2).integers(0, cfg["vocab_size"], 2 * BL)
        with Model(ours) as a, Model(llama) as b:
            assert np.array_equal(a.logits(ids, BL), b.logits(ids, BL)), shape
            assert b.metadata_string("tokenizer.huggingface.json") is None
            text = "hello world, 123"
            assert a.tokenize(text) == b.tokenize(text)
            msgs = [{"role": "user", "content": "hi"}]
            assert a.apply_chat_template(msgs) == b.apply_chat_template(msgs)
            assert (a.mask_token_id, a.eos_token_id) == (b.mask_token_id, b.eos_token_id)


def test_file_is_llama_cpp_layout(llama_gguf):
    from gguf import GGUFReader

    llama, ours, cfg = llama_gguf("base", "q8_0", split_attention=True)
    r = GGUFReader(llama)
    names = {t.name: t for t in r.tensors}
    E, H, fe = cfg["num_experts"], cfg["hidden_size"], cfg["moe_intermediate_size"]
    assert not any(".ffn_gate.0." in n or "attn_qkv" in n for n in names)
    assert [int(x) for x in names["blk.1.ffn_gate_exps.weight"].shape] == [H, fe, E]
    assert [int(x) for x in names["blk.1.ffn_down_exps.weight"].shape] == [fe, H, E]
    assert "blk.0.attn_q.weight" in names and "blk.0.attn_v.weight" in names
    f = r.fields
    assert f["general.architecture"].contents() == "llada2"
    assert "tokenizer.huggingface.json" not in f and "llada2.attention.qk_norm" not in f
    assert f["diffusion.shift_logits"].contents() is False
    assert f["tokenizer.ggml.mask_token_id"].contents() == Model(ours).mask_token_id


# Keys llama.cpp's loader requires of a llada2 / bailingmoe2 file (llama-model.cpp load_hparams:
# the generic keys, then the architecture's own), and the ones it reads when present.
LLAMA_CPP_REQUIRED = [
    "context_length", "embedding_length", "block_count", "feed_forward_length",
    "attention.head_count", "expert_count", "expert_used_count",
    "attention.layer_norm_rms_epsilon", "leading_dense_block_count",
    "expert_feed_forward_length", "expert_shared_feed_forward_length", "expert_shared_count",
    "expert_weights_scale", "expert_gating_func",
]
LLAMA_CPP_READ = [
    "attention.head_count_kv", "attention.key_length", "attention.value_length",
    "rope.dimension_count", "rope.freq_base", "expert_group_count", "expert_group_used_count",
    "expert_weights_norm", "vocab_size",
]


def test_converter_writes_llama_cpp_keys(tiny_gguf):
    from gguf import GGUFReader

    path, cfg, _ = tiny_gguf("base", "f32")
    f = GGUFReader(path).fields
    for k in LLAMA_CPP_REQUIRED + LLAMA_CPP_READ:
        assert f"llada2.{k}" in f, k
    assert f["llada2.expert_gating_func"].contents() == 2
    assert f["llada2.expert_shared_feed_forward_length"].contents() == \
        cfg["moe_intermediate_size"] * cfg["num_shared_experts"]
    for k in ("general.file_type", "tokenizer.ggml.model", "tokenizer.ggml.pre",
              "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
              "tokenizer.ggml.mask_token_id", "diffusion.shift_logits"):
        assert k in f, k


def test_absent_optional_keys_take_llama_cpp_defaults(llama_gguf):
    """A file without the keys llama.cpp treats as optional loads with the values llama.cpp's
    loader assumes; here they equal the written ones (ungrouped routing, head_dim = H / heads,
    vocab_size = the token count), so the outputs are unchanged."""
    drop = {f"llada2.{k}": None for k in (
        "attention.key_length", "attention.value_length", "expert_group_count",
        "expert_group_used_count", "vocab_size")}
    llama, ours, cfg = llama_gguf("ungrouped", "f32", set_keys=drop)
    ids = np.random.default_rng(3).integers(0, cfg["vocab_size"], 2 * BL)
    with Model(ours) as a, Model(llama) as b:
        assert np.array_equal(a.logits(ids, BL), b.logits(ids, BL))
        assert b.hparams["qk_norm"] == 1 and b.hparams["n_vocab"] == cfg["vocab_size"]
    # without expert_weights_norm, llama.cpp's default (false) holds: the logits change
    llama2, _, _ = llama_gguf("ungrouped", "f32", set_keys={"llada2.expert_weights_norm": None})
    with Model(ours) as a, Model(llama2) as b:
        assert b.hparams["expert_weights_norm"] == 0
        assert not np.array_equal(a.logits(ids, BL), b.logits(ids, BL))


def test_nextn_layers_are_skipped(llama_gguf):
    """block_count counts llama.cpp's multi-token-prediction layers (nextn_predict_layers, last);
    the diffusion forward runs the others, as llama.cpp's graph does."""
    llama, ours, cfg = llama_gguf("base", "f32", set_keys={
        "llada2.block_count": cfg_layers("base") + 1, "llada2.nextn_predict_layers": 1})
    ids = np.random.default_rng(4).integers(0, cfg["vocab_size"], 2 * BL)
    with Model(ours) as a, Model(llama) as b:
        assert b.hparams["n_layer"] == cfg["num_hidden_layers"]
        assert np.array_equal(a.logits(ids, BL), b.logits(ids, BL))


def cfg_layers(shape):
    import hf_checkpoint as hfc

    return hfc.make_config(**hfc.SHAPE_OVERRIDES[shape])["num_hidden_layers"]


# ---- bad merged / split tensors: the message names the tensor ----------------------------------

def after_name(data, name):
    key = struct.pack("<Q", len(name)) + name.encode()
    i = data.find(key)
    assert i >= 0 and data.find(key, i + 1) < 0, name
    return i + len(key)


def load_bad(tmp_path, data, *fragments):
    path = tmp_path / "bad.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(TideError) as ei:
        Model(str(path))
    for f in fragments:
        assert f in str(ei.value), f"{f!r} not in {str(ei.value)!r}"
    assert ei.value.status == _lib.ERR_MODEL


def test_bad_merged_tensors(llama_gguf, tmp_path):
    llama, _, cfg = llama_gguf("base", "f32")
    good = open(llama, "rb").read()
    E, H, fe = cfg["num_experts"], cfg["hidden_size"], cfg["moe_intermediate_size"]
    # one expert fewer in the merged up tensor
    d = bytearray(good)
    p = after_name(good, "blk.2.ffn_up_exps.weight")
    assert struct.unpack_from("<I", good, p)[0] == 3  # n_dims
    struct.pack_into("<Q", d, p + 4 + 16, E - 1)
    load_bad(tmp_path, d, f"tensor 'blk.2.ffn_up_exps.weight': shape [{H}, {fe}, {E - 1}], "
                          f"expected [{H}, {fe}, {E}]")
    # the merged gate tensor of layer 2 of another type than its up tensor
    d = bytearray(good)
    p = after_name(good, "blk.2.ffn_gate_exps.weight")
    typ = p + 4 + 3 * 8
    assert struct.unpack_from("<I", good, typ)[0] == 0  # f32
    struct.pack_into("<I", d, typ, 1)  # f16
    load_bad(tmp_path, d, "tensor 'blk.2.ffn_up_exps.weight': type f32, but its expert's "
                          "ffn_gate is f16")
    # the merged gate tensor missing: the per-expert tensors are looked for
    d = bytearray(good)
    p = after_name(good, "blk.1.ffn_up_exps.weight")
    d[p - 1:p] = b"x"
    load_bad(tmp_path, d, "tensor 'blk.1.ffn_up_exps.weight' is missing")


def test_bad_split_attention(llama_gguf, tmp_path):
    llama, _, cfg = llama_gguf("base", "f32", split_attention=True)
    good = open(llama, "rb").read()
    d = bytearray(good)
    p = after_name(good, "blk.2.attn_k.weight")
    d[p - 1:p] = b"x"
    load_bad(tmp_path, d, "tensor 'blk.2.attn_k.weight' is missing")
    d = bytearray(good)
    p = after_name(good, "blk.0.attn_v.weight")
    struct.pack_into("<Q", d, p + 4 + 8, 8)
    load_bad(tmp_path, d, "tensor 'blk.0.attn_v.weight': shape [64, 8]")


# ---- the writer and tide-cli info ---------------------------------------------------------------

def test_writer_cli_and_atomic_output(tiny_gguf, tmp_path, capsys):
    src, _, _ = tiny_gguf("base", "f32")
    dst = tmp_path / "out.gguf"
    assert llama_layout.main([src, str(dst), "--arch", "bailingmoe2"]) == 0
    from gguf import GGUFReader

    f = GGUFReader(str(dst)).fields
    assert f["general.architecture"].contents() == "bailingmoe2"
    assert "bailingmoe2.expert_count" in f and "diffusion.shift_logits" not in f
    with pytest.raises(TideError, match="expected 'llada2'"):
        Model(str(dst))
    # a source missing an expert: refused by name, and no output (not even a partial one)
    bad = tmp_path / "bad.gguf"
    data = bytearray(open(src, "rb").read())
    p = after_name(data, "blk.1.ffn_up.3.weight")
    data[p - 1:p] = b"x"
    bad.write_bytes(bytes(data))
    out = tmp_path / "never.gguf"
    assert llama_layout.main([str(bad), str(out)]) == 1
    assert "blk.1.ffn_up: expert tensors missing (3)" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("never.gguf.tmp*"))


def test_info_names_the_layout(llama_gguf, capsys):
    from tide_cpp.cli import main

    llama, ours, cfg = llama_gguf("base", "bf16", split_attention=True)
    assert main(["info", ours]) == 0
    a = capsys.readouterr().out
    assert "  layout: routed experts one tensor per expert matrix; attention fused attn_qkv" in a
    assert main(["info", llama]) == 0
    b = capsys.readouterr().out
    assert "  layout: routed experts merged per layer (ffn_*_exps); attention split attn_q/k/v" in b
    # the expert sizes agree (without alignment padding in the merged tensors)
    line = lambda s: next(x for x in s.splitlines() if "one expert:" in x)  # noqa: E731
    assert line(a).split("(")[1].split(";")[0] == line(b).split("(")[1].split(";")[0]
    assert f"routed experts: {cfg['num_experts']} per layer x 2 MoE layers" in b
