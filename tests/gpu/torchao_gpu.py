"""qcore-torchao on CUDA: quant types, peak GPU memory during load, round trips, diffusers interop.

Self-contained: the models are made on the fly and saved to a temporary directory. Prints one JSON
line per check; exits 1 when a check fails. Run on a CUDA machine with qcore, qcore-torchao, torchao
and (for the interop checks) diffusers importable:

    python tests/gpu/torchao_gpu.py [--hidden 4096] [--depth 8] [--out results.jsonl]

qcore-torchao need not be pip-installed: when its entry point is not visible (sources on PYTHONPATH),
the backend is registered in-process.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import qcore

RESULTS: list[dict[str, Any]] = []
OUT: Path | None = None
DEVICE = "cuda"  # --device cpu runs the same checks without memory figures (a smoke run of the script)


def emit(check: str, **fields: Any) -> None:
    line = {"check": check, **fields}
    RESULTS.append(line)
    text = json.dumps(line, default=str)
    print(text, flush=True)
    if OUT is not None:
        with open(OUT, "a", encoding="utf-8") as f:
            f.write(text + "\n")


def guarded(check: str, fn: Callable[[], dict[str, Any]]) -> None:
    try:
        fields = fn()
    except Exception as exc:  # report and go on with the next check
        emit(check, ok=False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-1500:])
        return
    emit(check, **fields)


def ensure_backend() -> None:
    try:
        qcore.get_backend("torchao")
    except qcore.BackendNotFoundError:
        import qcore_torchao

        qcore.register_backend(qcore_torchao.backend)


def mib(n: int) -> float:
    return round(n / 2**20, 1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def free() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


# --- a mid-size model ---------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.q = nn.Linear(hidden, hidden)
        self.up = nn.Linear(hidden, hidden)
        self.down = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.down(torch.nn.functional.gelu(self.up(h)) * torch.sigmoid(self.q(h)))


class MidModel(qcore.ModelMixin):
    _no_split_modules = ["Block"]

    def __init__(self, hidden: int = 4096, depth: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(hidden) for _ in range(depth))
        self.proj_out = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.proj_out(x)


def model_bytes(model: nn.Module) -> int:
    def size(t: torch.Tensor) -> int:
        flatten = getattr(type(t), "__tensor_flatten__", None)
        if flatten is not None and type(t) not in (torch.Tensor, nn.Parameter):
            names, _ = t.__tensor_flatten__()
            return sum(size(getattr(t, n)) for n in names)
        return t.numel() * t.element_size()

    return sum(size(t) for t in [*model.parameters(), *model.buffers()])


def timed_cuda_load(load: Callable[[], nn.Module]) -> tuple[nn.Module, dict[str, Any]]:
    free()
    cuda = DEVICE == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    start = time.perf_counter()
    model = load()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base if cuda else 0
    final = torch.cuda.memory_allocated() - base if cuda else 0
    return model, {
        "load_s": round(seconds, 3),
        "peak_load_mib": mib(peak),
        "final_mib": mib(final),
        "model_mib": mib(model_bytes(model)),
        "peak_over_final": round(peak / max(final, 1), 3),
    }


# --- checks -------------------------------------------------------------------------------------

def quant_types() -> dict[str, tuple[Callable[[], Any], float]]:
    from torchao.quantization import Int4WeightOnlyConfig

    from qcore_torchao import TorchAoConfig

    types: dict[str, tuple[Callable[[], Any], float]] = {
        "int8wo": (lambda: TorchAoConfig("int8wo"), 0.02),
        "int8dq": (lambda: TorchAoConfig("int8dq"), 0.04),
        "float8wo": (lambda: TorchAoConfig("float8wo"), 0.06),
        "float8dq_e4m3_tensor": (lambda: TorchAoConfig("float8dq_e4m3_tensor"), 0.08),
        "float8dq_e4m3_row": (lambda: TorchAoConfig("float8dq_e4m3_row"), 0.08),
        "int4wo_tile_packed": (lambda: TorchAoConfig("int4wo", group_size=128), 0.15),
        "uint4wo": (lambda: TorchAoConfig("uint4wo"), 0.15),
    }
    if importlib.util.find_spec("mslk") is not None:
        types["int4wo_plain_mslk"] = (
            lambda: TorchAoConfig(Int4WeightOnlyConfig(group_size=128, int4_packing_format="plain")),
            0.15,
        )
    return types


def check_quant_type(name: str, make: Callable[[], Any], bound: float, ckpt: Path, tmp: Path,
                     x: torch.Tensor, reference_out: torch.Tensor, bf16_mib: float) -> dict[str, Any]:
    model, load = timed_cuda_load(
        lambda: MidModel.from_pretrained(ckpt, quantization_config=make(), torch_dtype=torch.bfloat16, device_map=DEVICE)
    )
    weight = model.blocks[0].q.weight
    with torch.no_grad():
        out = model(x)
    error = rel_err(out, reference_out)
    saved = tmp / f"q-{name}"
    qcore.save_pretrained(model, saved)
    del model
    reloaded, reload = timed_cuda_load(lambda: MidModel.from_pretrained(saved, device_map=DEVICE))
    with torch.no_grad():
        same = bool(torch.equal(reloaded(x), out))
    deq: Any
    try:
        qcore.dequantize(reloaded)
        with torch.no_grad():
            deq = round(rel_err(reloaded(x), out), 5)
    except qcore.DequantizeError as exc:
        deq = f"DequantizeError: {str(exc)[:160]}"
    del reloaded
    free()
    ok = error < bound and same
    return {
        "ok": ok, "tensor": type(weight).__name__, "rel_err": round(error, 5), "bound": bound,
        "bf16_model_mib": bf16_mib, **load, "round_trip_exact": same,
        "reload_load_s": reload["load_s"], "reload_peak_mib": reload["peak_load_mib"],
        "dequantize_rel_err_vs_quantized": deq,
    }


def check_refusals(ckpt: Path) -> dict[str, Any]:
    from qcore_torchao import TorchAoConfig

    cpu_refused = False
    try:
        MidModel.from_pretrained(ckpt, quantization_config=TorchAoConfig("float8dq"), device_map="cpu")
    except qcore.ConfigError as exc:
        cpu_refused = "8.9" in str(exc)
    return {"ok": cpu_refused, "float8dq_on_cpu_refused_with_config_error": cpu_refused}


# --- diffusers interop on CUDA ------------------------------------------------------------------


def flux_config(layers: int, single: int, heads: int, head_dim: int) -> dict[str, Any]:
    return dict(
        patch_size=1, in_channels=64, out_channels=None, num_layers=layers, num_single_layers=single,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=heads * head_dim,
        pooled_projection_dim=768, guidance_embeds=False, axes_dims_rope=(16, 56, 56) if head_dim == 128 else (4, 6, 6),
    )


def flux_inputs(config: dict[str, Any]) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    device = DEVICE
    tokens, text = 256, 64
    return dict(
        hidden_states=torch.randn(1, tokens, config["in_channels"], generator=g).to(device, torch.bfloat16),
        encoder_hidden_states=torch.randn(1, text, config["joint_attention_dim"], generator=g).to(device, torch.bfloat16),
        pooled_projections=torch.randn(1, config["pooled_projection_dim"], generator=g).to(device, torch.bfloat16),
        timestep=torch.tensor([0.5], device=device, dtype=torch.bfloat16),
        img_ids=torch.zeros(tokens, 3, device=device),
        txt_ids=torch.zeros(text, 3, device=device),
        return_dict=False,
    )


def check_diffusers(tmp: Path, config: dict[str, Any], name: str, make_ao: Callable[[], Any]) -> dict[str, Any]:
    import diffusers
    from diffusers import FluxTransformer2DModel

    from qcore_torchao import TorchAoConfig

    base = tmp / "flux-bf16"
    if not base.exists():
        torch.manual_seed(0)
        FluxTransformer2DModel(**config).to(torch.bfloat16).save_pretrained(base)
    inputs = flux_inputs(config)

    theirs, d_load = timed_cuda_load(lambda: FluxTransformer2DModel.from_pretrained(
        base, quantization_config=diffusers.TorchAoConfig(make_ao()), torch_dtype=torch.bfloat16, device_map=DEVICE))
    with torch.no_grad():
        d_out = theirs(**inputs)[0]
    d_saved = tmp / f"flux-diffusers-{name}"
    theirs.save_pretrained(d_saved, max_shard_size="200MB")
    del theirs

    ours, q_load = timed_cuda_load(lambda: qcore.from_pretrained(
        FluxTransformer2DModel, base, quantization_config=TorchAoConfig(make_ao()), torch_dtype=torch.bfloat16,
        device_map=DEVICE))
    with torch.no_grad():
        q_out = ours(**inputs)[0]
    q_saved = tmp / f"flux-qcore-{name}"
    qcore.save_pretrained(ours, q_saved, max_shard_size="200MB")
    del ours

    ours_from_diffusers = qcore.from_pretrained(FluxTransformer2DModel, d_saved, torch_dtype=torch.bfloat16, device_map=DEVICE)
    with torch.no_grad():
        a = bool(torch.equal(ours_from_diffusers(**inputs)[0], d_out))
    del ours_from_diffusers
    free()
    diffusers_from_ours = FluxTransformer2DModel.from_pretrained(q_saved, torch_dtype=torch.bfloat16, device_map=DEVICE)
    with torch.no_grad():
        b = bool(torch.equal(diffusers_from_ours(**inputs)[0], q_out))
    del diffusers_from_ours
    free()
    return {
        "ok": a and b and bool(torch.equal(d_out, q_out)),
        "quantize_on_load_outputs_equal": bool(torch.equal(d_out, q_out)),
        "diffusers_ckpt_in_qcore_equal": a, "qcore_ckpt_in_diffusers_equal": b,
        "diffusers_load": d_load, "qcore_load": q_load,
    }


def main() -> int:
    global OUT, DEVICE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--flux-layers", type=int, default=2)
    parser.add_argument("--flux-single-layers", type=int, default=4)
    parser.add_argument("--flux-heads", type=int, default=24)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--types", default="", help="comma-separated subset of the quant types")
    args = parser.parse_args()
    OUT, DEVICE = args.out, args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        emit("environment", ok=False, error="no CUDA device")
        return 1
    ensure_backend()
    import torchao

    import qcore_torchao

    emit("environment", ok=True, torch=torch.__version__, torchao=torchao.__version__, qcore=qcore.__version__,
         qcore_torchao=qcore_torchao.__version__, device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
         capability=".".join(map(str, torch.cuda.get_device_capability())) if DEVICE == "cuda" else None,
         mslk=importlib.util.find_spec("mslk") is not None,
         diffusers=importlib.util.find_spec("diffusers") is not None)

    with tempfile.TemporaryDirectory(prefix="qcore-torchao-gpu-") as tmp_name:
        tmp = Path(tmp_name)
        torch.manual_seed(0)
        reference = MidModel(args.hidden, args.depth).to(torch.bfloat16)
        ckpt = tmp / "bf16"
        qcore.save_pretrained(reference, ckpt)
        bf16_mib = mib(model_bytes(reference))
        x = torch.randn(8, args.hidden, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16)
        reference = reference.to(DEVICE)
        with torch.no_grad():
            reference_out = reference(x)
        del reference
        free()

        plain, plain_load = timed_cuda_load(lambda: MidModel.from_pretrained(ckpt, device_map=DEVICE))
        del plain
        emit("bf16_load_baseline", ok=True, params_m=round(bf16_mib * 2**20 / 2 / 1e6, 1), **plain_load)

        wanted = {t for t in args.types.split(",") if t}
        for name, (make, bound) in quant_types().items():
            if wanted and name not in wanted:
                continue
            guarded(f"quantize_on_load:{name}",
                    lambda n=name, m=make, b=bound: check_quant_type(n, m, b, ckpt, tmp, x, reference_out, bf16_mib))
        guarded("hardware_refusal", lambda: check_refusals(ckpt))

        if importlib.util.find_spec("diffusers") is None:
            emit("diffusers_interop", ok=None, skipped="diffusers is not importable")
        else:
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Int8WeightOnlyConfig
            from torchao.quantization.granularity import PerRow

            config = flux_config(args.flux_layers, args.flux_single_layers, heads=args.flux_heads, head_dim=128)
            for name, make_ao in {
                "int8wo": Int8WeightOnlyConfig,
                "float8dq_row": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
            }.items():
                guarded(f"diffusers_interop:{name}", lambda n=name, m=make_ao: check_diffusers(tmp, config, n, m))

    failed = [r["check"] for r in RESULTS if r.get("ok") is False]
    emit("summary", ok=not failed, failed=failed, checks=len(RESULTS))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
