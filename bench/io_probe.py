"""Quick probe of qcore's CUDA load path against safetensors' own loader (fresh process per loader).

python bench/io_probe.py --gb 6        # prints one JSON line per loader
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
mode, path = sys.argv[1], sys.argv[2]
torch.cuda.init(); torch.zeros(1, device="cuda"); torch.cuda.synchronize()
t0 = time.perf_counter()
import qcore
sys.path.insert(0, path + "/..")
from probe_model import Stack
import_s = time.perf_counter() - t0
t = time.perf_counter()
if mode == "qcore":
    m = Stack.from_pretrained(path, device_map="cuda")
elif mode == "safe_open_cuda":
    from safetensors import safe_open
    import glob
    out = {}
    for f in sorted(glob.glob(path + "/*.safetensors")):
        with safe_open(f, "pt", device="cuda") as h:
            for k in h.keys(): out[k] = h.get_tensor(k)
torch.cuda.synchronize()
dt = time.perf_counter() - t
import os
knobs = {k: v for k, v in os.environ.items() if k.startswith("QCORE_IO")}
gpu_gb = round(torch.cuda.memory_allocated() / 1e9, 3)
peak_gpu_gb = round(torch.cuda.max_memory_allocated() / 1e9, 3)
print(json.dumps({"loader": mode, **knobs, "import_s": round(import_s, 3), "load_s": round(dt, 3),
                  "gpu_gb": gpu_gb, "peak_gpu_gb": peak_gpu_gb}))
"""

MODEL = """
import torch, qcore
from torch import nn
class Stack(qcore.ModelMixin):
    def __init__(self, layers: int = 8, d: int = 3072, f: int = 12288):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, f) for _ in range(layers))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=6.0)
    args = ap.parse_args()
    import torch

    work = Path(tempfile.mkdtemp())
    (work / "probe_model.py").write_text(MODEL)
    sys.path.insert(0, str(work))
    from probe_model import Stack  # type: ignore[import-not-found]

    layers = max(1, int(args.gb * 1e9 / (3072 * 12288 * 2)))
    with torch.device("cuda"):
        model = Stack(layers=layers).to(torch.bfloat16)
    t = time.perf_counter()
    model.save_pretrained(work / "ckpt", max_shard_size="10GB")
    print(
        json.dumps(
            {
                "saved_gb": round(sum(p.stat().st_size for p in (work / "ckpt").iterdir()) / 1e9, 2),
                "save_s": round(time.perf_counter() - t, 1),
            }
        ),
        flush=True,
    )
    for f in (work / "ckpt").iterdir():
        subprocess.run(["cat", str(f)], stdout=subprocess.DEVNULL, check=True)
    variants = [{}]
    if os.environ.get("PROBE_SWEEP"):
        variants += [
            {"QCORE_IO_THREADS": t, "QCORE_IO_PIECE_BYTES": str(p << 20), "QCORE_IO_SLOTS": s}
            for t, p, s in [
                ("8", 8, "24"),
                ("16", 4, "48"),
                ("16", 16, "24"),
                ("32", 8, "48"),
                ("16", 32, "16"),
                ("24", 16, "32"),
            ]
        ]
    subprocess.run([sys.executable, "-c", CHILD, "safe_open_cuda", str(work / "ckpt")], check=True)
    for variant in variants:
        subprocess.run(
            [sys.executable, "-c", CHILD, "qcore", str(work / "ckpt")],
            env={**os.environ, **variant},
            check=True,
        )


if __name__ == "__main__":
    main()
