"""What qcore needs to know of any model class: build it, its config, its files, its tied weights."""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from typing import Any

import torch

from ._errors import ConfigError, QuantizerEnvironmentError
from ._helpers import version_at_least
from ._renamed import RenamedReader

#: The oldest diffusers and transformers whose models and pipelines qcore loads: the releases it is
#: tested with, as in the ``pipelines`` extra of qcore's pyproject.toml. transformers 4 lacks the
#: tied-weight and checkpoint-conversion interfaces of transformers 5 that qcore calls (its models
#: would load with their tied weights left untied), and no older release has been tried.
MINIMUM_VERSIONS: dict[str, str] = {"diffusers": "0.42", "transformers": "5.23"}


def check_minimum_version(library: str) -> None:
    """A :class:`qcore.QuantizerEnvironmentError` if the installed ``library`` is older than
    :data:`MINIMUM_VERSIONS` allows."""
    minimum = MINIMUM_VERSIONS[library]
    installed = str(getattr(importlib.import_module(library), "__version__", "unknown"))
    if not version_at_least(installed, minimum):
        raise QuantizerEnvironmentError(
            f"{library} {installed} is too old for qcore, which loads {library} models and pipelines with "
            f"{library}>={minimum} (the release it is tested with): pip install -U '{library}>={minimum}' "
            "(or pip install -U 'qcore[pipelines]')"
        )


def _is_diffusers_model(obj: Any) -> bool:
    return _has_base(obj, "diffusers.", "ModelMixin")


def _is_transformers_model(obj: Any) -> bool:
    return _has_base(obj, "transformers.", "PreTrainedModel")


def _has_base(obj: Any, module_prefix: str, name: str) -> bool:
    cls = obj if isinstance(obj, type) else type(obj)
    return any(c.__module__.startswith(module_prefix) and c.__name__ == name for c in cls.__mro__)


def init_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The constructor arguments in a config.json: private keys and quantization_config removed."""
    return {k: v for k, v in config.items() if not k.startswith("_") and k != "quantization_config"}


class ModelFamily:
    """What qcore needs to know of the models of one library: how to build one from its config.json,
    what its config.json holds, how its files are named, which modules it keeps unquantized or in
    float32, and how its tied weights are tied. This base class answers for plain ``nn.Module``
    classes and ``qcore.ModelMixin``; diffusers and transformers models have their own family."""

    name = "torch"
    # The library whose version must be at least MINIMUM_VERSIONS[library] (None: torch alone).
    library: str | None = None
    # Whether the library's own save_pretrained refuses quantized models (qcore's replaces it).
    refuses_quantized_saves = False
    weights_name = "diffusion_pytorch_model.safetensors"
    bin_weights_name = "diffusion_pytorch_model.bin"

    def build(self, model_cls: type[torch.nn.Module], config: Mapping[str, Any]) -> torch.nn.Module:
        from_config = getattr(model_cls, "from_config", None)
        if callable(from_config):
            return from_config(init_config(config))
        return model_cls(**init_config(config))

    def config_dict(self, model: torch.nn.Module) -> dict[str, Any]:
        config = getattr(model, "config", None)
        return {"_class_name": type(model).__name__, **(dict(config) if isinstance(config, Mapping) else {})}

    def record_load(self, model: torch.nn.Module, entries: Mapping[str, Any]) -> None:
        register = getattr(model, "register_to_config", None)  # qcore.ModelMixin
        if callable(register):
            register(**entries)

    def default_dtype(
        self, config: Mapping[str, Any], checkpoint_dtype: torch.dtype | None
    ) -> torch.dtype | None:
        """The dtype of a load given no ``torch_dtype`` (None: the backend's or the checkpoint's)."""
        return None

    def fp32_modules(self, model: torch.nn.Module, torch_dtype: torch.dtype | None) -> list[str]:
        """Modules whose floating weights load in float32 (the class's ``_keep_in_fp32_modules``)."""
        return list(getattr(model, "_keep_in_fp32_modules", None) or [])

    def modules_to_not_convert(self, model: torch.nn.Module) -> list[str]:
        """Modules the library's own quantizers leave unquantized beyond the float32 ones."""
        return []

    def tie_weights(self, model: torch.nn.Module, missing: list[str]) -> list[str]:
        """Tie the model's tied weights after loading; returns the keys still missing."""
        return missing

    def state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The tensors to save (a tied weight once)."""
        return model.state_dict()

    def renamed_reader(self, model: torch.nn.Module, reader: Any) -> Any:
        """The checkpoint reader under the model's key names (the library's renames on load applied)."""
        return reader


class DiffusersFamily(ModelFamily):
    name = "diffusers"
    library = "diffusers"
    refuses_quantized_saves = True

    def build(self, model_cls: type[torch.nn.Module], config: Mapping[str, Any]) -> torch.nn.Module:
        return model_cls.from_config(dict(config))  # type: ignore[attr-defined]

    def config_dict(self, model: torch.nn.Module) -> dict[str, Any]:
        return json.loads(model.to_json_string())  # type: ignore[operator]

    def record_load(self, model: torch.nn.Module, entries: Mapping[str, Any]) -> None:
        model.register_to_config(**entries)  # type: ignore[operator]


class TransformersFamily(ModelFamily):
    """transformers ``PreTrainedModel`` classes (``T5EncoderModel``, ``CLIPTextModel``, ...): config from
    the class's ``config_class``, ``model.safetensors`` files, transformers' own choice of modules kept
    unquantized (tied and output embeddings, the last module, ``_keep_in_fp32_modules``) and its float32
    rule (``_keep_in_fp32_modules`` in float16 loads, ``_keep_in_fp32_modules_strict`` in 16-bit loads)."""

    name = "transformers"
    library = "transformers"
    refuses_quantized_saves = True
    weights_name = "model.safetensors"
    bin_weights_name = "pytorch_model.bin"

    def build(self, model_cls: type[torch.nn.Module], config: Mapping[str, Any]) -> torch.nn.Module:
        config_class = model_cls.config_class  # type: ignore[attr-defined]
        quantization_keys = ("quantization_config", "_pre_quantization_dtype")
        fields = {k: v for k, v in config.items() if k not in quantization_keys}
        return model_cls(config_class.from_dict(fields))

    def config_dict(self, model: torch.nn.Module) -> dict[str, Any]:
        config = model.config  # type: ignore[attr-defined]
        data = config.to_diff_dict()
        data.pop("quantization_config", None)
        data.pop("_pre_quantization_dtype", None)
        data = json.loads(json.dumps(data))
        data["architectures"] = [type(model).__name__]
        data.pop("_name_or_path", None)
        return data

    def record_load(self, model: torch.nn.Module, entries: Mapping[str, Any]) -> None:
        config = model.config  # type: ignore[attr-defined]
        for key, value in entries.items():
            setattr(config, key, value)
        if entries.get("quantization_config") is not None:
            config._is_quantized = True

    def default_dtype(
        self, config: Mapping[str, Any], checkpoint_dtype: torch.dtype | None
    ) -> torch.dtype | None:
        # transformers 5 loads in the config's dtype, else the checkpoint's ("auto"), quantized or not.
        name = config.get("dtype") or config.get("torch_dtype")
        dtype = getattr(torch, name, None) if isinstance(name, str) else None
        return dtype if isinstance(dtype, torch.dtype) else checkpoint_dtype

    def fp32_modules(self, model: torch.nn.Module, torch_dtype: torch.dtype | None) -> list[str]:
        modules: list[str] = []
        if torch_dtype == torch.float16:
            modules += getattr(model, "_keep_in_fp32_modules", None) or []
        if torch_dtype in (torch.float16, torch.bfloat16):
            modules += getattr(model, "_keep_in_fp32_modules_strict", None) or []
        return sorted(set(modules))

    def modules_to_not_convert(self, model: torch.nn.Module) -> list[str]:
        from transformers.quantizers.base import get_keys_to_not_convert

        declared = list(getattr(model, "_keep_in_fp32_modules", None) or [])
        return sorted(set(get_keys_to_not_convert(model)) | set(declared))

    def tie_weights(self, model: torch.nn.Module, missing: list[str]) -> list[str]:
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        if not tied:
            return missing
        model.tie_weights(missing_keys=set(missing), recompute_mapping=False)  # type: ignore[operator]
        parameters = model.state_dict(keep_vars=True)
        return [name for name in missing if name not in parameters or parameters[name].is_meta]

    def renamed_reader(self, model: torch.nn.Module, reader: Any) -> Any:
        # transformers 5 renames the keys of some checkpoints on load (its conversion mappings: e.g.
        # Qwen2.5-VL's "model.layers.*" -> "model.language_model.layers.*"); qcore applies the pure renames.
        expected = model.state_dict(keep_vars=True)
        if all(key in expected for key in reader.keys):
            return reader
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
        except ImportError:
            return reader
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        prefix = getattr(model, "base_model_prefix", None)
        file_keys: dict[str, str] = {}
        for key in reader.keys:
            renamed, converted_by = rename_source_key(key, renamings, converters, prefix, expected)
            if converted_by is not None:
                raise ConfigError(
                    f"{reader.files.location}: transformers converts {key!r} on load ({converted_by}), which "
                    f"qcore does not do for {type(model).__name__}; load this model with transformers",
                    option="pretrained_model_name_or_path",
                )
            file_keys[renamed] = key
        if all(new == old for new, old in file_keys.items()):
            return reader
        return RenamedReader(reader, file_keys)

    def state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        # As transformers saves: the target of a tie is left out, its source holds the tensor.
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        state = model.state_dict()
        return {k: v for k, v in state.items() if not (k in tied and tied[k] in state)}


_FAMILIES = (DiffusersFamily(), TransformersFamily())
_PLAIN = ModelFamily()


def family_of(obj: Any) -> ModelFamily:
    """The family of a model class or instance; a :class:`qcore.QuantizerEnvironmentError` if its
    library is older than qcore supports."""
    family: ModelFamily = _PLAIN
    if _is_diffusers_model(obj):
        family = _FAMILIES[0]
    elif _is_transformers_model(obj):
        family = _FAMILIES[1]
    if family.library is not None:
        check_minimum_version(family.library)
    return family


def make_model(model_cls: type[torch.nn.Module], config: Mapping[str, Any]) -> torch.nn.Module:
    """Build ``model_cls`` from its config.json (the caller chooses the init context)."""
    return family_of(model_cls).build(model_cls, config)


def model_config_dict(model: torch.nn.Module) -> dict[str, Any]:
    """The model's config.json content, without quantization fields."""
    data = family_of(model).config_dict(model)
    data.pop("quantization_config", None)
    data.pop("_pre_quantization_dtype", None)
    return data


def record_load(model: torch.nn.Module, **entries: Any) -> None:
    """Store load facts (quantization_config, _pre_quantization_dtype, _name_or_path) in model.config."""
    family_of(model).record_load(model, entries)
