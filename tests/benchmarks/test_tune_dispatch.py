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


SHAPES = [(768, 3072), (3072, 768)]  # (in, out)
MS = (1, 4, 16, 64, 256)


def test_thresholds_from_synthetic_ratios(tune, monkeypatch):
    # dense_ms / path_ms falls with density and with M; the wide shape is a bit worse than the tall one.
    def ratio(device, op, path, dtype, n_in, n_out, k, M, log):
        density = k / max(n_in, n_out)
        r = 0.3 / density * (1 + 16 / M)
        return r * (0.9 if n_in > n_out else 1.0)

    monkeypatch.setattr(tune, "_compare", ratio)
    got = tune.measure("cpu", "fwd", "kernel", torch.float32, SHAPES, MS, 1.1, log=lambda m: None)
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
    got = tune.measure("cpu", "dx", "reference", torch.bfloat16, SHAPES, MS, 1.1, log=lambda m: None)
    assert got == [4, 4, 4, 4, 4, 4]


def _exec_table(text: str, name: str = "dispatch_table.py") -> dict:
    scope: dict = {}
    exec(compile(text, name, "exec"), scope)
    return scope["TABLE"]


def test_rendered_section_replaces_only_its_own_device(tune, tmp_path):
    src = ROOT / "ops" / "dispatch_table.py"
    table = tmp_path / "dispatch_table.py"
    table.write_text(src.read_text())
    classes = tune.dispatch_table.SHAPE_CLASSES
    rules = {
        (op, o, d): {"kernel": [tune.UNBOUNDED, 64, 32, 16, i, 0], "reference": [2, 1, 0, 0, 0, 0]}
        for op in tune.OPS
        for i, (o, d) in enumerate(classes)
    }
    tune.write_section("cuda", tune.render("cuda", rules, ["a test header"]), path=table)
    new, old = _exec_table(table.read_text()), _exec_table(src.read_text())
    for op in tune.OPS:
        for i, (o, d) in enumerate(classes):
            assert new[("cuda", op, o, d)]["kernel"]["max_m"] == [2**31 - 1, 64, 32, 16, i, 0]
            assert new[("cuda", op, o, d)]["reference"]["max_m"] == [2, 1, 0, 0, 0, 0]
            assert new[("cpu", op, o, d)] == old[("cpu", op, o, d)]
    # Running it again replaces the section instead of appending a second one.
    tune.write_section("cuda", tune.render("cuda", rules, ["again"]), path=table)
    text = table.read_text()
    assert text.count("BEGIN CUDA TABLE") == 1 and "# again" in text and "a test header" not in text


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_full_grids_measure_every_shape_class(tune, device):
    by_class = tune.classes_of(tune.GRIDS[device].shapes)
    assert list(by_class) == list(tune.dispatch_table.SHAPE_CLASSES)
    assert sum(len(v) for v in by_class.values()) == len(tune.GRIDS[device].shapes)


def test_main_tunes_each_shape_class_on_its_own_shapes(tune, monkeypatch, tmp_path):
    # Synthetic timings in which only narrow tall layers lose beyond M = 16 (as the masked gather does on
    # the bundled models' 64-wide layers): the run must give that class, and only it, a bound of 16.
    def ratio(device, op, path, dtype, n_in, n_out, k, M, log):
        narrow_tall = n_out > n_in and min(n_in, n_out) <= 256
        return 0.8 if narrow_tall and M > 16 else 2.0

    monkeypatch.setattr(tune, "_compare", ratio)
    grid = tune.Grid(((64, 256), (256, 64), (768, 3072), (3072, 768)), MS, torch.float32, torch.bfloat16)
    monkeypatch.setitem(tune.GRIDS, "cpu", grid)
    written = {}
    monkeypatch.setattr(tune, "write_section", lambda device, body: written.update({device: body}))
    tune.main(["--device", "cpu", "--ops", "fwd", "--paths", "kernel", "--log", str(tmp_path / "log")])
    src = (ROOT / "ops" / "dispatch_table.py").read_text()
    section = f"BEGIN CPU TABLE\n{written['cpu']}\n# END CPU TABLE"
    table = _exec_table(tune.re.sub(r"BEGIN CPU TABLE\n.*?# END CPU TABLE", lambda m: section, src, flags=tune.re.S))
    big = tune.dispatch_table.D_EDGES[-1]
    assert table[("cpu", "fwd", "tall", 256)]["kernel"]["max_m"] == [16] * 6
    for cls in (("wide", 256), ("tall", big), ("wide", big)):
        assert table[("cpu", "fwd", *cls)]["kernel"]["max_m"] == [2**31 - 1] * 6
    # What was not measured (dx, dv, every reference rule) is kept, and the header says so.
    for key, rule in _exec_table(src).items():
        if key[0] == "cpu" and (key[1] != "fwd"):
            assert table[key] == rule
    assert "Kept from before" in written["cpu"] and "dx/kernel/tall/D<=256" in written["cpu"]
