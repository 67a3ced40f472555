"""Packaging invariants: lean import, no top-level ops/passes/export imports, the wheel holds every module."""

import ast
import pathlib
import subprocess
import sys
import zipfile

import pytest

from diagcompile.testing import run_python

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCE_DIRS = ["diagcompile", "ops", "passes", "export", "tests", "benchmarks"]


def _py_files():
    for d in SOURCE_DIRS:
        yield from sorted((ROOT / d).rglob("*.py"))


def test_no_top_level_imports_of_mapped_folders():
    bad = []
    for f in _py_files():
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            bad += [
                f"{f.relative_to(ROOT)}: import {n}" for n in names if n.split(".")[0] in ("ops", "passes", "export")
            ]
    assert not bad, "import diagcompile.<pkg>, never the top-level folder:\n" + "\n".join(bad)


LEAN = """
import sys, builtins
import torch
def _boom(*a, **k):
    raise RuntimeError("CUDA was touched at import time")
torch.cuda.current_device = _boom
torch.cuda._lazy_init = _boom
torch.cuda.init = _boom
sys.modules["triton"] = None  # any `import triton` now raises ImportError
import diagcompile, diagcompile.ops, diagcompile.passes, diagcompile.export, diagcompile.dst
from diagcompile import DiagLinear
heavy = [m for m in ("triton", "numba", "onnx", "onnxscript", "matplotlib", "sklearn") if sys.modules.get(m)]
assert not heavy, heavy
# A CPU forward may load the numba kernel (ops/cpu_kernels.py) when dispatch picks it; nothing else.
DiagLinear(16, 32)(torch.randn(2, 16))
heavy = [m for m in ("triton", "onnx", "onnxscript", "matplotlib", "sklearn") if sys.modules.get(m)]
assert not heavy, heavy
assert not torch.cuda.is_initialized()
print("lean")
"""


def test_lean_import():
    assert run_python(LEAN).strip().endswith("lean")


@pytest.mark.slow
def test_wheel_contains_and_imports_every_module(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("diagcompile-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    expected = []
    for pkg, folder in [
        ("diagcompile", "diagcompile"),
        ("diagcompile/ops", "ops"),
        ("diagcompile/passes", "passes"),
        ("diagcompile/export", "export"),
    ]:
        expected += [f"{pkg}/{f.relative_to(ROOT / folder).as_posix()}" for f in (ROOT / folder).rglob("*.py")]
    missing = sorted(set(expected) - set(names))
    assert not missing, f"missing from the wheel: {missing}"
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    modules = sorted(n[:-3].replace("/", ".").removesuffix(".__init__") for n in names if n.endswith(".py"))
    code = (
        "import importlib, sys\n"
        f"mods = {modules!r}\n"
        "for m in mods:\n"
        "    mod = importlib.import_module(m)\n"
        f"    assert mod.__file__.startswith({str(target)!r}), (m, mod.__file__)\n"
        "print(len(mods))\n"
    )
    out = run_python(code, env={"PYTHONPATH": str(target)}, cwd=str(tmp_path))
    assert int(out.strip()) == len(modules) > 10
