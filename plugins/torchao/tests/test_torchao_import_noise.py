"""torchao's import-time warnings (optional C++ kernels that do not load here, torch's deprecation of
its enum registration) reach a user only with ``qcore -v``, under the ``qcore.torchao`` logger."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.damage import save_tiny
from helpers.noise import lines_with, quantize_quiet_and_verbose, run_python

NOISE = ("Failed to load", "is an Enum subclass", "Skipping import of cpp extensions")

LOAD = """
import sys, torch
import qcore, qcore_torchao
from helpers.models import TinyTransformer
config = qcore_torchao.TorchAoConfig("int8wo")
model = TinyTransformer.from_pretrained(sys.argv[1], quantization_config=config)
model(torch.randn(2, 64, dtype=torch.bfloat16))
"""


@pytest.fixture(scope="module")
def bf16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("torchao-noise"))


@pytest.fixture(scope="module")
def bare_import_noise() -> list[str]:
    result = run_python("-c", "import torchao.quantization")
    assert result.returncode == 0, result.stderr
    return lines_with(result.stderr, NOISE)


def test_a_load_prints_nothing_of_torchao_import(bf16: Path, bare_import_noise: list[str]) -> None:
    result = run_python("-c", LOAD, str(bf16))
    assert result.returncode == 0, result.stderr
    assert not lines_with(result.stderr, NOISE), result.stderr


def test_qcore_verbose_shows_it_under_qcore(bf16: Path, tmp_path: Path, bare_import_noise: list[str]) -> None:
    options = ["--method", "torchao", "--set", "quant_type=int8wo"]
    quiet, verbose = quantize_quiet_and_verbose(bf16, tmp_path, *options)
    assert not lines_with(quiet.stderr, NOISE), quiet.stderr
    shown = lines_with(verbose.stderr, NOISE)
    assert all(line.startswith("qcore: INFO: ") for line in shown), shown
    for line in bare_import_noise:
        message = line.split("] ", 1)[-1]  # torch's own log lines start with a time and source prefix
        assert any(seen.endswith(message) for seen in shown), (line, verbose.stderr)
