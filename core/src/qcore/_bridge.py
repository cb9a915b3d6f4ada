"""The bridge between qcore backends and diffusers' / transformers' own loaders, both ways.

:func:`enable_bridge` registers every installed qcore backend in diffusers' and transformers'
quantizer tables, so ``FluxTransformer2DModel.from_pretrained(..., quantization_config=Int8Config())``,
``DiffusionPipeline.from_pretrained(...)`` and transformers' ``from_pretrained`` load through the
backend's qcore hooks. :func:`config_dict_from_foreign` is the other direction: it turns a diffusers
or transformers config object into the dict a qcore backend reads.

diffusers and transformers are imported only here, and only when the bridge is enabled.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from ._checkpoint import aligned, read_safetensors_header
from ._config import QuantizationConfig
from ._errors import (
    ConfigError,
    CorruptCheckpointError,
    MissingKeysError,
    QcoreError,
    QuantizerEnvironmentError,
    ShapeMismatchError,
    UnexpectedKeysError,
)
from ._helpers import release_of
from ._loadrecord import LoadRecord, attach_load_record
from ._plugins import make_plugin_manager
from ._quantizer import Quantizer
from ._registry import Backend, available_backends, get_backend

logger = logging.getLogger("qcore")

#: The library versions the bridge accepts, as release-number prefixes (diffusers 0.42.x, transformers 5.x).
SUPPORTED_VERSIONS: dict[str, tuple[tuple[int, ...], ...]] = {
    "diffusers": ((0, 42),),
    "transformers": ((5,),),
}

#: The release each library's bridge is tested against; another accepted release loads with a warning,
#: since the quantizer interface of a minor release can change without a major version.
TESTED_VERSIONS: dict[str, tuple[int, ...]] = {
    "diffusers": (0, 42),
    "transformers": (5, 23),
}

# The names diffusers and transformers file a quant_method under, where they differ from it.
_LIBRARY_KEYS: dict[str, tuple[str, ...]] = {"bitsandbytes": ("bitsandbytes_4bit", "bitsandbytes_8bit")}

# (library, quant_method) pairs a library will not hand to another config class, with the reason.
_UNSERVABLE: dict[tuple[str, str], str] = {
    ("transformers", "bitsandbytes"): "transformers accepts only its own BitsAndBytesConfig for it",
}

# Fields transformers' config objects write that qcore backends do not have, with the value that
# means "nothing to do"; any other value is a request qcore cannot honour, so it is an error.
_KNOWN_EXTRAS: dict[str, Any] = {"include_input_output_embeddings": False, "untie_embedding_weights": False}


# --- the reverse direction: foreign config objects ---------------------------------------------


def is_foreign_config(obj: Any) -> bool:
    """Whether ``obj`` is a diffusers or transformers quantization config object (duck-typed)."""
    module = type(obj).__module__ or ""
    return (
        not isinstance(obj, (QuantizationConfig, Mapping))
        and module.split(".")[0] in ("diffusers", "transformers")
        and callable(getattr(obj, "to_dict", None))
        and getattr(obj, "quant_method", None) is not None
    )


def config_dict_from_foreign(obj: Any) -> dict[str, Any]:
    """The ``to_dict()`` of a diffusers/transformers config, in the form qcore backends read.

    ``quant_method`` becomes a plain string; the fields transformers adds for features qcore has
    not (``include_input_output_embeddings``, ``untie_embedding_weights``) are dropped when they
    have their "off" value and refused with a :class:`qcore.ConfigError` otherwise.
    """
    name = type(obj).__qualname__
    try:
        data = dict(obj.to_dict())
    except Exception as exc:  # a third party's to_dict
        raise ConfigError(
            f"quantization_config {name}.to_dict() failed: {type(exc).__name__}: {exc}",
            option="quantization_config",
        ) from exc
    method = data.get("quant_method", getattr(obj, "quant_method", None))
    data["quant_method"] = str(getattr(method, "value", method))
    for key, off in _KNOWN_EXTRAS.items():
        if key not in data:
            continue
        value = data.pop(key)
        if value != off:
            raise ConfigError(
                f"quantization_config {name} sets {key}={value!r}, which qcore backends do not support; "
                f"leave {key} at {off!r} or load with transformers' own quantizer",
                option=key,
            )
    return data


# --- enabling -----------------------------------------------------------------------------------


@dataclass
class BridgeState:
    """What :func:`enable_bridge` did: per library, the quant_methods now served by qcore backends and
    those left to the library's own backend."""

    served: dict[str, list[str]] = field(default_factory=dict)
    kept_native: dict[str, list[str]] = field(default_factory=dict)
    # What disable_bridge runs, last first.
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)


_ABSENT = object()
_state: BridgeState | None = None


def _dotted(release: tuple[int, ...]) -> str:
    return ".".join(map(str, release))


def check_library_version(library: str) -> str:
    """The installed version of ``library``; a :class:`qcore.QuantizerEnvironmentError` if unsupported.

    A supported version other than the tested one (:data:`TESTED_VERSIONS`) is logged as a warning.
    """
    installed = version(library)
    have = release_of(installed)
    supported, tested = SUPPORTED_VERSIONS[library], _dotted(TESTED_VERSIONS[library])
    if have is None or not any(have[: len(prefix)] == prefix for prefix in supported):
        wanted = " or ".join(_dotted(prefix) + ".x" for prefix in supported)
        raise QuantizerEnvironmentError(
            f"qcore's bridge supports {library} {wanted} (tested with {library} {tested}), but {library} "
            f"{installed} is installed; its quantizer interface may differ. Install {library} {tested}, or "
            "load with qcore.from_pretrained instead of enabling the bridge"
        )
    if have[: len(TESTED_VERSIONS[library])] != TESTED_VERSIONS[library]:
        logger.warning(
            "bridge: %s %s is accepted but not tested; the bridge is tested with %s %s, and another "
            "release's loader may call the quantizer differently",
            library,
            installed,
            library,
            tested,
        )
    return installed


def _installed(library: str) -> bool:
    try:
        version(library)
    except PackageNotFoundError:
        return False
    return True


def _backends(quant_methods: Iterable[str] | None) -> list[Backend]:
    if quant_methods is not None:
        return [get_backend(name) for name in quant_methods]
    backends = []
    for info in available_backends():
        if info.status == "ok":
            backends.append(get_backend(info.quant_method))
        elif info.status == "failed":
            logger.warning("bridge: backend %r is not served: %s", info.quant_method, info.error)
    return backends


def enable_bridge(
    *,
    override: bool | str | Sequence[str] = False,
    libraries: Sequence[str] | None = None,
    quant_methods: Sequence[str] | None = None,
) -> BridgeState:
    """Let diffusers' and transformers' ``from_pretrained`` load with every installed qcore backend.

    After ``qcore.enable_bridge()``, a qcore config passed as ``quantization_config`` to a diffusers
    model, a ``DiffusionPipeline`` (through ``PipelineQuantizationConfig``) or a transformers model,
    and a checkpoint whose config.json names a qcore backend's ``quant_method``, load through that
    backend's hooks.

    Args:
        override: a quant_method diffusers or transformers already has (``bitsandbytes``,
            ``torchao``, ...) stays theirs unless named here (``True``: all of them).
        libraries: ``("diffusers", "transformers")`` by default, each only if installed; a library
            named here must be installed.
        quant_methods: the backends to serve (default: every backend qcore can load).

    Raises :class:`qcore.QuantizerEnvironmentError` for a library version the bridge does not know
    (diffusers 0.42.x and transformers 5.x are accepted; it is tested with diffusers 0.42 and
    transformers 5.23, and another accepted release is logged as a warning). Calling it again replaces
    the previous registration; :func:`disable_bridge` undoes it.
    """
    global _state
    wanted = (
        list(libraries) if libraries is not None else [lib for lib in SUPPORTED_VERSIONS if _installed(lib)]
    )
    for library in wanted:
        if library not in SUPPORTED_VERSIONS:
            raise ConfigError(
                f"libraries={list(wanted)!r}: the bridge serves {', '.join(SUPPORTED_VERSIONS)}",
                option="libraries",
            )
        if not _installed(library):
            raise QuantizerEnvironmentError(
                f"enable_bridge(libraries=...) names {library}, which is not installed"
            )
        check_library_version(library)
    backends = _backends(quant_methods)
    disable_bridge()
    state = BridgeState()
    for library in wanted:
        _register(library, backends, override, state)
    _state = state
    logger.info("bridge enabled: %s; left to the library's own backend: %s", state.served, state.kept_native)
    return state


def disable_bridge() -> None:
    """Undo :func:`enable_bridge`: diffusers' and transformers' tables are as they were before it."""
    global _state
    if _state is None:
        return
    for undo in reversed(_state._undo):
        undo()
    _state = None


def _set_item(state: BridgeState, mapping: dict[str, Any], key: str, value: Any) -> None:
    previous = mapping.get(key, _ABSENT)
    mapping[key] = value
    state._undo.append(
        lambda: mapping.pop(key, None) if previous is _ABSENT else mapping.__setitem__(key, previous)
    )


def _give_method_a_value(state: BridgeState, config_class: type[QuantizationConfig]) -> None:
    """diffusers reads ``quantization_config.quant_method.value`` of the user's config object (its
    methods are enums); a str subclass answers it and is equal to the plain string everywhere else."""
    method = config_class.__dict__.get("quant_method")
    if type(method) is not str:
        return
    config_class.quant_method = _MethodName(method)
    state._undo.append(lambda: setattr(config_class, "quant_method", method))


def _tables(library: str) -> tuple[dict[str, Any], dict[str, Any], type]:
    if library == "diffusers":
        from diffusers.quantizers import auto

        return auto.AUTO_QUANTIZER_MAPPING, auto.AUTO_QUANTIZATION_CONFIG_MAPPING, diffusers_adapter_base()
    from transformers.quantizers import auto as t_auto

    return t_auto.AUTO_QUANTIZER_MAPPING, t_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, transformers_adapter_base()


def _register(
    library: str, backends: list[Backend], override: bool | str | Sequence[str], state: BridgeState
) -> None:
    quantizers, configs, base = _tables(library)
    served, kept = state.served.setdefault(library, []), state.kept_native.setdefault(library, [])
    for backend in backends:
        method = backend.quant_method
        keys = _LIBRARY_KEYS.get(method, (method,))
        native = any(key in quantizers or key in configs for key in keys)
        overridden = override is True or (
            not isinstance(override, bool)
            and method in ([override] if isinstance(override, str) else override)
        )
        reason = _UNSERVABLE.get((library, method))
        if reason is not None:
            if overridden:
                logger.warning("bridge: %s keeps its own %r backend: %s", library, method, reason)
            kept.append(method)
            continue
        if native and not overridden:
            kept.append(method)
            continue
        adapter = type(
            f"Qcore{library.capitalize()}Quantizer_{method}",
            (base,),
            {"qcore_backend": backend, "__module__": __name__},
        )
        for key in keys:
            _set_item(state, quantizers, key, adapter)
            _set_item(state, configs, key, backend.config_class)
        _give_method_a_value(state, backend.config_class)
        served.append(method)


# --- what both adapters share --------------------------------------------------------------------


class _MethodName(str):
    """A quant_method string that also answers ``.value``, as the libraries' enums do."""

    @property
    def value(self) -> str:
        return str(self)


class LibraryConfigView:
    """A qcore config as diffusers/transformers read ``hf_quantizer.quantization_config``."""

    def __init__(self, config: QuantizationConfig) -> None:
        self.qcore_config = config
        self.quant_method = _MethodName(config.quant_method)

    def to_dict(self) -> dict[str, Any]:
        return self.qcore_config.to_dict()

    def to_json_string(self, use_diff: bool = True) -> str:
        return self.qcore_config.to_json_string(use_diff=use_diff)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.qcore_config, name)

    def __repr__(self) -> str:
        return repr(self.qcore_config)


class _QcoreDriver:
    """A qcore quantizer with its own plugin manager, driven from a library's loader."""

    qcore_backend: Backend

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        # A deep copy of a model loaded through the bridge (an EMA copy) gets its own quantizer, and a plugin
        # manager with it: plugin managers hold modules, which cannot be copied.
        clone = copy.copy(self)
        memo[id(self)] = clone
        for name, value in self.__dict__.items():
            if name not in ("plugins", "hooks"):
                clone.__dict__[name] = copy.deepcopy(value, memo)
        if "qcore" in self.__dict__:
            clone.plugins = make_plugin_manager(clone.qcore)
            clone.hooks = clone.plugins.hook
        return clone

    @property
    def is_trainable(self) -> bool:
        return self.qcore.is_trainable

    @property
    def is_compileable(self) -> bool:
        return self.qcore.is_compileable

    def _dequantize(self, model: torch.nn.Module, dtype: Any = None) -> torch.nn.Module:
        """Both libraries' dequantize step (transformers also passes a dtype): the backend's hook."""
        return self.hooks.dequantize(quantizer=self.qcore, model=model)

    def _start(self, config: Any, pre_quantized: bool) -> QuantizationConfig:
        backend = self.qcore_backend
        if isinstance(config, LibraryConfigView):
            config = config.qcore_config
        if isinstance(config, Mapping):
            config = backend.config_class.from_dict(config)
        elif is_foreign_config(config):
            config = backend.config_class.from_dict(config_dict_from_foreign(config))
        if not isinstance(config, backend.config_class):
            raise ConfigError(
                f"quantization_config is a {type(config).__qualname__}; the qcore backend for "
                f"{backend.quant_method!r} reads {backend.config_class.__qualname__}",
                option="quantization_config",
            )
        if not pre_quantized and backend.quantizer_class.requires_calibration:
            raise ConfigError(
                f"backend {backend.quant_method!r} reads only pre-quantized checkpoints",
                option="quantization_config",
            )
        config = copy.deepcopy(config)  # the user's object is never mutated
        self.qcore: Quantizer = backend.quantizer_class(config, pre_quantized=pre_quantized)
        self.plugins = make_plugin_manager(self.qcore)
        self.hooks = self.plugins.hook
        self.qcore_model: torch.nn.Module | None = None
        self.qcore_torch_dtype: torch.dtype | None = None
        self.qcore_device_map: Any = None
        return config

    def _quantize_group(
        self,
        model: torch.nn.Module,
        param_name: str,
        tensors: Mapping[str, torch.Tensor],
        device: torch.device,
        metadata: Mapping[str, str],
    ) -> bool:
        """Run the per-parameter hooks on one group; False when the backend leaves it to the library."""
        q, hooks = self.qcore, self.hooks
        # diffusers, transformers and safe_open give memory-mapped views of safetensors files, which start
        # wherever the file puts a tensor; CPU kernels such as torch._weight_int8pack_mm crash on data not
        # aligned to 64 bytes.
        tensors = {key: aligned(tensor) for key, tensor in tensors.items()}
        value = tensors.get(param_name)
        if not hooks.check_if_quantized_param(
            quantizer=q, model=model, param_name=param_name, param_value=value, state_dict=tensors
        ):
            return False
        if q.pre_quantized and value is not None:
            module_name, _, tensor_name = param_name.rpartition(".")
            current = getattr(model.get_submodule(module_name), tensor_name, None)
            if isinstance(current, torch.Tensor) and not hooks.check_quantized_param_shape(
                quantizer=q, param_name=param_name, current_param=current, loaded_param=value
            ):
                raise ShapeMismatchError(
                    f"{param_name!r}: the checkpoint stores shape {tuple(value.shape)}, which backend "
                    f"{q.quant_method!r} does not accept for the model's {tuple(current.shape)}"
                )
        try:
            hooks.create_quantized_param(
                quantizer=q,
                model=model,
                param_name=param_name,
                param_value=value,
                target_device=device,
                state_dict=tensors,
                metadata=metadata,
            )
        except QcoreError:
            raise
        except Exception as exc:
            raise CorruptCheckpointError(
                f"{param_name!r}: backend {q.quant_method!r} could not create the quantized parameter: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        return True


def _device_of(param_name: str, device_map: Any) -> torch.device:
    if device_map is None:
        return torch.device("cpu")
    if not isinstance(device_map, Mapping):
        return torch.device(device_map)
    name = param_name
    while True:
        if name in device_map:
            return torch.device(device_map[name])
        if not name:
            return torch.device("cpu")
        name = name.rpartition(".")[0]


@dataclass
class _Headers:
    """What the safetensors headers of a library's checkpoint files tell, before any tensor is read."""

    metadata: dict[str, str] = field(default_factory=dict)
    key_file: dict[str, str] = field(default_factory=dict)
    #: every key as a meta tensor of its stored dtype and shape (``preprocess_model``'s checkpoint_tensors)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype | None:
        """The floating dtype holding most elements: what "the checkpoint's dtype" means."""
        counts: dict[torch.dtype, int] = {}
        for tensor in self.tensors.values():
            if tensor.is_floating_point():
                counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
        return max(counts, key=counts.__getitem__) if counts else None


def _read_headers(files: Sequence[Any]) -> _Headers:
    headers = _Headers()
    for path in files:
        if not isinstance(path, (str, os.PathLike)) or not str(path).endswith(".safetensors"):
            continue  # .bin files and in-memory state dicts carry no header
        header = read_safetensors_header(Path(path))
        headers.metadata.update(header.metadata)
        for key, info in header.tensors.items():
            headers.key_file[key] = str(path)
            if info.torch_dtype is not None:
                headers.tensors[key] = torch.empty(info.torch_shape, dtype=info.torch_dtype, device="meta")
    return headers


# --- diffusers ----------------------------------------------------------------------------------

_diffusers_base: type | None = None


def diffusers_adapter_base() -> type:
    """The DiffusersQuantizer subclass every bridged backend's diffusers quantizer derives from."""
    global _diffusers_base
    if _diffusers_base is not None:
        return _diffusers_base
    from diffusers.quantizers.base import DiffusersQuantizer

    class QcoreDiffusersQuantizer(_QcoreDriver, DiffusersQuantizer):
        """Drives a qcore backend's hooks from ``diffusers.ModelMixin.from_pretrained``.

        diffusers hands over one shard's state dict at a time (``maybe_update_state_dict``): the
        adapter builds the backend's groups there, reading a group's tensors from other shards where
        needed, creates the quantized parameters through the backend's hooks and gives diffusers
        back only the tensors the backend leaves unquantized.
        """

        use_keep_in_fp32_modules = True

        def __init__(self, quantization_config: Any, **kwargs: Any) -> None:
            DiffusersQuantizer.__init__(self, quantization_config, **kwargs)
            config = self._start(quantization_config, self.pre_quantized)
            self.use_keep_in_fp32_modules = self.qcore.use_keep_in_fp32_modules
            self.requires_calibration = self.qcore.requires_calibration
            self.quantization_config = LibraryConfigView(config)
            self.modules_to_not_convert = list(self.qcore.modules_to_not_convert)
            self._validated = False
            self._grouped = False  # True once diffusers names the checkpoint's keys (not from_single_file)
            self._keys: list[str] = []
            self._files: list[Any] = []
            self._groups: dict[str, list[str]] = {}
            self._member: dict[str, str] = {}
            self._done: set[str] = set()
            self._claimed: set[str] = set()
            self._headers = _Headers()
            self._last_single: tuple[str, torch.Tensor, torch.Tensor] | None = None

        # stage 2
        def validate_environment(self, *args: Any, **kwargs: Any) -> None:
            if self._validated:  # diffusers asks again once the device map is final
                self.qcore_device_map = kwargs.get("device_map", self.qcore_device_map)
                return
            self._validated = True
            self.qcore_device_map = kwargs.get("device_map")
            # diffusers names the checkpoint files only later: checkpoint_dtype is unknown here.
            self.hooks.validate_environment(
                quantizer=self.qcore,
                torch_dtype=kwargs.get("torch_dtype"),
                device_map=self.qcore_device_map,
                checkpoint_dtype=None,
            )

        def update_torch_dtype(self, torch_dtype: torch.dtype | None) -> torch.dtype | None:
            self.qcore_torch_dtype = self.hooks.update_torch_dtype(
                quantizer=self.qcore, torch_dtype=torch_dtype, checkpoint_dtype=None
            )
            return self.qcore_torch_dtype

        def update_device_map(self, device_map: Any) -> Any:
            return self.hooks.update_device_map(quantizer=self.qcore, device_map=device_map)

        def adjust_target_dtype(self, torch_dtype: torch.dtype) -> torch.dtype:
            return self.hooks.adjust_target_dtype(quantizer=self.qcore, torch_dtype=torch_dtype)

        def get_special_dtypes_update(
            self, model: torch.nn.Module, torch_dtype: torch.dtype
        ) -> dict[str, Any]:
            return self.hooks.get_special_dtypes_update(
                quantizer=self.qcore, model=model, torch_dtype=torch_dtype
            )

        def adjust_max_memory(self, max_memory: dict[Any, Any]) -> dict[Any, Any]:
            return self.hooks.adjust_max_memory(quantizer=self.qcore, max_memory=max_memory)

        # stage 4
        def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list[Any]) -> list[str]:
            self._grouped = True
            self._keys, self._files = list(loaded_keys), list(checkpoint_files)
            self._headers = _read_headers(self._files)
            self.qcore.pre_quantization_dtype = self.qcore_torch_dtype or self._headers.dtype
            # The same list object comes back in update_missing_keys, where the groups are known.
            self._loaded_keys = loaded_keys
            return loaded_keys

        def _process_model_before_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> None:
            self.qcore_model = model
            self.hooks.preprocess_model(
                quantizer=self.qcore,
                model=model,
                device_map=kwargs.get("device_map"),
                keep_in_fp32_modules=list(kwargs.get("keep_in_fp32_modules") or []),
                torch_dtype=self.qcore.pre_quantization_dtype,
                checkpoint_tensors=self._headers.tensors,
            )
            groups = self.hooks.group_checkpoint_keys(
                quantizer=self.qcore, model=model, checkpoint_keys=self._keys, metadata=self._headers.metadata
            )
            expected = model.state_dict(keep_vars=True)
            unexpected = [name for name in groups if name not in expected]
            if unexpected:
                raise UnexpectedKeysError(unexpected, "the checkpoint")
            self._groups = {name: list(keys) for name, keys in groups.items()}
            self._member = {key: name for name, keys in self._groups.items() for key in keys}

        def update_missing_keys(
            self, model: torch.nn.Module, missing_keys: list[str], prefix: str
        ) -> list[str]:
            covered = set(self._groups)
            # Keys that only feed a group (statistics, packed parts) are not "unexpected" to the model.
            loaded = getattr(self, "_loaded_keys", None)
            if loaded is not None:
                loaded[:] = [key for key in loaded if key in covered or self._member.get(key) is None]
            missing = [key for key in missing_keys if key not in covered]
            return self.hooks.update_missing_keys(
                quantizer=self.qcore, model=model, missing_keys=missing, prefix=prefix
            )

        # stage 5
        @property
        def supports_parallel_loading(self) -> bool:
            return False  # the hooks change the model; one shard at a time

        def maybe_update_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
            model = self.qcore_model
            if model is None or not self._grouped:
                # from_single_file: the file's own keys, before diffusers converts them and builds the
                # model; its tensors come one by one to check_if_quantized_param / create_quantized_param.
                # A single file carries no quantization_config: the bridge quantizes it on load.
                if self.qcore.requires_calibration:
                    raise ConfigError(
                        f"backend {self.qcore.quant_method!r} reads only pre-quantized checkpoints; "
                        "from_single_file through the bridge quantizes on load",
                        option="quantization_config",
                    )
                self.pre_quantized = self.qcore.pre_quantized = False
                return state_dict
            pending = {self._member.get(key, key) for key in state_dict} - self._done
            for name in sorted(pending):
                keys = self._groups.get(name, [name])
                tensors = {key: self._tensor(key, state_dict) for key in keys}
                device = _device_of(name, self.qcore_device_map)
                if self._quantize_group(model, name, tensors, device, self._headers.metadata):
                    self._claimed.update(keys)
                self._done.add(name)
            # A created group's tensors in any shard (this one or a later one) are already used.
            return {key: value for key, value in state_dict.items() if key not in self._claimed}

        def _tensor(self, key: str, state_dict: Mapping[str, Any]) -> torch.Tensor:
            if key in state_dict:
                return state_dict[key]
            # A group split over shards: read the part another shard holds.
            from safetensors import safe_open

            path = self._headers.key_file.get(key)
            if path is None:
                raise MissingKeysError([key], "the checkpoint")
            with safe_open(path, framework="pt") as handle:
                return handle.get_tensor(key)

        def check_if_quantized_param(
            self,
            model: torch.nn.Module,
            param_value: torch.Tensor,
            param_name: str,
            state_dict: Mapping[str, Any],
            **kwargs: Any,
        ) -> bool:
            if self._grouped:
                return False  # every quantized group was created in maybe_update_state_dict
            value = self._single_file_value(param_name, param_value, state_dict)
            claimed = bool(
                self.hooks.check_if_quantized_param(
                    quantizer=self.qcore,
                    model=model,
                    param_name=param_name,
                    param_value=value,
                    state_dict={param_name: value},
                )
            )
            if not claimed:
                self._last_single = None  # diffusers sets the tensor itself
            return claimed

        def create_quantized_param(
            self,
            model: torch.nn.Module,
            param_value: torch.Tensor,
            param_name: str,
            target_device: Any,
            state_dict: Mapping[str, Any],
            *args: Any,
            **kwargs: Any,
        ) -> None:
            if self._grouped:
                return
            # from_single_file: one converted tensor at a time, each its own group.
            value = self._single_file_value(param_name, param_value, state_dict)
            self._last_single = None
            device = target_device if isinstance(target_device, torch.device) else torch.device(target_device)
            self._quantize_group(model, param_name, {param_name: value}, device, {})

        def _single_file_value(
            self, param_name: str, param_value: torch.Tensor, state_dict: Mapping[str, Any]
        ) -> torch.Tensor:
            """The tensor of ``param_name``, aligned; diffusers asks about a tensor before it hands it
            over, and the aligned copy made for the question is the one the backend then receives."""
            value = state_dict.get(param_name, param_value)
            last = self._last_single
            if last is not None and last[0] == param_name and last[1] is value:
                return last[2]
            self._last_single = (param_name, value, aligned(value))
            return self._last_single[2]

        # stage 6
        def _process_model_after_weight_loading(
            self, model: torch.nn.Module, **kwargs: Any
        ) -> torch.nn.Module:
            self._last_single = None
            self.hooks.postprocess_model(quantizer=self.qcore, model=model)
            # qcore.save_pretrained and qcore.dequantize work on the model as on one qcore loaded.
            attach_load_record(model, LoadRecord(self.qcore, self.hooks))
            return model

        def get_state_dict_and_metadata(
            self, state_dict: dict[str, Any], safe_serialization: bool = False
        ) -> tuple[dict[str, Any], dict[str, Any]]:
            return self.hooks.get_state_dict_and_metadata(
                quantizer=self.qcore, model=self.qcore_model, state_dict=state_dict
            )

        @property
        def is_serializable(self) -> bool:
            return bool(self.hooks.is_serializable(quantizer=self.qcore))

    _diffusers_base = QcoreDiffusersQuantizer
    return QcoreDiffusersQuantizer


# --- transformers -------------------------------------------------------------------------------

_transformers_base: type | None = None


def transformers_adapter_base() -> type:
    """The HfQuantizer subclass every bridged backend's transformers quantizer derives from.

    transformers 5 loads tensor by tensor through conversion operations: quantize-on-load calls the
    backend's ``create_quantized_param`` for each weight it claims; a pre-quantized checkpoint
    whose keys are the quantized modules' own state-dict keys (as the int8 example's) loads as
    stored, unconverted.
    """
    global _transformers_base
    if _transformers_base is not None:
        return _transformers_base
    from transformers.core_model_loading import ConversionOps
    from transformers.quantizers.base import HfQuantizer

    class QcoreQuantizeOp(ConversionOps):
        def __init__(self, adapter: Any) -> None:
            self.adapter = adapter

        def convert(
            self,
            input_dict: dict[str, Any],
            model: torch.nn.Module | None = None,
            full_layer_name: str | None = None,
            missing_keys: Any = None,
            **kwargs: Any,
        ) -> dict[str, torch.Tensor]:
            value = next(iter(input_dict.values()))
            value = value[0] if isinstance(value, list) else value
            assert model is not None and full_layer_name is not None
            adapter = self.adapter
            done = adapter._quantize_group(model, full_layer_name, {full_layer_name: value}, value.device, {})
            if not done:
                return {full_layer_name: value}
            module_name = full_layer_name.rpartition(".")[0]
            # Without the mark, transformers' weight init would overwrite what the backend created.
            module = model.get_submodule(module_name)
            module._is_hf_initialized = True
            for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                tensor._is_hf_initialized = True
            if missing_keys is not None:
                own = [k for k in missing_keys if k.rpartition(".")[0] == module_name]
                still = set(
                    adapter.hooks.update_missing_keys(
                        quantizer=adapter.qcore,
                        model=model,
                        missing_keys=[k for k in own if k != full_layer_name],
                        prefix="",
                    )
                )
                for key in own:
                    if key not in still:
                        missing_keys.discard(key)
            return {}

    class QcoreTransformersQuantizer(_QcoreDriver, HfQuantizer):
        """Drives a qcore backend's hooks from ``transformers.PreTrainedModel.from_pretrained``."""

        def __init__(self, quantization_config: Any, **kwargs: Any) -> None:
            HfQuantizer.__init__(self, quantization_config, **kwargs)
            config = self._start(quantization_config, self.pre_quantized)
            self.quantization_config = config
            self._claimed: dict[str, list[str]] = {}
            self._headers = _Headers()
            self.requires_calibration = self.qcore.requires_calibration

        def validate_environment(self, *args: Any, **kwargs: Any) -> None:
            # transformers calls this before the dtype is known; qcore's hook runs in update_dtype.
            self.qcore_device_map = kwargs.get("device_map")

        def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
            # transformers has resolved dtype ("auto" included) from the checkpoint by now.
            self.hooks.validate_environment(
                quantizer=self.qcore,
                torch_dtype=dtype,
                device_map=self.qcore_device_map,
                checkpoint_dtype=None,
            )
            self.qcore_torch_dtype = (
                self.hooks.update_torch_dtype(quantizer=self.qcore, torch_dtype=dtype, checkpoint_dtype=None)
                or dtype
            )
            self.qcore.pre_quantization_dtype = self.qcore_torch_dtype
            return self.qcore_torch_dtype

        def update_device_map(self, device_map: Any) -> Any:
            return self.hooks.update_device_map(quantizer=self.qcore, device_map=device_map)

        def adjust_max_memory(self, max_memory: dict[Any, Any]) -> dict[Any, Any]:
            return self.hooks.adjust_max_memory(quantizer=self.qcore, max_memory=max_memory)

        def _process_model_before_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> None:
            self.qcore_model = model
            keep = (
                list(getattr(model, "_keep_in_fp32_modules", None) or [])
                if self.qcore.use_keep_in_fp32_modules
                else []
            )
            self._headers = _read_headers(list(kwargs.get("checkpoint_files") or []))
            self.hooks.preprocess_model(
                quantizer=self.qcore,
                model=model,
                device_map=kwargs.get("device_map"),
                keep_in_fp32_modules=keep,
                torch_dtype=self.qcore_torch_dtype,
                checkpoint_tensors=self._headers.tensors,
            )
            if self.pre_quantized:
                self._plan_prequantized(model)

        def _plan_prequantized(self, model: torch.nn.Module) -> None:
            """Find the groups the backend creates; they are created from the files after transformers'
            own load (which sees only plain state-dict keys), and its report does not list their keys."""
            if not self._headers.key_file:
                raise ConfigError(
                    f"a pre-quantized {self.qcore.quant_method!r} checkpoint loads through transformers only "
                    "from safetensors files; load it with qcore.from_pretrained",
                    option="quantization_config",
                )
            groups = self.hooks.group_checkpoint_keys(
                quantizer=self.qcore,
                model=model,
                checkpoint_keys=list(self._headers.key_file),
                metadata=self._headers.metadata,
            )
            self._claimed = {
                name: list(keys)
                for name, keys in groups.items()
                if self.hooks.check_if_quantized_param(
                    quantizer=self.qcore, model=model, param_name=name, param_value=None, state_dict={}
                )
            }
            members = sorted({key for keys in self._claimed.values() for key in keys} | set(self._claimed))
            if members:
                pattern = "^(?:" + "|".join(re.escape(key) for key in members) + ")$"
                for attribute in ("_keys_to_ignore_on_load_unexpected", "_keys_to_ignore_on_load_missing"):
                    setattr(model, attribute, {*(getattr(model, attribute, None) or ()), pattern})

        def param_needs_quantization(self, model: torch.nn.Module, param_name: str, **kwargs: Any) -> bool:
            if self.pre_quantized:
                # Claimed parameters may be stored packed (another shape); they are created afterwards.
                return param_name in getattr(self, "_claimed", {})
            return bool(
                self.hooks.check_if_quantized_param(
                    quantizer=self.qcore, model=model, param_name=param_name, param_value=None, state_dict={}
                )
            )

        def get_quantize_ops(self) -> Any:
            return QcoreQuantizeOp(self)

        def _process_model_after_weight_loading(
            self, model: torch.nn.Module, **kwargs: Any
        ) -> torch.nn.Module:
            if self._claimed:
                self._create_prequantized(model)
            self.hooks.postprocess_model(quantizer=self.qcore, model=model)
            # qcore.save_pretrained and qcore.dequantize work on the model as on one qcore loaded.
            attach_load_record(model, LoadRecord(self.qcore, self.hooks))
            return model

        def _create_prequantized(self, model: torch.nn.Module) -> None:
            from safetensors import safe_open

            current = model.state_dict(keep_vars=True)
            with contextlib.ExitStack() as stack:
                handles: dict[str, Any] = {}
                for name, keys in self._claimed.items():
                    tensors = {}
                    for key in keys:
                        path = self._headers.key_file.get(key)
                        if path is None:
                            raise MissingKeysError([key], "the checkpoint")
                        if path not in handles:
                            handles[path] = stack.enter_context(safe_open(path, framework="pt"))
                        tensors[key] = handles[path].get_tensor(key)
                    here = current.get(name)
                    device = (
                        here.device
                        if here is not None and here.device.type != "meta"
                        else torch.device("cpu")
                    )
                    self._quantize_group(model, name, tensors, device, self._headers.metadata)

        def get_state_dict_and_metadata(self, model: torch.nn.Module) -> tuple[Any, dict[str, str]]:
            state_dict, metadata = self.hooks.get_state_dict_and_metadata(
                quantizer=self.qcore, model=model, state_dict=model.state_dict()
            )
            return state_dict, metadata

        def is_serializable(self) -> bool:
            return bool(self.hooks.is_serializable(quantizer=self.qcore))

    _transformers_base = QcoreTransformersQuantizer
    return QcoreTransformersQuantizer
