"""qcore's conformance suite on qcore-torchao, as installed (entry point): a torchao config instance
(not a string) on the kit's model, and a real diffusers FluxTransformer2DModel.

The string quant types (int8wo, float8wo, int8dq, int4dq) run in test_torchao_conformance.py."""

from __future__ import annotations

from typing import Any

import pytest
from torch import nn

from helpers.models import flux_inputs, tiny_flux_config
from qcore.testing import BackendConformance

qcore_torchao = pytest.importorskip("qcore_torchao", reason="qcore-torchao is not installed (pip install ./plugins/torchao)")
torchao_quantization = pytest.importorskip("torchao.quantization")


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
