"""Finding a checkpoint's files (local directory or hub id), validating them and streaming their tensors.

The on-disk layout is diffusers': ``config.json`` plus ``diffusion_pytorch_model[.variant].safetensors``
or shards ``diffusion_pytorch_model[.variant]-0000i-of-0000n.safetensors`` listed in
``diffusion_pytorch_model.safetensors.index[.variant].json``. transformers' ``model.safetensors``
names are read too. ``.bin`` files are read only with ``torch.load(weights_only=True)``.

A checkpoint is untrusted input. Every JSON file and safetensors header is validated here, once, for
the loader and ``qcore inspect`` alike: shard names are plain file names inside the checkpoint, header
offsets tile the data section exactly, and sizes are capped before anything is allocated.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._errors import CheckpointError, CheckpointNotFoundError, ConfigError, CorruptCheckpointError
from ._singlefile import fetch_single_file

logger = logging.getLogger("qcore")

CONFIG_NAME = "config.json"
WEIGHTS_BASENAMES = ("diffusion_pytorch_model", "model")

# Larger than any real header, config or index (safetensors itself caps headers at 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_JSON_BYTES = 100 * 1024 * 1024
MAX_TENSOR_DIMS = 64
# Tensors handed to backends start on a multiple of this many bytes: what AVX-512 and every CPU
# kernel torch ships can assume (torch's own CPU allocator aligns to 64 bytes).
TENSOR_ALIGNMENT = 64


# --- dtypes -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SafetensorsDtype:
    """A safetensors dtype: its header name, the torch dtype name, and bits per element."""

    name: str
    torch_name: str | None
    bits: int

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return getattr(torch, self.torch_name, None) if self.torch_name else None

    @property
    def label(self) -> str:
        """The name users know: torch's, or the safetensors one where torch has none."""
        return self.torch_name or self.name


SAFETENSORS_DTYPES: dict[str, SafetensorsDtype] = {
    d.name: d
    for d in (
        SafetensorsDtype("F64", "float64", 64),
        SafetensorsDtype("F32", "float32", 32),
        SafetensorsDtype("F16", "float16", 16),
        SafetensorsDtype("BF16", "bfloat16", 16),
        SafetensorsDtype("F8_E4M3", "float8_e4m3fn", 8),
        SafetensorsDtype("F8_E4M3FNUZ", "float8_e4m3fnuz", 8),
        SafetensorsDtype("F8_E5M2", "float8_e5m2", 8),
        SafetensorsDtype("F8_E5M2FNUZ", "float8_e5m2fnuz", 8),
        SafetensorsDtype("F8_E8M0", "float8_e8m0fnu", 8),
        SafetensorsDtype("F6_E2M3", None, 6),
        SafetensorsDtype("F6_E3M2", None, 6),
        SafetensorsDtype("F4", "float4_e2m1fn_x2", 4),
        SafetensorsDtype("C64", "complex64", 64),
        SafetensorsDtype("I64", "int64", 64),
        SafetensorsDtype("I32", "int32", 32),
        SafetensorsDtype("I16", "int16", 16),
        SafetensorsDtype("I8", "int8", 8),
        SafetensorsDtype("U64", "uint64", 64),
        SafetensorsDtype("U32", "uint32", 32),
        SafetensorsDtype("U16", "uint16", 16),
        SafetensorsDtype("U8", "uint8", 8),
        SafetensorsDtype("BOOL", "bool", 8),
    )
}


@dataclass(frozen=True)
class StoredTensorInfo:
    """One tensor as a weight file's header (or a ``.bin`` state dict) describes it; no data."""

    dtype: str  # the label users know: "bfloat16", or the safetensors name torch lacks ("F6_E2M3")
    torch_dtype: torch.dtype | None
    shape: tuple[int, ...]
    nbytes: int
    offset: int | None = None  # absolute file offset of the first byte (safetensors only)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_shape(self) -> tuple[int, ...]:
        """The shape of the torch tensor: float4 packs two elements per item along the last dim."""
        if self.torch_dtype is not None and self.shape and self.numel and self.nbytes * 8 == self.numel * 4:
            return (*self.shape[:-1], self.shape[-1] // 2)
        return self.shape


@dataclass(frozen=True)
class WeightFileHeader:
    path: Path
    tensors: dict[str, StoredTensorInfo]
    metadata: dict[str, str]


# --- JSON ---------------------------------------------------------------------------------------


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            # JSON parsers keep the last of two equal keys; a header would then reinterpret bytes.
            raise _DuplicateKey(f"duplicate key {key!r}")
        result[key] = value
    return result


def decode_json(raw: bytes | str, where: str) -> Any:
    """Parse untrusted JSON: duplicate keys, deep nesting and bad encodings are CorruptCheckpointErrors."""
    try:
        return json.loads(raw, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise CorruptCheckpointError(f"{where}: {exc}") from None
    except RecursionError:
        raise CorruptCheckpointError(f"{where}: JSON nested too deeply to be a checkpoint file") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise CorruptCheckpointError(f"{where}: not valid JSON ({exc})") from None


def check_json_size(where: str, size: int) -> None:
    """Refuse a JSON file of the checkpoint (config.json, an index) larger than any real one, before
    reading or downloading it."""
    if size > MAX_JSON_BYTES:
        raise CorruptCheckpointError(
            f"{where}: {size} bytes, more than any real JSON file ({MAX_JSON_BYTES} bytes); the file is not "
            "a JSON file"
        )


def _read_json_bytes(path: Path) -> bytes:
    try:
        check_json_size(str(path), path.stat().st_size)
        with open(path, "rb") as f:
            return f.read(MAX_JSON_BYTES + 1)
    except OSError as exc:
        raise _os_error(path, exc) from exc


def _os_error(path: Path, exc: OSError) -> CheckpointError:
    if isinstance(exc, FileNotFoundError):
        return CheckpointNotFoundError(f"{path}: no such file (a dangling link?)")
    return CheckpointError(f"{path}: cannot be read: {exc.strerror or exc}")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a checkpoint file (config.json, an index), validated."""
    data = decode_json(_read_json_bytes(path), str(path))
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# --- safetensors headers ------------------------------------------------------------------------


def read_safetensors_header(path: Path) -> WeightFileHeader:
    """The validated header of a local safetensors file; reads no tensor data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            return parse_safetensors_header(path, f.read(8), size, f.read)
    except OSError as exc:
        raise _os_error(path, exc) from exc


def parse_safetensors_header(
    path: Path, head: bytes, size: int | None, read_header: Callable[[int], bytes]
) -> WeightFileHeader:
    """The validated header of a safetensors file, wherever its bytes come from (a local file, HTTP ranges).

    ``head`` is the start of the file: at least its 8-byte header length, unless the file is shorter.
    ``read_header(length)`` returns the ``length`` bytes after those 8, and is called only when ``head``
    does not hold them. ``size`` is the file's size, ``None`` when unknown (the header length is then
    checked against the limit alone, and the data section's end is not checked).
    """
    if len(head) < 8:
        raise CorruptCheckpointError(
            f"{path}: not a valid safetensors file (shorter than the 8-byte header length)"
        )
    (length,) = struct.unpack("<Q", head[:8])
    past_the_end = size is not None and length > size - 8
    if length > MAX_HEADER_BYTES or past_the_end:
        raise CorruptCheckpointError(
            f"{path}: not a valid safetensors file (header length {length} is larger than "
            f"{'the file' if past_the_end else 'any real header'})"
        )
    raw = head[8 : 8 + length] if len(head) - 8 >= length else read_header(length)
    if len(raw) != length:
        raise CorruptCheckpointError(
            f"{path}: not a valid safetensors file (the file ends inside the header)"
        )
    header = decode_json(raw, f"{path}: not a valid safetensors file, header")
    data_size = None if size is None else size - 8 - length
    return validate_safetensors_header(header, path, 8 + length, data_size)


def validate_safetensors_header(
    header: Any, path: Path, data_start: int, data_size: int | None
) -> WeightFileHeader:
    """Check a decoded header: known dtypes, sane shapes, offsets that tile the data section exactly.

    ``data_size`` is the length of the data section (``None`` when unknown, e.g. a hub file whose
    size was not given): then only the offsets' order and sizes are checked.
    """
    where = str(path)
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{where}: not a valid safetensors file (header is not a JSON object)")
    metadata = _header_metadata(header.get("__metadata__"), where)
    tensors: dict[str, StoredTensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        info, begin, end = _tensor_entry(key, entry, where, data_start)
        if data_size is not None and end > data_size:
            raise CorruptCheckpointError(
                f"{where}: tensor {key!r}: data_offsets [{begin}, {end}] extend past the end of the data "
                f"section ({data_size} bytes): the file is truncated or its header is corrupt"
            )
        tensors[key] = info
        spans.append((begin, end, key))
    spans.sort()
    # Overlaps first: a tensor given another's offsets also leaves a gap where its bytes were, and the
    # overlap names it (the gap names only its neighbours).
    furthest, holder = 0, None
    for begin, end, key in spans:
        if begin < furthest:
            raise CorruptCheckpointError(
                f"{where}: tensor {key!r}: data_offsets [{begin}, {end}] overlap tensor {holder!r}"
            )
        if end >= furthest:
            furthest, holder = end, key
    position, previous = 0, None
    for begin, end, key in spans:
        if begin > position:
            raise CorruptCheckpointError(
                f"{where}: tensor {key!r}: data_offsets [{begin}, {end}] leave a gap after byte {position}"
                + (f" (the end of tensor {previous!r})" if previous else "")
            )
        position, previous = end, key
    if data_size is not None and position != data_size:
        culprit = f"tensor {previous!r} ends at byte {position}" if previous else "the header lists no data"
        relation = "past the end of" if position > data_size else "before the end of"
        raise CorruptCheckpointError(
            f"{where}: {culprit}, {relation} the data section ({data_size} bytes): the file is "
            "truncated or its header is corrupt"
        )
    return WeightFileHeader(path, tensors, metadata)


def _header_metadata(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise CorruptCheckpointError(
            f"{where}: header key '__metadata__' must be an object of strings, got {_json_type(value)}"
        )
    return value


def _json_type(value: Any) -> str:
    if isinstance(value, dict):
        bad = next((k for k, v in value.items() if not isinstance(v, str)), None)
        return f"a {type(value[bad]).__name__} for {bad!r}" if bad is not None else "an object"
    return f"a {type(value).__name__}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor_entry(key: str, entry: Any, where: str, data_start: int) -> tuple[StoredTensorInfo, int, int]:
    def bad(problem: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{where}: tensor {key!r}: {problem}")

    if not isinstance(entry, dict):
        raise bad(f"header entry must be an object, got a {type(entry).__name__}")
    for required in ("dtype", "shape", "data_offsets"):
        if required not in entry:
            raise bad(f"header entry has no {required!r}")
    name = entry["dtype"]
    dtype = SAFETENSORS_DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise bad(f"unknown dtype {name!r} (known: {', '.join(SAFETENSORS_DTYPES)})")
    shape = entry["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_TENSOR_DIMS
        or not all(_is_int(dim) and dim >= 0 for dim in shape)
    ):
        raise bad(f"shape {shape!r} is not a list of at most {MAX_TENSOR_DIMS} non-negative integers")
    offsets = entry["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise bad(f"data_offsets {offsets!r} is not a list of two integers")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise bad(f"data_offsets [{begin}, {end}] are not an ordered pair of non-negative offsets")
    bits = math.prod(shape) * dtype.bits
    if bits % 8 or bits // 8 != end - begin:
        raise bad(
            f"shape {shape} of {dtype.name} needs {bits / 8:g} bytes, but data_offsets [{begin}, {end}] "
            f"span {end - begin}"
        )
    info = StoredTensorInfo(dtype.label, dtype.torch_dtype, tuple(shape), end - begin, data_start + begin)
    return info, begin, end


# --- bin files ----------------------------------------------------------------------------------


def load_bin_state(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a ``.bin`` file, read with ``weights_only=True`` (memory-mapped)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except OSError as exc:
        raise _os_error(path, exc) from exc
    except Exception as exc:  # the unpickler's many error types
        raise CorruptCheckpointError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({exc})"
        ) from exc
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CorruptCheckpointError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor named by a string"
            )
    return state


def bin_tensor_info(tensor: torch.Tensor) -> StoredTensorInfo:
    return StoredTensorInfo(
        str(tensor.dtype).removeprefix("torch."),
        tensor.dtype,
        tuple(tensor.shape),
        tensor.numel() * tensor.element_size(),
    )


def read_weight_file(path: Path) -> tuple[WeightFileHeader, dict[str, torch.Tensor] | None]:
    """A weight file's validated tensor list; ``.bin`` files also return their (mmapped) state dict."""
    if path.suffix == ".safetensors":
        return read_safetensors_header(path), None
    state = load_bin_state(path)
    return WeightFileHeader(path, {k: bin_tensor_info(t) for k, t in state.items()}, {}), state


# --- locating files -----------------------------------------------------------------------------


def add_variant(filename: str, variant: str | None) -> str:
    """``a.safetensors`` -> ``a.fp16.safetensors``;
    ``a.safetensors.index.json`` -> ``a.safetensors.index.fp16.json``."""
    if variant is None:
        return filename
    head, _, ext = filename.rpartition(".")
    return f"{head}.{variant}.{ext}"


def weight_candidates(
    variant: str | None, use_safetensors: bool | None, weights_names: Sequence[str] = ()
) -> list[tuple[str, bool]]:
    """(filename, is_index) of a checkpoint's weights, in the order they are looked for: diffusers' and
    transformers' ``.safetensors`` names, then ``.bin`` ones; ``weights_names`` (a model family's own, such
    as transformers' ``pytorch_model.bin``) are looked for too."""
    exts = []
    if use_safetensors is not False:
        exts.append("safetensors")
    if use_safetensors is not True:
        exts.append("bin")
    names = []
    for ext in exts:
        own = [name.removesuffix(f".{ext}") for name in weights_names if name.endswith(f".{ext}")]
        for base in dict.fromkeys((*WEIGHTS_BASENAMES, *own)):
            names.append((add_variant(f"{base}.{ext}.index.json", variant), True))
            names.append((add_variant(f"{base}.{ext}", variant), False))
    return names


def shard_names(index: Mapping[str, Any], index_name: str) -> dict[str, str]:
    """An index's validated ``weight_map`` (tensor key -> shard file name).

    Shard names must be plain file names of the index's format: never a path that could leave the
    checkpoint (``../x``, ``/abs``, ``sub/x``).
    """
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptCheckpointError(f"{index_name}: no 'weight_map' object in the index")
    suffix = ".bin" if ".bin.index" in Path(index_name).name else ".safetensors"
    for key, name in weight_map.items():
        if not isinstance(name, str):
            raise CorruptCheckpointError(
                f"{index_name}: weight_map[{key!r}] must be a file name, got a {type(name).__name__}"
            )
        if not is_plain_file_name(name) or not name.endswith(suffix):
            raise CorruptCheckpointError(
                f"{index_name}: weight_map[{key!r}] = {name!r} is not a plain {suffix} file name in the "
                "checkpoint directory; an index may only name files beside it"
            )
    return weight_map


def is_plain_file_name(name: str) -> bool:
    return (
        bool(name)
        and name not in (".", "..")
        and not any(sep in name for sep in ("/", "\\", "\0", ":"))
        and not os.path.isabs(name)
        and name == name.strip()
    )


def hub_cache_repository(directory: Path) -> Path | None:
    """The repository folder when ``directory`` lies in a Hugging Face cache snapshot."""
    for parent in (directory, *directory.parents):
        if parent.parent.name == "snapshots":
            return parent.parent.parent
    return None


def check_inside(path: Path, root: Path) -> None:
    """Refuse a file of the checkpoint that links outside it (hub-cache links to its blobs are fine)."""
    target = path.resolve()
    if target.is_relative_to(root.resolve()):
        return
    repository = hub_cache_repository(root.absolute())
    if repository is not None and target.is_relative_to((repository / "blobs").resolve()):
        return
    raise CorruptCheckpointError(
        f"{path}: links to {target}, outside the checkpoint {root}; refusing to read it"
    )


def looks_like_local_path(path: str) -> bool:
    """A string a user meant as a directory, never a hub id: ``./x``, ``/x``, ``~/x``, ``a/b/c``."""
    return (
        path.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or path in (".", "..")
        or path.count("/") > 1
        or (os.sep != "/" and os.sep in path)
        or os.path.exists(path)
    )


def check_hub_id(path: str) -> None:
    """Raise CheckpointNotFoundError unless ``path`` can be a hub id (checked before any network)."""
    if looks_like_local_path(path):
        what = "is not a directory" if os.path.exists(path) else "no such directory"
        raise CheckpointNotFoundError(
            f"{path!r}: {what} (it is neither a local directory nor a valid hub id)"
        )
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        raise CheckpointNotFoundError(
            f"{path!r} is neither a local directory nor a valid hub id (no such directory)"
        ) from None


def hub_error(exc: BaseException, repo: str, location: str) -> CheckpointNotFoundError | None:
    """The qcore error for a huggingface_hub failure, or None when the file is simply absent."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError)):
        return CheckpointNotFoundError(f"hub repository {repo!r}: {exc}")
    if is_not_cached(exc):
        return CheckpointNotFoundError(
            f"{location} is not in the local Hugging Face cache and could not be downloaded (offline "
            f"mode, or the hub is unreachable: {exc}); check the network, or pass a local directory"
        )
    if isinstance(exc, EntryNotFoundError):
        return None
    return CheckpointNotFoundError(
        f"cannot read {location} from the hub ({type(exc).__name__}: {exc}); check the network, "
        "or pass a local directory"
    )


def is_not_cached(exc: BaseException | None) -> bool:
    """A file absent from the local cache while the hub was not asked (offline) or not reachable."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    return isinstance(exc, LocalEntryNotFoundError)


def download_hub_file(
    repo: str, filename: str, subfolder: str | None, options: Mapping[str, Any], location: str
) -> Path | None:
    """The local path of a file of hub repository ``repo``, downloaded or taken from the cache with
    ``hf_hub_download``'s keyword arguments ``options``; None when the repository has no such file.

    Any other failure is the CheckpointNotFoundError of :func:`hub_error`, naming ``location`` and caused
    by huggingface_hub's error.
    """
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename, subfolder=subfolder, **options))
    except Exception as exc:
        error = hub_error(exc, repo, location)
        if error is None:
            return None
        raise error from exc


def _proxies(proxies: Mapping[str, str] | None) -> dict[str, Any]:
    """``proxies`` as an ``hf_hub_download`` argument, where the installed huggingface_hub takes one."""
    if not proxies:
        return {}
    from huggingface_hub import __version__ as hub_version
    from huggingface_hub import hf_hub_download

    if "proxies" not in inspect.signature(hf_hub_download).parameters:
        raise ConfigError(
            f"proxies={dict(proxies)!r} is not supported by qcore: huggingface_hub {hub_version} takes "
            "proxies only from the environment; set HTTPS_PROXY / HTTP_PROXY (and NO_PROXY) instead",
            option="proxies",
        )
    return {"proxies": dict(proxies)}


@dataclass
class CheckpointFiles:
    """Where a checkpoint's config and weight files are, once found (and downloaded)."""

    location: str
    config_path: Path | None  # None for a single weight file: its config comes from elsewhere
    weight_files: list[Path]
    index_path: Path | None = None
    weight_map: dict[str, Path] | None = None
    # hf_hub_download's keyword arguments the files were fetched with (a config named by hub id is fetched
    # the same way)
    hub_options: dict[str, Any] = field(default_factory=dict)

    @property
    def config_source(self) -> Path:
        """The file errors about the config name: config.json, or the single weight file."""
        return self.config_path if self.config_path is not None else self.weight_files[0]


class _Fetcher:
    """Returns the local path of a file of the checkpoint, or None if it does not exist."""

    def __init__(self, path: str, subfolder: str | None, hub_kwargs: dict[str, Any]) -> None:
        self.path = path
        self.subfolder = subfolder or None
        self.hub_kwargs = hub_kwargs
        self.local_dir = Path(path, subfolder or "") if os.path.isdir(path) else None
        self.not_cached: CheckpointNotFoundError | None = None
        if self.local_dir is None:
            check_hub_id(path)

    @property
    def location(self) -> str:
        if self.local_dir:
            return str(self.local_dir)
        return self.path + (f" (subfolder {self.subfolder!r})" if self.subfolder else "")

    def get(self, filename: str) -> Path | None:
        if self.local_dir is not None:
            candidate = self.local_dir / filename
            if not candidate.is_file():
                if candidate.is_symlink():
                    raise CheckpointNotFoundError(f"{candidate}: a link to a file that does not exist")
                return None
            check_inside(candidate, self.local_dir)
            return candidate
        try:
            return download_hub_file(self.path, filename, self.subfolder, self.hub_kwargs, self.location)
        except CheckpointNotFoundError as error:
            # Offline, a file absent from the cache may be one the checkpoint never had (the weight names
            # are guesses): only a missing config.json reports it.
            if not is_not_cached(error.__cause__):
                raise
            self.not_cached = error
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
    force_download: bool = False,
    proxies: Mapping[str, str] | None = None,
    weights_names: Sequence[str] = (),
) -> CheckpointFiles:
    """Find config.json and the weight files; for hub ids, download only those files (again, with
    ``force_download=True``). ``weights_names`` are file names of the model's library to look for beside
    diffusers' and transformers' usual ones (``pytorch_model.bin``).

    ``path`` may also name one weight file (local, ``<owner>/<repo>/<file>`` or a hub file URL): the
    result then lists that file as its weights, and has no ``config_path``.
    """
    hub = {
        "revision": revision,
        "cache_dir": cache_dir,
        "local_files_only": local_files_only,
        "token": token,
        "force_download": force_download,
        **_proxies(proxies),
    }
    single = fetch_single_file(os.fspath(path), hub)
    if single is not None:
        return CheckpointFiles(str(single), None, [single], hub_options=hub)
    fetcher = _Fetcher(os.fspath(path), subfolder, hub)
    if fetcher.local_dir is not None and not fetcher.local_dir.is_dir():
        raise CheckpointNotFoundError(f"subfolder {subfolder!r} does not exist in {os.fspath(path)!r}")
    config_path = fetcher.get(CONFIG_NAME)
    if config_path is None:
        if fetcher.not_cached is not None:
            raise CheckpointNotFoundError(f"{CONFIG_NAME} of {fetcher.not_cached}")
        raise CheckpointNotFoundError(f"{CONFIG_NAME} not found in {fetcher.location}")
    tried = []
    for filename, is_index in weight_candidates(variant, use_safetensors, weights_names):
        tried.append(filename)
        found = fetcher.get(filename)
        if found is None:
            continue
        if not is_index:
            return CheckpointFiles(fetcher.location, config_path, [found], hub_options=hub)
        return _from_index(fetcher, config_path, found)
    raise CheckpointNotFoundError(
        f"no weights in {fetcher.location}: looked for {', '.join(tried)}"
        + (f" (variant {variant!r})" if variant else "")
        + _variant_hint(fetcher.local_dir, variant, tried)
    )


def _variant_hint(directory: Path | None, variant: str | None, tried: list[str]) -> str:
    """Name the variants present when the requested one is absent: the usual cause of a miss."""
    if directory is None:
        return ""
    bases = {name.split(".")[0] for name in tried}
    found = set()
    for path in directory.iterdir():
        parts = path.name.split(".")
        if len(parts) >= 3 and parts[0] in bases and parts[-1] in ("safetensors", "bin"):
            found.add(parts[1].split("-")[0] if parts[1] != "safetensors" else parts[-2])
    found.discard(variant or "")
    found -= {"safetensors", "bin", "index"}
    return f"; the directory holds the variant(s) {', '.join(sorted(found))}: pass variant=" if found else ""


def _from_index(fetcher: _Fetcher, config_path: Path, index_path: Path) -> CheckpointFiles:
    names = shard_names(read_json(index_path), str(index_path))
    shards: dict[str, Path] = {}
    for shard_name in dict.fromkeys(names.values()):
        shard = fetcher.get(shard_name)
        if shard is None:
            key = next(k for k, v in names.items() if v == shard_name)
            raise CheckpointNotFoundError(
                f"shard {shard_name!r} listed in {index_path.name} (for {key!r} and others) is missing "
                f"from {fetcher.location}"
            )
        shards[shard_name] = shard
    weight_map = {key: shards[name] for key, name in names.items()}
    return CheckpointFiles(
        fetcher.location, config_path, list(shards.values()), index_path, weight_map, fetcher.hub_kwargs
    )


# --- reading ------------------------------------------------------------------------------------


def check_value_dtype(
    key: str, value: torch.Tensor | StoredTensorInfo, expected: torch.dtype, where: str
) -> None:
    """Refuse a tensor whose kind cannot become the parameter's (integer or bool data for a float).

    Casting would load it silently wrong, or fail deep inside torch with a raw error.
    """
    dtype = value.torch_dtype if isinstance(value, StoredTensorInfo) else value.dtype
    if dtype is None or not expected.is_floating_point:
        return
    if not dtype.is_floating_point or dtype.is_complex:
        raise CorruptCheckpointError(
            f"{where}: tensor {key!r} is {str(dtype).removeprefix('torch.')}, but the model's parameter is "
            f"{str(expected).removeprefix('torch.')}: the checkpoint does not belong to this model, or it is "
            "quantized and its config.json lost its quantization_config"
        )


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or an aligned copy when its data does not start on a TENSOR_ALIGNMENT boundary.

    safetensors hands out memory-mapped views whose start is the file offset of the tensor; kernels
    such as ``torch._weight_int8pack_mm`` crash on such views. A copy made by torch's allocator is
    aligned.
    """
    if tensor.device.type == "cpu" and tensor.numel() and tensor.data_ptr() % TENSOR_ALIGNMENT:
        return tensor.clone(memory_format=torch.contiguous_format)
    return tensor


class CheckpointReader:
    """Streams tensors of a checkpoint one at a time; never holds the whole state dict.

    Entering reads and validates every header (no tensor data), and checks them against the index.
    """

    def __init__(self, files: CheckpointFiles) -> None:
        self.files = files
        self.keys: list[str] = []
        self.key_file: dict[str, Path] = {}
        self.metadata: dict[str, str] = {}
        self.headers: dict[Path, WeightFileHeader] = {}
        self._states: dict[Path, dict[str, torch.Tensor]] = {}
        self._handles: dict[Path, Any] = {}

    def __enter__(self) -> CheckpointReader:
        weight_map = self.files.weight_map
        index = self.files.index_path
        for path in self.files.weight_files:
            header, state = read_weight_file(path)
            self.headers[path] = header
            if state is not None:
                self._states[path] = state
            self.metadata.update(header.metadata)
            for key in header.tensors:
                if weight_map is None:
                    self.key_file[key] = path
                elif key not in weight_map:
                    raise CorruptCheckpointError(
                        f"{index}: does not list tensor {key!r}, which {path.name} holds"
                    )
                elif weight_map[key] == path:
                    self.key_file[key] = path
                else:
                    raise CorruptCheckpointError(
                        f"{index}: tensor {key!r} is mapped to {weight_map[key].name}, but {path.name} "
                        "holds it too"
                    )
        if weight_map is not None:
            for key, path in weight_map.items():
                if key not in self.key_file:
                    raise CorruptCheckpointError(
                        f"{index}: key {key!r} is mapped to {path.name}, which does not hold it"
                    )
        self.keys = list(self.key_file)
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()
        self._states.clear()

    def info(self, key: str) -> StoredTensorInfo:
        return self.headers[self.key_file[key]].tensors[key]

    def read(self, key: str) -> torch.Tensor:
        """The tensor ``key`` on the CPU, aligned to TENSOR_ALIGNMENT bytes."""
        path = self.key_file[key]
        if path in self._states:
            return aligned(self._states[path][key])
        info = self.info(key)
        if info.torch_dtype is None:
            raise CorruptCheckpointError(
                f"{path}: tensor {key!r} has dtype {info.dtype}, which torch cannot hold"
            )
        try:
            tensor = self._handle(path).get_tensor(key)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CorruptCheckpointError(f"{path}: tensor {key!r} cannot be read ({exc})") from exc
        return aligned(tensor)

    def _handle(self, path: Path) -> Any:
        if path not in self._handles:
            from safetensors import safe_open

            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
                handle.__enter__()
            except Exception as exc:  # the header passed our checks: the file changed, or safetensors differs
                raise CorruptCheckpointError(f"{path}: not a valid safetensors file ({exc})") from exc
            self._handles[path] = handle
        return self._handles[path]

    def dtype_and_numel(self, key: str) -> tuple[torch.dtype | None, int]:
        """A tensor's dtype and element count from the file header, without reading its data."""
        info = self.info(key)
        return info.torch_dtype, info.numel

    def file_of(self, key: str) -> str:
        path = self.key_file.get(key)
        return path.name if path else "?"
