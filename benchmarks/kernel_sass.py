"""Static cost report of the Triton kernels: compile for sm_90 on any machine (no GPU needed), read the SASS.

    python benchmarks/kernel_sass.py                 # the benchmark layers at M = 1, 16, 197, 4096, bf16
    python benchmarks/kernel_sass.py --m 1 16 --layers 768x3072 --out benchmarks/results/kernel_sass.md

For every (layer, M, kernel) it compiles the config the launcher would pick (``gather_config`` /
``sddmm_config``) exactly as the JIT would specialize it (16-byte aligned pointers, ints divisible by 16),
disassembles the cubin with the ``cuobjdump`` that ships with Triton, and follows the *hot path* of the
main loop (the branch without masks) once around: instructions, FMAs and loads per iteration, registers
and spills. Instructions per FMA is the issue-slot cost that bounds the mid-M regime (4 warp-instructions
per clock per SM); it is a prediction, not a timing.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import triton  # noqa: E402

from diagcompile.ops import k_from_sparsity  # noqa: E402
from diagcompile.ops import triton_kernels as T  # noqa: E402

LAYERS = ["768x768", "2304x768", "3072x768", "768x3072", "14336x4096", "4096x14336"]  # N_out x N_in
_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def compile_like_jit(fn, args: dict, constexprs: dict, num_warps: int, num_stages: int = 1):
    """``triton.compile`` for sm_90 with the signature the JIT would build for these argument values."""
    return T.cross_compile(fn, args, constexprs, num_warps=num_warps, num_stages=num_stages)


def _sass(compiled) -> tuple[str, str]:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        Path(path).write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([str(_BIN / "cuobjdump"), "-sass", path], capture_output=True, text=True, check=True)
        res = subprocess.run([str(_BIN / "cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True)
    return sass.stdout, res.stdout


def hot_path(sass: str) -> dict:
    """Walk each loop once, falling through conditional branches (the unmasked path); keep the cheapest."""
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2).strip()))
    addrs = [a for a, _ in ins]
    text = dict(ins)
    loops = []
    for a, t in ins:
        m = re.search(r"BRA\s+0x([0-9a-f]+)", t)
        if m and int(m.group(1), 16) < a:
            loops.append((int(m.group(1), 16), a))
    best: dict = {}
    for lo, hi in loops:
        ops: collections.Counter = collections.Counter()
        a, steps = lo, 0
        while a <= hi and steps < 20000:
            steps += 1
            t = text[a]
            ops[re.sub(r"^@!?U?P[T0-9]+\s+", "", t).split()[0]] += 1
            m = re.search(r"BRA\s+0x([0-9a-f]+)", t)
            if m and not t.startswith("@"):
                tgt = int(m.group(1), 16)
                if tgt < a:
                    break
                a = tgt
                continue
            a = addrs[addrs.index(a) + 1]
        n = sum(ops.values())
        ffma = sum(v for k, v in ops.items() if k.startswith("FFMA"))
        if ffma == 0:
            continue
        ldg = {k: v for k, v in ops.items() if k.startswith("LDG")}
        cand = {"instr": n, "ffma": ffma, "ldg": ldg, "instr_per_fma": n / ffma}
        # The hot loop is the cheapest one per FMA: the others are the masked (wrap / edge) variants.
        if not best or cand["instr_per_fma"] < best["instr_per_fma"]:
            best = cand
    return best


def report(kind: str, n_out: int, n_in: int, M: int, sparsity: float, dtype: str = "bf16") -> dict:
    L, D = max(n_out, n_in), min(n_out, n_in)
    k = k_from_sparsity(n_out, n_in, sparsity)
    tall = n_out > n_in
    elem = {"bf16": 2, "fp16": 2, "fp32": 4}[dtype]
    if kind == "dv":
        cfg = T.sddmm_config(M, k, D, elem_size=elem)
        args = {"a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "off_ptr": "*i32", "M": M, "L": L, "D": D, "K": k}
        args["SPLIT"] = cfg.SPLIT
        args["out_ptr"] = f"*{dtype}" if cfg.SPLIT == 1 else "*fp32"
        const = {"STRIDE_AM": D, "STRIDE_BM": L}
        fn = T._sddmm_kernel
        const.update(BLOCK_M=cfg.BLOCK_M, BLOCK_J=cfg.BLOCK_J, BLOCK_N=cfg.BLOCK_N)
    else:
        # fwd: wide -> gather of x (M, L); tall -> masked gather of x (M, D). dx: the other one, of dy.
        masked = tall if kind == "fwd" else not tall
        fn = T._mgather_kernel if masked else T._gather_kernel
        n_cols = L if masked else D
        cfg = T.gather_config(M, n_cols, k, D, masked=masked, elem_size=elem)
        args = {"a_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "off_ptr": "*i32", "bias_ptr": f"*{dtype}"}
        args.update(M=M, L=L, D=D, K=k, SPLIT=cfg.SPLIT, out_ptr=f"*{dtype}" if cfg.SPLIT == 1 else "*fp32")
        const = {"STRIDE_AM": (D if masked else L) if M > 1 else (D if masked else L), "STRIDE_VK": D}
        const.update(
            BLOCK_M=cfg.BLOCK_M,
            BLOCK_J=cfg.BLOCK_J,
            BLOCK_N=cfg.BLOCK_N,
            PARTIAL=cfg.SPLIT > 1,
            HAS_BIAS=kind == "fwd",
        )
    compiled = compile_like_jit(fn, args, const, cfg.num_warps, cfg.num_stages)
    sass, res = _sass(compiled)
    regs = int(re.search(r"REG:(\d+)", res).group(1))
    stack = int(re.search(r"STACK:(\d+)", res).group(1))
    hp = hot_path(sass)
    return {
        "layer": f"{n_out}x{n_in}",
        "M": M,
        "op": kind,
        "kernel": fn.__name__,
        "config": f"BM={cfg.BLOCK_M} BJ={cfg.BLOCK_J} BN={cfg.BLOCK_N} S={cfg.SPLIT} w={cfg.num_warps}",
        "regs": regs,
        "stack": stack,
        "loop_instr": hp.get("instr", 0),
        "loop_ffma": hp.get("ffma", 0),
        "instr/FMA": round(hp.get("instr_per_fma", float("nan")), 2),
        "loads": " ".join(f"{k}x{v}" for k, v in sorted(hp.get("ldg", {}).items())),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16, 197, 4096])
    ap.add_argument("--layers", nargs="+", default=LAYERS, help="N_outxN_in")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--ops", nargs="+", default=["fwd", "dx", "dv"])
    ap.add_argument("--out", type=Path, default=None, help="write a markdown table here")
    args = ap.parse_args(argv)
    rows = []
    for layer in args.layers:
        n_out, n_in = (int(v) for v in layer.split("x"))
        for M in args.m:
            for op in args.ops:
                r = report(op, n_out, n_in, M, args.sparsity)
                rows.append(r)
                print(" | ".join(str(v) for v in r.values()), flush=True)
    if args.out:
        cols = list(rows[0])
        lines = [
            f"# Static SASS cost of the Triton kernels (sm_90, bf16, sparsity {args.sparsity})",
            "",
            f"Compiled on a CPU machine with triton {triton.__version__}, torch {torch.__version__}; "
            "no GPU was used. `instr/FMA` = instructions on the unmasked path of the main loop per FMA.",
            "",
            "| " + " | ".join(cols) + " |",
            "|" + "|".join("---" for _ in cols) + "|",
        ]
        lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
