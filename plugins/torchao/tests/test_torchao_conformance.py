"""qcore's conformance suite on qcore-torchao, as installed (entry point): the CPU quant types by name, a
torchao config instance (not a string) on the kit's model, and a real diffusers FluxTransformer2DModel."""

from __future__ import annotations

from typing import Any

import pytest
from torch import nn

from helpers.models import flux_inputs, tiny_flux_config
from qcore.testing import BackendConformance

qcore_torchao = pytest.importorskip(
    "qcore_torchao", reason="qcore-torchao is not installed (pip install ./plugins/torchao)"
)
torchao_quantization = pytest.importorskip("torchao.quantization")
TorchAoConfig = qcore_torchao.TorchAoConfig


class TestTorchAoInt8WeightOnly(BackendConformance):
    config_class = TorchAoConfig
    config_kwargs = {"quant_type": "int8wo"}
    forward_tolerance = 0.02
    min_memory_ratio = 1.8


class TestTorchAoFloat8WeightOnly(BackendConformance):
    config_class = TorchAoConfig
    config_kwargs = {"quant_type": "float8wo"}
    forward_tolerance = 0.05
    min_memory_ratio = 1.8


class TestTorchAoInt8Dynamic(BackendConformance):
    config_class = TorchAoConfig
    config_kwargs = {"quant_type": "int8dq"}
    forward_tolerance = 0.03
    min_memory_ratio = 1.8


class TestTorchAoInt4WeightsInt8Activations(BackendConformance):
    # int4 values are stored unpacked in int8 by IntxUnpackedToInt8Tensor: no 4x saving.
    config_class = TorchAoConfig
    config_kwargs = {"quant_type": "int4dq"}
    forward_tolerance = 0.15
    dequantize_tolerance = 0.1
    min_memory_ratio = 1.5


class _TorchAoInt8Instance(BackendConformance):
    config_class = qcore_torchao.TorchAoConfig
    forward_tolerance = 0.02
    min_memory_ratio = 1.8

    def make_config(self, **overrides: Any) -> qcore_torchao.TorchAoConfig:
        # A fresh torchao config object each time: the kit checks the user's object is not mutated.
        return qcore_torchao.TorchAoConfig(torchao_quantization.Int8WeightOnlyConfig(), **overrides)


class TestTorchAoConfigInstance(_TorchAoInt8Instance):
    pass


class TestTorchAoOnDiffusersFlux(_TorchAoInt8Instance):
    model_kwargs = tiny_flux_config()
    forward_tolerance = 0.05
    min_memory_ratio = 1.3  # the tiny Flux's norms, embeddings and biases stay in bf16

    @property
    def model_class(self) -> type[nn.Module]:  # type: ignore[override]
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel

    def make_inputs(self, model: nn.Module) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (), flux_inputs(seed=self.seed + 1, dtype=self.torch_dtype)

    # Each cast runs on its own model so the other checks keep an uncast one.
    @pytest.mark.parametrize("cast", ["to(float16)", "half()", "float()", "bfloat16()", "double()"])
    def test_dtype_cast_refused(self, reference_checkpoint: Any, inputs: Any, cast: str) -> None:  # type: ignore[override]
        model = self.load(reference_checkpoint, quantization_config=self.make_config())
        super().test_dtype_cast_refused(model, self.forward(model, inputs), inputs, cast)
