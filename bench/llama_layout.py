"""The same weights in llama.cpp's layout: rewrite a tide.cpp GGUF (convert/ or
bench/gpu/make_random_gguf.py) as a GGUF that llama.cpp loads, so a benchmark can run both
engines on identical bytes.

    python3 bench/llama_layout.py IN.gguf OUT.gguf [--arch bailingmoe2]

What changes (everything else, tensor bytes included, is copied):
- the architecture: `bailingmoe2` by default, the name llama.cpp releases give this network
  (LLaDA2.0 is BailingMoeV2 trained for block diffusion; llama-cpp-python 0.3.36 has no `llada2`,
  whose graph would be the same apart from the attention mask). `--arch llada2` writes the
  layout of llama.cpp's LLaDA2.0 support instead, for builds that have it;
- hyperparameter keys move to the new prefix; `expert_shared_feed_forward_length` is added
  (= expert_feed_forward_length x expert_shared_count, as llama.cpp's converter writes it);
- the routed experts of a layer, one tensor per expert and matrix here, become three merged
  tensors `ffn_{gate,up,down}_exps` of numpy shape [E, rows, cols]: expert e is slice e;
- `tokenizer.huggingface.json` is dropped (llama.cpp reads the GGML lists, already present).
Memory stays flat: the input is memory-mapped and tensors are streamed to the output.
"""

import argparse
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

_EXPERT = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")
_CHUNK = 16 << 20


def _value(field):
    """(value, type, sub type) of a reader field, as GGUFWriter.add_key_value takes them."""
    t = field.types[0]
    if t == GGUFValueType.ARRAY:
        return field.contents(), t, field.types[1]
    return field.contents(), t, None


def plan_tensors(reader):
    """[(name, numpy shape, raw type, [source tensors])] in the output order: every tensor of the
    input in its order, except that a layer's experts become three merged tensors placed where
    its first expert was."""
    out, experts, placed = [], {}, set()
    for t in reader.tensors:
        m = _EXPERT.match(t.name)
        if m:
            layer, kind, e = int(m.group(1)), m.group(2), int(m.group(3))
            experts.setdefault((layer, kind), {})[e] = t
    for t in reader.tensors:
        m = _EXPERT.match(t.name)
        if not m:
            out.append((t.name, tuple(int(x) for x in reversed(t.shape)), t.tensor_type, [t]))
            continue
        layer = int(m.group(1))
        if layer in placed:
            continue
        placed.add(layer)
        for kind in ("gate", "up", "down"):
            parts = experts[(layer, kind)]
            srcs = [parts[e] for e in range(len(parts))]
            if len(srcs) != max(parts) + 1:
                raise ValueError(f"blk.{layer}.ffn_{kind}: experts missing")
            rows_cols = tuple(int(x) for x in reversed(srcs[0].shape))
            if any(s.tensor_type != srcs[0].tensor_type for s in srcs):
                raise ValueError(f"blk.{layer}.ffn_{kind}: experts of different types")
            out.append((f"blk.{layer}.ffn_{kind}_exps.weight", (len(srcs),) + rows_cols,
                        srcs[0].tensor_type, srcs))
    return out


def convert(src, dst, arch="bailingmoe2"):
    r = GGUFReader(src)
    old = r.fields["general.architecture"].contents()
    w = GGUFWriter(None, arch)
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.alignment",
                                                "tokenizer.huggingface.json"):
            continue
        val, vtype, sub = _value(field)
        key = arch + name[len(old):] if name.startswith(old + ".") else name
        w.add_key_value(key, val, vtype, sub)
    if "general.alignment" in r.fields:  # the writer's offsets follow its own alignment
        w.add_custom_alignment(int(r.fields["general.alignment"].contents()))
    n_ff_exp = r.fields[f"{old}.expert_feed_forward_length"].contents()
    n_shared = r.fields[f"{old}.expert_shared_count"].contents()
    w.add_key_value(f"{arch}.expert_shared_feed_forward_length", int(n_ff_exp * n_shared),
                    GGUFValueType.UINT32)
    if arch == "llada2":
        w.add_key_value("diffusion.shift_logits", False, GGUFValueType.BOOL)
    tensors = plan_tensors(r)
    for name, shape, qt, srcs in tensors:
        nbytes = sum(int(s.n_bytes) for s in srcs)
        w.add_tensor_info(name, shape, np.float32, nbytes, raw_dtype=qt)
    tmp = str(dst) + ".tmp"
    w.open_output_file(Path(tmp))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    f = w.fout[0]
    align = w.data_alignment
    pad = lambda n: (-n) % align  # noqa: E731
    total = 0
    for name, shape, qt, srcs in tensors:
        f.write(b"\0" * pad(f.tell()))
        n = 0
        for s in srcs:
            raw = memoryview(np.ascontiguousarray(s.data).reshape(-1).view(np.uint8))
            for i in range(0, len(raw), _CHUNK):
                f.write(raw[i:i + _CHUNK])
            n += len(raw)
        total += n
    f.write(b"\0" * pad(f.tell()))
    w.close()
    os.replace(tmp, dst)
    return total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="a tide.cpp GGUF")
    ap.add_argument("dst", help="the llama.cpp GGUF to write")
    ap.add_argument("--arch", default="bailingmoe2", choices=["bailingmoe2", "llada2"])
    a = ap.parse_args(argv)
    t0 = time.time()
    n = convert(a.src, a.dst, a.arch)
    print(f"wrote {a.dst} ({a.arch}): {n / 2**30:.2f} GiB of tensors in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
