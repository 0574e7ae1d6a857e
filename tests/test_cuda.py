"""The CUDA backend (native/src/backend/cuda/) against the CPU backend and the simulated device.

On a machine without a usable GPU every test here is skipped ("no CUDA GPU: <why>") except the
ones that check exactly that situation: device="cuda" is then a clear error and device="auto"
falls back to the CPU.

Tolerances. The CUDA kernels expand every weight type to f32 and accumulate in f32 like the CPU
backend, only in another order (lanes of a warp, then a butterfly), so logits agree to float
rounding: |cuda - cpu| <= 1e-3 * max|cpu logits| is asserted (observed differences are far
smaller; the bound leaves room for the tiny models' 3 layers of rounding in every weight type).
Greedy tokens must be identical. Residency policies must not change a token on CUDA (lossless),
and their counters must equal the simulated device's to the unit for the same run.
"""

import glob
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = ("The quick brown fox jumps over the lazy dog. What is 37 plus 48? Hello, world! "
        "How are you today?")
LOGIT_RTOL = 1e-3
OUTTYPES = ["f32", "f16", "bf16", "q8_0"]
COUNTERS = ["h2d_bytes", "experts_promoted", "experts_demoted", "device_expert_tokens",
            "host_expert_tokens"]


def _cuda_status():
    try:
        from tide_cpp import _lib
        ok, why = _lib.cuda_available()
    except Exception as e:  # library not built or not loadable
        return None, f"tide_cpp library not loadable: {e}"
    return ok, why


CUDA_OK, CUDA_WHY = _cuda_status()
needs_gpu = pytest.mark.skipif(not CUDA_OK, reason=f"no CUDA GPU: {CUDA_WHY}")
needs_lib = pytest.mark.skipif(CUDA_OK is None, reason=CUDA_WHY)
pytestmark = pytest.mark.cuda


def _model(path, device, **kw):
    from tide_cpp import Model
    return Model(path, device=device, **kw)


def _hf_shapes():
    import hf_checkpoint as hfc
    return list(hfc.SHAPES)


def _ids(m, n):
    ids = list(m.tokenize(TEXT))
    assert len(ids) >= n
    return ids[:n]


# ---- without a GPU -----------------------------------------------------------------------------

@needs_lib
@pytest.mark.skipif(bool(CUDA_OK), reason="a CUDA GPU is present")
def test_cuda_without_gpu_is_a_clear_error(tiny_gguf):
    from tide_cpp import TideError
    assert CUDA_WHY, "tide_cuda_available must say why there is no GPU"
    path = tiny_gguf("base", "f32")[0]
    with pytest.raises(TideError) as e:
        _model(path, "cuda")
    msg = str(e.value)
    assert "no usable GPU" in msg and CUDA_WHY in msg, msg
    with _model(path, "auto") as m:  # auto falls back to the CPU
        assert m.device == "cpu"


# ---- the engine on the CUDA emulator -------------------------------------------------------------
# (the ops one by one, on the emulator and on a GPU, are native/tests/test_backend_ops.cu, run by
# `make test-native`)

def _c_sources():
    """Every C source of the library (native/src and its folders; CUDA is .cu)."""
    return sorted(glob.glob(os.path.join(ROOT, "native", "src", "**", "*.c"), recursive=True))


def _cu_sources():
    return sorted(glob.glob(os.path.join(ROOT, "native", "src", "backend", "cuda", "*.cu")))


def _build_emulated_lib(tmp_path):
    """libtide with the CUDA backend compiled against the CPU emulator: device="cuda" then runs
    the real kernels (slowly) on the host."""
    cc, cxx = shutil.which("gcc") or shutil.which("cc"), shutil.which("g++") or shutil.which("c++")
    if not cc or not cxx:
        pytest.skip("no C/C++ compiler")
    inc = ["-I" + os.path.join(ROOT, "native", "include"), "-I" + os.path.join(ROOT, "native", "src")]
    objs = []
    for i, src in enumerate(_c_sources()):
        o = str(tmp_path / f"c{i}.o")
        cmd = [cc, "-O2", "-std=c11", "-fPIC", "-pthread", "-D_GNU_SOURCE", "-w", "-DTIDE_CUDA=1",
               *inc, "-c", src, "-o", o]
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        objs.append(o)
    for i, src in enumerate(sorted(_cu_sources())):
        o = str(tmp_path / f"cu{i}.o")
        cmd = [cxx, "-O2", "-std=c++17", "-fPIC", "-w", "-DTIDE_CUDA_EMU", "-DTIDE_CUDA=1", "-x", "c++",
               "-I" + os.path.join(ROOT, "native", "tests", "emu"), *inc, "-c", src, "-o", o]
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        objs.append(o)
    lib = str(tmp_path / "libtide_emu.so")
    r = subprocess.run([cxx, "-shared", "-o", lib, *objs, "-lm", "-lpthread"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return lib


_EMU_FORWARD = r"""
import sys, numpy as np
from tide_cpp import Model
path, rtol = sys.argv[1], float(sys.argv[2])
with Model(path, device="cpu") as m:
    ids = list(m.tokenize("The quick brown fox jumps over the lazy dog."))[:13]
    ref = m.logits(ids, block_length=8)
    gen = dict(max_tokens=8, block_length=8, steps=4, threshold=0.95)
    want = m.generate(ids, **gen).tokens
for policy, b, pf in (("gpu", None, 0), ("tide", 2, 0), ("swap", 3, 0), ("tide", 2, 2)):
    with Model(path, device="cuda", policy=policy, gpu_experts=b, refresh_interval=1,
               prefetch_experts=pf) as m:
        got = m.logits(ids, block_length=8)
        err, scale = float(np.abs(got - ref).max()), float(np.abs(ref).max())
        assert err <= rtol * scale, (policy, err, scale)
        toks = m.generate(ids, **gen).tokens
        assert toks == want, (policy, toks, want)
        st = m.stats()
        assert pf == 0 or st["prefetch_bytes"] > 0, st     # the prefetch path really ran
        print(policy, "prefetch", pf, "max err", err, "scale", scale, "tokens", toks,
              "prefetch used", st["prefetch_used"])
print("ok")
"""


@pytest.mark.slow
def test_forward_on_cpu_emulator(tmp_path, tiny_gguf):
    """The whole engine with device="cuda" on the emulated GPU: forward.c and moe.c drive the real
    kernels through the backend table (uploads, fences, expert batches, the greedy head), and
    logits and greedy tokens must match device="cpu" for three residency policies."""
    lib = _build_emulated_lib(tmp_path)
    path = tiny_gguf("base", "bf16")[0]
    env = dict(os.environ, TIDE_LIB=lib, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _EMU_FORWARD, path, str(LOGIT_RTOL)], capture_output=True,
                       text=True, env=env, timeout=900)
    print(r.stdout)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


# ---- logits and greedy tokens against the CPU backend ------------------------------------------

@needs_gpu
@pytest.mark.parametrize("outtype", OUTTYPES)
@pytest.mark.parametrize("shape", _hf_shapes())
def test_logits_match_cpu(tiny_gguf, shape, outtype):
    path = tiny_gguf(shape, outtype)[0]
    with _model(path, "cpu") as m:
        ids = _ids(m, 21)
        ref = m.logits(ids, block_length=8)
    for policy in ("gpu", "cpu", "tide"):
        with _model(path, "cuda", policy=policy, gpu_experts=2, refresh_interval=1) as m:
            got = m.logits(ids, block_length=8)
        scale = float(np.abs(ref).max())
        err = float(np.abs(got - ref).max())
        assert err <= LOGIT_RTOL * scale, (shape, outtype, policy, err, scale)
        # the argmax may differ only where the top two are closer than the tolerance
        top2 = np.sort(ref, axis=1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > 2 * LOGIT_RTOL * scale
        assert (got.argmax(1)[clear] == ref.argmax(1)[clear]).all(), (shape, outtype, policy)


@needs_gpu
@pytest.mark.parametrize("outtype", ["bf16", "q8_0"])
@pytest.mark.parametrize("shape", _hf_shapes())
def test_greedy_generate_matches_cpu(tiny_gguf, shape, outtype):
    path = tiny_gguf(shape, outtype)[0]
    kw = dict(max_tokens=24, block_length=8, steps=8, threshold=0.95, temperature=0.0)
    with _model(path, "cpu") as m:
        ids = _ids(m, 13)
        ref = m.generate(ids, **kw)
    with _model(path, "cuda", policy="gpu") as m:
        got = m.generate(ids, **kw)
    assert got.tokens == ref.tokens
    assert got.stats["steps"] == ref.stats["steps"]


# ---- residency on the GPU: lossless, and the simulated device's counters -----------------------

def _residency_cases():
    cases = []
    for budget in ("0", "1", "few", "all"):
        for interval in (1, 4):
            cases.append(("tide", budget, interval))
        for policy in ("cpu", "static", "swap"):
            cases.append((policy, budget, 4))
    return cases


GEN = dict(max_tokens=24, block_length=8, steps=8, threshold=0.95, temperature=0.0)


@pytest.fixture(scope="module")
def all_resident(tiny_gguf):
    if not CUDA_OK:
        pytest.skip(f"no CUDA GPU: {CUDA_WHY}")
    path, cfg, _ = tiny_gguf("base", "bf16")
    with _model(path, "cuda", policy="gpu") as m:
        ids = _ids(m, 13)
        out = m.generate(ids, **GEN)
    return path, cfg, ids, out.tokens


@needs_gpu
@pytest.mark.parametrize("policy,budget,interval", _residency_cases())
def test_policy_lossless_and_counters_equal_sim(all_resident, policy, budget, interval):
    path, cfg, ids, want = all_resident
    n_expert = cfg["num_experts"]
    b = {"0": 0, "1": 1, "few": 3, "all": n_expert}[budget]
    kw = dict(policy=policy, gpu_experts=b, refresh_interval=interval)
    with _model(path, "cuda", **kw) as m:
        got = m.generate(ids, **GEN)
        cuda_stats = m.stats()
    assert got.tokens == want, (policy, budget, interval)
    with _model(path, "sim", **kw) as m:
        sim = m.generate(ids, **GEN)
        sim_stats = m.stats()
    assert sim.tokens == want
    for k in COUNTERS:
        assert cuda_stats[k] == sim_stats[k], (k, cuda_stats[k], sim_stats[k])
    for lc, ls in zip(cuda_stats["per_layer"], sim_stats["per_layer"]):
        for k in COUNTERS:
            assert lc[k] == ls[k], (lc["layer"], k, lc[k], ls[k])


@needs_gpu
@pytest.mark.parametrize("budget,interval,prefetch", [(1, 1, 1), (3, 1, 2), (3, 2, 8)])
def test_prefetch_lossless_and_counters_equal_sim(all_resident, budget, interval, prefetch):
    """Copies ahead of their layer on the transfer stream, slots swapped with prefetch buffers:
    the tokens stay, and so do the residency counters and the prefetch counters of sim."""
    path, cfg, ids, want = all_resident
    kw = dict(policy="tide", gpu_experts=budget, refresh_interval=interval,
              prefetch_experts=prefetch)
    with _model(path, "cuda", **kw) as m:
        got = m.generate(ids, **GEN)
        cuda_stats = m.stats()
    with _model(path, "sim", **kw) as m:
        m.generate(ids, **GEN)
        sim_stats = m.stats()
    assert got.tokens == want
    for k in COUNTERS + ("prefetch_bytes", "prefetch_used"):
        assert cuda_stats[k] == sim_stats[k], (k, cuda_stats[k], sim_stats[k])


@needs_gpu
def test_set_residency_on_a_live_context(all_resident):
    path, cfg, ids, want = all_resident
    with _model(path, "cuda", policy="cpu") as m:
        assert m.generate(ids, **GEN).tokens == want
        m.set_residency("tide", gpu_experts=2, refresh_interval=1)
        assert m.generate(ids, **GEN).tokens == want
        m.set_residency("swap", gpu_experts=3)
        assert m.generate(ids, **GEN).tokens == want


# ---- device memory ------------------------------------------------------------------------------

@needs_gpu
def test_device_memory_too_small_is_an_error(tiny_gguf):
    from tide_cpp import TideError
    path = tiny_gguf("base", "f32")[0]
    with pytest.raises(TideError) as e:
        _model(path, "cuda", device_memory=1 << 20)
    msg = str(e.value)
    assert "need" in msg and "free" in msg, msg  # "device out of memory: needed X MiB, free Y MiB"
