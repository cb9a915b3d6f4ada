"""from_pretrained: the six stages, in order, each a small function.

0. check     keyword arguments and devices, before any file is read
1. resolve   config.json, pre-quantized detection, config merge, backend, quantizer, plugin manager
2. prepare   validate_environment, update_torch_dtype, update_device_map, low_cpu_mem_usage rules
3. skeleton  the model on the meta device (accelerate.init_empty_weights), size-checked
4. preprocess preprocess_model; automatic device maps through accelerate
5. load      stream tensors shard by shard, group by group, through the per-parameter hooks
6. finish    postprocess_model, dispatch, load record, _pre_quantization_dtype, eval()

Every load has a plugin manager: without a backend, qcore's defaults answer every hook.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

import torch

from ._arguments import check_diffusers_options, one_dtype
from ._bridge import config_dict_from_foreign, is_foreign_config
from ._checkpoint import CheckpointFiles, CheckpointReader, check_value_dtype, locate_checkpoint
from ._config import QuantizationConfig, merge_quantization_configs
from ._configfields import config_faults, differently_typed, size_faults
from ._converters import open_checkpoint
from ._devices import check_devices_exist, resolve_device_map, target_device
from ._errors import (
    ConfigError,
    CorruptCheckpointError,
    MissingKeysError,
    QcoreError,
    ShapeMismatchError,
    UnexpectedKeysError,
)
from ._helpers import get_module_for_param
from ._loadrecord import LoadRecord, attach_load_record
from ._model import family_of, make_model, record_load
from ._noinit import no_init_on_meta
from ._plugins import make_plugin_manager
from ._quantized import guard_dtype_casts
from ._quantizer import Quantizer, module_matches
from ._registry import Backend, resolve_config
from ._streaming import stream_tensors

logger = logging.getLogger("qcore")

M = TypeVar("M", bound=torch.nn.Module)

# The skeleton may hold at most this many elements per checkpoint byte (2-bit packing is 4; slack
# for tied and generated parameters), and this many parameters per checkpoint tensor.
ELEMENTS_PER_CHECKPOINT_BYTE = 16
PARAMETERS_PER_CHECKPOINT_TENSOR = 4
SKELETON_SLACK = 1 << 20


@dataclass(frozen=True)
class Quantization:
    """Stage 1's result: the quantizer (``None`` without a backend) and the load's hook relay."""

    quantizer: Quantizer | None
    hooks: Any  # pluggy.HookRelay: hooks are looked up by name

    @property
    def honours_keep_in_fp32(self) -> bool:
        return self.quantizer is None or self.quantizer.use_keep_in_fp32_modules

    @property
    def pre_quantized(self) -> bool:
        return self.quantizer is not None and self.quantizer.pre_quantized

    @property
    def backend_name(self) -> str:
        return repr(self.quantizer.quant_method) if self.quantizer is not None else "(none)"


@dataclass(frozen=True)
class CheckpointSummary:
    """What the safetensors headers (or .bin state dicts) tell before any tensor is read."""

    tensors: dict[str, torch.Tensor]  # key -> meta tensor of the stored dtype and shape
    dtype: torch.dtype | None  # the floating dtype holding most elements: "the checkpoint's dtype"
    nbytes: int


@overload
def from_pretrained(
    model_cls: type[M],
    pretrained_model_name_or_path: str | os.PathLike[str],
    *,
    output_loading_info: Literal[False] = ...,
    **kwargs: Any,
) -> M: ...


@overload
def from_pretrained(
    model_cls: type[M],
    pretrained_model_name_or_path: str | os.PathLike[str],
    *,
    output_loading_info: Literal[True],
    **kwargs: Any,
) -> tuple[M, dict[str, list[Any]]]: ...


def from_pretrained(
    model_cls: type[M],
    pretrained_model_name_or_path: str | os.PathLike[str],
    *,
    quantization_config: QuantizationConfig | Mapping[str, Any] | None = None,
    torch_dtype: torch.dtype | None = None,
    dtype: torch.dtype | None = None,
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
    force_download: bool = False,
    proxies: Mapping[str, str] | None = None,
    keep_in_fp32_modules: Sequence[str] | None = None,
    observers: Sequence[object] = (),
    output_loading_info: bool = False,
    config: Mapping[str, Any] | str | os.PathLike[str] | None = None,
    **diffusers_options: Any,
) -> M | tuple[M, dict[str, list[Any]]]:
    """Load ``model_cls`` from a local directory or hub id, quantizing on load or reading a
    pre-quantized checkpoint. Keyword arguments mean what they mean in diffusers; ``dtype`` and
    ``torch_dtype`` are the same option. With ``output_loading_info=True`` returns ``(model, info)``
    as diffusers does (qcore raises on missing, unexpected and mismatched keys, so its lists are empty).
    """
    torch_dtype = one_dtype(torch_dtype, dtype)
    check_diffusers_options(diffusers_options)
    check_devices_exist(device_map)
    family = family_of(model_cls)
    files = locate_checkpoint(
        pretrained_model_name_or_path,
        subfolder=subfolder,
        variant=variant,
        use_safetensors=use_safetensors,
        revision=revision,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        token=token,
        force_download=force_download,
        proxies=proxies,
        weights_names=(family.weights_name, family.bin_weights_name),
    )
    config, checkpoint_reader = open_checkpoint(model_cls, files, config, subfolder=subfolder)
    clock = _StageClock()

    with cyclic_gc_paused():
        with checkpoint_reader as reader:  # headers only, until stage 5
            checkpoint = summarize_checkpoint(reader)
            quant = resolve_quantization(config, quantization_config, files, observers)
            clock.lap("resolve")
            torch_dtype = torch_dtype or family.default_dtype(config, checkpoint.dtype)
            torch_dtype, device_map = prepare(quant, torch_dtype, device_map, low_cpu_mem_usage, checkpoint)
            load_dtype = torch_dtype or checkpoint.dtype
            clock.lap("prepare")
            model = build_skeleton(model_cls, config, checkpoint, files.config_source)
            reader = family_of(model).renamed_reader(model, reader)
            clock.lap("skeleton")
            keep_fp32 = keep_in_fp32(model, quant, keep_in_fp32_modules, load_dtype)
            preprocess(model, quant, load_dtype, device_map, keep_fp32, checkpoint)
            placement = resolve_device_map(
                model, quant.quantizer, quant.hooks, load_dtype, device_map, max_memory
            )
            clock.lap("preprocess")
            load_weights(model, reader, quant, torch_dtype, placement, keep_fp32)
            clock.lap("load")
        finish(model, quant, placement, str(pretrained_model_name_or_path))
        clock.lap("finish")
    logger.debug("from_pretrained stage times (s): %s", clock)
    if output_loading_info:
        return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    return model


@contextlib.contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for the load.

    A load allocates some 10^5 Python objects (modules, parameters, quantization states); the
    collections those allocations trigger walk every object the process holds and find next to
    nothing to free (20 objects after a Flux-shaped load). Paused, a pre-quantized Flux-shaped NF4
    load (2,672 tensors) took a median 0.24 s instead of 0.40 s on a CPU.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


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


# --- stage 0: the checkpoint's headers -----------------------------------------------------------


def summarize_checkpoint(reader: CheckpointReader) -> CheckpointSummary:
    tensors: dict[str, torch.Tensor] = {}
    elements: dict[torch.dtype, int] = {}
    nbytes = 0
    for key in reader.keys:
        info = reader.info(key)
        nbytes += info.nbytes
        if info.torch_dtype is None:
            continue  # a dtype torch cannot hold: reading the tensor names it
        tensors[key] = torch.empty(info.torch_shape, dtype=info.torch_dtype, device="meta")
        if info.torch_dtype.is_floating_point:
            elements[info.torch_dtype] = elements.get(info.torch_dtype, 0) + info.numel
    dominant = max(elements, key=elements.__getitem__) if elements else None
    return CheckpointSummary(tensors, dominant, nbytes)


# --- stage 1 ------------------------------------------------------------------------------------


def resolve_quantization(
    config: Mapping[str, Any],
    user_config: QuantizationConfig | Mapping[str, Any] | None,
    files: CheckpointFiles,
    observers: Sequence[object],
) -> Quantization:
    quantizer = make_quantizer(config.get("quantization_config"), user_config, files.config_source)
    pm = make_plugin_manager(quantizer, observers)
    if quantizer is not None:
        state = "pre-quantized" if quantizer.pre_quantized else "on load"
        logger.info("quantizing with %r (%s)", quantizer.quant_method, state)
    return Quantization(quantizer, pm.hook)


def make_quantizer(
    checkpoint_config: Any,
    user_config: QuantizationConfig | Mapping[str, Any] | None,
    config_path: Path,
) -> Quantizer | None:
    """The load's quantizer: the checkpoint's config (merged with the user's), else the user's."""
    if is_foreign_config(user_config):  # a diffusers/transformers config object
        user_config = config_dict_from_foreign(user_config)
    if isinstance(user_config, QuantizationConfig):
        user_config = copy.deepcopy(user_config)  # the user's object is never mutated
    if checkpoint_config is not None:
        resolved, backend = _checkpoint_quantization(checkpoint_config, user_config, config_path)
        return backend.quantizer_class(resolved, pre_quantized=True)
    if user_config is None:
        return None
    resolved, backend = resolve_config(user_config)
    _check_quantizes_on_load(backend)
    return backend.quantizer_class(resolved, pre_quantized=False)


def _checkpoint_quantization(
    checkpoint_config: Any, user_config: QuantizationConfig | Mapping[str, Any] | None, config_path: Path
) -> tuple[QuantizationConfig, Backend]:
    if not isinstance(checkpoint_config, Mapping):
        raise ConfigError(f"{config_path}: quantization_config must be an object")
    resolved, backend = resolve_config(checkpoint_config, checkpoint=str(config_path))
    if user_config is None:
        return resolved, backend
    user_resolved, _ = resolve_config(user_config)
    return merge_quantization_configs(resolved, user_resolved), backend


def _check_quantizes_on_load(backend: Backend) -> None:
    if backend.quantizer_class.requires_calibration:
        raise ConfigError(
            f"backend {backend.quant_method!r} needs calibration data: it loads checkpoints quantized by "
            "its own tools, and cannot quantize on load. Quantize the model with that backend's tool "
            "first, then load the result without quantization_config.",
            option="quantization_config",
        )


# --- stage 2 ------------------------------------------------------------------------------------


def prepare(
    quant: Quantization,
    torch_dtype: torch.dtype | None,
    device_map: Any,
    low_cpu_mem_usage: bool | None,
    checkpoint: CheckpointSummary,
) -> tuple[torch.dtype | None, Any]:
    q, hooks, stored = quant.quantizer, quant.hooks, checkpoint.dtype
    if q is not None:
        _check_quantized_load_options(q, low_cpu_mem_usage)
    hooks.validate_environment(
        quantizer=q, torch_dtype=torch_dtype, device_map=device_map, checkpoint_dtype=stored
    )
    torch_dtype = hooks.update_torch_dtype(quantizer=q, torch_dtype=torch_dtype, checkpoint_dtype=stored)
    device_map = hooks.update_device_map(quantizer=q, device_map=device_map)
    check_devices_exist(device_map)  # the backend may have chosen another map
    if q is not None:
        q.pre_quantization_dtype = torch_dtype or stored  # known from the headers, before any tensor is read
    return torch_dtype, device_map


def _check_quantized_load_options(quantizer: Quantizer, low_cpu_mem_usage: bool | None) -> None:
    if low_cpu_mem_usage is False:
        raise ConfigError(
            "low_cpu_mem_usage=False cannot be used with quantization: quantized weights are created "
            "as they load. Drop the argument.",
            option="low_cpu_mem_usage",
        )


# --- stage 3 ------------------------------------------------------------------------------------


def build_skeleton(
    model_cls: type[M], config: Mapping[str, Any], checkpoint: CheckpointSummary, config_path: Path
) -> M:
    from accelerate import init_empty_weights

    try:
        with init_empty_weights(), no_init_on_meta(), _skeleton_budget(checkpoint, config_path):
            return make_model(model_cls, config)  # type: ignore[return-value]
    except _SkeletonTooLarge as exc:
        faults = config_faults(model_cls, config, max_size=_max_skeleton_elements(checkpoint))
        if not faults:
            raise CorruptCheckpointError(f"{exc}; the config does not belong to these weights") from exc
        raise CorruptCheckpointError(f"{exc}: {_correct(faults, config_path)}") from exc
    except QcoreError:
        raise
    except (TypeError, ValueError, RuntimeError, MemoryError, OverflowError) as exc:
        faults = config_faults(model_cls, config, max_size=_max_skeleton_elements(checkpoint))
        faults = faults or differently_typed(model_cls, config)
        if not faults:
            raise CorruptCheckpointError(
                f"{config_path}: cannot build {model_cls.__name__} from this config "
                f"({type(exc).__name__}: {exc}); the config does not belong to this model class"
            ) from exc
        raise CorruptCheckpointError(
            f"{config_path}: cannot build {model_cls.__name__} from this config: {'; '.join(faults)} "
            f"({type(exc).__name__}: {exc}). {_correct([], config_path)}"
        ) from exc


def _correct(faults: Sequence[str], config_path: Path) -> str:
    """What to do about ``faults`` (descriptions of config fields): correct them."""
    shown = f"{'; '.join(faults)}. " if faults else ""
    return (
        f"{shown}Correct {config_path.name} (compare it with the config the model's publisher gives), "
        "or load the weights with the model class and config they were saved with"
    )


class _SkeletonTooLarge(CorruptCheckpointError):
    pass


def _max_skeleton_elements(checkpoint: CheckpointSummary) -> int:
    return ELEMENTS_PER_CHECKPOINT_BYTE * checkpoint.nbytes + SKELETON_SLACK


@contextlib.contextmanager
def _skeleton_budget(checkpoint: CheckpointSummary, config_path: Path) -> Iterator[None]:
    """Stop building a skeleton far larger than the checkpoint's weights (a config that does not
    belong to them, or a hostile one: ``num_layers=10**7`` would otherwise build for minutes)."""
    max_elements = _max_skeleton_elements(checkpoint)
    max_parameters = PARAMETERS_PER_CHECKPOINT_TENSOR * len(checkpoint.tensors) + 1024
    seen = {"parameters": 0, "elements": 0}
    register = (
        torch.nn.Module.register_parameter
    )  # accelerate's meta-device version, inside init_empty_weights

    def counting_register(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        if param is None:
            return
        seen["parameters"] += 1
        seen["elements"] += param.numel()
        if seen["parameters"] > max_parameters or seen["elements"] > max_elements:
            raise _SkeletonTooLarge(
                f"{config_path}: the config describes a model larger than its checkpoint can fill (more "
                f"than {seen['parameters']:,} parameters / {seen['elements']:,} elements for "
                f"{len(checkpoint.tensors):,} tensors of {checkpoint.nbytes:,} bytes)"
            )

    torch.nn.Module.register_parameter = counting_register  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]


# --- stage 4 ------------------------------------------------------------------------------------


def keep_in_fp32(
    model: torch.nn.Module,
    quant: Quantization,
    requested: Sequence[str] | None,
    torch_dtype: torch.dtype | None,
) -> list[str]:
    if requested is not None:
        return list(requested)
    if not quant.honours_keep_in_fp32:
        return []
    return family_of(model).fp32_modules(model, torch_dtype)


def preprocess(
    model: torch.nn.Module,
    quant: Quantization,
    torch_dtype: torch.dtype | None,
    device_map: Any,
    keep_fp32: list[str],
    checkpoint: CheckpointSummary,
) -> None:
    if quant.quantizer is not None:
        model.is_quantized = True
        model.quantization_method = quant.quantizer.quant_method
    quant.hooks.preprocess_model(
        quantizer=quant.quantizer,
        model=model,
        device_map=device_map,
        keep_in_fp32_modules=[*keep_fp32, *family_of(model).modules_to_not_convert(model)],
        torch_dtype=torch_dtype,
        checkpoint_tensors=checkpoint.tensors,
    )


# --- stage 5 ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Load:
    """What every parameter group of stage 5 needs."""

    model: torch.nn.Module
    reader: CheckpointReader
    quant: Quantization
    torch_dtype: torch.dtype | None
    keep_fp32: Sequence[str]
    expected: Mapping[str, torch.Tensor]  # model.state_dict(keep_vars=True) after preprocess_model

    @property
    def where(self) -> str:
        return self.reader.files.location

    @property
    def weights(self) -> str:
        """Where a key the model needs should be: the index of a sharded checkpoint (it lists every
        key), else its one weight file."""
        files = self.reader.files
        if files.index_path is not None:
            return str(files.index_path)
        return str(files.weight_files[0]) if len(files.weight_files) == 1 else files.location

    def files_of(self, keys: Iterable[str]) -> str:
        """The files holding ``keys`` (those of them the checkpoint has)."""
        key_file = self.reader.key_file
        paths = sorted({str(key_file[key]) for key in keys if key in key_file})
        return ", ".join(paths) if paths else self.weights


def load_weights(
    model: torch.nn.Module,
    reader: CheckpointReader,
    quant: Quantization,
    torch_dtype: torch.dtype | None,
    device_map: Mapping[str, torch.device],
    keep_fp32: Sequence[str],
) -> None:
    try:
        _load_weights(model, reader, quant, torch_dtype, device_map, keep_fp32)
    except (MissingKeysError, UnexpectedKeysError, ShapeMismatchError) as exc:
        blame_config_sizes(exc, model, reader.files.config_source)
        raise


def blame_config_sizes(exc: QcoreError, model: torch.nn.Module, config_path: Path) -> None:
    """Name the config fields behind a model that does not fit its weights, where a size or count in
    the config is zero or negative (``depth=0`` builds no blocks, so every block's key is unexpected)."""
    try:
        config = family_of(model).config_dict(model)
    except Exception:  # a diagnosis: the error being raised matters more
        return
    faults = size_faults(type(model), config)
    if faults and len(exc.args) == 1:
        exc.args = (
            f"{str(exc).rstrip('.')}. {config_path} may be at fault: {_correct(faults, config_path)}",
        )


def _load_weights(
    model: torch.nn.Module,
    reader: CheckpointReader,
    quant: Quantization,
    torch_dtype: torch.dtype | None,
    device_map: Mapping[str, torch.device],
    keep_fp32: Sequence[str],
) -> None:
    from tqdm.auto import tqdm

    load = _Load(model, reader, quant, torch_dtype, keep_fp32, model.state_dict(keep_vars=True))
    groups = group_keys(load)
    devices = {name: target_device(name, device_map) for name in groups}
    order = [(key, devices[name]) for name, keys in groups.items() for key in keys]
    # Quantizing on load allocates what the backend makes of each weight, not what the file holds.
    keeps_bytes_as_read = quant.quantizer is None or quant.pre_quantized
    arriving = stream_tensors(reader, order, reserve_gpu_memory=keeps_bytes_as_read)
    loaded: set[str] = set()
    with tqdm(total=len(groups), desc="Loading weights", unit="param", disable=None, leave=False) as progress:
        for param_name, keys in groups.items():
            tensors = {key: next(arriving) for key in keys}
            load_group(load, param_name, tensors, devices[param_name])
            loaded.add(param_name)
            loaded.update(key for key in keys if key in load.expected)  # e.g. a scale created with its weight
            progress.update()
    check_missing(load, [name for name in load.expected if name not in loaded])


def group_keys(load: _Load) -> dict[str, list[str]]:
    """The backend's (or the default one-key) groups, checked against the model and the files."""
    reader, quant = load.reader, load.quant
    try:
        groups = quant.hooks.group_checkpoint_keys(
            quantizer=quant.quantizer, model=load.model, checkpoint_keys=reader.keys, metadata=reader.metadata
        )
    except QcoreError as exc:  # a backend reading the files' metadata knows no file names
        name_paths(exc, metadata_files(reader))
        raise
    grouped = {key for keys in groups.values() for key in keys}
    unexpected = [name for name in groups if name not in load.expected]
    unexpected += [key for key in reader.keys if key not in grouped]
    if unexpected:
        raise UnexpectedKeysError(unexpected, load.files_of(unexpected))
    absent = [key for keys in groups.values() for key in keys if key not in reader.key_file]
    if absent:
        raise MissingKeysError(absent, load.weights)
    return groups


def metadata_files(reader: CheckpointReader) -> list[str]:
    """The weight files whose safetensors metadata a backend read: those with any, else all."""
    headers = getattr(reader, "headers", None) or {}
    with_metadata = [path for path, header in headers.items() if header.metadata]
    return [str(path) for path in with_metadata or reader.files.weight_files]


def load_group(load: _Load, param_name: str, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    quant = load.quant
    value = tensors.get(param_name)
    claimed = quant.hooks.check_if_quantized_param(
        quantizer=quant.quantizer,
        model=load.model,
        param_name=param_name,
        param_value=value,
        state_dict=tensors,
    )
    if claimed:
        create_quantized(load, param_name, tensors, device)
    else:
        set_plain(load, param_name, value, device)


def create_quantized(
    load: _Load, param_name: str, tensors: dict[str, torch.Tensor], device: torch.device
) -> None:
    quant, reader = load.quant, load.reader
    value = tensors.get(param_name)
    if quant.pre_quantized and value is not None:
        check_quantized_shape(load, param_name, value)
    elif value is not None:  # quantizing on load: float weights of the parameter's shape, as diffusers checks
        check_value_dtype(param_name, value, torch.float32, str(reader.key_file[param_name]))
        if value.shape != load.expected[param_name].shape:
            raise ShapeMismatchError(
                f"{param_name!r} in {reader.file_of(param_name)} ({load.where}) has shape "
                f"{tuple(value.shape)}, the model expects {tuple(load.expected[param_name].shape)}"
            )
    try:
        quant.hooks.create_quantized_param(
            quantizer=quant.quantizer,
            model=load.model,
            param_name=param_name,
            param_value=value,
            target_device=device,
            state_dict=tensors,
            metadata=reader.metadata,
        )
    except QcoreError as exc:
        name_the_files(exc, reader, tensors)
        raise
    except Exception as exc:
        raise CorruptCheckpointError(
            f"{param_name!r} in {reader.file_of(next(iter(tensors)))} ({load.where}): backend "
            f"{quant.backend_name} could not create the quantized parameter: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def name_the_files(exc: QcoreError, reader: CheckpointReader, keys: Iterable[str]) -> None:
    """Put the files of ``keys`` in front of a backend's error that names none of them: backends know the
    tensor at fault, only the loader knows the file it came from."""
    name_paths(exc, sorted({str(reader.key_file[key]) for key in keys if key in reader.key_file}))


def name_paths(exc: QcoreError, paths: Sequence[str]) -> None:
    message = str(exc)
    plain = len(exc.args) == 1 and exc.args[0] == message  # errors that format their own text are left
    if paths and plain and not any(Path(path).name in message for path in paths):
        # Backends say "the checkpoint" where they cannot name the file: the file replaces it.
        message = message.removeprefix("the checkpoint: ")
        exc.args = (f"{', '.join(paths)}: {message}",)


def check_quantized_shape(load: _Load, param_name: str, value: torch.Tensor) -> None:
    quant = load.quant
    fits = quant.hooks.check_quantized_param_shape(
        quantizer=quant.quantizer,
        param_name=param_name,
        current_param=load.expected[param_name],
        loaded_param=value,
    )
    if fits is False:
        raise ShapeMismatchError(
            f"{param_name!r} in {load.reader.file_of(param_name)} ({load.where}) has shape "
            f"{tuple(value.shape)}, which backend {quant.backend_name} cannot turn into the "
            f"model's {tuple(load.expected[param_name].shape)}"
        )


def set_plain(load: _Load, param_name: str, value: torch.Tensor | None, device: torch.device) -> None:
    from accelerate.utils import set_module_tensor_to_device

    if value is None:
        raise MissingKeysError([param_name], load.weights)
    current = load.expected[param_name]
    if value.shape != current.shape:
        raise ShapeMismatchError(
            f"{param_name!r} in {load.reader.file_of(param_name)} ({load.where}) has shape "
            f"{tuple(value.shape)}, the model expects {tuple(current.shape)}"
        )
    check_value_dtype(param_name, value, current.dtype, str(load.reader.key_file[param_name]))
    dtype = _load_dtype(param_name, value, load.torch_dtype, load.keep_fp32)
    module, tensor_name = get_module_for_param(load.model, param_name)
    if (
        type(current) is torch.nn.Parameter
        and not current.__dict__
        and module._parameters.get(tensor_name) is current
        and value.dtype == dtype
        and value.device == device
    ):
        # What accelerate's set_module_tensor_to_device does for a plain parameter that needs no cast
        # or move, without its per-call checks (a few hundred microseconds per parameter).
        module._parameters[tensor_name] = torch.nn.Parameter(value, requires_grad=current.requires_grad)
        return
    set_module_tensor_to_device(
        load.model, param_name, device, value=value, dtype=dtype, non_blocking=True, clear_cache=False
    )


def check_missing(load: _Load, missing: list[str]) -> None:
    quant = load.quant
    missing = family_of(load.model).tie_weights(load.model, missing)
    missing = quant.hooks.update_missing_keys(
        quantizer=quant.quantizer, model=load.model, missing_keys=missing, prefix=""
    )
    if missing:
        raise MissingKeysError(missing, load.weights)


def _load_dtype(
    name: str, value: torch.Tensor, torch_dtype: torch.dtype | None, keep_fp32: Sequence[str]
) -> torch.dtype:
    if not value.is_floating_point():
        return value.dtype
    # Whole parameter name, as diffusers matches: keeps parameters such as Wan's scale_shift_table too.
    if keep_fp32 and module_matches(name, keep_fp32):
        return torch.float32
    # float8 loads cast each tensor as it arrives: the same result as diffusers' cast after loading.
    return torch_dtype or value.dtype


# --- stage 6 ------------------------------------------------------------------------------------


def finish(
    model: torch.nn.Module,
    quant: Quantization,
    device_map: Mapping[str, torch.device],
    name_or_path: str,
) -> None:
    quant.hooks.postprocess_model(quantizer=quant.quantizer, model=model)
    if len(set(map(str, device_map.values()))) > 1:
        from accelerate import dispatch_model

        # As in diffusers: modules mapped to "cpu" stay in RAM and run on the GPU through hooks.
        dispatch_model(model, device_map={k: str(v) for k, v in device_map.items()})
        model.hf_device_map = dict(device_map)
    record_load(model, _name_or_path=name_or_path)
    if quant.quantizer is not None:
        record_quantized_load(model, LoadRecord(quant.quantizer, quant.hooks))
    model.eval()


def record_quantized_load(model: torch.nn.Module, record: LoadRecord) -> None:
    quantizer = record.quantizer
    model.hf_quantizer = quantizer  # where diffusers and transformers look
    attach_load_record(model, record)
    guard_dtype_casts(model)
    record_load(
        model,
        quantization_config=quantizer.quantization_config,
        _pre_quantization_dtype=quantizer.pre_quantization_dtype,
    )
