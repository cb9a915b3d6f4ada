"""qcore's conformance suite on qcore-bnb, as installed (entry point): 4-bit and 8-bit, on CPU.

Forward tolerances: the measured relative L2 errors on the kit's model (several quantized Linear layers in a
chain) plus margin: nf4 0.131 (bound 0.15), fp4 with double quant 0.165 (bound 0.2), LLM.int8 0.014 (0.02).
"""

from __future__ import annotations

import pytest
import torch

from qcore.testing import BackendConformance

qcore_bnb = pytest.importorskip("qcore_bnb", reason="qcore-bnb is not installed (pip install ./plugins/bnb)")


class _Bnb(BackendConformance):
    config_class = qcore_bnb.BitsAndBytesConfig
    skip_modules_option = "llm_int8_skip_modules"

    def count_parameters(self, model: torch.nn.Module) -> int:
        # A 4-bit weight packs two values per byte; its quant state knows the logical shape.
        return sum(
            p.quant_state.shape.numel() if getattr(p, "quant_state", None) is not None else p.numel()
            for p in model.parameters()
        )


class TestBnbNF4(_Bnb):
    config_kwargs = {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_compute_dtype": torch.bfloat16,
    }
    forward_tolerance = 0.15
    min_memory_ratio = 2.5


class TestBnbFP4DoubleQuant(_Bnb):
    # Float quant storages hold packed bytes that read as NaN, which the kit's torch.equal comparison
    # of saved tensors rejects; test_bnb_load.py checks every storage dtype bit by bit.
    config_kwargs = {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True}
    forward_tolerance = 0.2
    min_memory_ratio = 2.5


class TestBnbInt8(_Bnb):
    config_kwargs = {"load_in_8bit": True}
    forward_tolerance = 0.02
    min_memory_ratio = 1.5
