"""``qcore quantize`` of a diffusers checkpoint: importing diffusers imports torchao and bitsandbytes
whenever they are installed, whatever backend ``--method`` names, and their import-time warnings (and
diffusers' own about torchao) reach a user only with ``qcore -v``, under qcore's logger."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from helpers.models import tiny_flux_config
from helpers.noise import CLI, CLI_WITH_INT8_TEST, lines_with, quantize_quiet_and_verbose, run_python

NOISE = (
    "Failed to load",  # torchao's C++ kernels, bitsandbytes' kernels-community kernel
    "Skipping import of cpp extensions",
    "is an Enum subclass",
    "kernels-community",
    "Unable to import `torchao` Tensor objects",
)

# --method -> (the distribution's module, its --set options); int8-test owns none of the noisy libraries.
METHODS = {
    "int8-test": (None, []),
    "bitsandbytes": ("qcore_bnb", ["--set", "load_in_4bit=true"]),
    "torchao": ("qcore_torchao", ["--set", "quant_type=int8wo"]),
}


@pytest.fixture(scope="module")
def flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    source = tmp_path_factory.mktemp("cli-noise") / "flux-bf16"
    FluxTransformer2DModel(**tiny_flux_config()).to(torch.bfloat16).save_pretrained(source)
    return source


@pytest.fixture(scope="module")
def bare_import_noise() -> list[str]:
    result = run_python("-c", "import diffusers; diffusers.FluxTransformer2DModel")
    assert result.returncode == 0, result.stderr
    return lines_with(result.stderr, NOISE)


@pytest.mark.parametrize("method", list(METHODS))
def test_diffusers_import_noise_shows_only_with_verbose(
    method: str, flux: Path, tmp_path: Path, bare_import_noise: list[str]
) -> None:
    module, options = METHODS[method]
    if module is not None and importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")
    cli = CLI_WITH_INT8_TEST if module is None else CLI
    quiet, verbose = quantize_quiet_and_verbose(
        flux, tmp_path, "--method", method, *options, model=None, cli=cli
    )
    assert not lines_with(quiet.stderr, NOISE), quiet.stderr
    assert "(FluxTransformer2DModel)" in quiet.stderr
    shown = lines_with(verbose.stderr, NOISE)
    assert all(line.startswith("qcore: INFO: ") for line in shown), shown
    for line in bare_import_noise:
        message = line.split("] ", 1)[-1]  # torch's own log lines start with a time and source prefix
        assert any(seen.endswith(message) for seen in shown), (line, verbose.stderr)
