"""Observer plugins: pluggy plugins that watch a load without being its backend."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from typing import Any

from .._hookspecs import hookimpl
from .._plugins import HOOK_NAMES as SPEC_HOOKS

HOOK_NAMES: tuple[str, ...] = tuple(sorted(SPEC_HOOKS))

#: The order in which :func:`qcore.from_pretrained` calls the hooks of a load without an automatic
#: device map (per-parameter hooks repeat; ``check_quantized_param_shape`` only for pre-quantized
#: checkpoints).
LOAD_ORDER: tuple[str, ...] = (
    "validate_environment",
    "update_torch_dtype",
    "update_device_map",
    "preprocess_model",
    "group_checkpoint_keys",
    "check_if_quantized_param",
    "check_quantized_param_shape",
    "create_quantized_param",
    "update_missing_keys",
    "postprocess_model",
)

#: The order in which :func:`qcore.save_pretrained` calls the hooks.
SAVE_ORDER: tuple[str, ...] = ("is_serializable", "get_state_dict_and_metadata")


def _recording_wrapper(name: str) -> Callable[..., Generator[None, Any, Any]]:
    # pluggy passes only the arguments a hookimpl names; this one names none, so it fits every hook.
    def hook(self: HookRecorder) -> Generator[None, Any, Any]:
        self.calls.append(name)
        start = time.perf_counter()
        try:
            return (yield)
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    hook.__name__ = hook.__qualname__ = name
    return hookimpl(wrapper=True)(hook)


class HookRecorder:
    """Records every lifecycle hook call of the loads it observes, with the time spent in each.

    Pass it as ``qcore.from_pretrained(..., observers=[recorder])``. It wraps each hook
    (``wrapper=True``) and passes every result through unchanged, so the load is the same with or
    without it; saving and dequantizing a model loaded with it are recorded too.
    """

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.seconds: dict[str, float] = {}

    def count(self, name: str) -> int:
        return self.calls.count(name)

    def distinct(self) -> list[str]:
        """Hook names in order of first call, consecutive repeats collapsed."""
        out: list[str] = []
        for name in self.calls:
            if not out or out[-1] != name:
                out.append(name)
        return out

    def clear(self) -> None:
        self.calls.clear()
        self.seconds.clear()


for _name in HOOK_NAMES:
    setattr(HookRecorder, _name, _recording_wrapper(_name))
del _name
