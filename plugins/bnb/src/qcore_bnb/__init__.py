"""qcore-bnb: the bitsandbytes backend of qcore (4-bit NF4/FP4 and 8-bit LLM.int8, on CPU and CUDA).

Installed, it registers itself in the ``qcore.backends`` entry-point group as ``bitsandbytes``::

    import qcore
    from qcore_bnb import BitsAndBytesConfig

    model = qcore.from_pretrained(
        FluxTransformer2DModel, path,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
        torch_dtype=torch.bfloat16,
    )

A plain dict ``{"quant_method": "bitsandbytes", "load_in_4bit": True, ...}`` works too. Checkpoints are
saved and read in the layout diffusers and transformers use.
"""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version

import qcore

from ._config import BitsAndBytesConfig
from ._quantizer import BitsAndBytesQuantizer

# bitsandbytes warns on import, on CPUs with AVX512-BF16, that the optional `kernels` package is
# missing; qcore's loads do not use that kernel, so the line is shown only with `qcore -v`. Set up
# here, before bitsandbytes is first imported (lazily, by the quantizer).
qcore.reroute_log_messages(
    "bitsandbytes.backends.cpu.ops", [r"from kernels-community"], logging.getLogger("qcore.bnb"), logging.INFO
)

try:
    __version__ = version("qcore-bnb")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

backend = qcore.Backend("bitsandbytes", BitsAndBytesConfig, BitsAndBytesQuantizer)
"""The record the ``qcore.backends`` entry point ``bitsandbytes`` points at."""

__all__ = ["BitsAndBytesConfig", "BitsAndBytesQuantizer", "backend", "__version__"]
