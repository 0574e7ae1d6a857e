"""What a GGUF file holds, read with the gguf package alone (no native library, so that a file
the engine refuses can still be described): metadata, tensor bytes by type, routed experts."""

import os
import re

# A routed expert's matrices, one tensor each (the layout docs/MODEL.md describes), or a layer's
# experts merged into three tensors whose slice e is expert e (llama.cpp's layout).
_EXPERT = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")
_MERGED = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")
_FUSED_QKV = re.compile(r"^blk\.\d+\.attn_qkv\.weight$")
_SPLIT_Q = re.compile(r"^blk\.\d+\.attn_q\.weight$")


def _layout(per_expert, merged, fused, split):
    """How the file stores routed experts and attention, in words (tide-cli info)."""
    experts = [w for n, w in ((per_expert, "one tensor per expert matrix"),
                              (merged, "merged per layer (ffn_*_exps)")) if n]
    attention = [w for n, w in ((fused, "fused attn_qkv"), (split, "split attn_q/k/v")) if n]
    return {"experts": " and ".join(experts) or "none",
            "attention": " and ".join(attention) or "none"}


def summarize(path):
    """A dict describing the GGUF at path (raises OSError / ValueError on unreadable files)."""
    from gguf import GGUFReader

    r = GGUFReader(path)
    meta = {}
    for name, field in r.fields.items():
        if name.startswith("GGUF."):
            continue
        meta[name] = field.contents()
    align = meta.get("general.alignment", 32)
    pad = lambda n: (n + align - 1) // align * align  # noqa: E731
    by_type = {}
    experts = {}  # layer -> {expert: [bytes, padded bytes]}
    n_per_expert = n_merged = n_fused = n_split = 0
    for t in r.tensors:
        tname = t.tensor_type.name
        n, c = by_type.get(tname, (0, 0))
        by_type[tname] = (n + int(t.n_bytes), c + 1)
        n_fused += bool(_FUSED_QKV.match(t.name))
        n_split += bool(_SPLIT_Q.match(t.name))
        m = _EXPERT.match(t.name)
        if m:
            n_per_expert += 1
            e = experts.setdefault(int(m.group(1)), {}).setdefault(int(m.group(3)), [0, 0])
            e[0] += int(t.n_bytes)
            e[1] += pad(int(t.n_bytes))
        m = _MERGED.match(t.name)
        if m and len(t.shape) == 3 and int(t.shape[2]) > 0:
            # slices follow one another without padding: the bytes of one are an equal share
            n_merged += 1
            n_exp = int(t.shape[2])
            layer = experts.setdefault(int(m.group(1)), {})
            for i in range(n_exp):
                e = layer.setdefault(i, [0, 0])
                e[0] += int(t.n_bytes) // n_exp
                e[1] += int(t.n_bytes) // n_exp
    one = next((e for layer in sorted(experts) for e in [experts[layer].get(0)] if e), [0, 0])
    return {
        "path": path,
        "file_bytes": os.path.getsize(path),
        "metadata": meta,
        "n_tensors": len(r.tensors),
        "bytes_by_type": {k: v[0] for k, v in by_type.items()},
        "tensors_by_type": {k: v[1] for k, v in by_type.items()},
        "tensor_bytes": sum(v[0] for v in by_type.values()),
        "layout": _layout(n_per_expert, n_merged, n_fused, n_split),
        "moe_layers": sorted(experts),
        "experts_per_layer": max((len(v) for v in experts.values()), default=0),
        "expert_bytes": one[0],
        "expert_bytes_aligned": one[1],
        "routed_expert_bytes": sum(e[0] for v in experts.values() for e in v.values()),
        "routed_expert_bytes_aligned": sum(e[1] for v in experts.values() for e in v.values()),
    }
