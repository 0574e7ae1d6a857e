"""Storage types: which ggml type each tensor gets, and the encoding of a slice of rows into it.

bf16 from a bf16 source keeps the source's bits; f16 is numpy's round-to-nearest-even cast
(as torch's .to(float16)); q8_0 is gguf.quants.quantize (ggml's block_q8_0, bit-identical)."""

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import quants

from .safetensors_reader import to_f32

OUTTYPES = {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0}
# llama.cpp's LLAMA_FTYPE numbers for general.file_type.
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}
Q8_BLOCK = 32


def storage_type(entry, outtype):
    """The ggml type of entry's tensor for outtype: f32 for 1-D and 'f32' kinds; q8_0 only for
    rows that are a multiple of 32 long (else f16)."""
    if entry.kind == "f32" or len(entry.hf_shape) < 2:
        return QT.F32
    qt = OUTTYPES[outtype]
    if qt == QT.Q8_0 and entry.hf_shape[-1] % Q8_BLOCK:
        return QT.F16
    return qt


def nbytes(shape, qt):
    """Bytes of a tensor of numpy shape (rows..., cols) stored as qt."""
    n = int(np.prod(shape, dtype=np.int64))
    if qt == QT.F32:
        return 4 * n
    if qt in (QT.F16, QT.BF16):
        return 2 * n
    if qt == QT.Q8_0:
        return n // Q8_BLOCK * 34
    raise ValueError(qt)


def encode(raw, src_dtype, qt):
    """A slice of rows of raw source values (numpy, safetensors dtype src_dtype) -> the bytes of
    qt, as a numpy array to write as is."""
    if qt == QT.BF16 and src_dtype == "BF16":
        return raw  # the source's bits, untouched
    x = to_f32(raw, src_dtype)
    if qt == QT.F32:
        return x
    if qt == QT.F16:
        return x.astype(np.float16)
    return quants.quantize(x, qt)  # BF16 (round to nearest even) or Q8_0
