"""qcore's helpers for backends, and the two ways a config dict is read (a user's, a checkpoint's)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import qcore
from helpers.int8_backend import Int8TestConfig
from helpers.models import TinyTransformer


def test_split_param_name() -> None:
    assert qcore.split_param_name("blocks.0.attn.weight") == ("blocks.0.attn", "weight")
    assert qcore.split_param_name("weight") == ("", "weight")


def test_get_module_for_param() -> None:
    model = TinyTransformer()
    module, name = qcore.get_module_for_param(model, "blocks.1.attn.bias")
    assert module is model.blocks[1].attn and name == "bias"
    linear = nn.Linear(2, 2)
    assert qcore.get_module_for_param(linear, "weight") == (linear, "weight")
    with pytest.raises(AttributeError):
        qcore.get_module_for_param(model, "blocks.9.attn.weight")


AUTO = {"cuda"} if torch.cuda.is_available() else {"cpu"}


@pytest.mark.parametrize(
    ("device_map", "expected"),
    [
        (None, {"cpu"}),
        ("cpu", {"cpu"}),
        ("cuda:1", {"cuda"}),
        (torch.device("meta"), {"meta"}),
        (0, {"cuda"}),
        ("auto", AUTO),
        ("balanced_low_0", AUTO),
        ({"blocks": "cpu", "proj_in": 0, "proj_out": torch.device("cuda", 1)}, {"cpu", "cuda"}),
        ({"": "disk"}, {"disk"}),
        ("not-a-device", set()),
        (True, set()),
        ({"blocks": {"nested": "cpu"}}, {"cpu"}),
    ],
)
def test_device_types(device_map: object, expected: set[str]) -> None:
    assert qcore.device_types(device_map) == expected


@pytest.mark.parametrize(
    ("installed", "minimum", "expected"),
    [
        ("0.45.0", "0.45", True),
        ("0.45.0.dev0", "0.45", True),
        ("0.45.1+cu121", "0.45", True),
        ("0.44.9", "0.45", False),
        ("1.0", "0.45", True),
        ("0.16", "0.16.1", False),
        ("0.18.0+git1234abc", "0.16", True),
        ("unknown", "0.16", True),
    ],
)
def test_version_at_least(installed: str, minimum: str, expected: bool) -> None:
    assert qcore.version_at_least(installed, minimum) is expected


def test_batched_checks_name_every_failed_key() -> None:
    checks = qcore.BatchedChecks()
    good, bad = torch.ones(4), torch.tensor([1.0, float("nan")])
    checks.require(torch.isfinite(good).all(), "a.scale", "holds NaN")
    checks.require(torch.isfinite(bad).all(), "b.scale", "holds NaN")
    checks.require((bad.nan_to_num() >= 0).all(), "c.scale", "is negative")
    checks.require(torch.isinf(bad).any(), "d.scale", "has no infinity")
    assert len(checks) == 4
    with pytest.raises(qcore.CorruptCheckpointError) as info:
        checks.verify("Re-save the checkpoint.")
    message = str(info.value)
    assert "'b.scale' holds NaN" in message and "'d.scale' has no infinity" in message
    assert "a.scale" not in message and "c.scale" not in message
    assert message.endswith("Re-save the checkpoint.")
    assert len(checks) == 0
    checks.verify()  # nothing left: passes


def test_reroute_log_messages_moves_only_matching_records(caplog: pytest.LogCaptureFixture) -> None:
    source = logging.getLogger("qcore_test_thirdparty.ops")
    target = logging.getLogger("qcore.test_backend")
    qcore.reroute_log_messages(source.name, [r"optional kernel \w+ missing"], target, logging.INFO)
    qcore.reroute_log_messages(source.name, [r"optional kernel"], target, logging.INFO)  # no second filter
    assert len(source.filters) == 1
    with caplog.at_level(logging.WARNING):
        source.warning("optional kernel %s missing", "gemm")
        source.warning("the weights are on fire")
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("qcore_test_thirdparty.ops", "the weights are on fire")
    ]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qcore"):
        source.warning("optional kernel %s missing", "gemm")
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("qcore.test_backend", logging.INFO, "qcore_test_thirdparty.ops: optional kernel gemm missing")
    ]


# --- config dicts -------------------------------------------------------------------------------


def test_option_names() -> None:
    assert Int8TestConfig.option_names() == {"quant_method", "modules_to_not_convert", "compute_dtype"}


def test_user_dict_is_as_strict_as_the_constructor() -> None:
    with pytest.raises(qcore.ConfigError) as info:
        Int8TestConfig.from_user_dict({"quant_method": "int8-test", "compute_dtyp": "float16"})
    assert info.value.option == "compute_dtyp"
    assert "did you mean 'compute_dtype'" in str(info.value)
    with pytest.raises(qcore.ConfigError, match="has no option 'bits'; its options are: compute_dtype"):
        Int8TestConfig.from_user_dict({"bits": 4})
    with pytest.raises(qcore.ConfigError, match="must be a dict"):
        Int8TestConfig.from_user_dict(["compute_dtype"])  # type: ignore[arg-type]
    assert Int8TestConfig.from_user_dict({"compute_dtype": "float16"}) == Int8TestConfig(
        compute_dtype="float16"
    )


def test_checkpoint_dict_drops_unknown_keys_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    data = {"quant_method": "int8-test", "compute_dtype": "float16", "written_by_a_newer_version": 1}
    with caplog.at_level(logging.WARNING, logger="qcore"):
        config = Int8TestConfig.from_checkpoint_dict(data, "ckpt/config.json")
    assert config == Int8TestConfig(compute_dtype="float16")
    assert "ckpt/config.json" in caplog.text and "'written_by_a_newer_version'" in caplog.text


def test_user_dict_through_from_pretrained(int8_backend: qcore.Backend, tiny_ckpt: Path) -> None:
    with pytest.raises(qcore.ConfigError) as info:
        qcore.from_pretrained(
            TinyTransformer,
            tiny_ckpt,
            quantization_config={"quant_method": "int8-test", "compute_dtyp": "float16"},
        )
    assert info.value.option == "compute_dtyp"


def test_checkpoint_dict_through_from_pretrained(
    int8_backend: qcore.Backend, tiny_ckpt: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = qcore.from_pretrained(TinyTransformer, tiny_ckpt, quantization_config=Int8TestConfig())
    qcore.save_pretrained(model, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["quantization_config"]["written_by_a_newer_version"] = True
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="qcore"):
        again = qcore.from_pretrained(TinyTransformer, tmp_path / "q")
    assert again.hf_quantizer.quantization_config == Int8TestConfig()
    assert "'written_by_a_newer_version'" in caplog.text
    shutil.rmtree(tmp_path / "q")
