"""A small, real backend used by the core tests: int8 per-output-channel weight-only, plain torch.

Registered in-process with qcore.register_backend; it uses only qcore's public API.
"""

from __future__ import annotations

import torch
from torch import nn

import qcore


class Int8TestConfig(qcore.QuantizationConfig):
    quant_method = "int8-test"
    loading_attributes = frozenset({"compute_dtype"})

    def __init__(
        self, modules_to_not_convert: list[str] | None = None, compute_dtype: str = "bfloat16"
    ) -> None:
        if compute_dtype not in ("bfloat16", "float16", "float32"):
            raise qcore.ConfigError(
                f"compute_dtype must be one of bfloat16, float16, float32, not {compute_dtype!r}",
                option="compute_dtype",
            )
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert else None
        self.compute_dtype = compute_dtype


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=torch.int8), requires_grad=False
        )
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(self.compute_dtype) * self.weight_scale.to(self.compute_dtype)[:, None]
        return nn.functional.linear(x.to(self.compute_dtype), w, self.bias)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


class Int8TestQuantizer(qcore.Quantizer):
    calls: list[str] = []

    @qcore.hookimpl
    def preprocess_model(self, model: nn.Module) -> None:
        self.calls.append("preprocess_model")
        dtype = getattr(torch, self.quantization_config.compute_dtype)
        qcore.replace_linear_layers(
            model,
            lambda name, lin: Int8Linear(lin.in_features, lin.out_features, lin.bias is not None, dtype),
            modules_to_not_convert=self.modules_to_not_convert,
        )

    @qcore.hookimpl
    def check_if_quantized_param(self, model: nn.Module, param_name: str) -> bool:
        module_name, _, tensor_name = param_name.rpartition(".")
        return isinstance(model.get_submodule(module_name), Int8Linear) and tensor_name in (
            "weight",
            "weight_scale",
        )

    @qcore.hookimpl
    def group_checkpoint_keys(self, model: nn.Module, checkpoint_keys: list[str]) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        keys = set(checkpoint_keys)
        for key in checkpoint_keys:
            if self.pre_quantized and key.endswith(".weight_scale"):
                continue
            groups[key] = [key]
            if self.pre_quantized and f"{key}_scale" in keys and key.endswith(".weight"):
                groups[key].append(f"{key}_scale")
        return groups

    @qcore.hookimpl
    def check_quantized_param_shape(
        self, param_name: str, current_param: torch.Tensor, loaded_param: torch.Tensor
    ) -> bool:
        if current_param.shape != loaded_param.shape:
            raise qcore.ShapeMismatchError(
                f"{param_name!r}: {tuple(loaded_param.shape)} != {tuple(current_param.shape)}"
            )
        return True

    @qcore.hookimpl
    def create_quantized_param(
        self,
        model: nn.Module,
        param_name: str,
        param_value: torch.Tensor,
        target_device: torch.device,
        state_dict: dict[str, torch.Tensor],
    ) -> None:
        module = model.get_submodule(param_name.rpartition(".")[0])
        if self.pre_quantized:
            scale = state_dict.get(f"{param_name}_scale")
            if scale is None:
                raise qcore.MissingKeysError([f"{param_name}_scale"], "the checkpoint")
            if param_value.dtype != torch.int8:
                raise qcore.CorruptCheckpointError(f"{param_name!r} must be int8, found {param_value.dtype}")
            q, s = param_value, scale
        else:
            q, s = quantize_int8(param_value)
        module.weight = nn.Parameter(q.to(target_device), requires_grad=False)
        module.weight_scale = s.to(target_device, torch.float32)

    @qcore.hookimpl
    def update_missing_keys(self, missing_keys: list[str]) -> list[str]:
        # weight_scale is created with the weight when quantizing on load.
        return [k for k in missing_keys if self.pre_quantized or not k.endswith(".weight_scale")]

    @qcore.hookimpl
    def postprocess_model(self, model: nn.Module) -> None:
        self.calls.append("postprocess_model")

    @qcore.hookimpl
    def dequantize(self, model: nn.Module) -> nn.Module:
        dtype = self.pre_quantization_dtype or torch.float32
        for name, module in list(model.named_modules()):
            if isinstance(module, Int8Linear):
                lin = nn.Linear(
                    module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype
                )
                lin.weight.data = (module.weight.float() * module.weight_scale[:, None]).to(dtype)
                if module.bias is not None:
                    lin.bias.data = module.bias.data.to(dtype)
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, lin)
        return model


BACKEND = qcore.Backend("int8-test", Int8TestConfig, Int8TestQuantizer)
