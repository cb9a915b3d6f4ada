"""Per-row formats quantized on load in slices of rows: the same tensors, bit for bit, as torchao's
quantize_ of the whole weight (the slices only bound the load's temporary memory)."""

from __future__ import annotations

import copy
import gc
from pathlib import Path

import pytest
import torch
from torch import nn
from torchao.quantization import quantize_

import qcore_torchao._quantizer as torchao_quantizer
from helpers.models import TinyTransformer
from qcore_torchao import TorchAoConfig


def inner_tensors(t: torch.Tensor) -> dict[str, torch.Tensor]:
    names, _ = t.__tensor_flatten__()
    return {name: getattr(t, name) for name in names}


@pytest.mark.parametrize("config", [TorchAoConfig("int8wo"), TorchAoConfig("int8wo", group_size=32)])
def test_sliced_quantize_on_load_equals_whole_weight_quantize(
    config: TorchAoConfig,
    tiny_ckpt: Path,
    tiny_model: TinyTransformer,
    tiny_input: torch.Tensor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sliced: list[tuple[int, int]] = []
    by_rows = torchao_quantizer._quantize_by_rows

    def counting(module: nn.Module, quant_type: object) -> bool:
        done = by_rows(module, quant_type)
        if done:
            sliced.append(tuple(module.weight.shape))
        return done

    # 3 float32 rows of 64 columns and a bit: slices of 3 rows, and a shorter last slice
    monkeypatch.setitem(torchao_quantizer.ROW_SLICE_BYTES, "cpu", 3 * 4 * 64 + 8)
    monkeypatch.setattr(torchao_quantizer, "_quantize_by_rows", counting)
    model = TinyTransformer.from_pretrained(tiny_ckpt, quantization_config=config, torch_dtype=torch.bfloat16)
    assert sliced and any(rows % 3 for rows, _ in sliced)
    for name, reference in tiny_model.named_modules():
        if not isinstance(reference, nn.Linear):
            continue
        expected = copy.deepcopy(reference)
        quantize_(expected, copy.deepcopy(config.quant_type))
        loaded = model.get_submodule(name).weight
        assert type(loaded) is type(expected.weight) and loaded.shape == expected.weight.shape, name
        assert loaded.__tensor_flatten__()[1] == expected.weight.__tensor_flatten__()[1], name
        got, want = inner_tensors(loaded), inner_tensors(expected.weight)
        assert got.keys() == want.keys()
        for part, tensor in want.items():
            assert got[part].dtype == tensor.dtype and torch.equal(got[part], tensor), (name, part)

    monkeypatch.setattr(torchao_quantizer, "_quantize_by_rows", by_rows)
    monkeypatch.setitem(torchao_quantizer.ROW_SLICE_BYTES, "cpu", 1 << 40)  # no slicing
    whole = TinyTransformer.from_pretrained(tiny_ckpt, quantization_config=config, torch_dtype=torch.bfloat16)
    assert torch.equal(model(tiny_input), whole(tiny_input))


def test_formats_that_are_not_row_wise_are_quantized_whole(
    tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(torchao_quantizer.ROW_SLICE_BYTES, "cpu", 64)
    linear = nn.Linear(64, 16, bias=False).to(torch.bfloat16)
    assert not torchao_quantizer._quantize_by_rows(linear, TorchAoConfig("float8wo").quant_type)
    assert type(linear.weight) is nn.Parameter and linear.weight.dtype == torch.bfloat16


def test_sliced_quantize_leaves_no_tensor_for_the_cyclic_collector(
    tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A load pauses the cyclic collector: a slice held by a reference cycle would live to its end.
    monkeypatch.setitem(torchao_quantizer.ROW_SLICE_BYTES, "cpu", 3 * 4 * 64 + 8)
    was_enabled = gc.isenabled()
    while gc.collect():  # earlier tests' garbage, freed in cascades (finalizers free more)
        pass
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        model = TinyTransformer.from_pretrained(
            tiny_ckpt, quantization_config=TorchAoConfig("int8wo"), torch_dtype=torch.bfloat16
        )
        gc.collect()
        stranded = [o for o in gc.garbage if isinstance(o, torch.Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was_enabled:
            gc.enable()
    assert any(hasattr(m.weight, "qdata") for m in model.modules() if isinstance(m, nn.Linear))
    assert stranded == [], [(type(t).__name__, tuple(t.shape), t.dtype) for t in stranded[:5]]
