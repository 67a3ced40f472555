"""Two-process gloo DDP runs of DiagSparsifier and MaskSparsifier, and the same runs in one process on the same
global batches.

Run as a script (tests/dst/test_sparsifier_ddp.py does): ``python ddp_worker.py OUT_DIR``. Writes
``OUT_DIR/rank{0,1}.pt`` and ``OUT_DIR/single.pt``, each ``{config name: {"losses", "topology", "state"}}``; the
topology is per layer the offsets (diagonal methods: candidates then kept offsets) or the mask (baselines).
Each rank starts from a *different* seed (weights, initial offsets and masks: the baselines' ``seed=None``
draws them from the global RNG), so agreement can only come from the sparsifiers' broadcasts and DDP.
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from diagcompile import DiagLinear
from diagcompile.dst import DiagSparsifier, DSTConfig, MaskConfig, MaskSparsifier
from diagcompile.testing import not_head, tiny_mlp, toy_batch

WORLD = 2
GLOBAL_BATCH = 32
STEPS = 30
#: name -> (sparsifier, config class, config options)
CONFIGS = {
    "diagheur": (DiagSparsifier, DSTConfig, {"method": "diagheur", "update_every": 4, "drop_fraction": 0.5}),
    "dynadiag-pool": (
        DiagSparsifier,
        DSTConfig,
        {"method": "dynadiag", "pool": 2.0, "update_every": 4, "freeze_at": 20, "alpha_lr": 0.05},
    ),
    "dynadiag": (DiagSparsifier, DSTConfig, {"method": "dynadiag", "freeze_at": 15, "alpha_lr": 0.05}),
    "rigl": (MaskSparsifier, MaskConfig, {"method": "rigl", "update_every": 4, "drop_fraction": 0.5}),
    "srigl": (
        MaskSparsifier,
        MaskConfig,
        {"method": "srigl", "update_every": 4, "drop_fraction": 0.5, "gamma_sal": 0.6},
    ),
    "nm-mask-decay": (MaskSparsifier, MaskConfig, {"method": "nm-mask-decay", "mask_decay_c": 0.2}),
}


def topology(sp):
    if isinstance(sp, MaskSparsifier):
        return {f: m.mask.clone() for f, m in sp.layers.items()}
    return {
        f: (m.offsets if isinstance(m, DiagLinear) else torch.cat([m.candidate_offsets, m.kept_offsets()])).clone()
        for f, m in sp.layers.items()
    }


def run(name: str, rank: int, world: int) -> dict:
    torch.manual_seed(rank)  # rank-specific init (and masks) on purpose
    model = tiny_mlp(n_in=16, hidden=32, n_out=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sparsifier_cls, config_cls, options = CONFIGS[name]
    sp = sparsifier_cls(model, opt, config_cls(total_steps=STEPS, sparsity=0.8, **options), filter_fn=not_head)
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    per = GLOBAL_BATCH // world
    losses, topo = [], []
    for t in range(STEPS):
        x, y = toy_batch(t, GLOBAL_BATCH)
        x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
        loss = nn.functional.mse_loss(net(x), y)
        loss.backward()
        opt.step()
        sp.step()
        opt.zero_grad()
        g = loss.detach().clone()
        if world > 1:
            dist.all_reduce(g)
            g /= world
        losses.append(g.item())
        topo.append(topology(sp))
    return {"losses": losses, "topology": topo, "state": {k: v.clone() for k, v in model.state_dict().items()}}


def constructed(name: str, rank: int) -> dict:
    """Topology and parameters right after construction, with no DDP wrapper (which would broadcast rank 0's
    parameters and buffers itself): agreement here comes from the sparsifier alone."""
    torch.manual_seed(rank)
    model = tiny_mlp(n_in=16, hidden=32, n_out=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sparsifier_cls, config_cls, options = CONFIGS[name]
    sp = sparsifier_cls(model, opt, config_cls(total_steps=STEPS, sparsity=0.8, **options), filter_fn=not_head)
    return {"topology": topology(sp), "layers": {f: dict(m.state_dict()) for f, m in sp.layers.items()}}


def worker(rank: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=WORLD)
    try:
        results = {name: run(name, rank, WORLD) for name in CONFIGS}
        results["constructed"] = {name: constructed(name, rank) for name in CONFIGS}
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    out = os.path.abspath(sys.argv[1])
    mp.spawn(worker, args=(out,), nprocs=WORLD, join=True)
    torch.set_num_threads(1)
    torch.save({name: run(name, 0, 1) for name in CONFIGS}, os.path.join(out, "single.pt"))
    print("ok")
