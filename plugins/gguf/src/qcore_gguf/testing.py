"""Writing small GGUF files for tests and examples: a K-quant encoder and a file writer.

gguf's own ``gguf.quants.quantize`` encodes F32, F16, BF16 and the 32-element types (Q8_0, Q4_0, Q4_1, Q5_0,
Q5_1) but not the K-quants; :func:`quantize` adds Q2_K, Q3_K, Q4_K, Q5_K and Q6_K with a plain min/max
search (not llama.cpp's error-minimising one, so files are valid but not as accurate). Its output decodes
with ``gguf.quants.dequantize``, which is how the tests check it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ._dequant import GGML_TYPES

QK_K = 256


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros(np.broadcast_shapes(a.shape, b.shape), np.float32), where=b != 0)


def _shift_or(parts: np.ndarray, axis: int, step: int) -> np.ndarray:
    """OR together ``parts`` along ``axis``, part k shifted left by ``k * step`` bits."""
    out = np.zeros(np.delete(parts.shape, axis), dtype=np.uint8)
    for k in range(parts.shape[axis]):
        out |= (np.take(parts, k, axis=axis).astype(np.uint8) << (k * step)).astype(np.uint8)
    return out


def _affine(x: np.ndarray, nmax: int, scale_max: int) -> tuple[np.ndarray, ...]:
    """x (n, sub, len) ~= d*sc*q - dmin*m with q in [0, nmax], sc and m in [0, scale_max]."""
    lo = np.minimum(x.min(axis=2), 0)
    scale = (x.max(axis=2) - lo) / nmax
    d = _f16(scale.max(axis=1, keepdims=True) / scale_max)
    dmin = _f16((-lo).max(axis=1, keepdims=True) / scale_max)
    sc = np.clip(np.rint(_safe_div(scale, d.astype(np.float32))), 0, scale_max).astype(np.uint8)
    m = np.clip(np.rint(_safe_div(-lo, dmin.astype(np.float32))), 0, scale_max).astype(np.uint8)
    step = (d.astype(np.float32) * sc)[..., None]
    offset = (dmin.astype(np.float32) * m)[..., None]
    q = np.clip(np.rint(_safe_div(x + offset, step)), 0, nmax).astype(np.uint8)
    return d, dmin, sc, m, q


def _symmetric(x: np.ndarray, qmax: int, scale_max: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (n, sub, len) ~= d*sc*q with q in [-qmax-1, qmax] and signed sc in [-scale_max-1, scale_max]."""
    scale = np.abs(x).max(axis=2) / qmax
    d = _f16(scale.max(axis=1, keepdims=True) / scale_max)
    sc = np.clip(np.rint(_safe_div(scale, d.astype(np.float32))), -scale_max - 1, scale_max).astype(np.int8)
    step = (d.astype(np.float32) * sc)[..., None]
    q = np.clip(np.rint(_safe_div(x, step)), -qmax - 1, qmax).astype(np.int8)
    return d, sc, q


def _k4_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Pack eight 6-bit scales and mins into 12 bytes (ggml's get_scale_min_k4 layout)."""
    low = (sc[:, :4] | ((sc[:, 4:] >> 4) << 6)).astype(np.uint8)
    mid = (m[:, :4] | ((m[:, 4:] >> 4) << 6)).astype(np.uint8)
    high = ((sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)).astype(np.uint8)
    return np.concatenate([low, mid, high], axis=1)


def _bytes(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8).reshape(a.shape[0], -1)


def _q2_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    d, dmin, sc, m, q = _affine(x.reshape(n, 16, 16), 3, 15)
    qs = _shift_or(q.reshape(n, 2, 4, 32), axis=2, step=2).reshape(n, 64)
    return np.concatenate([sc | (m << 4), qs, _bytes(d), _bytes(dmin)], axis=1)


def _q3_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    d, sc, q = _symmetric(x.reshape(n, 16, 16), 3, 31)
    u = (q.astype(np.int16) + 4).astype(np.uint8).reshape(n, 256)
    hmask = _shift_or((u >> 2).reshape(n, 8, 32), axis=1, step=1)
    qs = _shift_or((u & 3).reshape(n, 2, 4, 32), axis=2, step=2).reshape(n, 64)
    s = (sc.astype(np.int16) + 32).astype(np.uint8)
    low = (s[:, :8] & 0xF) | ((s[:, 8:] & 0xF) << 4)
    high = _shift_or((s >> 4).reshape(n, 4, 4), axis=1, step=2)
    return np.concatenate([hmask, qs, low, high, _bytes(d)], axis=1)


def _q45_k(x: np.ndarray, bits: int) -> np.ndarray:
    n = x.shape[0]
    d, dmin, sc, m, q = _affine(x.reshape(n, 8, 32), (1 << bits) - 1, 63)
    qs = _shift_or((q & 0xF).reshape(n, 4, 2, 32), axis=2, step=4).reshape(n, 128)
    parts = [_bytes(d), _bytes(dmin), _k4_scales(sc, m)]
    if bits == 5:
        parts.append(_shift_or((q >> 4).reshape(n, 8, 32), axis=1, step=1))
    return np.concatenate([*parts, qs], axis=1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    d, sc, q = _symmetric(x.reshape(n, 16, 16), 31, 127)
    u = (q.astype(np.int16) + 32).astype(np.uint8).reshape(n, 256)
    ql = _shift_or((u & 0xF).reshape(n, 2, 2, 64), axis=2, step=4).reshape(n, 128)
    qh = _shift_or((u >> 4).reshape(n, 2, 4, 32), axis=2, step=2).reshape(n, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), _bytes(d)], axis=1)


_K_ENCODERS = {
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": lambda x: _q45_k(x, 4),
    "Q5_K": lambda x: _q45_k(x, 5),
    "Q6_K": _q6_k,
}


def quantize(array: np.ndarray, quant_type: str) -> np.ndarray:
    """Encode a float array as ``quant_type``: uint8 blocks of shape ``(*rows, bytes per row)``.

    F32 and F16 return the array in that dtype. The last dimension must be a multiple of the type's block
    size (32, or 256 for the K-quants).
    """
    import gguf

    if quant_type not in GGML_TYPES:
        raise ValueError(f"unknown GGML type {quant_type!r}; known: {', '.join(GGML_TYPES)}")
    array = np.asarray(array, dtype=np.float32)
    if quant_type not in _K_ENCODERS:
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType[quant_type])
    if array.shape[-1] % QK_K:
        raise ValueError(f"{quant_type} needs a last dimension divisible by {QK_K}, not {array.shape}")
    blocks = _K_ENCODERS[quant_type](array.reshape(-1, QK_K))
    return blocks.reshape(*array.shape[:-1], -1)


def write_gguf(
    path: str | os.PathLike[str],
    tensors: Mapping[str, tuple[np.ndarray, str]],
    *,
    architecture: str = "flux",
    metadata: Mapping[str, object] | None = None,
) -> None:
    """Write ``{name: (float array, GGML type name)}`` as a GGUF file, encoded by :func:`quantize`.

    ``metadata`` values are written as GGUF key/values (str, int, float, bool or a list of ints).
    """
    import gguf

    writer = gguf.GGUFWriter(os.fspath(path), architecture)
    for key, value in (metadata or {}).items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, list(value))  # type: ignore[call-overload]
    for name, (array, quant_type) in tensors.items():
        encoded = quantize(array, quant_type)
        raw_dtype = None if quant_type in ("F32", "F16") else gguf.GGMLQuantizationType[quant_type]
        writer.add_tensor(name, encoded, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# --- tiny Flux files in Black Forest Labs' naming (city96's GGUF layout) -------------------------

# A diffusers FluxTransformer2DModel config small enough for CPU tests; every width a multiple of 256.
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


def write_checkpoint_as_gguf(checkpoint: str | os.PathLike[str], quant_type: str = "Q8_0") -> Path:
    """The GGUF quantization of a safetensors checkpoint directory, written once beside it.

    Matrices whose rows are whole 32-element blocks are encoded as ``quant_type``, everything else as
    F32; the keys stay the checkpoint's. Serves the conformance kit's quantize-on-load loads, which a
    GGUF backend cannot do itself (``config=`` the directory gives the model's config).
    """
    from safetensors.torch import load_file

    checkpoint = Path(checkpoint)
    path = checkpoint.parent / f"{checkpoint.name}-{quant_type}.gguf"
    if not path.exists():
        tensors = {}
        for file in sorted(checkpoint.glob("*.safetensors")):
            for key, value in load_file(file).items():
                quantize = value.dim() == 2 and value.shape[-1] % 32 == 0
                tensors[key] = (value.float().numpy(), quant_type if quantize else "F32")
        write_gguf(path, tensors, architecture="qcore")
    return path


def bfl_flux_shapes(config: Mapping[str, Any] = TINY_FLUX) -> dict[str, tuple[int, ...]]:
    """Black Forest Labs' tensor names and shapes of a Flux transformer with this diffusers config."""
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


def _is_norm_weight(name: str, shape: tuple[int, ...]) -> bool:
    last = name.rsplit(".", 2)[-2:]
    return name.endswith(".scale") or (
        len(shape) == 1 and last[-1] == "weight" and ("norm" in last[0] or last[0].startswith("ln_"))
    )


def random_arrays(shapes: Mapping[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights for these shapes: norm weights near 1, the rest scaled by 1/sqrt(fan-in)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape in shapes.items():
        if _is_norm_weight(name, shape):
            arrays[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            fan_in = shape[-1] if len(shape) == 2 else 64
            arrays[name] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    return arrays


def bfl_flux_arrays(config: Mapping[str, Any] = TINY_FLUX, seed: int = 0) -> dict[str, np.ndarray]:
    return random_arrays(bfl_flux_shapes(config), seed)


def city96_type(quant_type: str) -> Callable[[str, tuple[int, ...]], str]:
    """city96's choice per tensor: 1-D tensors and tables (``pos_embed``, ``modulation``) in F32, conv
    kernels and weights whose rows are not whole blocks in F16."""

    def choose(name: str, shape: tuple[int, ...]) -> str:
        if len(shape) == 1 or (len(shape) > 2 and not name.endswith(".weight")):
            return "F32"
        if len(shape) > 2:
            return "F16"
        return quant_type if shape[-1] % GGML_TYPES[quant_type][1] == 0 else "F16"

    return choose


def write_bfl_flux_gguf(
    path: Path,
    quant_type: str | Callable[[str, tuple[int, ...]], str],
    *,
    prefix: str = "model.diffusion_model.",
    config: Mapping[str, Any] = TINY_FLUX,
    seed: int = 0,
) -> Path:
    choose = city96_type(quant_type) if isinstance(quant_type, str) else quant_type
    arrays = bfl_flux_arrays(config, seed)
    tensors = {prefix + name: (array, choose(name, array.shape)) for name, array in arrays.items()}
    write_gguf(path, tensors, architecture="flux")
    return path


def write_original_gguf(
    path: Path,
    arrays: Mapping[str, np.ndarray],
    quant_type: str | Callable[[str, tuple[int, ...]], str],
    *,
    prefix: str = "model.diffusion_model.",
    architecture: str,
) -> Path:
    """Write arrays in a model's original naming as city96 does (``quant_type`` chosen per tensor by
    :func:`city96_type` when given as a type name)."""
    choose = city96_type(quant_type) if isinstance(quant_type, str) else quant_type
    tensors = {prefix + name: (array, choose(name, array.shape)) for name, array in arrays.items()}
    write_gguf(path, tensors, architecture=architecture)
    return path


# --- tiny SD3 / SD3.5 files in Stability AI's original MMDiT naming ------------------------------

# An SD3.5-medium-like SD3Transformer2DModel config (qk-norm, a dual-attention block), CPU-sized.
TINY_SD3 = {
    "_class_name": "SD3Transformer2DModel",
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 64,
    "num_attention_heads": 4,
    "joint_attention_dim": 256,
    "caption_projection_dim": 256,
    "pooled_projection_dim": 256,
    "out_channels": 16,
    "pos_embed_max_size": 16,
    "dual_attention_layers": [0],
    "qk_norm": "rms_norm",
}


def sd3_shapes(config: Mapping[str, Any] = TINY_SD3) -> dict[str, tuple[int, ...]]:
    """Original SD3 tensor names and shapes of an SD3Transformer2DModel with this diffusers config."""
    h = config["num_attention_heads"] * config["attention_head_dim"]
    p, d, layers = config["patch_size"], config["attention_head_dim"], config["num_layers"]
    shapes: dict[str, tuple[int, ...]] = {"pos_embed": (1, config["pos_embed_max_size"] ** 2, h)}

    def linear(name: str, out: int, inp: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, inp), (out,)

    shapes["x_embedder.proj.weight"] = (h, config["in_channels"], p, p)
    shapes["x_embedder.proj.bias"] = (h,)
    linear("t_embedder.mlp.0", h, 256)
    linear("t_embedder.mlp.2", h, h)
    linear("y_embedder.mlp.0", h, config["pooled_projection_dim"])
    linear("y_embedder.mlp.2", h, h)
    linear("context_embedder", config["caption_projection_dim"], config["joint_attention_dim"])
    for i in range(layers):
        last, dual = i == layers - 1, i in config["dual_attention_layers"]
        for stream in ("x_block", "context_block"):
            b = f"joint_blocks.{i}.{stream}"
            pre_only = last and stream == "context_block"
            chunks = 2 if pre_only else 9 if dual and stream == "x_block" else 6
            linear(f"{b}.adaLN_modulation.1", chunks * h, h)
            attentions = ("attn", "attn2") if dual and stream == "x_block" else ("attn",)
            for attn in attentions:
                linear(f"{b}.{attn}.qkv", 3 * h, h)
                if config["qk_norm"]:
                    shapes[f"{b}.{attn}.ln_q.weight"] = shapes[f"{b}.{attn}.ln_k.weight"] = (d,)
                if not pre_only:
                    linear(f"{b}.{attn}.proj", h, h)
            if not pre_only:
                linear(f"{b}.mlp.fc1", 4 * h, h)
                linear(f"{b}.mlp.fc2", h, 4 * h)
    linear("final_layer.linear", p * p * config["out_channels"], h)
    linear("final_layer.adaLN_modulation.1", 2 * h, h)
    return shapes


# --- tiny Wan 2.x files in Wan-AI's original naming ----------------------------------------------

# A Wan2.1-T2V-like WanTransformer3DModel config, CPU-sized; image_dim/added_kv_proj_dim make it I2V.
TINY_WAN = {
    "_class_name": "WanTransformer3DModel",
    "patch_size": [1, 2, 2],
    "num_attention_heads": 2,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 256,
    "freq_dim": 256,
    "ffn_dim": 512,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-06,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
    "pos_embed_seq_len": None,
}


def wan_shapes(config: Mapping[str, Any] = TINY_WAN) -> dict[str, tuple[int, ...]]:
    """Original Wan tensor names and shapes of a WanTransformer3DModel with this diffusers config."""
    h = config["num_attention_heads"] * config["attention_head_dim"]
    patch = tuple(config["patch_size"])
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out: int, inp: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, inp), (out,)

    shapes["patch_embedding.weight"] = (h, config["in_channels"], *patch)
    shapes["patch_embedding.bias"] = (h,)
    linear("text_embedding.0", h, config["text_dim"])
    linear("text_embedding.2", h, h)
    linear("time_embedding.0", h, config["freq_dim"])
    linear("time_embedding.2", h, h)
    linear("time_projection.1", 6 * h, h)
    for i in range(config["num_layers"]):
        b = f"blocks.{i}"
        shapes[f"{b}.modulation"] = (1, 6, h)
        for attn in ("self_attn", "cross_attn"):
            for name in ("q", "k", "v", "o"):
                linear(f"{b}.{attn}.{name}", h, h)
            if config["qk_norm"]:
                shapes[f"{b}.{attn}.norm_q.weight"] = shapes[f"{b}.{attn}.norm_k.weight"] = (h,)
        if config["added_kv_proj_dim"]:
            linear(f"{b}.cross_attn.k_img", h, config["added_kv_proj_dim"])
            linear(f"{b}.cross_attn.v_img", h, config["added_kv_proj_dim"])
            shapes[f"{b}.cross_attn.norm_k_img.weight"] = (h,)
        if config["cross_attn_norm"]:
            shapes[f"{b}.norm3.weight"] = shapes[f"{b}.norm3.bias"] = (h,)
        linear(f"{b}.ffn.0", config["ffn_dim"], h)
        linear(f"{b}.ffn.2", h, config["ffn_dim"])
    if config["image_dim"]:
        image = config["image_dim"]
        shapes["img_emb.proj.0.weight"] = shapes["img_emb.proj.0.bias"] = (image,)
        linear("img_emb.proj.1", image, image)
        linear("img_emb.proj.3", h, image)
        shapes["img_emb.proj.4.weight"] = shapes["img_emb.proj.4.bias"] = (h,)
        if config["pos_embed_seq_len"]:  # first-last-frame models
            shapes["img_emb.emb_pos"] = (1, config["pos_embed_seq_len"], image)
    linear("head.head", config["out_channels"] * int(np.prod(patch)), h)
    shapes["head.modulation"] = (1, 2, h)
    return shapes
