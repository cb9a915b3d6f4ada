"""What qcore needs to know of any model class: build it, its config, the dtype-cast guard, dequantize."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
        return (
            from_config(dict(config)) if _is_diffusers_model(model_cls) else from_config(init_config(config))
        )
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
    register = getattr(model, "register_to_config", None)  # diffusers models and qcore.ModelMixin
    if callable(register):
        register(**entries)


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
    if isinstance(model, CastGuard):
        return
    if cls not in _guarded_classes:
        _guarded_classes[cls] = type(
            cls.__name__,
            (CastGuard, cls),
            {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "_qcore_unguarded": cls},
        )
    model.__class__ = _guarded_classes[cls]


def _unguard(model: torch.nn.Module) -> None:
    original = type(model).__dict__.get("_qcore_unguarded")
    if original is not None:
        model.__class__ = original


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
    if _is_diffusers_model(model):
        model.register_to_config(quantization_config=None)
    elif isinstance(getattr(model, "config", None), dict):  # qcore.ModelMixin
        model.config.pop("quantization_config", None)
    return model
