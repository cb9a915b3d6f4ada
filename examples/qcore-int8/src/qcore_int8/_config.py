"""The config of the int8 backend, as stored in config.json's ``quantization_config``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

import qcore

COMPUTE_DTYPES = ("bfloat16", "float16", "float32")


class Int8Config(qcore.QuantizationConfig):
    """int8 weights with one float32 scale per output channel; activations stay in floating point.

    Args:
        modules_to_not_convert: module names (whole name components, e.g. ``"proj_out"`` or
            ``"blocks.0"``) whose ``nn.Linear`` layers stay unquantized.
        compute_dtype: dtype of the matmul (``"bfloat16"``, ``"float16"``, ``"float32"``, or a
            ``torch.dtype``); ``None`` computes in the dtype of the input.
    """

    quant_method = "int8"
    # Changing the matmul dtype does not change the stored weights, so a user may still choose it
    # when loading a pre-quantized checkpoint.
    loading_attributes = frozenset({"compute_dtype"})

    def __init__(
        self,
        modules_to_not_convert: Sequence[str] | None = None,
        compute_dtype: str | torch.dtype | None = None,
    ) -> None:
        if modules_to_not_convert is not None and (
            isinstance(modules_to_not_convert, str)
            or not all(isinstance(name, str) for name in modules_to_not_convert)
        ):
            raise qcore.ConfigError(
                f"modules_to_not_convert must be a list of module names, not {modules_to_not_convert!r}",
                option="modules_to_not_convert",
            )
        if isinstance(compute_dtype, torch.dtype):
            compute_dtype = str(compute_dtype).removeprefix("torch.")
        if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
            raise qcore.ConfigError(
                f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)} or None, not {compute_dtype!r}",
                option="compute_dtype",
            )
        # A copy: the caller's list is never changed, and later changes to it do not leak in.
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert else None
        self.compute_dtype = compute_dtype

    @property
    def torch_compute_dtype(self) -> torch.dtype | None:
        return getattr(torch, self.compute_dtype) if self.compute_dtype else None
