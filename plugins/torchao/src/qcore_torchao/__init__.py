"""qcore-torchao: the torchao backend for qcore.

Installing this distribution registers the ``torchao`` quant_method (entry point group
``qcore.backends``); users only need :class:`TorchAoConfig`.
"""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version

import qcore

from ._config import TorchAoConfig
from ._quant_types import quant_type_names
from ._quantizer import TorchAoQuantizer

# On import torchao warns about each of its optional C++ kernel libraries (mxfp8, CUTLASS sm90a) that
# does not load on this machine, and torch warns that torchao registers an enum for torch.compile the
# old way. None of it affects qcore's quant types, so those lines are shown only with `qcore -v`. Set
# up here, before torchao is first imported (lazily, by the config and the quantizer).
_logger = logging.getLogger("qcore.torchao")
qcore.reroute_log_messages(
    "torchao",
    [r"^Failed to load .*_C\w*\.\S*so\b", r"^Skipping import of cpp extensions"],
    _logger,
    logging.INFO,
)
qcore.reroute_log_messages(
    "torch.utils._pytree",
    [r"is an Enum subclass and is now natively supported by torch\.compile"],
    _logger,
    logging.INFO,
)

try:
    __version__ = version("qcore-torchao")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

backend = qcore.Backend("torchao", TorchAoConfig, TorchAoQuantizer)

__all__ = ["TorchAoConfig", "TorchAoQuantizer", "backend", "quant_type_names", "__version__"]
