#!/usr/bin/env bash
# The committed DST results (benchmarks/results/dst_digits.*, dst_chars.*, dst_memory.*), reproducibly.
# Hyper-parameters come from benchmarks/dst_tune.py (tune split only; see dst_tuning_*.md):
#   dense: lr 1e-3 (digits) | dynadiag: temperature_start 0.1 | dynadiag-softmax: temperature_start 0.02,
#   temperature_end 0.002 | diagheur: update_every 50 | DST methods: lr 2e-3 (digits). Everything else: defaults.
# Sequential, one thread, niced: the machine is shared. Runs already done (runs/*.json) are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-/tmp/dst-final}
RES=benchmarks/results
DST_FLAGS=(
  --variant-dst dynadiag:temperature_start=0.1
  --variant-dst dynadiag-pool2:temperature_start=0.1
  --variant-dst dynadiag-softmax:temperature_start=0.02
  --variant-dst dynadiag-softmax:temperature_end=0.002
  --variant-dst diagheur:update_every=50
)

what=${1:-all}
if [[ $what == all || $what == digits ]]; then
  nice -n 10 "$PY" -m diagcompile.cli sweep --task digits-vit \
    --methods dense,dynadiag,dynadiag-softmax,diagheur,dynadiag-pool2 --sparsities 0.5,0.8,0.9,0.95 --seeds 5 \
    --variant-train dense:lr=0.001 "${DST_FLAGS[@]}" \
    --out "$OUT/digits" --name dst_digits --threads 1 --quiet ${NOTES_DIGITS:+--notes "$NOTES_DIGITS"}
  cp "$OUT"/digits/dst_digits{.csv,_runs.csv,.md,.png} "$RES"/
fi
if [[ $what == all || $what == chars ]]; then
  nice -n 10 "$PY" -m diagcompile.cli sweep --task chars-gpt \
    --methods dense,dynadiag,dynadiag-softmax,diagheur,dynadiag-pool2 --sparsities 0.9 --seeds "${CHARS_SEEDS:-2}" \
    ${CHARS_LR:+--lr "$CHARS_LR"} "${DST_FLAGS[@]}" \
    --out "$OUT/chars" --name dst_chars --threads 1 --quiet ${NOTES_CHARS:+--notes "$NOTES_CHARS"}
  cp "$OUT"/chars/dst_chars{.csv,_runs.csv,.md,.png} "$RES"/
fi
if [[ $what == all || $what == memory ]]; then
  nice -n 10 "$PY" benchmarks/dst_memory.py
fi
