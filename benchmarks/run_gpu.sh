#!/usr/bin/env bash
# GPU tests and benchmarks of the Triton kernels, one step per call (each well under 10 minutes on an H100).
#
#   bash benchmarks/run_gpu.sh tests        # tests/ops/test_cuda.py                          (~3-5 min)
#   bash benchmarks/run_gpu.sh ops-fwd      # op sweep, forward            -> gpu_ops_fwd.*    (<= 9 min)
#   bash benchmarks/run_gpu.sh ops-fwdbwd   # op sweep, forward + backward -> gpu_ops_fwdbwd.* (<= 9 min)
#   bash benchmarks/run_gpu.sh train        # ViT-B MLP training step      -> gpu_train_step.* (~1 min)
#   bash benchmarks/run_gpu.sh all          # the four in a row (for a long session, not one device call)
#
# Results and logs go to $OUT (the device tool's output folder) or benchmarks/results; at most 4 files per
# step. Compiled Triton kernels are cached in .cache/triton (git-ignored, so it stays on a warm machine
# between calls). The machine has no network: diagcompile is installed from this checkout without deps.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$PWD/.cache/triton}"
export PYTHONUNBUFFERED=1

setup() {
    if ! "$PY" -c "import diagcompile.ops" 2>/dev/null; then
        echo "installing diagcompile from this checkout (no deps, no build isolation: offline)"
        "$PY" -m pip install --quiet --no-deps --no-build-isolation -e . || {
            echo "pip install -e . failed; is setuptools>=69 installed in this environment?" >&2
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
    step tests gpu_tests.log timeout 570 "$PY" -m pytest -q -rs -p no:cacheprovider tests/ops/test_cuda.py
}
run_ops() {  # fwd | fwdbwd
    step "ops-$1" "gpu_ops_$1.log" timeout 570 "$PY" benchmarks/bench_ops.py --mode "$1" --out "$OUT" \
        --time-budget-s 450
}
run_train() {
    step train gpu_train_step.log timeout 570 "$PY" benchmarks/bench_train_step.py --out "$OUT"
}

setup
case "${1:-}" in
    tests) run_tests ;;
    ops-fwd) run_ops fwd ;;
    ops-fwdbwd) run_ops fwdbwd ;;
    train) run_train ;;
    all)
        rc=0
        run_tests || rc=$?
        run_ops fwd || rc=$?
        run_ops fwdbwd || rc=$?
        run_train || rc=$?
        exit $rc
        ;;
    *)
        echo "usage: $0 {tests|ops-fwd|ops-fwdbwd|train|all}" >&2
        exit 2
        ;;
esac
