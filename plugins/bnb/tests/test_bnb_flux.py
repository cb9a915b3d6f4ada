"""An unmodified diffusers FluxTransformer2DModel (tiny config) through qcore-bnb on CPU.

Measured relative L2 error of the output against the bf16 model: nf4 0.129, LLM.int8 0.009.
"""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch

import qcore
from helpers.models import flux_inputs, tiny_flux_config
from qcore_bnb import BitsAndBytesConfig

diffusers = pytest.importorskip("diffusers")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def flux(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(**tiny_flux_config()).to(torch.bfloat16).eval()
    path = tmp_path_factory.mktemp("flux") / "bf16"
    model.save_pretrained(path)  # diffusers' own writer
    with torch.no_grad():
        return path, model(**flux_inputs())[0]


def test_flux_loads_in_nf4_on_cpu_and_round_trips(flux: tuple, tmp_path: Path) -> None:
    path, ref = flux
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    model = qcore.from_pretrained(
        diffusers.FluxTransformer2DModel, path, quantization_config=config, torch_dtype=torch.bfloat16
    )
    # By name: another test module may have re-imported diffusers' lazily loaded model modules.
    assert f"{type(model).__module__}.{type(model).__qualname__}".endswith(
        "transformer_flux.FluxTransformer2DModel"
    )
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    plain = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert len(quantized) > 20 and not plain
    assert (
        model.is_loaded_in_4bit and model.config.quantization_config is model.hf_quantizer.quantization_config
    )
    with torch.no_grad():
        out = model(**flux_inputs())[0]
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert rel_err(out, ref) < 0.2
    # Refused by qcore's DtypeCastError, or by diffusers' own guard (a ValueError), which reads the
    # is_loaded_in_4bit flag the backend sets.
    with pytest.raises((qcore.DtypeCastError, ValueError)):
        model.to(torch.float32)

    qcore.save_pretrained(model, tmp_path / "nf4")
    reloaded = qcore.from_pretrained(
        diffusers.FluxTransformer2DModel, tmp_path / "nf4", torch_dtype=torch.bfloat16
    )
    with torch.no_grad():
        assert torch.equal(reloaded(**flux_inputs())[0], out)
    # diffusers reads the config qcore wrote (it refuses bitsandbytes weights on CPU, so the GPU script
    # tests diffusers loading the weights).
    config_dict = diffusers.FluxTransformer2DModel.load_config(tmp_path / "nf4")
    theirs = diffusers.BitsAndBytesConfig.from_dict(config_dict["quantization_config"])
    assert theirs.to_dict() == config.to_dict()


def test_flux_loads_in_8bit_on_cpu(flux: tuple) -> None:
    path, ref = flux
    model = qcore.from_pretrained(
        diffusers.FluxTransformer2DModel,
        path,
        quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True},
        torch_dtype=torch.bfloat16,
    )
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules()) and model.is_loaded_in_8bit
    with torch.no_grad():
        out = model(**flux_inputs())[0]
    assert rel_err(out, ref) < 0.03
