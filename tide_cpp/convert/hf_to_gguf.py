"""convert(src, out, outtype): a LLaDA2.0/2.1 HF checkpoint -> one GGUF (CONTRACTS.md §1),
streamed.

Everything is checked before the first byte is written (config, every tensor's presence, shape
and byte range, the tokenizer, free disk space). Then the header, metadata and tensor infos are
written with gguf's GGUFWriter, and the tensor data is streamed in slices of rows from the shards,
so peak memory is a few tens of MB whatever the model's size. The output is written to
OUT.tmp-XXXX beside OUT and renamed at the end; on any failure (Ctrl-C included) it is removed.
"""

import os
import shutil
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from gguf import GGUFValueType, GGUFWriter

from .errors import ConvertError
from .hparams import hparams, unused_fields
from .quant import FILE_TYPES, NATIVE, OUTTYPES, encode, nbytes, report_fallbacks, storage
from .safetensors_reader import read_rows, rows_of
from .source import load_checkpoint, load_tensors
from .tensor_map import bind, plan, split_merged_experts
from .tokenizer_meta import tokenizer_meta

ALIGNMENT = 4096
ARCH = "llada2"
CHUNK_BYTES = 8 << 20  # source bytes read per slice of rows


def pad_to_alignment(n, a=ALIGNMENT):
    return (n + a - 1) // a * a


class _Progress:
    """Bytes and tensors on stderr: tqdm when present, else plain \\r lines."""

    def __init__(self, total_bytes, n_tensors, enabled):
        self.n, self.i, self.enabled, self.bar = n_tensors, 0, enabled, None
        self.total, self.done, self.t0, self.last = total_bytes, 0, time.time(), 0.0
        if not enabled:
            return
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                            desc="convert", file=sys.stderr, mininterval=0.5, leave=True)
        except ImportError:
            self.bar = None

    def tensor_done(self):
        self.i += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.i}/{self.n} tensors", refresh=False)

    def add(self, nbytes):
        self.done += nbytes
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(nbytes)
        elif time.time() - self.last > 0.5 or self.done == self.total:
            self.last = time.time()
            print(f"\rconvert: {self.done / 2**20:9.1f} / {self.total / 2**20:.1f} MiB, "
                  f"{self.i}/{self.n} tensors", end="", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)


def add_metadata(w, name, outtype, hp, tok):
    """Every metadata key of a tide GGUF (docs/CONTRACTS.md section 1) onto the writer w."""
    w.add_name(name)
    w.add_custom_alignment(ALIGNMENT)
    w.add_file_type(FILE_TYPES[outtype])
    w.add_quantization_version(2)
    w.add_diffusion_shift_logits(False)  # llama.cpp's diffusion key: logits are not shifted
    for key, (value, kind) in hp.items():
        if key.startswith("_"):
            continue
        k = f"{ARCH}.{key}"
        if kind == "u32":
            w.add_uint32(k, int(value))
        elif kind == "f32":
            w.add_float32(k, float(value))
        else:
            w.add_bool(k, bool(value))
    for key, value in tok.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, str):
            w.add_key_value(key, value, GGUFValueType.STRING)
        elif key == "tokenizer.ggml.token_type":
            w.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)
        else:
            w.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)


class _Files:
    """Read-only descriptors of the shards, opened on first use (from the main thread)."""

    def __init__(self):
        self.fds = {}

    def fd(self, path):
        fd = self.fds.get(path)
        if fd is None:
            try:
                fd = self.fds[path] = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise ConvertError(f"{path}: cannot read: {e.strerror or e}") from None
        return fd

    def close(self):
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = {}


def _slices(entries, types, sizes, refs, files):
    """(entry, ref, qt, size, fd, row0, row1, first, last) for every slice of every tensor, in
    file order; a slice is at most CHUNK_BYTES of source."""
    for e, qt, size in zip(entries, types, sizes):
        ref = refs[e.gguf]
        fd = files.fd(ref.path)
        rows = rows_of(ref)
        step = max(1, CHUNK_BYTES // max(ref.nbytes // max(rows, 1), 1))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            yield e, ref, qt, size, fd, r0, r1, r0 == 0, r1 == rows


def _encode_slice(ref, qt, fd, r0, r1, native_threads):
    return np.ascontiguousarray(encode(read_rows(ref, fd, r0, r1), ref.dtype, qt, native_threads))


def _write_data(fout, slices, progress, n_threads, native_threads=1):
    """Read and encode slices on n_threads threads (numpy, pread and the native quantizer
    release the GIL), write them in order; at most 2 * n_threads slices in flight, so memory
    stays bounded. native_threads: the native quantizer's pool size per slice."""
    pending = deque()
    start = 0  # file offset of the current tensor's data

    def write_next():
        nonlocal start
        (e, ref, qt, size, fd, r0, r1, first, last), fut = pending.popleft()
        data = fut.result()
        if first:
            fout.write(b"\0" * (pad_to_alignment(fout.tell()) - fout.tell()))
            start = fout.tell()
        fout.write(memoryview(data).cast("B"))
        progress.add(data.nbytes)
        if last:
            if fout.tell() - start != size:  # a bug, not bad input: never write a wrong layout
                raise AssertionError(f"{e.gguf}: wrote {fout.tell() - start} bytes, not {size}")
            fout.write(b"\0" * (pad_to_alignment(size) - size))
            progress.tensor_done()

    with ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="convert") as pool:
        try:
            for s in slices:
                pending.append((s, pool.submit(_encode_slice, s[1], s[2], s[4], s[5], s[6],
                                               native_threads)))
                while len(pending) >= 2 * n_threads:
                    write_next()
            while pending:
                write_next()
        except BaseException:
            for _, fut in pending:
                fut.cancel()
            raise


def convert(src, out, outtype="bf16", progress=True, revision=None, name=None, threads=None):
    """Convert the checkpoint src (folder or Hub repo id) to the GGUF file out.

    outtype: f32, f16, bf16, q8_0, or a quantized mix q4_0, q4_k_m, q5_k_m, q6_k
    (docs/QUANTIZATION.md) for the matrices (norms, router, expert bias stay f32).
    threads: encoding threads (default: up to 4, as many as there are CPUs); with a quantized
    mix, the native quantizer's thread pool (default: every CPU), fed by two reader threads.
    Returns a dict: path, n_tensors, bytes (tensor data), seconds. Raises ConvertError."""
    if outtype not in OUTTYPES:
        raise ConvertError(f"unknown outtype {outtype!r} (choose from {', '.join(OUTTYPES)})")
    t0 = time.time()
    out = os.path.abspath(os.fspath(out))
    out_dir = os.path.dirname(out)
    if os.path.isdir(out):
        raise ConvertError(f"{out}: is a folder; give the output file's name")
    if not os.path.isdir(out_dir):
        raise ConvertError(f"{out}: cannot write: folder {out_dir} does not exist")

    ckpt = load_checkpoint(src, revision=revision, progress=progress)
    hp = hparams(ckpt.config)
    entries = plan(hp)
    load_tensors(ckpt)
    ckpt.tensors = split_merged_experts(ckpt.tensors, hp)
    refs = bind(entries, ckpt.tensors)
    tok = tokenizer_meta(ckpt.tokenizer_json, ckpt.tokenizer_config, hp["vocab_size"][0],
                         ckpt.config)
    extra = unused_fields(ckpt.config)
    if extra:
        print(f"convert: note: config.json fields not used: {', '.join(extra)}", file=sys.stderr)
    unused = sorted(set(ckpt.tensors) - {e.hf for e in entries})
    if unused:
        print(f"convert: note: {len(unused)} checkpoint tensor(s) not used, e.g. {unused[0]}",
              file=sys.stderr)

    planned = [storage(e, outtype, hp["block_count"][0]) for e in entries]
    types = [qt for qt, _ in planned]
    report_fallbacks([e.gguf for e in entries], [n for _, n in planned], "convert", sys.stderr)
    sizes = [nbytes(e.hf_shape, qt) for e, qt in zip(entries, types)]
    total = sum(pad_to_alignment(s) for s in sizes)
    try:
        free = shutil.disk_usage(out_dir).free
    except OSError:
        free = None
    if free is not None and free < total + (64 << 20):
        raise ConvertError(f"{out}: not enough disk space in {out_dir}: the file needs "
                           f"{total / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free")

    try:
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(out) + ".tmp-", dir=out_dir)
        os.close(fd)
    except OSError as e:
        raise ConvertError(f"{out}: cannot write: {e.strerror or e}") from None

    writer = None
    files = _Files()
    bar = None
    if any(qt in NATIVE for qt in types):
        # the native pool does the work; two readers keep it fed while the writer writes
        native_threads = max(1, int(threads or os.cpu_count() or 1))
        n_threads = 2
    else:
        native_threads = 1
        n_threads = max(1, int(threads or min(4, os.cpu_count() or 1)))
    try:
        writer = GGUFWriter(None, ARCH)
        add_metadata(writer, name or ckpt.name, outtype, hp, tok)
        for e, qt, size in zip(entries, types, sizes):
            writer.add_tensor_info(e.gguf, e.hf_shape, np.float32, size, raw_dtype=qt)
        writer.open_output_file(Path(tmp))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        bar = _Progress(sum(sizes), len(entries), progress)
        _write_data(writer.fout[0], _slices(entries, types, sizes, refs, files), bar, n_threads,
                    native_threads)
        writer.close()
        bar.close()
        bar = None
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp made it 0600; give it a normal file's mode
        os.replace(tmp, out)
    except OSError as e:
        _cleanup(writer, files, bar, tmp)
        if e.filename and os.path.abspath(e.filename) != tmp:
            raise ConvertError(f"{e.filename}: {e.strerror or e}") from None
        raise ConvertError(f"{out}: cannot write: {e.strerror or e}") from None
    except BaseException:
        _cleanup(writer, files, bar, tmp)
        raise
    files.close()
    return {"path": out, "n_tensors": len(entries), "bytes": sum(sizes),
            "seconds": time.time() - t0}


def _cleanup(writer, files, bar, tmp):
    files.close()
    if bar is not None:
        try:
            bar.close()
        except Exception:  # noqa: BLE001
            pass
    if writer is not None:
        try:
            writer.close()
        except OSError:
            pass
    try:
        os.unlink(tmp)
    except OSError:
        pass
