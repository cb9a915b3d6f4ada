"""The one exception hierarchy of qcore.

Every error qcore raises on bad input derives from :class:`QcoreError`. Most also derive from the
built-in exception a caller would expect (``ValueError``, ``FileNotFoundError``, ``TypeError``), so code
written for diffusers' errors keeps working.
"""

from __future__ import annotations

from collections.abc import Iterable


class QcoreError(Exception):
    """Base class of every qcore error."""


# --- backends -----------------------------------------------------------------------------------


class BackendError(QcoreError):
    """A quantization backend cannot be used."""


class BackendNotFoundError(BackendError, LookupError):
    """No installed backend provides the requested ``quant_method``."""

    def __init__(self, quant_method: str, install_hint: str, available: Iterable[str] = ()) -> None:
        self.quant_method = quant_method
        self.install_hint = install_hint
        names = sorted(available)
        known = f" Installed backends: {', '.join(names)}." if names else " No backend is installed."
        super().__init__(f"quant_method {quant_method!r} is not installed: {install_hint}.{known}")


class BackendLoadError(BackendError, ImportError):
    """A backend's distribution is installed but importing or validating it failed."""

    def __init__(self, quant_method: str, distribution: str | None, cause: str) -> None:
        self.quant_method = quant_method
        self.distribution = distribution
        self.cause = cause
        where = f"distribution {distribution!r}" if distribution else "an in-process registration"
        super().__init__(f"backend {quant_method!r} from {where} failed to load: {cause}")


class BackendValidationError(BackendError, TypeError):
    """A backend's hook implementations do not match qcore's hook specification."""


class DuplicateBackendError(BackendError, ValueError):
    """Two backends claim the same ``quant_method``."""

    def __init__(self, quant_method: str, providers: Iterable[str]) -> None:
        self.quant_method = quant_method
        self.providers = sorted(providers)
        super().__init__(
            f"quant_method {quant_method!r} is claimed by more than one backend: "
            f"{', '.join(self.providers)}. Uninstall all but one of them, or choose one with "
            "QCORE_PLUGINS=<distribution>."
        )


class QuantizerEnvironmentError(BackendError, RuntimeError):
    """The backend cannot run here (missing package, device or feature)."""


# --- configs ------------------------------------------------------------------------------------


class ConfigError(QcoreError, ValueError):
    """A quantization config is invalid."""

    def __init__(self, message: str, *, option: str | None = None) -> None:
        self.option = option
        super().__init__(message)


class ConfigMismatchError(ConfigError):
    """The user's config names another ``quant_method`` than the pre-quantized checkpoint."""


# --- checkpoints --------------------------------------------------------------------------------


class CheckpointError(QcoreError):
    """A checkpoint cannot be read or does not fit the model."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint directory, hub repository or file does not exist."""


class CorruptCheckpointError(CheckpointError, ValueError):
    """A checkpoint file or tensor cannot be decoded."""


class MissingKeysError(CheckpointError, KeyError):
    """The model has parameters the checkpoint does not provide."""

    def __init__(self, keys: Iterable[str], where: str) -> None:
        self.keys = sorted(keys)
        shown = ", ".join(self.keys[:10]) + (" ..." if len(self.keys) > 10 else "")
        super().__init__(f"{len(self.keys)} key(s) missing from {where}: {shown}")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class UnexpectedKeysError(CheckpointError, KeyError):
    """The checkpoint holds tensors that no parameter of the model takes."""

    def __init__(self, keys: Iterable[str], where: str) -> None:
        self.keys = sorted(keys)
        shown = ", ".join(self.keys[:10]) + (" ..." if len(self.keys) > 10 else "")
        super().__init__(
            f"{len(self.keys)} unexpected key(s) in {where}: {shown}. The checkpoint does not "
            "belong to this model class or config."
        )

    def __str__(self) -> str:
        return str(self.args[0])


class ShapeMismatchError(CheckpointError, ValueError):
    """A checkpoint tensor's shape differs from the model parameter's."""


# --- models -------------------------------------------------------------------------------------


class SerializationError(QcoreError, ValueError):
    """The model cannot be saved (the backend is not serializable, or writing failed)."""


class DtypeCastError(QcoreError, TypeError):
    """A quantized model was asked to change its dtype."""


class DequantizeError(QcoreError, NotImplementedError):
    """The backend cannot dequantize this model."""


class CheckpointWriteError(SerializationError):
    """The file system refused a checkpoint write: read-only, full, no permission, a path that is not a
    directory. ``path`` names what could not be written; the checkpoint already there is left intact."""

    def __init__(self, message: str, *, path: str, errno: int | None = None) -> None:
        self.path = path
        self.errno = errno
        super().__init__(message)


__all__ = [
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
]
