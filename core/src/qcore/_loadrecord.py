"""The record a quantized load leaves on its model: which quantizer and which plugins made it.

The saver and :func:`qcore.dequantize` call the same plugins (backend, defaults, observers) as the
load did, through this record; nothing points back from the quantizer to the loader.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import pluggy
import torch

from ._defaults import DefaultHooks
from ._plugins import make_plugin_manager
from ._quantizer import Quantizer

_ATTRIBUTE = "_qcore_load_record"


@dataclass(frozen=True)
class LoadRecord:
    """A quantized load: its quantizer and the hook relay of its plugin manager."""

    quantizer: Quantizer
    hooks: Any  # pluggy.HookRelay: hooks are looked up by name

    def __deepcopy__(self, memo: dict[int, Any]) -> LoadRecord:
        # A deep copy of the model (an EMA copy, say) gets its own quantizer (the same object as the copy's
        # hf_quantizer, through memo) and a plugin manager with that quantizer in the original's place.
        # The other plugins (qcore's defaults, the load's observers) hold no model state and are shared:
        # plugin managers and hook relays hold modules, which cannot be copied.
        quantizer = copy.deepcopy(self.quantizer, memo)
        return LoadRecord(quantizer, make_plugin_manager(quantizer, self._observers()).hook)

    def _observers(self) -> list[object]:
        callers = (getattr(self.hooks, name) for name in dir(self.hooks) if not name.startswith("_"))
        plugins = {
            id(impl.plugin): impl.plugin
            for caller in callers
            if isinstance(caller, pluggy.HookCaller)
            for impl in caller.get_hookimpls()
        }
        return [plugin for plugin in plugins.values() if not _is_load_plugin(plugin, self.quantizer)]


def _is_load_plugin(plugin: object, quantizer: Quantizer) -> bool:
    """The plugins make_plugin_manager registers itself: the backend's quantizer and qcore's defaults."""
    return plugin is quantizer or isinstance(plugin, DefaultHooks)


def attach_load_record(model: torch.nn.Module, record: LoadRecord) -> None:
    """Keep ``record`` on ``model`` (an ordinary attribute: not a parameter, buffer or submodule)."""
    object.__setattr__(model, _ATTRIBUTE, record)


def load_record(model: torch.nn.Module) -> LoadRecord | None:
    """The record of the quantized load that made ``model``, or ``None``."""
    record = model.__dict__.get(_ATTRIBUTE)
    return record if isinstance(record, LoadRecord) else None


def drop_load_record(model: torch.nn.Module) -> None:
    model.__dict__.pop(_ATTRIBUTE, None)
