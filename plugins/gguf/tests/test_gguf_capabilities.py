"""qcore's capability checks on qcore-gguf (Q8_0 blocks, bfloat16 compute, on CPU).

GGUF cannot quantize on load, so each check's quantized model is loaded from a GGUF file written from the
kit's reference checkpoint (Q8_0 Linear weights, F32 for the rest), with the reference directory as
``config=``, as the conformance suite does. ``GGUFLinear`` is an ``nn.Linear``, so peft wraps it and a
LoRA adapter trains on top of the blocks; merging an adapter into them is not possible (peft adds the
delta to the weight's data, which is packed GGML bytes), so ``fuse_lora`` is not declared and the kit
checks that it indeed fails.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
from torch import nn

from qcore.testing import BackendCapabilities

qcore_gguf = pytest.importorskip(
    "qcore_gguf", reason="qcore-gguf is not installed (pip install ./plugins/gguf)"
)
from qcore_gguf.testing import write_checkpoint_as_gguf  # noqa: E402


class TestGGUFQ8Capabilities(BackendCapabilities):
    config_class = qcore_gguf.GGUFConfig
    config_kwargs: ClassVar[dict[str, Any]] = {"compute_dtype": "bfloat16"}
    supports = frozenset({"lora", "qlora_backward", "compile", "offload"})

    def load(self, path: Path | str, **kwargs: Any) -> nn.Module:
        reference = Path(path)
        if kwargs.get("quantization_config") is not None and (reference / "config.json").is_file():
            kwargs.setdefault("config", reference)
            path = write_checkpoint_as_gguf(reference)
        return super().load(path, **kwargs)
