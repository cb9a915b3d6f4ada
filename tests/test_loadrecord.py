"""copy.deepcopy of a quantized model (diffusers users keep EMA copies this way): the copy is its own
quantized model, with its own quantizer and load record, and it saves and dequantizes on its own."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import qcore
from helpers.models import TinyTransformer


def _int8_example() -> Any:
    qcore_int8 = pytest.importorskip("qcore_int8")
    return qcore_int8.Int8Config()


def _torchao_int8wo() -> Any:
    qcore_torchao = pytest.importorskip("qcore_torchao")
    from torchao.quantization import Int8WeightOnlyConfig

    return qcore_torchao.TorchAoConfig(Int8WeightOnlyConfig())


def _bnb_nf4() -> Any:
    qcore_bnb = pytest.importorskip("qcore_bnb")
    return qcore_bnb.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )


def _load_int8_test(checkpoint: Path, int8_backend: qcore.Backend) -> torch.nn.Module:
    from helpers.int8_backend import Int8TestConfig

    return qcore.from_pretrained(TinyTransformer, checkpoint, quantization_config=Int8TestConfig())


def _loader(make_config: Callable[[], Any]) -> Callable[[Path, qcore.Backend], torch.nn.Module]:
    def load(checkpoint: Path, int8_backend: qcore.Backend) -> torch.nn.Module:
        return qcore.from_pretrained(
            TinyTransformer, checkpoint, quantization_config=make_config(), torch_dtype=torch.bfloat16
        )

    return load


def _load_gguf(checkpoint: Path, int8_backend: qcore.Backend) -> torch.nn.Module:
    testing = pytest.importorskip("qcore_gguf.testing")
    from safetensors.torch import load_file

    tensors = {}
    for key, value in load_file(checkpoint / "diffusion_pytorch_model.safetensors").items():
        quantized = value.dim() == 2 and value.shape[-1] % 32 == 0
        tensors[key] = (value.float().numpy(), "Q8_0" if quantized else "F32")
    path = checkpoint.parent / "tiny-Q8_0.gguf"
    testing.write_gguf(path, tensors, architecture="qcore")
    return qcore.from_pretrained(TinyTransformer, path, config=checkpoint, torch_dtype=torch.bfloat16)


LOADERS = {
    "int8-test": _load_int8_test,
    "qcore-int8": _loader(_int8_example),
    "torchao-int8wo": _loader(_torchao_int8wo),
    "bnb-nf4": _loader(_bnb_nf4),
    "gguf-q8_0": _load_gguf,
}


@pytest.mark.parametrize("backend", list(LOADERS))
def test_deepcopy_of_a_quantized_model_saves_and_dequantizes_on_its_own(
    backend: str, tiny_ckpt: Path, tiny_input: torch.Tensor, int8_backend: qcore.Backend, tmp_path: Path
) -> None:
    model = LOADERS[backend](tiny_ckpt, int8_backend)
    with torch.no_grad():
        expected = model(tiny_input)

    twin = copy.deepcopy(model)

    assert type(twin) is type(model) and twin.is_quantized
    assert twin.hf_quantizer is not model.hf_quantizer
    assert twin.hf_quantizer.quant_method == model.hf_quantizer.quant_method
    assert twin.proj_in.weight is not model.proj_in.weight
    with torch.no_grad():
        torch.testing.assert_close(twin(tiny_input), expected, rtol=0, atol=0)
    with pytest.raises(qcore.DtypeCastError):
        twin.to(torch.float16)

    if backend != "gguf-q8_0":  # GGUF files load through their format; qcore saves the others
        saved = tmp_path / "twin"
        twin.save_pretrained(saved)
        reloaded = qcore.from_pretrained(TinyTransformer, saved, torch_dtype=torch.bfloat16)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(tiny_input), expected, rtol=0, atol=0)

    qcore.dequantize(twin)
    assert not twin.is_quantized and model.is_quantized
    with torch.no_grad():
        torch.testing.assert_close(twin(tiny_input), expected, rtol=0.05, atol=0.05)
        torch.testing.assert_close(model(tiny_input), expected, rtol=0, atol=0)
    with pytest.raises(qcore.DtypeCastError):
        model.to(torch.float16)


def test_deepcopy_keeps_the_loads_observers(
    tiny_ckpt: Path, int8_backend: qcore.Backend, tmp_path: Path
) -> None:
    from helpers.int8_backend import Int8TestConfig

    class SaveObserver:
        def __init__(self) -> None:
            self.saved: list[int] = []

        @qcore.hookimpl
        def get_state_dict_and_metadata(
            self, model: torch.nn.Module, state_dict: dict[str, torch.Tensor]
        ) -> None:
            self.saved.append(id(model))

    observer = SaveObserver()
    model = qcore.from_pretrained(
        TinyTransformer, tiny_ckpt, quantization_config=Int8TestConfig(), observers=[observer]
    )
    twin = copy.deepcopy(model)
    qcore.save_pretrained(twin, tmp_path / "twin")
    assert observer.saved == [id(twin)]


def test_deepcopy_of_a_quantized_diffusers_model_saves_through_its_own_method(tmp_path: Path) -> None:
    diffusers = pytest.importorskip("diffusers")
    from helpers.models import flux_inputs, tiny_flux_config

    torch.manual_seed(0)
    diffusers.FluxTransformer2DModel(**tiny_flux_config()).to(torch.bfloat16).save_pretrained(tmp_path / "f")
    model = qcore.from_pretrained(
        diffusers.FluxTransformer2DModel,
        tmp_path / "f",
        quantization_config=_bnb_nf4(),
        torch_dtype=torch.bfloat16,
    )
    twin = copy.deepcopy(model)
    inputs = flux_inputs()
    with torch.no_grad():
        expected = model(**inputs)[0]
        assert torch.equal(twin(**inputs)[0], expected)
    twin.save_pretrained(tmp_path / "twin")  # diffusers' method on a quantized model: qcore's save
    reloaded = qcore.from_pretrained(
        diffusers.FluxTransformer2DModel, tmp_path / "twin", torch_dtype=torch.bfloat16
    )
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs)[0], expected)


def test_deepcopy_of_a_model_diffusers_loaded_through_the_bridge(tmp_path: Path) -> None:
    diffusers = pytest.importorskip("diffusers")
    from helpers.models import flux_inputs, tiny_flux_config

    torch.manual_seed(0)
    diffusers.FluxTransformer2DModel(**tiny_flux_config()).to(torch.bfloat16).save_pretrained(tmp_path / "f")
    qcore.enable_bridge()
    try:
        model = diffusers.FluxTransformer2DModel.from_pretrained(
            tmp_path / "f", quantization_config=_int8_example(), torch_dtype=torch.bfloat16
        )
        twin = copy.deepcopy(model)
        assert twin.hf_quantizer is not model.hf_quantizer
        inputs = flux_inputs()
        with torch.no_grad():
            expected = model(**inputs)[0]
            assert torch.equal(twin(**inputs)[0], expected)
        twin.save_pretrained(tmp_path / "twin")
        reloaded = diffusers.FluxTransformer2DModel.from_pretrained(
            tmp_path / "twin", torch_dtype=torch.bfloat16
        )
        with torch.no_grad():
            assert torch.equal(reloaded(**inputs)[0], expected)
    finally:
        qcore.disable_bridge()
