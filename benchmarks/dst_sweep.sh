#!/usr/bin/env bash
# The committed DST results (benchmarks/results/dst_digits.*, dst_chars.*, dst_memory.*), reproducibly.
# Hyper-parameters come from benchmarks/dst_tune.py (tune split only, sparsity 0.9; see dst_tuning_*.md):
#   dense: lr 1e-3 | every sparse method: lr 2e-2 (rounds 4-6: sparse layers want a ~20x larger step; DynaDiag's
#   soft phase scales each weight by alpha~ ~ k/P, slowing it further) | dynadiag: temperature_start 0.1 |
#   dynadiag-softmax: temperature_start 0.02, temperature_end 0.002 | diagheur: update_every 50.
# chars-gpt starts from the same DST settings and was tuned on its own tune split (dst_tuning_chars_r*.md, 800
# steps, one seed). Learning rates (r1-3): dense 8e-3 (of 2e-3..1.6e-2, which diverged) | every sparse method 4e-2
# (DynaDiag, pool 2 and DiagHeur were each best at 4e-2 of 1e-2..8e-2). Then each method's own knobs (r4-6):
# dynadiag alpha_lr 4e-2 (of 1e-2..8e-2) | pool 2 alpha_lr CHARS_POOL_ALPHA_LR | diagheur drop_fraction 0.1 (update
# every 25/50/100, drop 0.1/0.3). Then softmax_clamp's own lr (r7-8): CHARS_SOFTMAX_LR 8e-2 (of 2e-2..1.6e-1).
# CHARS_LR / CHARS_SPARSE_LR override the lrs, CHARS_KNOBS=digits drops the chars knobs (alpha_lr 1e-2, drop 0.3,
# as on digits; softmax_clamp at CHARS_SPARSE_LR); CHARS_NAME names the chars table.
# Committed with earlier settings: dense's default lr and 5x it for the sparse layers, digits knobs (CHARS_LR=0.002
# CHARS_SPARSE_LR=0.01 CHARS_KNOBS=digits): dst_chars_lr1e-2.* (CHARS_SEEDS=3 CHARS_NAME=dst_chars_lr1e-2) and
# dst_chars_s2400.*; tuned lrs, digits knobs (CHARS_KNOBS=digits): dst_chars_digits_knobs.*. Pool 2 and DiagHeur on
# 10 seeds: CHARS_METHODS=dynadiag-pool2,diagheur CHARS_SEEDS=10 CHARS_NAME=dst_chars_pool2_10seeds.
# dst_digits_09_20seeds.* (DynaDiag vs dense at 0.9, 20 seeds, the digits settings below):
#   diagcompile sweep --task digits-vit --methods dense,dynadiag --sparsities 0.9 --seeds 20 \
#     --variant-train dense:lr=0.001 --variant-dst dynadiag:temperature_start=0.1 --variant-train dynadiag:lr=0.02 \
#     --out OUT --name dst_digits_09_20seeds --threads 1
# One thread per run, niced (the machine is shared); JOBS=N runs N at once. Runs already done (runs/*.json) are
# skipped, so a new OUT is needed after changing hyper-parameters.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-/tmp/dst-final}
RES=benchmarks/results
SPARSE_LR=${SPARSE_LR:-0.02}
CHARS_LR=${CHARS_LR:-0.008}
CHARS_SPARSE_LR=${CHARS_SPARSE_LR:-0.04}
CHARS_NAME=${CHARS_NAME:-dst_chars}
CHARS_METHODS=${CHARS_METHODS:-dense,dynadiag,dynadiag-softmax,diagheur,dynadiag-pool2}
CHARS_KNOBS=${CHARS_KNOBS:-chars}
CHARS_POOL_ALPHA_LR=${CHARS_POOL_ALPHA_LR:-0.08}
CHARS_SOFTMAX_LR=${CHARS_SOFTMAX_LR:-0.08}
ALL_SPARSE=dynadiag,dynadiag-softmax,diagheur,dynadiag-pool2
# The tuned per-variant settings, one home: variant_flags METHODS SPARSE_LR [KNOBS] prints the --variant-dst /
# --variant-train flags of the sparse variants in METHODS (the sweep rejects flags for variants it does not run);
# KNOBS=chars adds chars-gpt's own tuned knobs, KNOBS=digits the digits values of the same knobs.
variant_flags() {
  local v lr
  for v in ${1//,/ }; do
    lr=$2
    case $v in
      dynadiag | dynadiag-pool2) printf '%s ' --variant-dst "$v:temperature_start=0.1" ;;
      dynadiag-softmax) printf '%s ' --variant-dst "$v:temperature_start=0.02" --variant-dst "$v:temperature_end=0.002" ;;
      diagheur) printf '%s ' --variant-dst "$v:update_every=50" ;;
      *) continue ;;
    esac
    case ${3:-}:$v in
      chars:dynadiag) printf '%s ' --variant-dst "$v:alpha_lr=0.04" ;;
      chars:dynadiag-pool2) printf '%s ' --variant-dst "$v:alpha_lr=$CHARS_POOL_ALPHA_LR" ;;
      chars:diagheur) printf '%s ' --variant-dst "$v:drop_fraction=0.1" ;;
      chars:dynadiag-softmax) lr=$CHARS_SOFTMAX_LR ;;
      # the digits values, explicitly: the harness's chars-gpt defaults are the chars knobs
      digits:dynadiag | digits:dynadiag-pool2) printf '%s ' --variant-dst "$v:alpha_lr=0.01" ;;
      digits:diagheur) printf '%s ' --variant-dst "$v:drop_fraction=0.3" ;;
    esac
    printf '%s ' --variant-train "$v:lr=$lr"
  done
}

what=${1:-all}
if [[ $what == all || $what == digits ]]; then
  nice -n 10 "$PY" -m diagcompile.cli sweep --task digits-vit \
    --methods dense,$ALL_SPARSE --sparsities 0.5,0.8,0.9,0.95 --seeds 5 \
    --variant-train dense:lr=0.001 $(variant_flags $ALL_SPARSE "$SPARSE_LR") \
    --out "$OUT/digits" --name dst_digits --threads 1 --jobs "${JOBS:-1}" --quiet ${NOTES_DIGITS:+--notes "$NOTES_DIGITS"}
  cp "$OUT"/digits/dst_digits{.csv,_runs.csv,.md,.png} "$RES"/
fi
if [[ $what == all || $what == chars ]]; then
  dense_lr=()
  if [[ ,$CHARS_METHODS, == *,dense,* ]]; then dense_lr=(--variant-train "dense:lr=$CHARS_LR"); fi
  nice -n 10 "$PY" -m diagcompile.cli sweep --task chars-gpt \
    --methods "$CHARS_METHODS" --sparsities 0.9 --seeds "${CHARS_SEEDS:-5}" "${dense_lr[@]}" \
    $(variant_flags "$CHARS_METHODS" "$CHARS_SPARSE_LR" "$CHARS_KNOBS") \
    --out "$OUT/chars" --name "$CHARS_NAME" --threads 1 --jobs "${JOBS:-1}" --quiet ${NOTES_CHARS:+--notes "$NOTES_CHARS"}
  cp "$OUT/chars/$CHARS_NAME"{.csv,_runs.csv,.md,.png} "$RES"/
fi
# The same protocol with a longer budget at sparsity 0.9: does DynaDiag catch DiagHeur given more training?
# Committed: digits-long with EPOCHS=120 LONG_SEEDS=10 (dst_digits_e120.*) and EPOCHS=360 LONG_SEEDS=10
# METHODS=dynadiag,diagheur,dynadiag-pool2 (dst_digits_e360.*); chars-long with STEPS=2400 LONG_SEEDS=3
# METHODS=dynadiag-pool2,dense,dynadiag,diagheur CHARS_LR=0.002 CHARS_SPARSE_LR=0.01 CHARS_KNOBS=digits
# (dst_chars_s2400.*); at the chars-tuned settings METHODS=dense,dynadiag,dynadiag-pool2,diagheur STEPS=2400
# LONG_SEEDS=3 LONG_NAME=chars_s2400_tuned (dst_chars_s2400_tuned.*).
# dynadiag-pool2 is DynaDiag with a pool of 2k.
long_sweep() {  # task, --epochs|--steps, length, name, dense lr, sparse lr[, knobs]
  local methods=${METHODS:-dense,dynadiag,diagheur} lr=()
  if [[ ,$methods, == *,dense,* && -n $5 ]]; then lr=(--variant-train "dense:lr=$5"); fi
  nice -n 10 "$PY" -m diagcompile.cli sweep --task "$1" "$2" "$3" \
    --methods "$methods" --sparsities 0.9 --seeds "${LONG_SEEDS:-10}" "${lr[@]}" $(variant_flags "$methods" "$6" "${7:-}") \
    --out "$OUT/${4//_/-}" --name "dst_$4" --threads 1 --jobs "${JOBS:-1}" --quiet
  cp "$OUT/${4//_/-}/dst_$4"{.csv,_runs.csv,.md,.png} "$RES"/
}
if [[ $what == digits-long ]]; then
  long_sweep digits-vit --epochs "${EPOCHS:-120}" "digits_e${EPOCHS:-120}" 0.001 "$SPARSE_LR"
fi
if [[ $what == chars-long ]]; then
  long_sweep chars-gpt --steps "${STEPS:-2400}" "${LONG_NAME:-chars_s${STEPS:-2400}}" "$CHARS_LR" "$CHARS_SPARSE_LR" "$CHARS_KNOBS"
fi
if [[ $what == all || $what == memory ]]; then
  nice -n 10 "$PY" benchmarks/dst_memory.py
fi
