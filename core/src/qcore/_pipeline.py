"""load_pipeline: a diffusers pipeline whose components are quantized on load by qcore, in one call.

qcore loads the components that are to be quantized (and those already quantized on disk) with
:func:`qcore.from_pretrained`; diffusers loads every other component exactly as it would on its own and
assembles the pipeline. The returned object is the diffusers pipeline itself, whose ``save_pretrained``
writes the whole directory atomically.

A pipeline assembled by hand (``FluxPipeline(transformer=..., ...)``) keeps diffusers' own
``save_pretrained``, which saves component by component: each folder of a qcore-loaded component is
replaced atomically, the directory as a whole is not. qcore does not patch diffusers' classes; passing the
hand-made components to :func:`load_pipeline` as keyword arguments gives the atomic pipeline save.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from ._atomic import atomic_directory
from ._checkpoint import read_json
from ._config import QuantizationConfig
from ._devices import single_device
from ._errors import CheckpointNotFoundError, ConfigError, DtypeCastError
from ._loading import from_pretrained
from ._model import check_minimum_version, family_of
from ._saving import superseded_weight_files

logger = logging.getLogger("qcore")

P = TypeVar("P")

MODEL_INDEX = "model_index.json"
# Component names of denoisers in diffusers' pipelines.
DENOISERS = ("transformer", "transformer_2", "unet", "prior", "decoder")
# Text encoders small enough to stay unquantized by default (CLIP is 123M-700M parameters, and
# its pooled output feeds the denoiser directly).
SMALL_TEXT_ENCODER_PREFIXES = ("CLIP",)

ComponentConfigs = Mapping[str, QuantizationConfig | Mapping[str, Any] | None]


def load_pipeline(
    pipeline_cls: type[P],
    pretrained_model_name_or_path: str | os.PathLike[str],
    *,
    quantization_config: QuantizationConfig | Mapping[str, Any] | Any | None = None,
    components: Sequence[str] | None = None,
    torch_dtype: torch.dtype | None = None,
    dtype: torch.dtype | None = None,
    device_map: str | int | torch.device | None = None,
    variant: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    **pipeline_kwargs: Any,
) -> P:
    """Load a diffusers pipeline (``FluxPipeline``, ``DiffusionPipeline``, ...) from a directory or hub id
    with ``model_index.json``, quantizing the chosen components on load.

    ``quantization_config`` is one config (any backend) applied to ``components``, or by default to
    the denoiser and the large text encoders (see :func:`default_quantized_components`); or a mapping
    ``{component name: config}``, whose configs may be of different backends; or diffusers'
    ``PipelineQuantizationConfig`` (its names are checked too). Components already
    quantized on disk load quantized without any config. Other keyword arguments go to the pipeline
    class's ``from_pretrained`` (for example a component object to use as is).

    Raises :class:`qcore.QuantizerEnvironmentError` for a diffusers or transformers older than qcore
    supports (diffusers 0.42, transformers 5.23).
    """
    check_minimum_version("diffusers")
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ConfigError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree; pass one", option="dtype")
    dtype = dtype or torch_dtype
    if isinstance(device_map, str) and device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise ConfigError(
            f"device_map={device_map!r} for a quantized pipeline: pass one device (e.g. 'cuda'), then "
            "call pipe.enable_model_cpu_offload() to move components on demand",
            option="device_map",
        )
    _device(device_map)
    hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
    root = _pipeline_directory(pipeline_cls, pretrained_model_name_or_path, variant, hub)
    index = read_json(root / MODEL_INDEX)
    models = model_components(index)
    plan = quantization_plan(index, quantization_config, components)
    given = set(pipeline_kwargs)
    prequantized = [name for name in models if name not in given and _is_prequantized(root / name)]
    plan.update({name: None for name in prequantized if name not in plan})
    passed = sorted(set(plan) & given)
    if passed:
        raise ConfigError(
            f"component(s) {', '.join(passed)} were passed as objects and also chosen for quantization; "
            "do one or the other",
            option=passed[0],
        )

    loaded: dict[str, Any] = {}
    for name, config in plan.items():
        model_cls = models[name]
        logger.info("loading %s (%s) with qcore", name, model_cls.__name__)
        loaded[name] = from_pretrained(
            model_cls,
            root,
            subfolder=name,
            quantization_config=config,
            torch_dtype=dtype or _saved_dtype(root / name),
            device_map=device_map,
            variant=variant,
        )
    options: dict[str, Any] = dict(pipeline_kwargs)
    if dtype is not None:
        options["dtype"] = dtype
    device = _device(device_map)
    # diffusers places a pipeline on "cpu" or on the default accelerator by name only ("cuda", not
    # "cuda:1"); on another accelerator it loads on the CPU and qcore moves its components after.
    elsewhere = device is not None and device.type != "cpu" and device.index not in (None, 0)
    move_to = device if elsewhere else None
    if device is not None and move_to is None:
        options["device_map"] = device.type
    if variant is not None:
        options["variant"] = variant
    pipe = pipeline_cls.from_pretrained(root, **loaded, **options)  # type: ignore[attr-defined]
    if move_to is not None:
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module) and name not in loaded:
                component.to(move_to)
    make_saves_atomic(pipe)
    return pipe  # type: ignore[no-any-return]


def default_quantized_components(model_index: Mapping[str, Any]) -> list[str]:
    """What one quantization config applies to by default: the denoisers (``transformer``,
    ``transformer_2``, ``unet``, ``prior``, ``decoder``) and the text encoders other than CLIP
    (T5, UMT5, Qwen2.5-VL, Gemma, ...). Never CLIP, the VAE, tokenizers, schedulers or feature extractors."""
    chosen = []
    for name, (library, class_name) in _entries(model_index).items():
        if library == "diffusers" and name in DENOISERS:
            chosen.append(name)
        elif (
            library == "transformers"
            and name.startswith("text_encoder")
            and not class_name.startswith(SMALL_TEXT_ENCODER_PREFIXES)
        ):
            chosen.append(name)
    return chosen


def model_components(model_index: Mapping[str, Any]) -> dict[str, type[torch.nn.Module]]:
    """The pipeline's components that are diffusers or transformers models, with their classes."""
    models: dict[str, type[torch.nn.Module]] = {}
    for name, (library, class_name) in _entries(model_index).items():
        if library not in ("diffusers", "transformers"):
            continue
        cls = getattr(importlib.import_module(library), class_name, None)
        if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
            models[name] = cls
    return models


def quantization_plan(
    model_index: Mapping[str, Any],
    quantization_config: QuantizationConfig | Mapping[str, Any] | None,
    components: Sequence[str] | None,
) -> dict[str, QuantizationConfig | Mapping[str, Any] | None]:
    """{component: config} from the user's choice, every name checked against the pipeline."""
    entries = _entries(model_index)
    models = model_components(model_index)
    pipeline = model_index.get("_class_name", "the pipeline")
    if quantization_config is None:
        if components is not None:
            raise ConfigError(
                "components= names what quantization_config applies to; pass a config too",
                option="components",
            )
        return {}
    chosen: ComponentConfigs
    is_pipeline_config = _is_pipeline_quantization_config(quantization_config)
    is_mapping = isinstance(quantization_config, Mapping) and "quant_method" not in quantization_config
    if components is not None and (is_pipeline_config or is_mapping):
        form = "a PipelineQuantizationConfig" if is_pipeline_config else "a mapping of component -> config"
        raise ConfigError(
            f"quantization_config is {form}, which names its components itself; drop components=",
            option="components",
        )
    if is_pipeline_config:
        chosen = _from_pipeline_quantization_config(quantization_config, entries, models)
    elif is_mapping:
        chosen = quantization_config
    else:
        names = list(components) if components is not None else default_quantized_components(model_index)
        if isinstance(components, str):
            raise ConfigError(
                f"components must be a list of names, not the string {components!r}", option="components"
            )
        chosen = {name: quantization_config for name in names}
    unknown = [name for name in chosen if name not in entries]
    not_models = [name for name in chosen if name in entries and name not in models]
    if unknown or not_models:
        problem = (
            f"{pipeline} has no component {', '.join(map(repr, unknown))}; its components are "
            f"{', '.join(sorted(entries))} (quantizable: {', '.join(sorted(models))})"
            if unknown
            else f"{', '.join(map(repr, not_models))} of {pipeline} cannot be quantized: only models can "
            f"({', '.join(sorted(models))})"
        )
        raise ConfigError(problem, option=(unknown or not_models)[0])
    return {name: config for name, config in chosen.items() if config is not None}


def _is_pipeline_quantization_config(obj: Any) -> bool:
    cls = type(obj)
    return cls.__name__ == "PipelineQuantizationConfig" and cls.__module__.startswith("diffusers.")


def _from_pipeline_quantization_config(
    config: Any, entries: Mapping[str, tuple[str, str]], models: Mapping[str, type]
) -> dict[str, Any]:
    """diffusers' PipelineQuantizationConfig as {component: config}, read as diffusers reads it: its
    quant_mapping, or its quant_backend for components_to_quantize (all models when not given). The
    configs are diffusers' and transformers' own classes, which qcore's backends read."""
    if config.quant_mapping is not None:
        return dict(config.quant_mapping)
    from diffusers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING as for_diffusers

    try:
        from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING as for_transformers
    except ImportError:
        for_transformers = {}
    names = config.components_to_quantize or list(models)
    names = [names] if isinstance(names, str) else list(names)
    chosen: dict[str, Any] = {}
    for name in names:
        library = entries.get(name, ("diffusers", ""))[0]
        table = for_transformers if library == "transformers" else for_diffusers
        if config.quant_backend not in table:
            raise ConfigError(
                f"PipelineQuantizationConfig quant_backend {config.quant_backend!r} has no {library} config "
                f"class for component {name!r}; choose one of {', '.join(sorted(table))}",
                option="quant_backend",
            )
        chosen[name] = table[config.quant_backend](**config.quant_kwargs)
    return chosen


def make_saves_atomic(pipe: Any) -> None:
    """Make ``pipe.save_pretrained`` write into a temporary directory renamed into place at the end,
    so a failure or a kill never leaves a half-written pipeline nor damages the one there."""
    cls = type(pipe)
    if getattr(cls, "_qcore_atomic_save", False):
        return
    if cls not in _atomic_classes:
        _atomic_classes[cls] = type(
            cls.__name__,
            (cls,),
            {
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
                "_qcore_atomic_save": True,
                "save_pretrained": _save_pipeline_atomically,
                "to": _to_checking_dtype,
            },
        )
    pipe.__class__ = _atomic_classes[cls]


_atomic_classes: dict[type, type] = {}


def _to_checking_dtype(self: Any, *args: Any, **kwargs: Any) -> Any:
    """diffusers' ``pipe.to``, refusing a dtype change up front when a component is quantized, so that a
    refused cast never leaves the pipeline half converted (diffusers casts component by component)."""
    dtype = kwargs.get("dtype") or next((a for a in args if isinstance(a, torch.dtype)), None)
    if dtype is not None:
        quantized = sorted(
            name
            for name, component in self.components.items()
            if isinstance(component, torch.nn.Module) and getattr(component, "is_quantized", False)
        )
        if quantized:
            raise DtypeCastError(
                f"pipe.to({dtype}): {', '.join(quantized)} are quantized and keep their dtype; nothing was "
                "cast. Move the pipeline with pipe.to(device), and choose the other components' dtype with "
                "torch_dtype= when loading"
            )
    return super(type(self), self).to(*args, **kwargs)


def _save_pipeline_atomically(self: Any, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
    target = Path(save_directory)
    if kwargs.get("push_to_hub"):
        kwargs.setdefault("repo_id", target.absolute().name)
    stale = superseded_component_files(
        self.components, kwargs.get("variant"), kwargs.get("safe_serialization", True)
    )
    with atomic_directory(target, superseded=stale) as staging:
        super(type(self), self).save_pretrained(str(staging), **kwargs)


def superseded_component_files(
    components: Mapping[str, Any], variant: str | None, safe_serialization: bool
) -> Callable[[str], bool]:
    """Which files of an existing pipeline directory a save makes stale, by relative path: in each model
    component's folder, what a save of that model alone in ``variant`` makes stale (other variants stay)."""
    by_folder: dict[str, Callable[[str], bool]] = {}
    for name, component in components.items():
        if isinstance(component, torch.nn.Module):
            family = family_of(component)
            weights_name = family.weights_name if safe_serialization else family.bin_weights_name
            by_folder[name] = superseded_weight_files(weights_name, variant)

    def superseded(relative: str) -> bool:
        folder, _, inside = relative.partition("/")
        return folder in by_folder and by_folder[folder](inside)

    return superseded


def _entries(model_index: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    return {
        name: (value[0], value[1])
        for name, value in model_index.items()
        if not name.startswith("_")
        and isinstance(value, (list, tuple))
        and len(value) == 2
        and value[0] is not None
        and value[1] is not None
    }


def _is_prequantized(component_dir: Path) -> bool:
    config = component_dir / "config.json"
    return config.is_file() and read_json(config).get("quantization_config") is not None


def _device(device_map: str | int | torch.device | None) -> torch.device | None:
    return None if device_map is None else single_device(device_map)


def _saved_dtype(component_dir: Path) -> torch.dtype | None:
    """The dtype a pre-quantized component was quantized from: what its other weights load in."""
    config = component_dir / "config.json"
    name = read_json(config).get("_pre_quantization_dtype") if config.is_file() else None
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) else None


def _pipeline_directory(
    pipeline_cls: type, name_or_path: str | os.PathLike[str], variant: str | None, hub: dict[str, Any]
) -> Path:
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / MODEL_INDEX).is_file():
            raise CheckpointNotFoundError(
                f"{path} has no {MODEL_INDEX}: it is not a diffusers pipeline directory. Load single "
                "models with qcore.from_pretrained"
            )
        return path
    download = getattr(pipeline_cls, "download", None)
    if not callable(download):
        raise ConfigError(
            f"{getattr(pipeline_cls, '__name__', pipeline_cls)!r} is not a diffusers pipeline class",
            option="pipeline_cls",
        )
    try:
        return Path(download(os.fspath(name_or_path), variant=variant, **hub))
    except (OSError, ValueError) as exc:
        raise CheckpointNotFoundError(
            f"pipeline {os.fspath(name_or_path)!r} is neither a local directory nor a downloadable hub "
            f"repository: {exc}"
        ) from exc
