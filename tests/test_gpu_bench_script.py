"""bench/gpu/make_random_gguf.py, the GGUF writer of the prepared H200 run (bench/gpu/run_h200.sh),
checked here, where it is cheap: a GPU run must not spend its minutes on a broken script.
Mini's shapes (hidden 2048, experts of 3 x 2048 x 512), fewer layers, experts and vocabulary."""

import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def test_random_mini_gguf_loads_and_runs(tmp_path):
    pytest.importorskip("gguf")
    out = tmp_path / "mini-random.gguf"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu", "make_random_gguf.py"),
                        str(out), "--layers", "2", "--experts", "16", "--vocab", "1024"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not os.path.exists(str(out) + ".tmp")
    import tide_cpp
    ids = list(range(5, 21))
    with tide_cpp.Model(str(out), device="cpu", policy="cpu") as m:
        hp = m.hparams
        assert hp["n_embd"] == 2048 and hp["n_expert"] == 16 and hp["n_ff_exp"] == 512
        want = m.logits(ids, block_length=8)
    assert want.shape == (16, 1024) and np.isfinite(want).all()
    with tide_cpp.Model(str(out), device="sim", policy="swap", gpu_experts=4) as m:
        got = m.logits(ids, block_length=8)
        st = m.stats()
    assert st["experts_promoted"] > 0 and st["device_expert_tokens"] > 0
    assert np.array_equal(got, want)      # experts moved, not one bit of the result
