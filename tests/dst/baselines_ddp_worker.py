"""Two-process gloo DDP run of MaskSparsifier, and the same run in one process on the same global batches.

Run as a script (tests/dst/test_baselines_ddp.py does): ``python baselines_ddp_worker.py OUT_DIR``. Writes
``OUT_DIR/rank{0,1}.pt`` and ``OUT_DIR/single.pt``, each ``{config name: {"losses", "masks", "state"}}``.
Each rank starts from a *different* seed (weights and initial masks: ``seed=None`` draws the masks from the
global RNG), so agreement can only come from the sparsifier's broadcasts and DDP.
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from diagcompile.dst import MaskConfig, MaskSparsifier
from diagcompile.testing import not_head, tiny_mlp

WORLD = 2
GLOBAL_BATCH = 32
STEPS = 30
CONFIGS = {
    "rigl": {"method": "rigl", "update_every": 4, "drop_fraction": 0.5},
    "srigl": {"method": "srigl", "update_every": 4, "drop_fraction": 0.5, "gamma_sal": 0.6},
    "nm-mask-decay": {"method": "nm-mask-decay", "mask_decay_c": 0.2},
}


def batch(t: int):
    g = torch.Generator().manual_seed(1000 + t)
    x = torch.randn(GLOBAL_BATCH, 16, generator=g)
    return x, (x[:, :5] * 2).sin() + 0.1 * torch.randn(GLOBAL_BATCH, 5, generator=g)


def run(name: str, rank: int, world: int) -> dict:
    torch.manual_seed(rank)  # rank-specific init and masks on purpose
    model = tiny_mlp(n_in=16, hidden=32, n_out=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sp = MaskSparsifier(model, opt, MaskConfig(total_steps=STEPS, sparsity=0.8, **CONFIGS[name]), filter_fn=not_head)
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    per = GLOBAL_BATCH // world
    losses, masks = [], []
    for t in range(STEPS):
        x, y = batch(t)
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
        masks.append({f: m.mask.clone() for f, m in sp.layers.items()})
    return {"losses": losses, "masks": masks, "state": {k: v.clone() for k, v in model.state_dict().items()}}


def worker(rank: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=WORLD)
    try:
        torch.save({name: run(name, rank, WORLD) for name in CONFIGS}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    out = os.path.abspath(sys.argv[1])
    mp.spawn(worker, args=(out,), nprocs=WORLD, join=True)
    torch.set_num_threads(1)
    torch.save({name: run(name, 0, 1) for name in CONFIGS}, os.path.join(out, "single.pt"))
    print("ok")
