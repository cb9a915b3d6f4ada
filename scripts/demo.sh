#!/usr/bin/env bash
# Set up a fresh virtual environment with qcore and qcore-bnb, then run the demo: a tiny model made on
# the fly is quantized to 4-bit NF4 on load (on the CPU), saved, reloaded and run.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${QCORE_DEMO_VENV:-.venv-demo}"
python3 -m venv "$venv"
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
bash scripts/install_torch.sh
python -m pip install -q -c constraints.txt ./core ./plugins/bnb
python examples/demo.py
