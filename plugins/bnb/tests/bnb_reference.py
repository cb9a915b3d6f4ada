"""What qcore-bnb's quantized layers must hold: the bytes of bitsandbytes' own call on the whole
checkpoint weight."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch
from torch import nn

import qcore
from helpers.models import TinyTransformer
from qcore_bnb import BitsAndBytesConfig


def load_4bit(
    ckpt: Path, *, quant_type: str, double: bool, storage: str, **options: Any
) -> tuple[TinyTransformer, dict[str, bnb.nn.Linear4bit]]:
    """The TinyTransformer of ``ckpt`` quantized to 4 bits on load (``options``: more config fields),
    and its Linear4bit layers by name."""
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double,
        bnb_4bit_quant_storage=storage,
        **options,
    )
    model = qcore.from_pretrained(
        TinyTransformer, ckpt, quantization_config=config, torch_dtype=torch.bfloat16
    )
    return model, linear4bit_modules(model)


def linear4bit_modules(model: nn.Module) -> dict[str, bnb.nn.Linear4bit]:
    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def linear8bit_modules(model: nn.Module) -> dict[str, bnb.nn.Linear8bitLt]:
    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}


def assert_4bit_like_bitsandbytes(
    layers: Mapping[str, bnb.nn.Linear4bit],
    source: Mapping[str, torch.Tensor],
    *,
    quant_type: str,
    double: bool,
    storage: str,
) -> None:
    """Each layer's packed weight and quantization state equal ``F.quantize_4bit`` of its source weight."""
    for name, module in layers.items():
        packed, state = F.quantize_4bit(
            source[f"{name}.weight"],
            blocksize=64,
            compress_statistics=double,
            quant_type=quant_type,
            quant_storage=getattr(torch, storage),
        )
        weight = module.weight
        assert weight.shape == packed.shape, name
        assert torch.equal(weight.data.view(torch.uint8), packed.view(torch.uint8)), name
        assert torch.equal(weight.quant_state.absmax, state.absmax), name
        assert torch.equal(weight.quant_state.code, state.code), name
        if double:
            assert torch.equal(weight.quant_state.state2.absmax, state.state2.absmax), name
            assert torch.equal(weight.quant_state.offset, state.offset), name
        else:
            assert weight.quant_state.state2 is None, name


def assert_8bit_like_bitsandbytes(
    layers: Mapping[str, bnb.nn.Linear8bitLt], source: Mapping[str, torch.Tensor]
) -> None:
    """Each layer's int8 weight and row scales equal ``F.int8_vectorwise_quant`` of its float16 source."""
    for name, module in layers.items():
        cb, scb, _ = F.int8_vectorwise_quant(source[f"{name}.weight"].to(torch.float16))
        assert module.weight.dtype == torch.int8, name
        assert torch.equal(module.weight.data, cb) and torch.equal(module.weight.SCB, scb), name
