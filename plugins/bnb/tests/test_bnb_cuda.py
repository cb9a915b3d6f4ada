"""qcore-bnb on CUDA, and checkpoint interop with diffusers both ways, on a tiny FluxTransformer2DModel.

- every nf4/fp4 x double-quant x quant_storage combination quantizes on the GPU to the bytes
  bitsandbytes.functional.quantize_4bit gives, runs, and round-trips through save/load bit-exactly;
- LLM.int8: int8 weights and SCB right after loading, equal to what bitsandbytes' own Int8Params holds
  after its move to the GPU (and to int8_vectorwise_quant of the float16 weight);
- diffusers quantizes and saves, qcore loads it (and the reverse): same state, same output;
- quantize-on-load by qcore and by diffusers quantize the same modules and give identical tensors.

gpu-marked: skipped where CUDA is unavailable. On the GPU machine: ``pytest -m gpu plugins/bnb/tests``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from safetensors.torch import load_file

import qcore
from helpers.fixtures import installed_or_registered
from helpers.models import flux_inputs, tiny_flux_config

pytestmark = pytest.mark.gpu

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")
diffusers = pytest.importorskip("diffusers")
qcore_bnb = pytest.importorskip("qcore_bnb", reason="qcore-bnb is not installed (pip install ./plugins/bnb)")

DEVICE = "cuda"
LOAD = {"torch_dtype": torch.bfloat16, "device_map": DEVICE}
# The same modes in qcore's and diffusers' BitsAndBytesConfig.
MODES: dict[str, dict[str, Any]] = {
    "nf4": {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": torch.bfloat16,
    },
    "8bit": {"load_in_8bit": True},
}


class Flux(NamedTuple):
    path: Path  # the bf16 checkpoint
    source: dict[str, torch.Tensor]  # its tensors, on the CPU
    output: torch.Tensor  # the bf16 model's output on DEVICE


@pytest.fixture(scope="module", autouse=True)
def bnb_backend() -> Iterator[None]:
    with installed_or_registered(qcore_bnb.backend):
        yield


@pytest.fixture(scope="module")
def flux(tmp_path_factory: pytest.TempPathFactory) -> Flux:
    path = tmp_path_factory.mktemp("bnb-cuda") / "bf16"
    torch.manual_seed(0)
    original = diffusers.FluxTransformer2DModel(**tiny_flux_config()).to(torch.bfloat16).eval()
    original.save_pretrained(path)
    source = load_file(path / "diffusion_pytorch_model.safetensors")
    return Flux(path, source, run(original.to(DEVICE)))


def run(model: torch.nn.Module) -> torch.Tensor:
    inputs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in flux_inputs().items()}
    with torch.no_grad():
        return model(**inputs)[0]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8).cpu()


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    # Both sides and full counts: a truncated symmetric difference hides which model lacks what.
    assert sorted(sa) == sorted(sb), (
        f"only in the first: {sorted(set(sa) - set(sb))}; only in the second: {sorted(set(sb) - set(sa))}"
    )
    for key in sa:
        if key.endswith("bias") and sa[key].dtype != sb[key].dtype:
            continue  # biases may follow either loader's torch_dtype
        assert sa[key].dtype == sb[key].dtype, f"{key}: {sa[key].dtype} vs {sb[key].dtype}"
        assert torch.equal(bits(sa[key]), bits(sb[key])), f"{key} differs"


def quantized_modules(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


def rel_err(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.float() - reference.float()).norm() / reference.float().norm()).item()


@pytest.mark.parametrize("storage", ["uint8", "bfloat16", "float16", "float32"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double_quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_quantizes_like_bitsandbytes_and_round_trips(
    flux: Flux, tmp_path: Path, quant_type: str, double_quant: bool, storage: str
) -> None:
    config = qcore_bnb.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_quant_storage=storage,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = qcore.from_pretrained(
        diffusers.FluxTransformer2DModel, flux.path, quantization_config=config, **LOAD
    )
    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 28
    for name, module in layers.items():
        assert module.weight.device.type == DEVICE, name
        packed, state = F.quantize_4bit(
            flux.source[f"{name}.weight"].to(DEVICE),
            blocksize=64,
            compress_statistics=double_quant,
            quant_type=quant_type,
            quant_storage=getattr(torch, storage),
        )
        assert torch.equal(bits(module.weight.data), bits(packed)), f"{name}: packed bytes differ"
        assert torch.equal(module.weight.quant_state.absmax, state.absmax), f"{name}: absmax differs"
    out = run(model)
    assert rel_err(out, flux.output) < 0.2  # measured on an H100: nf4 0.125, fp4 0.152

    qcore.save_pretrained(model, tmp_path / "q")
    reloaded = qcore.from_pretrained(diffusers.FluxTransformer2DModel, tmp_path / "q", **LOAD)
    assert_same_state(model, reloaded)
    assert torch.equal(run(reloaded), out)


def test_8bit_equals_bitsandbytes_own_path_and_round_trips(flux: Flux, tmp_path: Path) -> None:
    model = qcore.from_pretrained(
        diffusers.FluxTransformer2DModel,
        flux.path,
        quantization_config=qcore_bnb.BitsAndBytesConfig(load_in_8bit=True),
        **LOAD,
    )
    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}
    assert len(layers) == 28
    for name, module in layers.items():
        weight, source = module.weight, flux.source[f"{name}.weight"]
        assert weight.device.type == DEVICE, name
        assert weight.dtype == torch.int8 and weight.SCB is not None, (
            f"{name}: left {weight.dtype} without SCB"
        )
        # bitsandbytes' own path (diffusers' too): a 16-bit CPU Int8Params moved to the device.
        own = bnb.nn.Int8Params(source, requires_grad=False, has_fp16_weights=False).to(DEVICE)
        assert torch.equal(weight.data, own.data) and torch.equal(weight.SCB, own.SCB), (
            f"{name}: != Int8Params"
        )
        cb, scb, _ = F.int8_vectorwise_quant(source.to(DEVICE, torch.float16))
        assert torch.equal(weight.data, cb) and torch.equal(weight.SCB, scb), (
            f"{name}: != int8_vectorwise_quant"
        )
    out = run(model)
    assert rel_err(out, flux.output) < 0.03  # measured on an H100: 0.0108

    qcore.save_pretrained(model, tmp_path / "q")
    reloaded = qcore.from_pretrained(diffusers.FluxTransformer2DModel, tmp_path / "q", **LOAD)
    assert_same_state(model, reloaded)
    assert torch.equal(run(reloaded), out)


@pytest.mark.parametrize("mode", MODES)
def test_diffusers_checkpoint_loads_in_qcore(flux: Flux, tmp_path: Path, mode: str) -> None:
    theirs = diffusers.FluxTransformer2DModel.from_pretrained(
        flux.path, quantization_config=diffusers.BitsAndBytesConfig(**MODES[mode]), torch_dtype=torch.bfloat16
    )
    theirs.save_pretrained(tmp_path / "diffusers")
    ours = qcore.from_pretrained(diffusers.FluxTransformer2DModel, tmp_path / "diffusers", **LOAD)
    assert_same_state(theirs, ours)
    assert torch.equal(run(ours), run(theirs))


# Small shards put some statistics in another file than their weight: diffusers 0.42.1 loads that for
# 8-bit, but its 4-bit loader cannot (ValueError naming quantized_stats), a diffusers bug.
DIFFUSERS_4BIT_SHARDS = pytest.mark.xfail(
    raises=ValueError, strict=False, reason="diffusers' 4-bit loader wants statistics in their weight's shard"
)


@pytest.mark.parametrize(
    ("mode", "max_shard_size"),
    [
        ("nf4", "10GB"),
        ("8bit", "10GB"),
        pytest.param("nf4", "20KB", marks=DIFFUSERS_4BIT_SHARDS),
        ("8bit", "20KB"),
    ],
)
def test_qcore_checkpoint_loads_in_diffusers(
    flux: Flux, tmp_path: Path, mode: str, max_shard_size: str
) -> None:
    ours = qcore.from_pretrained(
        diffusers.FluxTransformer2DModel,
        flux.path,
        quantization_config=qcore_bnb.BitsAndBytesConfig(**MODES[mode]),
        **LOAD,
    )
    qcore.save_pretrained(ours, tmp_path / "qcore", max_shard_size=max_shard_size)
    # qcore reads its own checkpoint back bit-exactly, sharded or not.
    assert_same_state(
        ours, qcore.from_pretrained(diffusers.FluxTransformer2DModel, tmp_path / "qcore", **LOAD)
    )
    theirs = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "qcore", torch_dtype=torch.bfloat16)
    assert_same_state(ours, theirs)
    assert torch.equal(run(theirs), run(ours))


@pytest.mark.parametrize("mode", MODES)
def test_same_quantization_as_diffusers(flux: Flux, mode: str) -> None:
    ours = qcore.from_pretrained(
        diffusers.FluxTransformer2DModel,
        flux.path,
        quantization_config=qcore_bnb.BitsAndBytesConfig(**MODES[mode]),
        **LOAD,
    )
    theirs = diffusers.FluxTransformer2DModel.from_pretrained(
        flux.path, quantization_config=diffusers.BitsAndBytesConfig(**MODES[mode]), torch_dtype=torch.bfloat16
    )
    assert quantized_modules(ours) == quantized_modules(theirs)
    assert len(quantized_modules(ours)) == 28
    assert_same_state(ours, theirs)
    assert torch.equal(run(ours), run(theirs))
