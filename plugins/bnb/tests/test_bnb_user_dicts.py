"""Dict configs: a user's dict and ``qcore quantize --set`` are as strict as BitsAndBytesConfig(...);
a checkpoint's quantization_config tolerates what other writers add."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import qcore
from helpers.damage import assert_names_option, quantize_and_save, save_tiny, with_quantization_config
from helpers.models import TinyTransformer
from qcore.cli import main
from qcore_bnb import BitsAndBytesConfig


@pytest.fixture(scope="module")
def bf16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("bnb-dicts"))


@pytest.fixture(scope="module")
def nf4(bf16: Path) -> Path:
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    return quantize_and_save(bf16, config, bf16.parent / "nf4")


TYPOS = [
    ({"bnb_4bit_quant_typ": "nf4"}, "bnb_4bit_quant_typ", "bnb_4bit_quant_type"),
    ({"load_in_4bits": True}, "load_in_4bits", "load_in_4bit"),
    ({"bnb_4bit_compute_type": "bfloat16"}, "bnb_4bit_compute_type", "bnb_4bit_compute_dtype"),
    ({"llm_int8_skip_module": ["proj_out"]}, "llm_int8_skip_module", "llm_int8_skip_modules"),
    ({"double_quant": True}, "double_quant", None),
]


@pytest.mark.parametrize(("extra", "key", "suggestion"), TYPOS)
def test_user_dict_with_a_mistyped_key_is_refused(
    bf16: Path, extra: dict[str, object], key: str, suggestion: str | None
) -> None:
    config = {"quant_method": "bitsandbytes", "load_in_4bit": True, **extra}
    with pytest.raises(qcore.ConfigError) as info:
        qcore.from_pretrained(TinyTransformer, bf16, quantization_config=config)
    assert_names_option(info.value, key, suggestion)


def test_user_dict_in_config_json_form_is_accepted(bf16: Path) -> None:
    written = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4").to_dict()
    assert "_load_in_4bit" in written
    model = qcore.from_pretrained(TinyTransformer, bf16, quantization_config=written)
    assert model.hf_quantizer.quantization_config.bnb_4bit_quant_type == "nf4"


def test_cli_set_with_a_mistyped_key_exits_1_naming_it(
    bf16: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["quantize", str(bf16), str(tmp_path / "out"), "--model", "helpers.models:TinyTransformer"]
    code = main([*argv, "--method", "bitsandbytes", "--set", "load_in_4bits=true"])
    err = capsys.readouterr().err
    assert code == 1
    assert "'load_in_4bits'" in err and "did you mean 'load_in_4bit'" in err
    assert not (tmp_path / "out").exists()


def test_checkpoint_keys_of_a_newer_writer_load_with_a_warning(
    nf4: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = with_quantization_config(nf4, tmp_path / "newer", some_future_field=1, bnb_4bit_quant_typ="fp4")
    with caplog.at_level(logging.WARNING, logger="qcore"):
        model = qcore.from_pretrained(TinyTransformer, path, torch_dtype=torch.bfloat16)
    assert model.hf_quantizer.quantization_config.bnb_4bit_quant_type == "nf4"
    assert "'some_future_field'" in caplog.text and "'bnb_4bit_quant_typ'" in caplog.text
    assert str(path / "config.json") in caplog.text


def test_checkpoint_strings_in_the_warning_are_escaped(
    nf4: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = with_quantization_config(nf4, tmp_path / "hostile", **{"\x1b[31mred": 1})
    with caplog.at_level(logging.WARNING, logger="qcore"):
        qcore.from_pretrained(TinyTransformer, path, torch_dtype=torch.bfloat16)
    assert "\x1b" not in caplog.text and "\\x1b[31mred" in caplog.text
