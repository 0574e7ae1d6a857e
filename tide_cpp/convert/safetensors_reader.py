"""Reading sharded safetensors one tensor (or one slice of rows) at a time, without mmap or torch.

The format: 8 bytes little-endian header length N, N bytes of JSON {name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}, then the data, offsets relative to its start.
Every header is checked against the file's size up front, so a corrupt or truncated shard is
refused before anything is written.
"""

import json
import os
import struct

import numpy as np

from .errors import ConvertError

# safetensors dtype -> (bytes per element, numpy dtype used to hold the raw values)
DTYPES = {
    "BF16": (2, np.uint16),  # kept as raw bits; see to_f32
    "F16": (2, np.float16),
    "F32": (4, np.float32),
    "F64": (8, np.float64),
}
# Every safetensors dtype's element size, to validate headers (tensors of other dtypes may sit in
# a shard as long as the converter does not need them).
_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
          "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_MAX_HEADER = 100 * 1024 * 1024


class TensorRef:
    """Where one tensor lives: file, dtype, shape, absolute byte offset and length."""
    __slots__ = ("name", "path", "dtype", "shape", "offset", "nbytes")

    def __init__(self, name, path, dtype, shape, offset, nbytes):
        self.name, self.path, self.dtype = name, path, dtype
        self.shape, self.offset, self.nbytes = tuple(shape), offset, nbytes


def read_header(path):
    """{name: TensorRef} of one .safetensors file, validated against the file's size."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConvertError(f"{path}: corrupt safetensors: file is {size} bytes, "
                                   "shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise ConvertError(f"{path}: corrupt or truncated safetensors: header of {n} "
                                   f"bytes does not fit in the file ({size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise ConvertError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise ConvertError(f"{path}: corrupt safetensors: header is not valid JSON ({e})") from None
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = info["dtype"]
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ConvertError(f"{path}: corrupt safetensors: bad header entry for tensor "
                               f"{name!r}") from None
        if dtype not in _SIZES:
            raise ConvertError(f"{path}: corrupt safetensors: tensor {name!r} has unknown dtype "
                               f"{dtype!r}")
        want = _SIZES[dtype] * int(np.prod(shape, dtype=np.int64))
        if end - begin != want or begin < 0 or any(d < 0 for d in shape):
            raise ConvertError(f"{path}: corrupt safetensors: tensor {name!r} of shape {shape} "
                               f"{dtype} spans bytes [{begin}, {end}), expected {want} bytes")
        if base + end > size:
            raise ConvertError(f"{path}: truncated safetensors: tensor {name!r} ends at byte "
                               f"{base + end}, the file has {size} bytes")
        out[name] = TensorRef(name, path, dtype, shape, base + begin, want)
    return out


def read_rows(ref, fd, row0, row1):
    """Rows [row0, row1) of a tensor (first axis), as a numpy array of its raw dtype.

    fd: an open file descriptor of ref.path (pread: safe from several threads at once).
    A 1-D tensor is one row holding everything."""
    esize, npdt = DTYPES[ref.dtype]
    if len(ref.shape) > 1:
        rest = ref.shape[1:]
        row_elems = int(np.prod(rest, dtype=np.int64))
        shape = (row1 - row0,) + tuple(rest)
    else:
        row_elems = ref.shape[0] if ref.shape else 1
        shape = (row_elems,) if ref.shape else ()
    n = (row1 - row0) * row_elems
    buf = np.empty(n, dtype=npdt)
    view = memoryview(buf).cast("B")
    pos, offset = 0, ref.offset + row0 * row_elems * esize
    while pos < len(view):
        got = os.preadv(fd, [view[pos:]], offset + pos)
        if got <= 0:
            raise ConvertError(f"{ref.path}: truncated safetensors: short read of tensor "
                               f"{ref.name!r} ({pos} of {len(view)} bytes)")
        pos += got
    return buf.reshape(shape)


def rows_of(ref):
    """The number of rows read_rows counts for ref (1 for a 1-D tensor)."""
    return ref.shape[0] if len(ref.shape) > 1 else 1


def to_f32(raw, dtype):
    """Raw values of a safetensors dtype -> float32 (bf16 bits shifted into the high half)."""
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False)
