"""The quantizer lifecycle as a pluggy hook specification.

A backend is a :class:`qcore.Quantizer` subclass whose methods are marked ``@qcore.hookimpl``; one
instance is registered per load. Every hook receives ``quantizer`` (the load's quantizer instance) so
that observer plugins, which are not the quantizer, can see it too; a backend's own methods normally
ignore it and use ``self``. A hookimpl may take any subset of a hook's arguments, by name.

Value-returning hooks are ``firstresult``: the backend's answer wins, and qcore's defaults (registered
``trylast``) answer when the backend returns ``None`` or does not implement the hook.

Order during :func:`qcore.from_pretrained` (stage numbers as in docs/architecture.md)::

    1 resolve      -> (config merge, quantizer made)
    2 prepare      -> validate_environment, update_torch_dtype, update_device_map
    3 skeleton     -> (meta model)
    4 preprocess   -> preprocess_model
                      device_map "auto": adjust_target_dtype, get_special_dtypes_update, adjust_max_memory
    5 load         -> group_checkpoint_keys; per parameter: check_if_quantized_param,
                      check_quantized_param_shape, create_quantized_param; then update_missing_keys
    6 finish       -> postprocess_model
    save_pretrained -> is_serializable, get_state_dict_and_metadata
    dequantize()    -> dequantize
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch

    from ._quantizer import Quantizer

PROJECT_NAME = "qcore"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

# The per-parameter hooks run once per checkpoint tensor; the loader resolves them once per load.
PER_PARAMETER_HOOKS = (
    "check_if_quantized_param",
    "check_quantized_param_shape",
    "create_quantized_param",
)


# --- stage 2: prepare ---------------------------------------------------------------------------


@hookspec
def validate_environment(
    quantizer: Quantizer, torch_dtype: torch.dtype | None, device_map: Any
) -> None:
    """Refuse to load when the backend cannot run here.

    When: stage 2, before the model skeleton is made, with the user's ``torch_dtype`` and
    ``device_map``. Every implementation is called.
    Returns: nothing; raise :class:`qcore.QuantizerEnvironmentError` (or another
    :class:`qcore.QcoreError`) that says what to install or change.
    Default: checks that every module in ``quantizer.required_packages`` can be imported.
    """


@hookspec(firstresult=True)
def update_torch_dtype(quantizer: Quantizer, torch_dtype: torch.dtype | None) -> torch.dtype | None:
    """Choose the dtype of the unquantized parameters.

    When: stage 2, after ``validate_environment``.
    Returns: the dtype to use, or ``None`` to keep the checkpoint's dtypes.
    Default: the user's ``torch_dtype`` unchanged.
    """


@hookspec(firstresult=True)
def update_device_map(quantizer: Quantizer, device_map: Any) -> Any:
    """Choose the device map.

    When: stage 2, after ``update_torch_dtype``.
    Returns: a device map in any form :func:`qcore.from_pretrained` accepts (``None`` = CPU).
    Default: the user's ``device_map`` unchanged.
    """


# --- stage 4: preprocess, and device placement ---------------------------------------------------


@hookspec
def preprocess_model(
    quantizer: Quantizer, model: torch.nn.Module, device_map: Any, keep_in_fp32_modules: list[str]
) -> None:
    """Prepare the meta-device skeleton, typically by replacing ``nn.Linear`` modules.

    When: stage 4, once, after the skeleton exists and before any weight is read. The model is on
    the meta device: create replacement modules under ``accelerate.init_empty_weights()`` (or use
    :func:`qcore.replace_linear_layers`). ``model.is_quantized`` and ``model.quantization_method``
    are already set.
    Returns: nothing. Default: nothing.
    """


@hookspec(firstresult=True)
def adjust_target_dtype(quantizer: Quantizer, torch_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype whose size accelerate should assume for quantized parameters.

    When: stage 4, only for ``device_map="auto" | "balanced" | "balanced_low_0" | "sequential"``.
    Returns: a dtype (e.g. ``torch.int8`` for 8-bit weights). Default: ``torch_dtype``.
    """


@hookspec(firstresult=True)
def get_special_dtypes_update(
    quantizer: Quantizer, model: torch.nn.Module, torch_dtype: torch.dtype
) -> dict[str, torch.dtype] | None:
    """Parameters that keep a dtype of their own (e.g. unquantized modules) for placement.

    When: stage 4, only for automatic device maps.
    Returns: ``{parameter_name: dtype}``. Default: ``{}``.
    """


@hookspec(firstresult=True)
def adjust_max_memory(
    quantizer: Quantizer, max_memory: dict[Any, int]
) -> dict[Any, int] | None:
    """Reserve memory per device for the backend's work buffers.

    When: stage 4, only for automatic device maps.
    Returns: the adjusted ``{device: bytes}``. Default: ``max_memory`` unchanged.
    """


# --- stage 5: load ------------------------------------------------------------------------------


@hookspec(firstresult=True)
def group_checkpoint_keys(
    quantizer: Quantizer,
    model: torch.nn.Module,
    checkpoint_keys: Sequence[str],
    metadata: Mapping[str, str],
) -> dict[str, list[str]] | None:
    """Say which checkpoint tensors make up each model parameter.

    When: stage 5, once, before any tensor is read. ``checkpoint_keys`` are all keys of all shards;
    ``metadata`` is the safetensors header metadata of the checkpoint (merged over shards).
    Returns: ``{parameter_name: [checkpoint_key, ...]}``. qcore reads all keys of a group (from any
    shard) before it calls the per-parameter hooks for that parameter, and hands them over as
    ``state_dict``; so a 4-bit weight whose statistics sit in another shard still loads. A checkpoint
    key in no group is unexpected (an error).
    Default: each key is its own group.
    """


@hookspec(firstresult=True)
def check_if_quantized_param(
    quantizer: Quantizer,
    model: torch.nn.Module,
    param_name: str,
    param_value: torch.Tensor | None,
    state_dict: Mapping[str, torch.Tensor],
) -> bool | None:
    """Say whether the backend creates this parameter itself.

    When: stage 5, once per parameter group.
    Returns: ``True`` to have ``create_quantized_param`` called; ``False`` to have qcore set the
    tensor as it is (cast to the load dtype). Default: ``False``.
    """


@hookspec(firstresult=True)
def check_quantized_param_shape(
    quantizer: Quantizer,
    param_name: str,
    current_param: torch.Tensor,
    loaded_param: torch.Tensor,
) -> bool | None:
    """Check a loaded (possibly packed) tensor against the parameter it becomes.

    When: stage 5, before ``create_quantized_param``, for pre-quantized checkpoints.
    Returns: ``True`` when the shapes fit; raise :class:`qcore.ShapeMismatchError` naming
    ``param_name`` when they do not. Default: the shapes must be equal.
    """


@hookspec
def create_quantized_param(
    quantizer: Quantizer,
    model: torch.nn.Module,
    param_name: str,
    param_value: torch.Tensor | None,
    target_device: torch.device,
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
) -> None:
    """Create the quantized parameter in the model, on ``target_device``.

    When: stage 5, for each group whose ``check_if_quantized_param`` said ``True``.
    ``param_value`` is the tensor stored under ``param_name`` (``None`` if the group has none);
    ``state_dict`` holds every tensor of the group (e.g. ``weight.absmax``).
    Returns: nothing. No default: a backend that claims parameters must implement it.
    """


@hookspec(firstresult=True)
def update_missing_keys(
    quantizer: Quantizer, model: torch.nn.Module, missing_keys: list[str], prefix: str
) -> list[str] | None:
    """Drop keys the backend creates itself from the list of missing keys.

    When: stage 5, after all tensors are loaded; remaining keys raise :class:`qcore.MissingKeysError`.
    Returns: the keys that are really missing. Default: ``missing_keys`` unchanged.
    """


# --- stage 6: finish ----------------------------------------------------------------------------


@hookspec
def postprocess_model(quantizer: Quantizer, model: torch.nn.Module) -> None:
    """Finish the loaded model (pack weights, set flags).

    When: stage 6, after all weights are on their devices and before ``eval()``.
    Returns: nothing. Default: nothing.
    """


@hookspec(firstresult=True)
def dequantize(quantizer: Quantizer, model: torch.nn.Module) -> torch.nn.Module | None:
    """Turn the quantized modules back into plain ones in ``quantizer.pre_quantization_dtype``.

    When: :func:`qcore.dequantize` / ``ModelMixin.dequantize()``.
    Returns: the model. Default: raise :class:`qcore.DequantizeError`.
    """


# --- saving -------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def is_serializable(quantizer: Quantizer) -> bool | None:
    """Say whether :func:`qcore.save_pretrained` can save this model.

    Returns: ``False`` to refuse with :class:`qcore.SerializationError`. Default: ``True``.
    """


@hookspec(firstresult=True)
def get_state_dict_and_metadata(
    quantizer: Quantizer, model: torch.nn.Module, state_dict: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """The tensors to save and the safetensors header metadata to save with them.

    When: :func:`qcore.save_pretrained`, with ``state_dict = model.state_dict()``.
    Returns: ``(state_dict, metadata)``; metadata values are strings. Default: ``(state_dict, {})``.
    """
