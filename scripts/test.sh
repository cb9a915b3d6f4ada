#!/usr/bin/env bash
# Set up a fresh virtual environment with qcore, qcore-bnb, qcore-torchao and the test tools, then run
# the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${QCORE_VENV:-.venv}"
python3 -m venv "$venv"
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q -c constraints.txt torch==2.13.0
python -m pip install -q -c constraints.txt ./core ./plugins/bnb ./plugins/torchao ./examples/qcore-int8 -r requirements-test.txt
python -m pytest "$@"
