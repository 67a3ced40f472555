"""Dispatch thresholds, by (device type, op).

For each op the rule is piecewise in the density ``k / P``: with ``density <= density_edges[i]`` the path
is taken while ``M <= max_m[i]``. ``kernel`` is consulted first (when the device has a kernel for the
dtype), then ``reference``; everything else goes to ``dense``.

Regenerate with ``python benchmarks/tune_dispatch.py`` on the target machine. The values below are
conservative placeholders until then: the diagonal kernel only at tiny M, dense everywhere else.
"""

from __future__ import annotations

__all__ = ["TABLE"]

_EDGES = [0.02, 0.05, 0.1, 0.2, 0.5, 1.0]

TABLE: dict[tuple[str, str], dict[str, dict[str, list]]] = {
    ("default", op): {
        "kernel": {"density_edges": _EDGES, "max_m": [16, 8, 4, 2, 1, 0]},
        "reference": {"density_edges": _EDGES, "max_m": [4, 2, 1, 1, 0, 0]},
    }
    for op in ("fwd", "dx", "dv")
}
