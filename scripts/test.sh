#!/usr/bin/env bash
# Set up a fresh virtual environment with qcore, every backend of the repository (plugins/*, and the
# example qcore-int8) and the test tools; check lint and format (scripts/lint.sh); then run every test
# tree: tests/ (core), plugins/*/tests/ and examples/*/tests/ (pyproject.toml's testpaths).
# Extra arguments go to pytest. pytest runs even when lint fails; the exit status is pytest's, else lint's.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${QCORE_VENV:-.venv}"
python3 -m venv "$venv"
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
bash scripts/install_torch.sh
distributions=(./core)
for project in plugins/*/pyproject.toml examples/*/pyproject.toml; do distributions+=("./${project%/pyproject.toml}"); done
python -m pip install -q -c constraints.txt "${distributions[@]}" -r requirements-test.txt
lint=0
bash scripts/lint.sh || lint=$?
tests=0
python -m pytest "$@" || tests=$?
if [ "$lint" != 0 ]; then
  echo "lint: ruff reported findings above (bash scripts/lint.sh --fix fixes most of them)" >&2
fi
if [ "$tests" != 0 ]; then exit "$tests"; fi
exit "$lint"
