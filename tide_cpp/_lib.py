"""ctypes mirror of native/include/tide.h: one declaration per function, nothing clever.

The library is tide_cpp/libtide.so beside this file, or the path in $TIDE_LIB. Users meet
`tide_cpp.Model`; this module keeps the C contract in one place.
"""

import ctypes
import os
from ctypes import (POINTER, Structure, c_char_p, c_double, c_float, c_int, c_int32, c_int64,
                    c_size_t, c_uint8, c_uint64, c_void_p)

ABI_VERSION = 4

# tide_status
OK, ERR_IO, ERR_FORMAT, ERR_MODEL, ERR_ARG, ERR_NOMEM, ERR_DEVICE, ERR_UNSUPPORTED, ERR_CONTEXT = range(9)
STATUS_NAMES = {OK: "ok", ERR_IO: "io", ERR_FORMAT: "format", ERR_MODEL: "model", ERR_ARG: "argument",
                ERR_NOMEM: "out of memory", ERR_DEVICE: "device", ERR_UNSUPPORTED: "unsupported",
                ERR_CONTEXT: "context"}

# tide_type
TYPE_F32, TYPE_F16, TYPE_Q8_0, TYPE_BF16 = 0, 1, 8, 30
TYPE_Q4_0, TYPE_Q4_K, TYPE_Q5_K, TYPE_Q6_K = 2, 12, 13, 14
TYPE_NAMES = {TYPE_F32: "f32", TYPE_F16: "f16", TYPE_Q8_0: "q8_0", TYPE_BF16: "bf16",
              TYPE_Q4_0: "q4_0", TYPE_Q4_K: "q4_k", TYPE_Q5_K: "q5_k", TYPE_Q6_K: "q6_k"}
# KV cache types (tide_context_params.cache_type)
CACHE_TYPES = {"f32": TYPE_F32, "f16": TYPE_F16, "bf16": TYPE_BF16}
# tide_device
DEVICE_CPU, DEVICE_SIM, DEVICE_CUDA = 0, 1, 2
DEVICES = {"cpu": DEVICE_CPU, "sim": DEVICE_SIM, "cuda": DEVICE_CUDA}
# tide_policy
POLICY_GPU, POLICY_CPU, POLICY_STATIC, POLICY_SWAP, POLICY_TIDE = range(5)
POLICIES = {"gpu": POLICY_GPU, "cpu": POLICY_CPU, "static": POLICY_STATIC, "swap": POLICY_SWAP,
            "tide": POLICY_TIDE}


class TideError(RuntimeError):
    """A failed call of the native library: `status` (tide_status) and the C message."""

    def __init__(self, status, message):
        self.status = int(status)
        self.message = message
        super().__init__(f"{message} ({STATUS_NAMES.get(self.status, self.status)} error)")


class tide_hparams(Structure):
    _fields_ = [(n, c_int32) for n in (
        "n_layer", "n_embd", "n_ff", "n_ff_exp",
        "n_expert", "n_expert_used", "n_expert_shared", "n_expert_groups", "n_group_used",
        "n_dense_lead", "n_head", "n_head_kv", "head_dim", "rope_dim", "n_ctx_train", "n_vocab",
        "qk_norm", "expert_weights_norm")] + [
        ("expert_weights_scale", c_float), ("rms_eps", c_float), ("rope_theta", c_float),
        ("bos_id", c_int32), ("eos_id", c_int32), ("pad_id", c_int32), ("mask_id", c_int32),
        ("expert_type", c_int32), ("expert_bytes", c_uint64), ("nonexpert_bytes", c_uint64)]


class tide_context_params(Structure):
    _fields_ = [
        ("device", c_int32), ("n_threads", c_int32), ("n_ctx", c_int32), ("policy", c_int32),
        ("budget", c_int32), ("budgets", POINTER(c_int32)), ("n_budgets", c_int32),
        ("refresh_interval", c_int32), ("trace", c_int32), ("device_memory", c_uint64),
        ("cuda_device", c_int32), ("prefetch", c_int32), ("n_batch", c_int32),
        ("cache_type", c_int32)]


class tide_sampling(Structure):
    _fields_ = [("temperature", c_float), ("top_k", c_int32), ("top_p", c_float), ("seed", c_uint64)]


STATS_COUNTERS = ("forwards", "steps", "tokens_forwarded", "h2d_bytes", "weights_h2d_bytes",
                  "experts_promoted", "experts_demoted", "device_expert_tokens",
                  "host_expert_tokens")
STATS_TIMERS = ("t_total", "t_attention", "t_dense", "t_router", "t_device_experts",
                "t_host_experts", "t_transfer_wait", "t_lm_head")


PREFETCH_COUNTERS = ("prefetch_bytes", "prefetch_used")


class tide_stats(Structure):
    _fields_ = ([(n, c_uint64) for n in STATS_COUNTERS] + [(n, c_double) for n in STATS_TIMERS]
                + [(n, c_uint64) for n in PREFETCH_COUNTERS])


class tide_layer_stats(Structure):
    _fields_ = [(n, c_uint64) for n in ("h2d_bytes", "experts_promoted", "experts_demoted",
                                         "device_expert_tokens", "host_expert_tokens")] + [
        ("budget", c_int32), ("resident", c_int32)] + [
        (n, c_double) for n in ("t_device_experts", "t_host_experts", "t_transfer_wait")] + [
        (n, c_uint64) for n in PREFETCH_COUNTERS]


class tide_residency_delta(Structure):
    _fields_ = [(n, c_int64) for n in ("promoted", "demoted", "device_pairs", "host_pairs",
                                       "device_experts", "host_experts")]


def struct_dict(s):
    return {name: getattr(s, name) for name, _ in s._fields_}


def _find_library():
    path = os.environ.get("TIDE_LIB")
    if path:
        return path
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "libtide.so")
    if os.path.exists(here):
        return here
    raise OSError(f"libtide.so not found at {here}: run `make` in the repository root, "
                  "or point $TIDE_LIB at the library")


_model_p = c_void_p
_ctx_p = c_void_p
_res_p = c_void_p


def _declare(lib):
    d = [
        ("tide_abi_version", [], c_int),
        ("tide_model_load", [c_char_p, POINTER(_model_p), c_char_p, c_size_t], c_int),
        ("tide_model_free", [_model_p], None),
        ("tide_model_hparams", [_model_p, POINTER(tide_hparams)], None),
        ("tide_model_meta_string", [_model_p, c_char_p, POINTER(c_void_p), POINTER(c_size_t)], c_int),
        ("tide_context_default_params", [], tide_context_params),
        ("tide_context_create", [_model_p, POINTER(tide_context_params), POINTER(_ctx_p), c_char_p,
                                 c_size_t], c_int),
        ("tide_context_free", [_ctx_p], None),
        ("tide_context_error", [_ctx_p], c_char_p),
        ("tide_cuda_available", [c_char_p, c_size_t], c_int),
        ("tide_set_residency", [_ctx_p, c_int32, c_int32, POINTER(c_int32), c_int32, c_int32], c_int),
        ("tide_set_popularity", [_ctx_p, POINTER(c_float), c_size_t], c_int),
        ("tide_reset", [_ctx_p], None),
        ("tide_n_past", [_ctx_p], c_int32),
        ("tide_n_ctx", [_ctx_p], c_int32),
        ("tide_cache_bytes", [_ctx_p], c_uint64),
        ("tide_cache_block_length", [_ctx_p], c_int32),
        ("tide_commit", [_ctx_p, POINTER(c_int32), c_int32], c_int),
        ("tide_commit_blocks", [_ctx_p, POINTER(c_int32), c_int32, c_int32], c_int),
        ("tide_commit_batch_end", [_ctx_p, c_int32, c_int32], c_int32),
        ("tide_truncate", [_ctx_p, c_int32], c_int),
        ("tide_cache_tokens", [_ctx_p, POINTER(c_int32), c_int32], c_int),
        ("tide_state_save", [_ctx_p, c_char_p], c_int),
        ("tide_state_load", [_ctx_p, c_char_p], c_int),
        ("tide_step", [_ctx_p, POINTER(c_int32), c_int32, POINTER(c_uint8), c_int32,
                       POINTER(tide_sampling), POINTER(c_int32), POINTER(c_float)], c_int),
        ("tide_logits", [_ctx_p, POINTER(c_int32), c_int32, c_int32, POINTER(c_float)], c_int),
        ("tide_get_stats", [_ctx_p, POINTER(tide_stats)], None),
        ("tide_get_layer_stats", [_ctx_p, c_int32, POINTER(tide_layer_stats)], c_int),
        ("tide_stats_reset", [_ctx_p], None),
        ("tide_last_hits", [_ctx_p, POINTER(c_int32), c_size_t], c_int),
        ("tide_resident", [_ctx_p, c_int32, POINTER(c_uint8), c_size_t], c_int),
        ("tide_residency_new", [c_int32, c_int32, c_int32, POINTER(c_int32), c_int32, c_int32,
                                c_uint64, POINTER(_res_p), c_char_p, c_size_t], c_int),
        ("tide_residency_free", [_res_p], None),
        ("tide_residency_error", [_res_p], c_char_p),
        ("tide_residency_set_policy", [_res_p, c_int32, POINTER(c_int32), c_int32, c_int32], c_int),
        ("tide_residency_set_popularity", [_res_p, POINTER(c_float), c_size_t], c_int),
        ("tide_residency_forward", [_res_p, POINTER(c_int32), c_size_t, c_int32, c_int32,
                                    POINTER(tide_residency_delta)], c_int),
        ("tide_residency_layer_stats", [_res_p, c_int32, POINTER(tide_layer_stats)], c_int),
        ("tide_residency_resident", [_res_p, c_int32, POINTER(c_uint8), c_size_t], c_int),
        ("tide_type_row_bytes", [c_int32, c_int64], c_size_t),
        ("tide_quantize", [c_int32, c_int32, c_void_p, c_int64, c_int64, c_void_p, c_size_t,
                           c_int32, c_char_p, c_size_t], c_int),
        ("tide_dequantize", [c_int32, c_void_p, c_int64, c_int64, POINTER(c_float), c_size_t,
                             c_char_p, c_size_t], c_int),
    ]
    for name, args, res in d:
        f = getattr(lib, name)
        f.argtypes = args
        f.restype = res


_lib = None


def lib():
    """The loaded library (loaded once, checked against the ABI version)."""
    global _lib
    if _lib is None:
        l = ctypes.CDLL(_find_library())
        _declare(l)
        v = l.tide_abi_version()
        if v != ABI_VERSION:
            raise OSError(f"libtide ABI version {v}, this package expects {ABI_VERSION}: rebuild")
        _lib = l
    return _lib


def check(status, message):
    """Raise TideError unless status is OK. message: str or a callable giving it."""
    if status != OK:
        raise TideError(status, message() if callable(message) else message)


def cuda_available():
    """(available: bool, reason: str)."""
    buf = ctypes.create_string_buffer(512)
    ok = lib().tide_cuda_available(buf, len(buf))
    return bool(ok), buf.value.decode("utf-8", "replace")


def gguf_weight_bytes(path):
    """(expert_bytes, nonexpert_bytes) of a model file, as the core counts them when it loads it
    (tide_hparams): bytes of one routed expert, and of every tensor that is not a routed expert.
    Raises TideError naming the cause when the file is not a usable model."""
    l = lib()
    err = ctypes.create_string_buffer(512)
    mp = c_void_p()
    st = l.tide_model_load(os.fspath(path).encode(), ctypes.byref(mp), err, len(err))
    check(st, lambda: f"{os.fspath(path)}: {err.value.decode('utf-8', 'replace')}")
    try:
        hp = tide_hparams()
        l.tide_model_hparams(mp, ctypes.byref(hp))
        return int(hp.expert_bytes), int(hp.nonexpert_bytes)
    finally:
        l.tide_model_free(mp)


def type_row_bytes(type_id, cols):
    """Bytes of one row of cols values of a tide_type; 0 when the engine cannot store it so."""
    return int(lib().tide_type_row_bytes(int(type_id), int(cols)))


def quantize(x, type_id, n_threads=0):
    """A C-contiguous numpy array of rows (float32, float16, or uint16 holding bf16 bits; last
    axis = row length) -> a uint8 array of the rows in tide_type type_id (ggml's layout, the
    bytes of ggml's reference quantizer). Runs on the library's thread pool (n_threads <= 0:
    every CPU) with the GIL released."""
    import numpy as np
    src_type = {np.dtype(np.float32): TYPE_F32, np.dtype(np.float16): TYPE_F16,
                np.dtype(np.uint16): TYPE_BF16}.get(x.dtype)
    if src_type is None:
        raise TypeError(f"quantize: dtype {x.dtype}: float32, float16 or uint16 (bf16 bits)")
    x = np.ascontiguousarray(x)
    cols = int(x.shape[-1]) if x.ndim else 1
    rows = int(x.size // cols) if cols else 0
    rb = type_row_bytes(type_id, cols)
    out = np.empty(rows * rb, dtype=np.uint8)
    err = ctypes.create_string_buffer(512)
    st = lib().tide_quantize(int(type_id), src_type, x.ctypes.data, rows, cols, out.ctypes.data,
                             out.nbytes, int(n_threads), err, len(err))
    check(st, lambda: f"quantize to {TYPE_NAMES.get(type_id, type_id)}: "
                      f"{err.value.decode('utf-8', 'replace')}")
    return out


def dequantize(data, type_id, shape):
    """The bytes of a tensor of tide_type type_id and numpy shape (rows..., cols) -> float32: the
    weights the kernels multiply with."""
    import numpy as np
    data = np.ascontiguousarray(np.frombuffer(memoryview(data), dtype=np.uint8))
    cols = int(shape[-1])
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    if data.nbytes != rows * type_row_bytes(type_id, cols):
        raise ValueError(f"dequantize: {data.nbytes} bytes do not make {tuple(shape)} of "
                         f"{TYPE_NAMES.get(type_id, type_id)}")
    out = np.empty((rows, cols), dtype=np.float32)
    err = ctypes.create_string_buffer(512)
    st = lib().tide_dequantize(int(type_id), data.ctypes.data, rows, cols,
                               out.ctypes.data_as(POINTER(c_float)), out.size, err, len(err))
    check(st, lambda: err.value.decode("utf-8", "replace"))
    return out.reshape(shape)
