"""The CPU benchmark: a ~160M-parameter FluxTransformer2DModel, qcore vs diffusers, one run.

    python bench/cpu_bench.py --out bench-cpu.jsonl --repeat 3   # about 10 minutes on 2 cores
    python bench/cpu_bench.py --model flux-width --modes int8wo,nf4 --loaders qcore,diffusers

Writes a seeded random checkpoint (4 double + 8 single blocks, 12 heads of 64, text width 768:
160.5M parameters, 0.32 GB in bf16; with ``--model flux-width``, one double and one single block of
Flux-dev's width, 545.5M parameters, 1.09 GB) and qcore's nf4 pre-quantized version of it into a
temporary folder, then runs bench/run.py on the CPU: qcore and diffusers for bf16, torchao int8 weight-only,
bnb nf4 on load and nf4 pre-quantized, plus the raw safetensors and preadv loaders, each run in a
fresh process, --repeat times. diffusers refuses bitsandbytes without a GPU; those rows say so.

Besides the times (compare them only as ratios within one run: the machine is shared), each model row
has the load's own RSS peak (the rise of VmHWM over the RSS just before the load) over the final
model's size: for a quantize-on-load, how much more than the quantized model the load held at once.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = {
    # 160.5M parameters, 0.32 GB in bf16: every mode in minutes
    "flux-160m": [
        "--layers",
        "4",
        "8",
        "--heads",
        "12",
        "--head-dim",
        "64",
        "--joint-dim",
        "768",
        "--pooled-dim",
        "768",
    ],
    # Flux-dev's width (3072, text 4096), 1 double + 1 single block: 545.5M parameters, 1.09 GB in
    # bf16. Its weights are as wide as Flux-dev's, so they are quantized in row slices as there.
    "flux-width": ["--layers", "1", "1"],
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-cpu.jsonl"), help="results (JSON lines)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", type=Path, help="keep the checkpoints here (default: a temporary folder)")
    p.add_argument("--model", default="flux-160m", choices=sorted(MODELS))
    p.add_argument("--modes", default="bf16,int8wo,nf4,nf4-prequantized")
    p.add_argument("--loaders", default="qcore,diffusers,safetensors,preadv")
    args = p.parse_args(argv)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="qcore-cpu-bench-"))
    bf16, nf4 = work / f"{args.model}-bf16", work / f"{args.model}-nf4"
    try:
        if not (bf16 / "config.json").is_file():
            subprocess.run(
                [
                    sys.executable,
                    str(HERE / "make_checkpoint.py"),
                    *MODELS[args.model],
                    "--device",
                    "cpu",
                    "--out",
                    str(bf16),
                ],
                check=True,
            )
        if "nf4-prequantized" in args.modes and not (nf4 / "config.json").is_file():
            subprocess.run(
                [
                    sys.executable,
                    str(HERE / "make_checkpoint.py"),
                    "--prequantize",
                    "nf4",
                    "--from",
                    str(bf16),
                    "--device",
                    "cpu",
                    "--out",
                    str(nf4),
                ],
                check=True,
            )
        if args.out.exists():
            args.out.unlink()
        run = [
            sys.executable,
            str(HERE / "run.py"),
            "--device",
            "cpu",
            "--checkpoint",
            str(bf16),
            "--loaders",
            args.loaders,
            "--modes",
            args.modes,
            "--repeat",
            str(args.repeat),
            "--threads",
            str(os.cpu_count() or 2),
            "--import-check",
            "--out",
            str(args.out),
        ]
        if "nf4-prequantized" in args.modes:
            run += ["--prequantized", str(nf4)]
        subprocess.run(run, check=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
