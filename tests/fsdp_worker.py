"""A two-process gloo FSDP2 (``fully_shard``) run of a model of ``DiagLinear`` layers, and the same run in one
process on the same global batches.

Run as a script (tests/test_modules.py does): ``python fsdp_worker.py OUT_DIR``. Writes ``OUT_DIR/rank{0,1}.pt``
and ``OUT_DIR/single.pt``, each ``{"init": state, "final": state}`` with full (unsharded) tensors.
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from diagcompile import DiagLinear
from diagcompile.testing import toy_batch

WORLD = 2
GLOBAL_BATCH = 16
STEPS = 5


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(DiagLinear(16, 32, sparsity=0.75), nn.ReLU(), DiagLinear(32, 5, sparsity=0.6))


def full_state(m: nn.Module) -> dict[str, torch.Tensor]:
    state = m.state_dict()
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in state.items()}


def train(m: nn.Module, rank: int, world: int) -> dict:
    init = full_state(m)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    per = GLOBAL_BATCH // world
    for t in range(STEPS):
        x, y = toy_batch(t, GLOBAL_BATCH)
        loss = nn.functional.mse_loss(m(x[rank * per : (rank + 1) * per]), y[rank * per : (rank + 1) * per])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"init": init, "final": full_state(m)}


def worker(rank: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=WORLD)
    try:
        m = model()
        for layer in m:
            if isinstance(layer, DiagLinear):
                fully_shard(layer)  # each layer's forward unshards its parameters and frees them after
        fully_shard(m)
        torch.save(train(m, rank, WORLD), os.path.join(out, f"rank{rank}.pt"))
        # Both ranks reach the teardown together: once (torch 2.11, CI's loaded machine) rank 0 aborted in it
        # ("terminate called without an active exception") after both had saved their results.
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    out = os.path.abspath(sys.argv[1])
    mp.spawn(worker, args=(out,), nprocs=WORLD, join=True)
    torch.set_num_threads(1)
    torch.save(train(model(), 0, 1), os.path.join(out, "single.pt"))
    print("ok")
