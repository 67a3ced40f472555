"""``diagcompile check``: build a few layers, compare against a dense construction, print a table."""

from __future__ import annotations

import torch

from diagcompile.modules import DiagLinear
from diagcompile.ops import dispatch, extract_diagonals

__all__ = ["run_selfcheck", "CHECK_SHAPES"]

#: (in_features, out_features, sparsity): wide, tall, square, odd/prime and degenerate shapes.
CHECK_SHAPES: list[tuple[int, int, float]] = [
    (64, 32, 0.75),
    (32, 64, 0.75),
    (48, 48, 0.9),
    (13, 7, 0.5),
    (7, 13, 0.5),
    (5, 1, 0.0),
    (1, 5, 0.6),
    (768, 3072, 0.9),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-30))


def run_selfcheck(seed: int = 0, device: str = "cpu", tol: float = 1e-5) -> int:
    """Return 0 when every layer's output and gradients match ``x @ W.T + b`` with ``W = to_dense()``."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    rows = []
    ok = True
    for n_in, n_out, s in CHECK_SHAPES:
        layer = DiagLinear(n_in, n_out, sparsity=s, device=dev)
        x = torch.randn(3, 5, n_in, device=dev, requires_grad=True)
        y = layer(x)
        g = torch.randn_like(y)
        dx, dv, db = torch.autograd.grad(y, (x, layer.values, layer.bias), g)

        W = layer.to_dense().detach().double().requires_grad_(True)
        xd = x.detach().double().requires_grad_(True)
        yd = xd @ W.T + layer.bias.detach().double()
        dxd, dWd = torch.autograd.grad(yd, (xd, W), g.double())
        dvd = extract_diagonals(dWd, layer.offsets)
        errs = (
            _rel(y.double(), yd),
            _rel(dx.double(), dxd),
            _rel(dv.double(), dvd),
            _rel(db.double(), g.double().sum((0, 1))),
        )
        good = max(errs) <= tol
        ok &= good
        p = dispatch.choose_path(dispatch.Problem("fwd", dev.type, x.dtype, 15, n_out, n_in, layer.k))
        rows.append(
            (
                f"{n_out}x{n_in}",
                layer.k,
                f"{layer.sparsity:.3f}",
                p,
                *[f"{e:.1e}" for e in errs],
                "ok" if good else "FAIL",
            )
        )

    header = ("layer", "k", "sparsity", "fwd path", "y err", "dx err", "dV err", "db err", "")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print("diagcompile check (relative error vs float64 dense construction)")
    for r in [header, *rows]:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))
    print("all checks passed" if ok else "CHECK FAILED")
    return 0 if ok else 1
