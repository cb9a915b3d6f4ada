"""Finding a checkpoint's files (local directory or hub id) and streaming its tensors.

The on-disk layout is diffusers': ``config.json`` plus ``diffusion_pytorch_model[.variant].safetensors``
or shards ``diffusion_pytorch_model[.variant]-0000i-of-0000n.safetensors`` listed in
``diffusion_pytorch_model.safetensors.index[.variant].json``. transformers' ``model.safetensors``
names are read too. ``.bin`` files are read only with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._errors import CheckpointNotFoundError, CorruptCheckpointError

logger = logging.getLogger("qcore")

CONFIG_NAME = "config.json"
WEIGHTS_BASENAMES = ("diffusion_pytorch_model", "model")
SAFETENSORS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
BIN_WEIGHTS_NAME = "diffusion_pytorch_model.bin"


def add_variant(filename: str, variant: str | None) -> str:
    """``a.safetensors`` -> ``a.fp16.safetensors``; ``a.safetensors.index.json`` -> ``a.safetensors.index.fp16.json``."""
    if variant is None:
        return filename
    head, _, ext = filename.rpartition(".")
    return f"{head}.{variant}.{ext}"


def _candidates(variant: str | None, use_safetensors: bool | None) -> list[tuple[str, bool]]:
    """(filename, is_index) in the order they are looked for."""
    exts = []
    if use_safetensors is not False:
        exts.append("safetensors")
    if use_safetensors is not True:
        exts.append("bin")
    names = []
    for ext in exts:
        for base in WEIGHTS_BASENAMES:
            names.append((add_variant(f"{base}.{ext}.index.json", variant), True))
            names.append((add_variant(f"{base}.{ext}", variant), False))
    return names


@dataclass
class CheckpointFiles:
    """Where a checkpoint's config and weight files are, once found (and downloaded)."""

    location: str
    config_path: Path
    weight_files: list[Path]
    index_path: Path | None = None
    weight_map: dict[str, Path] | None = None

    @property
    def directory(self) -> Path:
        return self.config_path.parent


class _Fetcher:
    """Returns the local path of a file of the checkpoint, or None if it does not exist."""

    def __init__(self, path: str, subfolder: str | None, hub_kwargs: dict[str, Any]) -> None:
        self.path = path
        self.subfolder = subfolder or None
        self.hub_kwargs = hub_kwargs
        self.local_dir = Path(path, subfolder or "") if os.path.isdir(path) else None
        self.not_cached: Exception | None = None
        if self.local_dir is None:
            self._check_hub_id()

    @property
    def location(self) -> str:
        return str(self.local_dir) if self.local_dir else f"{self.path}" + (
            f" (subfolder {self.subfolder!r})" if self.subfolder else ""
        )

    def _check_hub_id(self) -> None:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(self.path)
        except HFValidationError:
            raise CheckpointNotFoundError(
                f"{self.path!r} is neither a local directory nor a valid hub id"
            ) from None

    def get(self, filename: str) -> Path | None:
        if self.local_dir is not None:
            candidate = self.local_dir / filename
            return candidate if candidate.is_file() else None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        try:
            return Path(hf_hub_download(self.path, filename, subfolder=self.subfolder, **self.hub_kwargs))
        except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as exc:
            raise CheckpointNotFoundError(f"hub repository {self.path!r}: {exc}") from exc
        except LocalEntryNotFoundError as exc:  # (a subclass of EntryNotFoundError: check it first)
            # Not cached, and the hub was not asked (offline) or could not be reached.
            self.not_cached = exc
            return None
        except EntryNotFoundError:
            return None


def locate_checkpoint(
    path: str | os.PathLike[str],
    *,
    subfolder: str | None = None,
    variant: str | None = None,
    use_safetensors: bool | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> CheckpointFiles:
    """Find config.json and the weight files; for hub ids, download only those files."""
    fetcher = _Fetcher(
        os.fspath(path),
        subfolder,
        {"revision": revision, "cache_dir": cache_dir, "local_files_only": local_files_only, "token": token},
    )
    if fetcher.local_dir is not None and not fetcher.local_dir.is_dir():
        raise CheckpointNotFoundError(f"subfolder {subfolder!r} does not exist in {os.fspath(path)!r}")
    config_path = fetcher.get(CONFIG_NAME)
    if config_path is None:
        if fetcher.not_cached is not None:
            raise CheckpointNotFoundError(
                f"{CONFIG_NAME} of {fetcher.location} is not in the local Hugging Face cache and could not "
                f"be downloaded (offline mode, or the hub is unreachable): {fetcher.not_cached}"
            )
        raise CheckpointNotFoundError(f"{CONFIG_NAME} not found in {fetcher.location}")
    tried = []
    for filename, is_index in _candidates(variant, use_safetensors):
        tried.append(filename)
        found = fetcher.get(filename)
        if found is None:
            continue
        if not is_index:
            return CheckpointFiles(fetcher.location, config_path, [found])
        return _from_index(fetcher, config_path, found)
    raise CheckpointNotFoundError(
        f"no weights in {fetcher.location}: looked for {', '.join(tried)}"
        + (f" (variant {variant!r})" if variant else "")
        + _variant_hint(fetcher.local_dir, variant)
    )


def _variant_hint(directory: Path | None, variant: str | None) -> str:
    """Name the variants present when the requested one is absent: the usual cause of a miss."""
    if directory is None:
        return ""
    found = set()
    for path in directory.iterdir():
        parts = path.name.split(".")
        if len(parts) >= 3 and parts[0] in WEIGHTS_BASENAMES and parts[-1] in ("safetensors", "bin"):
            found.add(parts[1].split("-")[0] if parts[1] != "safetensors" else parts[-2])
    found.discard(variant or "")
    found -= {"safetensors", "bin", "index"}
    return f"; the directory holds the variant(s) {', '.join(sorted(found))}: pass variant=" if found else ""


def _from_index(fetcher: _Fetcher, config_path: Path, index_path: Path) -> CheckpointFiles:
    index = read_json(index_path)
    weight_map_raw = index.get("weight_map")
    if not isinstance(weight_map_raw, dict) or not weight_map_raw:
        raise CorruptCheckpointError(f"{index_path}: no 'weight_map' in the index")
    shards: dict[str, Path] = {}
    for shard_name in dict.fromkeys(weight_map_raw.values()):
        shard = fetcher.get(shard_name)
        if shard is None:
            raise CheckpointNotFoundError(
                f"shard {shard_name!r} listed in {index_path.name} is missing from {fetcher.location}"
            )
        shards[shard_name] = shard
    weight_map = {key: shards[name] for key, name in weight_map_raw.items()}
    return CheckpointFiles(fetcher.location, config_path, list(shards.values()), index_path, weight_map)


_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


def read_safetensors_header(path: Path) -> tuple[int, dict[str, dict[str, Any]], dict[str, str]]:
    """(offset of the data section, tensor entries, metadata) of a safetensors file; reads no tensor data."""
    try:
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise ValueError("file is shorter than the 8-byte header length")
            (length,) = struct.unpack("<Q", raw_len)
            if length > _MAX_HEADER_BYTES:
                raise ValueError(f"header length {length} is implausible")
            raw = f.read(length)
            if len(raw) != length:
                raise ValueError("file ends inside the header")
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"{path}: not a valid safetensors file ({exc})") from exc
    metadata = header.pop("__metadata__", None) or {}
    return 8 + length, header, {str(k): str(v) for k, v in metadata.items()}


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


@dataclass
class CheckpointReader:
    """Streams tensors of a checkpoint one at a time; never holds the whole state dict."""

    files: CheckpointFiles
    keys: list[str] = field(default_factory=list)
    key_file: dict[str, Path] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    _handles: dict[Path, Any] = field(default_factory=dict)
    _stack: ExitStack = field(default_factory=ExitStack)

    def __enter__(self) -> CheckpointReader:
        for path in self.files.weight_files:
            handle = self._open(path)
            self._handles[path] = handle
            if path.suffix == ".safetensors":
                self.metadata.update(handle.metadata() or {})
            for key in handle.keys():
                if self.files.weight_map is None or self.files.weight_map.get(key) == path:
                    self.key_file.setdefault(key, path)
        if self.files.weight_map is not None:
            for key, path in self.files.weight_map.items():
                if key not in self.key_file:
                    raise CorruptCheckpointError(
                        f"{self.files.index_path}: key {key!r} is mapped to {path.name}, which does not hold it"
                    )
        self.keys = list(self.key_file)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handles.clear()
        self._stack.close()

    def _open(self, path: Path) -> Any:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                return self._stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            except Exception as exc:  # safetensors raises its own error types for bad headers
                raise CorruptCheckpointError(f"{path}: not a valid safetensors file ({exc})") from exc
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise CorruptCheckpointError(
                f"{path}: cannot be read with torch.load(weights_only=True) ({exc})"
            ) from exc
        if not isinstance(state, dict):
            raise CorruptCheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
        return _DictHandle(state)

    def read(self, key: str) -> torch.Tensor:
        path = self.key_file[key]
        try:
            return self._handles[path].get_tensor(key)
        except Exception as exc:
            raise CorruptCheckpointError(f"{path}: tensor {key!r} cannot be read ({exc})") from exc

    def dtype_and_numel(self, key: str) -> tuple[torch.dtype | None, int]:
        """A tensor's dtype and element count from the file header, without reading its data."""
        handle = self._handles[self.key_file[key]]
        if isinstance(handle, _DictHandle):
            tensor = handle.state[key]
            return tensor.dtype, tensor.numel()
        view = handle.get_slice(key)
        numel = 1
        for dim in view.get_shape():
            numel *= dim
        return _SAFETENSORS_DTYPES.get(view.get_dtype()), numel

    def file_of(self, key: str) -> str:
        path = self.key_file.get(key)
        return path.name if path else "?"



_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class _DictHandle:
    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state

    def keys(self) -> list[str]:
        return list(self.state)

    def get_tensor(self, key: str) -> torch.Tensor:
        return self.state[key]

    def metadata(self) -> dict[str, str]:
        return {}
