"""qcore.enable_bridge: qcore backends served by diffusers' and transformers' own from_pretrained, and
diffusers/transformers config objects accepted by qcore.from_pretrained.

Real diffusers 0.42 / transformers 5 loaders, the installed example backend qcore-int8 and the
installed qcore-torchao / qcore-bnb; every result is compared with qcore.from_pretrained's.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import qcore
from helpers.fixtures import unaligned_tensors
from helpers.models import flux_inputs, tiny_flux_config, tiny_llama_config

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers import FluxTransformer2DModel  # noqa: E402
from diffusers.quantizers import auto as diffusers_auto  # noqa: E402
from transformers.quantizers import auto as transformers_auto  # noqa: E402

from qcore_int8 import Int8Config, Int8Linear  # noqa: E402


@pytest.fixture
def bridge() -> Iterator[Any]:
    state = qcore.enable_bridge()
    try:
        yield state
    finally:
        qcore.disable_bridge()


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bridge") / "flux-bf16"
    torch.manual_seed(0)
    FluxTransformer2DModel(**tiny_flux_config()).to(torch.bfloat16).save_pretrained(path)
    return path


def _flux_out(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**flux_inputs())[0]


def _qcore_int8(flux_dir: Path) -> torch.nn.Module:
    return qcore.from_pretrained(
        FluxTransformer2DModel, flux_dir, quantization_config=Int8Config(), torch_dtype=torch.bfloat16
    )


# --- registration --------------------------------------------------------------------------------


def test_enable_registers_int8_and_keeps_native_backends(bridge: Any) -> None:
    assert "int8" in bridge.served["diffusers"] and "int8" in bridge.served["transformers"]
    for library in ("diffusers", "transformers"):
        assert {"bitsandbytes", "torchao"} <= set(bridge.kept_native[library])
    assert diffusers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["int8"] is Int8Config
    assert transformers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["int8"] is Int8Config
    # Without override, diffusers' and transformers' own backends are untouched.
    assert diffusers_auto.AUTO_QUANTIZER_MAPPING["torchao"].__module__.startswith("diffusers.")
    assert diffusers_auto.AUTO_QUANTIZER_MAPPING["bitsandbytes_4bit"].__module__.startswith("diffusers.")
    assert transformers_auto.AUTO_QUANTIZER_MAPPING["torchao"].__module__.startswith("transformers.")


def test_disable_restores_the_tables() -> None:
    before = dict(diffusers_auto.AUTO_QUANTIZER_MAPPING), dict(transformers_auto.AUTO_QUANTIZER_MAPPING)
    qcore.enable_bridge(override=True)
    assert diffusers_auto.AUTO_QUANTIZER_MAPPING["torchao"] is not before[0]["torchao"]
    qcore.disable_bridge()
    assert dict(diffusers_auto.AUTO_QUANTIZER_MAPPING) == before[0]
    assert dict(transformers_auto.AUTO_QUANTIZER_MAPPING) == before[1]
    assert "int8" not in diffusers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING


def test_unsupported_library_version_is_a_qcore_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from qcore import _bridge

    monkeypatch.setattr(_bridge, "version", lambda name: "0.30.0" if name == "diffusers" else "5.23.0")
    with pytest.raises(qcore.QuantizerEnvironmentError, match=r"diffusers 0\.42\.x.*diffusers 0\.30\.0"):
        qcore.enable_bridge()
    assert "int8" not in diffusers_auto.AUTO_QUANTIZER_MAPPING  # nothing half-registered


@pytest.mark.parametrize(
    ("installed", "warned"), [("5.23.0", False), ("5.23.1.dev0", False), ("5.24.0", True), ("5.3.0", True)]
)
def test_untested_library_version_is_a_warning(
    installed: str, warned: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from qcore import _bridge

    monkeypatch.setattr(_bridge, "version", lambda name: installed)
    with caplog.at_level("WARNING", logger="qcore"):
        assert _bridge.check_library_version("transformers") == installed
    assert (f"transformers {installed} is accepted but not tested" in caplog.text) is warned
    assert ("tested with transformers 5.23" in caplog.text) is warned


def test_unknown_library_is_a_config_error() -> None:
    with pytest.raises(qcore.ConfigError, match="libraries"):
        qcore.enable_bridge(libraries=["keras"])


# --- diffusers ------------------------------------------------------------------------------------


def test_diffusers_quantize_on_load_equals_qcore(bridge: Any, flux_dir: Path) -> None:
    model = FluxTransformer2DModel.from_pretrained(
        flux_dir, quantization_config=Int8Config(), torch_dtype=torch.bfloat16
    )
    assert isinstance(model.transformer_blocks[0].attn.to_q, Int8Linear)
    assert model.is_quantized and model.quantization_method == "int8"
    assert torch.equal(_flux_out(model), _flux_out(_qcore_int8(flux_dir)))


def test_qcore_checkpoint_loads_through_plain_diffusers(bridge: Any, flux_dir: Path, tmp_path: Path) -> None:
    """A checkpoint saved by qcore (quant_method "int8", sharded so a weight and its scale may part)."""
    reference = _qcore_int8(flux_dir)
    qcore.save_pretrained(reference, tmp_path / "int8", max_shard_size=30_000)
    assert len(list((tmp_path / "int8").glob("*.safetensors"))) > 1
    model = FluxTransformer2DModel.from_pretrained(tmp_path / "int8")
    assert model.hf_quantizer.pre_quantized
    assert model.transformer_blocks[0].attn.to_q.weight.dtype == torch.int8
    assert torch.equal(_flux_out(model), _flux_out(reference))


def test_tensors_diffusers_hands_to_the_backend_are_aligned(
    bridge: Any, flux_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """diffusers reads shards as memory-mapped views that start wherever the file puts a tensor; what the
    bridge hands the backend (a shard's tensors and those read from other shards) is aligned all the same."""
    from qcore import _bridge

    saved = tmp_path / "int8"
    qcore.save_pretrained(_qcore_int8(flux_dir), saved, max_shard_size=30_000)
    unaligned = unaligned_tensors(saved)
    assert unaligned
    index = saved / "diffusion_pytorch_model.safetensors.index.json"
    shard_of = json.loads(index.read_text())["weight_map"]
    parted = [key for key in shard_of if key.endswith("_scale") and shard_of[key] != shard_of[key[:-6]]]
    assert parted  # a group the bridge reads partly from another shard

    starts: dict[str, int] = {}

    class Alignment:
        @qcore.hookimpl(tryfirst=True)
        def create_quantized_param(self, state_dict: dict[str, torch.Tensor]) -> None:
            starts.update({key: tensor.data_ptr() % 64 for key, tensor in state_dict.items()})

    make_plugin_manager = _bridge.make_plugin_manager
    monkeypatch.setattr(
        _bridge, "make_plugin_manager", lambda quantizer: make_plugin_manager(quantizer, [Alignment()])
    )
    model = FluxTransformer2DModel.from_pretrained(saved)
    assert model.hf_quantizer.pre_quantized
    assert set(unaligned) & set(starts) and set(parted) <= set(starts)
    assert set(starts.values()) == {0}


def test_damaged_checkpoint_through_diffusers_is_the_backends_error(
    bridge: Any, flux_dir: Path, tmp_path: Path
) -> None:
    """The backend's checks run under diffusers too: a truncated int8 weight is a qcore error naming it."""
    from safetensors.torch import load_file, save_file

    qcore.save_pretrained(_qcore_int8(flux_dir), tmp_path / "int8")
    (weights,) = (tmp_path / "int8").glob("*.safetensors")
    tensors = load_file(weights)
    tensors["proj_out.weight"] = tensors["proj_out.weight"][:-1].clone()
    save_file(
        tensors, weights, metadata={"format": "pt", "qcore_int8.format": "int8-per-channel-symmetric/1"}
    )
    with pytest.raises(qcore.ShapeMismatchError, match="proj_out.weight"):
        FluxTransformer2DModel.from_pretrained(tmp_path / "int8")


def test_diffusers_checkpoint_loads_through_qcore(bridge: Any, flux_dir: Path, tmp_path: Path) -> None:
    model = FluxTransformer2DModel.from_pretrained(
        flux_dir, quantization_config=Int8Config(), torch_dtype=torch.bfloat16
    )
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["quantization_config"] == Int8Config().to_dict()
    again = qcore.from_pretrained(FluxTransformer2DModel, tmp_path / "saved")
    assert torch.equal(_flux_out(again), _flux_out(model))
    model.dequantize()
    assert type(model.transformer_blocks[0].attn.to_q) is torch.nn.Linear


def test_qcore_saves_and_dequantizes_a_model_diffusers_loaded(
    bridge: Any, flux_dir: Path, tmp_path: Path
) -> None:
    model = FluxTransformer2DModel.from_pretrained(
        flux_dir, quantization_config=Int8Config(), torch_dtype=torch.bfloat16
    )
    expected = _flux_out(model)
    qcore.save_pretrained(model, tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["quantization_config"]["quant_method"] == "int8"
    assert torch.equal(_flux_out(qcore.from_pretrained(FluxTransformer2DModel, tmp_path / "saved")), expected)
    qcore.dequantize(model)
    assert type(model.proj_out) is torch.nn.Linear and model.proj_out.weight.dtype == torch.bfloat16


def test_diffusers_from_single_file_quantizes_on_load(bridge: Any, tmp_path: Path, monkeypatch: Any) -> None:
    """A single file in Black Forest Labs' naming, converted by diffusers' own Flux converter."""
    import inspect

    import diffusers.loaders.single_file_model as sfm
    import diffusers.loaders.single_file_utils as sfu
    from safetensors.torch import save_file

    from qcore_int8 import quantize_per_channel

    gguf_testing = pytest.importorskip("qcore_gguf.testing")
    path = tmp_path / "flux.safetensors"
    arrays = gguf_testing.bfl_flux_arrays(gguf_testing.TINY_FLUX, 0)
    save_file({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in arrays.items()}, str(path))
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.json").write_text(json.dumps(gguf_testing.TINY_FLUX))
    # diffusers' converter hard-codes Flux-dev's width; the tiny model's is read from the file instead.
    source = inspect.getsource(sfu.convert_flux_transformer_checkpoint_to_diffusers)
    source = source.replace("inner_dim = 3072", "inner_dim = checkpoint['img_in.weight'].shape[0]")
    namespace = dict(vars(sfu))
    exec(compile(source, sfu.__file__, "exec"), namespace)  # noqa: S102 - diffusers' own source
    entry = dict(sfm.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"])
    entry["checkpoint_mapping_fn"] = namespace["convert_flux_transformer_checkpoint_to_diffusers"]
    monkeypatch.setitem(sfm.SINGLE_FILE_LOADABLE_CLASSES, "FluxTransformer2DModel", entry)

    def load(**kwargs: Any) -> Any:
        return FluxTransformer2DModel.from_single_file(
            str(path),
            config=str(tmp_path / "config"),
            torch_dtype=torch.bfloat16,
            local_files_only=True,
            **kwargs,
        )

    model, plain = load(quantization_config=Int8Config()), load()
    assert isinstance(model.proj_out, Int8Linear) and not model.hf_quantizer.pre_quantized
    q, scale = quantize_per_channel(plain.proj_out.weight)
    assert torch.equal(model.proj_out.weight, q) and torch.equal(model.proj_out.weight_scale, scale)


def test_diffusion_pipeline_with_pipeline_quantization_config(bridge: Any, tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline, PipelineQuantizationConfig

    from helpers.pipelines import run_pipeline, tiny_flux_pipeline

    tiny_flux_pipeline(tmp_path / "pipe")
    config = PipelineQuantizationConfig(
        quant_mapping={"transformer": Int8Config(), "text_encoder_2": Int8Config()}
    )
    pipe = DiffusionPipeline.from_pretrained(
        tmp_path / "pipe", quantization_config=config, torch_dtype=torch.bfloat16
    )
    assert isinstance(pipe.transformer.transformer_blocks[0].attn.to_q, Int8Linear)
    assert isinstance(pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q, Int8Linear)
    latents = run_pipeline(pipe)
    assert torch.isfinite(latents).all()
    # The pipeline saved with its quantized components loads again with no config at all.
    pipe.save_pretrained(tmp_path / "pipe-int8")
    again = DiffusionPipeline.from_pretrained(tmp_path / "pipe-int8", torch_dtype=torch.bfloat16)
    assert again.transformer.hf_quantizer.pre_quantized
    assert torch.equal(run_pipeline(again), latents)


def _override_configs() -> dict[str, Any]:
    from qcore_bnb import BitsAndBytesConfig
    from qcore_torchao import TorchAoConfig

    return {
        "torchao": TorchAoConfig("int8wo"),
        "nf4": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        ),
        "llm_int8": BitsAndBytesConfig(load_in_8bit=True),
    }


@pytest.mark.parametrize("name", ["torchao", "nf4", "llm_int8"])
def test_override_serves_diffusers_with_qcore_backend(name: str, flux_dir: Path, tmp_path: Path) -> None:
    """With override, qcore-torchao / qcore-bnb serve diffusers: quantize on load, and a sharded qcore
    checkpoint whose statistics sit in other shards than their weights (diffusers' own loaders refuse it)."""
    config = _override_configs()[name]
    reference = qcore.from_pretrained(
        FluxTransformer2DModel, flux_dir, quantization_config=config, torch_dtype=torch.bfloat16
    )
    qcore.save_pretrained(reference, tmp_path / name, max_shard_size=30_000)
    expected = _flux_out(reference)
    qcore.enable_bridge(override=[config.quant_method])
    try:
        model = FluxTransformer2DModel.from_pretrained(
            flux_dir, quantization_config=config, torch_dtype=torch.bfloat16
        )
        assert type(model.hf_quantizer).__module__ == "qcore._bridge"
        assert torch.equal(_flux_out(model), expected)
        again = FluxTransformer2DModel.from_pretrained(tmp_path / name, torch_dtype=torch.bfloat16)
        assert again.hf_quantizer.pre_quantized
        assert torch.equal(_flux_out(again), expected)
    finally:
        qcore.disable_bridge()


# --- transformers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(vocab_size=128, hidden_size=64, intermediate_size=128)
    config.max_position_embeddings = 64
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bridge") / "llama"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(12)[None]).logits


def test_transformers_quantize_on_load_and_reload(bridge: Any, llama_dir: Path, tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(
        llama_dir, quantization_config=Int8Config(), dtype=torch.bfloat16
    )
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, Int8Linear) and q_proj.weight.dtype == torch.int8
    assert q_proj.weight_scale.dtype == torch.float32
    reference = LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16)
    out, expected = _logits(model), _logits(reference)
    error = float((out.float() - expected.float()).norm() / expected.float().norm())
    assert 0 < error < 0.05
    # The int8 weights are exactly those qcore's own per-channel quantization makes.
    from qcore_int8 import quantize_per_channel

    q, scale = quantize_per_channel(reference.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(q_proj.weight, q) and torch.equal(q_proj.weight_scale, scale)

    model.save_pretrained(tmp_path / "llama-int8")
    saved = json.loads((tmp_path / "llama-int8" / "config.json").read_text())
    assert saved["quantization_config"]["quant_method"] == "int8"
    again = LlamaForCausalLM.from_pretrained(tmp_path / "llama-int8")
    assert again.hf_quantizer.pre_quantized
    assert torch.equal(_logits(again), out)


# --- the reverse direction: diffusers/transformers config objects in qcore ---------------------------


def test_foreign_config_dicts() -> None:
    from torchao.quantization import Int8WeightOnlyConfig

    from qcore._bridge import config_dict_from_foreign, is_foreign_config

    t_config = transformers.TorchAoConfig(Int8WeightOnlyConfig())
    assert is_foreign_config(t_config) and not is_foreign_config(Int8Config()) and not is_foreign_config({})
    data = config_dict_from_foreign(t_config)
    assert data["quant_method"] == "torchao" and type(data["quant_method"]) is str
    assert "include_input_output_embeddings" not in data and "untie_embedding_weights" not in data
    t_config.include_input_output_embeddings = True
    with pytest.raises(qcore.ConfigError, match="include_input_output_embeddings"):
        config_dict_from_foreign(t_config)


@pytest.mark.parametrize("library", ["diffusers", "transformers"])
def test_qcore_loads_with_foreign_torchao_config(library: str, flux_dir: Path) -> None:
    from torchao.quantization import Int8WeightOnlyConfig

    from qcore_torchao import TorchAoConfig

    foreign = sys.modules[library].TorchAoConfig(Int8WeightOnlyConfig())
    model = qcore.from_pretrained(
        FluxTransformer2DModel, flux_dir, quantization_config=foreign, torch_dtype=torch.bfloat16
    )
    reference = qcore.from_pretrained(
        FluxTransformer2DModel,
        flux_dir,
        quantization_config=TorchAoConfig(Int8WeightOnlyConfig()),
        torch_dtype=torch.bfloat16,
    )
    assert model.hf_quantizer.quantization_config == reference.hf_quantizer.quantization_config
    assert torch.equal(_flux_out(model), _flux_out(reference))


@pytest.mark.parametrize("library", ["diffusers", "transformers"])
def test_qcore_loads_with_foreign_bitsandbytes_config(library: str, flux_dir: Path) -> None:
    from qcore_bnb import BitsAndBytesConfig

    options = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    foreign = sys.modules[library].BitsAndBytesConfig(**options)
    model = qcore.from_pretrained(
        FluxTransformer2DModel, flux_dir, quantization_config=foreign, torch_dtype=torch.bfloat16
    )
    assert model.hf_quantizer.quantization_config == BitsAndBytesConfig(**options)
    assert torch.isfinite(_flux_out(model)).all()


def test_transformers_torchao_with_override(llama_dir: Path, tmp_path: Path) -> None:
    """qcore-torchao serves transformers with override, and its sharded checkpoint (``weight:qdata`` parts,
    not model keys) loads back exactly, with no missing or unexpected keys reported."""
    from transformers import LlamaForCausalLM

    from qcore_torchao import TorchAoConfig

    state = qcore.enable_bridge(override=True, libraries=["transformers"])
    try:
        assert "bitsandbytes" in state.kept_native["transformers"]  # transformers insists on its own config
        model = LlamaForCausalLM.from_pretrained(
            llama_dir, quantization_config=TorchAoConfig("int8wo"), dtype=torch.bfloat16
        )
        assert type(model.model.layers[0].mlp.up_proj.weight).__name__ == "Int8Tensor"
        model.save_pretrained(tmp_path / "llama-int8wo", max_shard_size="40KB")
        assert len(list((tmp_path / "llama-int8wo").glob("*.safetensors"))) > 1
        again, info = LlamaForCausalLM.from_pretrained(tmp_path / "llama-int8wo", output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        assert torch.equal(_logits(again), _logits(model))
    finally:
        qcore.disable_bridge()
