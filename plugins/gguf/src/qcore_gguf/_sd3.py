"""Stability AI's original SD3 / SD3.5 MMDiT naming -> diffusers' SD3Transformer2DModel.

The mapping is diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers`` expressed as row ranges; the
config comes from the shapes instead of a hub lookup keyed by a few known widths.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import qcore

from ._naming import block_indices, count_blocks, strip_prefix

# Every SD3 release uses 64-wide heads; the shapes only show the head width through the qk-norm weights.
_SD3_HEAD_DIM = 64
# The sample_size of every released SD3 config; with pos_embed_max_size set it shapes no weight.
_SD3_SAMPLE_SIZE = 128


class SD3Converter(qcore.KeyConverter):
    """SD3 names (``joint_blocks.0.x_block.attn.qkv.weight``, optionally under ``model.diffusion_model.``)
    -> ``SD3Transformer2DModel`` keys: fused qkv split into row ranges, the (shift, scale) halves of the
    last context block's and the final layer's adaLN swapped into diffusers' (scale, shift)."""

    model_class = "SD3Transformer2DModel"

    def matches(self, tensors: Mapping[str, qcore.TensorInfo]) -> bool:
        _, stripped = strip_prefix(tensors)
        return "x_embedder.proj.weight" in stripped and any(k.startswith("joint_blocks.") for k in stripped)

    def convert(self, tensors: Mapping[str, qcore.TensorInfo]) -> dict[str, list[qcore.RowRange]]:
        prefix, stripped = strip_prefix(tensors)
        out: dict[str, list[qcore.RowRange]] = {}

        def require(file_key: str) -> qcore.TensorInfo:
            info = stripped.get(file_key)
            if info is None:
                raise qcore.CheckpointError(
                    f"SD3Converter: the file has no {prefix + file_key}; it is no complete SD3 transformer"
                )
            return info

        def put(model_key: str, file_key: str) -> None:
            require(file_key)
            out[model_key] = [qcore.RowRange(prefix + file_key)]

        def linear(model_name: str, file_name: str) -> None:
            put(f"{model_name}.weight", f"{file_name}.weight")
            put(f"{model_name}.bias", f"{file_name}.bias")

        def split_qkv(file_name: str, names: tuple[str, str, str]) -> None:
            for kind in ("weight", "bias"):
                key = f"{file_name}.{kind}"
                third = require(key).shape[0] // 3
                for j, name in enumerate(names):
                    out[f"{name}.{kind}"] = [qcore.RowRange(prefix + key, j * third, (j + 1) * third)]

        def swapped(model_name: str, file_name: str) -> None:
            # The original AdaLayerNormContinuous output is (shift, scale); diffusers' is (scale, shift).
            for kind in ("weight", "bias"):
                key = f"{file_name}.{kind}"
                half = require(key).shape[0] // 2
                out[f"{model_name}.{kind}"] = [
                    qcore.RowRange(prefix + key, half, None),
                    qcore.RowRange(prefix + key, 0, half),
                ]

        put("pos_embed.pos_embed", "pos_embed")
        linear("pos_embed.proj", "x_embedder.proj")
        linear("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0")
        linear("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2")
        linear("context_embedder", "context_embedder")
        linear("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0")
        linear("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2")

        num_layers = count_blocks(stripped, "joint_blocks")
        dual = set(block_indices(stripped, "joint_blocks", "x_block.attn2."))
        has_qk_norm = any("ln_q" in key for key in stripped)
        for i in range(num_layers):
            src, dst = f"joint_blocks.{i}", f"transformer_blocks.{i}"
            last = i == num_layers - 1
            split_qkv(f"{src}.x_block.attn.qkv", (f"{dst}.attn.to_q", f"{dst}.attn.to_k", f"{dst}.attn.to_v"))
            split_qkv(
                f"{src}.context_block.attn.qkv",
                (f"{dst}.attn.add_q_proj", f"{dst}.attn.add_k_proj", f"{dst}.attn.add_v_proj"),
            )
            if has_qk_norm:
                put(f"{dst}.attn.norm_q.weight", f"{src}.x_block.attn.ln_q.weight")
                put(f"{dst}.attn.norm_k.weight", f"{src}.x_block.attn.ln_k.weight")
                put(f"{dst}.attn.norm_added_q.weight", f"{src}.context_block.attn.ln_q.weight")
                put(f"{dst}.attn.norm_added_k.weight", f"{src}.context_block.attn.ln_k.weight")
            linear(f"{dst}.attn.to_out.0", f"{src}.x_block.attn.proj")
            if not last:  # the last block's context stream only feeds attention (context_pre_only)
                linear(f"{dst}.attn.to_add_out", f"{src}.context_block.attn.proj")
            if i in dual:
                split_qkv(
                    f"{src}.x_block.attn2.qkv",
                    (f"{dst}.attn2.to_q", f"{dst}.attn2.to_k", f"{dst}.attn2.to_v"),
                )
                if has_qk_norm:
                    put(f"{dst}.attn2.norm_q.weight", f"{src}.x_block.attn2.ln_q.weight")
                    put(f"{dst}.attn2.norm_k.weight", f"{src}.x_block.attn2.ln_k.weight")
                linear(f"{dst}.attn2.to_out.0", f"{src}.x_block.attn2.proj")
            linear(f"{dst}.norm1.linear", f"{src}.x_block.adaLN_modulation.1")
            if last:
                swapped(f"{dst}.norm1_context.linear", f"{src}.context_block.adaLN_modulation.1")
            else:
                linear(f"{dst}.norm1_context.linear", f"{src}.context_block.adaLN_modulation.1")
            linear(f"{dst}.ff.net.0.proj", f"{src}.x_block.mlp.fc1")
            linear(f"{dst}.ff.net.2", f"{src}.x_block.mlp.fc2")
            if not last:
                linear(f"{dst}.ff_context.net.0.proj", f"{src}.context_block.mlp.fc1")
                linear(f"{dst}.ff_context.net.2", f"{src}.context_block.mlp.fc2")

        linear("proj_out", "final_layer.linear")
        swapped("norm_out.linear", "final_layer.adaLN_modulation.1")
        return out

    def infer_config(self, tensors: Mapping[str, qcore.TensorInfo]) -> dict[str, Any] | None:
        _, stripped = strip_prefix(tensors)
        needed = ("x_embedder.proj.weight", "context_embedder.weight", "y_embedder.mlp.0.weight", "pos_embed")
        if any(key not in stripped for key in needed) or "final_layer.linear.weight" not in stripped:
            return None
        patch = stripped["x_embedder.proj.weight"].shape  # a Conv2d: (width, in_channels, p, p)
        width, in_channels, patch_size = patch[0], patch[1], patch[-1]
        ln_q = stripped.get("joint_blocks.0.x_block.attn.ln_q.weight")
        head_dim = ln_q.shape[0] if ln_q is not None else _SD3_HEAD_DIM
        positions = stripped["pos_embed"].shape[-2]
        side = math.isqrt(positions)
        if width % head_dim or side * side != positions:
            return None
        return {
            "_class_name": "SD3Transformer2DModel",
            "sample_size": _SD3_SAMPLE_SIZE,
            "patch_size": patch_size,
            "in_channels": in_channels,
            "num_layers": count_blocks(stripped, "joint_blocks"),
            "attention_head_dim": head_dim,
            "num_attention_heads": width // head_dim,
            "joint_attention_dim": stripped["context_embedder.weight"].shape[1],
            "caption_projection_dim": stripped["context_embedder.weight"].shape[0],
            "pooled_projection_dim": stripped["y_embedder.mlp.0.weight"].shape[1],
            "out_channels": stripped["final_layer.linear.weight"].shape[0] // (patch_size * patch_size),
            "pos_embed_max_size": side,
            "dual_attention_layers": block_indices(stripped, "joint_blocks", "x_block.attn2."),
            "qk_norm": "rms_norm" if ln_q is not None else None,
        }
