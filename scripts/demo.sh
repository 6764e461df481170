#!/usr/bin/env bash
# Command 1 of the README: create .venv if needed, install ecaseg, run the main job on the embedded
# synthetic benchmark (no downloads).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# setuptools warns about every editable install (a folder named like the package in the working directory);
# here that folder is the package itself, so the warning says nothing: silence it
PYTHONWARNINGS=ignore .venv/bin/python -m pip install -q -e .
.venv/bin/ecaseg demo "$@"
