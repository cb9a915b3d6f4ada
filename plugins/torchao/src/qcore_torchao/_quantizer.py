"""The torchao quantizer: each Linear is quantized as its weight loads, on its target device.

Quantize on load: the skeleton keeps plain ``nn.Linear`` modules on the meta device; when a Linear's
weight arrives, it is put on the target device and torchao's ``quantize_`` runs on that one module.
At most one unquantized weight is alive at a time, so peak memory stays near the final model size.

Pre-quantized: the safetensors files hold torchao's flattened tensors (``x._weight_qdata``,
``x._weight_scale``, ...) and, in the header metadata, one JSON entry per tensor. Each weight's
pieces are grouped, moved to the target device and reassembled into the torchao tensor subclass.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

import qcore

from ._quant_types import hardware_problem, leaf_configs
from ._serialization import (
    PLAIN_TENSOR_TYPE,
    TENSOR_NAMES_KEY,
    TORCHAO_VERSION_KEY,
    build_tensor,
    flatten,
    flattened_key,
    parse_tensor_entry,
    torchao_version,
)

logger = logging.getLogger("qcore.torchao")

MIN_TORCHAO = "0.14"
MIN_TORCHAO_SAFETENSORS = "0.16"
# Formats whose inner tensors are unpacked: qdata has the weight's shape, scale and zero_point one
# value per block in a (rows / block rows, columns / block columns) grid.
UNPACKED_TYPES = frozenset({"Int8Tensor", "Float8Tensor", "IntxUnpackedToInt8Tensor"})
BLOCK_STAT_PARTS = ("scale", "zero_point")
FINITE_CHECKED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ADVICE = "The checkpoint is damaged; re-save it from the unquantized weights."
# Weight-only configs whose formats scale each row on its own: quantized in slices of rows on load.
ROW_SLICED_CONFIGS = frozenset({"Int8WeightOnlyConfig"})
# float32 bytes of one slice of rows, by device type. On the CPU small slices keep torchao's
# temporaries in the caches and out of the RSS: a load of Flux's width held 1.23-1.28x the final model
# with 2 MiB and 1.38-1.83x with 32 MiB, and took less time. On a GPU every slice costs a quantize_
# call (about 1 ms of Python), so slices are larger there.
ROW_SLICE_BYTES = {"cpu": 2 << 20}
DEVICE_ROW_SLICE_BYTES = 32 << 20
_INT4_NAME = re.compile(r"(?<![0-9])4weight", re.IGNORECASE)


def _resolve_fqn_config(config: Any, module_name: str, param_name: str) -> Any:
    """The config an ``FqnToConfig`` gives one module (``quantize_`` sees a lone Linear, fqn "")."""
    table = getattr(config, "fqn_to_config", None)
    if not isinstance(table, dict):
        return config
    for fqn in (param_name, module_name):
        if fqn in table:
            return table[fqn]
    for fqn in (param_name, module_name):
        for pattern, value in table.items():
            if pattern.startswith("re:") and re.fullmatch(pattern[3:], fqn):
                return value
    return table.get("_default")


def _quantize_by_rows(module: nn.Module, config: Any) -> bool:
    """Quantize ``module.weight`` with torchao in slices of rows, if the format allows; False if not.

    torchao's int8 quantization makes float32 temporaries several times the size of the weight, which
    add to the load's peak memory (a 3072 x 12288 weight: about 0.4 GB). Its per-row (and per-group)
    formats scale each row on its own, so quantizing ROW_SLICE_BYTES of rows at a time into
    preallocated inner tensors gives the same tensor, bit for bit, with temporaries of one slice.
    """
    from torchao.quantization import quantize_

    weight = module.weight
    if type(config).__name__ not in ROW_SLICED_CONFIGS or weight.dim() != 2 or weight.device.type == "meta":
        return False
    rows, columns = weight.shape
    step = max(1, ROW_SLICE_BYTES.get(weight.device.type, DEVICE_ROW_SLICE_BYTES) // (4 * columns))
    if step >= rows:
        return False
    full: dict[str, torch.Tensor] = {}
    names: list[str] = []
    attributes: Any = None
    quantized_type: Any = None
    # one holder for all slices: building an nn.Linear (its meta-device init included) per slice
    # cost as much as quantizing the slice
    holder = nn.Linear(columns, step, bias=False, device="meta")
    for start in range(0, rows, step):
        piece = weight[start : start + step]
        holder.__dict__.pop("extra_repr", None)  # quantize_ wraps it again for every slice
        holder.out_features = piece.shape[0]
        holder.weight = nn.Parameter(piece, requires_grad=False)
        quantize_(holder, config)
        quantized = holder.weight
        flatten = getattr(quantized, "__tensor_flatten__", None)
        if flatten is None:
            return False  # the module's weight is untouched until the end: quantize it whole
        piece_names, piece_attributes = flatten()
        inner = {name: getattr(quantized, name) for name in piece_names}
        if start == 0:
            block = getattr(quantized, "block_size", None)
            if (
                not block
                or list(block)[0] != 1
                or any(t.shape[:1] != piece.shape[:1] for t in inner.values())
            ):
                return False  # not a row-wise format: one quantize_ call for the whole weight
            names, attributes, quantized_type = piece_names, piece_attributes, type(quantized)
            full = {
                name: torch.empty((rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
                for name, t in inner.items()
            }
        for name in names:
            full[name][start : start + piece.shape[0]].copy_(inner[name])
        # quantize_ leaves the holder in a reference cycle (its extra_repr is bound to it): emptied, the
        # cycle holds no tensor, so the slices are freed now even while the load pauses the cyclic
        # collector (else every slice of every weight stays alive to the end: twice the model's memory)
        holder._parameters.clear()
        del quantized, inner
    holder.__dict__.pop("extra_repr", None)
    rebuilt = quantized_type.__tensor_unflatten__(full, attributes, weight.shape, weight.stride())
    module._parameters["weight"] = nn.Parameter(rebuilt, requires_grad=False)
    return True


class TorchAoQuantizer(qcore.Quantizer):
    """The torchao backend's quantizer (one per load)."""

    required_packages = ("torchao",)
    use_keep_in_fp32_modules = True
    requires_calibration = False
    is_trainable = True
    is_compileable = True

    def __init__(self, quantization_config: qcore.QuantizationConfig, *, pre_quantized: bool = False) -> None:
        super().__init__(quantization_config, pre_quantized=pre_quantized)
        self._targets: set[str] = set()
        self._entries: dict[str, dict[str, Any]] = {}
        self._torch_dtype: torch.dtype | None = None
        self._where = "the checkpoint"
        # Value checks of loaded tensors, read together at the end of the load.
        self._checks = qcore.BatchedChecks()

    # --- stage 2 --------------------------------------------------------------------------------

    @qcore.hookimpl
    def validate_environment(self, device_map: Any) -> None:
        import torchao

        needed = MIN_TORCHAO_SAFETENSORS if self.pre_quantized else MIN_TORCHAO
        if not qcore.version_at_least(torchao.__version__, needed):
            what = "loading torchao safetensors checkpoints" if self.pre_quantized else "qcore-torchao"
            raise qcore.QuantizerEnvironmentError(
                f"{what} needs torchao >= {needed}, found {torchao.__version__}: pip install -U torchao"
            )
        problem = hardware_problem(self.quantization_config.quant_type, qcore.device_types(device_map))
        if problem:
            raise qcore.ConfigError(f"quant_type: {problem}", option="quant_type")

    @qcore.hookimpl
    def update_torch_dtype(self, torch_dtype: torch.dtype | None) -> torch.dtype:
        if torch_dtype is None:
            # torchao's kernels expect the activations in the unquantized weights' dtype; diffusers
            # defaults to bfloat16 for the same reason.
            logger.info("torch_dtype not given; torchao loads use torch.bfloat16")
            torch_dtype = torch.bfloat16
        self._torch_dtype = torch_dtype
        return torch_dtype

    # --- stage 4 --------------------------------------------------------------------------------

    @qcore.hookimpl
    def preprocess_model(self, model: nn.Module, keep_in_fp32_modules: list[str]) -> None:
        skip = [*self.modules_to_not_convert, *keep_in_fp32_modules]
        self._targets = {
            name
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not qcore.module_matches(name, skip)
        }
        if not self._targets and not self.pre_quantized:
            logger.warning(
                "%s has no nn.Linear left to quantize (modules_to_not_convert=%s): "
                "the model loads unquantized",
                type(model).__name__,
                skip,
            )

    @qcore.hookimpl
    def adjust_target_dtype(self, torch_dtype: torch.dtype) -> Any:
        from accelerate.utils import CustomDtype

        names = [type(c).__name__ for c in leaf_configs(self.quantization_config.quant_type)]
        if names and all(_INT4_NAME.search(n) for n in names):
            return CustomDtype.INT4
        return torch.int8

    @qcore.hookimpl
    def adjust_max_memory(self, max_memory: dict[Any, int]) -> dict[Any, int]:
        # Room for the one unquantized weight being quantized, and torchao's temporaries.
        return {key: int(value * 0.9) for key, value in max_memory.items()}

    # --- stage 5 --------------------------------------------------------------------------------

    @qcore.hookimpl
    def group_checkpoint_keys(
        self, checkpoint_keys: Sequence[str], metadata: Mapping[str, str]
    ) -> dict[str, list[str]]:
        if not self.pre_quantized:
            return {key: [key] for key in checkpoint_keys}
        if TENSOR_NAMES_KEY not in metadata:
            raise qcore.CorruptCheckpointError(
                "the checkpoint's config.json says it is torchao-quantized, but its safetensors files "
                "carry no torchao tensor metadata ('tensor_names'). It was probably saved as a pickle "
                "(safe_serialization=False) or by a torchao older than 0.16; save it again with "
                "safetensors (qcore.save_pretrained, or diffusers with torchao >= 0.16)"
            )
        try:
            names = json.loads(metadata[TENSOR_NAMES_KEY])
        except json.JSONDecodeError as exc:
            raise qcore.CorruptCheckpointError(
                f"the checkpoint's safetensors metadata 'tensor_names' is not valid JSON ({exc})"
            ) from exc
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise qcore.CorruptCheckpointError(
                "the checkpoint's 'tensor_names' metadata must be a list of names"
            )
        saved_with = metadata.get(TORCHAO_VERSION_KEY)
        if saved_with and saved_with != torchao_version():
            logger.warning(
                "the checkpoint was saved with torchao %s, torchao %s is installed; its tensors are "
                "rebuilt with the installed version",
                saved_with,
                torchao_version(),
            )
        groups: dict[str, list[str]] = {}
        self._entries = {}
        present = set(checkpoint_keys)
        for name in names:
            entry = parse_tensor_entry(metadata.get(name), name, self._where)
            if entry["_type"] == PLAIN_TENSOR_TYPE:
                if name in present:  # transformers lists both names of a tied weight, and stores one
                    groups[name] = [name]
            else:
                self._entries[name] = entry
                groups[name] = [flattened_key(name, part) for part in entry["_tensor_data_names"]]
        return groups

    @qcore.hookimpl
    def check_if_quantized_param(self, param_name: str) -> bool:
        if self.pre_quantized:
            return param_name in self._entries
        module_name, tensor_name = qcore.split_param_name(param_name)
        return tensor_name == "weight" and module_name in self._targets

    @qcore.hookimpl
    def create_quantized_param(
        self,
        model: nn.Module,
        param_name: str,
        param_value: torch.Tensor | None,
        target_device: torch.device,
        state_dict: Mapping[str, torch.Tensor],
    ) -> None:
        module_name = qcore.split_param_name(param_name)[0]
        module, tensor_name = qcore.get_module_for_param(model, param_name)
        expected = tuple(getattr(module, tensor_name).shape)
        if self.pre_quantized:
            entry = copy.deepcopy(self._entries[param_name])
            prefix = flattened_key(param_name, "")
            parts = {key[len(prefix) :]: value.to(target_device) for key, value in state_dict.items()}
            self._check_parts(param_name, entry, expected, parts)
            weight = build_tensor(entry, parts, param_name, self._where)
            if tuple(weight.shape) != expected:
                raise qcore.ShapeMismatchError(
                    f"{param_name!r} in {self._where} rebuilds to shape {tuple(weight.shape)}, the model "
                    f"expects {expected}"
                )
            if target_device.type == "cpu":
                self._checks.verify(ADVICE)  # reading CPU results does not wait for anything
            module._parameters[tensor_name] = nn.Parameter(weight, requires_grad=False)
            return
        assert param_value is not None
        if tuple(param_value.shape) != expected:
            raise qcore.ShapeMismatchError(
                f"{param_name!r} has shape {tuple(param_value.shape)} in the checkpoint, the model "
                f"expects {expected}"
            )
        dtype = self._torch_dtype or param_value.dtype
        module._parameters[tensor_name] = nn.Parameter(
            param_value.to(device=target_device, dtype=dtype), requires_grad=False
        )
        config = _resolve_fqn_config(self.quantization_config.quant_type, module_name, param_name)
        if config is None:
            return  # an FqnToConfig that leaves this module unquantized
        from torchao.quantization import quantize_

        try:
            if not _quantize_by_rows(module, config):
                quantize_(module, config)
        except qcore.QcoreError:
            raise
        except Exception as exc:  # torchao signals missing kernels/hardware with assorted types
            raise qcore.QuantizerEnvironmentError(
                f"torchao {torchao_version()} could not quantize {module_name!r} with "
                f"{type(config).__name__} on {target_device}: {type(exc).__name__}: {exc}"
            ) from exc

    def _check_parts(
        self,
        param_name: str,
        entry: Mapping[str, Any],
        shape: tuple[int, ...],
        parts: Mapping[str, torch.Tensor],
    ) -> None:
        """Check a weight's inner tensors against what the weight (of the model's ``shape``) needs.

        torchao rebuilds a tensor from any parts whose shapes broadcast: a scale of shape (1,) for 64
        rows, or of the wrong length, would give wrong outputs or fail at the first forward. Each
        scale and zero point must have one value per block of ``block_size``; floating-point parts
        must be finite (checked on their device, read in :meth:`postprocess_model`).
        """
        for part, tensor in parts.items():
            if tensor.dtype in FINITE_CHECKED_DTYPES:
                self._checks.require(
                    torch.isfinite(tensor).all(),
                    flattened_key(param_name, part),
                    "holds NaN or infinite values",
                )
        kind = entry["_type"]
        block = entry["_data"].get("block_size")
        if block is None:
            return  # formats without per-block statistics (MX, NVFP4) carry their own checks
        block = tuple(block) if isinstance(block, (list, tuple)) else (block,)
        if len(block) != len(shape) or not all(
            isinstance(b, int) and b > 0 and n % b == 0 for n, b in zip(shape, block, strict=False)
        ):
            raise qcore.CorruptCheckpointError(
                f"{self._where}: {param_name!r} ({kind}) has block_size {list(block)}, which does not "
                f"tile its shape {list(shape)}. {ADVICE}"
            )
        grid = tuple(n // b for n, b in zip(shape, block, strict=True))
        qdata = parts.get("qdata")
        if kind in UNPACKED_TYPES and qdata is not None and tuple(qdata.shape) != shape:
            raise qcore.ShapeMismatchError(
                f"{self._where}: {param_name!r} would rebuild from {flattened_key(param_name, 'qdata')!r} of "
                f"shape {tuple(qdata.shape)}; the model's weight has shape {shape}. {ADVICE}"
            )
        for part in BLOCK_STAT_PARTS:
            tensor = parts.get(part)
            if tensor is None:
                continue
            key = flattened_key(param_name, part)
            if part.endswith("scale") and not tensor.is_floating_point():
                raise qcore.CorruptCheckpointError(
                    f"{self._where}: {key!r} is {tensor.dtype}; scales are floating point. {ADVICE}"
                )
            per_tensor = math.prod(grid) == 1 and tensor.numel() == 1
            exact = (
                tuple(tensor.shape) == grid if kind in UNPACKED_TYPES else tensor.numel() == math.prod(grid)
            )
            if not (exact or per_tensor):
                raise qcore.CorruptCheckpointError(
                    f"{self._where}: {key!r} has shape {tuple(tensor.shape)}; {param_name!r} of shape "
                    f"{list(shape)} in blocks of {list(block)} needs one value per block, shape {grid}. "
                    f"{ADVICE}"
                )

    @qcore.hookimpl
    def postprocess_model(self) -> None:
        self._checks.verify(ADVICE)

    # --- finish, dequantize, save ---------------------------------------------------------------

    @qcore.hookimpl
    def dequantize(self, model: nn.Module) -> nn.Module:
        from torchao.utils import TorchAOBaseTensor

        dtype = self.pre_quantization_dtype or self._torch_dtype or torch.bfloat16
        plain: dict[str, torch.Tensor] = {}
        # Every weight is dequantized before any is replaced, so a failure leaves the model as it was.
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, TorchAOBaseTensor):
                continue
            try:
                plain[name] = weight.dequantize().to(dtype)
            except (NotImplementedError, AttributeError, RuntimeError, TypeError) as exc:
                raise qcore.DequantizeError(
                    f"torchao {torchao_version()} cannot dequantize {name}.weight, a "
                    f"{type(weight).__name__} ({type(exc).__name__}: {exc}); reload the unquantized "
                    "checkpoint instead"
                ) from exc
        for name, value in plain.items():
            module = model.get_submodule(name)
            module._parameters["weight"] = nn.Parameter(value, requires_grad=False)
        return model

    @qcore.hookimpl
    def is_serializable(self) -> bool:
        import torchao

        if not qcore.version_at_least(torchao.__version__, MIN_TORCHAO_SAFETENSORS):
            logger.error("saving torchao models as safetensors needs torchao >= 0.16")
            return False
        return True

    @qcore.hookimpl
    def get_state_dict_and_metadata(
        self, state_dict: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        return flatten(state_dict)
