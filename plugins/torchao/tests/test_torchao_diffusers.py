"""Interop with real diffusers 0.42 on CPU: torchao checkpoints move both ways with the same outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torchao.quantization import (
    Float8WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
)
from torchao.utils import TorchAOBaseTensor

import qcore
from helpers.models import flux_inputs, tiny_flux_config
from qcore_torchao import TorchAoConfig

diffusers = pytest.importorskip("diffusers")
from diffusers import FluxTransformer2DModel  # noqa: E402

CONFIGS = {
    "int8wo": Int8WeightOnlyConfig,
    "float8wo": Float8WeightOnlyConfig,
    "int8dq": Int8DynamicActivationInt8WeightConfig,
}


@pytest.fixture(scope="module")
def flux_bf16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**tiny_flux_config()).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("flux") / "bf16"
    model.save_pretrained(path)
    return path


def run(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**flux_inputs())[0]


def quantized_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if isinstance(p, TorchAOBaseTensor)}


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    qa, qb = quantized_weights(a), quantized_weights(b)
    assert qa.keys() == qb.keys() and qa
    for name in qa:
        assert type(qa[name]) is type(qb[name]), name
        names, _ = qa[name].__tensor_flatten__()
        for part in names:
            assert torch.equal(getattr(qa[name], part), getattr(qb[name], part)), (name, part)
    for name, p in a.state_dict().items():
        if not isinstance(p, TorchAOBaseTensor):
            assert torch.equal(p, b.state_dict()[name]), name


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_quantize_on_load_matches_diffusers(flux_bf16: Path, name: str) -> None:
    theirs = FluxTransformer2DModel.from_pretrained(
        flux_bf16, quantization_config=diffusers.TorchAoConfig(CONFIGS[name]()), torch_dtype=torch.bfloat16
    )
    ours = qcore.from_pretrained(
        FluxTransformer2DModel, flux_bf16, quantization_config=TorchAoConfig(name), torch_dtype=torch.bfloat16
    )
    assert_same_weights(ours, theirs)
    assert torch.equal(run(ours), run(theirs))


@pytest.mark.parametrize("shard", [None, "20KB"], ids=["one-file", "sharded"])
@pytest.mark.parametrize("name", ["int8wo", "float8wo"])
def test_diffusers_checkpoint_loads_in_qcore(
    flux_bf16: Path, tmp_path: Path, name: str, shard: str | None
) -> None:
    quantized = FluxTransformer2DModel.from_pretrained(
        flux_bf16, quantization_config=diffusers.TorchAoConfig(CONFIGS[name]()), torch_dtype=torch.bfloat16
    )
    path = tmp_path / "diffusers-saved"
    quantized.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    assert (len(list(path.glob("*.safetensors"))) > 1) == (shard is not None)

    theirs = FluxTransformer2DModel.from_pretrained(path, torch_dtype=torch.bfloat16)
    ours = qcore.from_pretrained(FluxTransformer2DModel, path, torch_dtype=torch.bfloat16)
    assert ours.hf_quantizer.pre_quantized
    assert ours.hf_quantizer.quantization_config == TorchAoConfig(name)
    assert_same_weights(ours, theirs)
    assert torch.equal(run(ours), run(theirs))
    assert torch.equal(run(ours), run(quantized))


@pytest.mark.parametrize("shard", [None, "20KB"], ids=["one-file", "sharded"])
@pytest.mark.parametrize("name", ["int8wo", "int8dq"])
def test_qcore_checkpoint_loads_in_diffusers(
    flux_bf16: Path, tmp_path: Path, name: str, shard: str | None
) -> None:
    ours = qcore.from_pretrained(
        FluxTransformer2DModel, flux_bf16, quantization_config=TorchAoConfig(name), torch_dtype=torch.bfloat16
    )
    path = tmp_path / "qcore-saved"
    qcore.save_pretrained(ours, path, **({"max_shard_size": shard} if shard else {}))
    config = json.loads((path / "config.json").read_text())
    assert config["_class_name"] == "FluxTransformer2DModel"
    assert config["quantization_config"] == diffusers.TorchAoConfig(CONFIGS[name]()).to_dict()

    theirs = FluxTransformer2DModel.from_pretrained(path, torch_dtype=torch.bfloat16)
    assert isinstance(theirs.transformer_blocks[0].attn.to_q.weight, TorchAOBaseTensor)
    assert_same_weights(theirs, ours)
    assert torch.equal(run(theirs), run(ours))
