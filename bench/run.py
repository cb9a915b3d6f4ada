"""Run every (loader, mode) in a fresh process, same machine, same run; one JSON line per run.

    python bench/run.py --checkpoint CKPT --prequantized CKPT_NF4 --out results.jsonl
    python bench/run.py --checkpoint CKPT --modes bf16 --loaders qcore,diffusers,preadv --drop-caches
    python bench/run.py --summary results.jsonl          # the tables and target checks again

Each run is ``python bench/run_one.py ...`` in its own process, so no run profits from another's
imports, allocator state or CUDA context. For the warm-cache rows the checkpoint files are read once
beforehand; with --drop-caches the page cache is dropped before every run instead (root only).

Per mode, diffusers runs first, then qcore, then the raw loaders, so that qcore's forward output can
be compared with the diffusers output of the same mode (saved under --refdir as .pt files).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MODEL_LOADERS = ["diffusers", "qcore", "qcore-noreserve"]
# variants of a loader: the loader run_one.py runs, and the environment it runs with
VARIANTS = {"qcore-noreserve": ("qcore", {"QCORE_CUDA_RESERVE": "0"})}
RAW_LOADERS = ["safetensors", "preadv", "instanttensor", "instanttensor-direct"]
ALL_MODES = ["bf16", "nf4", "nf4-prequantized", "int8wo"]
RAW_MODES = {"bf16", "nf4-prequantized"}  # quantize-on-load modes read the bf16 bytes: the bf16 raw row
TARGETS = {"bf16": 1.3, "nf4": 1.5, "int8wo": 1.6, "nf4-prequantized": 1.5}  # qcore / fastest raw
COLD_TARGET = 1.1
RSS_TARGET_GB = 1.5
GPU_SLACK = 1.02
REL_ERR_TARGET = 1e-3
PLUGIN_SHARE_TARGET = 0.01


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def env_record(device: str) -> dict[str, Any]:
    """Versions and machine, as one JSON line at the head of the results."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for dist in (
        "torch",
        "diffusers",
        "bitsandbytes",
        "torchao",
        "safetensors",
        "accelerate",
        "instanttensor",
        "qcore",
        "qcore-bnb",
        "qcore-torchao",
    ):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = None
    record: dict[str, Any] = {
        "env": True,
        "python": platform.python_version(),
        "versions": versions,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "device": device,
    }
    try:
        with open("/proc/meminfo") as f:
            record["mem_total_gb"] = round(int(f.readline().split()[1]) * 1024 / 1e9, 1)
    except OSError:
        pass
    if device.startswith("cuda"):
        out = subprocess.run(
            [sys.executable, "-c", "import torch; print(torch.cuda.get_device_name())"],
            capture_output=True,
            text=True,
        )
        record["gpu"] = out.stdout.strip() or out.stderr.strip()[-200:]
    return record


def warm_page_cache(dirs: Iterable[Path]) -> float:
    """Read every checkpoint file once, so that warm-cache rows all start from the same state."""
    t0 = time.perf_counter()
    for d in dirs:
        for f in sorted(d.glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                buf = bytearray(64 << 20)
                while fh.readinto(buf):
                    pass
    return time.perf_counter() - t0


def drop_page_cache() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def plan(
    loaders: Sequence[str], modes: Sequence[str], device: str, has_prequantized: bool
) -> list[tuple[str, str]]:
    runs = []
    for mode in modes:
        if mode == "nf4-prequantized" and not has_prequantized:
            log("skipping mode nf4-prequantized: no --prequantized checkpoint")
            continue
        for loader in loaders:
            if loader in RAW_LOADERS and mode not in RAW_MODES:
                continue
            if loader.startswith("instanttensor") and device == "cpu":
                continue  # CUDA only
            runs.append((loader, mode))
    order = {name: i for i, name in enumerate(MODEL_LOADERS + RAW_LOADERS)}
    return sorted(runs, key=lambda r: (ALL_MODES.index(r[1]), order[r[0]]))


def run_one(loader: str, mode: str, args: argparse.Namespace, extra: Sequence[str] = ()) -> dict[str, Any]:
    runs_as, env = VARIANTS.get(loader, (loader, {}))
    cmd = [
        sys.executable,
        str(HERE / "run_one.py"),
        "--loader",
        runs_as,
        "--mode",
        mode,
        "--refdir",
        str(args.refdir),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
    ]
    if args.checkpoint:
        cmd += ["--checkpoint", str(args.checkpoint)]
    if args.prequantized:
        cmd += ["--prequantized", str(args.prequantized)]
    cmd += list(extra)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=args.timeout, env={**os.environ, **env}
        )
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return {
            "loader": loader,
            "mode": mode,
            "status": "error",
            "error": f"timeout after {args.timeout}s",
            "stderr_tail": err[-1500:],
        }
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("BENCH_RESULT "):
            record = json.loads(line[len("BENCH_RESULT ") :])
            break
    else:
        record = {
            "loader": loader,
            "mode": mode,
            "status": "error",
            "error": f"no result (exit status {proc.returncode})",
        }
    if record.get("status") != "ok":
        record["stderr_tail"] = proc.stderr[-1500:]
    record["process_s"] = round(time.perf_counter() - t0, 2)
    record["loader"] = loader
    return record


def emit(record: dict[str, Any], out: Path | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:
        with open(out, "a") as f:
            f.write(line + "\n")


# --- summary ------------------------------------------------------------------------------------


def read_results(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def aggregate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (loader, mode, cache): medians over repeats; profiled runs left out."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in records:
        if r.get("env") or r.get("profiled"):
            continue
        groups.setdefault((r["loader"], r["mode"], r.get("cache", "warm")), []).append(r)
    rows = []
    for (loader, mode, cache), rs in groups.items():
        ok = [r for r in rs if r.get("status") == "ok"]
        row: dict[str, Any] = {"loader": loader, "mode": mode, "cache": cache, "runs": len(ok)}
        if not ok:
            row["status"] = "refused" if any("GPU" in (r.get("error") or "") for r in rs) else "error"
            row["error"] = rs[0].get("error")
            rows.append(row)
            continue
        row["status"] = "ok"
        for key in (
            "load_s",
            "peak_gpu_gb",
            "model_gpu_gb",
            "peak_rss_gb",
            "rss_before_gb",
            "forward_s",
            "rel_err_vs_bf16",
            "rel_err_vs_diffusers",
            "gb_per_s",
            "checkpoint_gb",
            "available_backends_s",
            "import_torch_s",
            "load_cpu_s",
            "load_peak_rss_gb",
            "model_bytes_gb",
            "load_rss_over_model",
        ):
            value = _median(ok, key)
            if value is not None:
                row[key] = value
        if len(ok) > 1:
            row["load_s_min"] = min(r["load_s"] for r in ok)
            row["load_s_max"] = max(r["load_s"] for r in ok)
            cpu = [r["load_cpu_s"] for r in ok if r.get("load_cpu_s") is not None]
            if cpu:
                row["load_cpu_s_min"] = min(cpu)
        for key in ("heavy_modules_after_import", "backends", "output_finite"):
            if key in ok[0]:
                row[key] = ok[0][key]
        rows.append(row)
    return rows


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if value != 0 and abs(value) < 10**-digits:
            return f"{value:.1e}"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_tables(records: list[dict[str, Any]]) -> str:
    rows = aggregate(records)
    lines = [
        "| loader | mode | cache | load s, median (min–max) | load CPU s, min | peak GPU during load GB "
        "| model on GPU GB | peak RSS GB | load's RSS peak / model | forward s | rel err vs bf16 "
        "| rel err vs diffusers | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    model_rows = [r for r in rows if r["loader"] in MODEL_LOADERS and r["mode"] != "import"]
    for r in model_rows:
        load = _fmt(r.get("load_s"))
        if "load_s_min" in r:
            load += f" ({_fmt(r['load_s_min'])}–{_fmt(r['load_s_max'])})"
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error')}"
        lines.append(
            f"| {r['loader']} | {r['mode']} | {r['cache']} | {load} "
            f"| {_fmt(r.get('load_cpu_s_min', r.get('load_cpu_s')))} | {_fmt(r.get('peak_gpu_gb'))} "
            f"| {_fmt(r.get('model_gpu_gb'))} | {_fmt(r.get('peak_rss_gb'))} "
            f"| {_fmt(r.get('load_rss_over_model'))} | {_fmt(r.get('forward_s'), 3)} "
            f"| {_fmt(r.get('rel_err_vs_bf16'), 4)} | {_fmt(r.get('rel_err_vs_diffusers'), 4)} | {status} |"
        )
    raw_rows = [r for r in rows if r["loader"] in RAW_LOADERS]
    if raw_rows:
        lines += [
            "",
            "| raw loader | bytes of | cache | s, median (min–max) | GB/s | peak GPU during load GB "
            "| peak RSS GB | status |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in raw_rows:
            status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error')}"
            load = _fmt(r.get("load_s"))
            if "load_s_min" in r:
                load += f" ({_fmt(r['load_s_min'])}–{_fmt(r['load_s_max'])})"
            lines.append(
                f"| {r['loader']} | {r['mode']} ({_fmt(r.get('checkpoint_gb'))} GB) | {r['cache']} "
                f"| {load} | {_fmt(r.get('gb_per_s'), 1)} | {_fmt(r.get('peak_gpu_gb'))} "
                f"| {_fmt(r.get('peak_rss_gb'))} | {status} |"
            )
    lines += ["", ratio_table(rows)]
    imports = [r for r in rows if r["mode"] == "import" and r["status"] == "ok"]
    for r in imports:
        lines.append(
            f"\n`import qcore` (torch already imported): {_fmt(r.get('load_s'), 3)} s; heavy modules it "
            f"imports: {', '.join(r.get('heavy_modules_after_import') or []) or 'none'}; "
            f"`qcore.available_backends()` (finds and loads {', '.join(r.get('backends') or [])}): "
            f"{_fmt(r.get('available_backends_s'), 3)} s."
        )
    profiled = [r for r in records if r.get("profiled") and r.get("status") == "ok"]
    for r in profiled:
        share = r["profile_pluggy_s"] / r["profile_total_s"] if r.get("profile_total_s") else None
        lines.append(
            f"\nProfiled qcore {r['mode']} load (cProfile): {_fmt(r.get('profile_total_s'))} s, of which "
            f"pluggy frames {_fmt(r.get('profile_pluggy_s'), 4)} s ({_fmt(share and 100 * share, 2)}%)."
        )
    return "\n".join(lines)


def _best_raw(rows: list[dict[str, Any]], mode: str, cache: str) -> dict[str, Any] | None:
    raw_mode = "nf4-prequantized" if mode == "nf4-prequantized" else "bf16"
    raws = [
        r
        for r in rows
        if r["loader"] in RAW_LOADERS
        and r["mode"] == raw_mode
        and r["cache"] == cache
        and r["status"] == "ok"
    ]
    return min(raws, key=_best) if raws else None


def _row(rows: list[dict[str, Any]], loader: str, mode: str, cache: str) -> dict[str, Any] | None:
    for r in rows:
        if r["loader"] == loader and r["mode"] == mode and r["cache"] == cache and r["status"] == "ok":
            return r
    return None


def ratio_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "Ratios use the median of the repeats of each row (the spread is in the table above).",
        "",
        "| mode | cache | qcore s | diffusers s | qcore / diffusers | fastest raw (s) | qcore / raw "
        "| target | peak GPU ≤ model+2% | peak RSS ≤ 1.5 GB | rel err vs diffusers ≤ 1e-3 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cache in ("warm", "cold"):
        for mode in ALL_MODES:
            q = _row(rows, "qcore", mode, cache)
            if q is None:
                continue
            d = _row(rows, "diffusers", mode, cache)
            raw = _best_raw(rows, mode, cache)
            target = TARGETS[mode] if cache == "warm" else COLD_TARGET
            vs_raw = _best(q) / _best(raw) if raw else None
            gpu_ok = rss_ok = None
            if q.get("peak_gpu_gb") is not None and q.get("model_gpu_gb"):
                gpu_ok = q["peak_gpu_gb"] <= q["model_gpu_gb"] * GPU_SLACK
            if q.get("peak_rss_gb") is not None and q.get("peak_gpu_gb") is not None:
                rss_ok = q["peak_rss_gb"] <= RSS_TARGET_GB  # host RSS target is for GPU loads
            err = q.get("rel_err_vs_diffusers")
            lines.append(
                f"| {mode} | {cache} | {_fmt(_best(q))} | {_fmt(d and _best(d))} "
                f"| {_fmt(d and _best(q) / _best(d))} "
                f"| {raw['loader'] + ' ' + _fmt(_best(raw)) if raw else '—'} | {_fmt(vs_raw)} "
                f"| ≤ {target} {_verdict(vs_raw is not None and vs_raw <= target, vs_raw)} "
                f"| {_verdict(gpu_ok, gpu_ok)} | {_verdict(rss_ok, rss_ok)} "
                f"| {_verdict(err is not None and err <= REL_ERR_TARGET, err)} |"
            )
    return "\n".join(lines)


def _best(row: dict[str, Any]) -> float:
    """The median of the repeats."""
    return row["load_s"]


def _verdict(ok: bool | None, value: Any) -> str:
    if value is None:
        return "—"
    return "met" if ok else "NOT met"


# --- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="bf16 checkpoint (bench/make_checkpoint.py)")
    p.add_argument("--prequantized", type=Path, help="nf4 checkpoint (make_checkpoint.py --prequantize nf4)")
    p.add_argument("--modes", default=",".join(ALL_MODES))
    p.add_argument("--loaders", default=",".join(x for x in MODEL_LOADERS + RAW_LOADERS if x not in VARIANTS))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu, for smoke tests")
    p.add_argument("--out", type=Path, help="append the JSON lines to this file too")
    p.add_argument("--refdir", type=Path, help="forward outputs (default: a fresh temporary folder)")
    p.add_argument("--drop-caches", action="store_true", help="drop the page cache before each run (root)")
    p.add_argument("--threads", type=int, default=16, help="threads of the preadv raw loader")
    p.add_argument("--timeout", type=int, default=300, help="seconds per run")
    p.add_argument("--import-check", action="store_true", help="add the `import qcore` row")
    p.add_argument(
        "--profile",
        type=Path,
        help="after the runs, one cProfile'd qcore load per mode, "
        "summaries appended to this file (rows marked profiled, left out of the tables)",
    )
    p.add_argument("--no-env", action="store_true", help="do not write the versions line")
    p.add_argument("--summary", type=Path, help="print the tables for an existing results file and exit")
    args = p.parse_args(argv)

    if args.summary:
        print(markdown_tables(read_results(args.summary)))
        return 0
    if args.checkpoint is None:
        p.error("--checkpoint is required")
    modes = [m for m in args.modes.split(",") if m]
    loaders = [name for name in args.loaders.split(",") if name]
    unknown = [m for m in modes if m not in ALL_MODES] + [
        x for x in loaders if x not in MODEL_LOADERS + RAW_LOADERS
    ]
    if unknown:
        p.error(f"unknown mode or loader: {', '.join(unknown)}")
    if args.drop_caches and os.geteuid() != 0:
        p.error("--drop-caches writes /proc/sys/vm/drop_caches: run as root")
    own_refdir = args.refdir is None
    if own_refdir:
        args.refdir = Path(tempfile.mkdtemp(prefix="qcore-bench-refs-"))
    cache = "cold" if args.drop_caches else "warm"

    records: list[dict[str, Any]] = []
    if not args.no_env:
        env = env_record(args.device)
        emit(env, args.out)
    if args.import_check:
        r = run_one("qcore", "import", args)
        records.append(r)
        emit(r, args.out)
    dirs = [d for d in (args.checkpoint, args.prequantized) if d is not None]
    if not args.drop_caches:
        log(f"warming the page cache: {warm_page_cache(dirs):.1f} s")
    runs = plan(loaders, modes, args.device, args.prequantized is not None)
    try:
        for rep in range(args.repeat):
            for loader, mode in runs:
                if args.drop_caches:
                    drop_page_cache()
                r = run_one(loader, mode, args)
                r.update(cache=cache, repeat=rep)
                records.append(r)
                emit(r, args.out)
        if args.profile:
            for mode in modes:
                if ("qcore", mode) not in runs:
                    continue
                if args.drop_caches:
                    drop_page_cache()
                r = run_one("qcore", mode, args, ["--profile", str(args.profile)])
                r.update(cache=cache, profiled=True)
                records.append(r)
                emit(r, args.out)
    finally:
        if own_refdir:
            shutil.rmtree(args.refdir, ignore_errors=True)
    log("\n" + markdown_tables(read_results(args.out) if args.out else records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
