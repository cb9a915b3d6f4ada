"""GGUF Flux loads: qcore (qcore-gguf) against diffusers' from_single_file, time and peak RSS.

Each (loader, file) runs in a fresh process (``--one``), so peak RSS (``ru_maxrss``) is that load's own.
Every run prints one JSON line: loader, file, device, load_s (the from_pretrained / from_single_file call,
with a final synchronize on CUDA), peak_rss_gb, rss_before_gb, peak_gpu_gb (CUDA), forward_s (one
forward after a warm-up on CUDA; none on the CPU), and, for the second loader of a file,
``equal_to_<other>``: whether the outputs are bit-identical.

Smoke mode (CPU, a tiny Flux of width 256, a minute on 2 cores)::

    python bench/gguf_bench.py --smoke

GPU mode (a Flux-dev-shaped file: 19 double and 38 single blocks, width 3072; random valid blocks,
written once, ~6.8 GB for Q4_K and ~12.7 GB for Q8_0)::

    python bench/gguf_bench.py --make /data/gguf --types Q4_K Q8_0
    python bench/gguf_bench.py --run /data/gguf --device cuda --repeat 3 > gguf-h100.jsonl

Both loaders compute in bfloat16 (``GGUFConfig(compute_dtype=torch.bfloat16)`` and diffusers'
``GGUFQuantizationConfig(compute_dtype=torch.bfloat16)``, ``torch_dtype=torch.bfloat16``). diffusers'
converter hard-codes Flux-dev's width 3072; for the smoke file's width this script runs diffusers' own
converter source with that one constant read from the file.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FLUX_DEV = {
    "_class_name": "FluxTransformer2DModel",
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
LOADERS = ("qcore", "diffusers")


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def random_blocks(shape: tuple[int, ...], quant_type: str, rng: Any) -> Any:
    """Valid random GGML blocks of ``quant_type`` (float16 scales small and finite), without quantizing."""
    import numpy as np

    from qcore_gguf import GGML_TYPES

    _, block, size = GGML_TYPES[quant_type]
    rows = int(np.prod(shape[:-1]))
    blocks = rng.integers(0, 256, size=(rows * shape[-1] // block, size), dtype=np.uint8)
    scales = {"Q8_0": (0,), "Q4_0": (0,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q2_K": (size - 4, size - 2)}
    scales["Q6_K"] = scales["Q3_K"] = (size - 2,)
    for offset in scales[quant_type]:
        value = rng.uniform(2e-5, 2e-4, size=blocks.shape[0]).astype(np.float16)
        blocks[:, offset : offset + 2] = value.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(*shape[:-1], -1)


def make_file(path: Path, config: dict[str, Any], quant_type: str, seed: int = 0) -> Path:
    """A BFL-named Flux GGUF with city96's layout: F32 1-D tensors, F16 where rows are no whole blocks."""
    import gguf
    import numpy as np

    from qcore_gguf import GGML_TYPES
    from qcore_gguf.testing import bfl_flux_shapes

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "flux")
    for name, shape in bfl_flux_shapes(config).items():
        key = "model.diffusion_model." + name
        if len(shape) == 1:
            writer.add_tensor(key, (rng.standard_normal(shape) * 0.02).astype(np.float32))
        elif shape[-1] % GGML_TYPES[quant_type][1]:
            writer.add_tensor(key, (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float16))
        else:
            blocks = random_blocks(shape, quant_type, rng)
            writer.add_tensor(key, blocks, raw_dtype=gguf.GGMLQuantizationType[quant_type])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (path.parent / "config").mkdir(exist_ok=True)
    (path.parent / "config" / "config.json").write_text(json.dumps(config))
    return path


def _diffusers_converter() -> Any:
    import diffusers.loaders.single_file_utils as sfu

    source = inspect.getsource(sfu.convert_flux_transformer_checkpoint_to_diffusers)
    source = source.replace("inner_dim = 3072", "inner_dim = checkpoint['img_in.weight'].shape[0]")
    namespace = dict(vars(sfu))
    exec(compile(source, sfu.__file__, "exec"), namespace)  # noqa: S102 - diffusers' own source
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"]


def load(loader: str, path: Path, device: str) -> Any:
    import torch
    from diffusers import FluxTransformer2DModel

    if loader == "qcore":
        import qcore
        from qcore_gguf import GGUFConfig

        return qcore.from_pretrained(
            FluxTransformer2DModel,
            path,
            quantization_config=GGUFConfig(compute_dtype=torch.bfloat16),
            torch_dtype=torch.bfloat16,
            device_map=device,
        )
    import diffusers.loaders.single_file_model as sfm
    from diffusers import GGUFQuantizationConfig

    entry = dict(sfm.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"])
    entry["checkpoint_mapping_fn"] = _diffusers_converter()
    sfm.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"] = entry
    model = FluxTransformer2DModel.from_single_file(
        str(path),
        config=str(path.parent / "config"),
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16),
        torch_dtype=torch.bfloat16,
        local_files_only=True,
    )
    return model.to(device)


def inputs(config: dict[str, Any], device: str, img: int, txt: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(1)
    dt = torch.bfloat16
    return {
        "hidden_states": torch.randn(1, img, config["in_channels"], generator=g).to(device, dt),
        "encoder_hidden_states": torch.randn(1, txt, config["joint_attention_dim"], generator=g).to(
            device, dt
        ),
        "pooled_projections": torch.randn(1, config["pooled_projection_dim"], generator=g).to(device, dt),
        "timestep": torch.tensor([0.5], dtype=dt, device=device),
        "guidance": torch.tensor([3.5], dtype=dt, device=device),
        "img_ids": torch.zeros(img, 3, dtype=dt, device=device),
        "txt_ids": torch.zeros(txt, 3, dtype=dt, device=device),
        "return_dict": False,
    }


def run_one(loader: str, path: Path, device: str, out: Path | None) -> dict[str, Any]:
    import torch

    config = json.loads((path.parent / "config" / "config.json").read_text())
    cuda = device.startswith("cuda")
    # Imports before the clock: the load is measured, not the first import of diffusers or qcore.
    import diffusers.loaders.single_file_model  # noqa: F401
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig  # noqa: F401

    import qcore  # noqa: F401
    import qcore_gguf  # noqa: F401

    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
    before = _rss_gb()
    start = time.perf_counter()
    model = load(loader, path, device)
    if cuda:
        torch.cuda.synchronize()
    result: dict[str, Any] = {
        "loader": loader,
        "file": path.name,
        "device": device,
        "load_s": round(time.perf_counter() - start, 3),
        "peak_rss_gb": round(_rss_gb(), 3),
        "rss_before_gb": round(before, 3),
    }
    if cuda:
        result["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    x = inputs(config, device, *((256, 64) if cuda else (16, 8)))
    with torch.no_grad():
        if cuda:
            model(**x)
            torch.cuda.synchronize()
        start = time.perf_counter()
        output = model(**x)[0]
        if cuda:
            torch.cuda.synchronize()
    result["forward_s"] = round(time.perf_counter() - start, 3)
    if out is not None:
        torch.save(output.cpu(), out / f"{path.stem}-{loader}.pt")
        for other in LOADERS:
            saved = out / f"{path.stem}-{other}.pt"
            if other != loader and saved.exists():
                theirs, ours = torch.load(saved), output.cpu()
                # Bit for bit (a NaN in the same place with the same bits counts as equal).
                same = theirs.shape == ours.shape and torch.equal(
                    theirs.view(torch.int16), ours.view(torch.int16)
                )
                result[f"equal_to_{other}"] = bool(same)
                result["finite"] = bool(torch.isfinite(ours).all())
    return result


def run_all(files: list[Path], device: str, repeat: int, out: Path) -> None:
    for path in files:
        for _ in range(repeat):
            for loader in LOADERS:
                cmd = [
                    sys.executable,
                    __file__,
                    "--one",
                    loader,
                    str(path),
                    "--device",
                    device,
                    "--out",
                    str(out),
                ]
                done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                line = done.stdout.strip().splitlines()[-1] if done.returncode == 0 else None
                if line is None:
                    line = json.dumps({"loader": loader, "file": path.name, "error": done.stderr[-2000:]})
                print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU run on a tiny Flux (width 256)")
    p.add_argument("--make", type=Path, help="write Flux-dev-shaped GGUF files into this directory")
    p.add_argument("--types", nargs="+", default=["Q4_K", "Q8_0"])
    p.add_argument(
        "--layers",
        nargs=2,
        type=int,
        default=[19, 38],
        metavar=("DOUBLE", "SINGLE"),
        help="blocks of --make files",
    )
    p.add_argument("--run", type=Path, help="benchmark every .gguf file in this directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--one", nargs=2, metavar=("LOADER", "FILE"), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help="where outputs are kept for the equality check")
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one[0], Path(args.one[1]), args.device, args.out)))
        return 0
    if args.make:
        args.make.mkdir(parents=True, exist_ok=True)
        for quant_type in args.types:
            start = time.perf_counter()
            config = {**FLUX_DEV, "num_layers": args.layers[0], "num_single_layers": args.layers[1]}
            name = "flux-dev" if args.layers == [19, 38] else "flux-w3072-{}-{}".format(*args.layers)
            path = make_file(args.make / f"{name}-{quant_type}.gguf", config, quant_type)
            print(
                f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - start:.0f} s"
            )
        return 0
    if args.smoke:
        from qcore_gguf.testing import TINY_FLUX

        with tempfile.TemporaryDirectory() as tmp:
            files = [make_file(Path(tmp) / f"flux-tiny-{t}.gguf", dict(TINY_FLUX), t) for t in args.types]
            run_all(files, "cpu", args.repeat, Path(tmp))
        return 0
    if args.run:
        out = args.out or args.run / "outputs"
        out.mkdir(exist_ok=True)
        run_all(sorted(args.run.glob("*.gguf")), args.device, args.repeat, out)
        return 0
    p.print_help()
    return 2


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
