#!/usr/bin/env bash
# Lint, type-check and run the test suite inside the project's virtualenv.
# A run that collects no test is an error: CI must never go green on nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin

"$BIN/ruff" check .
"$BIN/mypy"
set +e
"$BIN/python" -m pytest "$@"
code=$?
set -e
if [ "$code" -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit "$code"
