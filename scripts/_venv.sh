# Sourced by scripts/demo.sh and scripts/test.sh: make sure a virtual environment with diagcompile exists.
# First use creates it with the python3 on PATH (torch 2.13.0 as pip resolves it, PyPI's CUDA build where no
# local CPU wheel matches, unless TORCH_SPEC says otherwise; the package with its test extras, editable); later
# uses reuse it. DIAGCOMPILE_VENV picks the folder (default: .venv).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${DIAGCOMPILE_VENV:-.venv}"
if [[ ! -x "$VENV/bin/diagcompile" ]]; then
  echo "== setting up $VENV (first run only)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # shellcheck disable=SC2086  # TORCH_SPEC may carry extra pip arguments (e.g. an --index-url)
  "$VENV/bin/python" -m pip install ${TORCH_SPEC:-torch==2.13.0}
  "$VENV/bin/python" -m pip install -e ".[test]"
fi
