#!/usr/bin/env bash
# The GPU checks of the engine issue in one device call (about 5-8 minutes on an H100):
# build antdiff._C with the machine's own torch, run the tests that exercise CUDA (kernels vs
# references, no host sync over an engine step, memory), then the kernel bandwidth and step
# benchmarks. Everything lands in $OUT (default gpu_out/): logs, raw pytest-benchmark JSON and
# summaries (kernels_gpu.md, step_gpu.md) to copy into benchmarks/results/.
#
#   device run: bash scripts/gpu_check.sh [all|tests|bench]   (no network there: nothing is
#   downloaded; "tests" and "bench" split the work over two calls if one would run too long)
set -uo pipefail
STAGE=${1:-all}
OUT=${OUT:-gpu_out}
PY=${PY:-python3}
mkdir -p "$OUT"
export ANT_REQUIRE_CPP=1 PYTHONPATH=python:. PYTHONDONTWRITEBYTECODE=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
    >"$OUT/gpu.txt" 2>&1
$PY -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" \
    >>"$OUT/gpu.txt" 2>&1
status=0
$PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1 || {
    status=1; echo "build failed"; tail -20 "$OUT/build.log"; }
if [ "$STAGE" != bench ]; then
    $PY -m pytest -q -p no:cacheprovider tests/test_kernels_gram.py tests/test_kernels_combine.py \
        tests/test_kernels_pcgrad.py tests/test_kernels_nash.py tests/test_engine.py \
        tests/test_mtl.py tests/test_onepass.py tests/test_memory.py >"$OUT/tests.log" 2>&1 \
        || status=1
    tail -3 "$OUT/tests.log"
fi
[ "$STAGE" = tests ] && exit $status

$PY -m pytest -q -p no:cacheprovider benchmarks/bench_kernels.py -k cuda \
    --benchmark-json="$OUT/kernels_raw.json" >"$OUT/bench_kernels.log" 2>&1 || status=1
[ -f "$OUT/kernels_raw.json" ] && $PY benchmarks/bench_kernels.py "$OUT/kernels_raw.json" \
    "$OUT/kernels_gpu" && cat "$OUT/kernels_gpu.md"

# peers (LibMTL, torchjd) are not installed there: our scenarios against vanilla only
$PY -m pytest -q -p no:cacheprovider benchmarks/bench_step.py \
    -k "cuda and (unet or dit) and not libmtl and not torchjd" \
    --benchmark-json="$OUT/step_raw.json" >"$OUT/bench_step.log" 2>&1 || status=1
[ -f "$OUT/step_raw.json" ] && $PY benchmarks/bench_step.py "$OUT/step_raw.json" "$OUT/step_gpu" \
    && cat "$OUT/step_gpu.md"
exit $status
