"""qcore-native models (ModelMixin), and what qcore needs to know of any model class."""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from ._errors import DtypeCastError, QcoreError


def _is_diffusers_model(obj: Any) -> bool:
    cls = obj if isinstance(obj, type) else type(obj)
    return any(c.__module__.startswith("diffusers.") and c.__name__ == "ModelMixin" for c in cls.__mro__)


def init_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The constructor arguments in a config.json: private keys and quantization_config removed."""
    return {k: v for k, v in config.items() if not k.startswith("_") and k != "quantization_config"}


def make_model(model_cls: type[torch.nn.Module], config: Mapping[str, Any]) -> torch.nn.Module:
    """Build ``model_cls`` from its config.json (the caller chooses the init context)."""
    from_config = getattr(model_cls, "from_config", None)
    if callable(from_config):
        return from_config(dict(config)) if _is_diffusers_model(model_cls) else from_config(init_config(config))
    return model_cls(**init_config(config))


def model_config_dict(model: torch.nn.Module) -> dict[str, Any]:
    """The model's config.json content, without quantization fields."""
    if _is_diffusers_model(model):
        import json

        data = json.loads(model.to_json_string())  # type: ignore[operator]
    else:
        config = getattr(model, "config", None)
        data = {"_class_name": type(model).__name__, **(dict(config) if isinstance(config, Mapping) else {})}
    data.pop("quantization_config", None)
    data.pop("_pre_quantization_dtype", None)
    return data


def record_load(model: torch.nn.Module, **entries: Any) -> None:
    """Store load facts (quantization_config, _pre_quantization_dtype, _name_or_path) in model.config."""
    if _is_diffusers_model(model):
        model.register_to_config(**entries)  # type: ignore[operator]
    elif isinstance(model, ModelMixin):
        model._qcore_config.update(entries)


class _CastGuard:
    """Refuses dtype casts while ``is_quantized``; mixed into ModelMixin and into loaded foreign classes."""

    def _refuse_cast(self, what: str) -> None:
        if getattr(self, "is_quantized", False):
            raise DtypeCastError(
                f"{type(self).__name__} is quantized with {getattr(self, 'quantization_method', '?')!r}: "
                f"{what} would break its quantized weights. Cast the inputs instead, or call "
                "dequantize() first."
            )

    def to(self, *args: Any, **kwargs: Any) -> Any:
        _device, dtype, _non_blocking, _fmt = torch._C._nn._parse_to(*args, **kwargs)
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
    if isinstance(model, _CastGuard):
        return
    if cls not in _guarded_classes:
        _guarded_classes[cls] = type(
            cls.__name__,
            (_CastGuard, cls),
            {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "_qcore_unguarded": cls},
        )
    model.__class__ = _guarded_classes[cls]


def _unguard(model: torch.nn.Module) -> None:
    original = type(model).__dict__.get("_qcore_unguarded")
    if original is not None:
        model.__class__ = original


class ModelMixin(_CastGuard, torch.nn.Module):
    """Base class for qcore-native models: ``__init__`` keyword arguments are the config.

    ``from_pretrained`` / ``save_pretrained`` / ``dequantize`` call :func:`qcore.from_pretrained`,
    :func:`qcore.save_pretrained` and :func:`qcore.dequantize`. A quantized model refuses dtype casts.
    """

    _no_split_modules: ClassVar[list[str] | None] = None
    _keep_in_fp32_modules: ClassVar[list[str] | None] = None
    _qcore_config: dict[str, Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self: ModelMixin, *args: Any, **kw: Any) -> None:
            # The outermost constructor's arguments are the config; super().__init__ calls don't overwrite.
            if "_qcore_config" not in self.__dict__:
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                params = dict(list(bound.arguments.items())[1:])
                for name, p in signature.parameters.items():
                    if p.kind is inspect.Parameter.VAR_KEYWORD:
                        params.update(params.pop(name, {}))
                    elif p.kind is inspect.Parameter.VAR_POSITIONAL:
                        params.pop(name, None)
                object.__setattr__(self, "_qcore_config", params)
            init(self, *args, **kw)

        cls.__init__ = recording_init  # type: ignore[method-assign]

    @property
    def config(self) -> dict[str, Any]:
        return self.__dict__.setdefault("_qcore_config", {})

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelMixin:
        return cls(**init_config(config))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str], **kwargs: Any) -> Any:
        from ._loading import from_pretrained

        return from_pretrained(cls, pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
        from ._saving import save_pretrained

        save_pretrained(self, save_directory, **kwargs)

    def dequantize(self) -> ModelMixin:
        dequantize(self)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)

    @property
    def device(self) -> torch.device:
        return next((p.device for p in self.parameters()), torch.device("cpu"))


def dequantize(model: torch.nn.Module) -> torch.nn.Module:
    """Undo quantization in place through the backend's ``dequantize`` hook; returns the model."""
    quantizer = getattr(model, "hf_quantizer", None)
    hooks = getattr(quantizer, "hooks", None)
    if quantizer is None or hooks is None:
        raise QcoreError(f"{type(model).__name__} was not loaded quantized by qcore; nothing to dequantize")
    hooks.dequantize(quantizer=quantizer, model=model)
    model.is_quantized = False
    model.hf_quantizer = None
    _unguard(model)
    if isinstance(model, ModelMixin):
        model.config.pop("quantization_config", None)
    elif _is_diffusers_model(model):
        model.register_to_config(quantization_config=None)
    return model
