"""transformers text encoders (T5, UMT5, CLIP) through qcore.from_pretrained, against transformers itself:
same outputs, tied weights, float32 modules, the same module selection as transformers' quantizers, and
checkpoints transformers reloads."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import accelerate
import pytest
import torch

import qcore
from helpers.models import tiny_llama_config
from helpers.pipelines import clip_config, t5_config

transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")
from torchao.quantization import Int8WeightOnlyConfig  # noqa: E402

from qcore_bnb import BitsAndBytesConfig  # noqa: E402
from qcore_torchao import TorchAoConfig  # noqa: E402

IDS = torch.tensor([[3, 4, 5, 6, 7, 1]])


def encoders() -> dict[str, tuple[type, Any]]:
    umt5 = transformers.UMT5Config(
        **{
            k: v
            for k, v in t5_config().to_dict().items()
            if k
            in (
                "vocab_size",
                "d_model",
                "d_kv",
                "d_ff",
                "num_layers",
                "num_heads",
                "relative_attention_num_buckets",
                "feed_forward_proj",
                "pad_token_id",
                "eos_token_id",
                "decoder_start_token_id",
            )
        }
    )
    return {
        "T5EncoderModel": (transformers.T5EncoderModel, t5_config()),
        "UMT5EncoderModel": (transformers.UMT5EncoderModel, umt5),
        "CLIPTextModel": (transformers.CLIPTextModel, clip_config()),
        "CLIPTextModelWithProjection": (transformers.CLIPTextModelWithProjection, clip_config()),
    }


def _int8_weight_only(cls: type, path: Path) -> Any:
    """``cls`` from ``path`` through qcore, its linears quantized to torchao int8 weight-only, in bfloat16."""
    config = TorchAoConfig(Int8WeightOnlyConfig())
    return qcore.from_pretrained(cls, path, quantization_config=config, torch_dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    paths = {}
    for name, (cls, config) in encoders().items():
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp("encoders") / name
        cls(config).to(torch.bfloat16).save_pretrained(path)  # transformers' own writer
        paths[name] = path
    return paths


def output(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        result = model(IDS)
    return (
        getattr(result, "text_embeds", None) if hasattr(result, "text_embeds") else result.last_hidden_state
    )


def quantized_linears(model: torch.nn.Module) -> list[str]:
    return sorted(
        name
        for name, module in model.named_modules()
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
        or (isinstance(module, torch.nn.Linear) and type(module.weight).__name__ != "Parameter")
    )


@pytest.mark.parametrize("name", sorted(encoders()))
def test_unquantized_load_equals_transformers(saved: dict[str, Path], name: str) -> None:
    cls = encoders()[name][0]
    ours = qcore.from_pretrained(cls, saved[name], torch_dtype=torch.bfloat16)
    theirs = cls.from_pretrained(saved[name], dtype=torch.bfloat16)
    assert type(ours) is cls
    assert torch.equal(output(ours), output(theirs))
    if name.endswith("T5EncoderModel"):
        assert ours.shared.weight is ours.encoder.embed_tokens.weight  # tied after loading


@pytest.mark.parametrize("installed", ["4.56.0", "5.22.1"])
def test_older_transformers_is_a_clear_error(
    saved: dict[str, Path], installed: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # transformers 4 has no all_tied_weights_keys: T5's embeddings would load untied, without an error.
    # Importing a model class can put a new module object in sys.modules; qcore reads that one.
    installed_module = sys.modules["transformers"]
    monkeypatch.setattr(installed_module, "__version__", installed)
    for config in (None, TorchAoConfig(Int8WeightOnlyConfig())):
        with pytest.raises(qcore.QuantizerEnvironmentError) as info:
            qcore.from_pretrained(
                transformers.T5EncoderModel, saved["T5EncoderModel"], quantization_config=config
            )
        message = str(info.value)
        assert f"transformers {installed} is too old" in message and "'transformers>=5.23'" in message
    monkeypatch.setattr(installed_module, "__version__", "5.23.0.dev0")  # a build of the tested release
    model = qcore.from_pretrained(transformers.T5EncoderModel, saved["T5EncoderModel"])
    assert model.shared.weight is model.encoder.embed_tokens.weight


def transformers_bnb_selection(cls: type, config: Any, options: dict[str, Any]) -> list[str]:
    """transformers' own bitsandbytes replace step, on a meta skeleton, as its from_pretrained runs it."""
    from transformers.quantizers import AutoHfQuantizer

    with accelerate.init_empty_weights():
        model = cls(config)
    quantizer = AutoHfQuantizer.from_config(transformers.BitsAndBytesConfig(**options), pre_quantized=False)
    quantizer.preprocess_model(model=model, device_map={"": "cpu"})
    return quantized_linears(model)


@pytest.mark.parametrize("name", sorted(encoders()))
@pytest.mark.parametrize("bits", ["nf4", "8bit"])
def test_bitsandbytes_selection_equals_transformers(saved: dict[str, Path], name: str, bits: str) -> None:
    options: dict[str, Any] = (
        dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        if bits == "nf4"
        else dict(load_in_8bit=True)
    )
    cls, config = encoders()[name]
    ours = qcore.from_pretrained(
        cls, saved[name], quantization_config=BitsAndBytesConfig(**options), torch_dtype=torch.bfloat16
    )
    assert quantized_linears(ours) == transformers_bnb_selection(cls, config, options)
    assert quantized_linears(ours)
    if name == "CLIPTextModelWithProjection":
        assert "text_projection" not in quantized_linears(ours)  # transformers keeps the last module
    if "T5" in name:
        assert not [n for n in quantized_linears(ours) if n.endswith(".wo")]  # _keep_in_fp32_modules
    assert torch.isfinite(output(ours)).all()


@pytest.mark.parametrize("name", sorted(encoders()))
def test_torchao_selection_equals_transformers(saved: dict[str, Path], name: str) -> None:
    cls = encoders()[name][0]
    ours = _int8_weight_only(cls, saved[name])
    theirs = cls.from_pretrained(
        saved[name],
        dtype=torch.bfloat16,
        quantization_config=transformers.TorchAoConfig(Int8WeightOnlyConfig()),
    )
    # The one difference: transformers 5.23's torchao path matches _keep_in_fp32_modules ("wo") against
    # parameter names ("...wo.weight"), never a match, so it quantizes T5's wo; its bitsandbytes path and
    # qcore keep wo unquantized.
    extra = [n for n in quantized_linears(theirs) if n not in quantized_linears(ours)]
    assert [n for n in quantized_linears(ours) if n not in quantized_linears(theirs)] == []
    assert extra == ([n for n in extra if n.endswith(".wo")] if "T5" in name else [])
    if "T5" not in name:
        assert torch.equal(output(ours), output(theirs))


def test_t5_float32_modules_follow_transformers(saved: dict[str, Path]) -> None:
    cls = transformers.T5EncoderModel
    for dtype in (torch.float16, torch.bfloat16):
        ours = qcore.from_pretrained(cls, saved["T5EncoderModel"], torch_dtype=dtype)
        theirs = cls.from_pretrained(saved["T5EncoderModel"], dtype=dtype)
        wo = "encoder.block.0.layer.1.DenseReluDense.wo.weight"
        # transformers upcasts _keep_in_fp32_modules in float16 loads only.
        assert ours.state_dict()[wo].dtype == theirs.state_dict()[wo].dtype
        assert ours.state_dict()[wo].dtype == (torch.float32 if dtype == torch.float16 else dtype)
        assert torch.equal(output(ours), output(theirs))


@pytest.mark.parametrize("name", ["T5EncoderModel", "CLIPTextModelWithProjection"])
def test_torchao_checkpoint_reloads_in_transformers(
    saved: dict[str, Path], tmp_path: Path, name: str
) -> None:
    cls = encoders()[name][0]
    ours = _int8_weight_only(cls, saved[name])
    ours.save_pretrained(tmp_path / "q")  # transformers' method name, qcore's writer
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["architectures"] == [name] and config["quantization_config"]["quant_method"] == "torchao"
    theirs = cls.from_pretrained(tmp_path / "q")
    assert quantized_linears(theirs) == quantized_linears(ours)
    assert torch.equal(output(theirs), output(ours))
    again = qcore.from_pretrained(cls, tmp_path / "q")
    assert torch.equal(output(again), output(ours))


@pytest.mark.parametrize("backend", ["torchao", "nf4"])
def test_checkpoints_transformers_wrote_load_in_qcore(
    saved: dict[str, Path], tmp_path: Path, backend: str
) -> None:
    cls = transformers.T5EncoderModel
    config = (
        transformers.TorchAoConfig(Int8WeightOnlyConfig())
        if backend == "torchao"
        else transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    )
    theirs = cls.from_pretrained(saved["T5EncoderModel"], quantization_config=config)
    for module in theirs.modules():
        if isinstance(module, bnb.nn.Linear4bit):  # the portable CPU kernel, as qcore-bnb uses
            module.support_avx512bf16_for_cpu = False
    theirs.save_pretrained(tmp_path / backend)  # only one name of the tied embedding is stored
    ours = qcore.from_pretrained(cls, tmp_path / backend)  # no config, no dtype: as transformers reloads
    assert ours.shared.weight is ours.encoder.embed_tokens.weight
    assert quantized_linears(ours) == quantized_linears(theirs)
    assert {p.dtype for p in ours.parameters() if p.is_floating_point()} == {
        p.dtype for p in theirs.parameters() if p.is_floating_point()
    }
    assert torch.equal(output(ours), output(theirs))


def test_push_to_hub_uploads_what_qcore_writes(saved: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    import transformers.utils.hub as hub
    from huggingface_hub import ModelCard
    from safetensors.torch import load_file

    cls = transformers.T5EncoderModel
    ours = qcore.from_pretrained(
        cls, saved["T5EncoderModel"], quantization_config=TorchAoConfig(Int8WeightOnlyConfig())
    )
    qcore.save_pretrained(ours, tmp_path / "qcore")
    uploads: list[dict[str, Any]] = []

    def upload(self: Any, folder: str, *args: Any, **kwargs: Any) -> None:
        uploads.append(
            {
                "files": sorted(p.name for p in Path(folder).iterdir() if p.name != "README.md"),
                "config": (Path(folder) / "config.json").read_bytes(),
                "tensors": load_file(str(Path(folder) / "model.safetensors")),
            }
        )

    # Only the network is replaced: push_to_hub saves into a temporary directory and uploads it.
    repo = type("Repo", (), {"repo_id": "user/t5-int8"})()
    monkeypatch.setattr(hub, "hf_api", lambda: type("Api", (), {"create_repo": lambda *a, **k: repo})())
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *a, **k: ModelCard("---\n---\n"))
    monkeypatch.setattr(type(ours), "_upload_modified_files", upload)
    ours.push_to_hub("user/t5-int8")
    assert len(uploads) == 1
    assert uploads[0]["files"] == ["config.json", "model.safetensors"]
    assert uploads[0]["config"] == (tmp_path / "qcore" / "config.json").read_bytes()
    expected = load_file(str(tmp_path / "qcore" / "model.safetensors"))
    assert uploads[0]["tensors"].keys() == expected.keys()
    assert all(torch.equal(uploads[0]["tensors"][k], expected[k]) for k in expected)


def test_causal_lm_with_tied_head(tmp_path: Path) -> None:
    """Any PreTrainedModel: a Llama whose lm_head is tied to its input embedding."""
    cls = transformers.LlamaForCausalLM
    config = tiny_llama_config(tie_word_embeddings=True)
    torch.manual_seed(0)
    cls(config).to(torch.bfloat16).save_pretrained(tmp_path / "llama")
    ids = torch.tensor([[3, 4, 5, 6]])

    def logits(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(ids).logits

    ours = qcore.from_pretrained(cls, tmp_path / "llama")
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert torch.equal(logits(ours), logits(cls.from_pretrained(tmp_path / "llama")))
    ours = qcore.from_pretrained(
        cls, tmp_path / "llama", quantization_config=TorchAoConfig(Int8WeightOnlyConfig())
    )
    theirs = cls.from_pretrained(
        tmp_path / "llama", quantization_config=transformers.TorchAoConfig(Int8WeightOnlyConfig())
    )
    assert quantized_linears(ours) == quantized_linears(theirs) and "lm_head" not in quantized_linears(ours)
    assert torch.equal(logits(ours), logits(theirs))
    ours.save_pretrained(tmp_path / "llama-int8")
    again = cls.from_pretrained(tmp_path / "llama-int8")
    assert again.lm_head.weight is again.model.embed_tokens.weight
    assert torch.equal(logits(again), logits(ours))
    options = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    nf4 = qcore.from_pretrained(cls, tmp_path / "llama", quantization_config=BitsAndBytesConfig(**options))
    assert quantized_linears(nf4) == transformers_bnb_selection(cls, config, options)


def test_checkpoint_transformers_renames_on_load(tmp_path: Path) -> None:
    """Qwen2.5-VL (QwenImage's text encoder): transformers 5 saves it as model.layers.* / visual.* and
    renames the keys on load; qcore applies the same renames."""
    cls = transformers.Qwen2_5_VLForConditionalGeneration
    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=32,
            patch_size=2,
            spatial_merge_size=1,
            temporal_patch_size=1,
            fullatt_block_indexes=[0],
        ),
    )
    torch.manual_seed(0)
    cls(config).to(torch.bfloat16).save_pretrained(tmp_path / "vl")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "vl" / "model.safetensors"), "pt") as f:
        assert "model.layers.0.mlp.up_proj.weight" in f.keys()  # the legacy naming on disk
    ids = torch.tensor([[3, 4, 5, 6]])

    def logits(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(ids).logits

    assert torch.equal(
        logits(qcore.from_pretrained(cls, tmp_path / "vl")), logits(cls.from_pretrained(tmp_path / "vl"))
    )
    ours = qcore.from_pretrained(
        cls, tmp_path / "vl", quantization_config=TorchAoConfig(Int8WeightOnlyConfig())
    )
    theirs = cls.from_pretrained(
        tmp_path / "vl", quantization_config=transformers.TorchAoConfig(Int8WeightOnlyConfig())
    )
    assert quantized_linears(ours) == quantized_linears(theirs)
    assert "model.language_model.layers.0.mlp.up_proj" in quantized_linears(ours)
    assert torch.equal(logits(ours), logits(theirs))
    ours.save_pretrained(tmp_path / "vl-int8")  # qcore writes the model's own names; both libraries read them
    assert torch.equal(logits(cls.from_pretrained(tmp_path / "vl-int8")), logits(ours))
    assert torch.equal(logits(qcore.from_pretrained(cls, tmp_path / "vl-int8")), logits(ours))


def test_nf4_checkpoint_reloads_in_transformers(saved: dict[str, Path], tmp_path: Path) -> None:
    """transformers runs bitsandbytes on CPU too: qcore's nf4 T5 reloads there with the same bytes."""
    cls = transformers.T5EncoderModel
    options = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    ours = qcore.from_pretrained(
        cls,
        saved["T5EncoderModel"],
        quantization_config=BitsAndBytesConfig(**options),
        torch_dtype=torch.bfloat16,
    )
    ours.save_pretrained(tmp_path / "nf4")
    theirs = cls.from_pretrained(tmp_path / "nf4")
    for module in theirs.modules():
        if isinstance(module, bnb.nn.Linear4bit):  # the portable CPU kernel, as qcore-bnb uses
            module.support_avx512bf16_for_cpu = False
    assert quantized_linears(theirs) == quantized_linears(ours)
    assert torch.equal(output(theirs), output(ours))
