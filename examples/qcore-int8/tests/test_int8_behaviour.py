"""The example backend qcore-int8 in this environment: options, format checks, loading attributes,
device_map="auto" and a real diffusers model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import qcore

qcore_int8 = pytest.importorskip(
    "qcore_int8", reason="qcore-int8 is not installed here (pip install ./examples/qcore-int8)"
)


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qcore.testing import ConformanceModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("example") / "ref"
    qcore.save_pretrained(ConformanceModel().to(torch.bfloat16), path)
    return path


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"compute_dtype": "int4"}, "compute_dtype"),
        ({"compute_dtype": torch.int8}, "compute_dtype"),
        ({"modules_to_not_convert": "proj_out"}, "modules_to_not_convert"),
        ({"modules_to_not_convert": [1]}, "modules_to_not_convert"),
    ],
)
def test_config_rejects_bad_options(kwargs: dict, option: str) -> None:
    with pytest.raises(qcore.ConfigError) as info:
        qcore_int8.Int8Config(**kwargs)
    assert info.value.option == option and option in str(info.value)


def test_config_from_dict_rejects_unknown_option() -> None:
    with pytest.raises(qcore.ConfigError, match="Int8Config"):
        qcore_int8.Int8Config.from_dict({"quant_method": "int8", "bits": 4})


def test_config_copies_user_list() -> None:
    skip = ["proj_out"]
    config = qcore_int8.Int8Config(modules_to_not_convert=skip)
    skip.append("blocks")
    assert config.modules_to_not_convert == ["proj_out"]
    assert qcore_int8.Int8Config(compute_dtype=torch.float16).compute_dtype == "float16"


def test_quantize_per_channel_error_bound() -> None:
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    w[3] = 0.0  # an all-zero row must survive exactly
    q, scale = qcore_int8.quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (64,) and bool((scale > 0).all())
    restored = qcore_int8.dequantize_per_channel(q, scale, torch.float32)
    assert torch.equal(restored[3], torch.zeros(96))
    # Round to nearest: at most half a step per element.
    assert bool(((restored - w).abs() <= scale[:, None] / 2 + 1e-6).all())


def test_loading_attribute_compute_dtype_applies_to_prequantized(
    bf16_checkpoint: Path, tmp_path: Path
) -> None:
    from qcore.testing import ConformanceModel

    model = qcore.from_pretrained(
        ConformanceModel, bf16_checkpoint, quantization_config=qcore_int8.Int8Config()
    )
    qcore.save_pretrained(model, tmp_path / "int8")
    user = qcore_int8.Int8Config(compute_dtype="float32", modules_to_not_convert=["proj_out"])
    reloaded = qcore.from_pretrained(ConformanceModel, tmp_path / "int8", quantization_config=user)
    config = reloaded.hf_quantizer.quantization_config
    # compute_dtype is a loading attribute; the skip list is fixed by the checkpoint.
    assert config.compute_dtype == "float32" and config.modules_to_not_convert is None
    assert reloaded.proj_in.compute_dtype == torch.float32
    assert user.to_dict()["modules_to_not_convert"] == ["proj_out"]


def test_unknown_format_tag_is_refused(bf16_checkpoint: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from qcore.testing import ConformanceModel

    model = qcore.from_pretrained(
        ConformanceModel, bf16_checkpoint, quantization_config=qcore_int8.Int8Config()
    )
    qcore.save_pretrained(model, tmp_path / "int8")
    weights = tmp_path / "int8" / "diffusion_pytorch_model.safetensors"
    save_file(
        load_file(weights), weights, metadata={"format": "pt", qcore_int8.FORMAT_KEY: "int8-blockwise/9"}
    )
    with pytest.raises(qcore.CorruptCheckpointError, match=re.escape(qcore_int8.FORMAT_KEY)):
        qcore.from_pretrained(ConformanceModel, tmp_path / "int8")


def test_nan_weight_is_refused_by_name(bf16_checkpoint: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from qcore.testing import ConformanceModel

    path = tmp_path / "nan"
    qcore.save_pretrained(qcore.from_pretrained(ConformanceModel, bf16_checkpoint), path)
    weights = path / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["blocks.1.gate.weight"][0, 0] = float("nan")
    save_file(tensors, weights)
    with pytest.raises(qcore.CorruptCheckpointError, match=re.escape("'blocks.1.gate.weight'")):
        qcore.from_pretrained(ConformanceModel, path, quantization_config=qcore_int8.Int8Config())


def test_device_map_auto(bf16_checkpoint: Path) -> None:
    from qcore.testing import ConformanceModel

    model = qcore.from_pretrained(
        ConformanceModel, bf16_checkpoint, quantization_config={"quant_method": "int8"}, device_map="auto"
    )
    assert model.proj_in.weight.dtype == torch.int8 and model.proj_in.weight.device.type == "cpu"


def test_diffusers_flux_transformer(tmp_path: Path) -> None:
    """A real diffusers model: quantize on load, save, reload pre-quantized, same output."""
    from diffusers import FluxTransformer2DModel

    from helpers.models import flux_inputs, tiny_flux_config

    torch.manual_seed(0)
    reference = FluxTransformer2DModel(**tiny_flux_config()).to(torch.bfloat16).eval()
    reference.save_pretrained(tmp_path / "flux")
    config = qcore_int8.Int8Config(modules_to_not_convert=["proj_out"])
    model = qcore.from_pretrained(
        FluxTransformer2DModel, tmp_path / "flux", quantization_config=config, torch_dtype=torch.bfloat16
    )
    assert isinstance(model.transformer_blocks[0].attn.to_q, qcore_int8.Int8Linear)
    assert type(model.proj_out) is torch.nn.Linear
    with torch.no_grad():
        expected = reference(**flux_inputs())[0]
        actual = model(**flux_inputs())[0]
    error = float((actual.float() - expected.float()).norm() / expected.float().norm())
    assert 0 < error < 0.05
    qcore.save_pretrained(model, tmp_path / "flux-int8")
    reloaded = qcore.from_pretrained(FluxTransformer2DModel, tmp_path / "flux-int8")
    assert reloaded.config.quantization_config == config
    with torch.no_grad():
        assert torch.equal(reloaded(**flux_inputs())[0], actual)
