"""qcore-bnb quantizes the same modules as diffusers, to the bytes bitsandbytes' own Linear8bitLt holds.

diffusers refuses to *load* bitsandbytes weights without a GPU, but its module selection runs on a meta
model: its quantizer's ``preprocess_model`` is called here exactly as its ``from_pretrained`` calls it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import accelerate
import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file

import qcore
from helpers.models import TinyTransformer, tiny_flux_config
from qcore_bnb import BitsAndBytesConfig, BitsAndBytesQuantizer

diffusers = pytest.importorskip("diffusers")
from diffusers.quantizers import DiffusersAutoQuantizer  # noqa: E402
from diffusers.quantizers.bitsandbytes.utils import replace_with_bnb_linear  # noqa: E402

QUANTIZED = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)

MODES = {
    "8bit": dict(load_in_8bit=True),
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
}
# Skip lists on which diffusers' rule and qcore's whole-name rule agree ("linear" names leaf modules).
SKIPS: list[list[str] | None] = [
    None,
    ["proj_out"],
    ["context_embedder", "norm_out"],
    ["linear"],
    ["transformer_blocks.0.ff"],
    ["x_embedder", "single_transformer_blocks"],
]


def flux_skeleton() -> torch.nn.Module:
    with accelerate.init_empty_weights():
        return diffusers.FluxTransformer2DModel(**tiny_flux_config())


def tiny_skeleton() -> torch.nn.Module:
    with accelerate.init_empty_weights():
        return TinyTransformer()


def selection(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """(quantized Linear names, Linear names left as nn.Linear)."""
    quantized = [n for n, m in model.named_modules() if isinstance(m, QUANTIZED)]
    plain = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    return quantized, plain


def diffusers_selection(model: torch.nn.Module, options: dict[str, Any]) -> tuple[list[str], list[str]]:
    config = diffusers.BitsAndBytesConfig(**options)
    keep_fp32 = list(getattr(type(model), "_keep_in_fp32_modules", None) or [])
    if isinstance(model, diffusers.ModelMixin):
        quantizer = DiffusersAutoQuantizer.from_config(config, pre_quantized=False)
        quantizer.preprocess_model(model=model, device_map={"": "cpu"}, keep_in_fp32_modules=keep_fp32)
    else:
        # preprocess_model also writes into a diffusers config object, which qcore's own models lack;
        # the selection is this function, called with the list preprocess_model builds.
        skip = list(config.llm_int8_skip_modules or []) + keep_fp32
        replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=config)
    return selection(model)


def qcore_selection(model: torch.nn.Module, options: dict[str, Any]) -> tuple[list[str], list[str]]:
    quantizer = BitsAndBytesQuantizer(BitsAndBytesConfig(**options))
    keep_fp32 = list(getattr(type(model), "_keep_in_fp32_modules", None) or [])
    quantizer.preprocess_model(
        model=model, device_map={"": torch.device("cpu")}, keep_in_fp32_modules=keep_fp32
    )
    return selection(model)


@pytest.mark.parametrize("skip", SKIPS, ids=lambda s: "default" if s is None else ",".join(s))
@pytest.mark.parametrize("mode", sorted(MODES))
def test_flux_selection_equals_diffusers(mode: str, skip: list[str] | None) -> None:
    options = {**MODES[mode], "llm_int8_skip_modules": skip}
    theirs = diffusers_selection(
        flux_skeleton(), dict(options, llm_int8_skip_modules=list(skip or []) or None)
    )
    ours = qcore_selection(flux_skeleton(), options)
    assert ours == theirs
    quantized, plain = ours
    assert quantized, "every case quantizes something"
    if skip is None:
        # The output and embedding projections are quantized too: diffusers keeps none of them by default.
        assert not plain
        assert {"context_embedder", "norm_out.linear", "proj_out", "x_embedder"} <= set(quantized)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_tiny_selection_equals_diffusers(mode: str) -> None:
    for skip in (None, ["proj_in"], ["blocks.1"], ["proj_out", "attn"]):
        options = {**MODES[mode], "llm_int8_skip_modules": skip}
        theirs = diffusers_selection(
            tiny_skeleton(), dict(options, llm_int8_skip_modules=list(skip or []) or None)
        )
        assert qcore_selection(tiny_skeleton(), options) == theirs, skip


def test_skip_names_match_whole_components_unlike_diffusers() -> None:
    # The one intended difference: diffusers matches "blocks." as a substring, so it also skips
    # vace_blocks; qcore quantizes vace_blocks.
    options = {**MODES["8bit"], "llm_int8_skip_modules": ["blocks"]}
    theirs, _ = diffusers_selection(tiny_skeleton(), dict(options, llm_int8_skip_modules=["blocks"]))
    ours, _ = qcore_selection(tiny_skeleton(), options)
    assert [n for n in ours if n not in theirs] == ["vace_blocks.0.attn", "vace_blocks.0.proj_out"]
    assert not [n for n in theirs if n not in ours]


@pytest.fixture(scope="module")
def flux_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("flux-sel") / "bf16"
    diffusers.FluxTransformer2DModel(**tiny_flux_config()).to(torch.bfloat16).save_pretrained(path)
    return path


def test_8bit_load_holds_what_linear8bitlt_itself_produces(flux_ckpt: Path) -> None:
    model = qcore.from_pretrained(
        diffusers.FluxTransformer2DModel,
        flux_ckpt,
        quantization_config=BitsAndBytesConfig(load_in_8bit=True),
        torch_dtype=torch.bfloat16,
    )
    theirs, _ = diffusers_selection(flux_skeleton(), MODES["8bit"])
    assert selection(model) == (theirs, [])
    source = load_file(flux_ckpt / "diffusion_pytorch_model.safetensors")
    state = model.state_dict()
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear8bitLt):
            continue
        # bitsandbytes' own path, the one diffusers takes: a 16-bit Linear8bitLt moved to its device.
        reference = bnb.nn.Linear8bitLt(
            module.in_features,
            module.out_features,
            module.bias is not None,
            has_fp16_weights=False,
            threshold=6.0,
        )
        reference.weight = bnb.nn.Int8Params(
            source[f"{name}.weight"], requires_grad=False, has_fp16_weights=False
        )
        reference = reference.to("cpu")
        assert module.weight.dtype == torch.int8, f"{name} was left in {module.weight.dtype}"
        assert torch.equal(module.weight.data, reference.weight.data), name
        assert torch.equal(module.weight.SCB, reference.weight.SCB), name
        assert torch.equal(module.weight.CB, reference.weight.CB), name
        assert torch.equal(state[f"{name}.SCB"], reference.state_dict()["SCB"]), name
        assert int(state[f"{name}.weight_format"]) == 0
