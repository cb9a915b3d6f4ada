"""The Quantizer base class that backends subclass, and helpers every backend needs."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from ._config import QuantizationConfig

if TYPE_CHECKING:
    import torch
    from pluggy import HookRelay


class Quantizer:
    """State of one quantized load; a backend subclasses it and marks its hooks ``@qcore.hookimpl``.

    The hooks themselves are documented in the hook reference (``qcore._hookspecs``); this class
    defines none of them, so a method named like a hook but not marked is reported as an error when
    the backend is registered.

    Attributes a subclass may set:

    - ``required_packages``: import names checked before the load (default ``validate_environment``).
    - ``use_keep_in_fp32_modules``: honour the model's ``_keep_in_fp32_modules``.
    - ``requires_calibration``: the backend cannot quantize on load, only read pre-quantized weights.
    - ``is_trainable`` / ``is_compileable``: informational flags read by the conformance suite.
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
        # Set by the loader: the load's hook relay, so saving and dequantizing call the same plugins.
        self.hooks: HookRelay | None = None

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
    with init_empty_weights():
        for name, module in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            replacement = make_module(name, module)
            replacement.requires_grad_(False)
            setattr(parent, child, replacement)
    return [name for name, _ in targets]
