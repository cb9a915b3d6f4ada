"""The SD3/SD3.5 and Wan 2.x converters: row ranges equal diffusers' own conversions, configs inferred from
shapes, tiny city96-style GGUF files bit-identical to diffusers' from_single_file, and original-named
safetensors files quantized on load by another backend through the same converters."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from original_files import VARIANTS, Variant

import qcore
from qcore_gguf import GGUFConfig, GGUFLinear, SD3Converter, WanConverter

pytest.importorskip("diffusers")

CONVERTERS = {"SD3Transformer2DModel": SD3Converter, "WanTransformer3DModel": WanConverter}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.uint8)


def _infos(variant: Variant, prefix: str = "") -> dict[str, qcore.TensorInfo]:
    return {prefix + k: qcore.TensorInfo(s, torch.float32) for k, s in variant.shapes(variant.config).items()}


def _plain(config: Mapping[str, Any]) -> dict[str, Any]:
    """The architecture fields of a config, tuples as lists (no private or quantization entries)."""
    skip = ("_", "quantization_config")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith(skip)}


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_row_ranges_equal_diffusers_conversion(name: str, prefix: str) -> None:
    variant = VARIANTS[name]
    arrays = {prefix + k: torch.from_numpy(v) for k, v in variant.arrays().items()}
    expected = variant.convert_with_diffusers(arrays)
    converter = CONVERTERS[variant.model_class]()
    assert converter.matches(_infos(variant, prefix))
    mapping = converter.convert(_infos(variant, prefix))
    assert set(mapping) == set(expected)
    for key, ranges in mapping.items():
        parts = [arrays[r.key][r.start : r.stop] for r in ranges]
        assert torch.equal(torch.cat(parts), expected[key]), key
    assert {r.key for ranges in mapping.values() for r in ranges} == set(arrays)
    model_keys = set(variant.model_cls().from_config(variant.config).state_dict())
    assert set(mapping) == model_keys


@pytest.mark.parametrize("name", list(VARIANTS))
def test_config_inference_matches_the_model(name: str) -> None:
    variant = VARIANTS[name]
    converter = CONVERTERS[variant.model_class]()
    config = converter.infer_config(_infos(variant, "model.diffusion_model."))
    assert config is not None and config["_class_name"] == variant.model_class
    assert _plain(config) == _plain(variant.config)


def test_converters_match_only_their_naming() -> None:
    sd3, wan = _infos(VARIANTS["sd35"]), _infos(VARIANTS["wan-t2v"])
    assert SD3Converter().matches(sd3) and not SD3Converter().matches(wan)
    assert WanConverter().matches(wan) and not WanConverter().matches(sd3)
    vace = {**wan, "vace_blocks.0.after_proj.bias": qcore.TensorInfo((256,), torch.float32)}
    assert not WanConverter().matches(vace)  # WanVACETransformer3DModel's naming
    diffusers_named = {"pos_embed.proj.weight": qcore.TensorInfo((256, 16, 2, 2), torch.float32)}
    assert not SD3Converter().matches(diffusers_named)


def test_uninferable_shapes_give_no_config() -> None:
    wan = _infos(VARIANTS["wan-t2v"])
    wan["patch_embedding.weight"] = qcore.TensorInfo((320, 16, 1, 2, 2), torch.float32)
    assert WanConverter().infer_config(wan) is None  # 320 is no whole number of 128-wide heads
    sd3 = _infos(VARIANTS["sd35"])
    sd3["pos_embed"] = qcore.TensorInfo((1, 200, 256), torch.float32)
    assert SD3Converter().infer_config(sd3) is None  # no square grid of positions


def test_missing_sd3_tensor_names_the_key() -> None:
    infos = _infos(VARIANTS["sd35"], "model.diffusion_model.")
    del infos["model.diffusion_model.joint_blocks.0.x_block.mlp.fc1.bias"]
    with pytest.raises(qcore.CheckpointError, match=r"joint_blocks\.0\.x_block\.mlp\.fc1\.bias"):
        SD3Converter().convert(infos)


@pytest.mark.parametrize(
    ("name", "quant_type"),
    [
        ("sd35", "Q8_0"),
        ("sd35", "Q4_K"),
        ("wan-t2v", "Q8_0"),
        ("wan-i2v", "Q4_K"),
        ("sd3", "Q6_K"),
        ("wan-t2v", "Q5_0"),
    ],
)
def test_gguf_bit_identical_to_diffusers_from_single_file(name: str, quant_type: str, tmp_path: Path) -> None:
    variant = VARIANTS[name]
    path = variant.write_gguf(tmp_path / f"{name}-{quant_type}.gguf", quant_type)
    theirs = variant.from_single_file(
        path, variant.write_config_dir(tmp_path / "cfg"), torch.bfloat16, gguf=True
    )
    ours = qcore.from_pretrained(  # no config: inferred from the shapes
        variant.model_cls(),
        path,
        quantization_config=GGUFConfig(compute_dtype=torch.bfloat16),
        torch_dtype=torch.bfloat16,
    )
    assert _plain(ours.config) == _plain(theirs.config)
    their_state, our_state = theirs.state_dict(), ours.state_dict()
    assert set(our_state) == set(their_state)
    for key, value in their_state.items():
        assert our_state[key].dtype == value.dtype and torch.equal(_bits(our_state[key]), _bits(value)), key
        if hasattr(value, "quant_type"):
            assert our_state[key].quant_type == value.quant_type.name, key
    quantized = [n for n, m in ours.named_modules() if isinstance(m, GGUFLinear)]
    assert len(quantized) == sum(1 for v in their_state.values() if hasattr(v, "quant_type")) > 0
    with torch.no_grad():
        expected = theirs(**variant.inputs())[0]
        actual = ours(**variant.inputs())[0]
    assert torch.isfinite(expected).all()
    assert torch.equal(_bits(actual), _bits(expected))


@pytest.mark.parametrize("name", ["sd35", "wan-i2v"])
def test_original_safetensors_quantize_on_load_with_torchao(name: str, tmp_path: Path) -> None:
    """The converters know no backend: an original-named safetensors file loads as diffusers converts it,
    and torchao's int8wo quantizes it on load through the same converter."""
    pytest.importorskip("torchao")
    from qcore_torchao import TorchAoConfig

    variant = VARIANTS[name]
    path = variant.write_safetensors(tmp_path / f"{name}.safetensors")
    converted = variant.from_single_file(
        path, variant.write_config_dir(tmp_path / "cfg"), torch.bfloat16, gguf=False
    )
    # from_single_file casts every module to torch_dtype; from_pretrained (which qcore follows) keeps the
    # model's _keep_in_fp32_modules in float32. The reference is diffusers' from_pretrained of its conversion.
    converted.save_pretrained(tmp_path / "diffusers")
    theirs = variant.model_cls().from_pretrained(tmp_path / "diffusers", torch_dtype=torch.bfloat16)
    plain = qcore.from_pretrained(variant.model_cls(), path, torch_dtype=torch.bfloat16)
    for key, value in theirs.state_dict().items():
        mine = plain.state_dict()[key]
        assert mine.dtype == value.dtype and torch.equal(mine, value), key
    int8 = qcore.from_pretrained(
        variant.model_cls(), path, quantization_config=TorchAoConfig("int8wo"), torch_dtype=torch.bfloat16
    )
    assert int8.quantization_method == "torchao"
    with torch.no_grad():
        reference = theirs(**variant.inputs())[0]
        assert torch.equal(plain(**variant.inputs())[0], reference)
        actual = int8(**variant.inputs())[0]
    error = float((actual.float() - reference.float()).norm() / reference.float().norm())
    assert 0 < error < 0.05, error


def test_converters_are_installed_entry_points() -> None:
    from importlib.metadata import entry_points

    found = {ep.name: ep.load() for ep in entry_points(group="qcore.converters")}
    assert found["SD3Transformer2DModel"] is SD3Converter
    assert found["WanTransformer3DModel"] is WanConverter


def test_wan_patch_embedding_stored_flat_with_orig_shape(tmp_path: Path) -> None:
    """city96 stores Wan's 5-D Conv3d kernel flattened (GGUF has 4 dimensions at most), its shape under
    ``comfy.gguf.orig_shape.<name>``; it loads equal to the file that keeps the 5-D shape."""
    from qcore_gguf.testing import city96_type, write_gguf

    variant = VARIANTS["wan-t2v"]
    key = "model.diffusion_model.patch_embedding.weight"
    choose = city96_type("Q8_0")
    arrays = {f"model.diffusion_model.{k}": v for k, v in variant.arrays().items()}
    tensors = {k: (v, choose(k, v.shape)) for k, v in arrays.items()}
    assert tensors[key][1] == "F16"
    write_gguf(tmp_path / "whole.gguf", tensors, architecture="wan")
    kernel = arrays[key]
    tensors[key] = (kernel.reshape(kernel.shape[0], -1), "F16")
    orig_shape = {f"comfy.gguf.orig_shape.{key}": list(kernel.shape)}
    write_gguf(tmp_path / "flat.gguf", tensors, architecture="wan", metadata=orig_shape)

    whole = qcore.from_pretrained(variant.model_cls(), tmp_path / "whole.gguf", torch_dtype=torch.bfloat16)
    flat = qcore.from_pretrained(variant.model_cls(), tmp_path / "flat.gguf", torch_dtype=torch.bfloat16)
    assert flat.patch_embedding.weight.shape == kernel.shape
    for name, value in whole.state_dict().items():
        assert torch.equal(_bits(flat.state_dict()[name]), _bits(value)), name


# The transformer configs diffusers publishes for stabilityai/stable-diffusion-3.5-large and
# Wan-AI/Wan2.1-I2V-14B-480P-Diffusers (the shapes of the original files are those these configs build).
SD35_LARGE = {
    **VARIANTS["sd35"].config,
    "num_layers": 38,
    "num_attention_heads": 38,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 2432,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "dual_attention_layers": [],
}
WAN21_I2V_14B = {
    **VARIANTS["wan-t2v"].config,
    "num_attention_heads": 40,
    "in_channels": 36,
    "text_dim": 4096,
    "ffn_dim": 13824,
    "num_layers": 40,
    "image_dim": 1280,
    "added_kv_proj_dim": 5120,
}


@pytest.mark.parametrize(("name", "config"), [("sd35", SD35_LARGE), ("wan-t2v", WAN21_I2V_14B)])
def test_released_sizes_infer_their_published_config(name: str, config: dict[str, Any]) -> None:
    variant = VARIANTS[name]
    infos = {k: qcore.TensorInfo(s, torch.bfloat16) for k, s in variant.shapes(config).items()}
    assert _plain(CONVERTERS[variant.model_class]().infer_config(infos) or {}) == _plain(config)


def test_wan_first_last_frame_position_table_has_its_model_key(tmp_path: Path) -> None:
    """FLF2V files add ``img_emb.emb_pos``, which diffusers' converter leaves unrenamed (so its
    from_single_file cannot place it); the converter maps it to the image embedder's ``pos_embed``."""
    variant = VARIANTS["wan-i2v"]
    config = {**variant.config, "pos_embed_seq_len": 8}
    shapes = variant.shapes(config)
    infos = {k: qcore.TensorInfo(s, torch.float32) for k, s in shapes.items()}
    mapping = WanConverter().convert(infos)
    assert mapping["condition_embedder.image_embedder.pos_embed"][0].key == "img_emb.emb_pos"
    assert _plain(WanConverter().infer_config(infos) or {}) == _plain(config)

    from qcore_gguf.testing import random_arrays, write_original_gguf

    arrays = random_arrays(shapes)
    path = write_original_gguf(tmp_path / "flf2v.gguf", arrays, "Q8_0", architecture="wan")
    model = qcore.from_pretrained(variant.model_cls(), path, torch_dtype=torch.bfloat16)
    table = model.condition_embedder.image_embedder.pos_embed
    assert torch.equal(table, torch.from_numpy(arrays["img_emb.emb_pos"]).to(table.dtype))
    inputs = variant.inputs()
    first, last = inputs["encoder_hidden_states_image"], inputs["encoder_hidden_states_image"].flip(1)
    inputs["encoder_hidden_states_image"] = torch.cat([first, last])  # two frames' tokens: 2 x 4 = 8
    with torch.no_grad():
        assert torch.isfinite(model(**inputs)[0]).all()


def test_file_with_other_components_names_them(tmp_path: Path) -> None:
    """An all-in-one SD3 file (transformer and VAE) is refused with the VAE's tensors named."""
    from safetensors.torch import save_file

    variant = VARIANTS["sd35"]
    state = {f"model.diffusion_model.{k}": torch.from_numpy(v) for k, v in variant.arrays().items()}
    state["first_stage_model.decoder.conv_in.weight"] = torch.zeros(8, 16, 3, 3)
    save_file(state, str(tmp_path / "all-in-one.safetensors"))
    with pytest.raises(qcore.CheckpointError, match=r"first_stage_model\.decoder\.conv_in\.weight"):
        qcore.from_pretrained(variant.model_cls(), tmp_path / "all-in-one.safetensors")
