"""bitsandbytes' import-time warnings reach a user only with ``qcore -v``, under qcore's loggers."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.damage import save_tiny
from helpers.noise import quantize_quiet_and_verbose, run_python

NOISE = "from kernels-community"  # bitsandbytes' line on AVX512-BF16 CPUs without the `kernels` package

LOAD = """
import sys, torch
import qcore, qcore_bnb
from helpers.models import TinyTransformer
config = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
model = qcore.from_pretrained(TinyTransformer, sys.argv[1], quantization_config=config)
model(torch.randn(2, 64, dtype=torch.float16))  # bitsandbytes loads default to float16
"""


@pytest.fixture(scope="module")
def bf16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("bnb-noise"))


@pytest.fixture(scope="module")
def bare_import_stderr() -> str:
    result = run_python("-c", "import bitsandbytes")
    assert result.returncode == 0, result.stderr
    return result.stderr


def test_a_load_prints_nothing_of_bitsandbytes_import(bf16: Path, bare_import_stderr: str) -> None:
    result = run_python("-c", LOAD, str(bf16))
    assert result.returncode == 0, result.stderr
    assert NOISE not in result.stderr
    assert "Failed to load" not in result.stderr


def test_qcore_verbose_shows_it_under_qcore_bnb(bf16: Path, tmp_path: Path, bare_import_stderr: str) -> None:
    options = ["--method", "bitsandbytes", "--set", "load_in_4bit=true"]
    quiet, verbose = quantize_quiet_and_verbose(bf16, tmp_path, *options)
    assert NOISE not in quiet.stderr
    if NOISE in bare_import_stderr:  # only CPUs with AVX512-BF16 make bitsandbytes say it
        (line,) = [line for line in verbose.stderr.splitlines() if NOISE in line]
        assert line.startswith("qcore: INFO: bitsandbytes.backends.cpu.ops: ")
