"""Every hook's default answer, registered ``trylast`` so a backend's answer wins.

For an unquantized load (no backend) these answers are the whole load: every parameter is one
checkpoint key, set as stored (cast to the load dtype).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ._errors import DequantizeError, QuantizerEnvironmentError, ShapeMismatchError
from ._hookspecs import hookimpl
from ._quantizer import Quantizer


class DefaultHooks:
    @hookimpl(trylast=True)
    def validate_environment(self, quantizer: Quantizer | None) -> None:
        if quantizer is None:  # an unquantized load needs nothing beyond qcore's own dependencies
            return
        missing = [p for p in quantizer.required_packages if importlib.util.find_spec(p) is None]
        if missing:
            raise QuantizerEnvironmentError(
                f"backend {quantizer.quant_method!r} needs the package(s) {', '.join(missing)}: "
                f"pip install {' '.join(missing)}"
            )

    @hookimpl(trylast=True)
    def update_torch_dtype(self, torch_dtype: torch.dtype | None) -> torch.dtype | None:
        return torch_dtype

    @hookimpl(trylast=True)
    def update_device_map(self, device_map: Any) -> Any:
        return device_map

    @hookimpl(trylast=True)
    def adjust_target_dtype(self, torch_dtype: torch.dtype) -> torch.dtype:
        return torch_dtype

    @hookimpl(trylast=True)
    def get_special_dtypes_update(self) -> dict[str, torch.dtype]:
        return {}

    @hookimpl(trylast=True)
    def adjust_max_memory(self, max_memory: dict[Any, int]) -> dict[Any, int]:
        return max_memory

    @hookimpl(trylast=True)
    def group_checkpoint_keys(self, checkpoint_keys: Sequence[str]) -> dict[str, list[str]]:
        return {key: [key] for key in checkpoint_keys}

    @hookimpl(trylast=True)
    def check_if_quantized_param(self) -> bool:
        return False

    @hookimpl(trylast=True)
    def check_quantized_param_shape(
        self, param_name: str, current_param: torch.Tensor, loaded_param: torch.Tensor
    ) -> bool:
        if current_param.shape != loaded_param.shape:
            raise ShapeMismatchError(
                f"{param_name!r}: checkpoint shape {tuple(loaded_param.shape)} does not match the "
                f"model's {tuple(current_param.shape)}"
            )
        return True

    @hookimpl(trylast=True)
    def update_missing_keys(self, missing_keys: list[str]) -> list[str]:
        return missing_keys

    @hookimpl(trylast=True)
    def dequantize(self, quantizer: Quantizer) -> None:
        raise DequantizeError(f"backend {quantizer.quant_method!r} does not support dequantize()")

    @hookimpl(trylast=True)
    def is_serializable(self) -> bool:
        return True

    @hookimpl(trylast=True)
    def get_state_dict_and_metadata(
        self, state_dict: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        return dict(state_dict), {}
