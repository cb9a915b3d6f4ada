"""GGUFWeight: GGML blocks kept as uint8 in memory, with their type, through ``.to()``, narrow and cat."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from ._dequant import GGML_TYPES, dequantize_blocks, logical_shape


def _quant_type_of(args: Iterable[Any]) -> str | None:
    for arg in args:
        if isinstance(arg, GGUFWeight):
            return arg.quant_type
        if isinstance(arg, (list, tuple)):
            found = _quant_type_of(arg)
            if found is not None:
                return found
    return None


class GGUFWeight(torch.nn.Parameter):
    """A parameter holding GGML blocks: a uint8 tensor ``(rows, bytes per row)`` and its ``quant_type``.

    Torch operations return ``GGUFWeight`` again (so ``.to(device)``, ``narrow`` and ``cat`` along dim 0 keep
    the type: rows are whole blocks); :meth:`dequantize` decodes it. ``shape`` is the storage shape,
    :attr:`logical_shape` the shape of the weight it stands for.
    """

    quant_type: str

    def __new__(cls, data: torch.Tensor, quant_type: str, requires_grad: bool = False) -> GGUFWeight:
        if quant_type not in GGML_TYPES:
            raise ValueError(f"unknown GGML type {quant_type!r}; known: {', '.join(GGML_TYPES)}")
        self = torch.Tensor._make_subclass(cls, data, requires_grad)
        self.quant_type = quant_type
        return self

    @property
    def logical_shape(self) -> tuple[int, ...]:
        return logical_shape(self.quant_type, tuple(self.shape))

    def as_tensor(self) -> torch.Tensor:
        """The raw uint8 blocks as a plain tensor (no copy)."""
        return torch.Tensor._make_subclass(torch.Tensor, self, False)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight in its logical shape, computed as diffusers computes it unless ``dtype`` is given."""
        return dequantize_blocks(self.as_tensor(), self.quant_type, dtype)

    def __deepcopy__(self, memo: dict[int, Any]) -> GGUFWeight:
        return GGUFWeight(self.as_tensor().clone(), self.quant_type, self.requires_grad)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return (GGUFWeight, (self.as_tensor(), self.quant_type, False))

    def __repr__(self) -> str:
        return f"GGUFWeight({self.quant_type}, logical_shape={self.logical_shape}, device={self.device})"

    @classmethod
    def __torch_function__(
        cls,
        func: Callable[..., Any],
        types: Iterable[type],
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        result = super().__torch_function__(func, types, args, kwargs or {})
        quant_type = _quant_type_of(args)
        if quant_type is None:
            return result
        if isinstance(result, torch.Tensor) and not isinstance(result, GGUFWeight):
            return cls._wrap(result, quant_type)
        if type(result) in (list, tuple):
            return type(result)(
                cls._wrap(x, quant_type) if isinstance(x, torch.Tensor) else x for x in result
            )
        return result

    @classmethod
    def _wrap(cls, tensor: torch.Tensor, quant_type: str) -> torch.Tensor:
        # Only uint8 blocks stay GGUFWeight; a view as another dtype or a reduction is a plain tensor.
        if tensor.dtype != torch.uint8:
            return tensor
        return cls(tensor.detach(), quant_type)
