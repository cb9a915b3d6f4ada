"""qcore: quantize-on-load for PyTorch models, with quantization backends as plugins.

Users call :func:`from_pretrained` / :func:`save_pretrained`. Backend authors subclass
:class:`QuantizationConfig` and :class:`Quantizer`, mark hook methods with :data:`hookimpl`, and
expose a :class:`Backend` through the ``qcore.backends`` entry-point group.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from ._bridge import disable_bridge, enable_bridge
from ._checkpoint import CheckpointFiles, locate_checkpoint
from ._config import QuantizationConfig, merge_quantization_configs
from ._converters import (
    CONVERTERS_GROUP,
    KeyConverter,
    RowRange,
    register_converter,
    unregister_converter,
)
from ._errors import (
    BackendError,
    BackendLoadError,
    BackendNotFoundError,
    BackendValidationError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    ConfigError,
    ConfigMismatchError,
    CorruptCheckpointError,
    DequantizeError,
    DtypeCastError,
    DuplicateBackendError,
    MissingKeysError,
    QcoreError,
    QuantizerEnvironmentError,
    SerializationError,
    ShapeMismatchError,
    UnexpectedKeysError,
)
from ._formats import FORMATS_GROUP, CheckpointFormat, TensorInfo, register_format, unregister_format
from ._helpers import (
    AUTO_DEVICE_MAPS,
    BatchedChecks,
    device_types,
    get_module_for_param,
    reroute_log_messages,
    split_param_name,
    version_at_least,
)
from ._hookspecs import hookimpl, hookspec
from ._loading import from_pretrained
from ._modelmixin import ModelMixin
from ._pipeline import load_pipeline
from ._quantized import dequantize
from ._quantizer import Quantizer, module_matches, replace_linear_layers
from ._registry import (
    ENTRY_POINT_GROUP,
    Backend,
    BackendInfo,
    available_backends,
    get_backend,
    register_backend,
    unregister_backend,
)
from ._saving import save_pretrained

try:
    __version__ = version("qcore")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

__all__ = [
    # loading and saving
    "from_pretrained",
    "save_pretrained",
    "load_pipeline",
    "dequantize",
    "ModelMixin",
    "locate_checkpoint",
    "CheckpointFiles",
    # backends
    "QuantizationConfig",
    "Quantizer",
    "Backend",
    "BackendInfo",
    "hookspec",
    "hookimpl",
    "register_backend",
    "unregister_backend",
    "get_backend",
    "available_backends",
    "merge_quantization_configs",
    "module_matches",
    "replace_linear_layers",
    "ENTRY_POINT_GROUP",
    # checkpoint formats and key converters
    "CheckpointFormat",
    "TensorInfo",
    "KeyConverter",
    "RowRange",
    "FORMATS_GROUP",
    "CONVERTERS_GROUP",
    "register_format",
    "unregister_format",
    "register_converter",
    "unregister_converter",
    # helpers for backends
    "split_param_name",
    "get_module_for_param",
    "device_types",
    "AUTO_DEVICE_MAPS",
    "version_at_least",
    "reroute_log_messages",
    "BatchedChecks",
    # errors
    "QcoreError",
    "BackendError",
    "BackendNotFoundError",
    "BackendLoadError",
    "BackendValidationError",
    "DuplicateBackendError",
    "QuantizerEnvironmentError",
    "ConfigError",
    "ConfigMismatchError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "MissingKeysError",
    "UnexpectedKeysError",
    "ShapeMismatchError",
    "SerializationError",
    "DtypeCastError",
    "DequantizeError",
    "CheckpointWriteError",
    "__version__",
    # diffusers and transformers loaders
    "enable_bridge",
    "disable_bridge",
]
