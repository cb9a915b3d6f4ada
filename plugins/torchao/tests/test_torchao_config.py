"""TorchAoConfig: strings and torchao config instances, JSON round trips, diffusers' forms, bad input."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from torchao.core.config import config_to_dict
from torchao.quantization import (
    Float8DynamicActivationFloat8WeightConfig,
    Float8WeightOnlyConfig,
    FqnToConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8DynamicActivationIntxWeightConfig,
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
)
from torchao.quantization.granularity import PerAxis, PerGroup, PerRow, PerTensor
from torchao.quantization.quant_primitives import MappingType

import qcore
from qcore_torchao import TorchAoConfig, quant_type_names

# Strings whose config needs a package this CPU box lacks (int4 'plain' packing needs mslk) are
# tested separately; every other string must build, serialize and parse back.
EXPECTED = {
    "int8wo": Int8WeightOnlyConfig(),
    "int8_weight_only": Int8WeightOnlyConfig(),
    "int8dq": Int8DynamicActivationInt8WeightConfig(),
    "int8_dynamic_activation_int8_weight": Int8DynamicActivationInt8WeightConfig(),
    "int4wo": Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"),
    "int4_weight_only": Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"),
    "int4dq": Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32)),
    "float8wo": Float8WeightOnlyConfig(weight_dtype=torch.float8_e4m3fn),
    "float8wo_e4m3": Float8WeightOnlyConfig(weight_dtype=torch.float8_e4m3fn),
    "float8wo_e5m2": Float8WeightOnlyConfig(weight_dtype=torch.float8_e5m2),
    "float8dq": Float8DynamicActivationFloat8WeightConfig(),
    "float8dq_e4m3_tensor": Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor()),
    "float8dq_tensor": Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor()),
    "float8dq_e4m3_row": Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
    "float8dq_row": Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
    "int2wo": IntxWeightOnlyConfig(weight_dtype=torch.int2, granularity=PerAxis(0)),
    "uint4wo": IntxWeightOnlyConfig(
        weight_dtype=torch.int4, granularity=PerGroup(64), mapping_type=MappingType.ASYMMETRIC
    ),
}
REFUSED = {"float8_static_activation_float8_weight", "fpx_weight_only"}


def test_every_string_round_trips_through_json() -> None:
    built = 0
    for name in quant_type_names():
        if name in REFUSED:
            with pytest.raises(qcore.ConfigError):
                TorchAoConfig(name)
            continue
        config = TorchAoConfig(name, modules_to_not_convert=["proj_out"])
        data = json.loads(config.to_json_string())
        assert data["quant_method"] == "torchao"
        assert set(data["quant_type"]) == {"default"}
        assert data["modules_to_not_convert"] == ["proj_out"]
        again = TorchAoConfig.from_dict(data)
        assert again == config and again.quant_type == config.quant_type, name
        assert qcore.get_backend("torchao").config_class.from_dict(config.to_dict()) == config
        built += 1
    assert built >= 30


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_string_maps_to_the_torchao_config(name: str) -> None:
    config = TorchAoConfig(name)
    assert config.quant_type == EXPECTED[name]
    assert config == TorchAoConfig(EXPECTED[name])
    assert config.to_dict()["quant_type"]["default"] == config_to_dict(EXPECTED[name])


def test_string_options() -> None:
    assert TorchAoConfig("int4wo", group_size=64).quant_type.group_size == 64
    assert TorchAoConfig("int8wo", group_size=32).quant_type.granularity == PerGroup(32)
    assert TorchAoConfig("int4dq", group_size=64).quant_type.weight_granularity == PerGroup(64)
    assert TorchAoConfig("uint3wo", group_size=16).quant_type == IntxWeightOnlyConfig(
        weight_dtype=torch.int3, granularity=PerGroup(16), mapping_type=MappingType.ASYMMETRIC
    )
    assert TorchAoConfig("INT8WO") == TorchAoConfig("int8wo")


@pytest.mark.parametrize(
    "instance",
    [
        Int8WeightOnlyConfig(granularity=PerGroup(32)),
        Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
        Int4WeightOnlyConfig(group_size=32, int4_packing_format="tile_packed_to_4d"),
        IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
        Int8DynamicActivationInt8WeightConfig(),
        FqnToConfig({"blocks.0.attn": Int8WeightOnlyConfig(), "re:.*proj_out": None}),
    ],
    ids=lambda c: type(c).__name__,
)
def test_instance_config_json_round_trip(instance: object) -> None:
    config = TorchAoConfig(instance)
    text = config.to_json_string()
    assert text == config.to_json_string(use_diff=True)
    again = TorchAoConfig.from_dict(json.loads(text))
    assert again == config and again.quant_type == instance
    assert hash(again) == hash(config)
    assert copy.deepcopy(config) == config


def test_diffusers_config_reads_and_writes_the_same_dict() -> None:
    import diffusers

    ours = TorchAoConfig("int8wo", modules_to_not_convert=["proj_out"])
    theirs = diffusers.TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=["proj_out"])
    assert ours.to_dict() == theirs.to_dict()
    assert diffusers.TorchAoConfig.from_dict(ours.to_dict()).quant_type == ours.quant_type
    assert TorchAoConfig.from_dict(theirs.to_dict()) == ours


def test_legacy_string_form_of_older_diffusers_loads() -> None:
    legacy = {
        "quant_method": "torchao",
        "quant_type": "int4wo",
        "quant_type_kwargs": {"group_size": 64},
        "modules_to_not_convert": None,
    }
    config = TorchAoConfig.from_dict(legacy)
    assert config == TorchAoConfig("int4wo", group_size=64)
    assert config.to_dict()["quant_type"]["default"]["_type"] == "Int4WeightOnlyConfig"


def test_user_objects_are_not_mutated() -> None:
    skip = ["proj_out"]
    data = TorchAoConfig("int8wo", modules_to_not_convert=skip).to_dict()
    before = json.dumps(data, sort_keys=True)
    config = TorchAoConfig.from_dict(data)
    config.modules_to_not_convert.append("blocks")
    assert skip == ["proj_out"]
    assert json.dumps(data, sort_keys=True) == before


# --- bad input ----------------------------------------------------------------------------------


def test_unknown_string_names_the_choices() -> None:
    with pytest.raises(qcore.ConfigError, match="unknown torchao quant_type 'int9wo'.*int8wo") as info:
        TorchAoConfig("int9wo")
    assert info.value.option == "quant_type"


@pytest.mark.parametrize(
    "bad", [8, None, Int8WeightOnlyConfig, {"_type": "Int8WeightOnlyConfig"}, torch.int8]
)
def test_wrong_quant_type_type(bad: object) -> None:
    with pytest.raises(qcore.ConfigError, match="AOBaseConfig instance") as info:
        TorchAoConfig(bad)
    assert info.value.option == "quant_type"


def test_bad_options() -> None:
    with pytest.raises(qcore.ConfigError, match="does not take the option.*group_siz.*group_size") as info:
        TorchAoConfig("int4wo", group_siz=64)
    assert info.value.option == "group_siz"
    with pytest.raises(qcore.ConfigError, match="apply only to a string quant_type"):
        TorchAoConfig(Int8WeightOnlyConfig(), group_size=32)
    with pytest.raises(qcore.ConfigError, match="positive integer"):
        TorchAoConfig("int4wo", group_size=0)
    with pytest.raises(qcore.ConfigError, match="int4_packing_format 'opaque'"):
        TorchAoConfig("int4wo", int4_packing_format="opaque")
    with pytest.raises(qcore.ConfigError, match="list of module names") as info:
        TorchAoConfig("int8wo", modules_to_not_convert="proj_out")
    assert info.value.option == "modules_to_not_convert"


def test_strings_needing_a_missing_feature_say_what_is_needed() -> None:
    import importlib.util

    if importlib.util.find_spec("mslk") is None:
        with pytest.raises(qcore.ConfigError, match="mslk"):
            TorchAoConfig("int4wo", int4_packing_format="plain")
    with pytest.raises(qcore.ConfigError, match="calibrated activation scale.*Float8StaticActivation"):
        TorchAoConfig("float8_static_activation_float8_weight")
    with pytest.raises(qcore.ConfigError, match="fpX weight-only quantization was removed"):
        TorchAoConfig("fp6_e3m2")


def _config_dict(default: object) -> dict[str, object]:
    return {"quant_method": "torchao", "modules_to_not_convert": None, "quant_type": {"default": default}}


@pytest.mark.parametrize(
    "type_name",
    [
        "os.system",
        "system",
        "quantize_",
        "torch.nn.Linear",
        "Int8Tensor",
        "AOBaseConfig.__subclasses__",
        "Linear",
    ],
)
def test_config_naming_a_class_outside_torchao_configs_is_refused(type_name: str) -> None:
    with pytest.raises(qcore.ConfigError, match=f"names {type_name!r}") as info:
        TorchAoConfig.from_dict(_config_dict({"_type": type_name, "_version": 1, "_data": {}}))
    assert info.value.option == "quant_type"


def test_nested_non_torchao_class_is_refused() -> None:
    data = config_to_dict(Int8WeightOnlyConfig())
    data["_data"]["granularity"] = {"_type": "OrderedDict", "_data": {}}
    with pytest.raises(qcore.ConfigError, match=r"granularity names 'OrderedDict'"):
        TorchAoConfig.from_dict(_config_dict(data))
    data["_data"]["granularity"] = {"_type": "torch.dtype", "_data": "load"}
    with pytest.raises(qcore.ConfigError, match="'load' is not a torch dtype"):
        TorchAoConfig.from_dict(_config_dict(data))


def test_malformed_config_dicts() -> None:
    with pytest.raises(qcore.ConfigError, match="exactly one key, 'default'"):
        TorchAoConfig.from_dict({"quant_method": "torchao", "quant_type": {"default": {}, "blocks": {}}})
    with pytest.raises(qcore.ConfigError, match="needs 'quant_type'"):
        TorchAoConfig.from_dict({"quant_method": "torchao"})
    with pytest.raises(qcore.ConfigError, match="unknown torchao quantization_config field.*load_in_8bit"):
        TorchAoConfig.from_dict({**TorchAoConfig("int8wo").to_dict(), "load_in_8bit": True})
    with pytest.raises(qcore.ConfigMismatchError):
        TorchAoConfig.from_dict({**TorchAoConfig("int8wo").to_dict(), "quant_method": "bitsandbytes"})
    stale = config_to_dict(Int8WeightOnlyConfig())
    stale["_data"]["no_such_field"] = 1
    with pytest.raises(qcore.ConfigError, match="cannot build Int8WeightOnlyConfig from the stored fields"):
        TorchAoConfig.from_dict(_config_dict(stale))


def test_other_config_versions_parse_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    data = config_to_dict(Int8WeightOnlyConfig())
    data["_version"] = 3  # as a later torchao might write it
    data["_data"]["granularity"]["_version"] = 7
    with caplog.at_level(logging.WARNING, logger="qcore.torchao"):
        config = TorchAoConfig.from_dict(_config_dict(data))
    assert config.quant_type.version == 3 and config.quant_type.granularity == PerRow()
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "PerRow 7 -> 1" in messages
    assert "Int8WeightOnlyConfig" in messages and "version" in messages


def test_config_version_the_installed_torchao_dropped_is_a_config_error() -> None:
    data = config_to_dict(Int8WeightOnlyConfig())
    data["_version"] = 1
    with pytest.raises(qcore.ConfigError, match="cannot build Int8WeightOnlyConfig.*version 1") as info:
        TorchAoConfig.from_dict(_config_dict(data))
    assert info.value.option == "quant_type"
