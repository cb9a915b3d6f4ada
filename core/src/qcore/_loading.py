"""from_pretrained: the six stages, in order, each a small function.

1. resolve   config.json, pre-quantized detection, config merge, backend, quantizer, plugin manager
2. prepare   validate_environment, update_torch_dtype, update_device_map, low_cpu_mem_usage rules
3. skeleton  the model on the meta device (accelerate.init_empty_weights)
4. preprocess preprocess_model; automatic device maps through accelerate
5. load      stream tensors shard by shard, group by group, through the per-parameter hooks
6. finish    postprocess_model, dispatch, hf_quantizer, _pre_quantization_dtype, eval()
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pluggy
import torch

from ._bridge import config_dict_from_foreign, is_foreign_config
from ._checkpoint import CheckpointFiles, CheckpointReader, locate_checkpoint, read_json
from ._config import QuantizationConfig, merge_quantization_configs
from ._errors import (
    ConfigError,
    CorruptCheckpointError,
    MissingKeysError,
    QcoreError,
    ShapeMismatchError,
    UnexpectedKeysError,
)
from ._model import family_of, guard_dtype_casts, make_model, record_load
from ._plugins import make_plugin_manager, resolve_hook
from ._quantizer import Quantizer, module_matches
from ._registry import resolve_config
from ._streaming import stream_tensors

logger = logging.getLogger("qcore")

M = TypeVar("M", bound=torch.nn.Module)

AUTO_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
FLOAT8_DTYPES = tuple(
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)
)


@dataclass
class _Quantization:
    """Stage 1's result for a quantized load."""

    quantizer: Quantizer
    pm: pluggy.PluginManager

    @property
    def hooks(self) -> Any:
        return self.pm.hook


def from_pretrained(
    model_cls: type[M],
    pretrained_model_name_or_path: str | os.PathLike[str],
    *,
    quantization_config: QuantizationConfig | Mapping[str, Any] | None = None,
    torch_dtype: torch.dtype | None = None,
    device_map: str | int | torch.device | Mapping[str, Any] | None = None,
    max_memory: Mapping[Any, int | str] | None = None,
    low_cpu_mem_usage: bool | None = True,
    subfolder: str | None = None,
    variant: str | None = None,
    use_safetensors: bool | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    keep_in_fp32_modules: Sequence[str] | None = None,
    observers: Sequence[object] = (),
) -> M:
    """Load ``model_cls`` from a local directory or hub id, quantizing on load or reading a
    pre-quantized checkpoint. Keyword arguments mean what they mean in diffusers."""
    files = locate_checkpoint(
        pretrained_model_name_or_path,
        subfolder=subfolder,
        variant=variant,
        use_safetensors=use_safetensors,
        revision=revision,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        token=token,
    )
    config = read_json(files.config_path)
    clock = _StageClock()

    with CheckpointReader(files) as reader:  # headers only, until stage 5
        quant = resolve_quantization(config, quantization_config, files, observers)            # 1
        clock.lap("resolve")
        torch_dtype, device_map = prepare(quant, torch_dtype, device_map, low_cpu_mem_usage)  # 2
        clock.lap("prepare")
        model = build_skeleton(model_cls, config)                                             # 3
        clock.lap("skeleton")
        load_dtype = torch_dtype or _dominant_float_dtype(reader)
        keep_fp32 = keep_in_fp32(model, quant, keep_in_fp32_modules, load_dtype)
        device_map = preprocess(model, quant, load_dtype, device_map, max_memory, keep_fp32)  # 4
        clock.lap("preprocess")
        load_weights(model, reader, quant, torch_dtype, device_map, keep_fp32)               # 5
        clock.lap("load")
    finish(model, quant, device_map, load_dtype, str(pretrained_model_name_or_path))         # 6
    clock.lap("finish")
    logger.debug("from_pretrained stage times (s): %s", clock)
    return model


class _StageClock:
    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = round(now - self.last, 4)
        self.last = now

    def __str__(self) -> str:
        return ", ".join(f"{stage} {seconds}" for stage, seconds in self.laps.items())


# --- stage 1 ------------------------------------------------------------------------------------


def resolve_quantization(
    config: Mapping[str, Any],
    user_config: QuantizationConfig | Mapping[str, Any] | None,
    files: CheckpointFiles,
    observers: Sequence[object],
) -> _Quantization | None:
    checkpoint_config = config.get("quantization_config")
    pre_quantized = checkpoint_config is not None
    if not pre_quantized and user_config is None:
        return None
    if is_foreign_config(user_config):  # a diffusers/transformers config object
        user_config = config_dict_from_foreign(user_config)
    if user_config is not None and isinstance(user_config, QuantizationConfig):
        user_config = copy.deepcopy(user_config)  # the user's object is never mutated
    if pre_quantized:
        if not isinstance(checkpoint_config, Mapping):
            raise ConfigError(f"{files.config_path}: quantization_config must be an object")
        resolved, backend = resolve_config(checkpoint_config, checkpoint=str(files.config_path))
        if user_config is not None:
            user_resolved, _ = resolve_config(user_config)
            resolved = merge_quantization_configs(resolved, user_resolved)
    else:
        resolved, backend = resolve_config(user_config)  # type: ignore[arg-type]
    quantizer = backend.quantizer_class(resolved, pre_quantized=pre_quantized)
    pm = make_plugin_manager(quantizer, observers)
    quantizer.hooks = pm.hook
    logger.info("quantizing with %r (%s)", backend.quant_method, "pre-quantized" if pre_quantized else "on load")
    return _Quantization(quantizer, pm)


# --- stage 2 ------------------------------------------------------------------------------------


def prepare(
    quant: _Quantization | None,
    torch_dtype: torch.dtype | None,
    device_map: Any,
    low_cpu_mem_usage: bool | None,
) -> tuple[torch.dtype | None, Any]:
    if torch_dtype is not None and not isinstance(torch_dtype, torch.dtype):
        raise ConfigError(f"torch_dtype must be a torch.dtype, not {torch_dtype!r}", option="torch_dtype")
    if quant is None:
        return torch_dtype, device_map
    if low_cpu_mem_usage is False:
        raise ConfigError(
            "low_cpu_mem_usage=False cannot be used with quantization: quantized weights are created "
            "as they load. Drop the argument.",
            option="low_cpu_mem_usage",
        )
    q, hooks = quant.quantizer, quant.hooks
    hooks.validate_environment(quantizer=q, torch_dtype=torch_dtype, device_map=device_map)
    torch_dtype = hooks.update_torch_dtype(quantizer=q, torch_dtype=torch_dtype)
    device_map = hooks.update_device_map(quantizer=q, device_map=device_map)
    return torch_dtype, device_map


# --- stage 3 ------------------------------------------------------------------------------------


def build_skeleton(model_cls: type[M], config: Mapping[str, Any]) -> M:
    from accelerate import init_empty_weights

    with init_empty_weights():
        return make_model(model_cls, config)  # type: ignore[return-value]


# --- stage 4 ------------------------------------------------------------------------------------


def keep_in_fp32(
    model: torch.nn.Module,
    quant: _Quantization | None,
    requested: Sequence[str] | None,
    torch_dtype: torch.dtype | None = None,
) -> list[str]:
    if requested is not None:
        return list(requested)
    declared = family_of(model).fp32_modules(model, torch_dtype)
    if quant is not None and not quant.quantizer.use_keep_in_fp32_modules:
        return []
    return declared


def preprocess(
    model: torch.nn.Module,
    quant: _Quantization | None,
    torch_dtype: torch.dtype | None,
    device_map: Any,
    max_memory: Mapping[Any, int | str] | None,
    keep_fp32: list[str],
) -> dict[str, Any]:
    if quant is not None:
        model.is_quantized = True
        model.quantization_method = quant.quantizer.quant_method
        quant.hooks.preprocess_model(
            quantizer=quant.quantizer,
            model=model,
            device_map=device_map,
            keep_in_fp32_modules=[*keep_fp32, *family_of(model).modules_to_not_convert(model)],
        )
    return resolve_device_map(model, quant, torch_dtype, device_map, max_memory)


def resolve_device_map(
    model: torch.nn.Module,
    quant: _Quantization | None,
    torch_dtype: torch.dtype | None,
    device_map: Any,
    max_memory: Mapping[Any, int | str] | None,
) -> dict[str, Any]:
    """Any accepted device_map form -> {module prefix: device}."""
    if device_map is None:
        return {"": torch.device("cpu")}
    if isinstance(device_map, (int, torch.device)) or (
        isinstance(device_map, str) and device_map not in AUTO_DEVICE_MAPS
    ):
        try:
            return {"": torch.device(device_map)}
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(
                f"device_map {device_map!r} is not a device nor one of {', '.join(AUTO_DEVICE_MAPS)}",
                option="device_map",
            ) from exc
    if isinstance(device_map, Mapping):
        return {name: _device(dev) for name, dev in device_map.items()}
    if isinstance(device_map, str):
        return _auto_device_map(model, quant, torch_dtype or torch.float32, device_map, max_memory)
    raise ConfigError(f"device_map {device_map!r} is not understood", option="device_map")


def _device(value: Any) -> Any:
    if value == "disk":
        raise ConfigError("offloading to 'disk' is not supported; use 'cpu'", option="device_map")
    try:
        return torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device_map entry {value!r} is not a device", option="device_map") from exc


def _auto_device_map(
    model: torch.nn.Module,
    quant: _Quantization | None,
    torch_dtype: torch.dtype,
    strategy: str,
    max_memory: Mapping[Any, int | str] | None,
) -> dict[str, Any]:
    from accelerate.utils import get_balanced_memory, get_max_memory, infer_auto_device_map

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    target_dtype, special_dtypes = torch_dtype, {}
    if quant is not None:
        q, hooks = quant.quantizer, quant.hooks
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
    if quant is not None:
        memory = quant.hooks.adjust_max_memory(quantizer=quant.quantizer, max_memory=memory)
    device_map = infer_auto_device_map(
        model,
        max_memory=memory,
        no_split_module_classes=no_split,
        dtype=target_dtype,
        special_dtypes=special_dtypes,
    )
    logger.info("device_map=%r placed the model as %s", strategy, device_map)
    return {name: _device(dev) for name, dev in device_map.items()}


def target_device(param_name: str, device_map: Mapping[str, Any]) -> torch.device:
    """The device of the longest device_map prefix that contains ``param_name``."""
    name = param_name
    while True:
        if name in device_map:
            return device_map[name]
        if not name:
            raise ConfigError(f"device_map does not place {param_name!r}", option="device_map")
        name = name.rpartition(".")[0]


# --- stage 5 ------------------------------------------------------------------------------------


def load_weights(
    model: torch.nn.Module,
    reader: CheckpointReader,
    quant: _Quantization | None,
    torch_dtype: torch.dtype | None,
    device_map: Mapping[str, Any],
    keep_fp32: Sequence[str],
) -> None:
    from accelerate.utils import set_module_tensor_to_device
    from tqdm.auto import tqdm

    expected = model.state_dict(keep_vars=True)
    groups = _groups(model, reader, quant, expected)
    where = reader.files.location
    if quant is not None:
        q = quant.quantizer
        is_quantized = resolve_hook(quant.hooks.check_if_quantized_param)
        check_shape = resolve_hook(quant.hooks.check_quantized_param_shape)
        create = resolve_hook(quant.hooks.create_quantized_param)

    devices = {name: target_device(name, device_map) for name in groups}
    arriving = stream_tensors(reader, [(key, devices[name]) for name, keys in groups.items() for key in keys])
    loaded: set[str] = set()
    progress = tqdm(total=len(groups), desc="Loading weights", unit="param", disable=None, leave=False)
    for param_name, keys in groups.items():
        tensors = {key: next(arriving) for key in keys}
        value = tensors.get(param_name)
        device = devices[param_name]
        current = expected[param_name]
        if quant is not None and is_quantized(
            quantizer=q, model=model, param_name=param_name, param_value=value, state_dict=tensors
        ):
            if q.pre_quantized and value is not None:
                check_shape(quantizer=q, param_name=param_name, current_param=current, loaded_param=value)
            try:
                create(
                    quantizer=q,
                    model=model,
                    param_name=param_name,
                    param_value=value,
                    target_device=device,
                    state_dict=tensors,
                    metadata=reader.metadata,
                )
            except QcoreError:
                raise
            except Exception as exc:
                raise CorruptCheckpointError(
                    f"{param_name!r} in {reader.file_of(keys[0])} ({where}): backend {q.quant_method!r} "
                    f"could not create the quantized parameter: {type(exc).__name__}: {exc}"
                ) from exc
        else:
            if value is None:
                raise MissingKeysError([param_name], where)
            if value.shape != current.shape:
                raise ShapeMismatchError(
                    f"{param_name!r} in {reader.file_of(param_name)} ({where}) has shape "
                    f"{tuple(value.shape)}, the model expects {tuple(current.shape)}"
                )
            dtype = _load_dtype(param_name, value, torch_dtype, keep_fp32)
            set_module_tensor_to_device(
                model, param_name, device, value=value, dtype=dtype, non_blocking=True, clear_cache=False
            )
        loaded.add(param_name)
        loaded.update(key for key in keys if key in expected)  # e.g. a scale created with its weight
        progress.update()
    progress.close()

    missing = [name for name in expected if name not in loaded]
    missing = family_of(model).tie_weights(model, missing)
    if quant is not None:
        missing = quant.hooks.update_missing_keys(
            quantizer=quant.quantizer, model=model, missing_keys=missing, prefix=""
        )
    if missing:
        raise MissingKeysError(missing, where)


def _groups(
    model: torch.nn.Module,
    reader: CheckpointReader,
    quant: _Quantization | None,
    expected: Mapping[str, Any],
) -> dict[str, list[str]]:
    where = reader.files.location
    if quant is None:
        groups = {key: [key] for key in reader.keys}
    else:
        groups = quant.hooks.group_checkpoint_keys(
            quantizer=quant.quantizer, model=model, checkpoint_keys=reader.keys, metadata=reader.metadata
        )
    grouped = {key for keys in groups.values() for key in keys}
    unexpected = [name for name in groups if name not in expected]
    unexpected += [key for key in reader.keys if key not in grouped]
    if unexpected:
        raise UnexpectedKeysError(unexpected, where)
    absent = [key for keys in groups.values() for key in keys if key not in reader.key_file]
    if absent:
        raise MissingKeysError(absent, where)
    return groups


def _load_dtype(
    name: str, value: torch.Tensor, torch_dtype: torch.dtype | None, keep_fp32: Sequence[str]
) -> torch.dtype:
    if not value.is_floating_point():
        return value.dtype
    if keep_fp32 and module_matches(name.rpartition(".")[0], keep_fp32):
        return torch.float32
    # float8 loads cast each tensor as it arrives: the same result as diffusers' cast after loading.
    return torch_dtype or value.dtype


def _dominant_float_dtype(reader: CheckpointReader) -> torch.dtype | None:
    """The floating dtype holding most elements: what "the checkpoint's dtype" means."""
    counts: dict[torch.dtype, int] = {}
    for key in reader.keys:
        dtype, numel = reader.dtype_and_numel(key)
        if dtype is not None and dtype.is_floating_point:
            counts[dtype] = counts.get(dtype, 0) + numel
    return max(counts, key=counts.__getitem__) if counts else None


# --- stage 6 ------------------------------------------------------------------------------------


def finish(
    model: torch.nn.Module,
    quant: _Quantization | None,
    device_map: Mapping[str, Any],
    torch_dtype: torch.dtype | None,
    name_or_path: str,
) -> None:
    if quant is not None:
        quant.hooks.postprocess_model(quantizer=quant.quantizer, model=model)
    if len(set(map(str, device_map.values()))) > 1:
        from accelerate import dispatch_model

        # As in diffusers: modules mapped to "cpu" stay in RAM and run on the GPU through hooks.
        dispatch_model(model, device_map={k: str(v) for k, v in device_map.items()})
        model.hf_device_map = dict(device_map)
    entries: dict[str, Any] = {"_name_or_path": name_or_path}
    if quant is not None:
        quant.quantizer.pre_quantization_dtype = torch_dtype
        model.hf_quantizer = quant.quantizer
        guard_dtype_casts(model)
        entries["quantization_config"] = quant.quantizer.quantization_config
        entries["_pre_quantization_dtype"] = torch_dtype
    record_load(model, **entries)
    model.eval()
