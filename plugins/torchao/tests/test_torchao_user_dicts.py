"""Dict configs: a user's dict is as strict as TorchAoConfig(...); a checkpoint's quantization_config
tolerates the keys transformers writes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import qcore
from helpers.damage import assert_names_option, quantize_and_save, save_tiny, with_quantization_config
from helpers.models import TinyTransformer
from qcore_torchao import TorchAoConfig


@pytest.fixture(scope="module")
def bf16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("torchao-dicts"))


@pytest.fixture(scope="module")
def int8wo(bf16: Path) -> Path:
    return quantize_and_save(bf16, TorchAoConfig("int8wo"), bf16.parent / "int8wo")


@pytest.mark.parametrize(
    ("config", "key", "suggestion"),
    [
        ({"quant_typ": "int8wo"}, "quant_typ", "quant_type"),
        (
            {"quant_type": "int8wo", "modules_to_not_covert": ["proj_out"]},
            "modules_to_not_covert",
            "modules_to_not_convert",
        ),
        (
            {"quant_type": "int8wo", "include_input_output_embeddings": False},
            "include_input_output_embeddings",
            None,
        ),
    ],
)
def test_user_dict_with_an_unknown_key_is_refused(
    bf16: Path, config: dict[str, object], key: str, suggestion: str | None
) -> None:
    with pytest.raises(qcore.ConfigError) as info:
        TinyTransformer.from_pretrained(bf16, quantization_config={"quant_method": "torchao", **config})
    assert_names_option(info.value, key, suggestion)


def test_transformers_keys_in_a_checkpoint_load_silently(
    int8wo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = with_quantization_config(
        int8wo,
        tmp_path / "transformers",
        include_input_output_embeddings=False,
        untie_embedding_weights=False,
    )
    with caplog.at_level(logging.WARNING, logger="qcore"):
        model = TinyTransformer.from_pretrained(path)
    assert model.hf_quantizer.pre_quantized
    assert model.hf_quantizer.quantization_config == TorchAoConfig("int8wo")
    assert "include_input_output_embeddings" not in caplog.text


def test_unknown_checkpoint_keys_load_with_a_warning_naming_them(
    int8wo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = with_quantization_config(int8wo, tmp_path / "newer", some_future_field=True)
    with caplog.at_level(logging.WARNING, logger="qcore"):
        model = TinyTransformer.from_pretrained(path)
    assert model.hf_quantizer.quantization_config == TorchAoConfig("int8wo")
    assert "'some_future_field'" in caplog.text


def test_nested_fqn_to_config_is_refused_before_loading(bf16: Path) -> None:
    from torchao.quantization import FqnToConfig, Int8WeightOnlyConfig

    inner = FqnToConfig({"attn": Int8WeightOnlyConfig()})
    config = TorchAoConfig(FqnToConfig({"proj_in": Int8WeightOnlyConfig(), "blocks.0": inner}))
    with pytest.raises(qcore.ConfigError, match="nested FqnToConfig.*'blocks.0'") as info:
        TinyTransformer.from_pretrained(bf16, quantization_config=config)
    assert info.value.option == "quant_type"


def test_fqn_to_config_quantizes_only_the_modules_it_names(bf16: Path) -> None:
    from torchao.quantization import FqnToConfig, Int8WeightOnlyConfig
    from torchao.utils import TorchAOBaseTensor

    config = TorchAoConfig(FqnToConfig({"proj_in": Int8WeightOnlyConfig(), "proj_out": None}))
    model = TinyTransformer.from_pretrained(bf16, quantization_config=config)
    assert isinstance(model.proj_in.weight, TorchAOBaseTensor)
    assert not isinstance(model.proj_out.weight, TorchAOBaseTensor)
    assert not isinstance(model.blocks[0].attn.weight, TorchAOBaseTensor)
