"""qcore-gguf: GGUF checkpoints (city96-style diffusion model files) for qcore.

Installed, it registers three plugins: the backend ``gguf`` (group ``qcore.backends``), the reader of
``.gguf`` files (group ``qcore.formats``) and converters (group ``qcore.converters``) from the original
namings of Flux, SD3/SD3.5 and Wan 2.x to diffusers' ``FluxTransformer2DModel``,
``SD3Transformer2DModel`` and ``WanTransformer3DModel``::

    model = qcore.from_pretrained(FluxTransformer2DModel, "flux1-dev-Q4_K_S.gguf", torch_dtype=torch.bfloat16)

Weights stay GGML blocks in memory (:class:`GGUFWeight`) and each Linear decodes its weight per forward,
computing as diffusers does, so outputs match diffusers' ``from_single_file`` bit for bit.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import qcore

from ._config import GGUFConfig
from ._dequant import GGML_TYPES, QUANTIZED_TYPES, dequantize_blocks
from ._flux import FluxConverter
from ._format import GGUFFormat
from ._linear import GGUFLinear
from ._quantizer import GGUFQuantizer
from ._sd3 import SD3Converter
from ._tensor import GGUFWeight
from ._wan import WanConverter

try:
    __version__ = version("qcore-gguf")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

backend = qcore.Backend("gguf", GGUFConfig, GGUFQuantizer)
"""The record the ``qcore.backends`` entry point ``gguf`` points at."""

__all__ = [
    "GGML_TYPES",
    "QUANTIZED_TYPES",
    "FluxConverter",
    "GGUFConfig",
    "GGUFFormat",
    "GGUFLinear",
    "GGUFQuantizer",
    "GGUFWeight",
    "SD3Converter",
    "WanConverter",
    "backend",
    "dequantize_blocks",
    "__version__",
]
