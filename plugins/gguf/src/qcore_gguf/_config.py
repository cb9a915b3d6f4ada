"""GGUFConfig: the options of a GGUF load, with diffusers' GGUFQuantizationConfig fields and defaults."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

import qcore

COMPUTE_DTYPES = ("float32", "float16", "bfloat16")


class GGUFConfig(qcore.QuantizationConfig):
    """GGUF weights stay GGML blocks in memory; each Linear decodes its weight per forward.

    The matmul runs in ``compute_dtype``.

    Args:
        compute_dtype: dtype of the matmul: ``"float32"``, ``"bfloat16"``, ``"float16"`` or a
            ``torch.dtype``. ``None`` (the default) follows the load's ``torch_dtype`` (float32 without
            one; diffusers' default is float32). It is also the load dtype when ``torch_dtype`` is not
            given.
        modules_to_not_convert: module names (whole name components) whose weights are dequantized on load
            into plain layers.

    GGUF cannot quantize on load: use it to read ``.gguf`` files and checkpoints saved from them.
    """

    quant_method = "gguf"
    loading_attributes = frozenset({"compute_dtype", "modules_to_not_convert"})

    def __init__(
        self,
        compute_dtype: str | torch.dtype | None = None,
        modules_to_not_convert: Sequence[str] | None = None,
    ) -> None:
        if isinstance(compute_dtype, torch.dtype):
            compute_dtype = str(compute_dtype).removeprefix("torch.")
        if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
            raise qcore.ConfigError(
                f"GGUFConfig: compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, "
                f"not {compute_dtype!r}",
                option="compute_dtype",
            )
        if modules_to_not_convert is not None and (
            isinstance(modules_to_not_convert, str)
            or not all(isinstance(name, str) for name in modules_to_not_convert)
        ):
            raise qcore.ConfigError(
                "GGUFConfig: modules_to_not_convert must be a list of module names, "
                f"not {modules_to_not_convert!r}",
                option="modules_to_not_convert",
            )
        self.compute_dtype = compute_dtype
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert else None

    @property
    def torch_compute_dtype(self) -> torch.dtype | None:
        return getattr(torch, self.compute_dtype) if self.compute_dtype else None

    @classmethod
    def from_dict(cls, config_dict: Mapping[str, Any]) -> GGUFConfig:
        """Read the config.json form; diffusers' ``pre_quantized`` field (always true) is accepted."""
        data = {k: v for k, v in config_dict.items() if k != "pre_quantized"}
        return super().from_dict(data)
