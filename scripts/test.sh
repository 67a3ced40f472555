#!/usr/bin/env bash
# The test suite, exactly as CI runs it (sets up .venv on first use). Arguments pass through to pytest.
source "$(dirname "$0")/_venv.sh"
exec "$VENV/bin/python" -m pytest "$@"
