#!/usr/bin/env bash
# The whole GPU benchmark in one command, for a machine with one CUDA GPU and no network.
#
#   bash bench/gpu_suite.sh            # Flux-dev size (11.9B parameters, 23.8 GB): about 8 minutes
#   bash bench/gpu_suite.sh --small    # 2 double + 4 single blocks: a quick check of the whole path
#
# Expects the wheels from bench/fetch_wheels.sh in .whl/ (repo root). Writes into "$OUT" (default
# bench/out): results.jsonl (one JSON line per run), summary.md (the tables), profile.txt
# (cProfile of qcore's loads), benchmarks.png and log.txt. Checkpoints go to $BENCH_WORK (default
# bench/.data; 31 GB for the full size), which is reused when it already holds them. The gpu-marked
# tests run too (gpu-tests.xml; BENCH_GPU_TESTS=0 leaves them out).
# Every loader runs BENCH_REPEAT times (default 3; the summary gives median and spread). The steps can
# run in separate calls on the same machine (BENCH_STEPS, a comma list of make, warm, cold, tests,
# summary; default all), the results accumulating in $WORK/results.jsonl, copied to $OUT after each
# step: BENCH_WARM_MODES and BENCH_COLD_MODES choose the modes of the warm and cold steps.
# For a smoke test of this script without a GPU: BENCH_DEVICE=cpu BENCH_WHEELS=none BENCH_MODEL_ARGS=
# "--layers 1 1 --heads 4 --head-dim 32 --joint-dim 64 --pooled-dim 32" bash bench/gpu_suite.sh --small
set -uo pipefail
cd "$(dirname "$0")/.."

SMALL=0
for arg in "$@"; do
  case "$arg" in
    --small) SMALL=1 ;;
    *) echo "unknown argument: $arg (use --small or nothing)" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-$PWD/bench/out}
WORK=${BENCH_WORK:-$PWD/bench/.data}
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEVICE=${BENCH_DEVICE:-cuda}

# env check first: what machine and software this run had
"$PY" - "$WORK" <<'PY'
import json, os, shutil, subprocess, sys, torch
work = sys.argv[1]
fs = subprocess.run(["df", "-T", work], capture_output=True, text=True).stdout.splitlines()[-1].split()
print("ENV " + json.dumps({
    "torch": torch.__version__, "cuda": torch.version.cuda,
    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    "cpus": os.cpu_count(), "free_disk_gb": round(shutil.disk_usage(work).free / 1e9, 1),
    "work_fs": fs[1] if len(fs) > 1 else None, "root": os.geteuid() == 0,
}))
PY

WHEELS=${BENCH_WHEELS:-.whl}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  # a later call on the same machine with the same wheels skips the install
  STAMP=$(cat "$WHEELS"/*.whl | md5sum | cut -d' ' -f1)
  if [ "$(cat /tmp/site/.qcore-wheels 2>/dev/null)" != "$STAMP" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
      || { echo "installing the carried wheels failed" >&2; exit 1; }
    # bytecode once here: without it every benchmark process compiles diffusers, transformers and
    # the backends again (seconds per process), and a lazy import inside a timed load would count it
    "$PY" -m compileall -q -j 0 /tmp/site >/dev/null || true
    echo "$STAMP" > /tmp/site/.qcore-wheels
  fi
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  echo "no wheels in $WHEELS/: using what is installed (run bench/fetch_wheels.sh on a machine with network)" >&2
fi
"$PY" -c "import diffusers, bitsandbytes, torchao, qcore, qcore_bnb, qcore_torchao" || exit 1

if [ "$SMALL" = 1 ]; then
  LAYERS=(--layers 2 4); NAME=small
else
  LAYERS=(--layers 19 38); NAME=flux-dev
fi
REPEAT=${BENCH_REPEAT:-3}
STEPS=",${BENCH_STEPS:-make,warm,cold,tests,summary},"
WARM_MODES=${BENCH_WARM_MODES:-bf16,nf4,nf4-prequantized,int8wo}
COLD_MODES=${BENCH_COLD_MODES:-bf16,nf4,nf4-prequantized}
has() { [[ "$STEPS" == *",$1,"* ]]; }
if [ -n "${BENCH_MODEL_ARGS:-}" ]; then
  read -r -a LAYERS <<<"$BENCH_MODEL_ARGS"; NAME=custom
fi
BF16="$WORK/$NAME-bf16"; NF4="$WORK/$NAME-nf4"
RESULTS="$WORK/results.jsonl"; PROFILE="$WORK/profile.txt"
keep() { cp -f "$RESULTS" "$OUT/results.jsonl" 2>/dev/null; cp -f "$PROFILE" "$OUT/profile.txt" 2>/dev/null; true; }
trap keep EXIT

step() { echo "=== [$SECONDS s] $*"; }
# (a fresh machine lacks the checkpoints whatever the steps: they are made first)
if has make || [ ! -f "$BF16/config.json" ] || [ ! -f "$NF4/config.json" ]; then
has make && rm -f "$RESULTS" "$PROFILE"
step "checkpoint $NAME bf16"
[ -f "$BF16/config.json" ] || "$PY" bench/make_checkpoint.py "${LAYERS[@]}" --device "$DEVICE" --out "$BF16" || exit 1
step "checkpoint $NAME nf4, pre-quantized by qcore"
[ -f "$NF4/config.json" ] || "$PY" bench/make_checkpoint.py --prequantize nf4 --from "$BF16" --device "$DEVICE" --out "$NF4" || exit 1
du -sh "$BF16" "$NF4"
fi

if has warm; then
  step "warm page cache: $WARM_MODES, $REPEAT repeats"
  # the versions line and the `import qcore` row once per results file
  FIRST=(--import-check); [ -f "$RESULTS" ] && FIRST=(--no-env)
  "$PY" bench/run.py --device "$DEVICE" --checkpoint "$BF16" --prequantized "$NF4" --repeat "$REPEAT" \
    "${FIRST[@]}" --timeout 150 --out "$RESULTS" --profile "$PROFILE" --modes "$WARM_MODES" \
    --loaders "${BENCH_WARM_LOADERS:-qcore,diffusers,preadv,instanttensor}"
  keep
fi

# cold rows: they need root, and each one reads the checkpoint from the disk; per mode, the raw
# loaders that were fastest cold before (the quantize-on-load modes read the bf16 bytes)
if has cold && [ "$DEVICE" = cuda ] && [ "$(id -u)" = 0 ]; then
  for mode in ${COLD_MODES//,/ }; do
    case "$mode" in
      bf16) loaders=qcore,diffusers,instanttensor-direct ;;
      nf4-prequantized) loaders=qcore,diffusers,preadv,instanttensor-direct ;;
      *) loaders=qcore,diffusers ;;
    esac
    step "cold page cache: $mode ($loaders), $REPEAT repeats"
    "$PY" bench/run.py --checkpoint "$BF16" --prequantized "$NF4" --modes "$mode" --drop-caches --no-env \
      --timeout 120 --repeat "$REPEAT" --loaders "$loaders" --out "$RESULTS"
    keep
  done
elif has cold; then
  step "cold page cache rows skipped (no GPU or not root)"
fi

if has tests && [ "${BENCH_GPU_TESTS:-1}" = 1 ] && "$PY" -c "import pytest" 2>/dev/null; then
  # The gpu-marked tests (skipped without CUDA); load times and peak memory land in gpu-tests.xml.
  step "gpu tests"
  "$PY" -m pytest -m gpu -q -p no:cacheprovider tests plugins/bnb/tests plugins/torchao/tests plugins/gguf/tests \
    examples/qcore-int8/tests --junitxml "$OUT/gpu-tests.xml" || echo "gpu tests failed" >&2
elif has tests; then
  step "gpu tests skipped (BENCH_GPU_TESTS=0 or pytest not importable)"
fi

if has summary; then
  step "summary and plot"
  keep
  "$PY" bench/run.py --summary "$RESULTS" | tee "$OUT/summary.md"
  "$PY" bench/plot.py "$RESULTS" --out "$OUT/benchmarks.png" --title "FluxTransformer2DModel $NAME" \
    || echo "plot failed (matplotlib missing?)" >&2
fi
step "done"
