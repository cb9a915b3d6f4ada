#!/usr/bin/env bash
# Download into .whl/ (repo root, git-ignored) every wheel the GPU machine lacks, and build qcore's.
#
#   bash bench/fetch_wheels.sh          # then: du -sh .whl
#
# The GPU machine (Python 3.12, torch 2.11+cu130) already has accelerate, safetensors,
# huggingface_hub, pluggy, numpy, pillow, regex, requests, filelock, pyyaml, tqdm, psutil,
# matplotlib, packaging and zipp. It lacks bitsandbytes, torchao, diffusers and instanttensor.
# diffusers' importlib_metadata requirement is for Python < 3.8 only, so it is not fetched.
#
# The bitsandbytes wheel (43 MB) holds one library per CUDA version; only the CUDA 13 ones (and the
# CPU one) can be used with torch 2.11+cu130, so the others are stripped from the wheel (and from
# its RECORD) to keep what travels small. Set QCORE_BENCH_FULL_BNB=1 to keep the wheel as published.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
rm -f .whl/*.whl

PY=${PYTHON:-python3}
platforms=()
for p in manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 \
         manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
download() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$@"
}
download bitsandbytes==0.50.2 torchao==0.18.0 diffusers==0.42.1
# bench/pipeline_bench.py: transformers text encoders (typer and its dependencies: transformers' CLI)
download transformers==5.23.0 tokenizers==0.23.3 typer click shellingham rich markdown-it-py mdurl
download pytest==9.2.0 iniconfig pygments  # the gpu-marked tests
download gguf==0.19.0  # qcore-gguf and its benchmark
download instanttensor==0.2.2 || echo "instanttensor not downloadable: the instanttensor rows will be skipped" >&2

if [ "${QCORE_BENCH_FULL_BNB:-0}" != 1 ]; then
  "$PY" - <<'PY'
import base64, csv, glob, hashlib, io, os, re, zipfile
keep = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")
for path in glob.glob(".whl/bitsandbytes-*.whl"):
    tmp = path + ".tmp"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        dropped = {n for n in src.namelist() if "libbitsandbytes_" in n and not keep.search(n)}
        for info in src.infolist():
            if info.filename in dropped:
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                rows = [r for r in csv.reader(io.StringIO(data.decode())) if r and r[0] not in dropped]
                out = io.StringIO()
                csv.writer(out, lineterminator="\n").writerows(rows)
                data = out.getvalue().encode()
            dst.writestr(info, data)
    os.replace(tmp, path)
    print(f"{path}: dropped {len(dropped)} libraries for other CUDA/ROCm/XPU versions")
PY
fi

"$PY" -m pip wheel -q --no-deps ./core ./plugins/bnb ./plugins/torchao ./plugins/gguf ./examples/qcore-int8 -w .whl
ls -la .whl
du -sh .whl
