"""qcore_bnb.BitsAndBytesConfig: diffusers' fields, defaults and config.json form; validation; no mutation."""

from __future__ import annotations

import copy
import inspect
import logging

import pytest
import torch

import qcore
from qcore_bnb import BitsAndBytesConfig

diffusers = pytest.importorskip("diffusers")

CASES = [
    {},
    {"load_in_4bit": True},
    {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": torch.bfloat16,
        "bnb_4bit_quant_storage": "bfloat16",
    },
    {"load_in_4bit": True, "bnb_4bit_compute_dtype": "float16", "bnb_4bit_quant_storage": torch.float32},
    {"load_in_8bit": True, "llm_int8_threshold": 4.5, "llm_int8_skip_modules": ["proj_out", "norm_out"]},
    {"load_in_8bit": True, "llm_int8_has_fp16_weight": True, "llm_int8_enable_fp32_cpu_offload": True},
]


@pytest.mark.parametrize("kwargs", CASES)
def test_to_dict_is_diffusers_config_json_form(kwargs: dict) -> None:
    ours = BitsAndBytesConfig(**kwargs).to_dict()
    theirs = diffusers.BitsAndBytesConfig(**kwargs).to_dict()
    assert ours == theirs


@pytest.mark.parametrize("kwargs", CASES)
def test_config_json_round_trips_both_ways(kwargs: dict) -> None:
    ours = BitsAndBytesConfig(**kwargs)
    theirs = diffusers.BitsAndBytesConfig.from_dict(ours.to_dict())
    assert theirs.to_dict() == ours.to_dict()
    back = BitsAndBytesConfig.from_dict(diffusers.BitsAndBytesConfig(**kwargs).to_dict())
    assert back == ours
    assert BitsAndBytesConfig.from_dict(ours.to_dict()) == ours


def test_defaults_match_diffusers() -> None:
    ours, theirs = BitsAndBytesConfig(), diffusers.BitsAndBytesConfig()
    # Every option diffusers' config takes, read from its signature: one it adds fails here.
    options = inspect.signature(diffusers.BitsAndBytesConfig.__init__).parameters
    names = [name for name, p in options.items() if name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD]
    assert len(names) == 10, names
    for name in names:
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.quantization_method() is None
    assert BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4").quantization_method() == "nf4"
    assert BitsAndBytesConfig(load_in_8bit=True).quantization_method() == "llm_int8"


def test_legacy_dict_without_quant_method_resolves_to_bitsandbytes() -> None:
    backend = qcore.get_backend("bitsandbytes")
    assert backend.distribution == "qcore-bnb"
    assert backend.config_class is BitsAndBytesConfig
    legacy = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16"}
    config = BitsAndBytesConfig.from_dict(legacy)
    assert config.load_in_4bit and config.bnb_4bit_compute_dtype == torch.bfloat16
    private_only = {"_load_in_8bit": True, "llm_int8_threshold": 5.0}
    assert BitsAndBytesConfig.from_dict(private_only).load_in_8bit


def test_unknown_on_disk_keys_are_ignored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    data = {**BitsAndBytesConfig(load_in_4bit=True).to_dict(), "some_future_field": 1}
    with caplog.at_level(logging.WARNING, logger="qcore_bnb"):
        config = BitsAndBytesConfig.from_dict(data)
    assert config.load_in_4bit
    assert "some_future_field" in caplog.text


BAD = [
    ({"load_in_4bit": True, "load_in_8bit": True}, "load_in_4bit", "choose one"),
    ({"load_in_4bit": True, "bnb_4bit_quant_type": "int4"}, "bnb_4bit_quant_type", "fp4, nf4"),
    (
        {"load_in_4bit": True, "bnb_4bit_compute_dtype": "int8"},
        "bnb_4bit_compute_dtype",
        "float32, float16, bfloat16",
    ),
    ({"load_in_4bit": True, "bnb_4bit_compute_dtype": 3}, "bnb_4bit_compute_dtype", "bfloat16"),
    ({"load_in_4bit": True, "bnb_4bit_quant_storage": "complex64"}, "bnb_4bit_quant_storage", "uint8"),
    ({"load_in_4bit": "yes"}, "load_in_4bit", "True or False"),
    ({"load_in_8bit": True, "llm_int8_threshold": "6"}, "llm_int8_threshold", "number"),
    (
        {"load_in_8bit": True, "llm_int8_skip_modules": "proj_out"},
        "llm_int8_skip_modules",
        "list of module names",
    ),
    ({"load_in_4bit": True, "bnb_4bit_quant_typ": "nf4"}, "bnb_4bit_quant_typ", "bnb_4bit_quant_type"),
]


@pytest.mark.parametrize(("kwargs", "option", "hint"), BAD)
def test_invalid_values_raise_config_error_naming_option_and_choices(
    kwargs: dict, option: str, hint: str
) -> None:
    with pytest.raises(qcore.ConfigError) as info:
        BitsAndBytesConfig(**kwargs)
    assert info.value.option == option
    assert option in str(info.value)
    assert hint in str(info.value)


def test_from_dict_with_disagreeing_private_and_public_flags() -> None:
    with pytest.raises(qcore.ConfigError, match="_load_in_4bit"):
        BitsAndBytesConfig.from_dict(
            {"quant_method": "bitsandbytes", "load_in_4bit": True, "_load_in_4bit": False}
        )


def test_from_dict_refuses_another_quant_method() -> None:
    with pytest.raises(qcore.ConfigMismatchError, match="torchao"):
        BitsAndBytesConfig.from_dict({"quant_method": "torchao", "load_in_4bit": True})


def test_skip_list_is_copied() -> None:
    skip = ["proj_out"]
    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    skip.append("norm_out")
    assert config.llm_int8_skip_modules == ["proj_out"]
    clone = copy.deepcopy(config)
    assert clone == config and clone.llm_int8_skip_modules is not config.llm_int8_skip_modules
