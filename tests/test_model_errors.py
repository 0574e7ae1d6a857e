"""Every kind of bad file, through Model(path): an error whose message names the cause, never a
crash. The bad files are a converted tiny GGUF with a few bytes edited in place (the header
layout is GGUF v3's: a tensor info is u64 name length, name, u32 n_dims, u64 dims, u32 type,
u64 offset; a metadata entry is u64 key length, key, u32 value type, value)."""

import struct

import pytest

from tide_cpp import Model, TideError
from tide_cpp import _lib


@pytest.fixture(scope="module")
def good(tiny_gguf):
    path, _, _ = tiny_gguf("base", "f32")
    with open(path, "rb") as f:
        return f.read()


def after_name(data, name):
    """Offset just past the length-prefixed string `name` (which must occur exactly once)."""
    key = struct.pack("<Q", len(name)) + name.encode()
    i = data.find(key)
    assert i >= 0 and data.find(key, i + 1) < 0, name
    return i + len(key)


def tensor_fields(data, name):
    """(offset of dims, offset of type, offset of data offset) of a tensor's info."""
    p = after_name(data, name)
    n_dims = struct.unpack_from("<I", data, p)[0]
    dims = p + 4
    typ = dims + 8 * n_dims
    return dims, typ, typ + 4


def load_bad(tmp_path, data, status, *fragments):
    path = tmp_path / "bad.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(TideError) as ei:
        Model(str(path))
    msg = str(ei.value)
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    assert ei.value.status == status, msg
    return msg


def test_good_file_loads(good, tmp_path):
    p = tmp_path / "good.gguf"
    p.write_bytes(good)
    with Model(str(p)) as m:
        assert m.hparams["n_expert"] == 8


def test_missing_file(tmp_path):
    with pytest.raises(TideError) as ei:
        Model(str(tmp_path / "nope.gguf"))
    assert ei.value.status == _lib.ERR_IO and "nope.gguf" in str(ei.value)


def test_truncated(good, tmp_path):
    load_bad(tmp_path, good[: len(good) // 2], _lib.ERR_FORMAT, "extends past end of file")


def test_truncated_header(good, tmp_path):
    load_bad(tmp_path, good[:10], _lib.ERR_FORMAT, "shorter than the 24-byte GGUF header")


def test_wrong_magic(good, tmp_path):
    load_bad(tmp_path, b"GGUX" + good[4:], _lib.ERR_FORMAT, "bad magic 'GGUX'")


def test_offset_out_of_bounds(good, tmp_path):
    d = bytearray(good)
    _, _, off = tensor_fields(good, "output.weight")
    struct.pack_into("<Q", d, off, 1 << 40)
    load_bad(tmp_path, d, _lib.ERR_FORMAT, "tensor 'output.weight'", "extends past end of file")


def test_missing_tensor(good, tmp_path):
    d = bytearray(good)
    p = after_name(good, "blk.1.ffn_up.3.weight")
    d[p - 1:p] = b"x"  # renamed: blk.1.ffn_up.3.weighx
    load_bad(tmp_path, d, _lib.ERR_MODEL, "tensor 'blk.1.ffn_up.3.weight' is missing")


def test_wrong_shape(good, tmp_path):
    d = bytearray(good)
    dims, _, _ = tensor_fields(good, "blk.1.ffn_up.3.weight")
    struct.pack_into("<Q", d, dims + 8, 24)
    load_bad(tmp_path, d, _lib.ERR_MODEL,
             "tensor 'blk.1.ffn_up.3.weight': shape [64, 24], expected [64, 32]")


def test_unknown_type(good, tmp_path):
    d = bytearray(good)
    _, typ, _ = tensor_fields(good, "output.weight")
    struct.pack_into("<I", d, typ, 99)
    load_bad(tmp_path, d, _lib.ERR_FORMAT, "tensor 'output.weight'", "unknown ggml type 99")


def test_unsupported_type(good, tmp_path):
    """A valid ggml type the engine does not compute (q5_0)."""
    d = bytearray(good)
    _, typ, _ = tensor_fields(good, "output.weight")
    struct.pack_into("<I", d, typ, 6)
    load_bad(tmp_path, d, _lib.ERR_MODEL,
             "tensor 'output.weight': type q5_0 (6) is not supported by this build")


def test_missing_key(good, tmp_path):
    d = bytearray(good)
    p = after_name(good, "llada2.expert_count")
    d[p - 1:p] = b"x"
    load_bad(tmp_path, d, _lib.ERR_MODEL, "llada2.expert_count", "not found")


def test_bad_value(good, tmp_path):
    d = bytearray(good)
    p = after_name(good, "llada2.expert_gating_func")
    assert struct.unpack_from("<II", good, p) == (4, 2)  # uint32, sigmoid
    struct.pack_into("<I", d, p + 4, 1)
    load_bad(tmp_path, d, _lib.ERR_MODEL, "'llada2.expert_gating_func' = 1",
             "only 2 (sigmoid)")


def test_wrong_architecture(good, tmp_path):
    d = bytearray(good)
    p = after_name(good, "general.architecture")
    assert struct.unpack_from("<I", good, p)[0] == 8  # string
    q = p + 4 + 8
    assert good[q:q + 6] == b"llada2"
    d[q:q + 6] = b"llama2"
    load_bad(tmp_path, d, _lib.ERR_MODEL, "general.architecture is 'llama2'")


# ---- bad arguments: the library checks them, the message names the argument as Python knows it --

@pytest.fixture
def good_path(good, tmp_path):
    p = tmp_path / "good.gguf"
    p.write_bytes(good)
    return str(p)


@pytest.mark.parametrize("kwargs,name,cause", [
    (dict(policy="tide", gpu_experts=-1), "gpu_experts", "-1 is negative"),
    (dict(policy="tide", gpu_experts=lambda n: [1] * (n + 1)), "gpu_experts", "the model has"),
    (dict(policy="tide", gpu_experts=lambda n: [2] * (n - 1) + [-1]), "gpu_experts",
     "-1 is negative"),
    (dict(policy="tide", refresh_interval=0), "refresh_interval", "must be >= 1"),
    (dict(policy="tide", prefetch_experts=-1), "prefetch_experts", "-1 is negative"),
])
def test_bad_residency_argument(good_path, kwargs, name, cause):
    from tide_cpp.model import ArgumentError
    if callable(kwargs.get("gpu_experts")):  # one budget per MoE layer, however many there are
        with Model(good_path) as m:
            kwargs = {**kwargs, "gpu_experts": kwargs["gpu_experts"](m.n_moe_layers)}
    with pytest.raises(ValueError) as ei:
        Model(good_path, device="sim", **kwargs)
    e = ei.value
    assert isinstance(e, ArgumentError) and isinstance(e, TideError) and e.status == _lib.ERR_ARG
    assert str(e).startswith(name + ":") and cause in str(e), str(e)


@pytest.mark.parametrize("kwargs,name", [
    (dict(gpu_experts="many"), "gpu_experts"),
    (dict(refresh_interval=2.5), "refresh_interval"),
    (dict(prefetch_experts=True), "prefetch_experts"),
    (dict(policy="fastest"), "policy"),
])
def test_argument_of_the_wrong_type(good_path, kwargs, name):
    with pytest.raises(ValueError, match="^" + name):
        Model(good_path, device="sim", **kwargs)


def test_bad_step_arguments(good_path):
    with Model(good_path, device="cpu") as m:
        ids, want = [1, 2, 3, 4], [True] * 4
        for kw, name in ((dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
                         (dict(step_in_block=-1), "step_in_block")):
            with pytest.raises(ValueError, match="^" + name) as ei:
                m.step(ids, want, **{"step_in_block": 0, **kw})
            assert ei.value.status == _lib.ERR_ARG
        with pytest.raises(ValueError, match="^block_length"):
            m.logits(ids, block_length=0)
        tok, _ = m.step(ids, want, step_in_block=0)  # still usable after refusals
        assert len(tok) == 4
