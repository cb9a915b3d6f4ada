"""The GGUF backend's lifecycle hooks.

Load: ``preprocess_model`` swaps ``nn.Linear`` for :class:`GGUFLinear` on the meta skeleton;
``create_quantized_param`` puts each :class:`GGUFWeight` (from a ``.gguf`` file, or uint8 blocks from a
checkpoint saved by this backend, typed by its safetensors metadata) into its layer, and dequantizes the
few quantized tensors that land outside a Linear. Save writes uint8 blocks plus a per-tensor type map.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn

import qcore

from ._config import GGUFConfig
from ._dequant import FLOAT_TYPES, GGML_TYPES
from ._linear import GGUFLinear
from ._tensor import GGUFWeight

logger = logging.getLogger("qcore.gguf")

FORMAT_KEY = "qcore_gguf.format"
FORMAT = "ggml-blocks/1"
TYPES_KEY = "qcore_gguf.types"


class GGUFQuantizer(qcore.Quantizer):
    required_packages = ("gguf",)
    requires_calibration = True
    use_keep_in_fp32_modules = True
    is_compileable = True

    quantization_config: GGUFConfig

    def __init__(self, quantization_config: GGUFConfig, *, pre_quantized: bool = False) -> None:
        super().__init__(quantization_config, pre_quantized=pre_quantized)
        self._saved_types: dict[str, str] = {}
        self._keep_fp32: list[str] = []
        self._compute_dtype = quantization_config.torch_compute_dtype or torch.float32
        self._load_dtype = self._compute_dtype

    # --- stage 2 -------------------------------------------------------------------------------

    @qcore.hookimpl
    def validate_environment(self) -> None:
        if not self.pre_quantized:
            raise qcore.ConfigError(
                "GGUF cannot quantize on load: it reads weights that are already GGML blocks. Load a .gguf "
                "file (or a checkpoint saved from one) without quantization_config, or pick a backend that "
                "quantizes on load (bitsandbytes, torchao)",
                option="quant_method",
            )

    @qcore.hookimpl
    def update_torch_dtype(
        self, torch_dtype: torch.dtype | None, checkpoint_dtype: torch.dtype | None
    ) -> torch.dtype:
        # compute_dtype=None follows the load's dtype, so a plain .gguf load with torch_dtype just works,
        # and a saved checkpoint reloads in the dtype it was saved in.
        configured = self.quantization_config.torch_compute_dtype
        self._load_dtype = torch_dtype or configured or checkpoint_dtype or torch.float32
        self._compute_dtype = configured or self._load_dtype
        return self._load_dtype

    # --- stage 4 -------------------------------------------------------------------------------

    @qcore.hookimpl
    def preprocess_model(
        self,
        model: nn.Module,
        keep_in_fp32_modules: list[str],
        checkpoint_tensors: Mapping[str, torch.Tensor],
    ) -> None:
        self._keep_fp32 = list(keep_in_fp32_modules)
        compute_dtype = self._compute_dtype
        # Only layers whose weight the file holds as blocks (uint8) become GGUF layers; F16/F32 weights
        # stay plain nn.Linear, as diffusers leaves them.
        blocks = {key for key, meta in checkpoint_tensors.items() if meta.dtype == torch.uint8}
        plain = [
            name
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and f"{name}.weight" not in blocks
        ]
        converted = qcore.replace_linear_layers(
            model,
            lambda name, linear: GGUFLinear(
                linear.in_features, linear.out_features, linear.bias is not None, compute_dtype
            ),
            modules_to_not_convert=[*self.modules_to_not_convert, *self._keep_fp32, *plain],
        )
        logger.debug("gguf: %d Linear layers can take GGML blocks", len(converted))

    @qcore.hookimpl
    def adjust_target_dtype(self) -> torch.dtype:
        return torch.uint8

    # --- stage 5 -------------------------------------------------------------------------------

    @qcore.hookimpl
    def group_checkpoint_keys(self, checkpoint_keys: Sequence[str], metadata: Mapping[str, str]) -> None:
        found = metadata.get(FORMAT_KEY)
        if found is None:
            return None
        if found != FORMAT:
            raise qcore.CorruptCheckpointError(
                f"the checkpoint's metadata says {FORMAT_KEY}={found!r}; this qcore-gguf reads {FORMAT!r}. "
                "Upgrade qcore-gguf."
            )
        try:
            types = json.loads(metadata.get(TYPES_KEY, "{}"))
        except json.JSONDecodeError as exc:
            raise qcore.CorruptCheckpointError(
                f"the checkpoint's {TYPES_KEY} metadata is not JSON ({exc})"
            ) from exc
        bad = {k: v for k, v in types.items() if v not in GGML_TYPES or v in FLOAT_TYPES}
        if bad:
            raise qcore.CorruptCheckpointError(
                f"the checkpoint's {TYPES_KEY} names unknown GGML types: {bad}; "
                f"known: {', '.join(GGML_TYPES)}"
            )
        self._saved_types = dict(types)
        return None

    def _weight(self, param_name: str, value: torch.Tensor) -> GGUFWeight:
        if isinstance(value, GGUFWeight):
            return value
        quant_type = self._saved_types[param_name]
        if value.dtype != torch.uint8 or value.dim() < 1:
            raise qcore.CorruptCheckpointError(
                f"{param_name!r} is {quant_type} by the checkpoint's metadata, so it must be uint8 blocks, "
                f"not {value.dtype} of shape {tuple(value.shape)}; the checkpoint is damaged"
            )
        _, _, type_size = GGML_TYPES[quant_type]
        if value.shape[-1] % type_size:
            raise qcore.CorruptCheckpointError(
                f"{param_name!r}: {value.shape[-1]} bytes per row is not a whole number of "
                f"{quant_type} blocks ({type_size} bytes); the checkpoint is damaged"
            )
        return GGUFWeight(value, quant_type)

    @qcore.hookimpl
    def check_if_quantized_param(self, param_name: str, param_value: torch.Tensor | None) -> bool:
        return isinstance(param_value, GGUFWeight) or param_name in self._saved_types

    @qcore.hookimpl
    def check_quantized_param_shape(
        self, param_name: str, current_param: torch.Tensor, loaded_param: torch.Tensor
    ) -> bool:
        weight = self._weight(param_name, loaded_param)
        if weight.logical_shape != tuple(current_param.shape):
            raise qcore.ShapeMismatchError(
                f"{param_name!r}: the {weight.quant_type} blocks decode to shape {weight.logical_shape}, the "
                f"model expects {tuple(current_param.shape)}; the file belongs to another model config"
            )
        return True

    @qcore.hookimpl
    def create_quantized_param(
        self, model: nn.Module, param_name: str, param_value: torch.Tensor | None, target_device: torch.device
    ) -> None:
        if param_value is None:
            raise qcore.MissingKeysError([param_name], "the checkpoint")
        weight = self._weight(param_name, param_value)
        module_name = qcore.split_param_name(param_name)[0]
        module, tensor_name = qcore.get_module_for_param(model, param_name)
        if isinstance(module, GGUFLinear) and tensor_name == "weight":
            module._parameters["weight"] = weight.to(target_device)
            return
        # A quantized tensor outside a GGUF layer (a skipped module, a norm): decoded, as diffusers does.
        keep_fp32 = qcore.module_matches(module_name, self._keep_fp32)
        dtype = torch.float32 if keep_fp32 else self._load_dtype
        logger.debug("gguf: %s (%s) is dequantized to %s", param_name, weight.quant_type, dtype)
        value = weight.dequantize().to(dtype).to(target_device)
        if tensor_name in module._buffers:
            module._buffers[tensor_name] = value
        else:
            module._parameters[tensor_name] = nn.Parameter(value, requires_grad=False)

    # --- saving and dequantizing ---------------------------------------------------------------

    @qcore.hookimpl
    def get_state_dict_and_metadata(
        self, state_dict: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        types = {k: v.quant_type for k, v in state_dict.items() if isinstance(v, GGUFWeight)}
        plain = {k: v.as_tensor() if isinstance(v, GGUFWeight) else v for k, v in state_dict.items()}
        return plain, {FORMAT_KEY: FORMAT, TYPES_KEY: json.dumps(types, sort_keys=True)}

    @qcore.hookimpl
    def dequantize(self, model: nn.Module) -> nn.Module:
        for name, module in list(model.named_modules()):
            if not isinstance(module, GGUFLinear):
                continue
            weight = module.weight
            dtype = module.compute_dtype if isinstance(weight, GGUFWeight) else weight.dtype
            linear = nn.Linear(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                device=weight.device,
                dtype=dtype,
            )
            with torch.no_grad():
                linear.weight.copy_(module.dequantized_weight(dtype))
                if module.bias is not None:
                    linear.bias = module.bias
            linear.requires_grad_(False)
            parent, child = qcore.get_module_for_param(model, name)
            setattr(parent, child, linear)
        return model
