"""The loader and saver with the in-test int8 backend: round trips, placement, dtypes, layouts."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import qcore
from helpers.int8_backend import Int8Linear, Int8TestConfig, Int8TestQuantizer
from helpers.models import TinyTransformer, flux_inputs, tiny_flux_config


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_plain_load_is_exact(tiny_ckpt: Path, tiny_model: TinyTransformer, tiny_input: torch.Tensor) -> None:
    model = TinyTransformer.from_pretrained(tiny_ckpt)
    for (name, p), (_, q) in zip(model.state_dict().items(), tiny_model.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    assert model.dtype == torch.bfloat16
    assert not model.training
    assert getattr(model, "hf_quantizer", None) is None
    assert torch.equal(model(tiny_input), tiny_model(tiny_input))


def test_torch_dtype_casts_floats_on_load(tiny_ckpt: Path) -> None:
    model = TinyTransformer.from_pretrained(tiny_ckpt, torch_dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_float8_torch_dtype_casts_as_tensors_load(tiny_ckpt: Path) -> None:
    model = TinyTransformer.from_pretrained(tiny_ckpt, torch_dtype=torch.float8_e4m3fn)
    assert {p.dtype for p in model.parameters()} == {torch.float8_e4m3fn}


def test_quantize_on_load_save_reload_round_trip(
    int8_backend: qcore.Backend,
    tiny_ckpt: Path,
    tiny_model: TinyTransformer,
    tiny_input: torch.Tensor,
    tmp_path: Path,
) -> None:
    config = Int8TestConfig()
    quantized = TinyTransformer.from_pretrained(tiny_ckpt, quantization_config=config)
    assert isinstance(quantized.blocks[0].attn, Int8Linear)
    assert quantized.is_quantized and quantized.quantization_method == "int8-test"
    assert isinstance(quantized.hf_quantizer, Int8TestQuantizer)
    assert quantized.config["_pre_quantization_dtype"] == torch.bfloat16
    out = quantized(tiny_input)
    assert rel_err(out, tiny_model(tiny_input)) < 0.03

    saved = tmp_path / "int8"
    quantized.save_pretrained(saved)
    on_disk = json.loads((saved / "config.json").read_text())
    assert on_disk["quantization_config"] == {
        "quant_method": "int8-test",
        "modules_to_not_convert": None,
        "compute_dtype": "bfloat16",
    }
    assert on_disk["_pre_quantization_dtype"] == "bfloat16"
    assert on_disk["_class_name"] == "TinyTransformer"

    reloaded = TinyTransformer.from_pretrained(saved)
    assert reloaded.hf_quantizer.pre_quantized
    for (name, p), (_, q) in zip(reloaded.state_dict().items(), quantized.state_dict().items(), strict=True):
        assert p.dtype == q.dtype and torch.equal(p, q), name
    assert torch.equal(reloaded(tiny_input), out)


def test_sharded_round_trip_with_variant(
    int8_backend: qcore.Backend, tiny_ckpt: Path, tiny_input: torch.Tensor, tmp_path: Path
) -> None:
    quantized = TinyTransformer.from_pretrained(tiny_ckpt, quantization_config=Int8TestConfig())
    saved = tmp_path / "sharded"
    qcore.save_pretrained(quantized, saved, max_shard_size="8KB", variant="int8")
    names = sorted(p.name for p in saved.iterdir())
    assert "diffusion_pytorch_model.safetensors.index.int8.json" in names
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) > 2 and all(n.startswith("diffusion_pytorch_model.int8-000") for n in shards)
    with pytest.raises(qcore.CheckpointNotFoundError, match="variant"):
        TinyTransformer.from_pretrained(saved)
    reloaded = TinyTransformer.from_pretrained(saved, variant="int8")
    assert torch.equal(reloaded(tiny_input), quantized(tiny_input))


def test_stats_in_another_shard_than_their_weight_load(
    int8_backend: qcore.Backend, tiny_ckpt: Path, tiny_input: torch.Tensor, tmp_path: Path
) -> None:
    quantized = TinyTransformer.from_pretrained(tiny_ckpt, quantization_config=Int8TestConfig())
    saved = tmp_path / "split"
    qcore.save_pretrained(quantized, saved, max_shard_size="4KB")
    index = json.loads((saved / "diffusion_pytorch_model.safetensors.index.json").read_text())["weight_map"]
    split = [k for k in index if k.endswith(".weight_scale") and index[k] != index[k.removesuffix("_scale")]]
    assert split, "the shard size should separate some weights from their scales"
    assert torch.equal(TinyTransformer.from_pretrained(saved)(tiny_input), quantized(tiny_input))


def test_modules_to_not_convert_match_whole_names(int8_backend: qcore.Backend, tiny_ckpt: Path) -> None:
    model = TinyTransformer.from_pretrained(
        tiny_ckpt, quantization_config=Int8TestConfig(modules_to_not_convert=["blocks", "proj_out"])
    )
    assert isinstance(model.vace_blocks[0].attn, Int8Linear)  # "blocks" must not skip "vace_blocks"
    assert type(model.blocks[0].attn) is torch.nn.Linear
    assert type(model.proj_out) is torch.nn.Linear
    assert type(model.vace_blocks[0].proj_out) is torch.nn.Linear  # "proj_out" matches as a component
    assert isinstance(model.proj_in, Int8Linear)


def test_module_matches() -> None:
    assert qcore.module_matches("blocks.0.attn", ["blocks"])
    assert qcore.module_matches("transformer.blocks.1", ["blocks.1"])
    assert not qcore.module_matches("vace_blocks.0", ["blocks"])
    assert not qcore.module_matches("blocks_extra", ["blocks"])


def test_keep_in_fp32_modules(tiny_ckpt: Path) -> None:
    model = TinyTransformer.from_pretrained(
        tiny_ckpt, keep_in_fp32_modules=["norm_out"], torch_dtype=torch.float16
    )
    assert model.norm_out.weight.dtype == torch.float32
    assert model.proj_in.weight.dtype == torch.float16


def test_user_config_is_not_mutated(int8_backend: qcore.Backend, tiny_ckpt: Path) -> None:
    config = Int8TestConfig(modules_to_not_convert=["proj_out"])
    before = config.to_dict()
    model = TinyTransformer.from_pretrained(tiny_ckpt, quantization_config=config)
    assert config.to_dict() == before
    assert model.hf_quantizer.quantization_config is not config


def test_prequantized_merge_keeps_loading_attributes_and_names_dropped_fields(
    int8_backend: qcore.Backend, tiny_ckpt: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    saved = tmp_path / "q"
    TinyTransformer.from_pretrained(tiny_ckpt, quantization_config=Int8TestConfig()).save_pretrained(saved)
    user = Int8TestConfig(modules_to_not_convert=["proj_in"], compute_dtype="float32")
    with caplog.at_level(logging.WARNING, logger="qcore"):
        model = TinyTransformer.from_pretrained(saved, quantization_config=user)
    used = model.hf_quantizer.quantization_config
    assert used.compute_dtype == "float32"  # a loading attribute: the user's value wins
    assert used.modules_to_not_convert is None  # not one: the checkpoint's wins
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "modules_to_not_convert" in warnings[0]


def test_config_dict_form_and_equality(int8_backend: qcore.Backend) -> None:
    config = Int8TestConfig(modules_to_not_convert=["a"])
    again = Int8TestConfig.from_dict(json.loads(config.to_json_string()))
    assert again == config and again is not config
    assert "Int8TestConfig" in repr(config) and '"a"' in repr(config)
    assert json.loads(config.to_json_string(use_diff=True)) == {
        "quant_method": "int8-test",
        "modules_to_not_convert": ["a"],
    }


def test_diffusers_flux_round_trip(int8_backend: qcore.Backend, tmp_path: Path) -> None:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    original = FluxTransformer2DModel(**tiny_flux_config()).to(torch.bfloat16)
    original.save_pretrained(tmp_path / "bf16")
    ref = original(**flux_inputs())[0]

    plain = qcore.from_pretrained(FluxTransformer2DModel, tmp_path / "bf16")
    assert torch.equal(plain(**flux_inputs())[0], ref)

    quantized = qcore.from_pretrained(
        FluxTransformer2DModel, tmp_path / "bf16", quantization_config=Int8TestConfig()
    )
    out = quantized(**flux_inputs())[0]
    assert rel_err(out, ref) < 0.03
    assert quantized.config.quantization_config.quant_method == "int8-test"
    qcore.save_pretrained(quantized, tmp_path / "int8", max_shard_size="100KB")
    reloaded = qcore.from_pretrained(FluxTransformer2DModel, tmp_path / "int8")
    assert torch.equal(reloaded(**flux_inputs())[0], out)
    # diffusers itself reads the saved config (and ignores qcore's private keys).
    config = FluxTransformer2DModel.load_config(tmp_path / "int8")
    assert config["quantization_config"]["quant_method"] == "int8-test"
    # A quantized diffusers model refuses dtype casts like a qcore model, and stays a Flux model.
    assert (
        isinstance(reloaded, FluxTransformer2DModel) and type(reloaded).__name__ == "FluxTransformer2DModel"
    )
    for cast in (lambda m: m.to(torch.float16), lambda m: m.bfloat16(), lambda m: m.double()):
        with pytest.raises(
            qcore.DtypeCastError, match="FluxTransformer2DModel is quantized with 'int8-test'"
        ):
            cast(reloaded)


def test_bin_checkpoints_load_with_weights_only(
    tiny_model: TinyTransformer, tiny_input: torch.Tensor, tmp_path: Path
) -> None:
    qcore.save_pretrained(tiny_model, tmp_path / "bin", safe_serialization=False, max_shard_size="10KB")
    assert (tmp_path / "bin" / "diffusion_pytorch_model.bin.index.json").exists()
    model = TinyTransformer.from_pretrained(tmp_path / "bin")
    assert torch.equal(model(tiny_input), tiny_model(tiny_input))


def test_explicit_device_map_dict(tiny_ckpt: Path) -> None:
    model = TinyTransformer.from_pretrained(tiny_ckpt, device_map={"": "cpu"})
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_auto_device_map_respects_max_memory_on_cpu(int8_backend: qcore.Backend, tiny_ckpt: Path) -> None:
    # Without GPUs accelerate places everything on the CPU; the quantizer's hooks still run.
    model = TinyTransformer.from_pretrained(
        tiny_ckpt, quantization_config=Int8TestConfig(), device_map="auto", max_memory={"cpu": "1GB"}
    )
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert isinstance(model.blocks[1].proj_out, Int8Linear)


def test_hub_ids_resolve_through_the_huggingface_cache(
    tiny_model: TinyTransformer, tiny_input: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real huggingface_hub cache layout, read offline: what a previous download leaves behind.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--acme--tiny"
    qcore.save_pretrained(tiny_model, repo / "snapshots" / commit / "transformer")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model = TinyTransformer.from_pretrained(
        "acme/tiny", subfolder="transformer", cache_dir=tmp_path / "cache", local_files_only=True
    )
    assert torch.equal(model(tiny_input), tiny_model(tiny_input))
    with pytest.raises(
        qcore.CheckpointNotFoundError, match="acme/other.*not in the local Hugging Face cache"
    ):
        TinyTransformer.from_pretrained("acme/other", cache_dir=tmp_path / "cache", local_files_only=True)


def test_observer_wrapper_sees_lifecycle(int8_backend: qcore.Backend, tiny_ckpt: Path) -> None:
    seen: list[str] = []

    class Recorder:
        @qcore.hookimpl(wrapper=True)
        def preprocess_model(self, model: torch.nn.Module):  # type: ignore[no-untyped-def]
            seen.append("before preprocess")
            result = yield
            seen.append("after preprocess")
            return result

        @qcore.hookimpl(wrapper=True)
        def create_quantized_param(self, param_name: str):  # type: ignore[no-untyped-def]
            seen.append(param_name)
            return (yield)

    TinyTransformer.from_pretrained(tiny_ckpt, quantization_config=Int8TestConfig(), observers=[Recorder()])
    assert seen[:2] == ["before preprocess", "after preprocess"]
    assert "blocks.0.attn.weight" in seen


def test_dequantize_restores_plain_linears(
    int8_backend: qcore.Backend, tiny_ckpt: Path, tiny_input: torch.Tensor
) -> None:
    model = TinyTransformer.from_pretrained(tiny_ckpt, quantization_config=Int8TestConfig())
    out = model(tiny_input)
    model.dequantize()
    assert (
        type(model.blocks[0].attn) is torch.nn.Linear and model.blocks[0].attn.weight.dtype == torch.bfloat16
    )
    assert not model.is_quantized and "quantization_config" not in model.config
    assert rel_err(model(tiny_input), out) < 0.02
    model.half()  # allowed again


def test_save_keeps_unrelated_files_and_replaces_old_shards(
    int8_backend: qcore.Backend, tiny_ckpt: Path, tiny_model: TinyTransformer, tmp_path: Path
) -> None:
    target = tmp_path / "out"
    qcore.save_pretrained(tiny_model, target, max_shard_size="8KB")
    (target / "README.md").write_text("model card")
    quantized = TinyTransformer.from_pretrained(tiny_ckpt, quantization_config=Int8TestConfig())
    qcore.save_pretrained(quantized, target)
    assert sorted(p.name for p in target.iterdir()) == [
        "README.md",
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_saved_header_metadata(tiny_model: TinyTransformer, tmp_path: Path) -> None:
    qcore.save_pretrained(tiny_model, tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_import_qcore_imports_no_backend() -> None:
    code = (
        "import sys, qcore\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('bitsandbytes', 'torchao', 'diffusers', 'qcore_bnb', 'qcore_torchao', 'transformers')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_per_parameter_hooks_reach_every_plugin_through_pluggy(
    int8_backend: qcore.Backend, tiny_ckpt: Path
) -> None:
    # A plain (non-wrapper) observer implementation runs for every parameter group, beside the backend's.
    seen: list[str] = []

    class Watcher:
        @qcore.hookimpl(tryfirst=True)
        def check_if_quantized_param(self, param_name: str) -> None:
            seen.append(param_name)

    model = TinyTransformer.from_pretrained(
        tiny_ckpt, quantization_config=Int8TestConfig(), observers=[Watcher()]
    )
    with safe_open(str(tiny_ckpt / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert sorted(seen) == sorted(f.keys())
    assert isinstance(model.blocks[0].attn, Int8Linear)  # the observer's None left the backend's answer


def test_cyclic_gc_is_paused_during_a_load_and_restored_after(tiny_ckpt: Path) -> None:
    import gc

    seen: list[bool] = []

    class Recording(TinyTransformer):
        def __init__(self, **config: int) -> None:
            seen.append(gc.isenabled())
            super().__init__(**config)

    assert gc.isenabled()
    Recording.from_pretrained(tiny_ckpt)
    assert seen == [False]
    assert gc.isenabled()
    with pytest.raises(qcore.QcoreError):
        Recording.from_pretrained(tiny_ckpt, quantization_config={"quant_method": "no-such-backend"})
    assert gc.isenabled()
    gc.disable()
    try:
        Recording.from_pretrained(tiny_ckpt)
        assert not gc.isenabled()  # a caller who paused it keeps it paused
    finally:
        gc.enable()
