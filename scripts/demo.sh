#!/usr/bin/env bash
# The main job: `diagcompile demo` on the bundled digits data (sets up .venv on first use).
# Arguments pass through, e.g. scripts/demo.sh --out my_demo --sparsity 0.95
source "$(dirname "$0")/_venv.sh"
exec "$VENV/bin/diagcompile" demo "$@"
