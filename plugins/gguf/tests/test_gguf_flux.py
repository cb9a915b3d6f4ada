"""Tiny city96-style Flux GGUF files through qcore against diffusers' from_single_file, bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flux_files import (
    TINY_FLUX,
    diffusers_flux_from_single_file,
    flux_inputs,
    write_bfl_flux_gguf,
    write_config_dir,
)

import qcore
from qcore_gguf import GGUFConfig, GGUFLinear, GGUFWeight

pytest.importorskip("diffusers")
from diffusers import FluxTransformer2DModel  # noqa: E402


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.uint8)


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_config_dir(tmp_path_factory.mktemp("flux-config"))


@pytest.mark.parametrize("quant_type", ["Q8_0", "Q4_K"])
def test_bit_identical_to_diffusers_from_single_file(
    quant_type: str, tmp_path: Path, config_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_bfl_flux_gguf(tmp_path / f"flux-{quant_type}.gguf", quant_type)
    theirs = diffusers_flux_from_single_file(path, config_dir, torch.bfloat16, monkeypatch)
    ours = qcore.from_pretrained(
        FluxTransformer2DModel,
        path,
        quantization_config=GGUFConfig(compute_dtype=torch.bfloat16),
        torch_dtype=torch.bfloat16,
    )
    their_state, our_state = theirs.state_dict(), ours.state_dict()
    assert set(our_state) == set(their_state)
    for key, value in their_state.items():
        assert type(our_state[key]) is type(value) or isinstance(value, torch.nn.Parameter), key
        assert our_state[key].dtype == value.dtype and torch.equal(_bits(our_state[key]), _bits(value)), key
        if hasattr(value, "quant_type"):
            assert our_state[key].quant_type == value.quant_type.name, key
    quantized = [n for n, m in ours.named_modules() if isinstance(m, GGUFLinear)]
    assert len(quantized) == sum(1 for v in their_state.values() if hasattr(v, "quant_type"))
    with torch.no_grad():
        expected = theirs(**flux_inputs())[0]
        actual = ours(**flux_inputs())[0]
    assert torch.equal(_bits(actual), _bits(expected))


def test_every_type_in_one_file_matches_diffusers(
    tmp_path: Path, config_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file mixing all block types (and F16/F32/BF16 tensors), as real quantizations mix them."""
    cycle = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16", "F16"]
    seen: dict[str, str] = {}

    def choose(name: str, shape: tuple[int, ...]) -> str:
        if len(shape) == 1:
            return "F32"
        kquant_ok = shape[-1] % 256 == 0
        for offset in range(len(cycle)):
            quant_type = cycle[(len(seen) + offset) % len(cycle)]
            if kquant_ok or not quant_type.endswith("_K"):
                seen[name] = quant_type
                return quant_type
        raise AssertionError(name)

    path = write_bfl_flux_gguf(tmp_path / "flux-mixed.gguf", choose)
    assert set(seen.values()) == set(cycle)
    theirs = diffusers_flux_from_single_file(path, config_dir, torch.bfloat16, monkeypatch)
    ours = qcore.from_pretrained(
        FluxTransformer2DModel,
        path,
        quantization_config=GGUFConfig(compute_dtype=torch.bfloat16),
        torch_dtype=torch.bfloat16,
    )
    with torch.no_grad():
        assert torch.equal(_bits(ours(**flux_inputs())[0]), _bits(theirs(**flux_inputs())[0]))


def test_plain_load_infers_the_config_and_keeps_blocks(tmp_path: Path) -> None:
    """No config.json, no quantization_config: the .gguf implies gguf, the shapes give the config."""
    path = write_bfl_flux_gguf(tmp_path / "flux.gguf", "Q4_K", prefix="")
    model = qcore.from_pretrained(FluxTransformer2DModel, path, torch_dtype=torch.bfloat16)
    for key, value in TINY_FLUX.items():
        if not key.startswith("_"):
            got = model.config[key]
            assert (list(got) if isinstance(got, tuple) else got) == value, key
    assert model.hf_quantizer.pre_quantized and model.quantization_method == "gguf"
    to_q = model.transformer_blocks[0].attn.to_q
    assert isinstance(to_q, GGUFLinear) and isinstance(to_q.weight, GGUFWeight)
    assert to_q.weight.quant_type == "Q4_K" and to_q.compute_dtype == torch.bfloat16
    assert type(model.x_embedder) is torch.nn.Linear  # in_features 64 is no whole K-block: F16 in the file
    with torch.no_grad():
        out = model(**flux_inputs())[0]
    assert torch.isfinite(out).all()


def test_config_argument_wins_over_inference(tmp_path: Path, config_dir: Path) -> None:
    path = write_bfl_flux_gguf(tmp_path / "flux.gguf", "Q8_0")
    wrong = {**TINY_FLUX, "num_layers": 3}
    with pytest.raises(qcore.QcoreError, match="transformer_blocks.2"):
        qcore.from_pretrained(FluxTransformer2DModel, path, config=wrong, torch_dtype=torch.bfloat16)
    for given in (config_dir, config_dir / "config.json", dict(TINY_FLUX)):
        model = qcore.from_pretrained(FluxTransformer2DModel, path, config=given, torch_dtype=torch.bfloat16)
        assert model.config.num_layers == TINY_FLUX["num_layers"]


def test_uninferable_config_asks_for_config(tmp_path: Path) -> None:
    from qcore_gguf.testing import write_gguf

    path = tmp_path / "plain.gguf"
    write_gguf(path, {"proj.weight": (torch.randn(32, 64).numpy(), "Q8_0")})
    with pytest.raises(qcore.ConfigError, match="config=") as info:
        qcore.from_pretrained(FluxTransformer2DModel, path)
    assert info.value.option == "config"


def test_save_reload_is_exact_and_dequantize_works(tmp_path: Path) -> None:
    path = write_bfl_flux_gguf(tmp_path / "flux.gguf", "Q4_K")
    model = qcore.from_pretrained(FluxTransformer2DModel, path, torch_dtype=torch.bfloat16)
    with torch.no_grad():
        expected = model(**flux_inputs())[0]
    qcore.save_pretrained(model, tmp_path / "saved")
    reloaded = qcore.from_pretrained(FluxTransformer2DModel, tmp_path / "saved")
    assert reloaded.hf_quantizer.quant_method == "gguf"
    for key, value in model.state_dict().items():
        other = reloaded.state_dict()[key]
        assert type(other) is type(value) and torch.equal(_bits(other), _bits(value)), key
    with torch.no_grad():
        assert torch.equal(reloaded(**flux_inputs())[0], expected)

    qcore.dequantize(reloaded)
    assert not any(isinstance(m, GGUFLinear) for m in reloaded.modules())
    to_q = reloaded.transformer_blocks[0].attn.to_q
    assert type(to_q.weight.data) is torch.Tensor and to_q.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = reloaded(**flux_inputs())[0]
    assert torch.equal(out, expected)  # the same weights, decoded once instead of per call
