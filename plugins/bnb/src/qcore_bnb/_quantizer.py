"""The bitsandbytes quantizer: qcore's lifecycle hooks for 4-bit (NF4/FP4) and 8-bit (LLM.int8) loads.

On-disk layout (the one diffusers and transformers write, so checkpoints move both ways), per Linear:

- 4-bit: ``weight`` (packed, ``bnb_4bit_quant_storage`` dtype, shape ``(ceil(n/2)/itemsize, 1)``),
  ``weight.absmax``, ``weight.quant_map``, with double quant also ``weight.nested_absmax`` and
  ``weight.nested_quant_map``, and ``weight.quant_state.bitsandbytes__nf4|fp4`` (JSON packed in uint8).
- 8-bit: ``weight`` (int8), ``SCB`` (float32 row scales), ``weight_format`` (uint8, 0 = row-major).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

import qcore

from ._config import BitsAndBytesConfig

logger = logging.getLogger("qcore.bnb")

MIN_BITSANDBYTES = "0.45"
QUANT_STATE_KEYS = ("quant_state.bitsandbytes__nf4", "quant_state.bitsandbytes__fp4")
STATS_4BIT = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", *QUANT_STATE_KEYS)
STATS_8BIT = ("SCB", "weight_format")
# bitsandbytes' code tables: 16 values for nf4/fp4, 256 for the 8-bit dynamic map of double quant.
QUANT_MAP_SIZE = 16
NESTED_QUANT_MAP_SIZE = 256
ROW_MAJOR_FORMAT = 0
# The block sizes bitsandbytes' 4-bit and blockwise kernels take.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
# The name of bitsandbytes' signed 8-bit dynamic map, the code table of double-quantized absmax.
DYNAMIC_MAP = "dynamic"
# Code tables are equal to bitsandbytes' own up to float32 rounding of the device that built them.
TABLE_TOLERANCE = 1e-6
# A quant_state's JSON is ~200 bytes; a multi-megabyte one is not read.
MAX_QUANT_STATE_BYTES = 1 << 16
ADVICE = (
    "The checkpoint is damaged or was not written by bitsandbytes; re-save it from the unquantized weights."
)
# Bytes of a weight quantized at a time on the CPU: bitsandbytes' CPU kernels make temporaries of
# four (8-bit) to seven (4-bit) times their input, which add to the load's peak memory (an NF4 load
# of a 160M Flux rose 229-262 MiB above its start with 16 MiB slices, 153-176 MiB with 2 MiB, in the
# same time; the quantized model is 86 MiB).
SLICE_BYTES = 2 << 20


def _bnb() -> Any:
    import bitsandbytes

    return bitsandbytes


def stat_owner(key: str) -> str | None:
    """The weight a checkpoint key of bitsandbytes statistics belongs to, or None for other keys."""
    for suffix in STATS_4BIT:
        if key.endswith(f".weight.{suffix}") or key == f"weight.{suffix}":
            return key[: -len(suffix) - 1]
    for suffix in STATS_8BIT:
        if key.endswith(f".{suffix}") or key == suffix:
            return key[: -len(suffix)] + "weight"
    return None


def packed_4bit_shape(numel: int, storage: torch.dtype) -> tuple[int, int]:
    """The shape bitsandbytes gives a 4-bit weight of ``numel`` values packed into ``storage``."""
    return ((numel + 1) // (storage.itemsize * 2), 1)


def in_row_slices(
    weight: torch.Tensor, rows_unit: int, quantize: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
) -> tuple[torch.Tensor, ...]:
    """``quantize(weight)``; for a CPU matrix, in slices of about SLICE_BYTES of rows (a multiple of
    ``rows_unit`` rows each), their outputs concatenated along dim 0.

    bitsandbytes quantizes 4-bit blocks and packs them in the weight's flattened order, and 8-bit rows
    one by one, so slices that start on a block and packing boundary (``rows_unit``) give the bytes of
    one call, with temporaries of one slice.
    """
    if weight.device.type != "cpu" or weight.dim() != 2:
        return quantize(weight)
    rows, columns = weight.shape
    step = max(rows_unit, SLICE_BYTES // max(1, columns * weight.element_size()) // rows_unit * rows_unit)
    if step >= rows:
        return quantize(weight)
    # The outputs are allocated once and each slice's copied in at once. Slice outputs kept for one
    # torch.cat at the end lie between the temporaries on the heap, which then can neither be reused
    # nor handed back: an NF4 load of Flux's width peaked 0.73-0.79 GB above its start that way,
    # 0.47-0.48 GB this way (the model is 0.31 GB).
    starts = range(0, rows, step)
    first, last = quantize(weight[:step]), quantize(weight[starts[-1] :])
    outputs = tuple(
        torch.empty(
            (f.shape[0] * (len(starts) - 1) + t.shape[0], *f.shape[1:]), dtype=f.dtype, device=f.device
        )
        for f, t in zip(first, last, strict=True)
    )
    for index, start in enumerate(starts):
        if index == 0:
            parts = first
        elif index == len(starts) - 1:
            parts = last
        else:
            parts = quantize(weight[start : start + step])
        for output, head, part in zip(outputs, first, parts, strict=True):
            at = index * head.shape[0]  # every slice but the last has the first's shape
            output[at : at + part.shape[0]].copy_(part)
    return outputs


def _corrupt(key: str, problem: str) -> qcore.CorruptCheckpointError:
    return qcore.CorruptCheckpointError(f"{key!r}: {problem}. {ADVICE}")


def _check_layout(key: str, tensor: torch.Tensor, numel: int, dtypes: tuple[torch.dtype, ...]) -> None:
    """A statistic is a 1-D tensor of ``numel`` values of one of ``dtypes`` (0-D when one value)."""
    if tensor.dtype not in dtypes:
        raise _corrupt(key, f"is {tensor.dtype}, expected {', '.join(map(str, dtypes))}")
    if tuple(tensor.shape) != (numel,) and not (numel == 1 and tensor.dim() == 0):
        raise _corrupt(key, f"has shape {tuple(tensor.shape)}, expected ({numel},)")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_quant_state(
    key: str, info: Mapping[str, Any], quant_type: str, shape: tuple[int, ...], nested: bool
) -> int:
    """Check a 4-bit weight's quant_state fields against its key and the model; returns the blocksize."""
    if info.get("quant_type") != quant_type:
        raise _corrupt(key, f"says quant_type {info.get('quant_type')!r}, its key says {quant_type!r}")
    if list(info.get("shape") or []) != list(shape) or not all(_is_int(n) for n in info.get("shape") or []):
        raise _corrupt(key, f"is for a weight of shape {info.get('shape')}, the model's is {list(shape)}")
    blocksize = info.get("blocksize")
    if not _is_int(blocksize) or blocksize not in BLOCKSIZES:
        raise _corrupt(key, f"has blocksize {blocksize!r}; bitsandbytes uses one of {BLOCKSIZES}")
    if info.get("dtype") not in FLOAT_DTYPES:
        raise _corrupt(key, f"has dtype {info.get('dtype')!r}; expected one of {', '.join(FLOAT_DTYPES)}")
    if not nested:
        return blocksize
    for field in ("nested_blocksize", "nested_dtype", "nested_offset"):
        if field not in info:
            raise _corrupt(key, f"lacks {field!r}, which double-quantized statistics need")
    nested_blocksize = info["nested_blocksize"]
    if not _is_int(nested_blocksize) or nested_blocksize not in BLOCKSIZES:
        raise _corrupt(
            key, f"has nested_blocksize {nested_blocksize!r}; bitsandbytes uses one of {BLOCKSIZES}"
        )
    if info["nested_dtype"] != "float32":
        raise _corrupt(key, f"has nested_dtype {info['nested_dtype']!r}; double quantization uses 'float32'")
    offset = info["nested_offset"]
    # The offset is added to every dequantized scale: NaN or inf would corrupt the whole layer.
    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
        raise _corrupt(key, f"has nested_offset {offset!r}; it must be a finite number")
    return blocksize


class BitsAndBytesQuantizer(qcore.Quantizer):
    """Replaces ``nn.Linear`` by ``bitsandbytes.nn.Linear4bit`` / ``Linear8bitLt`` and fills them.

    Quantization happens tensor by tensor, on each tensor's target device (CPU or CUDA), as the
    checkpoint is read; pre-quantized checkpoints are read in diffusers' layout.
    """

    required_packages = ("bitsandbytes",)
    use_keep_in_fp32_modules = True
    is_trainable = True
    is_compileable = True

    quantization_config: BitsAndBytesConfig

    def __init__(self, quantization_config: qcore.QuantizationConfig, *, pre_quantized: bool = False) -> None:
        super().__init__(quantization_config, pre_quantized=pre_quantized)
        self.modules_to_not_convert = list(self.quantization_config.llm_int8_skip_modules or [])
        self.torch_dtype: torch.dtype | None = None
        self._tables: dict[tuple[str, torch.device], torch.Tensor] = {}
        # Value checks of loaded statistics, read together at the end of the load.
        self._checks = qcore.BatchedChecks()
        self._pending_tables: dict[tuple[str, torch.device], list[tuple[str, torch.Tensor]]] = {}

    @property
    def _is_4bit(self) -> bool:
        return self.quantization_config.load_in_4bit

    # --- stage 2 ------------------------------------------------------------------------------

    @qcore.hookimpl
    def validate_environment(self, device_map: Any) -> None:
        config = self.quantization_config
        if not config.is_quantizable():
            raise qcore.ConfigError(
                "BitsAndBytesConfig asks for neither 4- nor 8-bit weights: pass load_in_4bit=True or "
                "load_in_8bit=True",
                option="load_in_4bit",
            )
        try:
            bnb = _bnb()
        except ImportError as exc:
            raise qcore.QuantizerEnvironmentError(
                f"the bitsandbytes backend could not import bitsandbytes ({exc}): "
                "pip install 'bitsandbytes>=0.45'"
            ) from exc
        if not qcore.version_at_least(bnb.__version__, MIN_BITSANDBYTES):
            raise qcore.QuantizerEnvironmentError(
                f"bitsandbytes {bnb.__version__} is too old for qcore-bnb: "
                "pip install -U 'bitsandbytes>=0.45'"
            )
        if isinstance(device_map, Mapping):
            devices = qcore.device_types(device_map)
            if "disk" in devices:
                raise qcore.ConfigError(
                    "device_map puts modules on 'disk'; bitsandbytes weights cannot be offloaded to disk. "
                    "Place them on 'cpu' (with llm_int8_enable_fp32_cpu_offload=True) or an accelerator.",
                    option="device_map",
                )
            if len(devices) > 1 and "cpu" in devices and not config.llm_int8_enable_fp32_cpu_offload:
                raise qcore.ConfigError(
                    "device_map splits the model between 'cpu' and an accelerator; the modules on 'cpu' "
                    "are then kept unquantized, which needs BitsAndBytesConfig("
                    "llm_int8_enable_fp32_cpu_offload=True). Set it, or place the whole model on one device.",
                    option="llm_int8_enable_fp32_cpu_offload",
                )

    @qcore.hookimpl
    def update_torch_dtype(self, torch_dtype: torch.dtype | None) -> torch.dtype:
        if torch_dtype is None:
            logger.info(
                "torch_dtype not given: the unquantized parameters are loaded in float16, as diffusers "
                "does for bitsandbytes; pass torch_dtype to choose another dtype."
            )
            torch_dtype = torch.float16
        self.torch_dtype = torch_dtype
        return torch_dtype

    @qcore.hookimpl
    def update_device_map(self, device_map: Any) -> Any:
        # diffusers puts the model on the current accelerator when no device_map is given; qcore does
        # the same, but falls back to the CPU (bitsandbytes' CPU backend) instead of refusing.
        if device_map is None and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
            logger.info("device_map not given: loading onto %s", device)
            return {"": device}
        return device_map

    # --- stage 4 ------------------------------------------------------------------------------

    @qcore.hookimpl
    def preprocess_model(self, model: nn.Module, device_map: Any, keep_in_fp32_modules: list[str]) -> None:
        config = self.quantization_config
        skip = list(config.llm_int8_skip_modules or []) + list(keep_in_fp32_modules)
        if isinstance(device_map, Mapping) and len({str(v) for v in device_map.values()}) > 1:
            skip += [name for name, dev in device_map.items() if str(dev) == "cpu"]
        self.modules_to_not_convert = list(dict.fromkeys(skip))
        bnb = _bnb()

        def make(name: str, linear: nn.Linear) -> nn.Module:
            bias = linear.bias is not None
            if config.load_in_8bit:
                return bnb.nn.Linear8bitLt(
                    linear.in_features,
                    linear.out_features,
                    bias,
                    has_fp16_weights=config.llm_int8_has_fp16_weight,
                    threshold=config.llm_int8_threshold,
                )
            module = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias,
                compute_dtype=config.bnb_4bit_compute_dtype,
                compress_statistics=config.bnb_4bit_use_double_quant,
                quant_type=config.bnb_4bit_quant_type,
                quant_storage=config.bnb_4bit_quant_storage,
            )
            # On AVX512-BF16 CPUs bitsandbytes repacks a weight in place on its first forward, storing
            # absmax in bf16 and re-quantizing the nested stats when saving: a save after a forward
            # would no longer be the quantization that was loaded. The repacked kernel is not faster
            # for these shapes (measured), so qcore keeps the portable layout.
            module.support_avx512bf16_for_cpu = False
            return module

        replaced = qcore.replace_linear_layers(
            model, make, modules_to_not_convert=self.modules_to_not_convert
        )
        if not replaced:
            logger.warning(
                "%s has no nn.Linear outside modules_to_not_convert %s: nothing is quantized by bitsandbytes",
                type(model).__name__,
                self.modules_to_not_convert,
            )
        logger.debug("bitsandbytes replaced %d Linear layers", len(replaced))

    @qcore.hookimpl
    def adjust_target_dtype(self, torch_dtype: torch.dtype) -> Any:
        if self._is_4bit:
            from accelerate.utils import CustomDtype

            return CustomDtype.INT4
        return torch.int8

    @qcore.hookimpl
    def get_special_dtypes_update(self, model: nn.Module, torch_dtype: torch.dtype) -> dict[str, torch.dtype]:
        bnb = _bnb()
        quantized = (bnb.nn.Params4bit, bnb.nn.Int8Params)
        return {name: torch_dtype for name, p in model.named_parameters() if not isinstance(p, quantized)}

    @qcore.hookimpl
    def adjust_max_memory(self, max_memory: dict[Any, int]) -> dict[Any, int]:
        # Quantizing on the device needs work buffers next to the weights.
        return {device: int(limit * 0.90) for device, limit in max_memory.items()}

    # --- stage 5 ------------------------------------------------------------------------------

    def _quantized_weights(self, model: nn.Module) -> dict[str, nn.Module]:
        bnb = _bnb()
        return {
            f"{name}.weight" if name else "weight": module
            for name, module in model.named_modules()
            if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
        }

    def _required_stats(self) -> tuple[str, ...]:
        config = self.quantization_config
        if self._is_4bit:
            required = ("absmax", "quant_map", f"quant_state.bitsandbytes__{config.bnb_4bit_quant_type}")
            if config.bnb_4bit_use_double_quant:
                required += ("nested_absmax", "nested_quant_map")
            return tuple(f".{s}" for s in required)
        return () if config.llm_int8_has_fp16_weight else ("SCB",)

    @qcore.hookimpl
    def group_checkpoint_keys(self, model: nn.Module, checkpoint_keys: Sequence[str]) -> dict[str, list[str]]:
        if not self.pre_quantized:
            return {key: [key] for key in checkpoint_keys}
        groups: dict[str, list[str]] = {}
        for key in checkpoint_keys:
            owner = stat_owner(key) or key
            groups.setdefault(owner, []).append(key)
        # Naming the statistics a weight needs makes qcore report a missing one by its key and file,
        # and makes it read them from whichever shard holds them.
        for weight in self._quantized_weights(model):
            if weight not in groups:
                continue  # reported as a missing parameter after loading
            group = groups[weight]
            prefix = weight.removesuffix("weight")
            for stat in self._required_stats():
                key = f"{weight}{stat}" if stat.startswith(".") else f"{prefix}{stat}"
                if key not in group:
                    group.append(key)
            if weight not in group:
                group.insert(0, weight)
        return groups

    @qcore.hookimpl
    def check_if_quantized_param(
        self, model: nn.Module, param_name: str, state_dict: Mapping[str, torch.Tensor]
    ) -> bool:
        bnb = _bnb()
        module, tensor_name = qcore.get_module_for_param(model, param_name)
        if tensor_name == "weight" and isinstance(
            module._parameters.get(tensor_name), (bnb.nn.Params4bit, bnb.nn.Int8Params)
        ):
            return True
        extra = sorted(key for key in state_dict if key != param_name)
        if extra:
            raise qcore.CorruptCheckpointError(
                f"the checkpoint has bitsandbytes statistics {', '.join(extra)} for {param_name!r}, but that "
                "module is not quantized in this load (llm_int8_skip_modules or keep_in_fp32_modules name "
                "it); load with the checkpoint's own quantization_config"
            )
        return False

    @qcore.hookimpl
    def check_quantized_param_shape(
        self, param_name: str, current_param: torch.Tensor, loaded_param: torch.Tensor
    ) -> bool:
        bnb = _bnb()
        if isinstance(current_param, bnb.nn.Params4bit):
            expected = packed_4bit_shape(current_param.numel(), loaded_param.dtype)
            if tuple(loaded_param.shape) != expected:
                raise qcore.ShapeMismatchError(
                    f"{param_name!r}: a 4-bit weight of shape {tuple(current_param.shape)} packed as "
                    f"{loaded_param.dtype} has shape {expected}, the checkpoint has "
                    f"{tuple(loaded_param.shape)}. The checkpoint does not belong to this model config."
                )
            return True
        if tuple(loaded_param.shape) != tuple(current_param.shape):
            raise qcore.ShapeMismatchError(
                f"{param_name!r}: the checkpoint has shape {tuple(loaded_param.shape)}, the model expects "
                f"{tuple(current_param.shape)}"
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
        bnb = _bnb()
        module, tensor_name = qcore.get_module_for_param(model, param_name)
        if param_value is None:
            raise qcore.MissingKeysError([param_name], "the checkpoint")
        old = module._parameters[tensor_name]
        if not self.pre_quantized:
            if not param_value.is_floating_point():
                raise _corrupt(
                    param_name,
                    f"is {param_value.dtype}, not a floating-point weight, but config.json has no "
                    "quantization_config to say how it was quantized",
                )
            if param_value.shape != old.shape:
                raise qcore.ShapeMismatchError(
                    f"{param_name!r}: the checkpoint has shape {tuple(param_value.shape)}, the model expects "
                    f"{tuple(old.shape)}"
                )
        if isinstance(old, bnb.nn.Params4bit):
            new = self._create_4bit(bnb, module, param_name, param_value, old, target_device, state_dict)
        else:
            new = self._create_8bit(bnb, module, param_name, param_value, target_device, state_dict)
        if target_device.type == "cpu":
            self._compare_tables()
            self._checks.verify(ADVICE)  # reading CPU results does not wait for anything
        module._parameters[tensor_name] = new

    def _create_4bit(
        self,
        bnb: Any,
        module: nn.Module,
        param_name: str,
        value: torch.Tensor,
        old: Any,
        device: torch.device,
        state_dict: Mapping[str, torch.Tensor],
    ) -> Any:
        if not self.pre_quantized:
            return self._quantize_4bit(bnb, module, value, old, device)
        stats = self._checked_4bit_stats(param_name, value, tuple(old.shape), state_dict)
        param = bnb.nn.Params4bit.from_prequantized(
            data=value, quantized_stats=stats, requires_grad=False, device=device, module=module
        )
        module.quant_storage = value.dtype
        return param

    def _fixed_table(self, bnb: Any, name: str, device: torch.device) -> torch.Tensor:
        """bitsandbytes' code table ``name`` (nf4, fp4, or the 8-bit ``dynamic`` map) on ``device``.

        bitsandbytes builds a table from a Python list at every call (a host-to-device copy per
        weight on a GPU); one copy per device and table is kept here.
        """
        key = (name, device)
        table = self._tables.get(key)
        if table is None:
            if name == DYNAMIC_MAP:
                table = bnb.functional.create_dynamic_map().to(device=device, dtype=torch.float32)
            else:
                table = bnb.functional.get_4bit_type(name, device=device).to(torch.float32)
            self._tables[key] = table
        return table

    def _quantize_4bit(
        self, bnb: Any, module: nn.Module, value: torch.Tensor, old: Any, device: torch.device
    ) -> Any:
        """``value`` as the ``Params4bit`` a ``Linear4bit`` holds after its move to ``device``.

        The steps of ``bitsandbytes.functional.quantize_4bit``, with the nf4/fp4 code table taken
        from :meth:`_fixed_table` (and copied: every layer owns its table, as bitsandbytes' do, so a
        save never finds tensors that share memory).
        """
        weight = value.contiguous().to(device)
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            weight = weight.to(self.torch_dtype or torch.float16)
        # a slice starts on a whole block and a whole storage element of packed 4-bit values
        unit = math.lcm(old.blocksize, 2 * old.quant_storage.itemsize)
        packed, absmax = in_row_slices(
            weight,
            unit // math.gcd(unit, weight.shape[-1]),
            lambda rows: torch.ops.bitsandbytes.quantize_4bit.default(
                rows, old.blocksize, old.quant_type, old.quant_storage
            ),
        )
        code = self._fixed_table(bnb, old.quant_type, weight.device).clone()
        functional = bnb.functional
        if old.compress_statistics:
            offset = absmax.mean()
            nested_absmax, nested_state = functional.quantize_blockwise(absmax - offset, blocksize=256)
            state = functional.QuantState(
                absmax=nested_absmax,
                shape=weight.shape,
                dtype=weight.dtype,
                blocksize=old.blocksize,
                code=code,
                quant_type=old.quant_type,
                offset=offset,
                state2=nested_state,
            )
        else:
            state = functional.QuantState(
                absmax=absmax,
                shape=weight.shape,
                dtype=weight.dtype,
                blocksize=old.blocksize,
                code=code,
                quant_type=old.quant_type,
            )
        module.quant_state = state
        return bnb.nn.Params4bit(
            packed,
            requires_grad=False,
            quant_state=state,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            module=module,
            bnb_quantized=True,
        )

    def _checked_4bit_stats(
        self,
        param_name: str,
        value: torch.Tensor,
        shape: tuple[int, ...],
        state_dict: Mapping[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """The weight's statistics, each checked against what the weight needs, reported by its key.

        Sizes, dtypes and the quant_state's fields are checked here; values (finite, non-negative,
        code tables equal to bitsandbytes' fixed ones) on the tensors' device, read together with
        the other weights' in :meth:`postprocess_model` (at once for CPU tensors).
        """
        prefix = f"{param_name}."
        stats = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        unknown = sorted(set(stats) - set(STATS_4BIT))
        if unknown:
            raise _corrupt(prefix + unknown[0], "is not a bitsandbytes 4-bit statistic")
        state_keys = [k for k in QUANT_STATE_KEYS if k in stats]
        if len(state_keys) != 1:
            raise qcore.MissingKeysError(
                [prefix + k for k in QUANT_STATE_KEYS]
                if not state_keys
                else [prefix + k for k in state_keys],
                "the checkpoint (exactly one quant_state.bitsandbytes__nf4|fp4 per 4-bit weight)",
            )
        state_key = prefix + state_keys[0]
        # The packed JSON is read on the host here and again by bitsandbytes' QuantState.from_dict:
        # one copy to the CPU, so a GPU load waits for the device once per weight instead of twice.
        stats[state_keys[0]] = stats[state_keys[0]].cpu()
        info = self._quant_state_info(state_key, stats[state_keys[0]])
        quant_type = state_keys[0].rpartition("__")[2]
        nested = "nested_absmax" in stats or "nested_quant_map" in stats or "nested_blocksize" in info
        blocksize = _check_quant_state(state_key, info, quant_type, shape, nested)
        if value.numel() * value.element_size() != (math.prod(shape) + 1) // 2:
            raise _corrupt(
                param_name,
                f"holds {value.numel() * value.element_size()} bytes, a 4-bit {shape} weight needs "
                f"{(math.prod(shape) + 1) // 2}",
            )
        blocks = math.ceil(math.prod(shape) / blocksize)
        for name in ("absmax", "quant_map", *(("nested_absmax", "nested_quant_map") if nested else ())):
            if name not in stats:
                raise qcore.MissingKeysError([prefix + name], "the checkpoint")
        quant_map = stats["quant_map"]
        _check_layout(prefix + "quant_map", quant_map, QUANT_MAP_SIZE, (torch.float32,))
        self._require_table(prefix + "quant_map", quant_map, quant_type)
        if nested:
            # absmax holds 8-bit codes into nested_quant_map: every byte value is valid.
            _check_layout(prefix + "absmax", stats["absmax"], blocks, (torch.uint8,))
            nested_blocks = math.ceil(blocks / int(info["nested_blocksize"]))
            nested_absmax = stats["nested_absmax"]
            _check_layout(prefix + "nested_absmax", nested_absmax, nested_blocks, (torch.float32,))
            self._require_scales(prefix + "nested_absmax", nested_absmax)
            nested_map = stats["nested_quant_map"]
            _check_layout(prefix + "nested_quant_map", nested_map, NESTED_QUANT_MAP_SIZE, (torch.float32,))
            self._require_table(prefix + "nested_quant_map", nested_map, DYNAMIC_MAP)
        else:
            _check_layout(prefix + "absmax", stats["absmax"], blocks, (torch.float32,))
            self._require_scales(prefix + "absmax", stats["absmax"])
        return {prefix + k: v for k, v in stats.items()}

    def _require_scales(self, key: str, scales: torch.Tensor) -> None:
        # Absolute maxima: a NaN, an infinity or a negative value corrupts every weight it scales.
        self._checks.require(
            (torch.isfinite(scales) & (scales >= 0)).all(), key, "holds NaN, infinite or negative scales"
        )

    def _require_table(self, key: str, table: torch.Tensor, name: str) -> None:
        # Compared in one stacked operation per table and device by _compare_tables: a comparison per
        # weight launched some 8 GPU kernels for 16 numbers, 0.2 s of an NF4 Flux-dev load on an H100.
        self._pending_tables.setdefault((name, table.device), []).append((key, table))

    def _compare_tables(self) -> None:
        """Require the pending code tables to equal bitsandbytes' fixed ones (see _require_table)."""
        pending, self._pending_tables = self._pending_tables, {}
        for (name, device), tables in pending.items():
            expected = self._fixed_table(_bnb(), name, device)
            stacked = torch.stack([table for _, table in tables])
            equal = torch.isclose(stacked, expected, rtol=0.0, atol=TABLE_TOLERANCE).all(dim=1)
            for (key, _), ok in zip(tables, equal.unbind(), strict=True):
                self._checks.require(ok, key, f"differs from bitsandbytes' fixed {name} code table")

    @staticmethod
    def _quant_state_info(key: str, packed: torch.Tensor) -> dict[str, Any]:
        if packed.dtype != torch.uint8 or packed.dim() != 1:
            raise _corrupt(
                key, f"must be a 1-D uint8 tensor of packed JSON, found {packed.dtype} {tuple(packed.shape)}"
            )
        if packed.numel() > MAX_QUANT_STATE_BYTES:
            raise _corrupt(key, f"holds {packed.numel()} bytes; a quant_state is a small JSON object")
        try:
            info = json.loads(bytes(packed.tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise _corrupt(key, f"is not valid packed JSON ({exc})") from exc
        if not isinstance(info, dict):
            raise _corrupt(key, "does not hold a JSON object")
        return info

    @staticmethod
    def _quantize_8bit(value: torch.Tensor, device: torch.device) -> Any:
        """``value`` as the ``Int8Params`` a ``Linear8bitLt`` holds after its move to ``device``.

        ``Int8Params.to`` quantizes only a tensor that still sits on the CPU; qcore streams weights
        straight to the GPU, where ``.to`` would keep them in 16 bits without SCB. So the steps of
        ``Int8Params._quantize`` are done here, on any device: float16 on ``device``, then row-wise
        absmax int8 with threshold 0 (the layer's threshold applies to activations only).
        """
        bnb = _bnb()
        source = value.contiguous().to(device=device, dtype=torch.float16)
        cb, scb = in_row_slices(source, 1, lambda rows: bnb.functional.int8_vectorwise_quant(rows)[:2])
        return bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)

    def _create_8bit(
        self,
        bnb: Any,
        module: nn.Module,
        param_name: str,
        value: torch.Tensor,
        device: torch.device,
        state_dict: Mapping[str, torch.Tensor],
    ) -> Any:
        config = self.quantization_config
        prefix = param_name.removesuffix("weight")
        if config.llm_int8_has_fp16_weight:
            # 16-bit master weights, quantized by bitsandbytes at every forward.
            data = value.to(device=device, dtype=self.torch_dtype or value.dtype)
            return bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=True)
        if not self.pre_quantized:
            return self._quantize_8bit(value, device)
        if value.dtype != torch.int8:
            raise _corrupt(param_name, f"is {value.dtype}; a pre-quantized 8-bit weight must be int8")
        scb_key = f"{prefix}SCB"
        if scb_key not in state_dict:
            raise qcore.MissingKeysError([scb_key], "the checkpoint")
        scb = state_dict[scb_key]
        _check_layout(scb_key, scb, value.shape[0], (torch.float32, torch.float16, torch.bfloat16))
        self._require_scales(scb_key, scb)
        format_key = f"{prefix}weight_format"
        if format_key in state_dict:
            fmt = state_dict[format_key]
            if fmt.numel() != 1 or fmt.dtype.is_floating_point or fmt.dtype == torch.bool:
                raise _corrupt(
                    format_key, f"is {fmt.dtype} {tuple(fmt.shape)}; it must be one integer, 0 (row-major)"
                )
            self._checks.require(
                (fmt == ROW_MAJOR_FORMAT).all(), format_key, "is not 0; only 0 (row-major) is supported"
            )
        param = bnb.nn.Int8Params(value, requires_grad=False, has_fp16_weights=False, SCB=scb.float())
        return param.to(device)

    @qcore.hookimpl
    def update_missing_keys(self, missing_keys: list[str]) -> list[str]:
        # Statistics are created with their weight, never loaded as parameters of their own.
        return [key for key in missing_keys if stat_owner(key) is None]

    # --- stage 6, saving, dequantize ----------------------------------------------------------

    @qcore.hookimpl
    def postprocess_model(self, model: nn.Module) -> None:
        self._compare_tables()
        self._checks.verify(ADVICE)
        # The flags diffusers' ModelMixin reads (e.g. to refuse .to(dtype) and to know it may save).
        model.is_loaded_in_4bit = self._is_4bit
        model.is_loaded_in_8bit = not self._is_4bit
        setattr(model, "is_4bit_serializable" if self._is_4bit else "is_8bit_serializable", True)

    @qcore.hookimpl
    def is_serializable(self) -> bool:
        return True

    @qcore.hookimpl
    def get_state_dict_and_metadata(
        self, model: nn.Module, state_dict: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        # bitsandbytes' own state_dict already has diffusers' layout; check every quantized weight
        # carries its statistics so a save never writes a checkpoint that cannot load.
        missing = [
            f"{weight}{stat}" if stat.startswith(".") else f"{weight.removesuffix('weight')}{stat}"
            for weight in self._quantized_weights(model)
            for stat in self._required_stats()
            if (f"{weight}{stat}" if stat.startswith(".") else f"{weight.removesuffix('weight')}{stat}")
            not in state_dict
        ]
        if missing:
            raise qcore.SerializationError(
                f"quantized weights lack their bitsandbytes statistics ({', '.join(missing[:5])}); the "
                "model was modified after loading. Reload it before saving."
            )
        if self.torch_dtype is not None:
            # bitsandbytes' forward casts a quantized Linear's bias to the compute dtype in place; the
            # bias was loaded in torch_dtype, so casting back is exact and keeps saves reproducible.
            for weight in self._quantized_weights(model):
                bias = f"{weight.removesuffix('weight')}bias"
                if bias in state_dict and state_dict[bias].dtype != self.torch_dtype:
                    state_dict[bias] = state_dict[bias].to(self.torch_dtype)
        return state_dict, {}

    @qcore.hookimpl
    def dequantize(self, model: nn.Module) -> nn.Module:
        bnb = _bnb()
        dtype = self.pre_quantization_dtype or self.torch_dtype or torch.float16
        for name, module in list(model.named_modules()):
            if isinstance(module, bnb.nn.Linear4bit):
                weight = module.weight
                dense = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
            elif isinstance(module, bnb.nn.Linear8bitLt):
                weight = module.weight
                scb = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
                if scb is None:  # 16-bit master weights
                    dense = weight.data
                else:
                    dense = bnb.functional.int8_vectorwise_dequant(weight.data, scb)
            else:
                continue
            linear = nn.Linear(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                device="meta",
                dtype=dtype,
            )
            linear.weight = nn.Parameter(dense.to(dtype).reshape(module.out_features, module.in_features))
            if module.bias is not None:
                linear.bias = nn.Parameter(module.bias.data.to(dtype))
            parent, child = qcore.get_module_for_param(model, name)
            setattr(parent, child, linear)
        model.is_loaded_in_4bit = False
        model.is_loaded_in_8bit = False
        return model
