"""The converter: round trips of every tiny shape and outtype, and every bad input.

The expected layout is written out here from CONTRACTS.md §1, independently of tide_cpp/convert/."""

import json
import os
import shutil
import struct

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType, quants
from tokenizers import Tokenizer

import hf_checkpoint as hfc
from tide_cpp.convert import ConvertError, convert

OUTTYPES = ["f32", "f16", "bf16", "q8_0"]
FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}
ALIGN = 4096
SAMPLES = [
    "Hello, world! What is 37 plus 48?",
    "<role>HUMAN</role>Caf\u00e9 \u4f60\u597d<|role_end|><role>ASSISTANT</role><|mask|><|mask|>",
    "  spaces\tand\nnewlines  <think>x</think> 3.14159 <|endoftext|>",
]


# ---- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """shape -> (dir, config, weights, tokenizer_json); built once per module, lazily."""
    root = tmp_path_factory.mktemp("ckpt")
    cache = {}

    def get(shape):
        if shape not in cache:
            d = str(root / shape)
            cfg, w = hfc.make_checkpoint(d, shape, seed=1, n_shards=2 if shape != "wide" else 3)
            with open(os.path.join(d, "tokenizer.json"), encoding="utf-8") as f:
                cache[shape] = (d, cfg, w, f.read())
        return cache[shape]
    return get


@pytest.fixture
def out_dir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


def _copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _assert_nothing_left(out_dir):
    assert os.listdir(out_dir) == [], os.listdir(out_dir)


def _convert_fails(src, out_dir, match, outtype="bf16"):
    out = os.path.join(out_dir, "m.gguf")
    with pytest.raises(ConvertError) as ei:
        convert(src, out, outtype, progress=False)
    msg = str(ei.value)
    for m in ([match] if isinstance(match, str) else match):
        assert m in msg, msg
    assert "\n" not in msg
    _assert_nothing_left(out_dir)
    return msg


# ---- the expected layout (CONTRACTS.md §1) -----------------------------------------------------

def expected_tensors(cfg):
    """[(gguf name, HF name, kind)] in file order; kind 'f32' or 'w'."""
    out = [("token_embd.weight", "model.word_embeddings.weight", "w")]
    for n in range(cfg["num_hidden_layers"]):
        p, b = f"model.layers.{n}.", f"blk.{n}."
        out += [(b + "attn_norm.weight", p + "input_layernorm.weight", "f32"),
                (b + "attn_qkv.weight", p + "attention.query_key_value.weight", "w"),
                (b + "attn_q_norm.weight", p + "attention.query_layernorm.weight", "f32"),
                (b + "attn_k_norm.weight", p + "attention.key_layernorm.weight", "f32"),
                (b + "attn_output.weight", p + "attention.dense.weight", "w"),
                (b + "ffn_norm.weight", p + "post_attention_layernorm.weight", "f32")]
        if n < cfg["first_k_dense_replace"]:
            out += [(b + f"ffn_{m}.weight", p + f"mlp.{m}_proj.weight", "w")
                    for m in ("gate", "up", "down")]
            continue
        out += [(b + "ffn_gate_inp.weight", p + "mlp.gate.weight", "f32"),
                (b + "exp_probs_b.bias", p + "mlp.gate.expert_bias", "f32")]
        out += [(b + f"ffn_{m}_shexp.weight", p + f"mlp.shared_experts.{m}_proj.weight", "w")
                for m in ("gate", "up", "down")]
        out += [(b + f"ffn_{m}.{e}.weight", p + f"mlp.experts.{e}.{m}_proj.weight", "w")
                for e in range(cfg["num_experts"]) for m in ("gate", "up", "down")]
    out += [("output_norm.weight", "model.norm.weight", "f32"),
            ("output.weight", "lm_head.weight", "w")]
    return out


def expected_hparams(cfg):
    hd = cfg["head_dim"]
    return {
        "block_count": cfg["num_hidden_layers"],
        "context_length": cfg["max_position_embeddings"],
        "embedding_length": cfg["hidden_size"],
        "feed_forward_length": cfg["intermediate_size"],
        "expert_feed_forward_length": cfg["moe_intermediate_size"],
        "expert_count": cfg["num_experts"],
        "expert_used_count": cfg["num_experts_per_tok"],
        "expert_shared_count": cfg["num_shared_experts"],
        "expert_group_count": cfg["n_group"],
        "expert_group_used_count": cfg["topk_group"],
        "expert_weights_scale": float(cfg["routed_scaling_factor"]),
        "expert_weights_norm": True,
        "expert_gating_func": 2,
        "leading_dense_block_count": cfg["first_k_dense_replace"],
        "attention.head_count": cfg["num_attention_heads"],
        "attention.head_count_kv": cfg["num_key_value_heads"],
        "attention.key_length": hd,
        "attention.value_length": hd,
        "attention.layer_norm_rms_epsilon": float(cfg["rms_norm_eps"]),
        "attention.qk_norm": True,
        "rope.dimension_count": int(hd * cfg["partial_rotary_factor"]),
        "rope.freq_base": float(cfg["rope_theta"]),
        "vocab_size": cfg["vocab_size"],
        "expert_shared_feed_forward_length": (cfg["moe_intermediate_size"]
                                              * cfg["num_shared_experts"]),
    }


_U32, _F32, _BOOL = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.BOOL


def _field(reader, key):
    f = reader.get_field(key)
    assert f is not None, f"missing key {key}"
    return f


def _scalar(reader, key, vtype):
    f = _field(reader, key)
    assert f.types == [vtype], (key, f.types)
    return f.contents()


# ---- round trip --------------------------------------------------------------------------------

def _check_tensor(t, src, kind, outtype):
    """t: ReaderTensor; src: the source torch tensor."""
    hf_shape = tuple(src.shape)
    assert tuple(int(x) for x in t.shape) == tuple(reversed(hf_shape)), t.name
    src32 = src.float().numpy()
    if kind == "f32" or src.dim() == 1:
        assert t.tensor_type == QT.F32, t.name
        np.testing.assert_array_equal(t.data.reshape(hf_shape), src32)
        return
    if outtype == "f32":
        assert t.tensor_type == QT.F32
        np.testing.assert_array_equal(t.data.reshape(hf_shape), src32)
    elif outtype == "f16" or (outtype == "q8_0" and hf_shape[-1] % 32):
        assert t.tensor_type == QT.F16, t.name
        want = src.to(torch.float16).numpy()
        assert np.array_equal(t.data.reshape(hf_shape).view(np.uint16), want.view(np.uint16))
    elif outtype == "bf16":
        assert t.tensor_type == QT.BF16
        got = np.asarray(t.data).view(np.uint16).reshape(hf_shape)
        assert np.array_equal(got, src.view(torch.int16).numpy().view(np.uint16)), t.name
    else:
        assert t.tensor_type == QT.Q8_0
        got = np.asarray(t.data).reshape(-1)
        assert np.array_equal(got, quants.quantize(src32, QT.Q8_0).reshape(-1)), t.name
        deq = quants.dequantize(np.asarray(t.data), QT.Q8_0).reshape(hf_shape)
        blocks = src32.reshape(-1, 32)
        d = np.abs(blocks).max(axis=1, keepdims=True) / 127
        err = np.abs(deq.reshape(-1, 32) - blocks)
        assert (err <= d * (0.5 + 127 / 2048) + 1e-12).all(), t.name


@pytest.mark.parametrize("outtype", OUTTYPES)
@pytest.mark.parametrize("shape", list(hfc.SHAPES))
def test_round_trip(checkpoints, out_dir, shape, outtype):
    d, cfg, w, tok_json = checkpoints(shape)
    out = str(out_dir / "m.gguf")
    r = convert(d, out, outtype, progress=False)
    assert os.listdir(out_dir) == ["m.gguf"]
    reader = GGUFReader(out)

    # Tensors: names, order, types, values.
    want = expected_tensors(cfg)
    assert [t.name for t in reader.tensors] == [g for g, _, _ in want]
    assert r["n_tensors"] == len(want)
    for t, (g, hf, kind) in zip(reader.tensors, want):
        _check_tensor(t, w[hf], kind, outtype)
        assert t.data_offset % ALIGN == 0, t.name

    # Each MoE layer's experts: one contiguous run (gate.0, up.0, down.0, gate.1, ...) at the
    # end of the layer, each matrix page-aligned with only alignment padding between them.
    by_name = {t.name: t for t in reader.tensors}
    names = [t.name for t in reader.tensors]
    for n in range(cfg["first_k_dense_replace"], cfg["num_hidden_layers"]):
        run = [by_name[f"blk.{n}.ffn_{m}.{e}.weight"]
               for e in range(cfg["num_experts"]) for m in ("gate", "up", "down")]
        for a, b in zip(run, run[1:]):
            assert b.data_offset == a.data_offset + -(-a.n_bytes // ALIGN) * ALIGN
        last = names.index(run[-1].name)
        assert names[last + 1] in (f"blk.{n + 1}.attn_norm.weight", "output_norm.weight")

    # Metadata.
    assert _scalar(reader, "general.architecture", GGUFValueType.STRING) == "llada2"
    assert _scalar(reader, "general.alignment", _U32) == ALIGN
    assert _scalar(reader, "general.file_type", _U32) == FILE_TYPE[outtype]
    assert _scalar(reader, "general.name", GGUFValueType.STRING) == shape
    assert _scalar(reader, "general.quantization_version", _U32) == 2
    keys = {k for k in reader.fields if not k.startswith("GGUF.")}
    assert keys == ({"general." + k for k in ("architecture", "name", "alignment", "file_type",
                                              "quantization_version")}
                    | {"diffusion.shift_logits", "tokenizer.ggml.eot_token_id"}
                    | {"llada2." + k for k in expected_hparams(cfg)}
                    | {"tokenizer.ggml." + k for k in (
                        "model", "pre", "tokens", "token_type", "merges", "bos_token_id",
                        "eos_token_id", "padding_token_id", "mask_token_id", "add_bos_token")}
                    | {"tokenizer.chat_template", "tokenizer.huggingface.json"})
    for key, value in expected_hparams(cfg).items():
        vtype = _BOOL if isinstance(value, bool) else _F32 if isinstance(value, float) else _U32
        got = _scalar(reader, "llada2." + key, vtype)
        if vtype == _F32:
            assert got == pytest.approx(value, rel=1e-7), key
        else:
            assert got == value, key
    _check_tokenizer(reader, cfg, tok_json)


def _check_tokenizer(reader, cfg, tok_json):
    V = cfg["vocab_size"]
    ids = hfc.special_token_ids(V)
    orig = Tokenizer.from_str(tok_json)
    assert _scalar(reader, "tokenizer.ggml.model", GGUFValueType.STRING) == "gpt2"
    assert _scalar(reader, "tokenizer.ggml.pre", GGUFValueType.STRING)
    tokens = _field(reader, "tokenizer.ggml.tokens").contents()
    types = _field(reader, "tokenizer.ggml.token_type").contents()
    assert _field(reader, "tokenizer.ggml.token_type").types == [GGUFValueType.ARRAY,
                                                                 GGUFValueType.INT32]
    assert len(tokens) == len(types) == V
    n_real = orig.get_vocab_size(with_added_tokens=True)
    for i in range(V):
        if i < n_real:
            assert tokens[i] == orig.id_to_token(i)
        else:
            assert tokens[i] == f"[PAD{i}]" and types[i] == 5
    specials = {text for text, special in hfc._SPECIAL_TOKENS if special}
    for text, i in ids.items():
        assert types[i] == (3 if text in specials else 4), text
    assert all(types[i] == 1 for i in range(min(ids.values())))
    merges = _field(reader, "tokenizer.ggml.merges").contents()
    model_merges = json.loads(tok_json)["model"]["merges"]
    assert merges == [m if isinstance(m, str) else " ".join(m) for m in model_merges]
    assert _scalar(reader, "tokenizer.ggml.bos_token_id", _U32) == ids["<|startoftext|>"]
    assert _scalar(reader, "tokenizer.ggml.eos_token_id", _U32) == ids["<|endoftext|>"]
    assert _scalar(reader, "tokenizer.ggml.eot_token_id", _U32) == ids["<|role_end|>"]
    assert _scalar(reader, "tokenizer.ggml.padding_token_id", _U32) == ids["<|endoftext|>"]
    assert _scalar(reader, "tokenizer.ggml.mask_token_id", _U32) == ids["<|mask|>"]
    assert _scalar(reader, "tokenizer.ggml.add_bos_token", _BOOL) is False
    assert _scalar(reader, "tokenizer.chat_template", GGUFValueType.STRING) == hfc.CHAT_TEMPLATE
    embedded = _scalar(reader, "tokenizer.huggingface.json", GGUFValueType.STRING)
    assert embedded == tok_json
    rebuilt = Tokenizer.from_str(embedded)
    for text in SAMPLES:
        a, b = orig.encode(text, add_special_tokens=False), rebuilt.encode(text,
                                                                           add_special_tokens=False)
        assert a.ids == b.ids
        assert rebuilt.decode(b.ids, skip_special_tokens=False) == text


def test_q8_0_keeps_f16_for_rows_not_multiple_of_32(tmp_path, out_dir):
    """moe_intermediate_size 24: the experts' down rows are 24 long, so they stay f16."""
    d = str(tmp_path / "ck")
    cfg, w = hfc.make_checkpoint(d, "base", moe_intermediate_size=24)
    out = str(out_dir / "m.gguf")
    convert(d, out, "q8_0", progress=False)
    reader = GGUFReader(out)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.1.ffn_down.0.weight"] == QT.F16
    assert types["blk.1.ffn_down_shexp.weight"] == QT.F16
    assert types["blk.1.ffn_gate.0.weight"] == QT.Q8_0
    for t, (g, hf, kind) in zip(reader.tensors, expected_tensors(cfg)):
        _check_tensor(t, w[hf], kind, "q8_0")


def test_single_file_checkpoint_and_info(tmp_path, out_dir, capsys):
    """One model.safetensors without an index; then tide-cli info on the result."""
    from tide_cpp.cli import main
    d = str(tmp_path / "ck")
    cfg, w = hfc.make_checkpoint(d, "base", n_shards=1)
    os.remove(os.path.join(d, "model.safetensors.index.json"))
    os.rename(os.path.join(d, "model-00001-of-00001.safetensors"),
              os.path.join(d, "model.safetensors"))
    out = str(out_dir / "m.gguf")
    assert main(["convert", d, "-o", out, "--outtype", "q8_0", "-q"]) == 0
    assert main(["info", out]) == 0
    text = capsys.readouterr().out
    H, I, E = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_experts"]
    one = 3 * H * I // 32 * 34
    n_moe = cfg["num_hidden_layers"] - cfg["first_k_dense_replace"]
    assert f"({one} bytes;" in text
    assert "expert_count = 8" in text and "Q8_0" in text
    from tide_cpp.gguf_summary import summarize
    s = summarize(out)
    assert s["expert_bytes"] == one
    assert s["routed_expert_bytes"] == one * E * n_moe
    assert s["n_tensors"] == len(expected_tensors(cfg))


def test_cli_reports_error_and_exit_1(tmp_path, out_dir, capsys):
    from tide_cpp.cli import main
    out = str(out_dir / "m.gguf")
    assert main(["convert", str(tmp_path / "nowhere"), "-o", out, "-q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nowhere" in err and "Traceback" not in err
    _assert_nothing_left(out_dir)
    assert main(["info", str(tmp_path / "nowhere.gguf")]) == 1


# ---- bad input: each names its cause and leaves nothing at OUT ---------------------------------

def _rewrite_config(d, **changes):
    path = os.path.join(d, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    for k, v in changes.items():
        if v is hfc.DROP:
            cfg.pop(k)
        else:
            cfg[k] = v
    with open(path, "w") as f:
        json.dump(cfg, f)


@pytest.fixture
def ck(checkpoints, tmp_path):
    """A private copy of the base checkpoint, free to damage."""
    return _copy_ckpt(checkpoints("base")[0], tmp_path / "ck")


@pytest.mark.parametrize("field", ["hidden_size", "num_experts", "n_group", "rms_norm_eps",
                                   "score_function", "architectures"])
def test_missing_config_field(ck, out_dir, field):
    _rewrite_config(ck, **{field: hfc.DROP})
    _convert_fails(ck, out_dir, ["config.json", "missing field", f"'{field}'"])


@pytest.mark.parametrize("field,value", [("score_function", "softmax"), ("hidden_act", "gelu"),
                                         ("use_qkv_bias", True), ("num_experts", "8"),
                                         ("rope_scaling", {"type": "yarn"}),
                                         ("tie_word_embeddings", True), ("n_group", 3)])
def test_unsupported_config_value(ck, out_dir, field, value):
    _rewrite_config(ck, **{field: value})
    _convert_fails(ck, out_dir, ["config.json", f"'{field}'", repr(value)])


def test_unsupported_architecture(ck, out_dir):
    _rewrite_config(ck, architectures=["Qwen2ForCausalLM"])
    _convert_fails(ck, out_dir, ["unsupported architecture Qwen2ForCausalLM",
                                 "LLaDA2MoeModelLM"])


def test_missing_tensor(tmp_path, out_dir):
    cfg = hfc.SHAPES["base"]
    w = hfc.random_weights(cfg, 0)
    del w["model.layers.2.mlp.experts.5.up_proj.weight"]
    tj, tc = hfc.make_tokenizer(cfg["vocab_size"])
    d = hfc.write_checkpoint(str(tmp_path / "ck"), cfg, w, tj, tc)
    _convert_fails(d, out_dir, ["missing tensor", "'model.layers.2.mlp.experts.5.up_proj.weight'"])


def test_tensor_listed_in_index_but_absent_from_shard(ck, out_dir):
    path = os.path.join(ck, "model.safetensors.index.json")
    with open(path) as f:
        index = json.load(f)
    index["weight_map"]["model.layers.1.mlp.gate.weight"] = "model-00002-of-00002.safetensors"
    with open(path, "w") as f:
        json.dump(index, f)
    _convert_fails(ck, out_dir, ["model-00002-of-00002.safetensors", "missing tensor",
                                 "model.layers.1.mlp.gate.weight"])


def test_wrong_shape(tmp_path, out_dir):
    cfg = hfc.SHAPES["base"]
    w = hfc.random_weights(cfg, 0)
    w["model.layers.1.attention.dense.weight"] = w["model.layers.1.attention.dense.weight"][:, :32]
    tj, tc = hfc.make_tokenizer(cfg["vocab_size"])
    d = hfc.write_checkpoint(str(tmp_path / "ck"), cfg, w, tj, tc)
    _convert_fails(d, out_dir, ["model.layers.1.attention.dense.weight", "[64, 32]", "[64, 64]"])


def test_missing_shard_file(ck, out_dir):
    os.remove(os.path.join(ck, "model-00002-of-00002.safetensors"))
    _convert_fails(ck, out_dir, ["model-00002-of-00002.safetensors", "missing"])


def test_corrupt_safetensors_header(ck, out_dir):
    path = os.path.join(ck, "model-00001-of-00002.safetensors")
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8)
        f.write(b"{not json" + b" " * (n - 9))
    _convert_fails(ck, out_dir, ["model-00001-of-00002.safetensors", "corrupt", "JSON"])


def test_corrupt_safetensors_length(ck, out_dir):
    path = os.path.join(ck, "model-00002-of-00002.safetensors")
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", 1 << 40))
    _convert_fails(ck, out_dir, ["model-00002-of-00002.safetensors", "corrupt"])


def test_truncated_safetensors(ck, out_dir):
    path = os.path.join(ck, "model-00002-of-00002.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 1000)
    _convert_fails(ck, out_dir, ["model-00002-of-00002.safetensors", "truncated",
                                 f"the file has {size - 1000} bytes"])


def test_tokenizer_without_mask_token(ck, out_dir):
    path = os.path.join(ck, "tokenizer.json")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace("<|mask|>", "<|masc|>"))
    _convert_fails(ck, out_dir, ["tokenizer.json", "mask", "'<|mask|>'"])


def test_missing_config_file(ck, out_dir):
    os.remove(os.path.join(ck, "config.json"))
    _convert_fails(ck, out_dir, ["config.json", "missing"])


def test_unwritable_output(ck, tmp_path, out_dir):
    with pytest.raises(ConvertError, match="is a folder"):
        convert(ck, str(out_dir), "bf16", progress=False)
    with pytest.raises(ConvertError, match="does not exist"):
        convert(ck, str(tmp_path / "no" / "such" / "m.gguf"), "bf16", progress=False)
    _assert_nothing_left(out_dir)
    if os.geteuid() != 0:  # root writes anywhere
        os.chmod(out_dir, 0o500)
        try:
            with pytest.raises(ConvertError, match="cannot write"):
                convert(ck, str(out_dir / "m.gguf"), "bf16", progress=False)
        finally:
            os.chmod(out_dir, 0o700)
        _assert_nothing_left(out_dir)


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failure_while_writing_leaves_nothing(ck, out_dir, monkeypatch, exc):
    """A write error (disk full) or Ctrl-C in the middle of the tensor data removes the temp."""
    import tide_cpp.convert.hf_to_gguf as h
    calls = {"n": 0}
    real = h.encode

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 20:
            seen = os.listdir(out_dir)
            assert len(seen) == 1 and seen[0].startswith("m.gguf.tmp-")
            raise exc
        return real(*a, **k)

    monkeypatch.setattr(h, "encode", flaky)
    out = str(out_dir / "m.gguf")
    if isinstance(exc, KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            convert(ck, out, "bf16", progress=False)
    else:
        with pytest.raises(ConvertError, match="m.gguf: cannot write: No space left on device"):
            convert(ck, out, "bf16", progress=False)
    assert calls["n"] >= 20  # other threads may have run a few more slices
    _assert_nothing_left(out_dir)


def test_unknown_outtype(ck, out_dir):
    _convert_fails(ck, out_dir, ["unknown outtype", "'q2_k'"], outtype="q2_k")


# ---- Hugging Face Hub sources (no network: snapshot_download is replaced) -----------------------

def test_hub_repo_id_downloads_only_needed_files(checkpoints, out_dir, monkeypatch):
    import huggingface_hub
    d = checkpoints("base")[0]
    seen = {}

    def fake(repo_id, revision=None, allow_patterns=None, **kw):
        seen.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return d

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    out = str(out_dir / "m.gguf")
    convert("inclusionAI/LLaDA2.0-mini", out, "bf16", progress=False)
    assert seen["repo_id"] == "inclusionAI/LLaDA2.0-mini"
    pats = seen["allow_patterns"]
    assert "config.json" in pats and "*.safetensors" in pats and "tokenizer.json" in pats
    assert not any(p in ("*", "*.bin", "*.pt") for p in pats)
    assert GGUFReader(out).get_field("general.name").contents() == "LLaDA2.0-mini"


def test_hub_offline_or_not_found(out_dir, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*a, **k):
        raise LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known\n"
                                      "An error happened ...")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    msg = _convert_fails("someone/some-model", out_dir, ["someone/some-model", "offline"])
    assert "Name or service not known" in msg

    class RepositoryNotFoundError(Exception):
        pass

    def missing(*a, **k):
        raise RepositoryNotFoundError("404 Client Error. Repository Not Found for url")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", missing)
    _convert_fails("someone/some-model", out_dir, ["someone/some-model", "not found"])
    _convert_fails("not a repo id", out_dir, ["no such folder"])


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_slicing_and_threads_do_not_change_the_bytes(checkpoints, out_dir, monkeypatch, outtype):
    """Tensors streamed in slices of a few rows, on 1 or 3 threads: the same file, byte for byte."""
    import tide_cpp.convert.hf_to_gguf as h
    d = checkpoints("wide")[0]
    ref = str(out_dir / "ref.gguf")
    convert(d, ref, outtype, progress=False, threads=1)
    monkeypatch.setattr(h, "CHUNK_BYTES", 700)  # 2-5 rows a slice, odd splits of every matrix
    for threads in (1, 3):
        out = str(out_dir / f"t{threads}.gguf")
        convert(d, out, outtype, progress=False, threads=threads)
        with open(ref, "rb") as a, open(out, "rb") as b:
            assert a.read() == b.read(), threads


def test_progress_shows_bytes_and_tensors(checkpoints, out_dir, capsys):
    d, cfg, _, _ = checkpoints("base")
    convert(d, str(out_dir / "m.gguf"), "bf16", progress=True)
    err = capsys.readouterr().err
    n = len(expected_tensors(cfg))
    assert f"{n}/{n} tensors" in err and "B/s" in err


def test_unknown_config_field_is_named(ck, out_dir, capsys):
    """A field the converter does not know is not silently dropped: it is named on stderr."""
    _rewrite_config(ck, some_new_switch=True)
    convert(ck, str(out_dir / "m.gguf"), "bf16", progress=False)
    assert "config.json fields not used: some_new_switch" in capsys.readouterr().err


def test_unreadable_dtype(tmp_path, out_dir):
    cfg = hfc.SHAPES["base"]
    w = hfc.random_weights(cfg, 0)
    w["model.layers.0.mlp.up_proj.weight"] = torch.zeros(160, 64, dtype=torch.int32)
    w["some.int64.buffer"] = torch.zeros(3, dtype=torch.int64)  # unused: no error for it
    tj, tc = hfc.make_tokenizer(cfg["vocab_size"])
    d = hfc.write_checkpoint(str(tmp_path / "ck"), cfg, w, tj, tc)
    _convert_fails(d, out_dir, ["'model.layers.0.mlp.up_proj.weight'", "dtype I32"])


# ---- the family: released key set, newer configs, training checkpoints, LLaDA2.2 -------------

def _tensor_bytes(path):
    r = GGUFReader(path)
    return {t.name: bytes(t.data.tobytes()) for t in r.tensors}, r


def _write(d, cfg, w):
    tj, tc = hfc.make_tokenizer(cfg["vocab_size"])
    return hfc.write_checkpoint(str(d), cfg, w, tj, tc)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A checkpoint whose config.json has exactly the fields of LLaDA2.0-mini's released one,
    and its f32 GGUF: (dir, config, weights, gguf path)."""
    root = tmp_path_factory.mktemp("released")
    cfg = hfc.released_mini_config()
    w = hfc.random_weights(cfg, 3)
    d = _write(root / "ck", cfg, w)
    out = str(root / "released.gguf")
    convert(d, out, "f32", progress=False)
    return d, cfg, w, out


def test_released_key_set_converts_and_matches_the_reference(released, capsys):
    d, cfg, w, out = released
    assert set(cfg) == set(hfc.RELEASED_MINI_KEYS) and "use_qk_norm" not in cfg
    convert(d, out + ".again", "f32", progress=False)
    err = capsys.readouterr().err
    assert "not used" not in err, err   # every released field is read or known irrelevant
    r = GGUFReader(out)
    assert _scalar(r, "llada2.attention.qk_norm", _BOOL) is True   # absent: true
    assert _scalar(r, "llada2.rope.freq_base", _F32) == pytest.approx(cfg["rope_theta"])
    import reference
    from tide_cpp.model import Model
    ids = np.random.default_rng(0).integers(0, cfg["vocab_size"] - 32, 40)
    with Model(out, device="cpu", n_threads=1) as m:
        got = m.logits(ids, block_length=8)
    with torch.no_grad():
        want = reference.forward(cfg, w, torch.as_tensor(ids), 8).numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_rope_parameters_give_the_same_file(released, tmp_path):
    d, cfg, w, out = released
    d2 = _write(tmp_path / "rp", hfc.with_rope_parameters(cfg), w)
    out2 = str(tmp_path / "rp.gguf")
    convert(d2, out2, "f32", progress=False)
    (a, ra), (b, rb) = _tensor_bytes(out), _tensor_bytes(out2)
    assert a == b
    for key in ("llada2.rope.freq_base", "llada2.rope.dimension_count"):
        assert ra.get_field(key).contents() == rb.get_field(key).contents()


@pytest.mark.parametrize("rope,match", [
    ({"rope_type": "yarn", "rope_theta": 600000.0, "factor": 4.0}, ["rope_type", "'yarn'"]),
    ({"rope_type": "default"}, ["rope_parameters.rope_theta"]),
    ({"rope_type": "default", "rope_theta": -1.0}, ["rope_parameters.rope_theta", "-1.0"]),
    ("600000", ["rope_parameters", "not an object"]),
])
def test_bad_rope_parameters(ck, out_dir, rope, match):
    _rewrite_config(ck, rope_parameters=rope, rope_theta=hfc.DROP)
    _convert_fails(ck, out_dir, ["config.json"] + match)


def test_rope_parameters_disagreeing_with_top_level(ck, out_dir):
    _rewrite_config(ck, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    _convert_fails(ck, out_dir, ["'rope_theta'", "disagrees", "rope_parameters.rope_theta"])


def test_merged_experts_of_a_training_checkpoint(checkpoints, tmp_path, capsys):
    d, cfg, w, _ = checkpoints("base")
    mcfg, mw = hfc.merge_experts(cfg, w)
    assert any(k.endswith("mlp.experts.gate_proj") for k in mw)
    assert not any(".mlp.experts.0." in k for k in mw)
    dm = _write(tmp_path / "veomni", mcfg, mw)
    plain, merged = str(tmp_path / "plain.gguf"), str(tmp_path / "merged.gguf")
    convert(d, plain, "bf16", progress=False)
    convert(dm, merged, "bf16", progress=False)
    assert "not used" not in capsys.readouterr().err   # every merged tensor was split and used
    a, _ = _tensor_bytes(plain)
    b, _ = _tensor_bytes(merged)
    assert list(a) == list(b) and a == b


def test_merged_experts_of_another_layout(checkpoints, tmp_path, out_dir):
    d, cfg, w, _ = checkpoints("base")
    mcfg, mw = hfc.merge_experts(cfg, w)
    name = "model.layers.1.mlp.experts.down_proj"
    mw[name] = mw[name].transpose(1, 2).contiguous()   # [E, moe_I, H]: not the layout read
    dm = _write(tmp_path / "other", mcfg, mw)
    _convert_fails(dm, out_dir, [f"'{name}'", "merged", "[num_experts, hidden_size, "
                                 "moe_intermediate_size]"])


def test_llada22_is_refused_with_what_it_lacks(ck, out_dir):
    _rewrite_config(ck, expert_capacity=48, rope_theta=3000000.0)
    _convert_fails(ck, out_dir, ["'expert_capacity'", "LLaDA2.2", "block routing",
                                 "DELETE/SPLIT"])


def test_unknown_model_type(ck, out_dir):
    _rewrite_config(ck, model_type="llada2_moe_v3")
    _convert_fails(ck, out_dir, ["'model_type'", "'llada2_moe_v3'", "llada2_moe_veomni"])


def test_llama_cpp_keys(checkpoints, out_dir):
    d, cfg, _, _ = checkpoints("shared2")
    out = str(out_dir / "m.gguf")
    convert(d, out, "bf16", progress=False)
    r = GGUFReader(out)
    assert _scalar(r, "diffusion.shift_logits", _BOOL) is False
    assert _scalar(r, "llada2.expert_shared_feed_forward_length", _U32) == \
        2 * cfg["moe_intermediate_size"]
    assert _scalar(r, "llada2.expert_gating_func", _U32) == 2


def test_no_eot_key_without_role_end(tmp_path, out_dir):
    # a vocabulary without <|role_end|>: no EOT key (EOS alone ends generation)
    cfg = hfc.SHAPES["base"]
    tj, tc = hfc.make_tokenizer(cfg["vocab_size"])
    doc = json.loads(tj)
    for t in doc["added_tokens"]:
        if t["content"] == "<|role_end|>":
            t["content"] = "<|role_end_unused|>"
    d = hfc.write_checkpoint(str(tmp_path / "ck"), cfg, hfc.random_weights(cfg, 0),
                             json.dumps(doc), tc)
    out = str(out_dir / "m.gguf")
    convert(d, out, "bf16", progress=False)
    assert GGUFReader(out).get_field("tokenizer.ggml.eot_token_id") is None
