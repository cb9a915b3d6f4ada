"""qcore's capability checks on qcore-torchao (int8 and float8 weight-only, on CPU): LoRA through peft,
QLoRA backward, fuse/unfuse, torch.compile(fullgraph=True), offload."""

from __future__ import annotations

import pytest

from qcore.testing import BackendCapabilities

qcore_torchao = pytest.importorskip(
    "qcore_torchao", reason="qcore-torchao is not installed (pip install ./plugins/torchao)"
)


class TestTorchAoInt8WeightOnlyCapabilities(BackendCapabilities):
    config_class = qcore_torchao.TorchAoConfig
    config_kwargs = {"quant_type": "int8wo"}
    supports = frozenset({"lora", "qlora_backward", "fuse_lora", "compile", "offload"})


class TestTorchAoFloat8WeightOnlyCapabilities(BackendCapabilities):
    config_class = qcore_torchao.TorchAoConfig
    config_kwargs = {"quant_type": "float8wo"}
    supports = frozenset({"lora", "qlora_backward", "fuse_lora", "compile", "offload"})
