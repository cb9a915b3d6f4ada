"""Key converters as plugins (entry-point group ``qcore.converters``, keyed by model class name).

A converter maps a file's naming (e.g. Black Forest Labs' original Flux names) to the model's: each model
key is one or more row ranges of file tensors, concatenated along dim 0. Renames, fused-projection splits
and row swaps are all exact on block-quantized rows, so a converted load reads only the bytes it needs
and dequantizes nothing. A converter can also infer the model config from tensor shapes. Converters know
nothing of backends: the same one serves every ``quant_method``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar

from ._errors import BackendLoadError, CheckpointError
from ._formats import TensorInfo

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


def _allowed(name: str, distribution: str | None) -> bool:
    raw = os.environ.get("QCORE_PLUGINS")
    if raw is None:
        return True
    allowed = {part.strip() for part in raw.split(",") if part.strip()}
    return name in allowed or (distribution is not None and distribution in allowed)


def converters_for(model_class_name: str) -> list[KeyConverter]:
    """The installed converters for a model class (imported now), in entry-point order."""
    if os.environ.get("QCORE_DISABLE_PLUGIN_AUTOLOAD", "").strip().lower() not in ("", "0", "false"):
        return []
    found = []
    for entry in entry_points(group=CONVERTERS_GROUP, name=model_class_name):
        distribution = entry.dist.name if entry.dist else None
        if not _allowed(model_class_name, distribution):
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
