"""Black Forest Labs' original Flux naming (as in city96's GGUF files) -> diffusers' FluxTransformer2DModel.

The mapping is diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` expressed as row ranges,
with every width read from the tensor shapes instead of assuming Flux-dev's 3072.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import qcore

from ._naming import count_blocks, strip_prefix

_FLUX_ROPE_AXES = {128: (16, 56, 56)}


class FluxConverter(qcore.KeyConverter):
    """BFL Flux names (``double_blocks.0.img_attn.qkv.weight``, optionally under ``model.diffusion_model.``)
    -> ``FluxTransformer2DModel`` keys: fused qkv and ``linear1`` split into row ranges, the final adaLN
    shift/scale halves swapped."""

    model_class = "FluxTransformer2DModel"

    def matches(self, tensors: Mapping[str, qcore.TensorInfo]) -> bool:
        _, stripped = strip_prefix(tensors)
        return "img_in.weight" in stripped and any(k.startswith("double_blocks.") for k in stripped)

    def _width(self, stripped: Mapping[str, qcore.TensorInfo], where: str) -> int:
        info = stripped.get("img_in.weight")
        if info is None:
            raise qcore.CheckpointError(f"{where}: no img_in.weight; this is not a BFL-named Flux file")
        return info.shape[0]

    def convert(self, tensors: Mapping[str, qcore.TensorInfo]) -> dict[str, list[qcore.RowRange]]:
        prefix, stripped = strip_prefix(tensors)
        width = self._width(stripped, "FluxConverter")
        out: dict[str, list[qcore.RowRange]] = {}

        def put(model_key: str, file_key: str, start: int = 0, stop: int | None = None) -> None:
            out[model_key] = [qcore.RowRange(prefix + file_key, start, stop)]

        def linear(model_name: str, file_name: str) -> None:
            for kind in ("weight", "bias"):
                if f"{file_name}.{kind}" in stripped:
                    put(f"{model_name}.{kind}", f"{file_name}.{kind}")

        for model_name, file_name in (
            ("time_text_embed.timestep_embedder", "time_in"),
            ("time_text_embed.text_embedder", "vector_in"),
            ("time_text_embed.guidance_embedder", "guidance_in"),
        ):
            if f"{file_name}.in_layer.weight" in stripped:
                linear(f"{model_name}.linear_1", f"{file_name}.in_layer")
                linear(f"{model_name}.linear_2", f"{file_name}.out_layer")
        linear("context_embedder", "txt_in")
        linear("x_embedder", "img_in")

        for i in range(count_blocks(stripped, "double_blocks")):
            src, dst = f"double_blocks.{i}", f"transformer_blocks.{i}"
            linear(f"{dst}.norm1.linear", f"{src}.img_mod.lin")
            linear(f"{dst}.norm1_context.linear", f"{src}.txt_mod.lin")
            for stream, names in (
                ("img", ("to_q", "to_k", "to_v")),
                ("txt", ("add_q_proj", "add_k_proj", "add_v_proj")),
            ):
                for j, name in enumerate(names):
                    for kind in ("weight", "bias"):
                        put(
                            f"{dst}.attn.{name}.{kind}",
                            f"{src}.{stream}_attn.qkv.{kind}",
                            j * width,
                            (j + 1) * width,
                        )
            put(f"{dst}.attn.norm_q.weight", f"{src}.img_attn.norm.query_norm.scale")
            put(f"{dst}.attn.norm_k.weight", f"{src}.img_attn.norm.key_norm.scale")
            put(f"{dst}.attn.norm_added_q.weight", f"{src}.txt_attn.norm.query_norm.scale")
            put(f"{dst}.attn.norm_added_k.weight", f"{src}.txt_attn.norm.key_norm.scale")
            linear(f"{dst}.ff.net.0.proj", f"{src}.img_mlp.0")
            linear(f"{dst}.ff.net.2", f"{src}.img_mlp.2")
            linear(f"{dst}.ff_context.net.0.proj", f"{src}.txt_mlp.0")
            linear(f"{dst}.ff_context.net.2", f"{src}.txt_mlp.2")
            linear(f"{dst}.attn.to_out.0", f"{src}.img_attn.proj")
            linear(f"{dst}.attn.to_add_out", f"{src}.txt_attn.proj")

        for i in range(count_blocks(stripped, "single_blocks")):
            src, dst = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
            linear(f"{dst}.norm.linear", f"{src}.modulation.lin")
            for kind in ("weight", "bias"):
                key = f"{src}.linear1.{kind}"
                if key not in stripped:
                    raise qcore.CheckpointError(f"FluxConverter: the file has no {prefix + key}")
                for j, name in enumerate(("to_q", "to_k", "to_v")):
                    put(f"{dst}.attn.{name}.{kind}", key, j * width, (j + 1) * width)
                put(f"{dst}.proj_mlp.{kind}", key, 3 * width, None)
            put(f"{dst}.attn.norm_q.weight", f"{src}.norm.query_norm.scale")
            put(f"{dst}.attn.norm_k.weight", f"{src}.norm.key_norm.scale")
            linear(f"{dst}.proj_out", f"{src}.linear2")

        linear("proj_out", "final_layer.linear")
        for kind in ("weight", "bias"):
            key = prefix + f"final_layer.adaLN_modulation.1.{kind}"
            # BFL's AdaLayerNorm output is (shift, scale); diffusers' is (scale, shift).
            out[f"norm_out.linear.{kind}"] = [
                qcore.RowRange(key, width, 2 * width),
                qcore.RowRange(key, 0, width),
            ]
        return out

    def infer_config(self, tensors: Mapping[str, qcore.TensorInfo]) -> dict[str, Any] | None:
        _, stripped = strip_prefix(tensors)
        width = self._width(stripped, "FluxConverter")
        norm = stripped.get("double_blocks.0.img_attn.norm.query_norm.scale") or stripped.get(
            "single_blocks.0.norm.query_norm.scale"
        )
        if norm is None or width % norm.shape[0]:
            return None
        head_dim = norm.shape[0]
        axes = _FLUX_ROPE_AXES.get(head_dim)
        mlp = stripped.get("double_blocks.0.img_mlp.0.weight")
        if axes is None or (mlp is not None and mlp.shape[0] != 4 * width):
            return None  # RoPE axes (or an MLP ratio) that diffusers' Flux cannot take from shapes alone
        in_channels = stripped["img_in.weight"].shape[1]
        final = stripped.get("final_layer.linear.weight")
        out_channels = final.shape[0] if final is not None else in_channels
        return {
            "_class_name": "FluxTransformer2DModel",
            "patch_size": 1,
            "in_channels": in_channels,
            "out_channels": None if out_channels == in_channels else out_channels,
            "num_layers": count_blocks(stripped, "double_blocks"),
            "num_single_layers": count_blocks(stripped, "single_blocks"),
            "attention_head_dim": head_dim,
            "num_attention_heads": width // head_dim,
            "joint_attention_dim": stripped["txt_in.weight"].shape[1],
            "pooled_projection_dim": stripped["vector_in.in_layer.weight"].shape[1],
            "guidance_embeds": "guidance_in.in_layer.weight" in stripped,
            "axes_dims_rope": list(axes),
        }
