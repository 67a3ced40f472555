"""benchmarks/run_gpu.sh and the GPU benchmark scripts, checked without a GPU: device time is scarce, so
whatever would make a device call fail for a reason visible on a CPU must fail here instead."""

import csv
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN_GPU = ROOT / "benchmarks" / "run_gpu.sh"


def test_run_gpu_sh_parses_and_refuses_unknown_steps_before_setup(tmp_path):
    subprocess.run(["bash", "-n", str(RUN_GPU)], check=True)
    # A missing interpreter proves that setup (which would install and import) never ran.
    env = {**os.environ, "PYTHON": str(tmp_path / "no-python"), "OUT": str(tmp_path)}
    for argv in ([], ["tests", "bogus"]):
        proc = subprocess.run(["bash", str(RUN_GPU), *argv], env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "usage:" in proc.stderr, proc


def _bench_ops_argv() -> list[str]:
    """The arguments run_gpu.sh passes to bench_ops.py, with its shell variables filled in."""
    text = RUN_GPU.read_text()
    m = re.search(r"benchmarks/bench_ops\.py(.*?)\n\s*--time-budget-s (\S+)", text, re.S)
    assert m, "run_gpu.sh no longer calls bench_ops.py the way this test expects"
    argv = shlex.split(m.group(1).rstrip().rstrip("\\")) + ["--time-budget-s", *shlex.split(m.group(2))]
    subst = {"$1": "fwd", "$OUT": "OUT", "$OPS_BUDGET_S": "450"}  # shlex has removed the quotes
    return [subst.get(a, a) for a in argv]


def _import_bench_ops():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_ops
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return bench_ops


def test_bench_ops_targets_count_an_unmeasured_case_as_incomplete_not_pass():
    """A case that failed or ran out of budget is a NaN row: the verdict once dropped it, so one measured
    layer of two passed the target alone, and ``min`` over the M >= 4096 ratios depended on where a NaN sat."""
    bench_ops = _import_bench_ops()
    nan = float("nan")

    def row(layer, M, ratio, contender="diag", ms=1.0, s=0.9):
        return dict(layer=layer, M=M, sparsity=s, contender=contender, mode="fwd", x_vs_dense=ratio, ms=ms)

    up, down = "up 4096->14336", "down 14336->4096"
    rows = [row(up, 1, 8.0), row(down, 1, nan, ms=nan), row(up, 16, 7.0), row(down, 16, 5.0)]
    rows += [row(up, 4096, nan, ms=nan), row(down, 4096, 1.2)]
    got = {case.split(" (")[0]: (measured, verdict) for case, _, measured, verdict in bench_ops.targets(rows, "fwd")}
    assert got["M=1, 4096->14336 and 14336->4096, 90%"] == ("8.00, n/a", "INCOMPLETE (1 of 2 not measured)")
    assert got["M=16, 4096->14336 and 14336->4096, 90%"] == ("7.00, 5.00", "FAIL"), "a measured failure stays FAIL"
    assert got["every layer, M >= 4096, 90%"] == ("min 1.20", "INCOMPLETE (1 of 2 not measured)")
    assert got["ViT-B fc1 / fc2, M=197, 90%"] == ("not measured", "-")
    rows[1] = row(down, 1, 7.5)
    got = {case.split(" (")[0]: verdict for case, _, _, verdict in bench_ops.targets(rows, "fwd")}
    assert got["M=1, 4096->14336 and 14336->4096, 90%"] == "PASS"


def test_bench_ops_accepts_run_gpu_arguments_and_keeps_partial_results(tmp_path, monkeypatch):
    """A sweep killed from outside (the device call's limit) must leave the rows it measured on disk."""
    bench_ops = _import_bench_ops()
    argv = [str(tmp_path) if a == "OUT" else a for a in _bench_ops_argv()]
    assert "--out" in argv and "--mode" in argv

    made = []
    real_layer = bench_ops.Layer

    def layer(*a, **kw):  # the second layer "is killed"
        if made:
            raise KeyboardInterrupt("killed")
        made.append(a)
        return real_layer(*a, **kw)

    monkeypatch.setattr(bench_ops, "Layer", layer)
    tiny = ["--smoke", "--cpu", "--m", "1", "--sparsity", "0.9", "--contenders", "dense"]
    with pytest.raises(KeyboardInterrupt):
        bench_ops.main(argv + tiny)
    with open(tmp_path / "smoke_ops_fwd.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["contender"] for r in rows] == ["dense"] and rows[0]["ms"] not in ("", "nan")
    assert "Incomplete" in (tmp_path / "smoke_ops_fwd.md").read_text()
