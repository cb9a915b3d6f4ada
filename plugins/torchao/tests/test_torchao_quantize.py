"""Quantize on load with qcore-torchao on CPU: same weights as torchao's quantize_, accuracy per type,
modules_to_not_convert, FqnToConfig, dequantize, and the hardware checks."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from torchao.quantization import FqnToConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
from torchao.quantization.granularity import PerGroup
from torchao.utils import TorchAOBaseTensor

import qcore
from helpers.models import TinyTransformer, make_tiny
from qcore_torchao import TorchAoConfig

# quant_type -> bound on the output's relative L2 error against the bf16 model (TinyTransformer).
CPU_TYPES = {
    "int8wo": 0.02,
    "int8dq": 0.03,
    "float8wo": 0.08,
    "float8wo_e5m2": 0.15,
    "int4dq": 0.2,
    "uint4wo": 0.2,
    "int8wo_group32": 0.02,
    "intx4_group32": 0.2,
}


def make_config(name: str, **kwargs: object) -> TorchAoConfig:
    if name == "int8wo_group32":
        return TorchAoConfig("int8wo", group_size=32, **kwargs)
    if name == "intx4_group32":
        return TorchAoConfig(
            IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)), **kwargs
        )
    return TorchAoConfig(name, **kwargs)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def inner_tensors(t: torch.Tensor) -> dict[str, torch.Tensor]:
    names, _ = t.__tensor_flatten__()
    return {name: getattr(t, name) for name in names}


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("name", sorted(CPU_TYPES))
def test_quantize_on_load_matches_torchao_quantize(
    name: str, tiny_ckpt: Path, tiny_model: TinyTransformer, tiny_input: torch.Tensor
) -> None:
    config = make_config(name)
    model = TinyTransformer.from_pretrained(tiny_ckpt, quantization_config=config, torch_dtype=torch.bfloat16)
    assert model.is_quantized and model.quantization_method == "torchao"
    for module_name, reference in linears(tiny_model).items():
        loaded = model.get_submodule(module_name)
        assert type(loaded) is nn.Linear
        expected = copy.deepcopy(reference)
        quantize_(expected, copy.deepcopy(config.quant_type))
        assert type(loaded.weight) is type(expected.weight), module_name
        assert not loaded.weight.requires_grad
        got, want = inner_tensors(loaded.weight), inner_tensors(expected.weight)
        assert got.keys() == want.keys()
        for part in want:
            assert got[part].dtype == want[part].dtype and torch.equal(got[part], want[part]), (
                module_name,
                part,
            )
        assert loaded.weight.shape == reference.weight.shape
        if reference.bias is not None:
            assert torch.equal(loaded.bias, reference.bias)
    error = rel_err(model(tiny_input), tiny_model(tiny_input))
    assert 0 < error < CPU_TYPES[name], f"{name}: relative error {error:.4f}"


def test_torch_dtype_defaults_to_bfloat16_and_casts_before_quantizing(
    tmp_path: Path, tiny_input: torch.Tensor
) -> None:
    fp32 = make_tiny(dtype=torch.float32)
    qcore.save_pretrained(fp32, tmp_path / "fp32")
    model = TinyTransformer.from_pretrained(tmp_path / "fp32", quantization_config=TorchAoConfig("int8wo"))
    assert model.blocks[0].attn.weight.dtype == torch.bfloat16
    assert model.norm_out.weight.dtype == torch.bfloat16
    assert model.config["_pre_quantization_dtype"] == torch.bfloat16
    expected = copy.deepcopy(fp32.blocks[0].attn).to(torch.bfloat16)
    quantize_(expected, Int8WeightOnlyConfig())
    assert torch.equal(model.blocks[0].attn.weight.qdata, expected.weight.qdata)
    kept = TinyTransformer.from_pretrained(
        tmp_path / "fp32", quantization_config=TorchAoConfig("int8wo"), torch_dtype=torch.float32
    )
    assert kept.blocks[0].attn.weight.dtype == torch.float32
    assert rel_err(kept(tiny_input.float()), fp32(tiny_input.float())) < 0.02


def test_modules_to_not_convert_matches_whole_names(tiny_ckpt: Path, tiny_model: TinyTransformer) -> None:
    config = TorchAoConfig("int8wo", modules_to_not_convert=["blocks", "proj_in"])
    model = TinyTransformer.from_pretrained(tiny_ckpt, quantization_config=config)
    for name, module in linears(model).items():
        skipped = name.startswith("blocks.") or name == "proj_in"
        assert isinstance(module.weight, TorchAOBaseTensor) != skipped, name
        if skipped:
            assert torch.equal(module.weight, tiny_model.get_submodule(name).weight)
    # "vace_blocks" contains "blocks" as a substring but is another module: quantized.
    assert isinstance(model.vace_blocks[0].attn.weight, TorchAOBaseTensor)
    assert config.modules_to_not_convert == ["blocks", "proj_in"]  # the user's config is untouched


def test_keep_in_fp32_modules_stay_unquantized(tiny_ckpt: Path) -> None:
    model = TinyTransformer.from_pretrained(
        tiny_ckpt, quantization_config=TorchAoConfig("int8wo"), keep_in_fp32_modules=["proj_out"]
    )
    assert model.proj_out.weight.dtype == torch.float32 and type(model.proj_out.weight.data) is torch.Tensor
    assert model.blocks[0].proj_out.weight.dtype == torch.float32
    assert isinstance(model.blocks[0].attn.weight, TorchAOBaseTensor)


def test_fqn_to_config_quantizes_per_module(tiny_ckpt: Path, tiny_model: TinyTransformer) -> None:
    per_module = FqnToConfig(
        {
            "proj_in": IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
            r"re:blocks\.\d+\.attn": Int8WeightOnlyConfig(),
            "blocks.1.proj_out": None,
        }
    )
    model = TinyTransformer.from_pretrained(tiny_ckpt, quantization_config=TorchAoConfig(per_module))
    assert type(model.proj_in.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert type(model.blocks[0].attn.weight).__name__ == "Int8Tensor"
    assert type(model.blocks[1].attn.weight).__name__ == "Int8Tensor"
    for name in ("blocks.1.proj_out", "blocks.0.proj_out", "proj_out", "vace_blocks.0.attn"):
        weight = model.get_submodule(name).weight
        assert type(weight.data) is torch.Tensor, name
        assert torch.equal(weight, tiny_model.get_submodule(name).weight), name


def test_no_linear_left_warns(tiny_ckpt: Path, caplog: pytest.LogCaptureFixture) -> None:
    skip = ["proj_in", "blocks", "vace_blocks", "proj_out"]
    model = TinyTransformer.from_pretrained(
        tiny_ckpt, quantization_config=TorchAoConfig("int8wo", modules_to_not_convert=skip)
    )
    assert "no nn.Linear left to quantize" in caplog.text
    assert not any(isinstance(p, TorchAOBaseTensor) for p in model.parameters())


@pytest.mark.parametrize("name", ["int8wo", "float8wo", "int8dq", "uint4wo"])
def test_dequantize(
    name: str, tiny_ckpt: Path, tiny_model: TinyTransformer, tiny_input: torch.Tensor
) -> None:
    model = TinyTransformer.from_pretrained(tiny_ckpt, quantization_config=TorchAoConfig(name))
    weight = model.blocks[0].attn.weight
    expected = weight.dequantize()
    quantized_out = model(tiny_input)
    model.dequantize()
    assert not model.is_quantized and "quantization_config" not in model.config
    for module_name, module in linears(model).items():
        assert type(module.weight.data) is torch.Tensor and module.weight.dtype == torch.bfloat16, module_name
    assert torch.equal(model.blocks[0].attn.weight, expected)
    assert rel_err(model(tiny_input), tiny_model(tiny_input)) < CPU_TYPES[name]
    if name != "int8dq":  # weight-only: dequantized weights give the same matmul
        assert rel_err(model(tiny_input), quantized_out) < 0.01
    model.to(torch.float32)  # a plain model again: casts are allowed


def test_dequantize_unsupported_raises_and_leaves_model_intact(
    tiny_ckpt: Path, tiny_input: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every tensor type that runs on CPU dequantizes; int4 tinygemm (CUDA) ones do not. Simulate one.
    model = TinyTransformer.from_pretrained(tiny_ckpt, quantization_config=TorchAoConfig("int8wo"))
    out = model(tiny_input)
    weight_cls = type(model.blocks[0].attn.weight)

    def refuse(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no dequantize")

    monkeypatch.setattr(weight_cls, "dequantize", refuse)
    with pytest.raises(qcore.DequantizeError, match=r"cannot dequantize proj_in\.weight, a Int8Tensor"):
        model.dequantize()
    monkeypatch.undo()
    assert model.is_quantized and isinstance(model.blocks[0].attn.weight, TorchAOBaseTensor)
    assert torch.equal(model(tiny_input), out)


@pytest.mark.parametrize(
    ("quant_type", "needs"),
    [
        ("float8dq", "compute capability >= 8.9"),
        ("float8dq_e4m3_row", "compute capability >= 8.9"),
        ("int4wo", "runs on CUDA only"),
    ],
)
def test_types_needing_a_gpu_refuse_cpu_before_loading(tiny_ckpt: Path, quant_type: str, needs: str) -> None:
    with pytest.raises(qcore.ConfigError, match=needs) as info:
        TinyTransformer.from_pretrained(
            tiny_ckpt, quantization_config=TorchAoConfig(quant_type), device_map="cpu"
        )
    assert info.value.option == "quant_type"
    assert "cpu" in str(info.value)


def test_dtype_casts_of_a_quantized_model_are_refused(tiny_ckpt: Path) -> None:
    model = TinyTransformer.from_pretrained(tiny_ckpt, quantization_config=TorchAoConfig("int8wo"))
    with pytest.raises(qcore.DtypeCastError, match="torchao"):
        model.to(torch.float16)
