"""bench/bench_onerow.py counts the bytes of one routed expert per MoE layer from the file's tensors
(its GB/s figures divide those by the engine's expert time)."""

import importlib.util
import os

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_onerow", os.path.join(ROOT, "bench", "bench_onerow.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_expert_pair_bytes_of_the_demo():
    # the demo: 5 layers, the first dense; a routed expert is gate, up [64 x 128] and down
    # [128 x 64] in bf16, 3 * 128 * 64 * 2 bytes; the shared expert is not counted
    pair = _bench().expert_pair_bytes(os.path.join(ROOT, "models", "tide-demo.gguf"))
    assert pair == {1: 49152, 2: 49152, 3: 49152, 4: 49152}
