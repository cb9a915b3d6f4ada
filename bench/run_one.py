"""One (loader, mode) run in this process; prints one JSON line. bench/run.py starts one per run.

    python bench/run_one.py --loader qcore --mode nf4 --checkpoint DIR --refdir DIR [--device cuda]

Loaders: qcore, diffusers (a model, then a forward pass on a fixed small input) and the raw loaders
safetensors, preadv, instanttensor, instanttensor-direct (all tensors onto the device, no model).
The special run ``--loader qcore --mode import`` measures ``import qcore`` and the backend look-up.

Times: load_s is the wall time of the from_pretrained call (or of the raw load) up to and including
torch.cuda.synchronize(); the CUDA context is created before the clock starts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

MODEL_LOADERS = ("qcore", "diffusers")
RAW_LOADERS = ("safetensors", "preadv", "instanttensor", "instanttensor-direct")
MODES = ("bf16", "nf4", "nf4-prequantized", "int8wo")
HEAVY_MODULES = ("diffusers", "transformers", "bitsandbytes", "torchao", "accelerate", "safetensors")
GB = 1e9


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Reset the kernel's high-water mark of this process's RSS (VmHWM), so the load's own peak shows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_since_reset() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def safetensors_files(directory: Path) -> list[str]:
    files = sorted(str(p) for p in directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {directory}")
    return files


# --- the loads ----------------------------------------------------------------------------------


def quantization_config(loader: str, mode: str, torch: Any) -> Any:
    if mode in ("bf16", "nf4-prequantized"):
        return None
    if loader == "qcore":
        if mode == "nf4":
            import qcore_bnb

            return qcore_bnb.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
            )
        import qcore_torchao

        return qcore_torchao.TorchAoConfig("int8wo")
    if mode == "nf4":
        from diffusers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    from diffusers import TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


def load_model(loader: str, mode: str, path: Path, device: str, torch: Any) -> tuple[Any, Any]:
    """Returns (a callable doing the load, the model class); the callable is what is timed."""
    from diffusers import FluxTransformer2DModel

    qconfig = quantization_config(loader, mode, torch)
    # on CPU no device_map: both loaders then place everything on the CPU
    device_map = device if device != "cpu" else None
    kwargs: dict[str, Any] = dict(torch_dtype=torch.bfloat16, device_map=device_map)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    if loader == "qcore":
        import qcore

        return lambda: qcore.from_pretrained(FluxTransformer2DModel, path, **kwargs)
    return lambda: FluxTransformer2DModel.from_pretrained(path, **kwargs)


def load_raw(loader: str, path: Path, device: str, threads: int) -> Any:
    files = safetensors_files(path)
    if loader == "safetensors":
        from safetensors import safe_open

        def run() -> dict[str, Any]:
            tensors = {}
            for file in files:
                with safe_open(file, framework="pt", device=device) as f:
                    for key in f.keys():
                        tensors[key] = f.get_tensor(key)
            return tensors

        return run
    if loader == "preadv":
        sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is a folder of scripts
        from raw_preadv import load_files

        return lambda: load_files(files, device=device, threads=threads)
    if device == "cpu":
        raise RuntimeError(f"{loader} loads onto CUDA devices only")
    from instanttensor import BackendPolicy
    from instanttensor import safe_open as it_open

    backend = BackendPolicy.BUFFERED if loader == "instanttensor" else None

    def run_it() -> dict[str, Any]:
        tensors = {}
        with it_open(files, framework="pt", device=0, backend=backend) as f:
            for name, tensor in f.tensors():
                tensors[name] = tensor
        return tensors

    return run_it


# --- the forward pass ---------------------------------------------------------------------------


def flux_inputs(config: Any, device: str, torch: Any, tokens: int, text: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1234)
    dtype = torch.bfloat16
    inputs = dict(
        hidden_states=torch.randn(1, tokens, config["in_channels"], generator=g).to(dtype),
        encoder_hidden_states=torch.randn(1, text, config["joint_attention_dim"], generator=g).to(dtype),
        pooled_projections=torch.randn(1, config["pooled_projection_dim"], generator=g).to(dtype),
        timestep=torch.tensor([0.5], dtype=dtype),
        img_ids=torch.zeros(tokens, 3),
        txt_ids=torch.zeros(text, 3),
    )
    if config.get("guidance_embeds"):
        inputs["guidance"] = torch.tensor([3.5], dtype=dtype)
    return {k: v.to(device) for k, v in inputs.items()}


def rel_err(out: Any, ref_path: Path, torch: Any) -> float | None:
    if not ref_path.is_file():
        return None
    ref = torch.load(ref_path).float()
    out = out.float().cpu()
    if ref.shape != out.shape:
        return None
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def forward(model: Any, args: argparse.Namespace, torch: Any, record: dict[str, Any]) -> None:
    on_gpu = args.device != "cpu"
    tokens, text = (256, 64) if on_gpu else (16, 8)
    inputs = flux_inputs(model.config, args.device, torch, tokens, text)
    record["forward_warmup"] = on_gpu
    with torch.no_grad():
        if on_gpu:  # first call: kernel selection, lazy init; on the CPU it would only double the time
            model(**inputs, return_dict=False)
            sync(args.device, torch)
        t0 = time.perf_counter()
        out = model(**inputs, return_dict=False)[0]
        sync(args.device, torch)
        record["forward_s"] = round(time.perf_counter() - t0, 4)
    out = out.float().cpu()
    record["output_finite"] = bool(torch.isfinite(out).all())
    refdir = Path(args.refdir)
    refdir.mkdir(parents=True, exist_ok=True)
    own = refdir / f"{args.loader}-{args.mode}.pt"
    if not own.exists():
        torch.save(out, own)
    bf16_ref = refdir / "diffusers-bf16.pt"
    if not bf16_ref.exists():
        bf16_ref = refdir / "qcore-bf16.pt"
    record["rel_err_vs_bf16"] = rel_err(out, bf16_ref, torch)
    record["rel_err_vs_diffusers"] = rel_err(out, refdir / f"diffusers-{args.mode}.pt", torch)


def sync(device: str, torch: Any) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --- the run ------------------------------------------------------------------------------------


def measure_import(record: dict[str, Any]) -> None:
    t0 = time.perf_counter()
    import torch  # noqa: F401

    t1 = time.perf_counter()
    import qcore

    t2 = time.perf_counter()
    after_import = [m for m in HEAVY_MODULES if m in sys.modules]
    backends = qcore.available_backends()
    t3 = time.perf_counter()
    record.update(
        import_torch_s=round(t1 - t0, 4),
        load_s=round(t2 - t1, 4),  # `import qcore` alone, torch already imported
        available_backends_s=round(t3 - t2, 4),  # finds and loads every installed backend
        backends=sorted(getattr(b, "quant_method", str(b)) for b in backends),
        heavy_modules_after_import=after_import,
        heavy_modules_after_backends=[m for m in HEAVY_MODULES if m in sys.modules],
    )


def run(args: argparse.Namespace, record: dict[str, Any]) -> None:
    if args.mode == "import":
        measure_import(record)
        return
    t0 = time.perf_counter()
    import torch

    if args.loader in MODEL_LOADERS:
        import diffusers  # noqa: F401  (imported before the clock for both loaders)
    if args.loader == "qcore":
        import qcore  # noqa: F401
    record["import_s"] = round(time.perf_counter() - t0, 3)
    if args.device.startswith("cuda"):
        torch.cuda.init()
        torch.empty(1, device=args.device)  # the CUDA context, outside the timed region
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        record["gpu"] = torch.cuda.get_device_name()
    path = Path(args.prequantized if args.mode == "nf4-prequantized" else args.checkpoint)
    if args.loader in MODEL_LOADERS:
        load = load_model(args.loader, args.mode, path, args.device, torch)
    else:
        load = load_raw(args.loader, path, args.device, args.threads)
    rss_before = rss_bytes()
    record["rss_before_gb"] = round(rss_before / GB, 3)
    reset_peak_rss()
    base_gpu = torch.cuda.memory_allocated() if args.device.startswith("cuda") else 0
    if args.device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info()
        base_used = total - free

    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    t0, c0 = time.perf_counter(), time.process_time()
    obj = load()
    sync(args.device, torch)
    record["load_s"] = round(time.perf_counter() - t0, 4)
    # CPU seconds of all threads: on a shared machine a steadier measure of work than wall time
    record["load_cpu_s"] = round(time.process_time() - c0, 4)
    if profiler is not None:
        profiler.disable()
        write_profile(profiler, args, record)

    record["peak_rss_gb"] = round(peak_rss_bytes() / GB, 3)
    load_peak = peak_rss_since_reset()
    if load_peak is not None:
        # what the load itself added at its peak, over the RSS just before it
        record["load_peak_rss_gb"] = round((load_peak - rss_before) / GB, 3)
    record["rss_after_gb"] = round(rss_bytes() / GB, 3)
    if args.device.startswith("cuda"):
        record["peak_gpu_gb"] = round((torch.cuda.max_memory_allocated() - base_gpu) / GB, 3)
        record["model_gpu_gb"] = round((torch.cuda.memory_allocated() - base_gpu) / GB, 3)
        # what the driver sees, allocations outside torch's allocator included (a loader's own buffers)
        free, total = torch.cuda.mem_get_info()
        record["device_used_after_gb"] = round((total - free - base_used) / GB, 3)
    files = safetensors_files(path)
    record["checkpoint_gb"] = round(sum(os.path.getsize(f) for f in files) / GB, 3)
    if args.loader in MODEL_LOADERS:
        record["model_bytes_gb"] = round(sum(map(storage_bytes, obj.state_dict().values())) / GB, 3)
        if "load_peak_rss_gb" in record and args.device == "cpu" and record["model_bytes_gb"]:
            record["load_rss_over_model"] = round(record["load_peak_rss_gb"] / record["model_bytes_gb"], 3)
        forward(obj, args, torch, record)
    else:
        nbytes = sum(t.numel() * t.element_size() for t in obj.values())
        record["tensors"] = len(obj)
        record["tensor_gb"] = round(nbytes / GB, 3)
        record["gb_per_s"] = round(nbytes / GB / record["load_s"], 2)


def storage_bytes(tensor: Any) -> int:
    """Bytes a tensor holds; a tensor subclass (torchao's) holds its inner tensors."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None and type(tensor).__name__ not in ("Parameter", "Tensor"):
        names = flatten()[0]
        return sum(storage_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def write_profile(profiler: Any, args: argparse.Namespace, record: dict[str, Any]) -> None:
    import io
    import pstats

    stats = pstats.Stats(profiler)
    # where the plugin machinery's own time goes: pluggy's dispatch frames
    record["profile_pluggy_s"] = round(
        sum(v[2] for k, v in stats.stats.items() if "pluggy" in k[0]),
        4,  # type: ignore[attr-defined]
    )
    record["profile_total_s"] = round(stats.total_tt, 4)  # type: ignore[attr-defined]
    text = io.StringIO()
    stats.stream = text  # type: ignore[attr-defined]
    text.write(f"=== {args.loader} {args.mode} ({args.device}) load, cProfile ===\n")
    stats.sort_stats("cumulative").print_stats(35)
    stats.sort_stats("tottime").print_stats(25)
    with open(args.profile, "a") as f:
        f.write(text.getvalue())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loader", required=True, choices=MODEL_LOADERS + RAW_LOADERS)
    p.add_argument("--mode", required=True, choices=MODES + ("import",))
    p.add_argument("--checkpoint", type=Path, help="the bf16 checkpoint")
    p.add_argument("--prequantized", type=Path, help="the pre-quantized nf4 checkpoint")
    p.add_argument("--refdir", default="bench-refs", help="forward outputs, for the relative errors")
    p.add_argument("--device", default="cuda")
    p.add_argument("--threads", type=int, default=16, help="preadv threads")
    p.add_argument("--profile", help="append a cProfile summary of the load to this file")
    args = p.parse_args(argv)
    record: dict[str, Any] = {"loader": args.loader, "mode": args.mode, "device": args.device}
    try:
        run(args, record)
        record["status"] = "ok"
    except Exception as exc:
        # a refusal (diffusers' "A GPU is needed" on CPU, say) is a result, not a crash of the harness
        record["status"] = "error"
        record["error"] = (
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
        )
        traceback.print_exc(file=sys.stderr)
    print("BENCH_RESULT " + json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
