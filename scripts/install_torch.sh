#!/usr/bin/env bash
# Install torch (the version pinned in constraints.txt) into the active virtual environment, choosing
# where it comes from:
#
# - QCORE_TORCH_INDEX set: from that index (e.g. https://download.pytorch.org/whl/cu128 for a CUDA build).
# - otherwise, when pip's own configuration (PIP_INDEX_URL, PIP_FIND_LINKS, pip.conf) already offers the
#   CPU build (a "+cpu" version), from there;
# - otherwise from PyTorch's CPU index, https://download.pytorch.org/whl/cpu (about 200 MB). Plain
#   "pip install torch" from the public PyPI would fetch the CUDA build on Linux, several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
cpu_index=https://download.pytorch.org/whl/cpu
torch_pin=$(grep -E '^torch==' constraints.txt)

if [ -n "${QCORE_TORCH_INDEX:-}" ]; then
  index=$QCORE_TORCH_INDEX
else
  report=$(mktemp)
  trap 'rm -f "$report"' EXIT
  # Resolve only (no download of the wheel itself): which torch would the configured sources give?
  python -m pip install -q --dry-run --no-deps --ignore-installed --report "$report" "$torch_pin" 2>/dev/null || true
  offered=$(python -c 'import json, sys; r = json.load(open(sys.argv[1])); print(r["install"][0]["metadata"]["version"])' \
    "$report" 2>/dev/null || echo none)
  case "$offered" in
    *+cpu) index="" ;;
    *) index=$cpu_index ;;
  esac
fi

if [ -n "$index" ]; then
  echo "installing $torch_pin from $index" >&2
  python -m pip install -q -c constraints.txt --index-url "$index" "$torch_pin"
else
  echo "installing $torch_pin ($offered) from pip's configured sources" >&2
  python -m pip install -q -c constraints.txt "$torch_pin"
fi
