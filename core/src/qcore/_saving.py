"""save_pretrained: config.json + safetensors shards + index, written atomically; and the
``save_pretrained`` that replaces diffusers' and transformers' own on the models qcore loaded quantized.

The checkpoint is written to a staging directory beside the target, which then takes the target's place in
one step (see :mod:`qcore._atomic`): a failure or a kill never leaves a half-written checkpoint and never
destroys the one already there. What an existing target holds besides this save's weights (a README, other
variants, subfolders) is kept, as diffusers keeps it when it writes into the directory.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ._atomic import atomic_directory
from ._checkpoint import CONFIG_NAME, add_variant
from ._errors import ConfigError, SerializationError
from ._loadrecord import load_record
from ._model import family_of, model_config_dict

logger = logging.getLogger("qcore")

_OS_ERROR_IN_MESSAGE = re.compile(r"\(os error (\d+)\)")


def save_pretrained(
    model: torch.nn.Module,
    save_directory: str | os.PathLike[str],
    *,
    max_shard_size: int | str = "10GB",
    variant: str | None = None,
    safe_serialization: bool = True,
) -> None:
    """Save ``model`` (quantized or not) in diffusers' layout, readable by qcore and diffusers."""
    record = load_record(model)
    quantizer, hooks = (record.quantizer, record.hooks) if record is not None else (None, None)
    state_dict: dict[str, torch.Tensor] = family_of(model).state_dict(model)
    metadata: dict[str, str] = {}
    config = model_config_dict(model)
    if hooks is not None:
        assert quantizer is not None
        if not hooks.is_serializable(quantizer=quantizer):
            raise SerializationError(
                f"the model is quantized with {quantizer.quant_method!r}, whose backend cannot save "
                "it; save the unquantized model and quantize on load instead"
            )
        state_dict, metadata = hooks.get_state_dict_and_metadata(
            quantizer=quantizer, model=model, state_dict=state_dict
        )
        config["quantization_config"] = quantizer.quantization_config.to_dict()
        if quantizer.pre_quantization_dtype is not None:
            config["_pre_quantization_dtype"] = str(quantizer.pre_quantization_dtype).removeprefix("torch.")
    family = family_of(model)
    names = (family.weights_name, family.bin_weights_name)
    stale = superseded_weight_files(names[0] if safe_serialization else names[1], variant)
    with atomic_directory(save_directory, superseded=stale) as tmp:
        _write_weights(tmp, state_dict, metadata, max_shard_size, variant, safe_serialization, names)
        _write_json(tmp / CONFIG_NAME, config)


def superseded_weight_files(weights_name: str, variant: str | None) -> Callable[[str], bool]:
    """Which files of an existing directory a save of ``weights_name`` (``model.safetensors``, say) in
    ``variant`` makes stale, by path relative to the directory: that variant's shards in either format (as
    diffusers removes them), that variant's index files and its single file of the same format. Other
    variants, the other format's single file and files in subfolders are not superseded."""
    base, _, extension = weights_name.rpartition(".")
    stem = base if variant is None else f"{base}.{variant}"
    index_variant = "" if variant is None else re.escape(f".{variant}")
    stale = re.compile(
        rf"{re.escape(stem)}-\d{{5}}-of-\d{{5}}\.(safetensors|bin)"
        rf"|{re.escape(base)}\.(safetensors|bin)\.index{index_variant}\.json"
        rf"|{re.escape(stem)}\.{re.escape(extension)}"
    )
    return lambda relative: stale.fullmatch(relative) is not None


# Keyword arguments of diffusers' and transformers' save_pretrained that change nothing in what qcore writes.
_SAVE_NO_OPS = frozenset({"save_function", "use_flashpack", "save_peft_format", "save_original_format"})
_HUB_OPTIONS = ("repo_id", "commit_message", "private", "create_pr", "token")


def save_with_qcore(
    self: torch.nn.Module,
    save_directory: str | os.PathLike[str],
    is_main_process: bool = True,
    *,
    safe_serialization: bool = True,
    variant: str | None = None,
    max_shard_size: int | str | None = None,
    push_to_hub: bool = False,
    **kwargs: Any,
) -> None:
    """``save_pretrained`` of a diffusers or transformers model that qcore loaded quantized: writes what
    :func:`qcore.save_pretrained` writes (the library's own method refuses quantized models), and with
    ``push_to_hub=True`` uploads that directory as the library would."""
    hub = {key: kwargs.pop(key) for key in _HUB_OPTIONS if key in kwargs}
    unknown = sorted(set(kwargs) - _SAVE_NO_OPS)
    if unknown:
        raise ConfigError(
            f"save_pretrained of a qcore-quantized {type(self).__name__} does not take {', '.join(unknown)}; "
            "it takes safe_serialization, variant, max_shard_size and push_to_hub (with repo_id, "
            "commit_message, private, create_pr, token)",
            option=unknown[0],
        )
    if not is_main_process:
        return
    options: dict[str, Any] = {"safe_serialization": safe_serialization, "variant": variant}
    if max_shard_size is not None:
        options["max_shard_size"] = max_shard_size
    save_pretrained(self, save_directory, **options)
    if push_to_hub:
        from huggingface_hub import create_repo, upload_folder

        token = hub.get("token")
        repo_id = hub.get("repo_id") or os.fspath(save_directory).rstrip(os.sep).split(os.sep)[-1]
        repo_id = create_repo(repo_id, exist_ok=True, private=hub.get("private"), token=token).repo_id
        upload_folder(
            repo_id=repo_id,
            folder_path=os.fspath(save_directory),
            token=token,
            commit_message=hub.get("commit_message") or "Upload qcore-quantized model",
            create_pr=hub.get("create_pr", False),
        )


def _write_weights(
    directory: Path,
    state_dict: dict[str, torch.Tensor],
    metadata: dict[str, str],
    max_shard_size: int | str,
    variant: str | None,
    safe_serialization: bool,
    names: tuple[str, str],
) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards

    weights_name = add_variant(names[0] if safe_serialization else names[1], variant)
    pattern = weights_name.replace(".safetensors", "{suffix}.safetensors").replace(".bin", "{suffix}.bin")
    split = split_torch_state_dict_into_shards(
        state_dict, filename_pattern=pattern, max_shard_size=max_shard_size
    )
    header = {"format": "pt", **{k: str(v) for k, v in metadata.items()}}
    for filename, keys in split.filename_to_tensors.items():
        path = directory / filename
        try:
            shard = {key: state_dict[key].contiguous() for key in keys}
            if safe_serialization:
                from safetensors.torch import save_file

                save_file(shard, str(path), metadata=header)
            else:
                with open(path, "wb") as f:  # a Python file: torch.save then keeps the OSError of a write
                    torch.save(shard, f)
        except Exception as exc:
            code = _os_error_code(exc)
            if code is not None:  # the file system's fault: atomic_directory names the path and what to do
                raise OSError(code, os.strerror(code), str(path)) from exc
            raise SerializationError(
                f"writing {filename} failed ({type(exc).__name__}: {exc}); nothing was saved"
            ) from exc
    if split.is_sharded:
        index_name = add_variant(f"{names[0] if safe_serialization else names[1]}.index.json", variant)
        index = {"metadata": {**split.metadata, **metadata}, "weight_map": split.tensor_to_filename}
        _write_json(directory / index_name, index)


def _os_error_code(exc: BaseException) -> int | None:
    """The errno behind a writer's failure: torch.save wraps the OSError, safetensors prints its code."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen.errno
        seen = seen.__cause__ or seen.__context__
    match = _OS_ERROR_IN_MESSAGE.search(str(exc))
    if match is not None and int(match.group(1)) in errno.errorcode:
        return int(match.group(1))
    return None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
