"""Tiny Flux checkpoints in Black Forest Labs' naming, written on the fly as GGUF (city96's layout) or
safetensors,
and diffusers' own GGUF loading of them for comparison."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qcore_gguf.testing import TINY_FLUX, bfl_flux_arrays, bfl_flux_shapes, city96_type, write_bfl_flux_gguf

__all__ = [
    "TINY_FLUX",
    "bfl_flux_arrays",
    "bfl_flux_shapes",
    "city96_type",
    "write_bfl_flux_gguf",
]


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
