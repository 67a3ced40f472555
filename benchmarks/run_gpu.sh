#!/usr/bin/env bash
# GPU tests and benchmarks of the Triton kernels, one step per call (each well under 10 minutes on an H100).
#
#   bash benchmarks/run_gpu.sh tests        # tests/ops/test_cuda.py                          (~3-5 min)
#   bash benchmarks/run_gpu.sh ops-fwd      # op sweep, forward            -> gpu_ops_fwd.*    (<= 9 min)
#   bash benchmarks/run_gpu.sh ops-fwdbwd   # op sweep, forward + backward -> gpu_ops_fwdbwd.* (<= 9 min)
#   bash benchmarks/run_gpu.sh train        # ViT-B MLP training step      -> gpu_train_step.* (~1 min)
#   bash benchmarks/run_gpu.sh extra        # other GPU tests, AOT PTX launch -> gpu_extra.log, gpu_verify_aot.*
#   bash benchmarks/run_gpu.sh vit          # ViT-B compiled, diag vs dense    -> vit_compile.* (time unmeasured)
#   bash benchmarks/run_gpu.sh tests train  # several steps in one device call (each machine start costs minutes)
#   bash benchmarks/run_gpu.sh all          # the four main steps in a row (for a long session, not one device call)
#
# Results and logs go to $OUT (the device tool's output folder) or benchmarks/results; at most 4 files per
# step. Compiled Triton kernels are cached in .cache/triton (git-ignored, so it stays on a warm machine
# between calls). The machine has no network: diagcompile is installed from this checkout without deps.
# PYTHON picks the interpreter (default python3: on the device machine that is the one holding PyTorch).
# OPS_BUDGET_S (default 450) is when a sweep starts no new case; lower it when the device call has less than
# 600 s left. The sweeps rewrite their csv/md after every layer, so a killed run keeps what it measured.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
OPS_BUDGET_S="${OPS_BUDGET_S:-450}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$PWD/.cache/triton}"
export PYTHONUNBUFFERED=1

setup() {
    if ! "$PY" -c "import diagcompile.ops" 2>/dev/null; then
        echo "installing diagcompile from this checkout (no deps, no build isolation: offline)"
        "$PY" -m pip install --quiet --no-deps --no-build-isolation --no-index --disable-pip-version-check -e . || {
            echo "pip install -e . failed with $PY ($(command -v "$PY" || echo 'not found')); is setuptools>=64 installed?" >&2
            exit 2
        }
    fi
    "$PY" - <<'EOF'
import torch, triton
assert torch.cuda.is_available(), "no CUDA device visible"
print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
EOF
}

step() {  # name, log file, command...
    local name=$1 log=$2
    shift 2
    local t0=$SECONDS
    echo "=== $name ==="
    set +e
    "$@" 2>&1 | tee "$OUT/$log"
    local rc=${PIPESTATUS[0]}
    set -e
    echo "=== $name: exit $rc after $((SECONDS - t0)) s ==="
    return "$rc"
}

run_tests() {
    # -v: every test's verdict is in the log as it finishes, also when the step is killed before pytest's summary.
    step tests gpu_tests.log timeout 540 "$PY" -m pytest -v -rs --tb=short -p no:cacheprovider tests/ops/test_cuda.py
}
run_ops() {  # fwd | fwdbwd
    step "ops-$1" "gpu_ops_$1.log" timeout 540 "$PY" benchmarks/bench_ops.py --mode "$1" --out "$OUT" \
        --time-budget-s "$OPS_BUDGET_S"
}
run_train() {
    step train gpu_train_step.log timeout 540 "$PY" benchmarks/bench_train_step.py --out "$OUT"
}
run_extra() {  # the GPU tests outside test_cuda.py (compiled graphs, CUDA graphs), then the AOT PTX launch check
    # with its result table (tests/export's GPU test runs the same script with --quick): no step above runs them.
    step extra gpu_extra.log timeout 540 bash -c '"$1" -m pytest -v -rs --tb=short -p no:cacheprovider \
        tests/passes/test_backend.py -k cuda && "$1" benchmarks/gpu_verify_aot.py --out "$2"' _ "$PY" "$OUT"
}
run_vit() {
    step vit vit_compile.log timeout 540 "$PY" benchmarks/bench_vit_compile.py --out "$OUT"
}

usage() {
    echo "usage: $0 STEP... (STEP: tests | ops-fwd | ops-fwdbwd | train | extra | vit | all)" >&2
    exit 2
}
[ $# -gt 0 ] || usage
for s in "$@"; do  # check every name before spending device time on setup
    case "$s" in tests | ops-fwd | ops-fwdbwd | train | extra | vit | all) ;; *) usage ;; esac
done
setup
rc=0
for s in "$@"; do
    case "$s" in
        tests) run_tests || rc=$? ;;
        ops-fwd) run_ops fwd || rc=$? ;;
        ops-fwdbwd) run_ops fwdbwd || rc=$? ;;
        train) run_train || rc=$? ;;
        extra) run_extra || rc=$? ;;
        vit) run_vit || rc=$? ;;
        all)
            run_tests || rc=$?
            run_ops fwd || rc=$?
            run_ops fwdbwd || rc=$?
            run_train || rc=$?
            ;;
    esac
done
exit $rc
