"""Write a FluxTransformer2DModel checkpoint with seeded random weights, in diffusers' layout.

    python bench/make_checkpoint.py --out /data/flux-bf16                      # Flux-dev size, 23.8 GB
    python bench/make_checkpoint.py --layers 2 4 --out /tmp/flux-small          # quick iterations
    python bench/make_checkpoint.py --prequantize nf4 --from /data/flux-bf16 --out /data/flux-nf4

The weights are random (normal, small std) so that no download is needed and every machine builds the
same bytes for the same seed and device. The model is built on the meta device and materialised
directly in the target dtype on the target device: a 12B model never exists in float32.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("bench.make_checkpoint")

FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    out_channels=None,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)


def flux_config(
    double: int = 19,
    single: int = 38,
    heads: int = 24,
    head_dim: int = 128,
    joint_dim: int = 4096,
    pooled_dim: int = 768,
) -> dict[str, Any]:
    config = dict(FLUX_DEV, num_layers=double, num_single_layers=single)
    config.update(num_attention_heads=heads, attention_head_dim=head_dim)
    config.update(joint_attention_dim=joint_dim, pooled_projection_dim=pooled_dim)
    if head_dim != 128:
        # the three rope axes must add up to the head dim
        third = head_dim // 8 * 2
        config["axes_dims_rope"] = (head_dim - 2 * third, third, third)
    return config


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


@torch.no_grad()
def random_model(config: dict[str, Any], dtype: torch.dtype, device: torch.device, seed: int, std: float):
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        model = FluxTransformer2DModel(**config)
    model = model.to(dtype).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    # sorted names: the same seed gives the same tensors whatever the module registration order
    for name, param in sorted(model.named_parameters()):
        if name.endswith(".weight") and param.dim() == 1:  # norm scales
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.normal_(0.0, std / 2, generator=generator)
        else:
            param.normal_(0.0, std, generator=generator)
    return model


def write_bf16(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    config = flux_config(
        *args.layers,
        heads=args.heads,
        head_dim=args.head_dim,
        joint_dim=args.joint_dim,
        pooled_dim=args.pooled_dim,
    )
    t0 = time.perf_counter()
    model = random_model(config, dtype, device, args.seed, args.std)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    model.save_pretrained(args.out, max_shard_size=args.max_shard_size, safe_serialization=True)
    t2 = time.perf_counter()
    params = sum(p.numel() for p in model.parameters())
    return dict(
        kind=args.dtype,
        params=params,
        tensors=len(model.state_dict()),
        init_s=round(t1 - t0, 2),
        save_s=round(t2 - t1, 2),
    )


def write_prequantized(args: argparse.Namespace) -> dict[str, Any]:
    from diffusers import FluxTransformer2DModel

    import qcore

    if args.prequantize != "nf4":
        raise SystemExit(f"--prequantize {args.prequantize!r}: only 'nf4' is supported")
    if args.source is None or not (Path(args.source) / "config.json").is_file():
        raise SystemExit("--prequantize needs --from DIR, a bf16 checkpoint written by this script")
    import qcore_bnb

    device = resolve_device(args.device)
    config = qcore_bnb.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    t0 = time.perf_counter()
    model = qcore.from_pretrained(
        FluxTransformer2DModel,
        args.source,
        quantization_config=config,
        torch_dtype=torch.bfloat16,
        device_map=str(device),
    )
    t1 = time.perf_counter()
    qcore.save_pretrained(model, args.out, max_shard_size=args.max_shard_size)
    t2 = time.perf_counter()
    return dict(kind="nf4", source=str(args.source), quantize_s=round(t1 - t0, 2), save_s=round(t2 - t1, 2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--layers",
        nargs=2,
        type=int,
        default=(19, 38),
        metavar=("DOUBLE", "SINGLE"),
        help="double and single transformer blocks (Flux-dev: 19 38)",
    )
    p.add_argument("--heads", type=int, default=24, help="attention heads (Flux-dev: 24)")
    p.add_argument("--head-dim", type=int, default=128, help="attention head dim (Flux-dev: 128)")
    p.add_argument("--joint-dim", type=int, default=4096, help="text embedding width (Flux-dev: 4096)")
    p.add_argument("--pooled-dim", type=int, default=768, help="pooled text width (Flux-dev: 768)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--std", type=float, default=0.02)
    p.add_argument("--max-shard-size", default="10GB")
    p.add_argument("--device", default="auto", help="cuda|cpu|auto (auto: the GPU when there is one)")
    p.add_argument("--prequantize", choices=["nf4"], help="write a pre-quantized checkpoint made by qcore")
    p.add_argument("--from", dest="source", type=Path, help="the bf16 checkpoint to pre-quantize")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    info = write_prequantized(args) if args.prequantize else write_bf16(args)
    files = sorted(args.out.glob("*.safetensors"))
    info.update(out=str(args.out), files=len(files), bytes=sum(f.stat().st_size for f in files))
    print(json.dumps(info), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
