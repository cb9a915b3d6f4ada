"""qcore.load_pipeline on CUDA against diffusers' PipelineQuantizationConfig, which runs bitsandbytes only
on a GPU: the same tiny FluxPipeline as tests/test_pipeline.py, nf4 transformer + int8 weight-only T5.

gpu-marked: skipped where CUDA is unavailable. On the GPU machine: ``pytest -m gpu tests``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import qcore
from helpers.pipelines import run_pipeline, tiny_flux_pipeline

pytestmark = pytest.mark.gpu

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")
from torchao.quantization import Int8WeightOnlyConfig  # noqa: E402

from qcore_bnb import BitsAndBytesConfig  # noqa: E402
from qcore_torchao import TorchAoConfig  # noqa: E402

NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


def test_nf4_int8wo_pipeline_on_cuda_equals_diffusers_and_round_trips(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    tiny_flux_pipeline(tmp_path / "flux")
    ours = qcore.load_pipeline(
        diffusers.FluxPipeline,
        tmp_path / "flux",
        quantization_config={
            "transformer": BitsAndBytesConfig(**NF4),
            "text_encoder_2": TorchAoConfig(Int8WeightOnlyConfig()),
        },
        torch_dtype=torch.bfloat16,
        device_map="cuda",
    )
    assert ours.transformer.proj_out.weight.device.type == "cuda"
    assert {p.device.type for p in ours.vae.parameters()} == {"cuda"}
    theirs = diffusers.FluxPipeline.from_pretrained(
        tmp_path / "flux",
        dtype=torch.bfloat16,
        device_map="cuda",
        quantization_config=diffusers.PipelineQuantizationConfig(
            quant_mapping={
                "transformer": diffusers.BitsAndBytesConfig(**NF4),
                # transformers' torchao path would quantize T5's wo (see tests/test_pipeline.py)
                "text_encoder_2": transformers.TorchAoConfig(
                    Int8WeightOnlyConfig(), modules_to_not_convert=[r".*\.wo"]
                ),
            }
        ),
    )
    latents = run_pipeline(ours)
    # The same quantization of the same weights, by the same CUDA kernels.
    assert torch.equal(latents, run_pipeline(theirs))

    ours.save_pretrained(tmp_path / "flux-q")
    plain = diffusers.DiffusionPipeline.from_pretrained(
        tmp_path / "flux-q", dtype=torch.bfloat16, device_map="cuda"
    )
    assert isinstance(plain.transformer.proj_out, bnb.nn.Linear4bit)  # diffusers read qcore's nf4
    assert torch.equal(run_pipeline(plain), latents)
    again = qcore.load_pipeline(diffusers.DiffusionPipeline, tmp_path / "flux-q", device_map="cuda")
    assert torch.equal(run_pipeline(again), latents)
