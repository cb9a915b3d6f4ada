"""qcore's conformance suite on qcore-torchao, as installed (entry point), for the CPU quant types."""

from __future__ import annotations

from qcore.testing import BackendConformance
from qcore_torchao import TorchAoConfig


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
