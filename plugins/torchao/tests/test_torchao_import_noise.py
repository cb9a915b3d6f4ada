"""torchao's import-time warnings (optional C++ kernels that do not load here, torch's deprecation of
its enum registration) reach a user only with ``qcore -v``, under the ``qcore.torchao`` logger."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import qcore
from helpers.models import make_tiny

TESTS = Path(__file__).resolve().parents[3] / "tests"  # for helpers.models in the child process
NOISE = ("Failed to load", "is an Enum subclass", "Skipping import of cpp extensions")

LOAD = """
import sys, torch
import qcore, qcore_torchao
from helpers.models import TinyTransformer
config = qcore_torchao.TorchAoConfig("int8wo")
model = TinyTransformer.from_pretrained(sys.argv[1], quantization_config=config)
model(torch.randn(2, 64, dtype=torch.bfloat16))
"""
CLI = "import sys; from qcore.cli import main; sys.exit(main())"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def bf16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("torchao-noise") / "bf16"
    qcore.save_pretrained(make_tiny(), path)
    return path


@pytest.fixture(scope="module")
def bare_import_noise() -> list[str]:
    result = run("-c", "import torchao.quantization")
    assert result.returncode == 0, result.stderr
    return [line for line in result.stderr.splitlines() if any(n in line for n in NOISE)]


def test_a_load_prints_nothing_of_torchao_import(bf16: Path, bare_import_noise: list[str]) -> None:
    result = run("-c", LOAD, str(bf16))
    assert result.returncode == 0, result.stderr
    assert not [line for line in result.stderr.splitlines() if any(n in line for n in NOISE)], result.stderr


def test_qcore_verbose_shows_it_under_qcore(bf16: Path, tmp_path: Path, bare_import_noise: list[str]) -> None:
    model = ["--model", "helpers.models:TinyTransformer", "--method", "torchao", "--set", "quant_type=int8wo"]
    quiet = run("-c", CLI, "quantize", str(bf16), str(tmp_path / "q"), *model)
    verbose = run("-c", CLI, "-v", "quantize", str(bf16), str(tmp_path / "v"), *model)
    assert quiet.returncode == 0 and verbose.returncode == 0, quiet.stderr + verbose.stderr
    assert not [line for line in quiet.stderr.splitlines() if any(n in line for n in NOISE)], quiet.stderr
    shown = [line for line in verbose.stderr.splitlines() if any(n in line for n in NOISE)]
    assert all(line.startswith("qcore: INFO: ") for line in shown), shown
    for line in bare_import_noise:
        message = line.split("] ", 1)[-1]  # torch's own log lines start with a time and source prefix
        assert any(seen.endswith(message) for seen in shown), (line, verbose.stderr)
