"""The int8 backend's lifecycle hooks.

Load order (see qcore's hook reference): ``preprocess_model`` swaps ``nn.Linear`` for
:class:`Int8Linear` on the meta skeleton; ``group_checkpoint_keys`` pairs each pre-quantized
``weight`` with its ``weight_scale``; ``check_if_quantized_param`` / ``create_quantized_param``
quantize (or verify) each weight as it is read; ``update_missing_keys`` forgives the scales that
quantize-on-load creates itself. Saving adds a format tag to the safetensors header, and
``dequantize`` swaps the layers back.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn

import qcore

from ._config import Int8Config
from ._linear import Int8Linear, quantize_per_channel

# Third-party backends log under "qcore.<quant_method>", so `qcore -v` shows their messages too.
logger = logging.getLogger("qcore.int8")

FORMAT_KEY = "qcore_int8.format"
FORMAT = "int8-per-channel-symmetric/1"
_WEIGHT, _SCALE = "weight", "weight_scale"


class Int8Quantizer(qcore.Quantizer):
    is_compileable = True

    quantization_config: Int8Config

    def _int8_module(self, model: nn.Module, param_name: str) -> tuple[str, str, Int8Linear | None]:
        module_name, tensor_name = qcore.split_param_name(param_name)
        try:
            module, _ = qcore.get_module_for_param(model, param_name)
        except AttributeError:
            return module_name, tensor_name, None
        return module_name, tensor_name, module if isinstance(module, Int8Linear) else None

    # --- stage 4 -------------------------------------------------------------------------------

    @qcore.hookimpl
    def preprocess_model(self, model: nn.Module, keep_in_fp32_modules: list[str]) -> None:
        compute_dtype = self.quantization_config.torch_compute_dtype
        converted = qcore.replace_linear_layers(
            model,
            lambda name, linear: Int8Linear(
                linear.in_features, linear.out_features, linear.bias is not None, compute_dtype
            ),
            modules_to_not_convert=[*self.modules_to_not_convert, *keep_in_fp32_modules],
        )
        if not converted:
            logger.warning(
                "int8: %s has no nn.Linear outside modules_to_not_convert=%s; nothing is quantized",
                type(model).__name__,
                self.modules_to_not_convert,
            )
        logger.debug("int8: quantizing %d Linear layers", len(converted))

    @qcore.hookimpl
    def adjust_target_dtype(self) -> torch.dtype:
        return torch.int8

    @qcore.hookimpl
    def get_special_dtypes_update(self, model: nn.Module, torch_dtype: torch.dtype) -> dict[str, torch.dtype]:
        # Everything but the int8 weights keeps the load dtype when accelerate sizes the model.
        return {
            name: torch_dtype
            for name, _ in model.named_parameters()
            if self._int8_module(model, name)[2] is None or not name.endswith(f".{_WEIGHT}")
        }

    # --- stage 5 -------------------------------------------------------------------------------

    @qcore.hookimpl
    def group_checkpoint_keys(
        self, model: nn.Module, checkpoint_keys: Sequence[str], metadata: Mapping[str, str]
    ) -> dict[str, list[str]]:
        if self.pre_quantized:
            found = metadata.get(FORMAT_KEY)
            if found is not None and found != FORMAT:
                raise qcore.CorruptCheckpointError(
                    f"the checkpoint's safetensors metadata says {FORMAT_KEY}={found!r}; this version "
                    f"of qcore-int8 reads {FORMAT!r}. Upgrade qcore-int8."
                )
        keys = set(checkpoint_keys)
        groups: dict[str, list[str]] = {}
        for key in checkpoint_keys:
            module_name, tensor_name, module = self._int8_module(model, key)
            if module is None or not self.pre_quantized:
                groups[key] = [key]
            elif tensor_name == _WEIGHT:
                scale = f"{module_name}.{_SCALE}"
                groups[key] = [key, scale] if scale in keys else [key]
            elif tensor_name == _SCALE and f"{module_name}.{_WEIGHT}" not in keys:
                groups[key] = [key]  # an orphan scale: create_quantized_param names the missing weight
            elif tensor_name != _SCALE:
                groups[key] = [key]
        return groups

    @qcore.hookimpl
    def check_if_quantized_param(self, model: nn.Module, param_name: str) -> bool:
        _, tensor_name, module = self._int8_module(model, param_name)
        return module is not None and tensor_name in (_WEIGHT, _SCALE)

    @qcore.hookimpl
    def check_quantized_param_shape(
        self, param_name: str, current_param: torch.Tensor, loaded_param: torch.Tensor
    ) -> bool:
        if tuple(loaded_param.shape) != tuple(current_param.shape):
            raise qcore.ShapeMismatchError(
                f"{param_name!r}: the checkpoint stores shape {tuple(loaded_param.shape)}, the model "
                f"expects {tuple(current_param.shape)}; the checkpoint is damaged or belongs to another "
                "model config"
            )
        return True

    @qcore.hookimpl
    def create_quantized_param(
        self,
        model: nn.Module,
        param_name: str,
        param_value: torch.Tensor | None,
        target_device: torch.device,
        state_dict: Mapping[str, torch.Tensor],
    ) -> None:
        module_name, tensor_name, module = self._int8_module(model, param_name)
        assert module is not None  # check_if_quantized_param said so
        weight_key, scale_key = f"{module_name}.{_WEIGHT}", f"{module_name}.{_SCALE}"
        if tensor_name == _SCALE:
            raise qcore.MissingKeysError([weight_key], f"the checkpoint ({scale_key} has no weight)")
        if param_value is None:
            raise qcore.MissingKeysError([weight_key], "the checkpoint")
        if self.pre_quantized:
            q, scale = self._verified(module, weight_key, scale_key, param_value, state_dict.get(scale_key))
        else:
            if not param_value.is_floating_point() or not torch.isfinite(param_value).all():
                raise qcore.CorruptCheckpointError(
                    f"{weight_key!r} ({param_value.dtype}) must be a finite floating point tensor to be "
                    "quantized to int8; it is not floating point or holds NaN/inf values"
                )
            q, scale = quantize_per_channel(param_value)
        module.weight = nn.Parameter(q.to(target_device), requires_grad=False)
        module.weight_scale = scale.to(target_device, torch.float32)

    def _verified(
        self,
        module: Int8Linear,
        weight_key: str,
        scale_key: str,
        weight: torch.Tensor,
        scale: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if scale is None:
            raise qcore.MissingKeysError([scale_key], "the checkpoint (each int8 weight needs its scale)")
        if weight.dtype != torch.int8:
            raise qcore.CorruptCheckpointError(
                f"{weight_key!r} is stored as {weight.dtype}, but an int8 checkpoint stores int8 "
                "weights; the file is damaged or was not written by qcore-int8"
            )
        if tuple(scale.shape) != (module.out_features,):
            raise qcore.ShapeMismatchError(
                f"{scale_key!r}: the checkpoint stores shape {tuple(scale.shape)}, the model expects "
                f"({module.out_features},)"
            )
        if not scale.is_floating_point() or not bool(torch.isfinite(scale).all() and (scale > 0).all()):
            raise qcore.CorruptCheckpointError(
                f"{scale_key!r} must hold positive finite floats; the checkpoint is damaged"
            )
        return weight, scale

    @qcore.hookimpl
    def update_missing_keys(self, model: nn.Module, missing_keys: list[str]) -> list[str]:
        if self.pre_quantized:
            return missing_keys
        # Quantizing on load creates each scale together with its weight.
        return [
            key
            for key in missing_keys
            if not (key.endswith(f".{_SCALE}") and self._int8_module(model, key)[2] is not None)
        ]

    # --- saving and dequantizing ---------------------------------------------------------------

    @qcore.hookimpl
    def get_state_dict_and_metadata(
        self, state_dict: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        return state_dict, {FORMAT_KEY: FORMAT}

    @qcore.hookimpl
    def dequantize(self, model: nn.Module) -> nn.Module:
        dtype = self.pre_quantization_dtype or torch.float32
        for name, module in list(model.named_modules()):
            if not isinstance(module, Int8Linear):
                continue
            linear = nn.Linear(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                device=module.weight.device,
                dtype=dtype,
            )
            with torch.no_grad():
                linear.weight.copy_(module.dequantized_weight(dtype))
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            parent, child = qcore.get_module_for_param(model, name)
            setattr(parent, child, linear)
        return model

    def __repr__(self) -> str:
        return f"<Int8Quantizer {self.quantization_config.to_dict()} pre_quantized={self.pre_quantized}>"
