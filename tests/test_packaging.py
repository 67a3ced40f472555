"""Packaging invariants: lean import, no top-level ops/passes/export imports, every third-party import declared,
the wheel holds every module."""

import ast
import importlib.metadata
import pathlib
import re
import subprocess
import sys
import zipfile

import pytest

from diagcompile.testing import run_python

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCE_DIRS = ["diagcompile", "ops", "passes", "export", "tests", "benchmarks"]
#: The folders that install as the package (pyproject's package-dir): what a user's install imports.
PACKAGE_DIRS = ["diagcompile", "ops", "passes", "export"]


def _py_files(dirs: list[str] = SOURCE_DIRS):
    for d in dirs:
        yield from sorted((ROOT / d).rglob("*.py"))


def _imported_modules(f: pathlib.Path) -> list[str]:
    """The absolute imports of ``f`` (``import a.b`` and ``from a.b import c`` give ``a.b``)."""
    names = []
    for node in ast.walk(ast.parse(f.read_text(), str(f))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503: onnx_ir, onnx-ir and ONNX.IR are one distribution


def _declared_distributions() -> set[str]:
    """Every distribution ``pyproject.toml`` names: the base dependencies and every extra."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11; 3.10's standard library reads no TOML
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"].values()
    requirements = [*project["dependencies"], *(r for extra in extras for r in extra)]
    return {_normalize(re.match(r"[A-Za-z0-9._-]+", r).group()) for r in requirements}


def test_no_top_level_imports_of_mapped_folders():
    bad = []
    for f in _py_files():
        bad += [
            f"{f.relative_to(ROOT)}: import {n}"
            for n in _imported_modules(f)
            if n.split(".")[0] in ("ops", "passes", "export")
        ]
    assert not bad, "import diagcompile.<pkg>, never the top-level folder:\n" + "\n".join(bad)


def test_every_third_party_import_of_the_package_is_a_declared_dependency():
    # A module the package imports itself must come from a distribution pyproject.toml names, with a floor that
    # works: one that only arrives as another package's dependency gets whatever release that package allows
    # (onnxscript 0.6.0 allows onnx-ir 0.1.15, which lacks the onnx_ir.schemas that torch 2.13's exporter uses).
    declared = _declared_distributions()
    owners = importlib.metadata.packages_distributions()
    missing = set()
    for f in _py_files(PACKAGE_DIRS):
        for name in _imported_modules(f):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top == "diagcompile":
                continue
            # Not installed here: an optional import the package guards (tensorrt, torch_tensorrt).
            dists = owners.get(top, [])
            if dists and not any(_normalize(d) in declared for d in dists):
                missing.add(f"{f.relative_to(ROOT)}: import {name} (distribution {', '.join(sorted(set(dists)))})")
    assert not missing, "imported but not declared in pyproject.toml:\n" + "\n".join(sorted(missing))


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
