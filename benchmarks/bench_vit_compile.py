"""End to end: a ViT-B/16-shaped model with every block linear marked 90% sparse, compiled with the
``diagcompile`` backend, against the same dense model compiled with Inductor. Inference, no downloads.

    python benchmarks/bench_vit_compile.py             # GPU: ViT-B/16, bf16, batch 1 and 64 -> results/vit_compile.*
    python benchmarks/bench_vit_compile.py --smoke     # CPU: a tiny ViT, float32, end-to-end check of this script

Model: patch 16 conv embedding, 196 patches + a class token = 197 tokens, 12 blocks of width 768 (12 heads,
``F.scaled_dot_product_attention``) with an MLP of 3072, pre-norm, classifier head of 1000. Marked: the
four linears of every block (qkv 768->2304, proj 768->768, fc1 768->3072, fc2 3072->768), top-k diagonals
at 90% sparsity; embedding and head stay dense.

Contenders, all from the same run and the same weights, each in ``mode="default"`` and
``mode="reduce-overhead"`` (CUDA graphs), ``dynamic=False`` (each batch size gets its own graph):

* ``dense_inductor``  ``torch.compile(dense_model)``                       (the baseline of every ratio)
* ``diag_backend``    ``torch.compile(marked_model, backend="diagcompile")``

Every diag output is checked against the eager dense model whose marked weights are masked to the kept
diagonals (relative error printed; the run aborts above tolerance). Timings: ``triton.testing.do_bench``
medians on GPU, interleaved wall-clock medians on CPU. In reduce-overhead mode the script also asserts
that Inductor skipped no CUDA graph.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compare_ms, write_results  # noqa: E402

import diagcompile  # noqa: E402
from diagcompile import mark_sparse  # noqa: E402
from diagcompile.models import Block  # noqa: E402
from diagcompile.ops.reference import k_from_sparsity  # noqa: E402
from diagcompile.testing import masked_dense_copy, rel_err  # noqa: E402


@dataclass(frozen=True)
class ViTConfig:
    depth: int = 12
    dim: int = 768
    mlp: int = 3072
    heads: int = 12
    image: int = 224
    patch: int = 16
    classes: int = 1000

    @property
    def tokens(self) -> int:
        return (self.image // self.patch) ** 2 + 1


VIT_B16 = ViTConfig()
SMOKE = ViTConfig(depth=2, dim=64, mlp=256, heads=4, image=32, patch=8, classes=10)


class ViT(nn.Module):
    """ViT-B/16 layout (timm ``vit_base_patch16_224``), randomly initialized."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, cfg.dim, kernel_size=cfg.patch, stride=cfg.patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, cfg.dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.tokens, cfg.dim) * 0.02)
        # The library's pre-norm block (qkv/proj attention + fc1/GELU/fc2 MLP), as in timm's ViT-B/16.
        self.blocks = nn.ModuleList(
            Block(cfg.dim, cfg.heads, cfg.mlp // cfg.dim, causal=False) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.head = nn.Linear(cfg.dim, cfg.classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def block_linears(model: ViT) -> list[nn.Linear]:
    return [m for b in model.blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.fc1, b.mlp.fc2)]


def _timer(device: str):
    if device == "cuda":
        from triton.testing import do_bench

        def time_all(fns: dict) -> dict[str, float]:
            return {name: do_bench(fn, warmup=50, rep=300, return_mode="median") for name, fn in fns.items()}

        return time_all
    return lambda fns: compare_ms(fns, rounds=3, warmup=2, reps=5, min_time_s=0.2)


def run(cfg: ViTConfig, batches: list[int], device: str, dtype: torch.dtype, sparsity: float) -> tuple[list, str]:
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    dense = ViT(cfg).to(device, dtype).eval()
    marked = copy.deepcopy(dense)
    for lin in block_linears(marked):
        mark_sparse(lin, sparsity=sparsity)
    reference = masked_dense_copy(marked)  # eager, dense weights zeroed off the kept diagonals
    tol = 5e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
    time_all = _timer(device)
    rows, notes = [], []
    for mode in ("default", "reduce-overhead"):
        torch._dynamo.reset()
        counters.clear()
        reports = []
        contenders = {
            "dense_inductor": torch.compile(dense, mode=mode, dynamic=False),
            "diag_backend": diagcompile.compile(marked, mode=mode, dynamic=False, on_rewrite=reports.append),
        }
        for batch in batches:
            images = torch.randn(batch, 3, cfg.image, cfg.image, device=device, dtype=dtype)
            with torch.no_grad():
                want = reference(images)
                for name, fn in contenders.items():
                    for _ in range(3):  # compile, then CUDA-graph warm-up / record
                        out = fn(images).clone()
                    if name == "diag_backend":
                        err = rel_err(out, want)
                        if not err <= tol:
                            raise AssertionError(f"{mode} batch {batch}: diag output rel. error {err:.2e} > {tol:.0e}")
                ms = time_all({name: (lambda fn=fn: fn(images)) for name, fn in contenders.items()})
            base = ms["dense_inductor"]
            for name, t in ms.items():
                rows.append(
                    {
                        "mode": mode,
                        "batch": batch,
                        "tokens": cfg.tokens,
                        "contender": name,
                        "ms": t,
                        "speedup_vs_dense_inductor": base / t,
                        "rel_err_vs_masked_dense": err if name == "diag_backend" else 0.0,
                    }
                )
        sites = {r.count for r in reports}
        notes.append(
            f"- `{mode}`: diagcompile rewrote {sorted(sites)} linear sites per graph over {len(reports)} graph(s)"
            + (f"; CUDA graph skips: {counters['inductor']['cudagraph_skips']}" if mode != "default" else "")
        )
        # Checked after the timings: recorded in the results (which are still written), then main exits 1.
        if sites != {4 * cfg.depth}:
            notes.append(f"- **FAIL** `{mode}`: want {4 * cfg.depth} sites rewritten per graph, got {sorted(sites)}")
        if mode == "reduce-overhead" and device == "cuda" and counters["inductor"]["cudagraph_skips"]:
            notes.append(f"- **FAIL** `{mode}`: Inductor skipped CUDA graphs: {dict(counters['inductor'])}")
    return rows, "\n".join(notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny ViT on the CPU, float32 (checks the script)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default: 1 64 (smoke: 1 2)")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--out", type=Path, default=None, help="results dir (default: benchmarks/results; smoke: tmp)")
    args = parser.parse_args()

    if args.smoke:
        cfg, device, dtype, batches, name = SMOKE, "cpu", torch.float32, args.batches or [1, 2], "vit_compile_smoke"
        out = args.out or Path(tempfile.mkdtemp(prefix="vit_compile_smoke-"))
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_vit_compile.py measures on a CUDA GPU; use --smoke for the CPU check")
        cfg, device, dtype, batches, name = VIT_B16, "cuda", torch.bfloat16, args.batches or [1, 64], "vit_compile"
        out = args.out
    rows, notes = run(cfg, batches, device, dtype, args.sparsity)
    k_fc1 = k_from_sparsity(cfg.mlp, cfg.dim, args.sparsity)
    title = (
        f"ViT ({cfg.depth} blocks, width {cfg.dim}, MLP {cfg.mlp}, {cfg.tokens} tokens), {dtype}, inference: "
        f"block linears {args.sparsity:.0%} diagonal-sparse (diagcompile backend) vs dense (Inductor)"
    )
    intro = (
        f"`speedup_vs_dense_inductor` = dense Inductor time / contender time, same mode, batch and run "
        f"(target at batch 1: >= 1.5x). fc1 keeps k={k_fc1} of {max(cfg.dim, cfg.mlp)} diagonals.\n\n" + notes
    )
    md = write_results(name, rows, title, intro, out_dir=out)
    print(md.read_text())
    if "**FAIL**" in notes:
        sys.exit("bench_vit_compile.py: a check failed (see the FAIL notes above)")


if __name__ == "__main__":
    main()
