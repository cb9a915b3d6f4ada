"""What a checkpoint is, from config.json and the weight files' headers: never the tensor data.

Local directories are read in place. For hub ids, files already in the local cache are read there,
and the headers of the others are fetched with HTTP range requests, so inspecting a 24 GB checkpoint
downloads a few kilobytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._checkpoint import CONFIG_NAME, _candidates, locate_checkpoint, read_json, read_safetensors_header
from ._errors import BackendError, CheckpointNotFoundError, ConfigError, CorruptCheckpointError
from ._registry import _legacy_quant_method, install_hint, resolve_config

# safetensors dtype -> the torch name users know.
_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
    "F4": "float4_e2m1fn_x2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}
# A safetensors header larger than this is a corrupt length field, not a real header.


@dataclass
class TensorEntry:
    dtype: str
    elements: int
    nbytes: int


@dataclass
class Shard:
    name: str
    size: int | None
    tensors: int


@dataclass
class DtypeTotal:
    tensors: int = 0
    elements: int = 0
    bytes: int = 0


@dataclass
class Loadability:
    loadable: bool
    backend: str | None = None
    distribution: str | None = None
    version: str | None = None
    config_class: str | None = None
    problem: str | None = None
    install_hint: str | None = None


@dataclass
class Survey:
    location: str
    class_name: str | None
    library_version: str | None
    quant_method: str | None
    quantization_config: dict[str, Any] | None
    pre_quantization_dtype: str | None
    index: str | None
    shards: list[Shard]
    tensors: int
    parameters: int
    dtypes: dict[str, DtypeTotal]
    metadata: dict[str, str] = field(default_factory=dict)
    load: Loadability = field(default_factory=lambda: Loadability(True))

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def parse_safetensors_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """The tensors (dtype, element count, bytes) and metadata of a safetensors file's header."""
    _, header, metadata = read_safetensors_header(path)
    tensors = {}
    try:
        for key, info in header.items():
            elements = 1
            for dim in info["shape"]:
                elements *= int(dim)
            start, end = info["data_offsets"]
            tensors[key] = TensorEntry(_DTYPE_NAMES.get(info["dtype"], info["dtype"]), elements, end - start)
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptCheckpointError(f"{path}: not a valid safetensors file ({exc})") from exc
    return tensors, metadata


def _bin_tensors(path: Path) -> dict[str, TensorEntry]:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CorruptCheckpointError(f"{path}: cannot be read with torch.load(weights_only=True) ({exc})") from exc
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return {
        key: TensorEntry(str(t.dtype).removeprefix("torch."), t.numel(), t.numel() * t.element_size())
        for key, t in state.items()
    }


def _is_hub_id(path: str) -> bool:
    return not os.path.isdir(path)


def survey(
    path: str,
    *,
    subfolder: str | None = None,
    variant: str | None = None,
    revision: str | None = None,
    token: str | None = None,
) -> Survey:
    """Describe the checkpoint at a local directory or hub id, and whether it can be loaded here."""
    if _is_hub_id(path) and not _hub_offline():
        files = _HubFiles(path, subfolder, variant, revision, token)
        config, location = files.config(), files.location
        shards_raw, index = files.weights()
    else:
        located = locate_checkpoint(
            path,
            subfolder=subfolder,
            variant=variant,
            revision=revision,
            token=token,
            local_files_only=_is_hub_id(path),
        )
        config, location = read_json(located.config_path), located.location
        index = located.index_path.name if located.index_path else None
        shards_raw = []
        for weight_file in located.weight_files:
            if weight_file.suffix == ".safetensors":
                tensors, metadata = parse_safetensors_header(weight_file)
            else:
                tensors, metadata = _bin_tensors(weight_file), {}
            shards_raw.append((weight_file.name, weight_file.stat().st_size, tensors, metadata))
    return _summarize(location, config, index, shards_raw)


def _summarize(
    location: str,
    config: dict[str, Any],
    index: str | None,
    shards_raw: list[tuple[str, int | None, dict[str, TensorEntry], dict[str, str]]],
) -> Survey:
    shards, dtypes, metadata = [], {}, {}
    tensors = parameters = 0
    for name, size, entries, shard_metadata in shards_raw:
        shards.append(Shard(name, size, len(entries)))
        metadata.update(shard_metadata)
        for entry in entries.values():
            total = dtypes.setdefault(entry.dtype, DtypeTotal())
            total.tensors += 1
            total.elements += entry.elements
            total.bytes += entry.nbytes
            tensors += 1
            parameters += entry.elements
    quant_config = config.get("quantization_config")
    quant_method = None
    if isinstance(quant_config, dict):
        quant_method = quant_config.get("quant_method") or _legacy_quant_method(quant_config)
    library_version = config.get("_diffusers_version") or config.get("transformers_version")
    result = Survey(
        location=location,
        class_name=config.get("_class_name") or _first(config.get("architectures")),
        library_version=library_version,
        quant_method=quant_method,
        quantization_config=quant_config if isinstance(quant_config, dict) else None,
        pre_quantization_dtype=config.get("_pre_quantization_dtype"),
        index=index,
        shards=shards,
        tensors=tensors,
        parameters=parameters,
        dtypes=dict(sorted(dtypes.items(), key=lambda item: -item[1].bytes)),
        metadata=metadata,
    )
    result.load = loadability(quant_config)
    return result


def _first(value: Any) -> str | None:
    return value[0] if isinstance(value, list) and value else None


def loadability(quant_config: Any) -> Loadability:
    """Whether an installed backend can read this quantization_config (``None``: no backend needed)."""
    if quant_config is None:
        return Loadability(True)
    if not isinstance(quant_config, dict):
        return Loadability(False, problem="config.json: quantization_config is not an object")
    try:
        _, backend = resolve_config(quant_config)
    except BackendError as exc:
        hint = getattr(exc, "install_hint", None)
        method = getattr(exc, "quant_method", None)
        return Loadability(
            False,
            backend=method,
            problem=str(exc),
            install_hint=hint if hint and hint.startswith("pip ") else (install_hint(method) if method else None),
        )
    except ConfigError as exc:
        return Loadability(False, problem=f"config.json: invalid quantization_config: {exc}")
    cls = backend.config_class
    return Loadability(
        True,
        backend=backend.quant_method,
        distribution=backend.distribution,
        version=backend.version,
        config_class=f"{cls.__module__}.{cls.__qualname__}",
    )


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


class _HubFiles:
    """A hub checkpoint read header-only: small JSON files downloaded, weight headers range-read."""

    def __init__(
        self, repo: str, subfolder: str | None, variant: str | None, revision: str | None, token: str | None
    ) -> None:
        from huggingface_hub import HfApi
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(repo)
        except HFValidationError:
            raise CheckpointNotFoundError(f"{repo!r} is neither a local directory nor a valid hub id") from None
        self.repo, self.subfolder, self.variant = repo, subfolder or None, variant
        self.revision, self.token = revision, token
        self.api = HfApi(token=token)
        self.location = repo + (f" (subfolder {self.subfolder!r})" if self.subfolder else "")

    def _path(self, filename: str) -> str:
        return f"{self.subfolder}/{filename}" if self.subfolder else filename

    def _errors(self) -> tuple[type[BaseException], ...]:
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

        return (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError)

    def _download(self, filename: str) -> Path | None:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        try:
            return Path(hf_hub_download(self.repo, self._path(filename), revision=self.revision, token=self.token))
        except LocalEntryNotFoundError as exc:  # before EntryNotFoundError: it is the offline case
            raise self._unreachable(exc) from exc
        except EntryNotFoundError:
            return None
        except self._errors() as exc:
            raise CheckpointNotFoundError(f"hub repository {self.repo!r}: {exc}") from exc

    def _unreachable(self, exc: BaseException) -> CheckpointNotFoundError:
        return CheckpointNotFoundError(
            f"cannot read {self.location} from the hub and it is not in the local cache "
            f"({type(exc).__name__}: {exc}); check the network, or pass a local directory"
        )

    def config(self) -> dict[str, Any]:
        path = self._download(CONFIG_NAME)
        if path is None:
            raise CheckpointNotFoundError(f"{CONFIG_NAME} not found in {self.location}")
        return read_json(path)

    def weights(self) -> tuple[list[tuple[str, int | None, dict[str, TensorEntry], dict[str, str]]], str | None]:
        from ._errors import QcoreError

        try:
            return self._weights()
        except QcoreError:
            raise
        except self._errors() as exc:
            raise CheckpointNotFoundError(f"hub repository {self.repo!r}: {exc}") from exc
        except Exception as exc:  # network and HTTP errors of whichever client huggingface_hub uses
            raise self._unreachable(exc) from exc

    def _weights(self) -> tuple[list[tuple[str, int | None, dict[str, TensorEntry], dict[str, str]]], str | None]:
        present = {
            info.path: getattr(info, "size", None)
            for info in self.api.get_paths_info(
                self.repo, [self._path(name) for name, _ in _candidates(self.variant, None)], revision=self.revision
            )
        }
        for filename, is_index in _candidates(self.variant, None):
            if self._path(filename) not in present:
                continue
            if not is_index:
                return [self._header(filename, present[self._path(filename)])], None
            index_path = self._download(filename)
            assert index_path is not None
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CorruptCheckpointError(f"{filename} in {self.location}: no 'weight_map' in the index")
            names = list(dict.fromkeys(weight_map.values()))
            sizes = {
                info.path: getattr(info, "size", None)
                for info in self.api.get_paths_info(self.repo, [self._path(n) for n in names], revision=self.revision)
            }
            return [self._header(name, sizes.get(self._path(name))) for name in names], filename
        raise CheckpointNotFoundError(f"no weights in {self.location}")

    def _header(
        self, filename: str, size: int | None
    ) -> tuple[str, int | None, dict[str, TensorEntry], dict[str, str]]:
        if filename.endswith(".bin"):
            path = self._download(filename)  # pickles have no header: the whole file is needed
            assert path is not None
            return filename, path.stat().st_size, _bin_tensors(path), {}
        parsed = self.api.parse_safetensors_file_metadata(self.repo, self._path(filename), revision=self.revision)
        tensors = {
            key: TensorEntry(
                _DTYPE_NAMES.get(info.dtype, info.dtype), info.parameter_count, info.data_offsets[1] - info.data_offsets[0]
            )
            for key, info in parsed.tensors.items()
        }
        return filename, size, tensors, dict(parsed.metadata or {})
