"""The same weights in llama.cpp's layout: rewrite a tide.cpp GGUF as the GGUF that llama.cpp's
converter would have written, so that both engines can run identical bytes and the loader's
llama.cpp path can be tested on known weights.

    python -m tide_cpp.convert.llama_layout IN.gguf OUT.gguf [--arch llada2|bailingmoe2]
        [--split-attention] [--alignment N]

What changes (everything else, tensor bytes included, is copied):
- the architecture: `llada2` (llama.cpp's LLaDA2.0 support) by default, or `bailingmoe2`, the name
  llama.cpp releases give this network (LLaDA2.0 is BailingMoeV2 trained for block diffusion;
  the graph is the same apart from the attention mask), for builds without `llada2`;
- hyperparameter keys move to the new prefix; keys llama.cpp does not know are dropped
  (`attention.qk_norm`); `expert_shared_feed_forward_length` is written when missing
  (= expert_feed_forward_length x expert_shared_count, as llama.cpp's converter writes it);
- the routed experts of a layer, one tensor per expert matrix here, become three merged tensors
  `ffn_{gate,up,down}_exps` of numpy shape [E, rows, cols], placed where the layer's first
  expert was: expert e is slice e;
- `tokenizer.huggingface.json` is dropped (llama.cpp reads the GGML token and merge lists);
- with --split-attention the fused `attn_qkv` becomes `attn_q`, `attn_k`, `attn_v` (its row
  ranges), the other attention layout llama.cpp-style files use;
- --alignment sets `general.alignment` (llama.cpp's default is 32; by default the input's).

Memory stays flat: the input is memory-mapped and tensors are streamed to the output, which is
written to a temporary file next to OUT and renamed into place only when complete.
"""

import argparse
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

from .errors import ConvertError

ARCHS = ("llada2", "bailingmoe2")
_EXPERT = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")
_QKV = re.compile(r"^blk\.(\d+)\.attn_qkv\.weight$")
_CHUNK = 16 << 20
# Metadata that llama.cpp's files do not carry: this project's own key, and the embedded
# tokenizer.json (llama.cpp's tokenizer is the GGML lists).
_DROPPED_SUFFIXES = ("attention.qk_norm",)
_DROPPED_KEYS = ("tokenizer.huggingface.json",)


class LayoutError(ConvertError):
    """The input is not a tide.cpp GGUF this module can rewrite (the message names the cause)."""


class _Part:
    """A byte range of one input tensor: what an output tensor is made of."""

    def __init__(self, tensor, start=0, stop=None):
        self.tensor = tensor
        self.start = start
        self.stop = int(tensor.n_bytes) if stop is None else stop

    @property
    def n_bytes(self):
        return self.stop - self.start

    def raw(self):
        data = np.ascontiguousarray(self.tensor.data).reshape(-1).view(np.uint8)
        return memoryview(data[self.start:self.stop])


def _value(field):
    """(value, type, sub type) of a reader field, as GGUFWriter.add_key_value takes them."""
    from gguf import GGUFValueType

    t = field.types[0]
    if t == GGUFValueType.ARRAY:
        return field.contents(), t, field.types[1]
    return field.contents(), t, None


def _shape(t):
    """numpy-order shape of a reader tensor (ggml's dims reversed)."""
    return tuple(int(x) for x in reversed(t.shape))


def _split_qkv(t, layer, n_q, n_kv):
    """The fused attn_qkv of `layer` as three row ranges: [(name, shape, parts)]."""
    rows, cols = _shape(t)
    if rows != n_q + 2 * n_kv:
        raise LayoutError(f"tensor '{t.name}': {rows} rows, expected {n_q} + 2 x {n_kv}")
    row_bytes = int(t.n_bytes) // rows
    out, r0 = [], 0
    for kind, n in (("q", n_q), ("k", n_kv), ("v", n_kv)):
        part = _Part(t, r0 * row_bytes, (r0 + n) * row_bytes)
        out.append((f"blk.{layer}.attn_{kind}.weight", (n, cols), [part]))
        r0 += n
    return out


def plan_tensors(reader, split_attention=False, n_q=None, n_kv=None):
    """[(name, numpy shape, raw type, [parts])] in the output order: every tensor of the input in
    its order, except that a layer's experts become three merged tensors placed where its first
    expert was, and (split_attention) attn_qkv becomes attn_q, attn_k, attn_v."""
    experts = {}
    for t in reader.tensors:
        m = _EXPERT.match(t.name)
        if m:
            layer, kind, e = int(m.group(1)), m.group(2), int(m.group(3))
            experts.setdefault((layer, kind), {})[e] = t
    out, placed = [], set()
    for t in reader.tensors:
        m = _EXPERT.match(t.name)
        q = _QKV.match(t.name) if split_attention else None
        if q:
            out.extend((name, shape, t.tensor_type, parts)
                       for name, shape, parts in _split_qkv(t, int(q.group(1)), n_q, n_kv))
            continue
        if not m:
            out.append((t.name, _shape(t), t.tensor_type, [_Part(t)]))
            continue
        layer = int(m.group(1))
        if layer in placed:
            continue
        placed.add(layer)
        for kind in ("gate", "up", "down"):
            parts = experts.get((layer, kind), {})
            missing = [e for e in range(max(parts, default=-1) + 1) if e not in parts]
            if not parts or missing:
                raise LayoutError(f"blk.{layer}.ffn_{kind}: expert tensors missing "
                                  f"({', '.join(map(str, missing[:8])) or 'all'})")
            srcs = [parts[e] for e in range(len(parts))]
            first = srcs[0]
            for s in srcs[1:]:
                if s.tensor_type != first.tensor_type or _shape(s) != _shape(first):
                    raise LayoutError(f"tensor '{s.name}': {s.tensor_type.name} {_shape(s)}, but "
                                      f"'{first.name}' is {first.tensor_type.name} "
                                      f"{_shape(first)}: experts must match to merge")
            out.append((f"blk.{layer}.ffn_{kind}_exps.weight", (len(srcs),) + _shape(first),
                        first.tensor_type, [_Part(s) for s in srcs]))
    return out


def _field_int(reader, key):
    if key not in reader.fields:
        raise LayoutError(f"key '{key}' not found")
    return int(reader.fields[key].contents())


def _typed(key, value):
    """(value, GGUF type) of a metadata value given as a Python bool, int, float or str."""
    from gguf import GGUFValueType

    for py, gt in ((bool, GGUFValueType.BOOL), (int, GGUFValueType.UINT32),
                   (float, GGUFValueType.FLOAT32), (str, GGUFValueType.STRING)):
        if isinstance(value, py):
            return value, gt
    raise LayoutError(f"key '{key}': value {value!r} is not a bool, int, float or str")


def _metadata(r, old, arch, alignment):
    """{key: (value, type, sub type)} of the output, in order: the input's keys under the new
    prefix less the ones llama.cpp's files lack, then the keys llama.cpp's loader needs that the
    input may lack."""
    from gguf import GGUFValueType

    dropped = {f"{old}.{s}" for s in _DROPPED_SUFFIXES} | set(_DROPPED_KEYS)
    if arch != "llada2":  # the diffusion key belongs to llama.cpp's diffusion architectures
        dropped.add("diffusion.shift_logits")
    meta = {}
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in dropped:
            continue
        key = arch + name[len(old):] if name.startswith(old + ".") else name
        meta[key] = _value(field)
    if alignment is not None:
        meta["general.alignment"] = (alignment, GGUFValueType.UINT32, None)
    shared = f"{arch}.expert_shared_feed_forward_length"
    if shared not in meta:
        n_ff_exp = _field_int(r, f"{old}.expert_feed_forward_length")
        n_shared = _field_int(r, f"{old}.expert_shared_count")
        meta[shared] = (n_ff_exp * n_shared, GGUFValueType.UINT32, None)
    if arch == "llada2" and "diffusion.shift_logits" not in meta:
        meta["diffusion.shift_logits"] = (False, GGUFValueType.BOOL, None)
    return meta


def convert(src, dst, arch="llada2", split_attention=False, alignment=None, set_keys=None):
    """Write src (a tide.cpp GGUF) to dst in llama.cpp's layout; returns the bytes of tensor
    data written. dst appears only when complete. set_keys {output key: value, or None to leave
    the key out} edits the metadata last (to write files as other writers do)."""
    from gguf import GGUFReader, GGUFWriter

    if arch not in ARCHS:
        raise LayoutError(f"arch {arch!r}: expected one of {', '.join(ARCHS)}")
    if alignment is not None and (alignment < 1 or alignment & (alignment - 1) or alignment % 8):
        raise LayoutError(f"alignment {alignment}: expected a power of two >= 8")
    r = GGUFReader(src)
    if "general.architecture" not in r.fields:
        raise LayoutError(f"{src}: no general.architecture")
    old = r.fields["general.architecture"].contents()
    n_q = n_kv = None
    if split_attention:
        hd = _field_int(r, f"{old}.attention.key_length")
        n_q = _field_int(r, f"{old}.attention.head_count") * hd
        n_kv = _field_int(r, f"{old}.attention.head_count_kv") * hd
    tensors = plan_tensors(r, split_attention, n_q, n_kv)

    meta = _metadata(r, old, arch, alignment)
    for key, value in (set_keys or {}).items():
        meta.pop(key, None)
        if value is not None:
            meta[key] = _typed(key, value) + (None,)
    w = GGUFWriter(None, arch)
    for key, (val, vtype, sub) in meta.items():
        if key == "general.alignment":  # the writer's offsets follow its own alignment
            w.add_custom_alignment(int(val))
        else:
            w.add_key_value(key, val, vtype, sub)
    for name, shape, qt, parts in tensors:
        w.add_tensor_info(name, shape, np.float32, sum(p.n_bytes for p in parts), raw_dtype=qt)

    tmp = f"{dst}.tmp{os.getpid()}"
    total = 0
    try:
        w.open_output_file(Path(tmp))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        f = w.fout[0]
        align = w.data_alignment
        for _, _, _, parts in tensors:
            f.write(b"\0" * ((-f.tell()) % align))
            for p in parts:
                raw = p.raw()
                for i in range(0, len(raw), _CHUNK):
                    f.write(raw[i:i + _CHUNK])
                total += len(raw)
        f.write(b"\0" * ((-f.tell()) % align))
        w.close()
        os.replace(tmp, dst)
    except BaseException:
        w.close()
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return total


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tide_cpp.convert.llama_layout",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="a tide.cpp GGUF")
    ap.add_argument("dst", help="the llama.cpp-layout GGUF to write")
    ap.add_argument("--arch", default="llada2", choices=ARCHS,
                    help="general.architecture of the output (default: llada2)")
    ap.add_argument("--split-attention", action="store_true",
                    help="write attn_q, attn_k, attn_v instead of the fused attn_qkv")
    ap.add_argument("--alignment", type=int, default=None,
                    help="general.alignment of the output (default: the input's)")
    a = ap.parse_args(argv)
    t0 = time.time()
    try:
        n = convert(a.src, a.dst, a.arch, a.split_attention, a.alignment)
    except (LayoutError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {a.dst} ({a.arch}): {n / 2**30:.2f} GiB of tensors in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
