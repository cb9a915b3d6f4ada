"""Whole-pipeline benchmark: a Flux-dev-shaped FluxPipeline (random weights) with an nf4 transformer and
an int8 weight-only T5, loaded by qcore.load_pipeline and by diffusers' PipelineQuantizationConfig in
the same run: quantized on load, then pre-quantized.

    python bench/pipeline_bench.py make --size flux-dev --device cuda --out /data/flux-pipe   # 34 GB
    python bench/pipeline_bench.py prequantize --pipeline /data/flux-pipe --out /data/flux-pipe-q \
        --device cuda
    python bench/pipeline_bench.py run --pipeline /data/flux-pipe --prequantized /data/flux-pipe-q \
        --device cuda --out results.jsonl
    python bench/pipeline_bench.py smoke --workdir /tmp/pipe-smoke        # all three, tiny, on the CPU

Each (loader, mode) runs in a fresh process and prints one JSON line: load_s (wall time of the load
call, CUDA synchronised; the CUDA context exists before the clock starts), peak_gpu_gb
(max_memory_allocated during the load), peak_rss_gb (ru_maxrss of the process, imports included),
peak_rss_load_gb (the RSS high-water mark from just before the load: VmHWM after a reset),
rss_before_gb, step_s (one denoising step, 512x512, after the load) and the latents of that step saved
under --refdir; the summary lines give, per mode, qcore's load time against diffusers' (speedup) and
the difference of their latents (max |a-b| and ||a-b||/||b||). --quant int8wo quantizes the
transformer with torchao int8 weight-only too, which diffusers also runs on a CPU.

Weights: the transformer is FluxTransformer2DModel at Flux-dev size (11.9B), text_encoder_2 a
T5EncoderModel shaped like T5-XXL (4.76B), text_encoder CLIP-L (123M), the VAE Flux's (84M); all
random (normal, std 0.02, norms 1), built on the meta device and filled on --device in bf16.
Tokenizers are small word-level ones (the test suite's), enough to run the text encoders.
diffusers' T5 config skips ``wo`` by pattern: transformers 5.23's torchao path otherwise quantizes it
(its skip list is matched against parameter names), and qcore keeps it unquantized as transformers'
bitsandbytes path does.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # helpers.pipelines: tokenizers and the tiny pipeline

PROMPT = "a photo of a red cat on the table"
GB = 1024**3
LOADERS = ("qcore", "diffusers")
MODES = ("quantize-on-load", "prequantized")


# --- make ---------------------------------------------------------------------------------------


# Flux-dev's shapes, and "small": the same layer types and widths of the small components, few layers.
SHAPES = {
    "flux-dev": dict(double=19, single=38, heads=24, t5_layers=24, t5_width=4096, t5_heads=64, t5_ff=10240),
    "small": dict(double=1, single=2, heads=2, t5_layers=2, t5_width=256, t5_heads=4, t5_ff=512),
}


def flux_components(device: Any, size: str, seed: int = 0) -> dict[str, Any]:
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    shape = SHAPES[size]
    with init_empty_weights():
        models = {
            "transformer": FluxTransformer2DModel(
                patch_size=1,
                in_channels=64,
                num_layers=shape["double"],
                num_single_layers=shape["single"],
                attention_head_dim=128,
                num_attention_heads=shape["heads"],
                joint_attention_dim=shape["t5_width"],
                pooled_projection_dim=768,
                guidance_embeds=True,
                axes_dims_rope=(16, 56, 56),
            ),
            "text_encoder_2": T5EncoderModel(
                T5Config(
                    vocab_size=32128,
                    d_model=shape["t5_width"],
                    d_kv=64,
                    d_ff=shape["t5_ff"],
                    num_layers=shape["t5_layers"],
                    num_heads=shape["t5_heads"],
                    relative_attention_num_buckets=32,
                    feed_forward_proj="gated-gelu",
                    pad_token_id=0,
                    eos_token_id=1,
                    decoder_start_token_id=0,
                )
            ),
            "text_encoder": CLIPTextModel(
                CLIPTextConfig(
                    vocab_size=49408,
                    hidden_size=768,
                    intermediate_size=3072,
                    num_hidden_layers=12,
                    num_attention_heads=12,
                    max_position_embeddings=77,
                    projection_dim=768,
                    hidden_act="quick_gelu",
                    bos_token_id=0,
                    eos_token_id=1,
                    pad_token_id=1,
                )
            ),
            "vae": AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512),
                layers_per_block=2,
                latent_channels=16,
                norm_num_groups=32,
                sample_size=1024,
                scaling_factor=0.3611,
                shift_factor=0.1159,
                use_quant_conv=False,
                use_post_quant_conv=False,
            ),
        }
    generator = torch.Generator(device=device).manual_seed(seed)
    for model in models.values():
        # bf16 while still on the meta device: the 11.9B transformer never exists in float32.
        model.to(torch.bfloat16).to_empty(device=device)
        with torch.no_grad():
            for name, param in sorted(model.named_parameters()):
                if param.dim() == 1 and name.endswith("weight"):
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, 0.02, generator=generator)
            for buffer in model.buffers():
                if buffer.is_floating_point():
                    buffer.zero_()
        if hasattr(model, "tie_weights"):
            model.tie_weights()
    # Integer buffers (CLIP's position ids) are not random: rebuild them.
    for name, buffer in models["text_encoder"].named_buffers():
        if name.endswith("position_ids"):
            buffer.copy_(torch.arange(buffer.shape[-1], device=device).expand_as(buffer))
    return models


def make(out: Path, size: str, device_name: str) -> dict[str, Any]:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from helpers.pipelines import clip_tokenizer, t5_tokenizer, tiny_flux_pipeline

    started = time.perf_counter()
    if size == "tiny":
        tiny_flux_pipeline(out)
    else:
        models = flux_components(torch.device(device_name), size)
        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
            tokenizer=clip_tokenizer(out.parent / f"{out.name}-clip-vocab"),
            tokenizer_2=t5_tokenizer(),
            **models,
        )
        pipe.save_pretrained(out)
    return {"step": "make", "size": size, "out": str(out), "seconds": round(time.perf_counter() - started, 1)}


# --- configs ------------------------------------------------------------------------------------


# "nf4-int8wo": nf4 transformer + int8 weight-only T5 (the GPU benchmark); "int8wo": int8 weight-only for
# both, which diffusers also runs on a CPU (it refuses bitsandbytes there).
QUANTS = ("nf4-int8wo", "int8wo")


def qcore_configs(quant: str) -> dict[str, Any]:
    import torch
    from torchao.quantization import Int8WeightOnlyConfig

    from qcore_bnb import BitsAndBytesConfig
    from qcore_torchao import TorchAoConfig

    nf4 = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    return {
        "transformer": nf4 if quant == "nf4-int8wo" else TorchAoConfig(Int8WeightOnlyConfig()),
        "text_encoder_2": TorchAoConfig(Int8WeightOnlyConfig()),
    }


def diffusers_config(quant: str) -> Any:
    import diffusers
    import torch
    import transformers
    from torchao.quantization import Int8WeightOnlyConfig

    nf4 = diffusers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    return diffusers.PipelineQuantizationConfig(
        quant_mapping={
            "transformer": nf4 if quant == "nf4-int8wo" else diffusers.TorchAoConfig(Int8WeightOnlyConfig()),
            "text_encoder_2": transformers.TorchAoConfig(
                Int8WeightOnlyConfig(), modules_to_not_convert=[r".*\.wo"]
            ),
        }
    )


def prequantize(pipeline: Path, out: Path, device: str, quant: str) -> dict[str, Any]:
    import torch
    from diffusers import FluxPipeline

    import qcore

    started = time.perf_counter()
    pipe = qcore.load_pipeline(
        FluxPipeline,
        pipeline,
        quantization_config=qcore_configs(quant),
        torch_dtype=torch.bfloat16,
        device_map=device,
    )
    pipe.save_pretrained(out)
    return {"step": "prequantize", "out": str(out), "seconds": round(time.perf_counter() - started, 1)}


# --- one run ------------------------------------------------------------------------------------


def one(
    loader: str, mode: str, path: Path, device: str, refdir: Path, size: str, quant: str
) -> dict[str, Any]:
    import torch

    record: dict[str, Any] = {"loader": loader, "mode": mode, "quant": quant, "device": device, "size": size}
    cuda = device.startswith("cuda")
    if cuda:
        torch.zeros(1, device=device)  # the CUDA context, outside the clock
        torch.cuda.reset_peak_memory_stats()
    # Every library either loader needs is imported before the clock starts, so load_s is the load.
    import bitsandbytes  # noqa: F401
    import diffusers
    import torchao  # noqa: F401
    import transformers

    import qcore

    for name in ("FluxPipeline", "FluxTransformer2DModel", "AutoencoderKL"):
        getattr(diffusers, name)
    for name in ("T5EncoderModel", "CLIPTextModel", "CLIPTokenizer", "T5TokenizerFast"):
        getattr(transformers, name)
    if loader == "qcore":
        config = qcore_configs(quant) if mode == "quantize-on-load" else None  # imports the qcore backends
    else:
        config = diffusers_config(quant) if mode == "quantize-on-load" else None

    record["rss_before_gb"] = round(rss_bytes() / GB, 3)
    reset_peak_rss()
    started = time.perf_counter()
    try:
        if loader == "qcore":
            pipe = qcore.load_pipeline(
                diffusers.FluxPipeline,
                path,
                quantization_config=config,
                torch_dtype=torch.bfloat16,
                device_map=device,
            )
        else:
            pipe = diffusers.FluxPipeline.from_pretrained(
                path, quantization_config=config, torch_dtype=torch.bfloat16, device_map=device
            )
        if cuda:
            torch.cuda.synchronize()
    except Exception as exc:  # a refused load is a result (diffusers refuses bitsandbytes on CPU)
        record.update(status="error", error=f"{type(exc).__name__}: {exc}"[:300])
        return record
    record["load_s"] = round(time.perf_counter() - started, 3)
    record["peak_rss_gb"] = round(peak_rss_bytes() / GB, 3)
    load_peak = peak_rss_since_reset()
    if load_peak is not None:
        record["peak_rss_load_gb"] = round(load_peak / GB, 3)
    if cuda:
        record["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / GB, 3)
        record["gpu_after_gb"] = round(torch.cuda.memory_allocated() / GB, 3)
    side = {"tiny": 8, "small": 64}.get(size, 512)
    started = time.perf_counter()
    with torch.no_grad():
        latents = pipe(
            PROMPT,
            height=side,
            width=side,
            num_inference_steps=1,
            guidance_scale=3.5,
            max_sequence_length=16,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        ).images
    if cuda:
        torch.cuda.synchronize()
    record["step_s"] = round(time.perf_counter() - started, 3)
    refdir.mkdir(parents=True, exist_ok=True)
    torch.save(latents.float().cpu(), refdir / f"{loader}-{mode}.pt")
    record["status"] = "ok"
    return record


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> None:
    """Reset the kernel's high-water mark of this process's RSS (VmHWM), so the load's own peak shows:
    imports (bitsandbytes, torchao) peak above what they keep, which ru_maxrss would report instead."""
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


# --- run all --------------------------------------------------------------------------------------


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    records = []
    for mode in MODES:
        path = args.pipeline if mode == "quantize-on-load" else args.prequantized
        if path is None:
            continue
        for repeat, loader in itertools.product(range(args.repeat), LOADERS):
            command = [
                sys.executable,
                __file__,
                "one",
                "--loader",
                loader,
                "--mode",
                mode,
                "--pipeline",
                str(path),
                "--device",
                args.device,
                "--refdir",
                str(args.refdir),
                "--size",
                args.size,
                "--quant",
                args.quant,
            ]
            done = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            record = (
                json.loads(lines[-1])
                if lines
                else {"loader": loader, "mode": mode, "status": "error", "error": done.stderr[-300:]}
            )
            record["repeat"] = repeat
            emit(record, args.out)
            records.append(record)
        ours, theirs = (args.refdir / f"{loader}-{mode}.pt" for loader in LOADERS)
        if ours.exists() and theirs.exists():
            a, b = torch.load(ours), torch.load(theirs)
            summary: dict[str, Any] = {
                "summary": mode,
                "max_abs_diff": (a - b).abs().max().item(),
                "rel_l2_diff": ((a - b).norm() / b.norm()).item(),
            }
            for loader in LOADERS:
                runs = [r for r in records if r.get("mode") == mode and r.get("loader") == loader]
                for key in ("load_s", "peak_rss_gb", "peak_gpu_gb"):
                    values = [r[key] for r in runs if r.get("status") == "ok" and r.get(key) is not None]
                    if values:
                        summary[f"{loader}_{key}_median"] = round(statistics.median(values), 3)
                        summary[f"{loader}_{key}_range"] = [round(min(values), 3), round(max(values), 3)]
            medians = [summary.get(f"{loader}_load_s_median") for loader in ("diffusers", "qcore")]
            if None not in medians:
                summary["speedup"] = round(medians[0] / medians[1], 2)
            emit(summary, args.out)
    return records


def emit(record: dict[str, Any], out: Path | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:
        with open(out, "a") as f:
            f.write(line + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("step", choices=["make", "prequantize", "run", "one", "smoke"])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each (loader, mode), interleaved")
    parser.add_argument("--size", choices=["tiny", "small", "flux-dev"], default="flux-dev")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--pipeline", type=Path)
    parser.add_argument("--prequantized", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--refdir", type=Path, default=Path("/tmp/pipeline-bench-latents"))
    parser.add_argument("--loader", choices=LOADERS)
    parser.add_argument("--mode", choices=MODES)
    parser.add_argument("--quant", choices=QUANTS, default="nf4-int8wo")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/pipeline-bench-smoke"))
    args = parser.parse_args(argv)
    if args.step == "make":
        emit(make(args.out, args.size, args.device), None)
    elif args.step == "prequantize":
        emit(prequantize(args.pipeline, args.out, args.device, args.quant), None)
    elif args.step == "one":
        emit(
            one(args.loader, args.mode, args.pipeline, args.device, args.refdir, args.size, args.quant), None
        )
    elif args.step == "run":
        run_all(args)
    else:  # smoke: the whole path, tiny, on the CPU
        import shutil

        shutil.rmtree(args.workdir, ignore_errors=True)
        args.device = "cpu"
        args.size = args.size if args.size != "flux-dev" else "tiny"
        args.pipeline, args.prequantized = args.workdir / "pipe", args.workdir / "pipe-q"
        args.refdir = args.workdir / "latents"
        emit(make(args.pipeline, args.size, "cpu"), None)
        emit(prequantize(args.pipeline, args.prequantized, "cpu", args.quant), None)
        records = run_all(args)
        return 0 if all(r.get("status") == "ok" for r in records if r["loader"] == "qcore") else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
