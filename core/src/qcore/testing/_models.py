"""The model the conformance suite quantizes unless a backend author chooses another."""

from __future__ import annotations

import torch
from torch import nn

from .._modelmixin import ModelMixin


class ConformanceBlock(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.ff = nn.Linear(hidden, hidden)
        self.gate = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.ff(h) * torch.sigmoid(self.gate(h))


class ConformanceModel(ModelMixin):
    """A small transformer-shaped MLP stack: every matmul is an ``nn.Linear``.

    Dimensions are multiples of 128, so block-wise formats (4-bit blocks of 64, torchao groups of
    128) quantize every layer, and large enough that weights dominate the memory footprint.
    """

    _no_split_modules = ["ConformanceBlock"]

    def __init__(
        self, in_features: int = 128, hidden: int = 256, depth: int = 2, out_features: int = 128
    ) -> None:
        super().__init__()
        self.proj_in = nn.Linear(in_features, hidden)
        self.blocks = nn.ModuleList(ConformanceBlock(hidden) for _ in range(depth))
        self.norm_out = nn.LayerNorm(hidden)
        self.proj_out = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x)
        for block in self.blocks:
            x = block(x)
        return self.proj_out(self.norm_out(x))
