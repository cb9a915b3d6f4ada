"""bitsandbytes' import-time warnings reach a user only with ``qcore -v``, under qcore's loggers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import qcore
from helpers.models import make_tiny

TESTS = Path(__file__).resolve().parents[3] / "tests"  # for helpers.models in the child process
NOISE = "from kernels-community"  # bitsandbytes' line on AVX512-BF16 CPUs without the `kernels` package

LOAD = """
import sys, torch
import qcore, qcore_bnb
from helpers.models import TinyTransformer
config = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
model = qcore.from_pretrained(TinyTransformer, sys.argv[1], quantization_config=config)
model(torch.randn(2, 64, dtype=torch.float16))  # bitsandbytes loads default to float16
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
    path = tmp_path_factory.mktemp("bnb-noise") / "bf16"
    qcore.save_pretrained(make_tiny(), path)
    return path


@pytest.fixture(scope="module")
def bare_import_stderr() -> str:
    result = run("-c", "import bitsandbytes")
    assert result.returncode == 0, result.stderr
    return result.stderr


def test_a_load_prints_nothing_of_bitsandbytes_import(bf16: Path, bare_import_stderr: str) -> None:
    result = run("-c", LOAD, str(bf16))
    assert result.returncode == 0, result.stderr
    assert NOISE not in result.stderr
    assert "Failed to load" not in result.stderr


def test_qcore_verbose_shows_it_under_qcore_bnb(bf16: Path, tmp_path: Path, bare_import_stderr: str) -> None:
    argv = ["quantize", str(bf16), str(tmp_path / "nf4"), "--model", "helpers.models:TinyTransformer"]
    quiet = run("-c", CLI, *argv, "--method", "bitsandbytes", "--set", "load_in_4bit=true")
    verbose = run(
        "-c",
        CLI,
        "-v",
        *argv[:2],
        str(tmp_path / "nf4-v"),
        *argv[3:],
        "--method",
        "bitsandbytes",
        "--set",
        "load_in_4bit=true",
    )
    assert quiet.returncode == 0 and verbose.returncode == 0, quiet.stderr + verbose.stderr
    assert NOISE not in quiet.stderr
    if NOISE in bare_import_stderr:  # only CPUs with AVX512-BF16 make bitsandbytes say it
        (line,) = [line for line in verbose.stderr.splitlines() if NOISE in line]
        assert line.startswith("qcore: INFO: bitsandbytes.backends.cpu.ops: ")
