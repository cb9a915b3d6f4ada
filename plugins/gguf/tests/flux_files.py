"""Tiny Flux checkpoints in Black Forest Labs' naming, written on the fly as GGUF (city96's layout) or
safetensors,
and diffusers' own GGUF loading of them for comparison."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from qcore_gguf import GGML_TYPES
from qcore_gguf.testing import write_gguf

TINY_FLUX = {
    "_class_name": "FluxTransformer2DModel",
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 128,
    "num_attention_heads": 2,
    "joint_attention_dim": 256,
    "pooled_projection_dim": 256,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}


def bfl_flux_shapes(config: dict[str, Any] = TINY_FLUX) -> dict[str, tuple[int, ...]]:
    """BFL tensor names and shapes of a Flux transformer with this diffusers config."""
    h = config["num_attention_heads"] * config["attention_head_dim"]
    m, d, c = 4 * h, config["attention_head_dim"], config["in_channels"]
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out: int, inp: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, inp), (out,)

    linear("img_in", h, c)
    linear("txt_in", h, config["joint_attention_dim"])
    for name, inp in (("time_in", 256), ("vector_in", config["pooled_projection_dim"]), ("guidance_in", 256)):
        if name != "guidance_in" or config["guidance_embeds"]:
            linear(f"{name}.in_layer", h, inp)
            linear(f"{name}.out_layer", h, h)
    for i in range(config["num_layers"]):
        for s in ("img", "txt"):
            b = f"double_blocks.{i}.{s}"
            linear(f"{b}_mod.lin", 6 * h, h)
            linear(f"{b}_attn.qkv", 3 * h, h)
            linear(f"{b}_attn.proj", h, h)
            shapes[f"{b}_attn.norm.query_norm.scale"] = (d,)
            shapes[f"{b}_attn.norm.key_norm.scale"] = (d,)
            linear(f"{b}_mlp.0", m, h)
            linear(f"{b}_mlp.2", h, m)
    for i in range(config["num_single_layers"]):
        b = f"single_blocks.{i}"
        linear(f"{b}.modulation.lin", 3 * h, h)
        linear(f"{b}.linear1", 3 * h + m, h)
        linear(f"{b}.linear2", h, h + m)
        shapes[f"{b}.norm.query_norm.scale"] = (d,)
        shapes[f"{b}.norm.key_norm.scale"] = (d,)
    linear("final_layer.linear", config.get("out_channels") or c, h)
    linear("final_layer.adaLN_modulation.1", 2 * h, h)
    return shapes


def bfl_flux_arrays(config: dict[str, Any] = TINY_FLUX, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape in bfl_flux_shapes(config).items():
        if name.endswith(".scale"):
            arrays[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            fan_in = shape[-1] if len(shape) == 2 else 64
            arrays[name] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    return arrays


def city96_type(quant_type: str) -> Callable[[str, tuple[int, ...]], str]:
    """city96's choice per tensor: 1-D tensors in F32, weights whose rows are not whole blocks in F16."""

    def choose(name: str, shape: tuple[int, ...]) -> str:
        if len(shape) == 1:
            return "F32"
        return quant_type if shape[-1] % GGML_TYPES[quant_type][1] == 0 else "F16"

    return choose


def write_bfl_flux_gguf(
    path: Path,
    quant_type: str | Callable[[str, tuple[int, ...]], str],
    *,
    prefix: str = "model.diffusion_model.",
    config: dict[str, Any] = TINY_FLUX,
    seed: int = 0,
) -> Path:
    choose = city96_type(quant_type) if isinstance(quant_type, str) else quant_type
    arrays = bfl_flux_arrays(config, seed)
    tensors = {prefix + name: (array, choose(name, array.shape)) for name, array in arrays.items()}
    write_gguf(path, tensors, architecture="flux")
    return path


def write_bfl_flux_safetensors(path: Path, *, config: dict[str, Any] = TINY_FLUX, seed: int = 0) -> Path:
    import torch
    from safetensors.torch import save_file

    save_file(
        {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in bfl_flux_arrays(config, seed).items()},
        str(path),
    )
    return path


def write_config_dir(path: Path, config: dict[str, Any] = TINY_FLUX) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def diffusers_flux_converter() -> Callable[..., dict[str, Any]]:
    """diffusers' own BFL -> diffusers Flux converter, its one hard-coded width (3072) read from the file.

    Everything else is diffusers' code as installed: the test compares against what diffusers does.
    """
    import diffusers.loaders.single_file_utils as sfu

    source = inspect.getsource(sfu.convert_flux_transformer_checkpoint_to_diffusers)
    assert source.count("inner_dim = 3072") == 1, "diffusers' Flux converter changed; update this helper"
    source = source.replace("inner_dim = 3072", "inner_dim = checkpoint['img_in.weight'].shape[0]")
    namespace = dict(vars(sfu))
    exec(compile(source, sfu.__file__, "exec"), namespace)  # noqa: S102 - diffusers' own source
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"]


def diffusers_flux_from_single_file(
    path: Path, config_dir: Path, compute_dtype: Any, monkeypatch: Any
) -> Any:
    """diffusers' FluxTransformer2DModel.from_single_file of a GGUF file."""
    import diffusers.loaders.single_file_model as sfm
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

    entry = dict(sfm.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"])
    entry["checkpoint_mapping_fn"] = diffusers_flux_converter()
    monkeypatch.setitem(sfm.SINGLE_FILE_LOADABLE_CLASSES, "FluxTransformer2DModel", entry)
    return FluxTransformer2DModel.from_single_file(
        str(path),
        config=str(config_dir),
        quantization_config=GGUFQuantizationConfig(compute_dtype=compute_dtype),
        torch_dtype=compute_dtype,
        local_files_only=True,
    )


def flux_inputs(config: dict[str, Any] = TINY_FLUX, dtype: Any = None, seed: int = 1) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    dtype = dtype or torch.bfloat16
    img, txt = 16, 8
    return {
        "hidden_states": torch.randn(1, img, config["in_channels"], generator=g).to(dtype),
        "encoder_hidden_states": torch.randn(1, txt, config["joint_attention_dim"], generator=g).to(dtype),
        "pooled_projections": torch.randn(1, config["pooled_projection_dim"], generator=g).to(dtype),
        "timestep": torch.tensor([0.5], dtype=dtype),
        "guidance": torch.tensor([3.5], dtype=dtype) if config["guidance_embeds"] else None,
        "img_ids": torch.zeros(img, 3, dtype=dtype),
        "txt_ids": torch.zeros(txt, 3, dtype=dtype),
        "return_dict": False,
    }
