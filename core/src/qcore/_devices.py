"""Device maps: checking that their devices exist, and resolving every accepted form to
``{module prefix: device}`` (automatic maps through accelerate and the backend's hooks)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from ._errors import ConfigError
from ._helpers import AUTO_DEVICE_MAPS
from ._quantizer import Quantizer

logger = logging.getLogger("qcore")


def check_devices_exist(device_map: Any) -> None:
    """Refuse a device map that names an accelerator this machine does not have, before any work."""
    for value in _device_map_values(device_map):
        device = _accelerator_index(value, device_map) if _is_index(value) else _device(value)
        if device.type in ("cpu", "meta"):
            continue
        backend = getattr(torch, device.type, None)
        is_available = getattr(backend, "is_available", None)
        count = getattr(backend, "device_count", None)
        if not (callable(is_available) and is_available()):
            raise ConfigError(
                f"device_map={device_map!r} places weights on {device}, but this machine has no "
                f"{device.type} device that torch can use (torch.{device.type}.is_available() is False). "
                "Leave device_map out to load on the CPU, or install a torch build for that device.",
                option="device_map",
            )
        if device.index is not None and callable(count) and device.index >= count():
            raise ConfigError(
                f"device_map={device_map!r} places weights on {device}, but this machine has "
                f"{count()} {device.type} device(s)",
                option="device_map",
            )


def _device_map_values(device_map: Any) -> list[Any]:
    if device_map is None or (isinstance(device_map, str) and device_map in AUTO_DEVICE_MAPS):
        return []
    if isinstance(device_map, Mapping):
        return list(device_map.values())
    if not _is_index(device_map):
        single_device(device_map)  # the type and the name are checked, whatever the machine
    return [device_map]


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _accelerator_index(index: int, device_map: Any) -> torch.device:
    """A bare index names a device of the machine's accelerator (CUDA, for accelerate's maps)."""
    if not torch.accelerator.is_available():
        raise ConfigError(
            f"device_map={device_map!r} places weights on accelerator {index}, but this machine has no "
            "cuda device (or other accelerator) that torch can use. Leave device_map out to load on "
            "the CPU, or install a torch build for your accelerator.",
            option="device_map",
        )
    return torch.device(index)


def single_device(device_map: Any) -> torch.device:
    """The one device a device_map names (``"cuda"``, ``"cuda:1"``, ``0``, ``torch.device``)."""
    if isinstance(device_map, (int, str, torch.device)) and not isinstance(device_map, bool):
        try:
            return torch.device(device_map)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(
                f"device_map {device_map!r} is not a device nor one of {', '.join(AUTO_DEVICE_MAPS)}",
                option="device_map",
            ) from exc
    raise ConfigError(f"device_map {device_map!r} is not understood", option="device_map")


def _device(value: Any) -> torch.device:
    if value == "disk":
        raise ConfigError("offloading to 'disk' is not supported; use 'cpu'", option="device_map")
    try:
        return torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device_map entry {value!r} is not a device", option="device_map") from exc


def resolve_device_map(
    model: torch.nn.Module,
    quantizer: Quantizer | None,
    hooks: Any,
    torch_dtype: torch.dtype | None,
    device_map: Any,
    max_memory: Mapping[Any, int | str] | None,
) -> dict[str, torch.device]:
    """Any accepted device_map form -> {module prefix: device}."""
    if device_map is None:
        return {"": torch.device("cpu")}
    if isinstance(device_map, Mapping):
        return {name: _device(dev) for name, dev in device_map.items()}
    if isinstance(device_map, str) and device_map in AUTO_DEVICE_MAPS:
        return _auto_device_map(model, quantizer, hooks, torch_dtype or torch.float32, device_map, max_memory)
    return {"": single_device(device_map)}


def _auto_device_map(
    model: torch.nn.Module,
    q: Quantizer | None,
    hooks: Any,
    torch_dtype: torch.dtype,
    strategy: str,
    max_memory: Mapping[Any, int | str] | None,
) -> dict[str, torch.device]:
    from accelerate.utils import get_balanced_memory, get_max_memory, infer_auto_device_map

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    target_dtype = hooks.adjust_target_dtype(quantizer=q, torch_dtype=torch_dtype)
    special_dtypes = hooks.get_special_dtypes_update(quantizer=q, model=model, torch_dtype=torch_dtype)
    memory = dict(max_memory) if max_memory is not None else None
    if strategy == "sequential":
        memory = get_max_memory(memory)
    else:
        memory = get_balanced_memory(
            model,
            max_memory=memory,
            no_split_module_classes=no_split,
            dtype=target_dtype,
            special_dtypes=special_dtypes,
            low_zero=strategy == "balanced_low_0",
        )
    memory = hooks.adjust_max_memory(quantizer=q, max_memory=memory)
    device_map = infer_auto_device_map(
        model,
        max_memory=memory,
        no_split_module_classes=no_split,
        dtype=target_dtype,
        special_dtypes=special_dtypes,
    )
    logger.info("device_map=%r placed the model as %s", strategy, device_map)
    return {name: _device(dev) for name, dev in device_map.items()}


def target_device(param_name: str, device_map: Mapping[str, torch.device]) -> torch.device:
    """The device of the longest device_map prefix that contains ``param_name``."""
    name = param_name
    while True:
        if name in device_map:
            return device_map[name]
        if not name:
            raise ConfigError(f"device_map does not place {param_name!r}", option="device_map")
        name = name.rpartition(".")[0]
