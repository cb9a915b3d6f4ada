"""save_pretrained: config.json + safetensors shards + index, written atomically.

Everything is written to a temporary directory beside the target and renamed into place, so a
failure or a kill never leaves a half-written checkpoint and never destroys the one already there.
Files in an existing target directory that are not part of a checkpoint (a README, say) are kept.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch

from ._checkpoint import BIN_WEIGHTS_NAME, CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, add_variant
from ._errors import SerializationError
from ._model import family_of, model_config_dict
from ._loadrecord import load_record

logger = logging.getLogger("qcore")

_CHECKPOINT_FILE = re.compile(
    r"^(config\.json|(diffusion_pytorch_model|model)\b.*\.(safetensors|bin|json))$"
)


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
    with _atomic_directory(Path(save_directory)) as tmp:
        _write_json(tmp / CONFIG_NAME, config)
        family = family_of(model)
        names = (family.weights_name, family.bin_weights_name)
        _write_weights(tmp, state_dict, metadata, max_shard_size, variant, safe_serialization, names)


def _write_weights(
    directory: Path,
    state_dict: dict[str, torch.Tensor],
    metadata: dict[str, str],
    max_shard_size: int | str,
    variant: str | None,
    safe_serialization: bool,
    names: tuple[str, str] = (SAFETENSORS_WEIGHTS_NAME, BIN_WEIGHTS_NAME),
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
                torch.save(shard, path)
        except Exception as exc:
            raise SerializationError(
                f"writing {filename} failed ({type(exc).__name__}: {exc}); nothing was saved"
            ) from exc
        _fsync(path)
    if split.is_sharded:
        index_name = add_variant(f"{names[0] if safe_serialization else names[1]}.index.json", variant)
        index = {"metadata": {**split.metadata, **metadata}, "weight_map": split.tensor_to_filename}
        _write_json(directory / index_name, index)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class _atomic_directory:
    """Yield a temporary directory; on success it replaces ``target``, on failure it vanishes."""

    def __init__(self, target: Path) -> None:
        self.target = target.absolute()
        if self.target.exists() and not self.target.is_dir():
            raise SerializationError(f"{self.target} exists and is not a directory")

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(
            tempfile.mkdtemp(prefix=f".{self.target.name}.", suffix=".qcore-tmp", dir=self.target.parent)
        )
        return self.tmp

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            self._replace()
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    def _replace(self) -> None:
        if not self.target.exists():
            os.rename(self.tmp, self.target)
            return
        for entry in self.target.iterdir():
            if _CHECKPOINT_FILE.match(entry.name) or (self.tmp / entry.name).exists():
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.copytree(entry, self.tmp / entry.name, copy_function=_link_or_copy, symlinks=True)
            else:
                _link_or_copy(str(entry), str(self.tmp / entry.name))
        backup = self.target.with_name(f".{self.target.name}.qcore-old-{uuid.uuid4().hex[:8]}")
        os.rename(self.target, backup)
        try:
            os.rename(self.tmp, self.target)
        except BaseException:
            os.rename(backup, self.target)
            raise
        shutil.rmtree(backup, ignore_errors=True)
