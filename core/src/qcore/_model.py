"""What qcore needs to know of any model class: build it, its config, the dtype-cast guard, dequantize."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch

from ._errors import ConfigError, DtypeCastError, QcoreError
from ._loadrecord import drop_load_record, load_record


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
        from ._renamed import RenamedReader

        return RenamedReader(reader, file_keys)

    def state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        # As transformers saves: the target of a tie is left out, its source holds the tensor.
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        state = model.state_dict()
        return {k: v for k, v in state.items() if not (k in tied and tied[k] in state)}


_FAMILIES = (DiffusersFamily(), TransformersFamily())
_PLAIN = ModelFamily()


def family_of(obj: Any) -> ModelFamily:
    """The family of a model class or instance."""
    if _is_diffusers_model(obj):
        return _FAMILIES[0]
    if _is_transformers_model(obj):
        return _FAMILIES[1]
    return _PLAIN


# Keyword arguments of diffusers' and transformers' save_pretrained that change nothing in what qcore writes.
_SAVE_NO_OPS = frozenset({"save_function", "use_flashpack", "save_peft_format", "save_original_format"})
_HUB_OPTIONS = ("repo_id", "commit_message", "private", "create_pr", "token")


def save_with_qcore(
    self: torch.nn.Module,
    save_directory: str | os.PathLike[str],
    is_main_process: bool = True,
    *,
    safe_serialization: bool = True,
    variant: str | None = None,
    max_shard_size: int | str | None = None,
    push_to_hub: bool = False,
    **kwargs: Any,
) -> None:
    """``save_pretrained`` of a diffusers or transformers model that qcore loaded quantized: writes what
    :func:`qcore.save_pretrained` writes (the library's own method refuses quantized models), and with
    ``push_to_hub=True`` uploads that directory as the library would."""
    from ._saving import save_pretrained

    hub = {key: kwargs.pop(key) for key in _HUB_OPTIONS if key in kwargs}
    unknown = sorted(set(kwargs) - _SAVE_NO_OPS)
    if unknown:
        raise ConfigError(
            f"save_pretrained of a qcore-quantized {type(self).__name__} does not take {', '.join(unknown)}; "
            "it takes safe_serialization, variant, max_shard_size and push_to_hub (with repo_id, "
            "commit_message, private, create_pr, token)",
            option=unknown[0],
        )
    if not is_main_process:
        return
    options: dict[str, Any] = {"safe_serialization": safe_serialization, "variant": variant}
    if max_shard_size is not None:
        options["max_shard_size"] = max_shard_size
    save_pretrained(self, save_directory, **options)
    if push_to_hub:
        from huggingface_hub import create_repo, upload_folder

        token = hub.get("token")
        repo_id = hub.get("repo_id") or os.fspath(save_directory).rstrip(os.sep).split(os.sep)[-1]
        repo_id = create_repo(repo_id, exist_ok=True, private=hub.get("private"), token=token).repo_id
        upload_folder(
            repo_id=repo_id,
            folder_path=os.fspath(save_directory),
            token=token,
            commit_message=hub.get("commit_message") or "Upload qcore-quantized model",
            create_pr=hub.get("create_pr", False),
        )


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


class CastGuard:
    """Refuses dtype casts while ``is_quantized``; mixed into ModelMixin and into loaded foreign classes."""

    def _refuse_cast(self, what: str) -> None:
        if getattr(self, "is_quantized", False):
            raise DtypeCastError(
                f"{type(self).__name__} is quantized with {getattr(self, 'quantization_method', '?')!r}: "
                f"{what} would break its quantized weights. Cast the inputs instead, or call "
                "dequantize() first."
            )

    def to(self, *args: Any, **kwargs: Any) -> Any:
        device, dtype, non_blocking, _fmt = torch._C._nn._parse_to(*args, **kwargs)
        quantized = getattr(self, "is_quantized", False)
        if device is not None and quantized and dtype is not None and dtype == getattr(self, "dtype", None):
            # A move that names the dtype the model reports is a move: diffusers' LoRA loading calls
            # text_encoder.to(device=..., dtype=text_encoder.dtype), which broke bitsandbytes encoders there.
            return super().to(device, non_blocking=non_blocking)  # type: ignore[misc]
        if dtype is not None:
            self._refuse_cast(f".to({dtype})")
        return super().to(*args, **kwargs)  # type: ignore[misc]

    def half(self) -> Any:
        self._refuse_cast(".half()")
        return super().half()  # type: ignore[misc]

    def float(self) -> Any:
        self._refuse_cast(".float()")
        return super().float()  # type: ignore[misc]

    def bfloat16(self) -> Any:
        self._refuse_cast(".bfloat16()")
        return super().bfloat16()  # type: ignore[misc]

    def double(self) -> Any:
        self._refuse_cast(".double()")
        return super().double()  # type: ignore[misc]


_guarded_classes: dict[type, type] = {}


def guard_dtype_casts(model: torch.nn.Module) -> None:
    """Make a quantized model of a foreign class (e.g. a diffusers model) refuse dtype casts.

    The instance's class is swapped for a same-named subclass that adds the guard, so isinstance
    checks, ``_class_name`` in config.json and the class's own methods are unchanged.
    """
    cls = type(model)
    if isinstance(model, CastGuard):
        return
    if cls not in _guarded_classes:
        _guarded_classes[cls] = type(
            cls.__name__,
            (CastGuard, cls),
            {
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
                "_qcore_unguarded": cls,
                # diffusers' and transformers' own save_pretrained refuse quantized models.
                **({"save_pretrained": save_with_qcore} if family_of(cls) is not _PLAIN else {}),
            },
        )
    model.__class__ = _guarded_classes[cls]


def _unguard(model: torch.nn.Module) -> None:
    original = type(model).__dict__.get("_qcore_unguarded")
    if original is not None:
        model.__class__ = original


def dequantize(model: torch.nn.Module) -> torch.nn.Module:
    """Undo quantization in place through the backend's ``dequantize`` hook; returns the model."""
    record = load_record(model)
    if record is None:
        raise QcoreError(f"{type(model).__name__} was not loaded quantized by qcore; nothing to dequantize")
    record.hooks.dequantize(quantizer=record.quantizer, model=model)
    model.is_quantized = False
    model.hf_quantizer = None
    drop_load_record(model)
    _unguard(model)
    if _is_diffusers_model(model):
        model.register_to_config(quantization_config=None)
    elif isinstance(getattr(model, "config", None), dict):  # qcore.ModelMixin
        model.config.pop("quantization_config", None)
    return model
