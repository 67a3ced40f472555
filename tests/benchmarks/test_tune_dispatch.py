"""benchmarks/tune_dispatch.py: threshold logic (with synthetic timings) and the table rewrite."""

import importlib.util
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tune():
    spec = importlib.util.spec_from_file_location("tune_dispatch", ROOT / "benchmarks" / "tune_dispatch.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["tune_dispatch"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    yield mod
    del sys.modules["tune_dispatch"]


def _grid(tune):
    return tune.Grid(((768, 3072), (3072, 768)), (1, 4, 16, 64, 256), torch.float32, torch.bfloat16)


def test_thresholds_from_synthetic_ratios(tune, monkeypatch):
    # dense_ms / path_ms falls with density and with M; the wide shape is a bit worse than the tall one.
    def ratio(device, op, path, dtype, n_in, n_out, k, M, log):
        density = k / max(n_in, n_out)
        r = 0.3 / density * (1 + 16 / M)
        return r * (0.9 if n_in > n_out else 1.0)

    monkeypatch.setattr(tune, "_compare", ratio)
    got = tune.measure("cpu", "fwd", "kernel", torch.float32, _grid(tune), 1.1, log=lambda m: None)
    # Edges 0.02, 0.05, 0.1: clear wins (>= 1.5x) at M = 256 on both shapes -> unbounded.
    # 0.2: the wide shape wins everywhere but only 1.44x at M = 256 -> 256 (no extrapolation).
    # 0.5: tall wins up to M = 16 (1.2x), wide only up to M = 4 (1.08x < 1.1 at 16) -> 4. 1.0: -> 4.
    assert got == [tune.UNBOUNDED, tune.UNBOUNDED, tune.UNBOUNDED, 256, 4, 4]


def test_thresholds_never_grow_with_density(tune, monkeypatch):
    # Noise makes the densest bucket look better than the one before it: the table must not follow.
    def ratio(device, op, path, dtype, n_in, n_out, k, M, log):
        density = k / max(n_in, n_out)
        return 2.0 if density > 0.9 else (1.2 if M <= 4 else 0.5)

    monkeypatch.setattr(tune, "_compare", ratio)
    got = tune.measure("cpu", "dx", "reference", torch.bfloat16, _grid(tune), 1.1, log=lambda m: None)
    assert got == [4, 4, 4, 4, 4, 4]


def test_rendered_section_replaces_only_its_own_device(tune, tmp_path):
    src = ROOT / "ops" / "dispatch_table.py"
    table = tmp_path / "dispatch_table.py"
    table.write_text(src.read_text())
    rules = {op: {"kernel": [tune.UNBOUNDED, 64, 32, 16, 8, 0], "reference": [2, 1, 0, 0, 0, 0]} for op in tune.OPS}
    tune.write_section("cuda", tune.render("cuda", rules, ["a test header"]), path=table)
    new_scope: dict = {}
    exec(compile(table.read_text(), str(table), "exec"), new_scope)
    old_scope: dict = {}
    exec(compile(src.read_text(), str(src), "exec"), old_scope)
    for op in tune.OPS:
        assert new_scope["TABLE"][("cuda", op)]["kernel"]["max_m"] == [2**31 - 1, 64, 32, 16, 8, 0]
        assert new_scope["TABLE"][("cuda", op)]["reference"]["max_m"] == [2, 1, 0, 0, 0, 0]
        if ("cpu", op) in old_scope["TABLE"]:
            assert new_scope["TABLE"][("cpu", op)] == old_scope["TABLE"][("cpu", op)]
    # Running it again replaces the section instead of appending a second one.
    tune.write_section("cuda", tune.render("cuda", rules, ["again"]), path=table)
    text = table.read_text()
    assert text.count("BEGIN CUDA TABLE") == 1 and "# again" in text and "a test header" not in text
