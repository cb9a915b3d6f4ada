"""On the CPU, weights are quantized in slices of rows: the same bytes as bitsandbytes' call on the whole
weight (the slices only bound the temporaries of its CPU kernels)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bnb_reference import (
    assert_4bit_like_bitsandbytes,
    assert_8bit_like_bitsandbytes,
    linear8bit_modules,
    load_4bit,
)
from safetensors.torch import load_file

import qcore
import qcore_bnb._quantizer as bnb_quantizer
from helpers.models import TinyTransformer, make_tiny
from qcore_bnb import BitsAndBytesConfig


@pytest.fixture
def wide_ckpt(tmp_path: Path) -> Path:
    # 96 columns: a slice must hold an even number of rows to start on a 64-element block
    qcore.save_pretrained(make_tiny(dim=96), tmp_path / "bf16")
    return tmp_path / "bf16"


@pytest.fixture
def slices(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Slices of about 5 rows of 96 bfloat16 values; records the shape of every weight cut into slices."""
    seen: list[tuple[int, int]] = []
    whole = bnb_quantizer.in_row_slices

    def recording(weight: torch.Tensor, rows_unit: int, quantize: object) -> tuple[torch.Tensor, ...]:
        calls: list[int] = []

        def counted(rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
            calls.append(rows.shape[0])
            return quantize(rows)  # type: ignore[operator]

        out = whole(weight, rows_unit, counted)
        if len(calls) > 1:
            # every slice but the remainder starts and ends on a block and packing boundary
            assert sum(calls) == weight.shape[0]
            assert sum(rows % rows_unit != 0 for rows in calls) <= 1
            assert len(set(calls)) <= 2
            seen.append(tuple(weight.shape))
        return out

    monkeypatch.setattr(bnb_quantizer, "SLICE_BYTES", 5 * 96 * 2)
    monkeypatch.setattr(bnb_quantizer, "in_row_slices", recording)
    return seen


@pytest.mark.parametrize("storage", ["uint8", "float32"])
@pytest.mark.parametrize("double", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_slices_give_the_bytes_of_one_call(
    wide_ckpt: Path, slices: list[tuple[int, int]], quant_type: str, double: bool, storage: str
) -> None:
    _, layers = load_4bit(wide_ckpt, quant_type=quant_type, double=double, storage=storage)
    assert (96, 96) in slices
    source = load_file(wide_ckpt / "diffusion_pytorch_model.safetensors")
    assert layers
    assert_4bit_like_bitsandbytes(layers, source, quant_type=quant_type, double=double, storage=storage)


def test_8bit_slices_give_the_bytes_of_one_call(wide_ckpt: Path, slices: list[tuple[int, int]]) -> None:
    model = qcore.from_pretrained(
        TinyTransformer, wide_ckpt, quantization_config=BitsAndBytesConfig(load_in_8bit=True)
    )
    assert (96, 96) in slices
    source = load_file(wide_ckpt / "diffusion_pytorch_model.safetensors")
    layers = linear8bit_modules(model)
    assert layers
    assert_8bit_like_bitsandbytes(layers, source)


def test_slices_with_a_remainder_are_assembled_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bnb_quantizer, "SLICE_BYTES", 4 * 64 * 2)  # 4 rows of 64 bfloat16 values
    weight = torch.randn(37, 64).to(torch.bfloat16)  # 9 slices of 4 rows and one of 1
    shapes: list[int] = []

    def quantize(rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        shapes.append(rows.shape[0])
        return rows.float() * 2, rows.float().sum(dim=1), rows[:, :3].reshape(-1)

    got = bnb_quantizer.in_row_slices(weight, 2, quantize)
    assert sorted(shapes) == [1] + [4] * 9
    want = quantize(weight)
    assert len(got) == len(want)
    for part, expected in zip(got, want, strict=True):
        assert part.dtype == expected.dtype and torch.equal(part, expected)
