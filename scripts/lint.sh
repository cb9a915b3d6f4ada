#!/usr/bin/env bash
# ruff check and ruff format --check over the repository, with the configuration in pyproject.toml and
# the ruff version pinned in requirements-test.txt. `bash scripts/lint.sh --fix` applies ruff's fixes
# and formatting instead of only reporting. Findings are one line each; `ruff check FILE` and
# `ruff format --diff FILE` show the details.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --fix ]; then
  python -m ruff check --fix .
  python -m ruff format .
  exit
fi
status=0
python -m ruff check --output-format concise . || status=1
python -m ruff format --check --output-format concise . || status=1
exit $status
