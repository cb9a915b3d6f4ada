"""Tiny SD3 and Wan checkpoints in their original namings, written on the fly as GGUF (city96's layout) or
safetensors, the matching diffusers models and inputs, and diffusers' own single-file loading of them."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qcore_gguf.testing import TINY_SD3, TINY_WAN, random_arrays, sd3_shapes, wan_shapes, write_original_gguf

# SD3-medium-like: no qk-norm, no dual-attention block.
SD3_MEDIUM = {**TINY_SD3, "dual_attention_layers": [], "qk_norm": None, "num_layers": 3}
# Wan-I2V-like: an image embedder and image key/value projections in every cross-attention.
WAN_I2V = {**TINY_WAN, "image_dim": 256, "added_kv_proj_dim": 256}


@dataclass(frozen=True)
class Variant:
    name: str
    model_class: str
    config: dict[str, Any]
    shapes: Callable[[dict[str, Any]], dict[str, tuple[int, ...]]]
    diffusers_converter: str
    architecture: str

    def arrays(self, seed: int = 0) -> dict[str, Any]:
        return random_arrays(self.shapes(self.config), seed)

    def model_cls(self) -> Any:
        import diffusers

        return getattr(diffusers, self.model_class)

    def convert_with_diffusers(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        import diffusers.loaders.single_file_utils as sfu

        return getattr(sfu, self.diffusers_converter)(dict(checkpoint))

    def write_gguf(self, path: Path, quant_type: str, prefix: str = "model.diffusion_model.") -> Path:
        return write_original_gguf(
            path, self.arrays(), quant_type, prefix=prefix, architecture=self.architecture
        )

    def write_safetensors(self, path: Path) -> Path:
        import torch
        from safetensors.torch import save_file

        bf16 = {
            f"model.diffusion_model.{k}": torch.from_numpy(v).to(torch.bfloat16)
            for k, v in self.arrays().items()
        }
        save_file(bf16, str(path))
        return path

    def write_config_dir(self, path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(self.config))
        return path

    def inputs(self, dtype: Any = None, seed: int = 1) -> dict[str, Any]:
        import torch

        g = torch.Generator().manual_seed(seed)
        dtype = dtype or torch.bfloat16
        c = self.config
        if self.model_class == "SD3Transformer2DModel":
            return {
                "hidden_states": torch.randn(1, c["in_channels"], 8, 8, generator=g).to(dtype),
                "encoder_hidden_states": torch.randn(1, 8, c["joint_attention_dim"], generator=g).to(dtype),
                "pooled_projections": torch.randn(1, c["pooled_projection_dim"], generator=g).to(dtype),
                "timestep": torch.tensor([500.0], dtype=dtype),
                "return_dict": False,
            }
        inputs = {
            "hidden_states": torch.randn(1, c["in_channels"], 2, 8, 8, generator=g).to(dtype),
            "timestep": torch.tensor([500.0], dtype=dtype),
            "encoder_hidden_states": torch.randn(1, 8, c["text_dim"], generator=g).to(dtype),
            "return_dict": False,
        }
        if c["image_dim"]:
            inputs["encoder_hidden_states_image"] = torch.randn(1, 4, c["image_dim"], generator=g).to(dtype)
        return inputs

    def from_single_file(self, path: Path, config_dir: Path, compute_dtype: Any, gguf: bool) -> Any:
        """diffusers' own ``from_single_file`` (its converter as installed, the given config)."""
        from diffusers import GGUFQuantizationConfig

        extra = {"quantization_config": GGUFQuantizationConfig(compute_dtype=compute_dtype)} if gguf else {}
        return self.model_cls().from_single_file(
            str(path), config=str(config_dir), torch_dtype=compute_dtype, local_files_only=True, **extra
        )


VARIANTS = {
    "sd35": Variant(
        "sd35",
        "SD3Transformer2DModel",
        TINY_SD3,
        sd3_shapes,
        "convert_sd3_transformer_checkpoint_to_diffusers",
        "sd3",
    ),
    "sd3": Variant(
        "sd3",
        "SD3Transformer2DModel",
        SD3_MEDIUM,
        sd3_shapes,
        "convert_sd3_transformer_checkpoint_to_diffusers",
        "sd3",
    ),
    "wan-t2v": Variant(
        "wan-t2v",
        "WanTransformer3DModel",
        TINY_WAN,
        wan_shapes,
        "convert_wan_transformer_to_diffusers",
        "wan",
    ),
    "wan-i2v": Variant(
        "wan-i2v", "WanTransformer3DModel", WAN_I2V, wan_shapes, "convert_wan_transformer_to_diffusers", "wan"
    ),
}
