"""Dequantization of GGML blocks in torch, one function per type.

The arithmetic follows city96's ComfyUI-GGUF port, as diffusers ships it: scales are read as float16 and,
unless ``dtype`` says otherwise, every product is computed in float16, so a layer's dequantized weight is
bit-identical to the one diffusers' ``from_single_file`` computes. ``dtype=torch.float32`` computes in
float32 instead (what gguf's numpy reference does).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

QK_K = 256
K_SCALE_SIZE = 12

# name -> (GGML type id, elements per block, bytes per block)
GGML_TYPES: dict[str, tuple[int, int, int]] = {
    "F32": (0, 1, 4),
    "F16": (1, 1, 2),
    "Q4_0": (2, 32, 18),
    "Q4_1": (3, 32, 20),
    "Q5_0": (6, 32, 22),
    "Q5_1": (7, 32, 24),
    "Q8_0": (8, 32, 34),
    "Q2_K": (10, 256, 84),
    "Q3_K": (11, 256, 110),
    "Q4_K": (12, 256, 144),
    "Q5_K": (13, 256, 176),
    "Q6_K": (14, 256, 210),
    "BF16": (30, 1, 2),
}
TYPE_NAMES: dict[int, str] = {type_id: name for name, (type_id, _, _) in GGML_TYPES.items()}
# Stored as torch tensors of their own dtype; every other type is a row of uint8 blocks.
FLOAT_TYPES: dict[str, torch.dtype] = {"F32": torch.float32, "F16": torch.float16}
QUANTIZED_TYPES = tuple(name for name in GGML_TYPES if name not in FLOAT_TYPES)


def _split(blocks: torch.Tensor, *sizes: int) -> tuple[torch.Tensor, ...]:
    return torch.split(blocks, [*sizes, blocks.shape[1] - sum(sizes)], dim=1)


def _u8(values: list[int], device: torch.device, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(values, device=device, dtype=torch.uint8).reshape(shape)


def _to_uint32(x: torch.Tensor) -> torch.Tensor:
    x = x.view(torch.uint8).to(torch.int32)
    return (x[:, 0] | x[:, 1] << 8 | x[:, 2] << 16 | x[:, 3] << 24).unsqueeze(1)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n_blocks = scales.shape[0]
    scales = scales.view(torch.uint8).reshape((n_blocks, 3, 4))
    d, m, m_d = torch.split(scales, 1, dim=-2)
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.reshape((n_blocks, 8)), mn.reshape((n_blocks, 8))


def _q8_0(blocks: torch.Tensor, block_size: int, dtype: torch.dtype | None) -> torch.Tensor:
    d, x = _split(blocks, 2)
    return d.view(torch.float16).to(dtype) * x.view(torch.int8)


def _q5_1(blocks: torch.Tensor, block_size: int, dtype: torch.dtype | None) -> torch.Tensor:
    n = blocks.shape[0]
    d, m, qh, qs = _split(blocks, 2, 2, 4)
    d = d.view(torch.float16).to(dtype)
    m = m.view(torch.float16).to(dtype)
    qh = _to_uint32(qh).reshape((n, 1)) >> torch.arange(32, device=d.device, dtype=torch.int32).reshape(1, 32)
    ql = qs.reshape((n, -1, 1, block_size // 2)) >> _u8([0, 4], d.device, (1, 1, 2, 1))
    qh = (qh & 1).to(torch.uint8)
    ql = (ql & 0x0F).reshape((n, -1))
    return (d * (ql | (qh << 4))) + m


def _q5_0(blocks: torch.Tensor, block_size: int, dtype: torch.dtype | None) -> torch.Tensor:
    n = blocks.shape[0]
    d, qh, qs = _split(blocks, 2, 4)
    d = d.view(torch.float16).to(dtype)
    qh = _to_uint32(qh).reshape(n, 1) >> torch.arange(32, device=d.device, dtype=torch.int32).reshape(1, 32)
    ql = qs.reshape(n, -1, 1, block_size // 2) >> _u8([0, 4], d.device, (1, 1, 2, 1))
    qh = (qh & 1).to(torch.uint8)
    ql = (ql & 0x0F).reshape(n, -1)
    return d * ((ql | (qh << 4)).to(torch.int8) - 16)


def _q4_1(blocks: torch.Tensor, block_size: int, dtype: torch.dtype | None) -> torch.Tensor:
    n = blocks.shape[0]
    d, m, qs = _split(blocks, 2, 2)
    d = d.view(torch.float16).to(dtype)
    m = m.view(torch.float16).to(dtype)
    qs = qs.reshape((n, -1, 1, block_size // 2)) >> _u8([0, 4], d.device, (1, 1, 2, 1))
    return (d * (qs & 0x0F).reshape(n, -1)) + m


def _q4_0(blocks: torch.Tensor, block_size: int, dtype: torch.dtype | None) -> torch.Tensor:
    n = blocks.shape[0]
    d, qs = _split(blocks, 2)
    d = d.view(torch.float16).to(dtype)
    qs = qs.reshape((n, -1, 1, block_size // 2)) >> _u8([0, 4], d.device, (1, 1, 2, 1))
    return d * ((qs & 0x0F).reshape((n, -1)).to(torch.int8) - 8)


def _q6_k(blocks: torch.Tensor, block_size: int, dtype: torch.dtype | None) -> torch.Tensor:
    n = blocks.shape[0]
    ql, qh, scales, d = _split(blocks, QK_K // 2, QK_K // 4, QK_K // 16)
    scales = scales.view(torch.int8).to(dtype)
    d = d.view(torch.float16).to(dtype)
    d = (d * scales).reshape((n, QK_K // 16, 1))
    ql = ql.reshape((n, -1, 1, 64)) >> _u8([0, 4], d.device, (1, 1, 2, 1))
    ql = (ql & 0x0F).reshape((n, -1, 32))
    qh = qh.reshape((n, -1, 1, 32)) >> _u8([0, 2, 4, 6], d.device, (1, 1, 4, 1))
    qh = (qh & 0x03).reshape((n, -1, 32))
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape((n, QK_K // 16, -1))
    return (d * q).reshape((n, QK_K))


def _q5_k(blocks: torch.Tensor, block_size: int, dtype: torch.dtype | None) -> torch.Tensor:
    n = blocks.shape[0]
    d, dmin, scales, qh, qs = _split(blocks, 2, 2, K_SCALE_SIZE, QK_K // 8)
    d = d.view(torch.float16).to(dtype)
    dmin = dmin.view(torch.float16).to(dtype)
    sc, m = _scale_min_k4(scales)
    d = (d * sc).reshape((n, -1, 1))
    dm = (dmin * m).reshape((n, -1, 1))
    ql = qs.reshape((n, -1, 1, 32)) >> _u8([0, 4], d.device, (1, 1, 2, 1))
    qh = qh.reshape((n, -1, 1, 32)) >> torch.arange(0, 8, device=d.device, dtype=torch.uint8).reshape(
        1, 1, 8, 1
    )
    ql = (ql & 0x0F).reshape((n, -1, 32))
    qh = (qh & 0x01).reshape((n, -1, 32))
    return (d * (ql | (qh << 4)) - dm).reshape((n, QK_K))


def _q4_k(blocks: torch.Tensor, block_size: int, dtype: torch.dtype | None) -> torch.Tensor:
    n = blocks.shape[0]
    d, dmin, scales, qs = _split(blocks, 2, 2, K_SCALE_SIZE)
    d = d.view(torch.float16).to(dtype)
    dmin = dmin.view(torch.float16).to(dtype)
    sc, m = _scale_min_k4(scales)
    d = (d * sc).reshape((n, -1, 1))
    dm = (dmin * m).reshape((n, -1, 1))
    qs = qs.reshape((n, -1, 1, 32)) >> _u8([0, 4], d.device, (1, 1, 2, 1))
    qs = (qs & 0x0F).reshape((n, -1, 32))
    return (d * qs - dm).reshape((n, QK_K))


def _q3_k(blocks: torch.Tensor, block_size: int, dtype: torch.dtype | None) -> torch.Tensor:
    n = blocks.shape[0]
    hmask, qs, scales, d = _split(blocks, QK_K // 8, QK_K // 4, 12)
    d = d.view(torch.float16).to(dtype)
    lscales, hscales = scales[:, :8], scales[:, 8:]
    lscales = (lscales.reshape((n, 1, 8)) >> _u8([0, 4], d.device, (1, 2, 1))).reshape((n, 16))
    hscales = (hscales.reshape((n, 1, 4)) >> _u8([0, 2, 4, 6], d.device, (1, 4, 1))).reshape((n, 16))
    scales = ((lscales & 0x0F) | ((hscales & 0x03) << 4)).to(torch.int8) - 32
    dl = (d * scales).reshape((n, 16, 1))
    ql = qs.reshape((n, -1, 1, 32)) >> _u8([0, 2, 4, 6], d.device, (1, 1, 4, 1))
    qh = hmask.reshape(n, -1, 1, 32) >> torch.arange(0, 8, device=d.device, dtype=torch.uint8).reshape(
        1, 1, 8, 1
    )
    ql = ql.reshape((n, 16, QK_K // 16)) & 3
    qh = (qh.reshape((n, 16, QK_K // 16)) & 1) ^ 1
    q = ql.to(torch.int8) - (qh << 2).to(torch.int8)
    return (dl * q).reshape((n, QK_K))


def _q2_k(blocks: torch.Tensor, block_size: int, dtype: torch.dtype | None) -> torch.Tensor:
    n = blocks.shape[0]
    scales, qs, d, dmin = _split(blocks, QK_K // 16, QK_K // 4, 2)
    d = d.view(torch.float16).to(dtype)
    dmin = dmin.view(torch.float16).to(dtype)
    dl = (d * (scales & 0xF)).reshape((n, QK_K // 16, 1))
    ml = (dmin * (scales >> 4)).reshape((n, QK_K // 16, 1))
    qs = (qs.reshape((n, -1, 1, 32)) >> _u8([0, 2, 4, 6], d.device, (1, 1, 4, 1))) & 3
    return (dl * qs.reshape((n, QK_K // 16, 16)) - ml).reshape((n, -1))


def _bf16(blocks: torch.Tensor, block_size: int, dtype: torch.dtype | None) -> torch.Tensor:
    # float32, as diffusers returns it (the cast to the compute dtype comes after).
    return (blocks.view(torch.int16).to(torch.int32) << 16).view(torch.float32)


_DEQUANTIZERS: dict[str, Callable[[torch.Tensor, int, torch.dtype | None], torch.Tensor]] = {
    "BF16": _bf16,
    "Q8_0": _q8_0,
    "Q5_1": _q5_1,
    "Q5_0": _q5_0,
    "Q4_1": _q4_1,
    "Q4_0": _q4_0,
    "Q6_K": _q6_k,
    "Q5_K": _q5_k,
    "Q4_K": _q4_k,
    "Q3_K": _q3_k,
    "Q2_K": _q2_k,
}


def logical_shape(quant_type: str, byte_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The element shape of a tensor stored as ``byte_shape`` uint8 blocks (last dim in bytes)."""
    _, block_size, type_size = GGML_TYPES[quant_type]
    return (*byte_shape[:-1], byte_shape[-1] // type_size * block_size)


def byte_shape(quant_type: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The uint8 shape of a tensor of ``shape`` elements stored as ``quant_type`` blocks."""
    _, block_size, type_size = GGML_TYPES[quant_type]
    if not shape or shape[-1] % block_size:
        raise ValueError(f"{quant_type} needs a last dimension divisible by {block_size}, not shape {shape}")
    return (*shape[:-1], shape[-1] // block_size * type_size)


def dequantize_blocks(data: torch.Tensor, quant_type: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode uint8 ``data`` (last dim in bytes) of ``quant_type`` into its logical shape.

    ``dtype=None`` computes as diffusers does (float16 for the block types, float32 for BF16).
    """
    if quant_type in FLOAT_TYPES:
        return data
    block_size, type_size = GGML_TYPES[quant_type][1:]
    data = data.view(torch.uint8)
    shape = logical_shape(quant_type, tuple(data.shape))
    blocks = data.reshape((data.numel() // type_size, type_size))
    return _DEQUANTIZERS[quant_type](blocks, block_size, dtype).reshape(shape)
