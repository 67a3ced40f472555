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
    # Measured at k = floor(edge * 3072). Edges 0.022, 0.055, 0.11: clear wins (>= 1.5x) at M = 256 on both
    # shapes -> unbounded. 0.22: tall 1.45x at M = 256 (< 1.5), both win everywhere -> 256 (no extrapolation).
    # 0.55: both win up to M = 4 and lose at 16; the ratio crosses 1.1 (log-M interpolation) at M = 15.9 on the
    # tall shape (2.728x -> 1.091x), 14.4 on the wide one (2.455x -> 0.982x) -> 14. 1.0: tall 1.5x -> 0.6x
    # crosses at 7.4, wide 1.35x -> 0.54x at 6.1 -> 6.
    assert got == [tune.UNBOUNDED, tune.UNBOUNDED, tune.UNBOUNDED, 256, 14, 6]


def test_a_tie_at_small_m_does_not_end_the_kernels_run(tune, monkeypatch):
    # Both paths pay the same fixed per-call cost at the smallest M: the ratio starts near 1, rises, then falls.
    curves = {
        0.022: {1: 1.03, 4: 1.2, 16: 1.6, 64: 2.0, 256: 1.6},  # tie, then clear wins to the top -> unbounded
        0.055: {1: 1.03, 4: 1.3, 16: 1.3, 64: 1.2, 256: 1.12},  # tie, then wins to the top -> 256
        0.11: {1: 0.95, 4: 1.05, 16: 1.3, 64: 1.1, 256: 0.8},  # ties (0.95 is within the margin), win at 16..64
        0.22: {1: 1.05, 4: 1.02, 16: 0.99, 64: 0.8, 256: 0.5},  # ties, never a win, then a loss -> dense
        0.55: {1: 0.85, 4: 2.0, 16: 2.0, 64: 2.0, 256: 2.0},  # a real loss at the bottom ends it at once
        1.0: {1: 0.5, 4: 0.5, 16: 0.5, 64: 0.5, 256: 0.5},
    }

    def ratio(device, op, path, dtype, n_in, n_out, k, M, log):
        edge = min(curves, key=lambda e: abs(e * max(n_in, n_out) - k))
        return curves[edge][M]

    monkeypatch.setattr(tune, "_compare", ratio)
    got = tune.measure("cpu", "fwd", "kernel", torch.float32, SHAPES, MS, 1.1, log=lambda m: None)
    # 0.11: the last win is M = 64 at exactly the margin; 1.1 -> 0.8 at 256 crosses 1.1 at 64 itself.
    assert got == [tune.UNBOUNDED, 256, 64, 0, 0, 0]


def test_crossing_interpolates_in_log_m_and_stays_between_grid_points(tune):
    assert tune.crossing(1024, 1.15, 2048, 0.98, 1.1) == 1248  # 1024 * 2 ** (0.05 / 0.17) = 1255.6
    assert tune.crossing(4, 2.0, 16, 0.5, 1.1) == 9  # 4 * 4 ** 0.6 = 9.19
    assert tune.crossing(1024, 1.1, 2048, 0.5, 1.1) == 1024  # a win exactly at the margin: no further


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


def _with_cpu_section(tune, src: str, body: str) -> str:
    """``dispatch_table.py``'s text with its CPU section replaced by ``body``, as ``write_section`` would."""
    section = f"BEGIN CPU TABLE\n{body}\n# END CPU TABLE"
    return tune.re.sub(r"BEGIN CPU TABLE\n.*?# END CPU TABLE", lambda m: section, src, flags=tune.re.S)


def test_rendered_section_replaces_only_its_own_device(tune, tmp_path):
    src = ROOT / "ops" / "dispatch_table.py"
    table = tmp_path / "dispatch_table.py"
    table.write_text(src.read_text())
    keys = tune.dispatch_table.RULE_KEYS
    rules = {
        key: {"kernel": [tune.UNBOUNDED, 64, 32, 16, i, 0], "reference": [2, 1, 0, 0, 0, 0]}
        for i, key in enumerate(keys)
    }
    tune.write_section("cuda", tune.render("cuda", rules, ["a test header"]), path=table)
    new, old = _exec_table(table.read_text()), _exec_table(src.read_text())
    for i, key in enumerate(keys):
        assert new[("cuda", *key)]["kernel"]["max_m"] == [2**31 - 1, 64, 32, 16, i, 0]
        assert new[("cuda", *key)]["reference"]["max_m"] == [2, 1, 0, 0, 0, 0]
        assert new[("cpu", *key)] == old[("cpu", *key)]
    # Running it again replaces the section instead of appending a second one.
    tune.write_section("cuda", tune.render("cuda", rules, ["again"]), path=table)
    text = table.read_text()
    assert text.count("BEGIN CUDA TABLE") == 1 and "# again" in text and "a test header" not in text


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_full_grids_measure_every_shape_class(tune, device):
    by_class = tune.classes_of(tune.GRIDS[device].shapes)
    assert list(by_class) == list(tune.dispatch_table.SHAPE_CLASSES)
    assert sum(len(v) for v in by_class.values()) == len(tune.GRIDS[device].shapes)


def test_main_tunes_each_shape_class_and_thread_bucket_on_its_own(tune, monkeypatch, tmp_path):
    # Synthetic timings in which only narrow tall layers lose beyond M = 16, and only with 2 threads (as the
    # masked gather once did on the bundled models' 64-wide layers): that rule, and only it, gets a limit, between
    # its last win (M = 16, 2x) and first loss (M = 64, 0.8x): 16 * 4 ** 0.75 = 45.
    def ratio(device, op, path, dtype, n_in, n_out, k, M, log):
        narrow_tall = n_out > n_in and min(n_in, n_out) <= 64
        return 0.8 if narrow_tall and M > 16 and torch.get_num_threads() > 1 else 2.0

    monkeypatch.setattr(tune, "_compare", ratio)
    grid = tune.Grid(((64, 256), (256, 64), (768, 3072), (3072, 768)), MS, torch.float32, torch.bfloat16)
    monkeypatch.setitem(tune.GRIDS, "cpu", grid)
    written = {}
    monkeypatch.setattr(tune, "write_section", lambda device, body: written.update({device: body}))
    before, log = torch.get_num_threads(), str(tmp_path / "log")
    try:
        tune.main(["--device", "cpu", "--ops", "fwd", "--paths", "kernel", "--threads", "1,2", "--log", log])
    finally:
        torch.set_num_threads(before)
    src = (ROOT / "ops" / "dispatch_table.py").read_text()
    table = _exec_table(_with_cpu_section(tune, src, written["cpu"]))
    big = tune.dispatch_table.D_EDGES[-1]
    many = tune.dispatch_table.THREAD_EDGES[-1]
    assert table[("cpu", "fwd", "tall", 64, many)]["kernel"]["max_m"] == [45] * 6
    for cls in (("tall", 64, 1), ("wide", 64, 1), ("wide", 64, many), ("tall", big, 1), ("wide", big, many)):
        assert table[("cpu", "fwd", *cls)]["kernel"]["max_m"] == [2**31 - 1] * 6, cls
    # What was not measured (dx, dv, every reference rule, the D <= 256 bucket: no shape of it in this grid)
    # is kept, and the header says so.
    for key, rule in _exec_table(src).items():
        if key[0] == "cpu" and (key[1] != "fwd" or key[3] == 256):
            assert table[key] == rule, key
    n = len(tune.dispatch_table.RULE_KEYS) // len(tune.OPS)
    header = written["cpu"].replace("\n# ", " ")  # the header is wrapped into comment lines
    # Measured: 4 classes x 2 thread buckets; kept: the rest (the square classes and the D <= 256 bucket).
    assert f"dx/kernel ({n} of {n})" in header and f"fwd/kernel ({n - 8} of {n})" in header


def test_classes_option_remeasures_only_the_named_classes(tune, monkeypatch, tmp_path):
    monkeypatch.setattr(tune, "_compare", lambda *args: 0.5)  # the kernel loses everywhere
    written = {}
    monkeypatch.setattr(tune, "write_section", lambda device, body: written.update({device: body}))
    before, log = torch.get_num_threads(), str(tmp_path / "log")
    try:
        tune.main(["--device", "cpu", "--ops", "dx", "--paths", "kernel", "--threads", "1", "--classes", "wide:64"])
        with pytest.raises(SystemExit, match="unknown"):
            tune.main(["--device", "cpu", "--classes", "wide:100", "--log", log])
    finally:
        torch.set_num_threads(before)
    src = (ROOT / "ops" / "dispatch_table.py").read_text()
    table = _exec_table(_with_cpu_section(tune, src, written["cpu"]))
    for key, rule in _exec_table(src).items():
        if key[0] == "cpu":
            changed = key[1:] == ("dx", "wide", 64, 1)
            assert (table[key]["kernel"]["max_m"] == [0] * 6) if changed else table[key] == rule, key


def test_a_kept_rule_is_written_on_its_own_density_edges(tune):
    # The CUDA section's rules use _CUDA_EDGES (7 buckets) and the reference rule [1.0]; writing them back
    # under _EDGES (6) would shift every threshold by a bucket.
    src = (ROOT / "ops" / "dispatch_table.py").read_text()
    old = _exec_table(src)
    rules = {key: {p: old[("cuda", *key)][p] for p in ("kernel", "reference")} for key in tune.dispatch_table.RULE_KEYS}
    body = tune.render("cuda", rules, ["kept"])
    table = _exec_table(
        tune.re.sub(
            r"BEGIN CUDA TABLE\n.*?# END CUDA TABLE",
            lambda m: f"BEGIN CUDA TABLE\n{body}\n# END CUDA TABLE",
            src,
            flags=tune.re.S,
        )
    )
    for key in tune.dispatch_table.RULE_KEYS:
        assert table[("cuda", *key)] == old[("cuda", *key)], key
