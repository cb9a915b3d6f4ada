"""qcore's capability checks on the example backend qcore-int8: torch.compile(fullgraph=True) and offload.

Its ``Int8Linear`` is its own ``nn.Module``, not an ``nn.Linear``, and peft has no LoRA layer for it, so
``lora``, ``qlora_backward`` and ``fuse_lora`` are not declared; the kit checks that they indeed fail.
"""

from __future__ import annotations

import pytest

from qcore.testing import BackendCapabilities

qcore_int8 = pytest.importorskip(
    "qcore_int8", reason="qcore-int8 is not installed (pip install ./examples/qcore-int8)"
)


class TestInt8Capabilities(BackendCapabilities):
    config_class = qcore_int8.Int8Config
    supports = frozenset({"compile", "offload"})
