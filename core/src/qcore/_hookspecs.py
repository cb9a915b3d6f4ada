"""The quantizer lifecycle as a pluggy hook specification.

A backend is a :class:`qcore.Quantizer` subclass whose methods are marked ``@qcore.hookimpl``; one
instance is made (with the load's merged config) and registered per load; its ``__init__`` may be
overridden as the :class:`qcore.Quantizer` docstring says. Every hook receives ``quantizer`` (the load's
quantizer instance) so that observer plugins, which are not the quantizer, can see it too; a backend's
own methods normally ignore it and use ``self``. Observers also see unquantized loads, where
``quantizer`` is ``None`` and qcore's defaults answer every hook. A hookimpl may take any subset of a
hook's arguments, by name, so arguments added to a hook in a later qcore version do not break existing
backends.

Names: a *parameter name* is a key of ``model.state_dict()`` after ``preprocess_model`` (parameters
and persistent buffers, e.g. ``blocks.0.attn.weight`` and ``blocks.0.attn.weight_scale``; for a tensor
subclass whose ``state_dict`` keys differ from ``named_parameters()``, the ``state_dict`` keys count).
Expected and missing keys are computed from these names. A *checkpoint key* is a tensor name in the
weight files.

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


# --- stage 2: prepare ---------------------------------------------------------------------------


@hookspec
def validate_environment(
    quantizer: Quantizer,
    torch_dtype: torch.dtype | None,
    device_map: Any,
    checkpoint_dtype: torch.dtype | None,
) -> None:
    """Refuse to load when the backend cannot run here.

    When: stage 2, before the model skeleton is made, with the user's ``torch_dtype`` and
    ``device_map`` (a device map naming a device this machine lacks was already refused).
    ``checkpoint_dtype`` is the floating dtype holding most elements of the checkpoint, read from the
    file headers (``None`` when it holds no floating tensor). Every implementation is called.
    Returns: nothing; raise :class:`qcore.QuantizerEnvironmentError` (or another
    :class:`qcore.QcoreError`) that says what to install or change.
    Default: checks that every module in ``quantizer.required_packages`` can be imported.
    """


@hookspec(firstresult=True)
def update_torch_dtype(
    quantizer: Quantizer, torch_dtype: torch.dtype | None, checkpoint_dtype: torch.dtype | None
) -> torch.dtype | None:
    """Choose the dtype of the unquantized parameters.

    When: stage 2, after ``validate_environment``. ``torch_dtype`` is the user's (``dtype=`` or
    ``torch_dtype=``), ``checkpoint_dtype`` the checkpoint's (from the file headers).
    Returns: the dtype to use, or ``None`` to keep the checkpoint's dtypes. A backend that needs one
    dtype when the user gave none should prefer ``checkpoint_dtype`` (what an unquantized load
    gives), and log the choice when it picks another.
    Default: the user's ``torch_dtype`` unchanged. Afterwards ``quantizer.pre_quantization_dtype``
    holds the load's dtype: the returned one, else ``checkpoint_dtype``.
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
    quantizer: Quantizer,
    model: torch.nn.Module,
    device_map: Any,
    keep_in_fp32_modules: list[str],
    torch_dtype: torch.dtype | None,
    checkpoint_tensors: Mapping[str, torch.Tensor],
) -> None:
    """Prepare the meta-device skeleton, typically by replacing ``nn.Linear`` modules.

    When: stage 4, once, after the skeleton exists and before any weight is read. The model's
    parameters are on the meta device and float32 whatever ``torch_dtype`` is (buffers are real CPU
    tensors, as ``accelerate.init_empty_weights`` leaves them); each parameter gets its dtype when
    its tensor is set in stage 5. Create replacement modules under ``accelerate.init_empty_weights()``
    (or use :func:`qcore.replace_linear_layers`). ``model.is_quantized`` and
    ``model.quantization_method`` are already set.
    ``torch_dtype`` is the load's dtype (``update_torch_dtype``'s answer, else the checkpoint's).
    ``keep_in_fp32_modules`` are the modules whose floating weights load in float32 (the model's
    ``_keep_in_fp32_modules`` when ``use_keep_in_fp32_modules`` is set, or the user's); they are not
    in ``quantizer.modules_to_not_convert`` (the config's list): skip both.
    ``checkpoint_tensors`` maps every checkpoint key to a meta tensor of its stored dtype and shape
    (from the file headers; no data read), so a backend loading a pre-quantized checkpoint replaces
    only the modules whose weights the checkpoint holds in its format.
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
def adjust_max_memory(quantizer: Quantizer, max_memory: dict[Any, int]) -> dict[Any, int] | None:
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
    Returns: ``{parameter_name: [checkpoint_key, ...]}``. Each group name must be a parameter name
    (a key of ``model.state_dict()``; another name is an unexpected key); the keys need not be.
    qcore reads all keys of a group (from any shard) before it calls the per-parameter hooks for that
    parameter, and hands them over as ``state_dict``; so a 4-bit weight whose statistics sit in
    another shard still loads. A checkpoint key in no group is unexpected (an error). A group's keys
    that are parameter names count as loaded with it (e.g. a scale created with its weight).
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

    When: stage 5, before ``create_quantized_param``, for pre-quantized checkpoints, and only when
    the group holds a checkpoint key equal to ``param_name``: ``loaded_param`` is that tensor
    (never ``None``); a group without such a key skips this hook. ``current_param`` is the
    parameter in the model after ``preprocess_model`` (on the meta device).
    Returns: ``True`` when the shapes fit. ``False`` makes qcore raise
    :class:`qcore.ShapeMismatchError` naming the parameter, file and backend; raise it yourself for a
    more precise message. Default: the shapes must be equal.
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
    The tensors are on ``target_device`` (CUDA targets) or the CPU, in their stored dtype (no
    cast), and each starts on a 64-byte boundary, so any kernel may read it. In
    :func:`qcore.from_pretrained`, a safetensors tensor read for the CPU is a buffer of its own that
    ``os.preadv`` filled from the file (owned, writable, page-aligned), and a CUDA tensor is copied
    through pinned staging buffers (owned); only a ``.bin`` entry may be a view of the memory-mapped
    file, and it is copied where it would not start on a 64-byte boundary. Through qcore's bridge
    the tensors are those diffusers or transformers read (or ``safetensors.safe_open`` reads, for a
    group's parts in other shards and transformers' pre-quantized groups); they may be views of a
    memory-mapped file, and the bridge copies each one that would not start on a 64-byte boundary.
    A kept view keeps its file mapped, and a write to it may change the library's tensor: write
    only to a copy (``.clone()``, ``.to()``, quantizing).
    Returns: nothing. No default: a backend that claims parameters must implement it.
    """


@hookspec(firstresult=True)
def update_missing_keys(
    quantizer: Quantizer, model: torch.nn.Module, missing_keys: list[str], prefix: str
) -> list[str] | None:
    """Drop keys the backend creates itself from the list of missing keys.

    When: stage 5, after all tensors are loaded; remaining keys raise :class:`qcore.MissingKeysError`.
    ``missing_keys`` are parameter names (``state_dict`` keys) that no group loaded. ``prefix`` is
    the prefix the calling loader strips from checkpoint keys: always ``""`` in
    :func:`qcore.from_pretrained` (checkpoint keys are the model's own names); transformers passes
    its ``base_model_prefix`` when a backend serves it through qcore's bridge.
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
