"""Wan-AI's original Wan 2.1 / 2.2 naming -> diffusers' WanTransformer3DModel (text- and image-to-video).

The mapping is diffusers' ``convert_wan_transformer_to_diffusers``: one ordered list of substring renames,
applied to every key in turn (so ``norm2`` and ``norm3`` trade places through a placeholder). Every
tensor maps whole; the config comes from the shapes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import qcore

from ._naming import count_blocks, strip_prefix

# The order matters: each rename sees the result of the ones before it, as in diffusers.
_RENAMES = (
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("cross_attn", "attn2"),
    ("self_attn", "attn1"),
    (".o.", ".to_out.0."),
    (".q.", ".to_q."),
    (".k.", ".to_k."),
    (".v.", ".to_v."),
    (".k_img.", ".add_k_proj."),
    (".v_img.", ".add_v_proj."),
    (".norm_k_img.", ".norm_added_k."),
    ("head.modulation", "scale_shift_table"),
    ("head.head", "proj_out"),
    ("modulation", "scale_shift_table"),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
    ("norm2", "norm__placeholder"),
    ("norm3", "norm2"),
    ("norm__placeholder", "norm3"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    # First-last-frame models: diffusers' converter leaves this key unmapped; this is its model name.
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
)
# Every Wan 2.x release uses 128-wide heads; its qk-norm spans all heads, so the shapes do not show them.
_WAN_HEAD_DIM = 128
_WAN_ROPE_MAX_SEQ_LEN = 1024
_WAN_EPS = 1e-6


def wan_model_key(file_key: str) -> str:
    """The WanTransformer3DModel key of an original Wan key (``model.diffusion_model.`` prefix removed)."""
    for old, new in _RENAMES:
        file_key = file_key.replace(old, new)
    return file_key


class WanConverter(qcore.KeyConverter):
    """Wan names (``blocks.0.self_attn.q.weight``, ``head.modulation``, optionally under
    ``model.diffusion_model.``) -> ``WanTransformer3DModel`` keys. VACE and Animate checkpoints are other
    model classes and are not matched."""

    model_class = "WanTransformer3DModel"

    def matches(self, tensors: Mapping[str, qcore.TensorInfo]) -> bool:
        _, stripped = strip_prefix(tensors)
        other_class = any(
            k.startswith(("vace_blocks.", "motion_encoder.", "face_adapter.")) for k in stripped
        )
        return "head.modulation" in stripped and "patch_embedding.weight" in stripped and not other_class

    def convert(self, tensors: Mapping[str, qcore.TensorInfo]) -> dict[str, list[qcore.RowRange]]:
        prefix, stripped = strip_prefix(tensors)
        out: dict[str, list[qcore.RowRange]] = {}
        for key in stripped:
            model_key = wan_model_key(key)
            if model_key in out:
                raise qcore.CheckpointError(
                    f"WanConverter: {prefix + key} and {out[model_key][0].key} both name {model_key}"
                )
            out[model_key] = [qcore.RowRange(prefix + key)]
        return out

    def infer_config(self, tensors: Mapping[str, qcore.TensorInfo]) -> dict[str, Any] | None:
        _, stripped = strip_prefix(tensors)
        needed = (
            "text_embedding.0.weight",
            "time_embedding.0.weight",
            "blocks.0.ffn.0.weight",
            "head.head.weight",
        )
        patch = stripped.get("patch_embedding.weight")  # a Conv3d: (width, in_channels, pt, ph, pw)
        if patch is None or len(patch.shape) != 5 or any(key not in stripped for key in needed):
            return None
        width, in_channels, patch_size = patch.shape[0], patch.shape[1], list(patch.shape[2:])
        if width % _WAN_HEAD_DIM:
            return None
        image = stripped.get("img_emb.proj.0.weight")
        k_img = stripped.get("blocks.0.cross_attn.k_img.weight")
        emb_pos = stripped.get("img_emb.emb_pos")
        return {
            "_class_name": "WanTransformer3DModel",
            "patch_size": patch_size,
            "num_attention_heads": width // _WAN_HEAD_DIM,
            "attention_head_dim": _WAN_HEAD_DIM,
            "in_channels": in_channels,
            "out_channels": stripped["head.head.weight"].shape[0] // math.prod(patch_size),
            "text_dim": stripped["text_embedding.0.weight"].shape[1],
            "freq_dim": stripped["time_embedding.0.weight"].shape[1],
            "ffn_dim": stripped["blocks.0.ffn.0.weight"].shape[0],
            "num_layers": count_blocks(stripped, "blocks"),
            "cross_attn_norm": "blocks.0.norm3.weight" in stripped,
            "qk_norm": "rms_norm_across_heads" if "blocks.0.self_attn.norm_q.weight" in stripped else None,
            "eps": _WAN_EPS,
            "image_dim": image.shape[0] if image is not None else None,
            "added_kv_proj_dim": k_img.shape[1] if k_img is not None else None,
            "rope_max_seq_len": _WAN_ROPE_MAX_SEQ_LEN,
            "pos_embed_seq_len": emb_pos.shape[-2] if emb_pos is not None else None,
        }
