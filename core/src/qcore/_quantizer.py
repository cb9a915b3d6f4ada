"""The Quantizer base class that backends subclass, and helpers every backend needs."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from ._config import QuantizationConfig
from ._helpers import get_module_for_param
from ._noinit import no_init_on_meta

if TYPE_CHECKING:
    import torch


class Quantizer:
    """State of one quantized load; a backend subclasses it and marks its hooks ``@qcore.hookimpl``.

    The hooks are documented in the hook reference (docs/hooks.md); this class defines none of them,
    so a method named like a hook but not marked is reported as an error when the backend is registered.
    One instance is made per load, with the load's merged config, before any hook runs.

    A subclass may override ``__init__`` if it keeps the signature
    ``(quantization_config, *, pre_quantized=False)`` and calls ``super().__init__`` first; state that
    depends on the model belongs in ``preprocess_model``.

    Attributes a subclass may set:

    - ``required_packages``: import names checked before the load (default ``validate_environment``).
    - ``use_keep_in_fp32_modules``: honour the model's ``_keep_in_fp32_modules``; the loader then
      passes them to ``preprocess_model`` as ``keep_in_fp32_modules``, which is separate from
      ``modules_to_not_convert`` (that one is the config's list only: skip both).
    - ``requires_calibration``: the backend cannot quantize on load, only read checkpoints made by its
      own tools; :func:`qcore.from_pretrained` refuses to quantize on load with it (``ConfigError``).
    - ``is_trainable`` / ``is_compileable``: whether the quantized modules train (e.g. LoRA) and
      compile; qcore's loader does not read them, the diffusers / transformers bridge reports them.

    Attributes the loader sets: ``pre_quantized``, ``modules_to_not_convert`` (from the config) and
    ``pre_quantization_dtype`` (the load's dtype, known after ``update_torch_dtype``).
    """

    required_packages: ClassVar[tuple[str, ...]] = ()
    use_keep_in_fp32_modules: ClassVar[bool] = False
    requires_calibration: ClassVar[bool] = False
    is_trainable: ClassVar[bool] = False
    is_compileable: ClassVar[bool] = False

    def __init__(self, quantization_config: QuantizationConfig, *, pre_quantized: bool = False) -> None:
        self.quantization_config = quantization_config
        self.pre_quantized = pre_quantized
        self.modules_to_not_convert: list[str] = list(
            getattr(quantization_config, "modules_to_not_convert", None) or []
        )
        self.pre_quantization_dtype: torch.dtype | None = None

    @property
    def quant_method(self) -> str:
        return self.quantization_config.quant_method

    def __repr__(self) -> str:
        state = "pre-quantized" if self.pre_quantized else "quantize-on-load"
        return f"<{type(self).__name__} {self.quant_method} {state}>"


def module_matches(module_name: str, patterns: Iterable[str]) -> bool:
    """Whether ``module_name`` is one of ``patterns`` or lies inside one, by whole name components.

    ``"blocks"`` matches ``"blocks"``, ``"blocks.0.attn"`` and ``"transformer.blocks.1"``, never
    ``"vace_blocks.0"``; ``"proj_out"`` matches ``"proj_out"`` and ``"blocks.0.proj_out"``.
    """
    parts = module_name.split(".") if module_name else []
    for pattern in patterns:
        wanted = pattern.split(".")
        width = len(wanted)
        if any(parts[i : i + width] == wanted for i in range(len(parts) - width + 1)):
            return True
    return False


def replace_linear_layers(
    model: torch.nn.Module,
    make_module: Callable[[str, torch.nn.Linear], torch.nn.Module],
    *,
    modules_to_not_convert: Sequence[str] = (),
    linear_types: tuple[type, ...] | None = None,
) -> list[str]:
    """Replace every ``nn.Linear`` not named in ``modules_to_not_convert`` by ``make_module(name, old)``.

    Replacements are created under ``accelerate.init_empty_weights()`` so nothing is allocated.
    Returns the names of the replaced modules (empty when the model has no Linear: backends usually
    warn then).
    """
    import torch
    from accelerate import init_empty_weights

    types = linear_types or (torch.nn.Linear,)
    targets: list[tuple[str, Any]] = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) in types and not module_matches(name, modules_to_not_convert)
    ]
    with init_empty_weights(), no_init_on_meta():
        for name, module in targets:
            parent, child = get_module_for_param(model, name)
            replacement = make_module(name, module)
            replacement.requires_grad_(False)
            setattr(parent, child, replacement)
    return [name for name, _ in targets]
