"""qcore.load_pipeline on a tiny FluxPipeline (random weights) built on the fly, against diffusers' own
PipelineQuantizationConfig: loading, mixing backends, saving through diffusers' methods, reloading."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import qcore
from helpers.pipelines import run_pipeline, tiny_flux_pipeline

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")
from torchao.quantization import Int8WeightOnlyConfig  # noqa: E402

from qcore_bnb import BitsAndBytesConfig  # noqa: E402
from qcore_torchao import TorchAoConfig  # noqa: E402

COMPONENTS = ["scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "vae"]


def nf4() -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )


def int8wo() -> TorchAoConfig:
    return TorchAoConfig(Int8WeightOnlyConfig())


def t5_int8wo_for_transformers() -> Any:
    # transformers 5.23's torchao path matches skip names against parameter names ("...wo.weight"), so
    # T5's _keep_in_fp32_modules=["wo"] never matches and it quantizes wo; bitsandbytes there (and
    # qcore with every backend) keeps wo unquantized. The pattern makes transformers skip wo as well.
    return transformers.TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=[r".*\.wo"])


@pytest.fixture(scope="session")
def flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pipelines") / "tiny-flux"
    tiny_flux_pipeline(path)
    return path


@pytest.fixture(scope="session")
def mixed(flux_dir: Path) -> Any:
    """nf4 transformer + int8 weight-only T5, loaded by qcore."""
    return qcore.load_pipeline(
        diffusers.FluxPipeline,
        flux_dir,
        quantization_config={"transformer": nf4(), "text_encoder_2": int8wo()},
        torch_dtype=torch.bfloat16,
    )


def diffusers_pipeline(flux_dir: Path, mapping: dict[str, Any], **kwargs: Any) -> Any:
    config = diffusers.PipelineQuantizationConfig(quant_mapping=mapping)
    return diffusers.FluxPipeline.from_pretrained(
        flux_dir, torch_dtype=torch.bfloat16, quantization_config=config, **kwargs
    )


def test_returns_the_diffusers_pipeline_with_the_chosen_components_quantized(mixed: Any) -> None:
    assert isinstance(mixed, diffusers.FluxPipeline)
    assert isinstance(mixed.transformer.transformer_blocks[0].attn.to_q, bnb.nn.Linear4bit)
    t5 = mixed.text_encoder_2
    assert type(t5.encoder.block[0].layer[0].SelfAttention.q.weight).__name__ == "Int8Tensor"
    assert type(t5.encoder.block[0].layer[1].DenseReluDense.wo.weight) is torch.nn.Parameter  # kept
    assert t5.shared.weight is t5.encoder.embed_tokens.weight  # tied after loading
    # Not quantized: loaded by diffusers itself, in the requested dtype.
    assert not getattr(mixed.text_encoder, "is_quantized", False)
    assert {p.dtype for p in mixed.vae.parameters()} == {torch.bfloat16}


def test_nf4_and_int8wo_equal_diffusers_pipeline_quantization(
    flux_dir: Path, mixed: Any, monkeypatch
) -> None:
    mapping = {
        "transformer": diffusers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        ),
        "text_encoder_2": t5_int8wo_for_transformers(),
    }
    with pytest.raises(RuntimeError, match="No GPU found"):  # diffusers refuses bitsandbytes on CPU
        diffusers_pipeline(flux_dir, mapping)
    # Past that check diffusers quantizes on CPU with bitsandbytes like qcore does; its Linear4bit
    # layers use bitsandbytes' portable CPU kernel, as qcore's do (the AVX512-BF16 repack fails for
    # layers narrower than a quantization block, 64).
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer

    monkeypatch.setattr(BnB4BitDiffusersQuantizer, "validate_environment", lambda self, *a, **k: None)
    reference = diffusers_pipeline(flux_dir, mapping, device_map="cpu")
    for module in reference.transformer.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    # The same quantization of the same weights with the same kernels: equal to the bit.
    assert torch.equal(run_pipeline(mixed), run_pipeline(reference))


def test_one_torchao_config_equals_diffusers_pipeline_quantization(flux_dir: Path) -> None:
    ours = qcore.load_pipeline(
        diffusers.FluxPipeline, flux_dir, quantization_config=int8wo(), torch_dtype=torch.bfloat16
    )
    theirs = diffusers_pipeline(
        flux_dir,
        {
            "transformer": diffusers.TorchAoConfig(Int8WeightOnlyConfig()),
            "text_encoder_2": t5_int8wo_for_transformers(),
        },
    )
    # The default for one config: the denoiser and T5, not CLIP.
    assert getattr(ours.transformer, "is_quantized", False) and ours.text_encoder_2.is_quantized
    assert not getattr(ours.text_encoder, "is_quantized", False)
    assert torch.equal(run_pipeline(ours), run_pipeline(theirs))


def test_default_components_and_list_form(flux_dir: Path) -> None:
    index = json.loads((flux_dir / "model_index.json").read_text())
    assert qcore.load_pipeline.__module__ == "qcore._pipeline"
    from qcore._pipeline import default_quantized_components

    assert default_quantized_components(index) == ["text_encoder_2", "transformer"] or sorted(
        default_quantized_components(index)
    ) == ["text_encoder_2", "transformer"]
    pipe = qcore.load_pipeline(
        diffusers.FluxPipeline, flux_dir, quantization_config=int8wo(), components=["text_encoder"]
    )
    assert pipe.text_encoder.is_quantized and not getattr(pipe.transformer, "is_quantized", False)


def test_unknown_component_is_an_error_listing_the_components(flux_dir: Path) -> None:
    with pytest.raises(qcore.ConfigError) as info:
        qcore.load_pipeline(diffusers.FluxPipeline, flux_dir, quantization_config={"text_encoder_3": nf4()})
    message = str(info.value)
    assert "text_encoder_3" in message and all(name in message for name in COMPONENTS)
    with pytest.raises(qcore.ConfigError, match="only models"):
        qcore.load_pipeline(
            diffusers.FluxPipeline, flux_dir, quantization_config=nf4(), components=["tokenizer_2"]
        )
    with pytest.raises(qcore.ConfigError, match="transformr"):
        qcore.load_pipeline(
            diffusers.FluxPipeline, flux_dir, quantization_config=nf4(), components=["transformr"]
        )


def test_saved_pipeline_reloads_without_configuration(mixed: Any, tmp_path: Path) -> None:
    target = tmp_path / "flux-nf4-int8wo"
    mixed.save_pretrained(target)  # diffusers' own method
    assert (target / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (target / "text_encoder_2" / "model.safetensors").is_file()
    t5_config = json.loads((target / "text_encoder_2" / "config.json").read_text())
    assert t5_config["quantization_config"]["quant_method"] == "torchao"
    assert t5_config["architectures"] == ["T5EncoderModel"]
    reloaded = qcore.load_pipeline(diffusers.DiffusionPipeline, target)
    assert type(reloaded).__name__ == "FluxPipeline"
    assert isinstance(reloaded.transformer.transformer_blocks[0].attn.to_q, bnb.nn.Linear4bit)
    # The other weights load in the dtype the components were quantized from (bfloat16 here).
    assert reloaded.transformer.norm_out.linear.bias.dtype == torch.bfloat16
    assert torch.equal(run_pipeline(reloaded), run_pipeline(mixed))


def test_plain_diffusers_reloads_a_torchao_pipeline(flux_dir: Path, tmp_path: Path) -> None:
    pipe = qcore.load_pipeline(
        diffusers.FluxPipeline, flux_dir, quantization_config=int8wo(), torch_dtype=torch.bfloat16
    )
    pipe.save_pretrained(tmp_path / "flux-int8wo")
    theirs = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "flux-int8wo", torch_dtype=torch.bfloat16)
    assert (
        type(theirs.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q.weight).__name__ == "Int8Tensor"
    )
    assert torch.equal(run_pipeline(theirs), run_pipeline(pipe))


def test_model_save_pretrained_and_push_to_hub_write_what_qcore_writes(
    mixed: Any, tmp_path: Path, monkeypatch
) -> None:
    def files(directory: Path) -> dict[str, Any]:
        """Bytes of each file; metadata and tensors of safetensors files (torchao orders metadata freely)."""
        from safetensors import safe_open

        found: dict[str, Any] = {}
        for path in sorted(directory.iterdir()):
            if path.suffix != ".safetensors":
                found[path.name] = path.read_bytes()
                continue
            with safe_open(str(path), "pt") as f:
                found[path.name] = (
                    f.metadata(),
                    {k: f.get_tensor(k).view(-1).view(torch.uint8) for k in f.keys()},
                )
        return found

    def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
        if a.keys() != b.keys():
            return False
        for name in a:
            if isinstance(a[name], bytes):
                if a[name] != b[name]:
                    return False
            elif a[name][0] != b[name][0] or a[name][1].keys() != b[name][1].keys():
                return False
            elif not all(torch.equal(a[name][1][k], b[name][1][k]) for k in a[name][1]):
                return False
        return True

    for name in ("transformer", "text_encoder_2"):
        model = getattr(mixed, name)
        qcore.save_pretrained(model, tmp_path / f"{name}-qcore")
        model.save_pretrained(tmp_path / f"{name}-own")  # diffusers/transformers refuse quantized models
        assert same(files(tmp_path / f"{name}-own"), files(tmp_path / f"{name}-qcore"))

    uploads: list[dict[str, bytes]] = []
    # Only the network is replaced: push_to_hub saves to a temporary directory and uploads it.
    import diffusers.utils.hub_utils as hub_utils
    from huggingface_hub import ModelCard

    def upload(self: Any, folder: str, *args: Any, **kwargs: Any) -> None:
        uploads.append({n: b for n, b in files(Path(folder)).items() if n != "README.md"})

    monkeypatch.setattr(type(mixed.transformer), "_upload_folder", upload)
    monkeypatch.setattr(hub_utils, "create_repo", lambda *a, **k: type("Repo", (), {"repo_id": "u/r"})())
    monkeypatch.setattr(hub_utils, "load_or_create_model_card", lambda *a, **k: ModelCard("---\n---\n"))
    mixed.transformer.push_to_hub("u/r")
    assert len(uploads) == 1 and same(uploads[0], files(tmp_path / "transformer-qcore"))


def test_bad_save_options_are_named(mixed: Any, tmp_path: Path) -> None:
    with pytest.raises(qcore.ConfigError, match="shard_size_mb"):
        mixed.transformer.save_pretrained(tmp_path / "x", shard_size_mb=5)


KILLED_SAVE = textwrap.dedent(
    """
    import sys, time
    import safetensors.torch
    import torch, qcore, diffusers
    from qcore_torchao import TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    pipe = qcore.load_pipeline(diffusers.FluxPipeline, sys.argv[1], quantization_config=TorchAoConfig(
        Int8WeightOnlyConfig()), torch_dtype=torch.bfloat16)
    real_save_file = safetensors.torch.save_file
    written = []

    def slow_save_file(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        written.append(filename)
        if len(written) == 2:  # two components written, the others not yet
            open(sys.argv[3], "w").close()
            time.sleep(60)

    safetensors.torch.save_file = slow_save_file
    pipe.save_pretrained(sys.argv[2])
    """
)


def test_killed_pipeline_save_leaves_the_old_one_intact(flux_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "saved"
    tiny_flux_pipeline(target, seed=1)  # the pipeline already there
    before = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    started = tmp_path / "mid-save"
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_SAVE, str(flux_dir), str(target), str(started)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 240
        while not started.exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the save never started"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    after = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert after == before
    reloaded = diffusers.FluxPipeline.from_pretrained(target, torch_dtype=torch.bfloat16)
    assert run_pipeline(reloaded).shape == (1, 16, 4)


def test_bad_arguments_are_named(flux_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(qcore.ConfigError, match="enable_model_cpu_offload") as info:
        qcore.load_pipeline(
            diffusers.FluxPipeline, flux_dir, quantization_config=nf4(), device_map="balanced"
        )
    assert info.value.option == "device_map"
    with pytest.raises(qcore.ConfigError, match="is not a device"):
        qcore.load_pipeline(diffusers.FluxPipeline, flux_dir, quantization_config=nf4(), device_map="nowhere")
    with pytest.raises(qcore.ConfigError, match="disagree"):
        qcore.load_pipeline(diffusers.FluxPipeline, flux_dir, torch_dtype=torch.float16, dtype=torch.bfloat16)
    vae = diffusers.AutoencoderKL.from_pretrained(flux_dir / "vae")
    with pytest.raises(qcore.ConfigError, match="passed as objects"):
        qcore.load_pipeline(diffusers.FluxPipeline, flux_dir, quantization_config={"vae": int8wo()}, vae=vae)
    with pytest.raises(qcore.CheckpointNotFoundError, match="model_index.json"):
        qcore.load_pipeline(diffusers.FluxPipeline, flux_dir / "transformer")
    with pytest.raises(qcore.CheckpointNotFoundError, match="no-such-user/no-such-pipeline"):
        qcore.load_pipeline(diffusers.FluxPipeline, "no-such-user/no-such-pipeline", local_files_only=True)


def test_dtype_alone_is_torch_dtype(tmp_path: Path) -> None:
    # Saved in float32, so each component shows whether the bfloat16 asked for reached it.
    tiny_flux_pipeline(tmp_path / "flux-fp32", dtype=torch.float32)

    def load(**dtype: torch.dtype) -> Any:
        return qcore.load_pipeline(
            diffusers.FluxPipeline, tmp_path / "flux-fp32", quantization_config=int8wo(), **dtype
        )

    ours, theirs = load(dtype=torch.bfloat16), load(torch_dtype=torch.bfloat16)
    for name, component in ours.components.items():
        if isinstance(component, torch.nn.Module):
            dtypes = {n: p.dtype for n, p in component.named_parameters()}
            assert dtypes == {n: p.dtype for n, p in theirs.components[name].named_parameters()}, name
            assert set(dtypes.values()) == {torch.bfloat16}, name
    assert ours.transformer.is_quantized and ours.text_encoder_2.is_quantized
    assert torch.equal(run_pipeline(ours), run_pipeline(theirs))


def test_older_diffusers_is_a_clear_error(flux_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules["diffusers"], "__version__", "0.35.2")
    with pytest.raises(
        qcore.QuantizerEnvironmentError, match=r"diffusers 0\.35\.2 is too old.*'diffusers>=0\.42'"
    ):
        qcore.load_pipeline(diffusers.FluxPipeline, flux_dir, quantization_config=int8wo())
    with pytest.raises(qcore.QuantizerEnvironmentError, match=r"diffusers 0\.35\.2 is too old"):
        qcore.from_pretrained(diffusers.FluxTransformer2DModel, flux_dir, subfolder="transformer")


def test_component_objects_are_used_as_given(flux_dir: Path) -> None:
    vae = diffusers.AutoencoderKL.from_pretrained(flux_dir / "vae", torch_dtype=torch.bfloat16)
    pipe = qcore.load_pipeline(
        diffusers.FluxPipeline,
        flux_dir,
        quantization_config=int8wo(),
        torch_dtype=torch.bfloat16,
        device_map="cpu",  # one device for qcore's components and diffusers' (its device_map="cpu")
        vae=vae,
    )
    assert pipe.vae is vae and pipe.transformer.is_quantized
    assert {p.device.type for p in pipe.text_encoder.parameters()} == {"cpu"}


OTHER_PIPELINES = {
    # pipeline class, builder, runner, the text encoder a single config quantizes by default
    "StableDiffusion3Pipeline": ("tiny_sd3_pipeline", "run_sd3", "text_encoder_3"),
    "WanPipeline": ("tiny_wan_pipeline", "run_wan", "text_encoder"),
    # Qwen2.5-VL, saved by transformers in the naming it renames on load
    "QwenImagePipeline": ("tiny_qwenimage_pipeline", "run_qwenimage", "text_encoder"),
}


@pytest.mark.parametrize("name", sorted(OTHER_PIPELINES))
def test_other_pipelines_equal_diffusers_pipeline_quantization(name: str, tmp_path: Path) -> None:
    import helpers.pipelines as tiny

    build, run, encoder = OTHER_PIPELINES[name]
    getattr(tiny, build)(tmp_path / name)
    cls = getattr(diffusers, name)
    ours = qcore.load_pipeline(cls, tmp_path / name, quantization_config=int8wo(), torch_dtype=torch.bfloat16)
    quantized = [
        n
        for n in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
        if getattr(getattr(ours, n, None), "is_quantized", False)
    ]
    assert sorted(quantized) == sorted(["transformer", encoder])  # the denoiser and T5/UMT5, not CLIP
    theirs = cls.from_pretrained(
        tmp_path / name,
        torch_dtype=torch.bfloat16,
        quantization_config=diffusers.PipelineQuantizationConfig(
            quant_mapping={
                "transformer": diffusers.TorchAoConfig(Int8WeightOnlyConfig()),
                encoder: t5_int8wo_for_transformers()
                if name != "QwenImagePipeline"
                else transformers.TorchAoConfig(Int8WeightOnlyConfig()),
            }
        ),
    )
    assert torch.equal(getattr(tiny, run)(ours), getattr(tiny, run)(theirs))
    ours.save_pretrained(tmp_path / f"{name}-int8")
    again = qcore.load_pipeline(diffusers.DiffusionPipeline, tmp_path / f"{name}-int8")
    assert type(again).__name__ == name
    assert torch.equal(getattr(tiny, run)(again), getattr(tiny, run)(ours))


def test_diffusers_pipeline_quantization_config_is_accepted_and_checked(flux_dir: Path) -> None:
    mapping = diffusers.PipelineQuantizationConfig(
        quant_mapping={
            "transformer": diffusers.TorchAoConfig(Int8WeightOnlyConfig()),
            "text_encoder_2": t5_int8wo_for_transformers(),
        }
    )
    ours = qcore.load_pipeline(
        diffusers.FluxPipeline, flux_dir, quantization_config=mapping, torch_dtype=torch.bfloat16
    )
    theirs = diffusers.FluxPipeline.from_pretrained(
        flux_dir, quantization_config=mapping, dtype=torch.bfloat16
    )
    assert torch.equal(run_pipeline(ours), run_pipeline(theirs))

    bnb_options = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    backend = diffusers.PipelineQuantizationConfig(
        quant_backend="bitsandbytes_4bit", quant_kwargs=bnb_options, components_to_quantize=["text_encoder_2"]
    )
    pipe = qcore.load_pipeline(diffusers.FluxPipeline, flux_dir, quantization_config=backend)
    assert isinstance(pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q, bnb.nn.Linear4bit)
    assert not getattr(pipe.transformer, "is_quantized", False)
    # diffusers ignores a component name the pipeline lacks; qcore names it.
    typo = diffusers.PipelineQuantizationConfig(
        quant_backend="bitsandbytes_4bit", quant_kwargs=bnb_options, components_to_quantize=["text_encoder_3"]
    )
    with pytest.raises(qcore.ConfigError, match="no component 'text_encoder_3'"):
        qcore.load_pipeline(diffusers.FluxPipeline, flux_dir, quantization_config=typo)


def test_hub_id_from_the_local_cache(flux_dir: Path, tmp_path: Path) -> None:
    """A hub id resolves through diffusers' own download (here from a hub cache, offline)."""
    import shutil

    cache = tmp_path / "hub"
    revision = "0" * 40
    snapshot = cache / "models--tiny--flux" / "snapshots" / revision
    shutil.copytree(flux_dir, snapshot)
    (cache / "models--tiny--flux" / "refs").mkdir(parents=True)
    (cache / "models--tiny--flux" / "refs" / "main").write_text(revision)
    pipe = qcore.load_pipeline(
        diffusers.FluxPipeline,
        "tiny/flux",
        quantization_config=int8wo(),
        torch_dtype=torch.bfloat16,
        cache_dir=cache,
        local_files_only=True,
    )
    assert pipe.transformer.is_quantized and pipe.text_encoder_2.is_quantized
    assert run_pipeline(pipe).shape == (1, 16, 4)


def test_dtype_change_of_a_quantized_pipeline_is_refused_before_any_cast(flux_dir: Path) -> None:
    pipe = qcore.load_pipeline(
        diffusers.FluxPipeline, flux_dir, quantization_config=int8wo(), torch_dtype=torch.bfloat16
    )
    with pytest.raises(qcore.DtypeCastError, match="text_encoder_2, transformer"):
        pipe.to(torch.float16)
    with pytest.raises(qcore.DtypeCastError):
        pipe.to("cpu", dtype=torch.float16)
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.bfloat16}  # nothing was cast
    assert pipe.to("cpu") is pipe  # moving is fine


def test_text_encoder_lora_on_a_quantized_clip(flux_dir: Path, tmp_path: Path) -> None:
    """diffusers' LoRA loading moves the text encoder with .to(device=, dtype=its own dtype), a call that
    breaks bitsandbytes text encoders in diffusers itself: a quantized CLIP takes the LoRA."""
    from peft import LoraConfig, get_peft_model_state_dict

    clip = transformers.CLIPTextModel.from_pretrained(flux_dir / "text_encoder", dtype=torch.bfloat16)
    targets = ["q_proj", "k_proj", "v_proj", "out_proj"]
    clip.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    diffusers.FluxPipeline.save_lora_weights(
        tmp_path / "lora", text_encoder_lora_layers=get_peft_model_state_dict(clip)
    )
    pipe = qcore.load_pipeline(
        diffusers.FluxPipeline,
        flux_dir,
        quantization_config=nf4(),
        components=["transformer", "text_encoder"],
        torch_dtype=torch.bfloat16,
    )
    before = run_pipeline(pipe)
    pipe.load_lora_weights(tmp_path / "lora")
    assert not torch.equal(run_pipeline(pipe), before)
    assert isinstance(pipe.text_encoder.encoder.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    pipe.unload_lora_weights()
    assert torch.equal(run_pipeline(pipe), before)
    with pytest.raises(qcore.DtypeCastError):  # a real cast is still refused
        pipe.text_encoder.to("cpu", torch.float16)
