"""Bar charts of a results file from bench/run.py: load seconds and peak memory per loader and mode.

    python bench/plot.py results.jsonl --out docs/benchmarks-h100.png --title "Flux-dev 12B, H100"

Needs matplotlib (a development tool here, not a dependency of any package).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is a folder of scripts

from run import ALL_MODES, MODEL_LOADERS, RAW_LOADERS, aggregate, read_results  # noqa: E402

COLORS = {
    "qcore": "#1f77b4",
    "qcore-noreserve": "#aec7e8",
    "diffusers": "#ff7f0e",
    "safetensors": "#7f7f7f",
    "preadv": "#2ca02c",
    "instanttensor": "#9467bd",
    "instanttensor-direct": "#c5b0d5",
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path)
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--title", default="")
    p.add_argument("--cache", default="warm", choices=["warm", "cold"])
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_results(args.results)
    rows = [
        r
        for r in aggregate(records)
        if r["status"] == "ok" and r["cache"] == args.cache and r["mode"] in ALL_MODES
    ]
    modes = [m for m in ALL_MODES if any(r["mode"] == m for r in rows)]
    loaders = [x for x in MODEL_LOADERS + RAW_LOADERS if any(r["loader"] == x for r in rows)]
    on_gpu = any(r.get("peak_gpu_gb") is not None for r in rows)
    panels = [("load_s", "load time (s), fastest of the repeats")]
    panels += [("peak_gpu_gb", "peak GPU memory during load (GB)")] if on_gpu else []
    panels += [("peak_rss_gb", "peak host RSS (GB)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    width = 0.8 / max(1, len(loaders))
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        for i, loader in enumerate(loaders):
            xs, ys = [], []
            for j, mode in enumerate(modes):
                row = next((r for r in rows if r["loader"] == loader and r["mode"] == mode), None)
                if row is None:
                    continue
                value = row.get("load_s_min", row.get("load_s")) if key == "load_s" else row.get(key)
                if value is None:
                    continue
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(value)
            bars = ax.bar(xs, ys, width, label=loader, color=COLORS.get(loader))
            ax.bar_label(bars, fmt="%.2g", fontsize=6, padding=1)
        if key == "load_s":
            ax.set_yscale("log")  # raw loads and quantize-on-load differ by orders of magnitude
        ax.set_xticks(range(len(modes)), modes, fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{args.title} ({args.cache} page cache)".strip(), fontsize=10)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
