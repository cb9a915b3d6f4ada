"""qcore's conformance suite on qcore-bnb, as installed (entry point), for the modes that run on CPU."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qcore.testing import BackendConformance

qcore_bnb = pytest.importorskip("qcore_bnb", reason="qcore-bnb is not installed (pip install ./plugins/bnb)")


def _logical_numel(p: torch.Tensor) -> int:
    # bitsandbytes packs two 4-bit values per byte; the logical shape lives in the quant state.
    quant_state = getattr(p, "quant_state", None)
    shape = getattr(quant_state, "shape", None)
    return math.prod(shape) if shape is not None else p.numel()


class _BnbConformance(BackendConformance):
    config_class = qcore_bnb.BitsAndBytesConfig
    skip_modules_option = "llm_int8_skip_modules"

    def count_parameters(self, model: nn.Module) -> int:
        return sum(_logical_numel(p) for p in model.parameters())


class TestBnbNF4DoubleQuant(_BnbConformance):
    config_kwargs = {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": torch.bfloat16,
    }
    forward_tolerance = 0.15
    dequantize_tolerance = 0.02
    min_memory_ratio = 3.0


class TestBnbFP4(_BnbConformance):
    config_kwargs = {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_compute_dtype": torch.bfloat16}
    forward_tolerance = 0.2
    min_memory_ratio = 3.0


class TestBnb8Bit(_BnbConformance):
    config_kwargs = {"load_in_8bit": True}
    forward_tolerance = 0.02
    min_memory_ratio = 1.8
