"""What a checkpoint is, from config.json and the weight files' headers: never the tensor data.

Local directories are read in place. For hub ids, files already in the local cache are read there,
and the headers of the others are fetched with HTTP range requests, so inspecting a 24 GB checkpoint
downloads a few kilobytes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ._checkpoint import (
    CONFIG_NAME,
    CheckpointReader,
    StoredTensorInfo,
    check_hub_id,
    check_json_size,
    download_hub_file,
    hub_error,
    locate_checkpoint,
    parse_safetensors_header,
    read_json,
    read_weight_file,
    shard_names,
    weight_candidates,
)
from ._errors import BackendError, CheckpointNotFoundError, ConfigError, QcoreError
from ._formats import open_format
from ._registry import install_command, quant_method_of, resolve_config

_T = TypeVar("_T")
# Weight file names of a model library that inspect looks for beside diffusers' and transformers' usual
# ones (it describes a checkpoint before it knows the model class).
OTHER_WEIGHTS_NAMES = ("pytorch_model.bin",)


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
        return asdict(self)


_ShardRaw = tuple[str, "int | None", dict[str, StoredTensorInfo], dict[str, str]]


def survey(
    path: str,
    *,
    subfolder: str | None = None,
    variant: str | None = None,
    revision: str | None = None,
    token: str | None = None,
) -> Survey:
    """Describe the checkpoint at a local directory or hub id, and whether it can be loaded here.

    Local files go through the loader's own reader, so ``inspect`` rejects exactly what a load would.
    """
    if os.path.isfile(path):
        config, shard = _single_file(Path(path))
        return _summarize(path, config, None, [shard])
    is_hub_id = not os.path.isdir(path)
    if is_hub_id and not _hub_offline():
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
            local_files_only=is_hub_id,
            weights_names=OTHER_WEIGHTS_NAMES,
        )
        if located.config_path is None:  # a hub file named by <owner>/<repo>/<file>, from the cache
            config, shard = _single_file(located.weight_files[0])
            return _summarize(located.location, config, None, [shard])
        config, location = read_json(located.config_path), located.location
        index = located.index_path.name if located.index_path else None
        with CheckpointReader(located) as reader:
            shards_raw = [
                (path.name, path.stat().st_size, header.tensors, header.metadata)
                for path, header in reader.headers.items()
            ]
    return _summarize(location, config, index, shards_raw)


def _single_file(path: Path) -> tuple[dict[str, Any], _ShardRaw]:
    """A lone weight file, read by its format (the loader's reader for safetensors, a plugin for others)."""
    with open_format(path) as fmt:
        tensors = {
            key: StoredTensorInfo(
                info.quant_type or (str(info.dtype).removeprefix("torch.") if info.dtype else "?"),
                info.dtype,
                tuple(info.shape),
                info.nbytes,
            )
            for key, info in fmt.tensors().items()
        }
        config = dict(fmt.model_config() or {})
        implied = fmt.quantization_config()
        metadata = fmt.metadata()
    if implied is not None:
        config.setdefault("quantization_config", implied)
    return config, (path.name, path.stat().st_size, tensors, metadata)


def _summarize(
    location: str,
    config: dict[str, Any],
    index: str | None,
    shards_raw: list[_ShardRaw],
) -> Survey:
    shards, dtypes, metadata = [], {}, {}
    tensors = parameters = 0
    for name, size, entries, shard_metadata in shards_raw:
        shards.append(Shard(name, size, len(entries)))
        metadata.update(shard_metadata)
        for entry in entries.values():
            total = dtypes.setdefault(entry.dtype, DtypeTotal())
            total.tensors += 1
            total.elements += entry.numel
            total.bytes += entry.nbytes
            tensors += 1
            parameters += entry.numel
    quant_config = config.get("quantization_config")
    quant_method = None
    if isinstance(quant_config, dict):
        quant_method = quant_method_of(quant_config)
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
        _, backend = resolve_config(quant_config, checkpoint="config.json")
    except BackendError as exc:
        hint = getattr(exc, "install_hint", None)
        method = getattr(exc, "quant_method", None)
        return Loadability(
            False,
            backend=method,
            problem=str(exc),
            install_hint=hint
            if hint and hint.startswith("pip ")
            else (install_command(method) if method else None),
        )
    except ConfigError as exc:
        problem = str(exc).removeprefix("config.json: ")
        return Loadability(False, problem=f"config.json: invalid quantization_config: {problem}")
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

        check_hub_id(repo)
        self.repo, self.subfolder, self.variant = repo, subfolder or None, variant
        self.revision, self.token = revision, token
        self.api = HfApi(token=token)
        self.hub_options = {"revision": revision, "token": token, "endpoint": self.api.endpoint}
        self.location = repo + (f" (subfolder {self.subfolder!r})" if self.subfolder else "")

    def _path(self, filename: str) -> str:
        return f"{self.subfolder}/{filename}" if self.subfolder else filename

    def _download(self, filename: str) -> Path:
        path = download_hub_file(self.repo, filename, self.subfolder, self.hub_options, self.location)
        if path is None:
            raise CheckpointNotFoundError(f"{filename} not found in {self.location}")
        return path

    def config(self) -> dict[str, Any]:
        return self._asking_the_hub(
            lambda: self._json(CONFIG_NAME, self._sizes([CONFIG_NAME]).get(self._path(CONFIG_NAME)))
        )

    def _json(self, filename: str, size: int | None) -> dict[str, Any]:
        """A JSON file of the repository, refused before the download when it is larger than any real one
        (as a local one is refused before it is read)."""
        if size is not None:
            check_json_size(f"{self.location}: {filename}", size)
        return read_json(self._download(filename))

    def weights(self) -> tuple[list[_ShardRaw], str | None]:
        return self._asking_the_hub(self._weights)

    def _asking_the_hub(self, call: Callable[[], _T]) -> _T:
        try:
            return call()
        except QcoreError:
            raise
        except Exception as exc:  # hub and network errors of whichever client huggingface_hub uses
            raise (hub_error(exc, self.repo, self.location) or CheckpointNotFoundError(str(exc))) from exc

    def _sizes(self, names: list[str]) -> dict[str, int | None]:
        infos = self.api.get_paths_info(self.repo, [self._path(n) for n in names], revision=self.revision)
        return {info.path: getattr(info, "size", None) for info in infos}

    def _weights(self) -> tuple[list[_ShardRaw], str | None]:
        candidates = weight_candidates(self.variant, None, OTHER_WEIGHTS_NAMES)
        present = self._sizes([name for name, _ in candidates])
        for filename, is_index in candidates:
            if self._path(filename) not in present:
                continue
            if not is_index:
                return [self._header(filename, present[self._path(filename)])], None
            index = self._json(filename, present[self._path(filename)])
            names = list(dict.fromkeys(shard_names(index, f"{filename} in {self.location}").values()))
            sizes = self._sizes(names)
            return [self._header(name, sizes.get(self._path(name))) for name in names], filename
        raise CheckpointNotFoundError(f"no weights in {self.location}")

    def _header(self, filename: str, size: int | None) -> _ShardRaw:
        if filename.endswith(".bin"):  # pickles have no header: the whole file is needed
            path = self._download(filename)
            header, _ = read_weight_file(path)
            return filename, path.stat().st_size, header.tensors, header.metadata
        fetch = self._range_reader(filename)
        # The first range read holds all of a usual header; a larger one takes a second.
        header = parse_safetensors_header(
            Path(f"{self.location}: {filename}"),
            fetch(0, 100_000),
            size,
            lambda length: fetch(8, length + 7),
        )
        return filename, size, header.tensors, header.metadata

    def _range_reader(self, filename: str) -> Callable[[int, int], bytes]:
        """``fetch(first, last)``: those bytes of a hub file, by an HTTP range request.

        Not through download_hub_file: hf_hub_download fetches whole files, and a header is a few kilobytes
        of gigabytes. Its errors reach hub_error through _asking_the_hub.
        """
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        url = hf_hub_url(self.repo, self._path(filename), revision=self.revision, endpoint=self.api.endpoint)
        headers = build_hf_headers(token=self.token)

        def fetch(first: int, last: int) -> bytes:
            response = get_session().get(
                url, headers={**headers, "range": f"bytes={first}-{last}"}, timeout=30
            )
            hf_raise_for_status(response)
            return response.content

        return fetch
