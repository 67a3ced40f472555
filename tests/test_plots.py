"""diagcompile.plots: real PNGs whose content follows the layer, and clear errors on bad input."""

from __future__ import annotations

import pytest
import torch

from diagcompile import DiagLinear
from diagcompile.plots import plot_diagonal_pattern, plot_training_curves

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)], ids=["wide", "tall", "square"])
def test_diagonal_pattern_png_depends_on_the_offsets(tmp_path, shape):
    torch.manual_seed(0)
    n_in, n_out = shape
    a = DiagLinear(n_in, n_out, sparsity=0.8)
    b = DiagLinear(n_in, n_out, sparsity=0.8, offsets=torch.arange(a.k))
    pa = plot_diagonal_pattern(a, tmp_path / "a.png", title="a")
    pb = plot_diagonal_pattern(b, tmp_path / "b.png", title="a")
    assert pa.read_bytes()[:8] == PNG and pb.read_bytes()[:8] == PNG
    assert pa.read_bytes() != pb.read_bytes()  # different diagonals draw a different picture
    assert not list(tmp_path.glob("*.tmp.png"))  # written atomically: no temporary left behind


def test_diagonal_pattern_of_a_diverged_layer_still_plots(tmp_path):
    layer = DiagLinear(16, 16, sparsity=0.5)
    with torch.no_grad():
        layer.values[0, 0], layer.values[1, 1] = float("nan"), float("inf")
    assert plot_diagonal_pattern(layer, tmp_path / "nan.png").read_bytes()[:8] == PNG


def test_diagonal_pattern_rejects_a_dense_layer(tmp_path):
    with pytest.raises(TypeError, match="DiagLinear"):
        plot_diagonal_pattern(torch.nn.Linear(4, 4), tmp_path / "x.png")


def test_training_curves_png_and_bad_input(tmp_path):
    runs = {
        name: {"curve": [{"step": s, "train_loss": 2.0 / s * f, "acc": 50 + s / f} for s in range(1, 20)]}
        for name, f in (("dense", 1.0), ("sparse", 2.0))
    }
    path = plot_training_curves(runs, tmp_path / "c.png", markers=[("freeze", 10)])
    assert path.read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match="curve"):
        plot_training_curves({"empty": {}}, tmp_path / "d.png")
