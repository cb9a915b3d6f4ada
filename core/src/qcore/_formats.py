"""Checkpoint formats other than safetensors and ``.bin``, as plugins (entry-point group ``qcore.formats``).

A format plugin is a :class:`CheckpointFormat` subclass exposed under the entry name of the file suffix it
reads (``gguf`` for ``*.gguf``). qcore imports it only when it meets such a file. A format says which
``quant_method`` its files imply, so a file whose backend is missing is refused with an install hint
instead of being loaded dequantized or wrong. safetensors and ``.bin`` single files are read by the
built-in :class:`SafetensorsFormat` and :class:`BinFormat`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

import torch

from ._checkpoint import aligned, load_bin_state, read_safetensors_header
from ._errors import (
    BackendLoadError,
    BackendNotFoundError,
    CheckpointError,
    CorruptCheckpointError,
)
from ._pluginenv import autoload_disabled, plugin_allowed
from ._registry import known_backend_names
from ._singlefile import FORMATS_GROUP

logger = logging.getLogger("qcore")

# Suffixes whose reader lives in a known distribution: (implied quant_method, install hint).
_KNOWN_FORMATS = {"gguf": ("gguf", "pip install qcore-gguf")}


@dataclass(frozen=True)
class TensorInfo:
    """What a format knows of one stored tensor without reading it.

    ``shape`` is the logical shape (elements). ``dtype`` and ``storage_shape`` describe the torch tensor
    :meth:`CheckpointFormat.read` returns: the same as the logical ones for a plain tensor; for a
    block-quantized one (``quant_type`` names the format's block type, e.g. ``"Q4_K"``) typically
    ``torch.uint8`` and ``(rows, bytes per row)``. Rows (dim 0) are the same in both shapes, so a
    converter's row ranges apply to either. ``nbytes`` is the stored size. ``offset``, when given, is the
    absolute file offset of a tensor stored contiguously, row after row, exactly as :meth:`read` returns
    it: rows ``start:stop`` are then the bytes ``offset + start * row bytes`` onwards, which qcore reads
    itself (threaded, straight into the target device's memory) and hands to :meth:`CheckpointFormat.wrap`.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype | None
    quant_type: str | None = None
    nbytes: int = 0
    storage_shape: tuple[int, ...] | None = None
    offset: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The shape of the tensor :meth:`CheckpointFormat.read` returns."""
        return self.storage_shape if self.storage_shape is not None else self.shape


class CheckpointFormat:
    """Reader of one checkpoint file of a format; subclass it and expose the class as an entry point.

    Class attributes: ``suffixes`` (e.g. ``(".gguf",)``), ``implied_quant_method`` (the backend its
    files need, or ``None``). An instance is one open file: ``__init__(path)`` parses the header and
    raises :class:`qcore.CorruptCheckpointError` naming the file when it cannot; :meth:`close` releases it.
    """

    suffixes: ClassVar[tuple[str, ...]] = ()
    implied_quant_method: ClassVar[str | None] = None

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def detect(cls, path: Path) -> bool:
        """Whether ``path`` is a file of this format (default: by suffix; override to check magic bytes)."""
        return Path(path).suffix in cls.suffixes

    def tensors(self) -> Mapping[str, TensorInfo]:
        """Every stored tensor, in file order, with its logical shape and type."""
        raise NotImplementedError

    def read(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor ``key`` on the CPU, or only its rows ``start:stop`` along dim 0 (reading only those bytes).

        Block-quantized tensors come back as the format's own tensor type, which the backend of
        ``implied_quant_method`` understands.
        """
        raise NotImplementedError

    def wrap(self, key: str, data: torch.Tensor) -> torch.Tensor:
        """What :meth:`read` returns for ``data``: rows of ``key`` read by qcore from ``TensorInfo.offset``
        (dtype and stored shape of ``key``, on any device). Default: ``data`` itself."""
        return data

    def metadata(self) -> dict[str, str]:
        """The file's key/value metadata as strings."""
        return {}

    def quantization_config(self) -> dict[str, Any] | None:
        """The ``quantization_config`` the file implies (default: ``implied_quant_method`` alone)."""
        return {"quant_method": self.implied_quant_method} if self.implied_quant_method else None

    def model_config(self) -> dict[str, Any] | None:
        """A model config stored in the file, if the format carries one."""
        return None

    def close(self) -> None:
        """Release the file."""

    def __enter__(self) -> CheckpointFormat:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SafetensorsFormat(CheckpointFormat):
    """Built-in: one ``.safetensors`` file read as a format (used for single-file loads)."""

    suffixes = (".safetensors",)

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        from safetensors import safe_open

        # The loader's validated header reader: one dtype table, the same checks for single files.
        self._infos: dict[str, TensorInfo] = {
            key: TensorInfo(info.shape, info.torch_dtype, None, info.nbytes, None, info.offset)
            for key, info in read_safetensors_header(self.path).tensors.items()
        }
        try:
            self._context = safe_open(str(self.path), framework="pt", device="cpu")
            self._handle = self._context.__enter__()
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise CorruptCheckpointError(f"{self.path}: not a valid safetensors file ({exc})") from exc

    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._infos

    def read(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        try:
            if rows is None:
                return aligned(self._handle.get_tensor(key))
            return self._handle.get_slice(key)[rows[0] : rows[1]]
        except Exception as exc:
            raise CorruptCheckpointError(f"{self.path}: tensor {key!r} cannot be read ({exc})") from exc

    def metadata(self) -> dict[str, str]:
        return dict(self._handle.metadata() or {})

    def close(self) -> None:
        self._context.__exit__(None, None, None)


class BinFormat(CheckpointFormat):
    """Built-in: one ``.bin`` state dict read as a format (used for single-file loads), with the same
    ``torch.load(weights_only=True)`` reader, memory-mapped, as a directory's ``.bin`` weights."""

    suffixes = (".bin",)

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._state = load_bin_state(self.path)
        self._infos = {
            key: TensorInfo(tuple(t.shape), t.dtype, None, t.numel() * t.element_size())
            for key, t in self._state.items()
        }

    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._infos

    def read(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        tensor = self._state[key]
        return aligned(tensor) if rows is None else tensor[rows[0] : rows[1]]

    def close(self) -> None:
        self._state = {}


_registered: dict[str, type[CheckpointFormat]] = {}


def _suffix_names(format_class: type[CheckpointFormat]) -> list[str]:
    if not (isinstance(format_class, type) and issubclass(format_class, CheckpointFormat)):
        raise TypeError(f"{format_class!r} is not a qcore.CheckpointFormat subclass")
    if not format_class.suffixes:
        raise ValueError(f"{format_class.__qualname__}.suffixes is empty; name the file suffixes it reads")
    return [suffix.lstrip(".").lower() for suffix in format_class.suffixes]


def register_format(format_class: type[CheckpointFormat]) -> type[CheckpointFormat]:
    """Read files with ``format_class.suffixes`` with ``format_class`` in this process (tests, notebooks).

    An installed distribution does the same through an entry point in the ``qcore.formats`` group.
    Raises ``ValueError`` when a suffix is taken in-process or is a built-in one.
    """
    names = _suffix_names(format_class)
    for name in names:
        taken = _registered.get(name)
        if name in ("safetensors", "bin") or (taken is not None and taken is not format_class):
            raise ValueError(f".{name} files are already read by {taken or 'qcore itself'}")
    for name in names:
        _registered[name] = format_class
    return format_class


def unregister_format(format_class: type[CheckpointFormat]) -> None:
    """Undo :func:`register_format`."""
    for name in _suffix_names(format_class):
        if _registered.get(name) is format_class:
            del _registered[name]


def format_for(path: Path) -> type[CheckpointFormat]:
    """The format class that reads ``path``, importing its plugin; an install hint when none is installed."""
    path = Path(path)
    suffix = path.suffix.lstrip(".").lower()
    if suffix == "safetensors":
        return SafetensorsFormat
    if suffix == "bin":
        return BinFormat
    if suffix in _registered:
        return _registered[suffix]
    implied, hint = _KNOWN_FORMATS.get(
        suffix,
        (
            None,
            f"install a distribution with an entry point named {suffix!r} in the group {FORMATS_GROUP!r}",
        ),
    )
    candidates = [] if autoload_disabled() else list(entry_points(group=FORMATS_GROUP, name=suffix))
    allowed = [ep for ep in candidates if plugin_allowed(suffix, ep.dist.name if ep.dist else None)]
    if not allowed:
        if candidates:
            hint = f"its reader is installed but not in QCORE_PLUGINS={os.environ.get('QCORE_PLUGINS')!r}"
        elif autoload_disabled():
            hint += "; note that QCORE_DISABLE_PLUGIN_AUTOLOAD is set"
        if implied is not None:
            raise BackendNotFoundError(
                implied, f"{path.name} is a .{suffix} file: {hint}", known_backend_names()
            )
        raise CheckpointError(f"{path}: no reader for .{suffix} files is installed: {hint}")
    entry = allowed[0]
    distribution = entry.dist.name if entry.dist else None
    try:
        loaded = entry.load()
    except Exception as exc:
        raise BackendLoadError(suffix, distribution, f"{type(exc).__name__}: {exc}") from exc
    if not (isinstance(loaded, type) and issubclass(loaded, CheckpointFormat)):
        raise BackendLoadError(
            suffix, distribution, f"entry point {entry.value!r} is not a qcore.CheckpointFormat subclass"
        )
    if not loaded.detect(path):
        raise CorruptCheckpointError(f"{path}: not a valid .{suffix} file (its reader does not recognise it)")
    logger.debug("reading %s with %s from %s", path.name, loaded.__qualname__, distribution)
    return loaded


def open_format(path: Path) -> CheckpointFormat:
    """Open ``path`` with its format's reader."""
    return format_for(path)(Path(path))
