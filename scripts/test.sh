#!/usr/bin/env bash
# Start what the tests need (dockerd, a registry, the base image: scripts/services.sh), then lint,
# type-check, check the import layers and run the whole test suite inside the project's virtualenv.
# A run that collects no test is an error: CI must never go green on nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin

if [ "$(id -u)" = 0 ] || [ -n "${CI:-}" ]; then
    bash scripts/services.sh
else
    echo "test.sh: not root: skipping scripts/services.sh (Docker tests skip loudly if its services are missing)" >&2
fi
if [ -n "${CI:-}" ]; then
    export STEPFLOW_REQUIRE_SERVICES=1  # wire-level fakes (moto, GCS emulator, Azurite) must run, not skip
fi

"$BIN/ruff" check .
"$BIN/mypy"
"$BIN/mypy" --strict -p stepflow.remote -p stepflow.interfaces   # the plugin authors' API
"$BIN/lint-imports"   # the architecture's layers (pyproject.toml [tool.importlinter])
set +e
"$BIN/python" -m pytest "$@"
code=$?
set -e
if [ "$code" -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit "$code"
