#!/usr/bin/env bash
# bench/gpu/run_h200.sh: the one prepared script for a machine with an H200 lent for ~10
# minutes. It builds the library for sm_90, checks every CUDA op against a host reference
# (native/tests/test_backend_ops.cu), times each op at mini's shapes (bench/gpu/bench_ops.cu), runs
# tests/test_cuda.py, measures host-to-device bandwidth, writes a
# random-weight GGUF with LLaDA2.0-mini's exact shapes and runs `tide-cli bench` over the
# policies and budgets 32/64/128. Every stage is bounded by `timeout`, and no stage starts when
# too little of the time budget is left, so the whole run ends inside BUDGET_S (default 510 s).
#
# Before the call, here (the device has no `gguf` package and no network):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_17_x86_64 -d .whl gguf==0.19.0
# (.whl/ is git-ignored). Then the device tool: command "bash bench/gpu/run_h200.sh",
# carry [".whl"], timeout_s 600. Results come back under $OUT (at most 8 files):
#   run.log (everything), build.log, test_ops.log, bench_ops.log, pytest_cuda.log, h2d_bw.log,
#   bench.log.
# Env: BUDGET_S, MAX_TOKENS (256), BUDGETS ("32 64 128"), SKIP_PYTEST=1, SKIP_BENCH=1.
set -x
set -o pipefail
cd "$(dirname "$0")/../.."
T0=$(date +%s)
BUDGET_S=${BUDGET_S:-510}
MAX_TOKENS=${MAX_TOKENS:-256}
BUDGETS=${BUDGETS:-"32 64 128"}
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1

left() { echo $((BUDGET_S - ($(date +%s) - T0))); }
# run_for SECONDS_WANTED LOG cmd...: run cmd under timeout min(wanted, time left - 10)
run_for() {
    local want=$1 log=$2
    shift 2
    local l
    l=$(left)
    if [ "$l" -lt 30 ]; then
        echo "SKIPPED (only ${l}s left): $*" | tee -a "$OUT/$log"
        return 124
    fi
    local t=$((l - 10 < want ? l - 10 : want))
    echo "== $(date +%T) [${t}s max, ${l}s left] $*" | tee -a "$OUT/$log"
    timeout --kill-after=5 "$t" "$@" 2>&1 | tee -a "$OUT/$log"
    local rc=${PIPESTATUS[0]}
    echo "== rc=$rc after $(($(date +%s) - T0))s" | tee -a "$OUT/$log"
    return "$rc"
}

# ---- 0. the machine ----------------------------------------------------------------------------
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.mem,driver_version --format=csv
nvcc --version | tail -2
python3 --version
nproc
free -g
df -h /dev/shm /tmp .

# ---- 1. Python: the image's python3 (torch, numpy, pytest, tokenizers, jinja2...) + gguf wheel --
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
python3 -c "import gguf, numpy, tokenizers, jinja2; print('python deps ok')" || echo "MISSING python deps"

# ---- 2. build (sm_90 only: the full arch list is CI's compile check) ----------------------------
rm -rf build tide_cpp/libtide.so
ARCH90="-gencode arch=compute_90,code=sm_90"
run_for 150 build.log make -j"$(nproc)" CUDA=1 CUDA_ARCHS="$ARCH90" lib || echo "BUILD FAILED"
ls -la tide_cpp/libtide.so

# ---- 3. every op against a host reference --------------------------------------------------------
run_for 60 test_ops.log make -j"$(nproc)" CUDA=1 CUDA_ARCHS="$ARCH90" build/cuda-on/tests/test_backend_ops_cuda
run_for 90 test_ops.log build/cuda-on/tests/test_backend_ops_cuda cuda

# ---- 3b. speed of each op at mini's shapes (GB/s against 4.8 TB/s) --------------------------------
run_for 60 bench_ops.log nvcc -O2 -std=c++17 $ARCH90 -Inative/include -Inative/src -DTIDE_CUDA=1 \
    bench/gpu/bench_ops.cu build/cuda-on/backend/cuda/*.o build/cuda-on/common.o -o build/bench_ops
run_for 90 bench_ops.log build/bench_ops

# ---- 4. host-to-device bandwidth (pinned / registered / pageable) --------------------------------
run_for 30 h2d_bw.log nvcc -O2 $ARCH90 bench/gpu/h2d_bw.cu -o build/h2d_bw
run_for 40 h2d_bw.log build/h2d_bw

# ---- 5. the CUDA test suite ------------------------------------------------------------------------
if [ -z "$SKIP_PYTEST" ]; then
    run_for 200 pytest_cuda.log python3 -m pytest -q -rfEs -p no:cacheprovider tests/test_cuda.py
fi

# ---- 6. a random GGUF with mini's exact shapes (~32 GB; RAM disk when it fits) --------------------
if [ -z "$SKIP_BENCH" ]; then
    # all 20 layers (~32 GB) on the RAM disk when it holds them; else 6 layers (~8 GB) on /tmp,
    # since a slow disk would eat the whole lease (bench.log says which)
    DIR=/tmp LAYERS=6
    shm_free=$(df -k --output=avail /dev/shm 2>/dev/null | tail -1)
    if [ -n "$shm_free" ] && [ "$shm_free" -gt $((36 * 1024 * 1024)) ]; then DIR=/dev/shm LAYERS=20; fi
    MODEL=$DIR/llada2-mini-random.gguf
    echo "random GGUF: $LAYERS layers in $DIR" | tee -a "$OUT/bench.log"
    run_for 150 bench.log python3 bench/gpu/make_random_gguf.py "$MODEL" --layers "$LAYERS"
    ls -la "$MODEL"
    # the engine's real case: a registered read-only mapping of the GGUF
    run_for 30 h2d_bw.log build/h2d_bw "$MODEL"

    # ---- 7. tide-cli bench: budget-free policies once, then every budget -------------------------
    python3 -m tide_cpp.cli bench --help >/dev/null || echo "tide-cli bench is missing or broken"
    bench() {
        local t=$1 pol=$2 b=$3
        shift 3
        run_for "$t" bench.log python3 -m tide_cpp.cli bench -m "$MODEL" \
            --policies "$pol" --gpu-experts "$b" --refresh-interval 4 --max-tokens "$MAX_TOKENS" "$@"
    }
    bench 120 gpu,tide,static 64
    # tide with its promotions copied ahead of their layer (t_transfer_wait is what it attacks)
    bench 90 tide 64 --prefetch-experts 8
    for b in $BUDGETS; do
        [ "$b" = 64 ] || bench 90 tide,static "$b"
    done
    for b in $BUDGETS; do bench 90 swap "$b"; done
    bench 120 cpu 0
    rm -f "$MODEL"
fi

nvidia-smi --query-gpu=name,memory.used,clocks.sm,clocks.mem --format=csv
echo "done in $(($(date +%s) - T0))s"
