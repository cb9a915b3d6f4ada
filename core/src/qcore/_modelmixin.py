"""qcore.ModelMixin: the base class of qcore-native models."""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from ._loading import from_pretrained
from ._model import init_config
from ._quantized import CastGuard, dequantize
from ._saving import save_pretrained


class ModelMixin(CastGuard, torch.nn.Module):
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

    def register_to_config(self, **entries: Any) -> None:
        """Add load facts to ``config`` (as diffusers' method of the same name does)."""
        self.config.update(entries)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str], **kwargs: Any) -> Any:
        return from_pretrained(cls, pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
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
