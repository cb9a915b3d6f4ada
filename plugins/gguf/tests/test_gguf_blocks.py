"""GGML block decoding against gguf's numpy reference and diffusers' torch port; the K-quant writer."""

from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
import torch

from qcore_gguf import QUANTIZED_TYPES, GGUFWeight, dequantize_blocks
from qcore_gguf.testing import quantize

TYPES = list(QUANTIZED_TYPES)
# Relative L2 error of the K-quant writer's plain min/max search (llama.cpp's search does better).
WRITER_ERROR = {"Q2_K": 0.4, "Q3_K": 0.25, "Q4_K": 0.1, "Q5_K": 0.05, "Q6_K": 0.025}


@pytest.fixture(scope="module")
def weights() -> np.ndarray:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 512)).astype(np.float32)
    w[3] *= 40.0  # rows of very different scales
    w[5] = 0.0  # an all-zero row: scales of zero must decode to zeros
    w[7, :256] = np.abs(w[7, :256])  # a block with no negative values (min offset zero)
    return w


@pytest.mark.parametrize("quant_type", TYPES)
def test_float32_decoding_equals_gguf_reference(weights: np.ndarray, quant_type: str) -> None:
    blocks = quantize(weights, quant_type)
    reference = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[quant_type])
    ours = dequantize_blocks(torch.from_numpy(blocks), quant_type, torch.float32)
    assert ours.shape == weights.shape
    assert np.array_equal(ours.numpy(), reference), (
        f"{quant_type}: max diff {np.abs(ours.numpy() - reference).max()}"
    )


@pytest.mark.parametrize("quant_type", TYPES)
def test_default_decoding_is_diffusers_bit_for_bit(weights: np.ndarray, quant_type: str) -> None:
    from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor

    blocks = torch.from_numpy(quantize(weights, quant_type))
    theirs = dequantize_gguf_tensor(
        GGUFParameter(blocks.clone(), quant_type=gguf.GGMLQuantizationType[quant_type])
    )
    ours = GGUFWeight(blocks, quant_type).dequantize()
    assert ours.dtype == theirs.dtype  # float16 (float32 for BF16), as diffusers computes
    assert torch.equal(
        ours.view(torch.int16 if ours.dtype == torch.float16 else torch.int32),
        theirs.view(torch.int16 if theirs.dtype == torch.float16 else torch.int32),
    )


@pytest.mark.parametrize("quant_type", sorted(WRITER_ERROR))
def test_kquant_writer_round_trip(weights: np.ndarray, quant_type: str) -> None:
    decoded = gguf.quants.dequantize(quantize(weights, quant_type), gguf.GGMLQuantizationType[quant_type])
    for row in range(weights.shape[0]):
        norm = np.linalg.norm(weights[row])
        error = np.linalg.norm(decoded[row] - weights[row]) / max(norm, 1e-12)
        assert error <= WRITER_ERROR[quant_type] or norm == 0, (row, error)
    assert np.all(decoded[5] == 0)


def test_kquant_writer_refuses_partial_superblocks() -> None:
    with pytest.raises(ValueError, match="divisible by 256"):
        quantize(np.zeros((2, 96), np.float32), "Q4_K")


@pytest.mark.parametrize("quant_type", ["Q8_0", "Q4_K", "Q6_K", "BF16"])
def test_weight_survives_to_narrow_cat_and_copies(weights: np.ndarray, quant_type: str) -> None:
    w = GGUFWeight(torch.from_numpy(quantize(weights, quant_type)), quant_type)
    full = w.dequantize()
    assert w.logical_shape == weights.shape

    moved = w.to("cpu", copy=True)
    assert isinstance(moved, GGUFWeight) and moved.quant_type == quant_type
    rows = w.narrow(0, 4, 8)
    assert isinstance(rows, GGUFWeight) and rows.logical_shape == (8, 512)
    assert torch.equal(rows.dequantize(), full[4:12])
    sliced = w[10:]
    assert isinstance(sliced, GGUFWeight) and torch.equal(sliced.dequantize(), full[10:])
    swapped = torch.cat([w[12:], w[:12]], dim=0)
    assert isinstance(swapped, GGUFWeight) and swapped.quant_type == quant_type
    assert torch.equal(swapped.dequantize(), torch.cat([full[12:], full[:12]]))
    parts = torch.split(w, 8, dim=0)
    assert all(isinstance(p, GGUFWeight) and p.quant_type == quant_type for p in parts)
    clone = copy.deepcopy(w)
    assert isinstance(clone, GGUFWeight) and torch.equal(clone.dequantize(), full)
    assert w.view(torch.int8).__class__ is torch.Tensor  # a reinterpretation is no longer blocks


def test_module_to_keeps_the_weight_type(weights: np.ndarray) -> None:
    from qcore_gguf import GGUFLinear

    layer = GGUFLinear(512, 24, bias=False, compute_dtype=torch.float32)
    layer.weight = GGUFWeight(torch.from_numpy(quantize(weights, "Q4_K")), "Q4_K")
    x = torch.randn(2, 512)
    before = layer(x)
    layer.to("cpu")
    layer.requires_grad_(False)
    assert isinstance(layer.weight, GGUFWeight) and layer.weight.quant_type == "Q4_K"
    assert torch.equal(layer(x), before)
    assert "Q4_K" in repr(layer)


def test_unknown_type_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown GGML type"):
        GGUFWeight(torch.zeros(2, 34, dtype=torch.uint8), "IQ9_Z")
