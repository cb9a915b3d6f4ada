"""qcore-torchao: the torchao backend for qcore.

Installing this distribution registers the ``torchao`` quant_method (entry point group
``qcore.backends``); users only need :class:`TorchAoConfig`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import qcore

from ._config import TorchAoConfig
from ._quant_types import quant_type_names
from ._quantizer import TorchAoQuantizer

try:
    __version__ = version("qcore-torchao")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

backend = qcore.Backend("torchao", TorchAoConfig, TorchAoQuantizer)

__all__ = ["TorchAoConfig", "TorchAoQuantizer", "backend", "quant_type_names", "__version__"]
