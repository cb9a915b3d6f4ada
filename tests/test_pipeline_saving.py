"""pipe.save_pretrained of a pipeline qcore loaded replaces only what the save supersedes: another
variant's weights, the other format's files and folders the pipeline does not write are kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import qcore
from helpers.pipelines import run_pipeline, tiny_flux_pipeline

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("torchao")
from torchao.quantization import Int8WeightOnlyConfig  # noqa: E402

from qcore_torchao import TorchAoConfig  # noqa: E402


@pytest.fixture(scope="module")
def int8wo_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Any:
    directory = tmp_path_factory.mktemp("pipelines") / "tiny-flux"
    tiny_flux_pipeline(directory)
    return qcore.load_pipeline(
        diffusers.FluxPipeline,
        directory,
        quantization_config=TorchAoConfig(Int8WeightOnlyConfig()),
        torch_dtype=torch.bfloat16,
    )


def _files(directory: Path, component: str) -> list[str]:
    return sorted(path.name for path in (directory / component).iterdir())


def test_saving_a_variant_keeps_the_other_variants_of_every_component(
    int8wo_pipeline: Any, tmp_path: Path
) -> None:
    target = tmp_path / "flux"
    int8wo_pipeline.save_pretrained(target)
    (target / "transformer" / "notes.txt").write_text("kept")
    int8wo_pipeline.save_pretrained(target, variant="fp16")

    assert _files(target, "transformer") == [
        "config.json",
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.safetensors",
        "notes.txt",
    ]
    assert _files(target, "text_encoder_2") == ["config.json", "model.fp16.safetensors", "model.safetensors"]
    assert _files(target, "vae") == [
        "config.json",
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.safetensors",
    ]
    for variant in (None, "fp16"):
        reloaded = qcore.load_pipeline(diffusers.FluxPipeline, target, variant=variant)
        assert reloaded.transformer.is_quantized
        assert torch.equal(run_pipeline(reloaded), run_pipeline(int8wo_pipeline))


def test_a_sharded_save_replaces_the_single_file_of_its_variant_only(
    int8wo_pipeline: Any, tmp_path: Path
) -> None:
    target = tmp_path / "flux"
    int8wo_pipeline.save_pretrained(target, variant="fp16")
    int8wo_pipeline.save_pretrained(target)
    int8wo_pipeline.save_pretrained(target, max_shard_size="40KB")

    names = _files(target, "transformer")
    assert "diffusion_pytorch_model.safetensors" not in names  # the sharded save supersedes it
    assert "diffusion_pytorch_model.safetensors.index.json" in names
    assert "diffusion_pytorch_model.fp16.safetensors" in names
    assert any(name.startswith("diffusion_pytorch_model-00001-of-") for name in names)
    reloaded = qcore.load_pipeline(diffusers.FluxPipeline, target)
    assert torch.equal(run_pipeline(reloaded), run_pipeline(int8wo_pipeline))


def test_components_made_by_hand_join_a_pipeline_with_atomic_saves(
    int8wo_pipeline: Any, tmp_path: Path
) -> None:
    saved = tmp_path / "flux-int8wo"
    int8wo_pipeline.save_pretrained(saved)
    transformer = qcore.from_pretrained(diffusers.FluxTransformer2DModel, saved, subfolder="transformer")
    # The folder is pre-quantized: the object given is used, not loaded a second time.
    pipe = qcore.load_pipeline(diffusers.FluxPipeline, saved, transformer=transformer)
    assert pipe.transformer is transformer and pipe.text_encoder_2.is_quantized
    assert type(pipe)._qcore_atomic_save
    pipe.save_pretrained(saved)
    assert torch.equal(run_pipeline(qcore.load_pipeline(diffusers.FluxPipeline, saved)), run_pipeline(pipe))
