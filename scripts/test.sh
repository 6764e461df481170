#!/usr/bin/env bash
# Command 2 of the README: create .venv if needed, install ecaseg with its dev extras, then run
# lint (ruff), the type checker (mypy), the whole test suite (pytest) and the docs build (Sphinx, -W).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# setuptools warns about every editable install (a folder named like the package in the working directory);
# here that folder is the package itself, so the warning says nothing: silence it
PYTHONWARNINGS=ignore .venv/bin/python -m pip install -q -e ".[dev]"
echo "== ruff"
.venv/bin/ruff check ecaseg tests examples benchmarks
.venv/bin/ruff format --check ecaseg tests examples benchmarks
echo "== mypy"
.venv/bin/mypy
# a user's code is checked strictly against ecaseg's public types (errors inside ecaseg are the line above's)
.venv/bin/mypy --strict --follow-imports=silent --untyped-calls-exclude=torch examples tests/typing
echo "== sphinx"
rm -rf docs/_build
.venv/bin/sphinx-build -W -n --keep-going -q -b html docs docs/_build/html
echo "== pytest"
.venv/bin/python -m pytest -n 2 -q tests ecaseg "$@"
