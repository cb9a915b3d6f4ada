"""The record a quantized load leaves on its model: which quantizer and which plugins made it.

The saver and :func:`qcore.dequantize` call the same plugins (backend, defaults, observers) as the
load did, through this record; nothing points back from the quantizer to the loader.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ._quantizer import Quantizer

_ATTRIBUTE = "_qcore_load_record"


@dataclass(frozen=True)
class LoadRecord:
    """A quantized load: its quantizer and the hook relay of its plugin manager."""

    quantizer: Quantizer
    hooks: Any  # pluggy.HookRelay: hooks are looked up by name


def attach_load_record(model: torch.nn.Module, record: LoadRecord) -> None:
    """Keep ``record`` on ``model`` (an ordinary attribute: not a parameter, buffer or submodule)."""
    object.__setattr__(model, _ATTRIBUTE, record)


def load_record(model: torch.nn.Module) -> LoadRecord | None:
    """The record of the quantized load that made ``model``, or ``None``."""
    record = model.__dict__.get(_ATTRIBUTE)
    return record if isinstance(record, LoadRecord) else None


def drop_load_record(model: torch.nn.Module) -> None:
    model.__dict__.pop(_ATTRIBUTE, None)
