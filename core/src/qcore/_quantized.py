"""What a quantized model carries: the guard that refuses dtype casts, qcore's ``save_pretrained`` in place of
its library's (which refuses quantized models), and :func:`dequantize`, which takes all of it off again."""

from __future__ import annotations

from typing import Any

import torch

from ._errors import DtypeCastError, QcoreError
from ._loadrecord import drop_load_record, load_record
from ._model import family_of
from ._saving import save_with_qcore


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
                **({"save_pretrained": save_with_qcore} if family_of(cls).refuses_quantized_saves else {}),
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
    if family_of(model).name == "diffusers":
        model.register_to_config(quantization_config=None)
    elif isinstance(getattr(model, "config", None), dict):  # qcore.ModelMixin
        model.config.pop("quantization_config", None)
    return model
