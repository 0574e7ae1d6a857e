"""What a GGUF file holds, read with the gguf package alone (no native library, so that a file
the engine refuses can still be described): metadata, tensor bytes by type, routed experts."""

import os
import re

# A routed expert's matrices, one tensor each (the layout docs/MODEL.md describes).
_EXPERT = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")


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
    for t in r.tensors:
        tname = t.tensor_type.name
        n, c = by_type.get(tname, (0, 0))
        by_type[tname] = (n + int(t.n_bytes), c + 1)
        m = _EXPERT.match(t.name)
        if m:
            e = experts.setdefault(int(m.group(1)), {}).setdefault(int(m.group(3)), [0, 0])
            e[0] += int(t.n_bytes)
            e[1] += pad(int(t.n_bytes))
    one = next((e for layer in sorted(experts) for e in [experts[layer].get(0)] if e), [0, 0])
    return {
        "path": path,
        "file_bytes": os.path.getsize(path),
        "metadata": meta,
        "n_tensors": len(r.tensors),
        "bytes_by_type": {k: v[0] for k, v in by_type.items()},
        "tensors_by_type": {k: v[1] for k, v in by_type.items()},
        "tensor_bytes": sum(v[0] for v in by_type.values()),
        "moe_layers": sorted(experts),
        "experts_per_layer": max((len(v) for v in experts.values()), default=0),
        "expert_bytes": one[0],
        "expert_bytes_aligned": one[1],
        "routed_expert_bytes": sum(e[0] for v in experts.values() for e in v.values()),
        "routed_expert_bytes_aligned": sum(e[1] for v in experts.values() for e in v.values()),
    }
