"""from_pretrained's keyword arguments under diffusers' names: which it takes, which it refuses, and why."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ._errors import ConfigError

# diffusers' from_pretrained keywords that qcore does not implement: {name: (accepted values, advice)}.
DIFFUSERS_ONLY_OPTIONS: dict[str, tuple[tuple[Any, ...], str]] = {
    "offload_folder": ((None,), "qcore does not offload to disk: map modules that do not fit to 'cpu'"),
    # qcore never holds a state dict, so what offload_state_dict=True asks for always holds.
    "offload_state_dict": ((None, False, True), "pass True, False or None"),
    "disable_mmap": (
        (False,),
        "qcore reads CPU tensors through safetensors' memory map, CUDA ones with preadv",
    ),
    "ignore_mismatched_sizes": ((False,), "qcore loads no tensor whose shape differs from the model's"),
    "use_flashpack": ((False,), "qcore reads safetensors and .bin checkpoints only"),
    "flashpack_kwargs": ((None, {}), "qcore reads safetensors and .bin checkpoints only"),
    "parallel_config": ((None,), "qcore does not shard models over devices; use device_map"),
    "mirror": ((None,), "the hub endpoint is set by HF_ENDPOINT"),
}


def one_dtype(torch_dtype: torch.dtype | None, dtype: torch.dtype | None) -> torch.dtype | None:
    """``dtype`` (diffusers' new name) and ``torch_dtype`` are one option."""
    if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
        raise ConfigError(
            f"dtype={dtype} and torch_dtype={torch_dtype} disagree; pass only dtype (torch_dtype is its "
            "older name)",
            option="dtype",
        )
    chosen = dtype if dtype is not None else torch_dtype
    if chosen is not None and not isinstance(chosen, torch.dtype):
        raise ConfigError(f"torch_dtype must be a torch.dtype, not {chosen!r}", option="torch_dtype")
    return chosen


def check_diffusers_options(options: Mapping[str, Any]) -> None:
    """Accept diffusers' keywords qcore has no use for at their defaults; name every other one."""
    for name, value in options.items():
        if name not in DIFFUSERS_ONLY_OPTIONS:
            raise ConfigError(
                f"from_pretrained() got an unknown keyword argument {name!r}. diffusers would pass it on "
                "to the model's config; qcore does not: edit config.json instead, or fix the name.",
                option=name,
            )
        accepted, advice = DIFFUSERS_ONLY_OPTIONS[name]
        if not any(value is ok or (type(value) is type(ok) and value == ok) for ok in accepted):
            raise ConfigError(f"{name}={value!r} is not supported by qcore: {advice}", option=name)
