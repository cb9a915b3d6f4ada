#!/usr/bin/env bash
# The pipeline benchmark on a GPU machine without network, in two steps (each well under 10 minutes):
#
#   bash bench/pipeline_gpu.sh make    # install .whl/ into /tmp/site; write the Flux-dev-shaped pipeline
#                                      # (34 GB) and qcore's pre-quantized copy of it (12 GB) under $DATA
#   bash bench/pipeline_gpu.sh run     # qcore vs diffusers, quantize-on-load and pre-quantized
#
# DATA defaults to /tmp/pipeline-bench; results go to $OUT (pipeline-results.jsonl, pipeline-log.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-/tmp/pipeline-bench}
OUT=${OUT:-$DATA/out}
mkdir -p "$DATA" "$OUT"
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
if [ ! -d /tmp/site/qcore ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
fi
python3 -c "import torch, diffusers, transformers, bitsandbytes, torchao, qcore; print('env', torch.__version__, torch.cuda.get_device_name(), diffusers.__version__, transformers.__version__)" | tee -a "$OUT/pipeline-log.txt"
case "${1:-}" in
  make)
    python3 bench/pipeline_bench.py make --size "${SIZE:-flux-dev}" --device cuda --out "$DATA/pipe" 2>>"$OUT/pipeline-log.txt" | tee -a "$OUT/pipeline-results.jsonl"
    python3 bench/pipeline_bench.py prequantize --pipeline "$DATA/pipe" --out "$DATA/pipe-q" --device cuda 2>>"$OUT/pipeline-log.txt" | tee -a "$OUT/pipeline-results.jsonl"
    df -h "$DATA" | tee -a "$OUT/pipeline-log.txt"
    ;;
  run)
    sync && (echo 3 > /proc/sys/vm/drop_caches) 2>/dev/null || true
    cat "$DATA"/pipe/*/*.safetensors "$DATA"/pipe-q/*/*.safetensors > /dev/null  # the same warm page cache for every run
    python3 bench/pipeline_bench.py run --size "${SIZE:-flux-dev}" --pipeline "$DATA/pipe" --prequantized "$DATA/pipe-q" \
      --device cuda --refdir "$DATA/latents" --out "$OUT/pipeline-results.jsonl" 2>>"$OUT/pipeline-log.txt"
    ;;
  *)
    echo "usage: bash bench/pipeline_gpu.sh make|run" >&2
    exit 2
    ;;
esac
