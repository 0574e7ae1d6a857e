"""bench/bench_onerow.py counts the bytes of one routed expert per MoE layer from the file's tensors
(its GB/s figures divide those by the engine's expert time)."""

import importlib.util
import os
import re

import pytest

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


def test_whole_forward_line_splits_the_engine_time(capsys):
    # the whole one-token forward (wall time) and its parts from the engine's own timers: the
    # parts are inside the forward, so they sum to no more than it; no llama.cpp without --llama
    demo = os.path.join(ROOT, "models", "tide-demo.gguf")
    assert _bench().main([demo, "--forwards", "20", "--reps", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"one-token forward \(whole\): tide ([\d.]+) ms \(lm head ([\d.]+), attention "
                  r"([\d.]+), dense ([\d.]+), host experts ([\d.]+) ms\)\n", out)
    assert m, out
    whole, *parts = map(float, m.groups())
    assert 0 < sum(parts) <= whole and "llama.cpp" not in out.splitlines()[-1]


def test_llama_side_needs_its_interpreter(monkeypatch):
    monkeypatch.setenv("LLAMA_PYTHON", "/nonexistent/python")
    demo = os.path.join(ROOT, "models", "tide-demo.gguf")
    with pytest.raises(SystemExit, match="no interpreter /nonexistent/python"):
        _bench().main([demo, "--forwards", "2", "--reps", "1", "--threads", "1", "--llama", demo])
