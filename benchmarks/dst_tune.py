"""Hyper-parameter tuning for the DST results, on the *tune* split (a held-out part of the training data).

The test set (digits) and the validation text (chars) are never used to choose anything here. Every method
gets the same training budget (epochs / steps, batch, lr, weight decay: the task defaults, which were set on
the dense model) and the same number of configurations of its own hyper-parameters. The winners go into
``benchmarks/dst_sweep.sh``.

    nice -n 10 python benchmarks/dst_tune.py --task digits-vit --round 1 --out /tmp/dst-tune
    nice -n 10 python benchmarks/dst_tune.py --task digits-vit --round 1 --out /tmp/dst-tune --aggregate-only

Writes ``benchmarks/results/dst_tuning_<task>_r<round>.{md,csv,png}`` (per-run rows in ``..._runs.csv``).

A configuration left to a default means that default *as the round ran it*: digits rounds 1-3 ran before the
tuned defaults they chose (every method at lr 2e-3, DSTConfig's own knobs; each committed table records the
config of every run). Run again today they would train at today's defaults, so the sweep refuses to mix such
runs with the old ones (``diagcompile.sweep``: a run is reused only with the lr and DST config it recorded).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from diagcompile.sweep import SweepConfig, aggregate, run_sweep

RESULTS = Path(__file__).resolve().parent / "results"

# Each DST variant gets the same five configurations of its own knobs (the first is DSTConfig's default).
# A "_train" entry holds TrainConfig overrides (for dense, every entry is one).
_DYNADIAG_GRID = {
    "default": {},
    "t0.1": {"temperature_start": 0.1},
    "t0.02": {"temperature_start": 0.02, "temperature_end": 0.002},
    "a0.05": {"alpha_lr": 0.05},
    "f0.25": {"freeze_at": 0.25},
}
_DIAGHEUR_GRID = {
    "default": {},
    "dt50": {"update_every": 50},
    "drop0.1": {"drop_fraction": 0.1},
    "drop0.5": {"drop_fraction": 0.5},
    "end0.5": {"update_end": 0.5},
}

# The shared training recipe (lr) checked on the dense model; every method then uses the chosen one.
_DENSE_GRID = {"default": {}, "lr1e-3": {"lr": 1e-3}, "lr4e-3": {"lr": 4e-3}}

DIGITS_ROUNDS: dict[int, dict[str, dict[str, dict]]] = {
    # Round 1: one seed, every configuration.
    1: {
        "dense": _DENSE_GRID,
        "dynadiag": _DYNADIAG_GRID,
        "dynadiag-softmax": _DYNADIAG_GRID,
        "diagheur": _DIAGHEUR_GRID,
    },
    # Round 2: the default and the two best of round 1 per method, on three seeds (round 1's seed 0 is reused),
    # plus a diagnostic: dynadiag frozen at step 0 (= the static top-k of the initial, noise-only alpha: a
    # random set of diagonals trained for the whole run).
    # The committed f0 rows (rounds 2, 4, 5) predate commit bc1c54e: a freeze at step 0 then folded the initial
    # alpha~ ~ k/P into the values, starting them ~P/k = 10x below their init, so they understate random static
    # diagonals (dst_diagnosis.md measures those properly: 95.95 on the tune split, 3 seeds).
    2: {
        "dense": {"default": {}, "lr1e-3": {"lr": 1e-3}},
        "dynadiag": {k: _DYNADIAG_GRID[k] for k in ("default", "t0.1", "t0.02")} | {"f0": {"freeze_at": 0.0}},
        "dynadiag-softmax": {k: _DYNADIAG_GRID[k] for k in ("default", "t0.1", "t0.02")},
        "diagheur": {k: _DIAGHEUR_GRID[k] for k in ("default", "dt50", "drop0.1")},
    },
    # Round 3: dense preferred lr 1e-3 in round 2, so every DST method's round-2 winner also gets lr 1e-3
    # (each method then uses the better of its two learning rates).
    3: {
        "dynadiag": {"t0.1_lr1e-3": {"temperature_start": 0.1, "_train": {"lr": 1e-3}}},
        "dynadiag-softmax": {
            "t0.02_lr1e-3": {"temperature_start": 0.02, "temperature_end": 0.002, "_train": {"lr": 1e-3}}
        },
        "diagheur": {"dt50_lr1e-3": {"update_every": 50, "_train": {"lr": 1e-3}}},
    },
    # Round 4: a hypothesis from rounds 1-3 (DynaDiag's learned topology did no better than a random static
    # one, f0). In the soft phase the layer computes alpha~ * V with alpha~ ~ k/P at the start, and Adam's
    # step on V is scale-free, so W = alpha~ * V moves ~P/k times slower than a plain weight: the soft phase
    # trains at about a tenth of the learning rate at 90% sparsity. Test: raise the lr for every method.
    4: {
        "dynadiag": {
            **{f"t0.1_lr{lr}": {"temperature_start": 0.1, "_train": {"lr": float(lr)}} for lr in ("5e-3", "1e-2")},
            "f0_lr5e-3": {"freeze_at": 0.0, "_train": {"lr": 5e-3}},  # random static diagonals, same lr
        },
        "diagheur": {"dt50_lr5e-3": {"update_every": 50, "_train": {"lr": 5e-3}}},
    },
    # Round 5: round 4 confirmed it for every sparse method (each gained 2-4 points), so the same grid one step
    # further for all of them.
    5: {
        "dynadiag": {
            "t0.1_lr2e-2": {"temperature_start": 0.1, "_train": {"lr": 2e-2}},
            "f0_lr1e-2": {"freeze_at": 0.0, "_train": {"lr": 1e-2}},
        },
        "dynadiag-softmax": {
            "t0.02_lr1e-2": {"temperature_start": 0.02, "temperature_end": 0.002, "_train": {"lr": 1e-2}}
        },
        "diagheur": {"dt50_lr1e-2": {"update_every": 50, "_train": {"lr": 1e-2}}},
    },
    # Round 6: bracket the optimum: every method gets lr 2e-2 (dynadiag's best in round 5); 4e-2 for the two
    # methods still improving or at their best there.
    6: {
        "dynadiag": {"t0.1_lr4e-2": {"temperature_start": 0.1, "_train": {"lr": 4e-2}}},
        "dynadiag-softmax": {
            "t0.02_lr2e-2": {"temperature_start": 0.02, "temperature_end": 0.002, "_train": {"lr": 2e-2}}
        },
        "diagheur": {
            "dt50_lr2e-2": {"update_every": 50, "_train": {"lr": 2e-2}},
            "dt50_lr4e-2": {"update_every": 50, "_train": {"lr": 4e-2}},
        },
    },
    # Round 7: faithful DynaDiag (all P candidates) still trails DiagHeur and its own pool=2 form; the soft phase
    # (alpha~ ~ k/P) is where it learns slowly, so try a shorter soft phase and a faster alpha at lr 2e-2.
    7: {
        "dynadiag": {
            "t0.1_lr2e-2_f0.25": {"temperature_start": 0.1, "freeze_at": 0.25, "_train": {"lr": 2e-2}},
            "t0.1_lr2e-2_a0.05": {"temperature_start": 0.1, "alpha_lr": 0.05, "_train": {"lr": 2e-2}},
            "t0.1_lr2e-2_f0.25_a0.05": {
                "temperature_start": 0.1,
                "freeze_at": 0.25,
                "alpha_lr": 0.05,
                "_train": {"lr": 2e-2},
            },
        },
    },
    # Round 8: chars-gpt's own tuning (dst_tuning_chars_r4-6) found DynaDiag's alpha best at its values' lr
    # (digits' alpha_lr 1e-2 is half of digits' sparse lr 2e-2) and DiagHeur best dropping 10%: the same two
    # changes on digits, each next to its reference (the current setting) run again on the same seeds.
    8: {
        "dynadiag": {
            "t0.1_lr2e-2": {"temperature_start": 0.1, "_train": {"lr": 2e-2}},
            "t0.1_lr2e-2_a2e-2": {"temperature_start": 0.1, "alpha_lr": 2e-2, "_train": {"lr": 2e-2}},
        },
        "dynadiag-pool2": {
            "t0.1_lr2e-2": {"temperature_start": 0.1, "_train": {"lr": 2e-2}},
            "t0.1_lr2e-2_a2e-2": {"temperature_start": 0.1, "alpha_lr": 2e-2, "_train": {"lr": 2e-2}},
        },
        "diagheur": {
            "dt50_lr2e-2": {"update_every": 50, "_train": {"lr": 2e-2}},
            "dt50_lr2e-2_drop0.1": {"update_every": 50, "drop_fraction": 0.1, "_train": {"lr": 2e-2}},
        },
    },
}

# chars-gpt runs take minutes each on the shared CPU: only the learning rates are checked, one seed each; the
# DST methods keep their digits-tuned settings (schedules are fractions of the run, so they transfer).
#: the digits-tuned knobs each chars DST variant keeps while its learning rate is searched
_CHARS_KNOBS: dict[str, dict] = {
    "dynadiag": {"temperature_start": 0.1},
    "dynadiag-pool2": {"temperature_start": 0.1},
    "diagheur": {"update_every": 50},
}
_SOFTMAX_KNOBS: dict = {"temperature_start": 0.02, "temperature_end": 0.002}
CHARS_ROUNDS: dict[int, dict[str, dict[str, dict]]] = {
    # Round 1: dense's learning rate. Upward only: at 800 steps every sparse method kept improving up to 20-40x
    # dense's default (rounds 2-3), so dense gets the same chance to use a larger step.
    # (2e-3 was the task default then; it is named explicitly so the round still means the same run.)
    1: {"dense": {f"lr{lr}": {"lr": float(lr)} for lr in ("2e-3", "4e-3", "8e-3", "1.6e-2")}},
    # Round 2: the sparse learning rate on chars itself (the sweep used 1e-2, scaled from dense's 2e-3 by
    # analogy with digits, where sparse methods wanted ~20x dense's lr). Each DST method keeps its digits-tuned
    # knobs and gets the same three learning rates, so the comparison stays even.
    2: {
        v: {f"lr{lr}": {**knobs, "_train": {"lr": float(lr)}} for lr in ("1e-2", "2e-2", "4e-2")}
        for v, knobs in _CHARS_KNOBS.items()
    },
    # Round 3: bracket the optimum for the methods still improving at round 2's largest lr.
    # All three were still improving at 4e-2, so each gets 8e-2 too.
    3: {v: {"lr8e-2": {**knobs, "_train": {"lr": 8e-2}}} for v, knobs in _CHARS_KNOBS.items()},
    # Round 4: each DST method's own knobs on chars at the chosen lr 4e-2, two configurations each. DynaDiag's
    # alpha kept digits' alpha_lr 1e-2 while its values' lr went to 4e-2, and its soft phase (half the run) is
    # where it learns slowly (dst_diagnosis.md): alpha at the values' lr, and a freeze at 25%. DiagHeur gets the
    # paper's update interval (100) and a smaller drop fraction, so the comparison stays even.
    4: {
        **{
            v: {
                "a4e-2_lr4e-2": {**_CHARS_KNOBS[v], "alpha_lr": 4e-2, "_train": {"lr": 4e-2}},
                "f0.25_lr4e-2": {**_CHARS_KNOBS[v], "freeze_at": 0.25, "_train": {"lr": 4e-2}},
            }
            for v in ("dynadiag", "dynadiag-pool2")
        },
        "diagheur": {
            "dt100_lr4e-2": {"update_every": 100, "_train": {"lr": 4e-2}},
            "dt50_drop0.1_lr4e-2": {**_CHARS_KNOBS["diagheur"], "drop_fraction": 0.1, "_train": {"lr": 4e-2}},
        },
    },
    # Round 5: alpha at the values' lr helped both DynaDiag forms (faithful by 0.056), so bracket it (8e-2) and
    # combine it with the freeze at 25% (which helped faithful DynaDiag alone). DiagHeur's two round-4 knobs were
    # noise (drop 0.1) or worse (every 100 steps), so it gets the other direction: updates every 25 steps, and
    # drop 0.1 with it.
    5: {
        "dynadiag": {
            "a8e-2_lr4e-2": {**_CHARS_KNOBS["dynadiag"], "alpha_lr": 8e-2, "_train": {"lr": 4e-2}},
            "a4e-2_f0.25_lr4e-2": {
                **_CHARS_KNOBS["dynadiag"],
                "alpha_lr": 4e-2,
                "freeze_at": 0.25,
                "_train": {"lr": 4e-2},
            },
        },
        "dynadiag-pool2": {
            "a8e-2_lr4e-2": {**_CHARS_KNOBS["dynadiag-pool2"], "alpha_lr": 8e-2, "_train": {"lr": 4e-2}},
        },
        "diagheur": {
            "dt25_lr4e-2": {"update_every": 25, "_train": {"lr": 4e-2}},
            "dt25_drop0.1_lr4e-2": {"update_every": 25, "drop_fraction": 0.1, "_train": {"lr": 4e-2}},
        },
    },
    # Round 6: pool 2 was still improving at alpha_lr 8e-2 (faithful DynaDiag was past its best there), so one
    # step further for it.
    6: {
        "dynadiag-pool2": {
            "a1.6e-1_lr4e-2": {**_CHARS_KNOBS["dynadiag-pool2"], "alpha_lr": 0.16, "_train": {"lr": 4e-2}}
        }
    },
    # Round 7: softmax_clamp, which rounds 2-6 left at the other methods' lr (4e-2) and its digits knobs, gets
    # the same chances they had: its own lr (2e-2 / 4e-2 / 8e-2), and alpha at its values' lr (the knob that
    # helped faithful DynaDiag most on chars). The digits knobs (DST_RECIPE) are named explicitly.
    7: {
        "dynadiag-softmax": {
            **{f"lr{lr}": {**_SOFTMAX_KNOBS, "_train": {"lr": float(lr)}} for lr in ("2e-2", "4e-2", "8e-2")},
            "a4e-2_lr4e-2": {**_SOFTMAX_KNOBS, "alpha_lr": 4e-2, "_train": {"lr": 4e-2}},
        }
    },
    # Round 8: softmax_clamp was still improving at round 7's largest lr (2.301, 2.251, 2.236 at 2e-2, 4e-2,
    # 8e-2; alpha at the values' lr was much worse, 2.448), so one step further, as rounds 3 and 6 did.
    8: {"dynadiag-softmax": {"lr1.6e-1": {**_SOFTMAX_KNOBS, "_train": {"lr": 0.16}}}},
}

ROUNDS = {"digits-vit": DIGITS_ROUNDS, "chars-gpt": CHARS_ROUNDS}


def build(task: str, rnd: int, out: str, seeds: tuple[int, ...], extra_train: dict) -> SweepConfig:
    methods, variant_dst, variant_train = [], {}, {}
    for variant, grid in ROUNDS[task][rnd].items():
        for label, overrides in grid.items():
            name = f"{variant}@{label}"
            methods.append(name)
            overrides = dict(overrides)
            train_over = overrides.pop("_train", {})
            if variant == "dense":
                train_over, overrides = {**train_over, **overrides}, {}
            if overrides:
                variant_dst[name] = overrides
            if train_over:
                variant_train[name] = train_over
    return SweepConfig(
        task=task,
        out=out,
        methods=tuple(methods),
        sparsities=(0.9,),
        seeds=seeds,
        name=f"dst_tuning_{task.split('-')[0]}_r{rnd}",
        threads=1,
        train={"tune": True, **extra_train},
        variant_dst=variant_dst,
        variant_train=variant_train,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="digits-vit", choices=("digits-vit", "chars-gpt"))
    p.add_argument("--round", type=int, default=1, choices=sorted(set(DIGITS_ROUNDS) | set(CHARS_ROUNDS)))
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 (runs already done are reused)")
    p.add_argument("--out", default="/tmp/dst-tune")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes, one thread each)")
    p.add_argument("--aggregate-only", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = build(args.task, args.round, f"{args.out}/{args.task}", tuple(range(args.seeds)), {})
    cfg = dataclasses.replace(cfg, jobs=args.jobs)
    if args.aggregate_only:
        files = aggregate(cfg)
    else:
        res = run_sweep(cfg)
        files = res["files"]
        print(f"ran {res['ran']}, skipped {res['skipped']}, {res['seconds']:.0f} s", file=sys.stderr)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for path in files.values():
        src = Path(path)
        (RESULTS / src.name).write_bytes(src.read_bytes())
        print(f"wrote {RESULTS / src.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
