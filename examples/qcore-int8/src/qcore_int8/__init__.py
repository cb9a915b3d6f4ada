"""qcore-int8: int8 per-output-channel weight-only quantization in plain torch, as a qcore backend.

A complete third-party backend written only against qcore's public API. Installing the distribution
is all a user does: its entry point (group ``qcore.backends``, name ``int8``) lets
``qcore.from_pretrained`` find it for ``Int8Config()`` and for any checkpoint whose config.json says
``"quant_method": "int8"``, without the user importing this package.
"""

from __future__ import annotations

import qcore

from ._config import Int8Config
from ._linear import Int8Linear, dequantize_per_channel, quantize_per_channel
from ._quantizer import FORMAT, FORMAT_KEY, Int8Quantizer

BACKEND = qcore.Backend("int8", Int8Config, Int8Quantizer)

__all__ = [
    "BACKEND",
    "FORMAT",
    "FORMAT_KEY",
    "Int8Config",
    "Int8Linear",
    "Int8Quantizer",
    "dequantize_per_channel",
    "quantize_per_channel",
]
