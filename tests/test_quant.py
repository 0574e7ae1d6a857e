"""Quantized weights (q4_0, q4_k, q5_k, q6_k): byte layouts against gguf.quants, the converter's
mixes and fallbacks, `tide-cli quantize`, and the engine against the PyTorch reference run on the
file's own dequantized weights (gguf.quants.dequantize).

The oracle for the layouts is the gguf package: its dequantize for every type, its quantize for
q4_0 / q8_0 (it has no k-quant quantizer). That our quantizer writes the bytes of ggml's own
(llama.cpp's quantizer without an importance matrix) is measured by bench/bench_quant_quality.py
against the ggml library, which is not a dependency of the project.
"""

import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, quants

import hf_checkpoint as hfc
import reference as ref
from tide_cpp.convert import convert
from tide_cpp.convert.errors import ConvertError
from tide_cpp.convert.hparams import hparams
from tide_cpp.convert.quant import fallback, keeps_f32, mix_type, use_more_bits
from tide_cpp.convert.requantize import requantize
from tide_cpp.convert.tensor_map import plan
from tide_cpp import Model, _lib

QTYPES = [QT.Q4_0, QT.Q4_K, QT.Q5_K, QT.Q6_K]
MIXES = ["q4_0", "q4_k_m", "q5_k_m", "q6_k"]
# every matrix a whole number of 256-value blocks, so the k-quants are used as such
K_SHAPE = dict(hidden_size=256, head_dim=64, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=3)
TOL = 1e-4


def _rows(seed, rows, cols, scale=0.05):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
    x[0, :] = 0.0                                  # an all-zero row
    x[1, :32] = 1e-20                              # below the "all zero" threshold
    x[2, :] = rng.standard_t(2, cols).astype(np.float32) * scale  # outliers
    x[3, 5] = 40.0                                 # one huge value
    return x


@pytest.mark.parametrize("qt", QTYPES + [QT.Q8_0])
def test_dequantize_matches_gguf(qt):
    x = _rows(1, 16, 512)
    q = _lib.quantize(x, int(qt))
    assert q.nbytes == 16 * _lib.type_row_bytes(int(qt), 512)
    ours = _lib.dequantize(q, int(qt), x.shape)
    theirs = quants.dequantize(q.reshape(16, -1), qt).astype(np.float32)
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))
    # and the quantization is a sane one: error well below the values' spread
    err = np.sqrt(np.mean((ours[4:] - x[4:]) ** 2)) / np.sqrt(np.mean(x[4:] ** 2))
    assert err < {QT.Q4_0: 0.15, QT.Q4_K: 0.12, QT.Q5_K: 0.06, QT.Q6_K: 0.03, QT.Q8_0: 0.01}[qt]


@pytest.mark.parametrize("qt", [QT.Q4_0, QT.Q8_0])
def test_quantize_bytes_match_gguf(qt):
    x = _rows(2, 8, 256)
    assert np.array_equal(_lib.quantize(x, int(qt)), quants.quantize(x, qt).reshape(-1))


def test_quantize_sources_and_threads():
    """bf16 and f16 sources give the bytes of their f32 values; thread count changes nothing."""
    x = _rows(3, 64, 256)
    bf = (x.view(np.uint32) >> 16).astype(np.uint16)
    xb = (bf.astype(np.uint32) << 16).view(np.float32)
    for qt in QTYPES:
        a = _lib.quantize(bf, int(qt), n_threads=1)
        assert np.array_equal(a, _lib.quantize(xb, int(qt), n_threads=3))
        h = x.astype(np.float16)
        assert np.array_equal(_lib.quantize(h, int(qt), 2), _lib.quantize(h.astype(np.float32), int(qt), 1))


def test_quantize_errors():
    x = np.zeros((2, 96), np.float32)
    with pytest.raises(_lib.TideError, match="row length 96 is not a multiple of the type's block"):
        _lib.quantize(x, int(QT.Q4_K))
    with pytest.raises(_lib.TideError, match="type 3 is not one this build computes"):
        _lib.quantize(np.zeros((2, 64), np.float32), 3)
    assert _lib.type_row_bytes(int(QT.Q6_K), 512) == 420 and _lib.type_row_bytes(int(QT.Q4_0), 40) == 0


def test_mix_rules():
    n = 20
    more = [i for i in range(n) if use_more_bits(i, n)]
    assert more[:3] == [0, 1, 4] and 19 in more and 3 not in more
    assert mix_type("blk.3.ffn_gate.7.weight", "q4_k_m", n) == QT.Q4_K
    assert mix_type("blk.3.ffn_down.7.weight", "q4_k_m", n) == QT.Q6_K
    assert mix_type("blk.3.ffn_down_shexp.weight", "q4_k_m", n) == QT.Q4_K
    assert mix_type("blk.4.ffn_down_shexp.weight", "q4_k_m", n) == QT.Q6_K
    assert mix_type("blk.3.attn_qkv.weight", "q4_k_m", n) == QT.Q5_K
    assert mix_type("blk.3.attn_qkv.weight", "q5_k_m", n) == QT.Q6_K
    assert mix_type("output.weight", "q4_0", n) == QT.Q6_K
    assert mix_type("token_embd.weight", "q4_k_m", n) == QT.Q4_K
    assert mix_type("blk.0.ffn_up.0.weight", "q6_k", n) == QT.Q6_K
    assert fallback(QT.Q4_K, 64) == (QT.Q4_0, "rows of 64 values are not a multiple of q4_k's "
                                              "block of 256: stored as q4_0")
    assert fallback(QT.Q6_K, 96)[0] == QT.Q8_0 and fallback(QT.Q4_K, 40)[0] == QT.F16
    assert fallback(QT.Q5_K, 512) == (QT.Q5_K, None)


def test_keeps_f32_is_the_converter_rule():
    for shape in hfc.SHAPES.values():
        for e in plan(hparams(shape)):
            assert keeps_f32(e.gguf, e.hf_shape) == (e.kind == "f32"), e


# ---- files ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kq_ckpt(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("kq") / "ckpt")
    cfg, w = hfc.make_checkpoint(d, **K_SHAPE)
    return d, cfg, w


@pytest.fixture(scope="module")
def kq_files(kq_ckpt, tmp_path_factory):
    d, cfg, w = kq_ckpt
    root = tmp_path_factory.mktemp("kq_gguf")
    files = {}
    for t in ["bf16"] + MIXES:
        files[t] = str(root / f"{t}.gguf")
        convert(d, files[t], outtype=t, progress=False)
    return files


def _types(path):
    return {t.name: QT(int(t.tensor_type)) for t in GGUFReader(path).tensors}


def _dequantized_weights(path, cfg):
    """{HF name: f32 tensor} of a GGUF's stored weights, dequantized by gguf.quants."""
    by_gguf = {e.gguf: e for e in plan(hparams(cfg))}
    out = {}
    for t in GGUFReader(path).tensors:
        e = by_gguf[t.name]
        a = quants.dequantize(t.data, QT(int(t.tensor_type))).astype(np.float32)
        out[e.hf] = torch.from_numpy(np.ascontiguousarray(a.reshape(e.hf_shape)))
    return out


def test_mix_types_in_file(kq_files):
    t = _types(kq_files["q4_k_m"])
    assert t["blk.1.ffn_gate.0.weight"] == QT.Q4_K and t["blk.2.ffn_up.7.weight"] == QT.Q4_K
    assert t["blk.1.ffn_down.3.weight"] == QT.Q6_K
    assert t["blk.1.attn_qkv.weight"] == QT.Q5_K and t["output.weight"] == QT.Q6_K
    assert t["blk.1.ffn_gate_inp.weight"] == QT.F32 and t["blk.1.exp_probs_b.bias"] == QT.F32
    assert t["blk.0.attn_norm.weight"] == QT.F32
    assert set(_types(kq_files["q6_k"]).values()) == {QT.Q6_K, QT.F32}
    t0 = _types(kq_files["q4_0"])
    assert t0["blk.2.ffn_down.0.weight"] == QT.Q4_0 and t0["output.weight"] == QT.Q6_K


@pytest.mark.parametrize("outtype", MIXES)
def test_engine_equals_reference_on_dequantized(kq_ckpt, kq_files, outtype):
    d, cfg, _ = kq_ckpt
    sw = _dequantized_weights(kq_files[outtype], cfg)
    ids = np.random.default_rng(5).integers(0, cfg["vocab_size"], 37)
    with torch.no_grad():
        want = ref.forward(cfg, sw, torch.as_tensor(ids), 4).numpy()
    with Model(kq_files[outtype], device="cpu", n_threads=2) as m:
        got = m.logits(ids, block_length=4)
    err = float(np.abs(got - want).max() / np.abs(want).max())
    assert err < TOL, f"{outtype}: relative error {err:.2e}"


def test_policies_bit_identical_on_sim(kq_files):
    path = kq_files["q4_k_m"]
    ids = np.random.default_rng(6).integers(0, 384, 32)
    with Model(path, device="cpu", n_threads=2) as m:
        base = m.logits(ids, block_length=32)
    for policy, budget in [("gpu", None), ("tide", 3), ("swap", 2), ("cpu", None)]:
        with Model(path, device="sim", n_threads=1, policy=policy, gpu_experts=budget) as m:
            assert np.array_equal(m.logits(ids, block_length=32), base), policy


def test_requantize_equals_direct_conversion(kq_files, tmp_path):
    """bf16 file -> tide-cli quantize T gives the tensor data convert --outtype T writes."""
    for t in ("q4_k_m", "q4_0"):
        out = str(tmp_path / f"re-{t}.gguf")
        r = subprocess.run([sys.executable, "-m", "tide_cpp.cli", "quantize", kq_files["bf16"], out,
                            t, "-q"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        a, b = GGUFReader(out), GGUFReader(kq_files[t])
        assert [x.name for x in a.tensors] == [x.name for x in b.tensors]
        for x, y in zip(a.tensors, b.tensors):
            assert x.tensor_type == y.tensor_type and np.array_equal(x.data, y.data), x.name
        assert a.get_field("general.file_type").contents() == b.get_field("general.file_type").contents()
        assert a.get_field("tokenizer.ggml.tokens").contents() == b.get_field("tokenizer.ggml.tokens").contents()
        assert [f for f in os.listdir(tmp_path) if ".tmp-" in f] == []


def test_requantize_refuses_quantized_input(kq_files, tmp_path):
    with pytest.raises(ConvertError, match=r"tensor 'token_embd.weight' is q4_k: quantize reads"):
        requantize(kq_files["q4_k_m"], str(tmp_path / "x.gguf"), "q4_0", progress=False)
    assert os.listdir(tmp_path) == []


def test_fallback_reported(tiny_checkpoint, tmp_path, capsys):
    """hidden 64, experts of 32: k-quant rows fall back, and the converter says which and why."""
    d, cfg, w = tiny_checkpoint("base")
    out = str(tmp_path / "fb.gguf")
    convert(d, out, outtype="q4_k_m", progress=False)
    err = capsys.readouterr().err
    assert "rows of 64 values are not a multiple of q4_k's block of 256: stored as q4_0" in err
    assert "rows of 32 values are not a multiple of q6_k's block of 256: stored as q8_0" in err
    t = _types(out)
    assert t["blk.1.ffn_gate.0.weight"] == QT.Q4_0 and t["blk.1.ffn_down.0.weight"] == QT.Q8_0
    sw = _dequantized_weights(out, cfg)
    ids = np.random.default_rng(7).integers(0, cfg["vocab_size"], 20)
    with torch.no_grad():
        want = ref.forward(cfg, sw, torch.as_tensor(ids), 4).numpy()
    with Model(out, device="cpu", n_threads=2) as m:
        got = m.logits(ids, block_length=4)
    assert float(np.abs(got - want).max() / np.abs(want).max()) < TOL


# ---- bad files --------------------------------------------------------------------------------


def _tensor_info_at(data, name):
    """(offset of ne[0], offset of the type) in the tensor info of `name`."""
    key = struct.pack("<Q", len(name)) + name.encode()
    p = bytes(data).index(key) + len(key)
    n_dims = struct.unpack_from("<I", data, p)[0]
    return p + 4, p + 4 + 8 * n_dims


def _load_error(tmp_path, data):
    path = tmp_path / "bad.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(_lib.TideError) as ei:
        Model(str(path))
    return str(ei.value)


def test_bad_quantized_tensors(kq_files, tmp_path):
    good = open(kq_files["q4_k_m"], "rb").read()
    name = "blk.2.ffn_gate.5.weight"
    ne0, typ = _tensor_info_at(good, name)
    # a row length that is not a whole number of q4_k blocks
    d = bytearray(good)
    struct.pack_into("<Q", d, ne0, 300)
    msg = _load_error(tmp_path, d)
    assert name in msg and "not a multiple" in msg and "q4_k" in msg, msg
    # the wrong byte size for its shape: q4_k data declared q6_k (more bytes than are there)
    d = bytearray(good)
    struct.pack_into("<I", d, typ, int(QT.Q6_K))
    msg = _load_error(tmp_path, d)
    assert f"tensor '{name}'" in msg and "run into tensor 'blk.2.ffn_up.5.weight'" in msg, msg
    # a type the build does not compute
    d = bytearray(good)
    struct.pack_into("<I", d, typ, int(QT.Q3_K))
    msg = _load_error(tmp_path, d)
    assert f"tensor '{name}'" in msg and "q3_k" in msg, msg
    # one expert's down of another type than the others'
    d = bytearray(good)
    _, typ_d = _tensor_info_at(good, "blk.1.ffn_down.2.weight")
    struct.pack_into("<I", d, typ_d, int(QT.Q4_K))  # 144 < 210 bytes per block: fits its range
    msg = _load_error(tmp_path, d)
    assert "blk.1.ffn_down.2.weight" in msg, msg
