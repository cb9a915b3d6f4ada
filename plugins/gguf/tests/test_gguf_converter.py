"""The BFL -> diffusers Flux converter: row ranges equal diffusers' own conversion, config inference, and
the same converter serving other backends for BFL-named safetensors files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flux_files import (
    TINY_FLUX,
    bfl_flux_arrays,
    bfl_flux_shapes,
    diffusers_flux_converter,
    flux_inputs,
    write_bfl_flux_gguf,
    write_bfl_flux_safetensors,
    write_config_dir,
)

import qcore
from qcore_gguf import FluxConverter, GGUFFormat

pytest.importorskip("diffusers")
from diffusers import FluxTransformer2DModel  # noqa: E402


def _infos(prefix: str = "") -> dict[str, qcore.TensorInfo]:
    return {prefix + k: qcore.TensorInfo(s, torch.float32) for k, s in bfl_flux_shapes().items()}


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_row_ranges_equal_diffusers_conversion(prefix: str) -> None:
    arrays = {prefix + k: torch.from_numpy(v) for k, v in bfl_flux_arrays().items()}
    expected = diffusers_flux_converter()(dict(arrays))
    mapping = FluxConverter().convert(_infos(prefix))
    assert set(mapping) == set(expected)
    for key, ranges in mapping.items():
        parts = [arrays[r.key][r.start : r.stop] for r in ranges]
        assert torch.equal(torch.cat(parts), expected[key]), key
    used = {r.key for ranges in mapping.values() for r in ranges}
    assert used == set(arrays)


def test_swapped_rows_of_blocks_are_exact(tmp_path: Path) -> None:
    """The adaLN shift/scale swap and the qkv split cut Q4_K blocks by whole rows, with no decoding."""
    path = write_bfl_flux_gguf(tmp_path / "f.gguf", "Q4_K")
    with GGUFFormat(path) as fmt:
        tensors = fmt.tensors()
        mapping = FluxConverter().convert(tensors)
        key = "model.diffusion_model.final_layer.adaLN_modulation.1.weight"
        whole = fmt.read(key)
        width = tensors[key].shape[0] // 2
        ranges = mapping["norm_out.linear.weight"]
        joined = torch.cat([fmt.read(r.key, (r.start, r.stop)) for r in ranges])
        assert joined.quant_type == "Q4_K"
        assert torch.equal(
            joined.dequantize(), torch.cat([whole.dequantize()[width:], whole.dequantize()[:width]])
        )


def test_config_inference_matches_the_model() -> None:
    config = FluxConverter().infer_config(_infos("model.diffusion_model."))
    assert config == TINY_FLUX
    wider = {
        **TINY_FLUX,
        "num_attention_heads": 3,
        "num_layers": 1,
        "num_single_layers": 3,
        "guidance_embeds": False,
    }
    infos = {k: qcore.TensorInfo(s, torch.float32) for k, s in bfl_flux_shapes(wider).items()}
    assert FluxConverter().infer_config(infos) == wider
    odd_heads = dict(infos)
    odd_heads["double_blocks.0.img_attn.norm.query_norm.scale"] = qcore.TensorInfo((64,), torch.float32)
    assert FluxConverter().infer_config(odd_heads) is None  # RoPE axes for head_dim 64 are not in the file


def test_converter_is_found_only_for_bfl_names() -> None:
    converter = FluxConverter()
    assert converter.matches(_infos()) and converter.matches(_infos("model.diffusion_model."))
    diffusers_named = {"x_embedder.weight": qcore.TensorInfo((256, 64), torch.float32)}
    assert not converter.matches(diffusers_named)


def test_bfl_safetensors_loads_like_diffusers_single_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import diffusers.loaders.single_file_model as sfm

    path = write_bfl_flux_safetensors(tmp_path / "flux-bfl.safetensors")
    entry = dict(sfm.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"])
    entry["checkpoint_mapping_fn"] = diffusers_flux_converter()
    monkeypatch.setitem(sfm.SINGLE_FILE_LOADABLE_CLASSES, "FluxTransformer2DModel", entry)
    theirs = FluxTransformer2DModel.from_single_file(
        str(path),
        config=str(write_config_dir(tmp_path / "cfg")),
        torch_dtype=torch.bfloat16,
        local_files_only=True,
    )
    ours = qcore.from_pretrained(FluxTransformer2DModel, path, torch_dtype=torch.bfloat16)
    assert not getattr(ours, "is_quantized", False)
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(ours(**flux_inputs())[0], theirs(**flux_inputs())[0])


@pytest.mark.parametrize("backend", ["torchao", "bitsandbytes"])
def test_bfl_safetensors_quantizes_on_load_with_other_backends(tmp_path: Path, backend: str) -> None:
    """The converter knows no backend: torchao and bitsandbytes quantize BFL-named files through it."""
    path = write_bfl_flux_safetensors(tmp_path / "flux-bfl.safetensors")
    if backend == "torchao":
        pytest.importorskip("torchao")
        from qcore_torchao import TorchAoConfig

        config = TorchAoConfig("int8wo")
    else:
        pytest.importorskip("bitsandbytes")
        from qcore_bnb import BitsAndBytesConfig

        config = BitsAndBytesConfig(load_in_8bit=True)
    plain = qcore.from_pretrained(FluxTransformer2DModel, path, torch_dtype=torch.bfloat16)
    model = qcore.from_pretrained(
        FluxTransformer2DModel, path, quantization_config=config, torch_dtype=torch.bfloat16
    )
    assert model.quantization_method == backend
    with torch.no_grad():
        expected, actual = plain(**flux_inputs())[0].float(), model(**flux_inputs())[0].float()
    error = float((actual - expected).norm() / expected.norm())
    assert 0 < error < 0.05, error
