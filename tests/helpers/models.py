"""Tiny models built on the fly for the tests."""

from __future__ import annotations

import torch
from torch import nn

import qcore


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.Linear(dim, dim)
        self.proj_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj_out(torch.nn.functional.gelu(self.attn(self.norm(x))))


class TinyTransformer(qcore.ModelMixin):
    """A small transformer-shaped model: embedding Linear, blocks, a vace_blocks stack, output Linear."""

    _no_split_modules = ["Block"]

    def __init__(self, dim: int = 64, depth: int = 2, vace_depth: int = 1, out_dim: int = 32) -> None:
        super().__init__()
        self.proj_in = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.vace_blocks = nn.ModuleList(Block(dim) for _ in range(vace_depth))
        self.norm_out = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x)
        for block in [*self.blocks, *self.vace_blocks]:
            x = block(x)
        return self.proj_out(self.norm_out(x))


def make_tiny(seed: int = 0, dtype: torch.dtype = torch.bfloat16, **config: int) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer(**config).to(dtype)


def tiny_flux_config(**overrides: object) -> dict[str, object]:
    """A FluxTransformer2DModel config small enough for CPU tests (``overrides`` replace its fields)."""
    config: dict[str, object] = dict(
        patch_size=1,
        in_channels=16,
        out_channels=None,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    )
    return {**config, **overrides}


def tiny_llama_config(**overrides: object) -> object:
    """A two-layer LlamaConfig with grouped-query attention, small enough for CPU tests."""
    from transformers import LlamaConfig

    options: dict[str, object] = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaConfig(**{**options, **overrides})


def flux_inputs(seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens, text = 16, 8
    return dict(
        hidden_states=torch.randn(1, tokens, 16, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(1, text, 32, generator=g).to(dtype),
        pooled_projections=torch.randn(1, 32, generator=g).to(dtype),
        timestep=torch.tensor([0.5]).to(dtype),
        img_ids=torch.zeros(tokens, 3),
        txt_ids=torch.zeros(text, 3),
        return_dict=False,
    )
