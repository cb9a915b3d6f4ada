"""Key converters as plugins (entry-point group ``qcore.converters``, keyed by model class name).

A converter maps a file's naming (e.g. Black Forest Labs' original Flux names) to the model's: each model
key is one or more row ranges of file tensors, concatenated along dim 0. Renames, fused-projection splits
and row swaps are all exact on block-quantized rows, so a converted load reads only the bytes it needs
and dequantizes nothing. A converter can also infer the model config from tensor shapes. Converters know
nothing of backends: the same one serves every ``quant_method``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

import torch

from ._checkpoint import (
    CONFIG_NAME,
    CheckpointFiles,
    CheckpointReader,
    StoredTensorInfo,
    aligned,
    read_json,
)
from ._errors import (
    BackendLoadError,
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    QcoreError,
)
from ._formats import BinFormat, CheckpointFormat, SafetensorsFormat, TensorInfo, open_format
from ._pluginenv import autoload_disabled, plugin_allowed

logger = logging.getLogger("qcore")

CONVERTERS_GROUP = "qcore.converters"


@dataclass(frozen=True)
class RowRange:
    """Rows ``start:stop`` (dim 0) of file tensor ``key``; ``stop=None`` means to the end."""

    key: str
    start: int = 0
    stop: int | None = None

    def bounds(self, rows: int) -> tuple[int, int]:
        return self.start, rows if self.stop is None else self.stop


class KeyConverter:
    """Maps the keys of a checkpoint file in a foreign naming to a model class's keys.

    Subclass it, set ``model_class`` (the class name, also the entry-point name) and expose the class in
    the ``qcore.converters`` group. qcore asks :meth:`matches` first, with the file's tensors; a
    converter that says ``False`` is not used (the file is already in the model's naming, or in another).
    """

    model_class: ClassVar[str] = ""

    def matches(self, tensors: Mapping[str, TensorInfo]) -> bool:
        """Whether the file is in the naming this converter reads."""
        raise NotImplementedError

    def convert(self, tensors: Mapping[str, TensorInfo]) -> dict[str, list[RowRange]]:
        """``{model key: [RowRange, ...]}``; every file tensor should be used by some model key.

        Raise :class:`qcore.CheckpointError` naming the key when the file lacks a tensor it needs.
        """
        raise NotImplementedError

    def infer_config(self, tensors: Mapping[str, TensorInfo]) -> dict[str, Any] | None:
        """The model config implied by the tensor shapes, or ``None`` when they do not determine it."""
        return None


_registered: dict[str, list[KeyConverter]] = {}


def register_converter(converter: KeyConverter) -> KeyConverter:
    """Use ``converter`` for ``converter.model_class`` in this process, before installed ones (tests,
    notebooks); an installed distribution does the same through the ``qcore.converters`` group."""
    if not isinstance(converter, KeyConverter) or not converter.model_class:
        raise TypeError(f"{converter!r} is not a qcore.KeyConverter instance with a model_class")
    found = _registered.setdefault(converter.model_class, [])
    if converter not in found:
        found.append(converter)
    return converter


def unregister_converter(converter: KeyConverter) -> None:
    """Undo :func:`register_converter`."""
    found = _registered.get(converter.model_class, [])
    if converter in found:
        found.remove(converter)


def converters_for(model_class_name: str) -> list[KeyConverter]:
    """The converters for a model class: registered in-process, then installed ones (imported now)."""
    found = list(_registered.get(model_class_name, []))
    if autoload_disabled():
        return found
    for entry in entry_points(group=CONVERTERS_GROUP, name=model_class_name):
        distribution = entry.dist.name if entry.dist else None
        if not plugin_allowed(model_class_name, distribution):
            continue
        try:
            loaded = entry.load()
            converter = loaded() if isinstance(loaded, type) else loaded
        except Exception as exc:
            raise BackendLoadError(model_class_name, distribution, f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(converter, KeyConverter):
            raise BackendLoadError(
                model_class_name, distribution, f"entry point {entry.value!r} is not a qcore.KeyConverter"
            )
        found.append(converter)
    return found


def find_converter(
    model_class_name: str, tensors: Mapping[str, TensorInfo], model_keys: Sequence[str] | None = None
) -> KeyConverter | None:
    """The converter that reads this file for the model class, or ``None`` when its keys are the model's.

    With ``model_keys`` given, a file that already holds every model key needs no converter.
    """
    if model_keys is not None and set(model_keys) <= set(tensors):
        return None
    for converter in converters_for(model_class_name):
        if converter.matches(tensors):
            logger.info("reading %s keys with converter %s", model_class_name, type(converter).__qualname__)
            return converter
    return None


def check_mapping(
    mapping: Mapping[str, Sequence[RowRange]], tensors: Mapping[str, TensorInfo], where: str
) -> None:
    """Every range names an existing tensor and lies inside it; unused file tensors are an error."""
    used = set()
    for model_key, ranges in mapping.items():
        if not ranges:
            raise CheckpointError(f"{where}: the converter gives no rows for {model_key!r}")
        for part in ranges:
            info = tensors.get(part.key)
            if info is None:
                raise CheckpointError(
                    f"{where}: {model_key!r} needs tensor {part.key!r}, which the file lacks"
                )
            rows = info.shape[0] if info.shape else 1
            start, stop = part.bounds(rows)
            if not 0 <= start < stop <= rows:
                raise CheckpointError(
                    f"{where}: {model_key!r} needs rows {start}:{stop} of {part.key!r}, which has {rows} rows"
                )
            used.add(part.key)
    unused = [key for key in tensors if key not in used]
    if unused:
        shown = ", ".join(unused[:10]) + (" ..." if len(unused) > 10 else "")
        raise CheckpointError(
            f"{where}: {len(unused)} tensor(s) of the file have no place in the model: {shown}. The file "
            "does not belong to this model class, or the converter does not know these keys."
        )


# --- reading a single file through a format and a converter --------------------------------------


class ConvertedReader:
    """A :class:`CheckpointReader` look-alike over one file of any format, in the model's naming.

    Each model key is read as the concatenation (dim 0) of its row ranges; a format's block-quantized
    rows stay blocks, so nothing is decoded and only the needed bytes are read.
    """

    def __init__(
        self, files: CheckpointFiles, fmt: CheckpointFormat, mapping: Mapping[str, Sequence[RowRange]]
    ):
        self.files = files
        self.format = fmt
        self.mapping = {key: list(ranges) for key, ranges in mapping.items()}
        path = files.weight_files[0]
        self.keys: list[str] = list(self.mapping)
        self.key_file: dict[str, Path] = dict.fromkeys(self.keys, path)
        self.metadata: dict[str, str] = fmt.metadata()
        self._infos = {key: self._stored_info(key, ranges) for key, ranges in self.mapping.items()}

    def _stored_info(self, key: str, ranges: Sequence[RowRange]) -> StoredTensorInfo:
        tensors = self.format.tensors()
        parts = [tensors[part.key] for part in ranges]
        first = parts[0]
        for part, info in zip(ranges[1:], parts[1:], strict=True):
            if (info.dtype, info.quant_type, info.stored_shape[1:]) != (
                first.dtype,
                first.quant_type,
                first.stored_shape[1:],
            ):
                raise CorruptCheckpointError(
                    f"{self.files.location}: {key!r} joins rows of {ranges[0].key!r} and {part.key!r}, "
                    "which are stored differently (type or row width)"
                )
        rows = 0
        for part, info in zip(ranges, parts, strict=True):
            start, stop = part.bounds(info.stored_shape[0] if info.stored_shape else 1)
            rows += stop - start
        whole = first.stored_shape[0] if first.stored_shape else 1
        shape = (rows, *first.stored_shape[1:]) if first.stored_shape else first.stored_shape
        nbytes = (
            sum(info.nbytes for info in parts) if len(parts) > 1 else first.nbytes * rows // max(whole, 1)
        )
        label = first.quant_type or str(first.dtype).removeprefix("torch.")
        return StoredTensorInfo(label, first.dtype, shape, nbytes, None)

    def __enter__(self) -> ConvertedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.format.close()

    def info(self, key: str) -> StoredTensorInfo:
        return self._infos[key]

    def read(self, key: str) -> torch.Tensor:
        tensors = self.format.tensors()
        parts = []
        for part in self.mapping[key]:
            stored = tensors[part.key].stored_shape
            rows = part.bounds(stored[0] if stored else 1)
            whole = part.start == 0 and (part.stop is None or not stored or part.stop == stored[0])
            try:
                parts.append(self.format.read(part.key, None if whole else rows))
            except QcoreError:
                raise
            except Exception as exc:  # a format plugin's own failure: name the file and tensor
                raise CorruptCheckpointError(
                    f"{self.files.weight_files[0]}: tensor {part.key!r} cannot be read "
                    f"({type(exc).__name__}: {exc})"
                ) from exc
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        # A plugin may hand out views of its own file mapping; a format's tensor subclass keeps its
        # own layout (it has no single data pointer to align).
        return aligned(tensor) if type(tensor) is torch.Tensor else tensor

    def byte_ranges(self, key: str) -> list[tuple[int, int]] | None:
        """``(file offset, nbytes)`` pieces whose concatenation is ``key``'s stored bytes (rows of whole
        file tensors, in order, neighbours merged), or ``None`` when the format does not lay them out so."""
        tensors = self.format.tensors()
        pieces: list[tuple[int, int]] = []
        for part in self.mapping[key]:
            info = tensors[part.key]
            stored = info.stored_shape
            itemsize = info.dtype.itemsize if info.dtype is not None else 0
            if info.offset is None or math.prod(stored) * itemsize != info.nbytes:
                return None
            rows = stored[0] if stored else 1
            start, stop = part.bounds(rows)
            row_bytes = info.nbytes // max(rows, 1)
            offset, nbytes = info.offset + start * row_bytes, (stop - start) * row_bytes
            if pieces and pieces[-1][0] + pieces[-1][1] == offset:
                pieces[-1] = (pieces[-1][0], pieces[-1][1] + nbytes)
            else:
                pieces.append((offset, nbytes))
        return pieces

    def wrap(self, key: str, data: torch.Tensor) -> torch.Tensor:
        """``key``'s bytes read from :meth:`byte_ranges` as :meth:`read` returns them (the format's type)."""
        return self.format.wrap(self.mapping[key][0].key, data)

    def dtype_and_numel(self, key: str) -> tuple[torch.dtype | None, int]:
        info = self.info(key)
        return info.torch_dtype, info.numel

    def file_of(self, key: str) -> str:
        ranges = self.mapping.get(key)
        name = self.files.weight_files[0].name
        return f"{name} ({', '.join(r.key for r in ranges)})" if ranges and ranges[0].key != key else name


def _user_config(
    config: Mapping[str, Any] | str | os.PathLike[str], subfolder: str | None, hub_kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    path = Path(os.fspath(config))
    if path.is_file():
        return read_json(path)
    if path.is_dir():
        found = path / (subfolder or "") / CONFIG_NAME
        if not found.is_file():
            raise CheckpointNotFoundError(f"config={os.fspath(config)!r}: no {CONFIG_NAME} in {found.parent}")
        return read_json(found)
    from huggingface_hub import hf_hub_download

    try:
        return read_json(
            Path(hf_hub_download(os.fspath(config), CONFIG_NAME, subfolder=subfolder, **hub_kwargs))
        )
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointNotFoundError(
            f"config={os.fspath(config)!r} is neither a dict, a local file or directory, nor a hub "
            f"repository with {CONFIG_NAME}"
            + (f" in subfolder {subfolder!r}" if subfolder else "")
            + f" ({exc})"
        ) from exc


def open_checkpoint(
    model_cls: type,
    files: CheckpointFiles,
    config: Mapping[str, Any] | str | os.PathLike[str] | None = None,
    *,
    subfolder: str | None = None,
) -> tuple[dict[str, Any], CheckpointReader | ConvertedReader]:
    """The model config and a (not yet entered) reader of the checkpoint, in the model's naming.

    The config is ``config`` (a dict, a config.json file or directory, or a hub id) when given, else the
    directory's config.json; for a single file, the format's own config, else the converter's inference
    from tensor shapes, else an error that asks for ``config=``. A format that implies a ``quant_method``
    adds it as the checkpoint's ``quantization_config``, so a missing backend is an install hint. A config
    named by hub id is fetched with the checkpoint's own hub options.
    """
    user = _user_config(config, subfolder, files.hub_options) if config is not None else None
    path = files.weight_files[0]
    if files.config_path is not None:  # a directory (or hub repository) with its config.json
        return (user if user is not None else read_json(files.config_path)), CheckpointReader(files)
    fmt = open_format(path)
    try:
        tensors = fmt.tensors()
        converter = find_converter(model_cls.__name__, tensors)
        resolved = user if user is not None else fmt.model_config()
        if resolved is None and converter is not None:
            resolved = converter.infer_config(tensors)
        if resolved is None:
            raise ConfigError(
                f"{path}: the file carries no model config"
                + (", and the tensor shapes do not determine one" if converter is not None else "")
                + f". Pass config= to from_pretrained: a dict, a {CONFIG_NAME} file or a directory holding "
                f"one, or a hub id of the original model (with subfolder=, e.g. 'transformer')",
                option="config",
            )
        implied = fmt.quantization_config()
        if implied is not None and "quantization_config" not in resolved:
            resolved = {**resolved, "quantization_config": implied}
        if converter is None and isinstance(fmt, (SafetensorsFormat, BinFormat)):
            fmt.close()
            return resolved, CheckpointReader(files)
        mapping = converter.convert(tensors) if converter is not None else {k: [RowRange(k)] for k in tensors}
        check_mapping(mapping, tensors, str(path))
        return resolved, ConvertedReader(files, fmt, mapping)
    except BaseException:
        fmt.close()
        raise
