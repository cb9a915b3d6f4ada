"""GGUFLinear: an ``nn.Linear`` whose weight stays GGML blocks and is dequantized in each forward."""

from __future__ import annotations

import torch
from torch import nn

from ._tensor import GGUFWeight


class GGUFLinear(nn.Linear):
    """``nn.Linear`` whose ``weight`` is a :class:`GGUFWeight`, decoded per call in ``compute_dtype``.

    The forward is diffusers' ``GGUFLinear.forward_native`` (weight and bias cast to ``compute_dtype``, the
    input as it comes), so outputs are bit-identical. A layer whose checkpoint weight is a plain float
    tensor (F32/F16 in the file) behaves exactly like ``nn.Linear``, as diffusers leaves such layers.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device)
        self.compute_dtype = compute_dtype

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if not isinstance(weight, GGUFWeight):
            return nn.functional.linear(inputs, weight, self.bias)
        bias = self.bias.to(self.compute_dtype) if self.bias is not None else None
        return nn.functional.linear(inputs, weight.dequantize().to(self.compute_dtype), bias)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        weight = self.weight
        if isinstance(weight, GGUFWeight):
            return weight.dequantize().to(dtype)
        return weight.detach().to(dtype)

    def extra_repr(self) -> str:
        quant_type = getattr(self.weight, "quant_type", str(self.weight.dtype).removeprefix("torch."))
        return f"{super().extra_repr()}, quant_type={quant_type}, compute_dtype={self.compute_dtype}"
