"""qcore's conformance kit on the GGUF backend.

GGUF cannot quantize on load, so the suite's "quantize the reference checkpoint" loads are served by a
GGUF file written from that checkpoint (Q8_0 Linear weights, F32 for the rest), with the reference
directory as ``config=``; every other check runs as the kit defines it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

import qcore
from qcore.testing import BackendConformance
from qcore_gguf import GGUFConfig, GGUFLinear, GGUFWeight
from qcore_gguf.testing import write_checkpoint_as_gguf


class TestGGUFConformance(BackendConformance):
    config_class = GGUFConfig
    config_kwargs: ClassVar[dict[str, Any]] = {"compute_dtype": "bfloat16"}
    forward_tolerance = 0.02
    dequantize_tolerance = 0.0  # dequantize() decodes the same blocks once instead of per call
    corruptions = ("truncated_tensor", "wrong_dtype", "truncated_file")

    def load(self, path: Path | str, **kwargs: Any) -> nn.Module:
        reference = Path(path)
        if kwargs.get("quantization_config") is not None and (reference / "config.json").is_file():
            if "quantized" not in reference.name:
                kwargs.setdefault("config", reference)
                path = write_checkpoint_as_gguf(reference)
        return super().load(path, **kwargs)

    def count_parameters(self, model: nn.Module) -> int:
        return sum(
            math.prod(p.logical_shape) if isinstance(p, GGUFWeight) else p.numel() for p in model.parameters()
        )

    def test_load_facts_recorded(self, quantized_model: nn.Module) -> None:
        """A GGUF load is always of a pre-quantized file; its config and dtype are recorded."""
        assert quantized_model.config["quantization_config"] == self.make_config()
        assert quantized_model.config["_pre_quantization_dtype"] == self.torch_dtype
        assert isinstance(quantized_model.hf_quantizer, qcore.Quantizer)
        assert quantized_model.hf_quantizer.pre_quantized

    def test_modules_to_not_convert(self, reference_checkpoint: Path, reference_model: nn.Module) -> None:
        """A skipped module becomes a plain Linear holding its decoded blocks (as diffusers does)."""
        skip = self.module_to_not_convert
        model = self.load(
            reference_checkpoint, quantization_config=self.make_config(modules_to_not_convert=[skip])
        )
        full = self.load(reference_checkpoint, quantization_config=self.make_config())
        for name in self.linear_names(reference_model):
            module = model.get_submodule(name)
            if qcore.module_matches(name, [skip]):
                assert type(module) is nn.Linear and type(module.weight.data) is torch.Tensor, name
                blocks = full.get_submodule(name).weight
                assert torch.equal(module.weight, blocks.dequantize().to(self.torch_dtype)), name
            else:
                assert isinstance(module, GGUFLinear) and isinstance(module.weight, GGUFWeight), name
        assert skip in model.hf_quantizer.quantization_config.to_dict()["modules_to_not_convert"]
