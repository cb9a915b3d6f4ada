"""qcore's conformance suite on the example backend qcore-int8, as installed (entry point)."""

from __future__ import annotations

import pytest

from qcore.testing import BackendConformance

qcore_int8 = pytest.importorskip(
    "qcore_int8",
    reason="qcore-int8 is not installed here (pip install ./examples/qcore-int8); "
    "test_example_backend.py runs this suite against its wheel in a fresh environment",
)


class TestInt8Conformance(BackendConformance):
    config_class = qcore_int8.Int8Config
    forward_tolerance = 0.02
    dequantize_tolerance = 0.02
    min_memory_ratio = 1.8


class TestInt8ConformanceFloat32Compute(BackendConformance):
    config_class = qcore_int8.Int8Config
    config_kwargs = {"compute_dtype": "float32"}
    forward_tolerance = 0.02
    min_memory_ratio = 1.8


@pytest.mark.gpu
class TestInt8ConformanceCuda(BackendConformance):
    """The same checks with the quantized model placed on the GPU (device_map="cuda")."""

    config_class = qcore_int8.Int8Config
    device_map = "cuda"
    forward_tolerance = 0.02
    min_memory_ratio = 1.8
