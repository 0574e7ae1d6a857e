"""requantize(src, out, outtype): a tide.cpp GGUF of f32/f16/bf16 matrices -> the same model in a
quantized mix (or another plain type), as llama-quantize does: convert once, quantize many ways.

Every tensor gets the type the converter would give it (quant.mix_type and its block fallback,
the one rule), so `convert --outtype T` and `convert --outtype bf16` then `requantize T` write
the same tensor data from a bf16 checkpoint. Metadata is copied (general.file_type updated).
The input is read through a memory map in slices of rows and the quantizer runs on the native
library's thread pool; the output is written to OUT.tmp-XXXX and renamed at the end, removed on
any failure (Ctrl-C included).
"""

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from .errors import ConvertError
from .hf_to_gguf import ALIGNMENT, ARCH, CHUNK_BYTES, _Progress, pad_to_alignment
from .quant import (FILE_TYPES, NATIVE, OUTTYPES, fallback, keeps_f32, mix_type, nbytes,
                    native_quantize, report_fallbacks)

SOURCE_TYPES = (QT.F32, QT.F16, QT.BF16)
_SKIP_KEYS = ("GGUF.", "general.architecture", "general.file_type", "general.alignment")


def _plan(reader, outtype, n_layer):
    """[(tensor, out type, note)] in file order; ConvertError for a tensor it cannot requantize."""
    plan = []
    for t in reader.tensors:
        qt = QT(int(t.tensor_type))
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # numpy order: rows, cols
        if qt not in SOURCE_TYPES:
            raise ConvertError(f"tensor '{t.name}' is {qt.name.lower()}: quantize reads f32, f16 "
                               "or bf16 files (quantizing a quantized tensor again loses "
                               "precision; convert from the checkpoint instead)")
        if keeps_f32(t.name, shape):
            plan.append((t, shape, qt, None))
            continue
        out, note = fallback(mix_type(t.name, outtype, n_layer), shape[-1])
        plan.append((t, shape, out, note))
    return plan


def _copy_metadata(reader, writer, outtype):
    for name, field in reader.fields.items():
        if name.startswith(_SKIP_KEYS):
            continue
        vtype = GGUFValueType(int(field.types[0]))
        sub = GGUFValueType(int(field.types[1])) if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(FILE_TYPES[outtype])


def _encode(data, src, dst, n_threads):
    """Rows of a tensor of type src (numpy view of the mapping) -> bytes of dst."""
    if dst == src:
        return data
    if src == QT.BF16:
        x = data.view(np.uint16)
    elif src == QT.F16:
        x = data.view(np.float16)
    else:
        x = data.view(np.float32)
    if dst in NATIVE or dst == QT.Q8_0:
        return native_quantize(x, dst, n_threads)
    f = (x.astype(np.uint32) << 16).view(np.float32) if src == QT.BF16 else x.astype(np.float32)
    if dst == QT.F32:
        return f
    if dst == QT.F16:
        return f.astype(np.float16)
    from gguf import quants
    return quants.quantize(f, dst)  # BF16


def requantize(src, out, outtype, threads=None, progress=True):
    """Re-quantize the GGUF src into out. Returns a dict: path, n_tensors, bytes, seconds."""
    if outtype not in OUTTYPES:
        raise ConvertError(f"unknown type {outtype!r} (choose from {', '.join(OUTTYPES)})")
    t0 = time.time()
    src, out = os.fspath(src), os.path.abspath(os.fspath(out))
    out_dir = os.path.dirname(out)
    if os.path.isdir(out):
        raise ConvertError(f"{out}: is a folder; give the output file's name")
    if not os.path.isdir(out_dir):
        raise ConvertError(f"{out}: cannot write: folder {out_dir} does not exist")
    if os.path.exists(out) and os.path.samefile(src, out):
        raise ConvertError(f"{out}: is the input file; write to another name")
    try:
        reader = GGUFReader(src)
    except OSError as e:
        raise ConvertError(f"{src}: cannot read: {e.strerror or e}") from None
    except (ValueError, KeyError, IndexError) as e:
        raise ConvertError(f"{src}: not a valid GGUF file: {e}") from None
    arch = reader.get_field("general.architecture")
    if arch is None or arch.contents() != ARCH:
        raise ConvertError(f"{src}: general.architecture is not {ARCH!r}: not a tide.cpp model")
    nl = reader.get_field(f"{ARCH}.block_count")
    if nl is None:
        raise ConvertError(f"{src}: key {ARCH}.block_count is missing")
    plan = _plan(reader, outtype, int(nl.contents()))
    report_fallbacks([p[0].name for p in plan], [p[3] for p in plan], "quantize", sys.stderr)
    sizes = [nbytes(shape, qt) for _, shape, qt, _ in plan]
    total = sum(pad_to_alignment(s) for s in sizes)
    free = shutil.disk_usage(out_dir).free
    if free < total + (64 << 20):
        raise ConvertError(f"{out}: not enough disk space in {out_dir}: the file needs "
                           f"{total / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free")
    n_threads = max(1, int(threads or os.cpu_count() or 1))
    try:
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(out) + ".tmp-", dir=out_dir)
        os.close(fd)
    except OSError as e:
        raise ConvertError(f"{out}: cannot write: {e.strerror or e}") from None
    writer, bar = None, None
    try:
        writer = GGUFWriter(None, ARCH)
        writer.data_alignment = ALIGNMENT
        writer.add_custom_alignment(ALIGNMENT)
        _copy_metadata(reader, writer, outtype)
        for (t, shape, qt, _), size in zip(plan, sizes):
            writer.add_tensor_info(t.name, shape, np.float32, size, raw_dtype=qt)
        writer.open_output_file(Path(tmp))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        fout = writer.fout[0]
        bar = _Progress(sum(sizes), len(plan), progress)
        for (t, shape, qt, _), size in zip(plan, sizes):
            fout.write(b"\0" * (pad_to_alignment(fout.tell()) - fout.tell()))
            start = fout.tell()
            src_qt = QT(int(t.tensor_type))
            rows = t.data.reshape(shape[0] if len(shape) > 1 else 1, -1)
            step = max(1, CHUNK_BYTES // max(rows[0].nbytes, 1))
            for r0 in range(0, rows.shape[0], step):
                data = np.ascontiguousarray(_encode(rows[r0:r0 + step], src_qt, qt, n_threads))
                fout.write(memoryview(data).cast("B"))
                bar.add(data.nbytes)
            if fout.tell() - start != size:  # a bug, not bad input: never write a wrong layout
                raise AssertionError(f"{t.name}: wrote {fout.tell() - start} bytes, not {size}")
            bar.tensor_done()
        fout.write(b"\0" * (pad_to_alignment(fout.tell()) - fout.tell()))
        writer.close()
        bar.close()
        bar = None
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, out)
    except OSError as e:
        _cleanup(writer, bar, tmp)
        raise ConvertError(f"{out}: cannot write: {e.strerror or e}") from None
    except BaseException:
        _cleanup(writer, bar, tmp)
        raise
    return {"path": out, "n_tensors": len(plan), "bytes": sum(sizes), "seconds": time.time() - t0}


def _cleanup(writer, bar, tmp):
    for close in ((bar.close if bar is not None else None),
                  (writer.close if writer is not None else None)):
        if close is None:
            continue
        try:
            close()
        except Exception:  # noqa: BLE001
            pass
    try:
        os.unlink(tmp)
    except OSError:
        pass
