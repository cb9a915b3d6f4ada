"""The quantized Linear and the int8 per-channel (de)quantization it stores."""

from __future__ import annotations

import torch
from torch import nn


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` (out, in) -> (int8 weight, float32 scale per output row), symmetric, round to nearest."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    # An all-zero row would divide by zero; any positive scale reproduces it exactly.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_per_channel(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)


class Int8Linear(nn.Module):
    """``nn.Linear`` whose weight is int8 with a float32 scale per output channel.

    State dict keys: ``weight`` (int8, ``(out, in)``), ``weight_scale`` (float32, ``(out,)``) and
    ``bias`` (floating point), so a checkpoint keeps the parameter names of the unquantized model.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=torch.int8, device=device), requires_grad=False
        )
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        dtype = self.compute_dtype or input_dtype
        # Scaling the output instead of the weight keeps the matmul's weight operand exact
        # (|q| <= 127 is representable in every float dtype) and saves one (out, in) multiply.
        out = nn.functional.linear(x.to(dtype), self.weight.to(dtype)) * self.weight_scale.to(dtype)
        if self.bias is not None:
            out = out + self.bias.to(dtype)
        # Like nn.Linear (and bitsandbytes), the output has the input's dtype whatever the compute dtype.
        return out.to(input_dtype)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_per_channel(self.weight, self.weight_scale, dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, compute_dtype={self.compute_dtype}"
        )
