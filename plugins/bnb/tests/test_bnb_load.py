"""Quantize on load with qcore-bnb on CPU: the exact bytes bitsandbytes produces, accuracy, skip rules.

Forward bounds are relative L2 errors of the whole TinyTransformer (5 quantized Linear layers in a
chain, dim 64) against its bf16 forward; measured: nf4 0.150-0.151, fp4 0.187-0.188, LLM.int8 0.013.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as F
import pytest
import torch
from bnb_reference import (
    assert_4bit_like_bitsandbytes,
    assert_8bit_like_bitsandbytes,
    linear8bit_modules,
    load_4bit,
)
from safetensors.torch import load_file
from torch import nn

import qcore
from helpers.models import TinyTransformer, make_tiny
from qcore_bnb import BitsAndBytesConfig

NF4_BOUND, FP4_BOUND, INT8_BOUND = 0.17, 0.21, 0.02
STORAGES = ("uint8", "bfloat16", "float16", "float32")
COMPUTE = ("bfloat16", "float32", "float16")
# Every quant type x double quant x storage, with the compute dtype cycling through its three values.
COMBOS = [
    (qt, dq, st, COMPUTE[i % 3])
    for i, (qt, dq, st) in enumerate(itertools.product(("nf4", "fp4"), (False, True), STORAGES))
]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality: packed 4-bit weights stored as floats hold NaN patterns, which torch.equal rejects."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bnb") / "tiny-bf16"
    qcore.save_pretrained(make_tiny(), path)
    return path


@pytest.fixture(scope="module")
def reference(ckpt: Path) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(4, 8, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.no_grad():
        return x, make_tiny()(x)


@pytest.mark.parametrize(("quant_type", "double", "storage", "compute"), COMBOS)
def test_4bit_combination_quantizes_like_bitsandbytes_and_round_trips(
    ckpt: Path, reference: tuple, tmp_path: Path, quant_type: str, double: bool, storage: str, compute: str
) -> None:
    model, layers = load_4bit(
        ckpt, quant_type=quant_type, double=double, storage=storage, bnb_4bit_compute_dtype=compute
    )
    source = load_file(ckpt / "diffusion_pytorch_model.safetensors")
    assert len(layers) == 2 * 3 + 2  # attn + proj_out per block (2 blocks + 1 vace block), proj_in, proj_out
    for module in layers.values():
        assert module.weight.device.type == "cpu" and module.weight.dtype == getattr(torch, storage)
        assert module.compute_dtype == getattr(torch, compute)
    assert_4bit_like_bitsandbytes(layers, source, quant_type=quant_type, double=double, storage=storage)

    x, ref = reference
    with torch.no_grad():
        out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert rel_err(out, ref) < (NF4_BOUND if quant_type == "nf4" else FP4_BOUND)

    qcore.save_pretrained(model, tmp_path / "q")
    saved = load_file(tmp_path / "q" / "diffusion_pytorch_model.safetensors")
    reloaded = qcore.from_pretrained(TinyTransformer, tmp_path / "q", torch_dtype=torch.bfloat16)
    assert reloaded.hf_quantizer.pre_quantized
    again = reloaded.state_dict()
    assert sorted(again) == sorted(saved)
    for key, tensor in saved.items():
        assert same_bits(again[key], tensor), key
    with torch.no_grad():
        assert torch.equal(reloaded(x), out)


def test_8bit_quantizes_like_bitsandbytes_with_threshold(ckpt: Path, reference: tuple) -> None:
    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=5.0)
    model = qcore.from_pretrained(
        TinyTransformer, ckpt, quantization_config=config, torch_dtype=torch.bfloat16
    )
    source = load_file(ckpt / "diffusion_pytorch_model.safetensors")
    layers = linear8bit_modules(model)
    assert len(layers) == 8
    assert_8bit_like_bitsandbytes(layers, source)
    for module in layers.values():
        assert module.state.threshold == 5.0 and not module.state.has_fp16_weights
    x, ref = reference
    with torch.no_grad():
        out = model(x)
    assert rel_err(out, ref) < INT8_BOUND
    assert model.is_loaded_in_8bit and not model.is_loaded_in_4bit


def test_flags_device_and_default_dtype(ckpt: Path) -> None:
    config = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    model = qcore.from_pretrained(TinyTransformer, ckpt, quantization_config=config)
    assert model.is_loaded_in_4bit and not model.is_loaded_in_8bit and model.is_quantized
    assert model.quantization_method == "bitsandbytes"
    # No torch_dtype: unquantized parameters load in float16, as diffusers does for bitsandbytes.
    assert model.norm_out.weight.dtype == torch.float16 and model.proj_in.bias.dtype == torch.float16
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert model.config["_pre_quantization_dtype"] == torch.float16
    with pytest.raises(qcore.DtypeCastError):
        model.to(torch.float32)


def test_skip_modules_match_whole_names_and_config_is_not_mutated(ckpt: Path) -> None:
    skip = ["blocks"]
    config = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=skip)
    before = config.to_dict()
    model = qcore.from_pretrained(
        TinyTransformer, ckpt, quantization_config=config, torch_dtype=torch.bfloat16
    )
    assert type(model.blocks[0].attn) is nn.Linear and type(model.blocks[1].proj_out) is nn.Linear
    assert isinstance(model.vace_blocks[0].attn, bnb.nn.Linear4bit)  # "blocks" is not "vace_blocks"
    assert isinstance(model.proj_out, bnb.nn.Linear4bit)
    assert model.blocks[0].attn.weight.dtype == torch.bfloat16
    assert config.to_dict() == before and skip == ["blocks"]
    assert model.hf_quantizer.quantization_config is not config

    dotted = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["blocks.0.attn", "proj_out"])
    model = qcore.from_pretrained(
        TinyTransformer, ckpt, quantization_config=dotted, torch_dtype=torch.bfloat16
    )
    assert type(model.blocks[0].attn) is nn.Linear
    assert isinstance(model.blocks[1].attn, bnb.nn.Linear8bitLt)
    # "proj_out" is a whole module-name component: the top-level one and every block's.
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("proj_out"))


class FP32OutTransformer(TinyTransformer):
    _keep_in_fp32_modules = ["proj_out"]


def test_keep_in_fp32_modules_stay_fp32_and_unquantized(ckpt: Path, tmp_path: Path) -> None:
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    model = qcore.from_pretrained(
        FP32OutTransformer, ckpt, quantization_config=config, torch_dtype=torch.bfloat16
    )
    kept = {n: m for n, m in model.named_modules() if n.endswith("proj_out")}
    assert len(kept) == 4
    for name, module in kept.items():
        assert type(module) is nn.Linear and module.weight.dtype == torch.float32, name
    assert isinstance(model.blocks[0].attn, bnb.nn.Linear4bit)
    assert "proj_out" in model.hf_quantizer.modules_to_not_convert
    assert config.llm_int8_skip_modules is None
    qcore.save_pretrained(model, tmp_path / "q")
    reloaded = qcore.from_pretrained(FP32OutTransformer, tmp_path / "q", torch_dtype=torch.bfloat16)
    assert reloaded.proj_out.weight.dtype == torch.float32 and type(reloaded.proj_out) is nn.Linear


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_dequantize_restores_pre_quantization_dtype(ckpt: Path, reference: tuple, mode: str) -> None:
    if mode == "nf4":
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    model = qcore.from_pretrained(
        TinyTransformer, ckpt, quantization_config=config, torch_dtype=torch.bfloat16
    )
    expected = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            expected[name] = F.dequantize_4bit(module.weight.data, module.weight.quant_state).to(
                torch.bfloat16
            )
        elif isinstance(module, bnb.nn.Linear8bitLt):
            expected[name] = F.int8_vectorwise_dequant(module.weight.data, module.weight.SCB).to(
                torch.bfloat16
            )
    x, ref = reference
    with torch.no_grad():
        quantized_out = model(x)
    model.dequantize()
    assert not model.is_quantized and not model.is_loaded_in_4bit and not model.is_loaded_in_8bit
    assert "quantization_config" not in model.config
    for name, weight in expected.items():
        module = model.get_submodule(name)
        assert type(module) is nn.Linear and module.weight.dtype == torch.bfloat16
        assert torch.equal(module.weight.data, weight), name
    with torch.no_grad():
        out = model(x)
    assert rel_err(out, ref) < (NF4_BOUND if mode == "nf4" else INT8_BOUND)
    assert rel_err(out, quantized_out) < 0.02
    model.to(torch.float32)  # a plain model again: casts are allowed


def test_config_without_4_or_8_bit_is_refused(ckpt: Path) -> None:
    with pytest.raises(qcore.ConfigError, match="load_in_4bit=True or load_in_8bit=True"):
        qcore.from_pretrained(TinyTransformer, ckpt, quantization_config=BitsAndBytesConfig())


@pytest.mark.gpu  # without CUDA the loader refuses the map's cuda:0 first (ConfigError naming device_map)
def test_cpu_offload_split_needs_the_flag(ckpt: Path) -> None:
    device_map = {
        "proj_in": "cpu",
        "blocks": "cuda:0",
        "vace_blocks": "cpu",
        "norm_out": "cpu",
        "proj_out": "cpu",
    }
    with pytest.raises(qcore.ConfigError, match="llm_int8_enable_fp32_cpu_offload"):
        qcore.from_pretrained(
            TinyTransformer,
            ckpt,
            quantization_config=BitsAndBytesConfig(load_in_8bit=True),
            device_map=device_map,
        )


def test_unquantized_integer_weight_is_refused(ckpt: Path, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import save_file

    target = tmp_path / "int"
    shutil.copytree(ckpt, target)
    tensors = load_file(target / "diffusion_pytorch_model.safetensors")
    tensors["blocks.0.attn.weight"] = tensors["blocks.0.attn.weight"].to(torch.int8)
    save_file(tensors, target / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(qcore.CorruptCheckpointError, match="blocks.0.attn.weight"):
        qcore.from_pretrained(
            TinyTransformer, target, quantization_config=BitsAndBytesConfig(load_in_4bit=True)
        )
