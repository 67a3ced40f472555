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


def test_bench_ops_accepts_run_gpu_arguments_and_keeps_partial_results(tmp_path, monkeypatch):
    """A sweep killed from outside (the device call's limit) must leave the rows it measured on disk."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_ops
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
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
