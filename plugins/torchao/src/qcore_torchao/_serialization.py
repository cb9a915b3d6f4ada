"""Reading torchao configs and tensor metadata from untrusted JSON, and flattening for safetensors.

torchao's own decoders look a ``_type`` name up in a few torchao modules and call whatever they find
with the stored arguments. A checkpoint is untrusted input, so every ``_type`` is checked here first:
configs may name only torchao classes of the kinds a config is made of (configs, granularities,
enums, dataclasses, named tuples), tensor metadata only torchao's own allow-listed tensor classes.
Nothing in a checkpoint can make qcore import a module or call a function.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import json
import logging
import warnings
from collections.abc import Mapping
from typing import Any

import torch

import qcore

logger = logging.getLogger("qcore.torchao")

TORCHAO_VERSION_KEY = "torchao_version"
TENSOR_NAMES_KEY = "tensor_names"
PLAIN_TENSOR_TYPE = "Tensor"


def torchao_version() -> str:
    import torchao

    return str(torchao.__version__)


def _is_encoded(value: Any) -> bool:
    return isinstance(value, Mapping) and "_type" in value and "_data" in value


def _walk(value: Any, visit: Any, path: str) -> None:
    """Call ``visit(node, path)`` on every encoded object inside ``value``."""
    if _is_encoded(value):
        visit(value, path)
        _walk(value["_data"], visit, f"{path}.{value['_type']}")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _walk(item, visit, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _walk(item, visit, f"{path}[{i}]")


def _check_dtype(node: Mapping[str, Any], where: str, error: type[Exception]) -> None:
    name = node["_data"]
    if not isinstance(name, str) or not isinstance(getattr(torch, name, None), torch.dtype):
        raise error(f"{where}: {name!r} is not a torch dtype")


# --- configs ------------------------------------------------------------------------------------


def _config_class(name: str) -> type | None:
    """The class torchao's ``config_from_dict`` would pick for ``name``, or ``None``."""
    from torchao.core.config import ALLOWED_AO_MODULES

    if not name.isidentifier():
        return None
    for module_path in sorted(ALLOWED_AO_MODULES):
        try:
            module = importlib.import_module(module_path)  # a fixed list of torchao's own modules
        except ImportError:
            continue
        found = getattr(module, name, None)
        if found is not None:
            return found if isinstance(found, type) else None
    return None


def _config_part_allowed(cls: type) -> bool:
    from torchao.core.config import AOBaseConfig

    module = getattr(cls, "__module__", "") or ""
    if module != "torchao" and not module.startswith("torchao."):
        return False
    if issubclass(cls, (AOBaseConfig, enum.Enum)):
        return True
    try:
        from torchao.quantization.granularity import Granularity

        if issubclass(cls, Granularity):
            return True
    except ImportError:
        pass
    is_named_tuple = issubclass(cls, tuple) and hasattr(cls, "_fields")
    return dataclasses.is_dataclass(cls) or is_named_tuple


def parse_config(data: Any, where: str) -> Any:
    """An ``AOBaseConfig`` from its ``config_to_dict`` form, allowing only torchao's config classes.

    A ``_version`` that differs from the installed torchao's default is logged as a warning and the
    config is built as torchao builds it; one that no longer parses is a :class:`qcore.ConfigError`.
    """
    from torchao.core.config import AOBaseConfig, config_from_dict

    if not _is_encoded(data):
        raise qcore.ConfigError(
            f"{where} must be a torchao config as written by torchao.core.config.config_to_dict "
            f"(an object with '_type' and '_data'), not {data!r}",
            option="quant_type",
        )

    data = json.loads(json.dumps(data))  # a private copy: versions of nested parts are adjusted below
    nested_versions: list[str] = []

    def visit(node: dict[str, Any], path: str) -> None:
        name = node["_type"]
        if name == "torch.dtype":
            _check_dtype(node, f"{where}{path}", qcore.ConfigError)
            return
        cls = _config_class(name) if isinstance(name, str) else None
        if cls is None or not _config_part_allowed(cls):
            raise qcore.ConfigError(
                f"{where}{path} names {name!r}, which is not a torchao config class: a torchao "
                "quantization_config may only name torchao's own config, granularity and enum classes "
                f"(torchao {torchao_version()} is installed). Re-save the checkpoint with a current "
                "torchao, or pass a TorchAoConfig built in code",
                option="quant_type",
            )
        # Only AOBaseConfigs have a version field; torchao would pass another version of a
        # granularity or named tuple to a constructor that does not take one, and fail.
        if node is not data and "_version" in node and not issubclass(cls, AOBaseConfig):
            current = getattr(cls, "version", 1)
            if node["_version"] != current:
                nested_versions.append(f"{name} {node['_version']} -> {current}")
                node["_version"] = current

    _walk(data, visit, "")
    if nested_versions:
        logger.warning(
            "%s: parts saved by another torchao version are read as the installed torchao %s's: %s",
            where,
            torchao_version(),
            ", ".join(nested_versions),
        )
    top = _config_class(data["_type"])
    if top is None or not issubclass(top, AOBaseConfig):
        raise qcore.ConfigError(
            f"{where} names {data['_type']!r}, which is not a torchao AOBaseConfig subclass",
            option="quant_type",
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            config = config_from_dict(data)
        except Exception as exc:  # torchao raises ValueError/TypeError/AssertionError for stale configs
            raise qcore.ConfigError(
                f"{where}: torchao {torchao_version()} cannot build {data['_type']} from the stored "
                f"fields ({type(exc).__name__}: {exc}). The config was probably written by another "
                "torchao version: install the torchao version that wrote it, or re-quantize",
                option="quant_type",
            ) from exc
    for warning in caught:
        logger.warning("%s (%s): %s", where, data["_type"], warning.message)
    stored = data.get("_version")
    current = getattr(type(config), "version", None)
    if stored is not None and current is not None and stored != current and not caught:
        logger.warning(
            "%s: %s was saved as version %s, torchao %s defaults to version %s; it still parses, "
            "loading it as saved",
            where,
            data["_type"],
            stored,
            torchao_version(),
            current,
        )
    return config


def dump_config(config: Any) -> dict[str, Any]:
    from torchao.core.config import config_to_dict

    return config_to_dict(config)


# --- tensor metadata ----------------------------------------------------------------------------


def tensor_subclass_names() -> list[str]:
    from torchao.prototype.safetensors.safetensors_utils import ALLOWED_TENSORS_SUBCLASSES

    return list(ALLOWED_TENSORS_SUBCLASSES)


def parse_tensor_entry(raw: Any, name: str, where: str) -> dict[str, Any]:
    """One tensor's safetensors metadata entry, checked: its type and every nested type allow-listed."""
    from torchao.prototype.safetensors.safetensors_utils import ALLOWED_CLASSES

    if not isinstance(raw, str):
        raise qcore.CorruptCheckpointError(f"{where}: the metadata of {name!r} is missing or not a string")
    try:
        entry = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise qcore.CorruptCheckpointError(
            f"{where}: the metadata of {name!r} is not valid JSON ({exc}); the checkpoint is damaged, "
            "save it again"
        ) from exc
    if not isinstance(entry, dict) or not isinstance(entry.get("_type"), str):
        raise qcore.CorruptCheckpointError(f"{where}: the metadata of {name!r} has no '_type'")
    kind = entry["_type"]
    if kind == PLAIN_TENSOR_TYPE:
        return entry
    allowed = tensor_subclass_names()
    if kind not in allowed:
        raise qcore.CorruptCheckpointError(
            f"{where}: {name!r} is stored as {kind!r}, which is not a torchao tensor class qcore loads "
            f"(allowed: {', '.join(allowed)}, or plain {PLAIN_TENSOR_TYPE})"
        )
    data_names = entry.get("_tensor_data_names")
    if (
        not isinstance(entry.get("_data"), dict)
        or not isinstance(data_names, list)
        or not data_names
        or not all(isinstance(n, str) and n.isidentifier() for n in data_names)
    ):
        raise qcore.CorruptCheckpointError(
            f"{where}: the metadata of {name!r} ({kind}) lacks '_data' or '_tensor_data_names'"
        )

    def visit(node: Mapping[str, Any], path: str) -> None:
        node_type = node["_type"]
        if node_type == "torch.dtype":
            _check_dtype(node, f"{where}: {name}{path}", qcore.CorruptCheckpointError)
        elif node_type not in ALLOWED_CLASSES:
            raise qcore.CorruptCheckpointError(
                f"{where}: the metadata of {name!r} names {node_type!r} at {path or '.'}, which is not "
                "one of torchao's allow-listed classes"
            )

    _walk(entry["_data"], visit, "")
    return entry


def flattened_key(tensor_name: str, data_name: str) -> str:
    """torchao's safetensors key for one inner tensor: ``blocks.0.attn._weight_qdata``."""
    module, attr = qcore.split_param_name(tensor_name)
    return f"{module}._{attr}_{data_name}" if module else f"_{attr}_{data_name}"


def build_tensor(entry: Mapping[str, Any], parts: Mapping[str, torch.Tensor], name: str, where: str) -> Any:
    """The torchao tensor subclass described by ``entry`` with its inner tensors ``parts``."""
    from torchao.prototype.safetensors.safetensors_utils import object_from_dict

    qdata = parts.get("qdata")
    if qdata is not None and qdata.is_floating_point() and qdata.element_size() > 1:
        # Every torchao format stores its quantized values in 8 bits or fewer (packed in integers).
        raise qcore.CorruptCheckpointError(
            f"{where}: {flattened_key(name, 'qdata')!r} of {name!r} ({entry['_type']}) is {qdata.dtype}, "
            "not a quantized dtype; the checkpoint is damaged or not a torchao checkpoint"
        )
    data = {**entry["_data"], **parts}
    try:
        return object_from_dict({"_type": entry["_type"], "_data": data})
    except Exception as exc:
        raise qcore.CorruptCheckpointError(
            f"{where}: cannot rebuild {name!r} as {entry['_type']} with torchao {torchao_version()}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def flatten(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """torchao's safetensors flattening, with unsupported tensor types named in the error."""
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    allowed = set(tensor_subclass_names())
    for key, tensor in state_dict.items():
        if type(tensor) is not torch.Tensor and type(tensor).__name__ not in allowed:
            raise qcore.SerializationError(
                f"{key!r} is a {type(tensor).__name__}, which torchao {torchao_version()} cannot save "
                f"as safetensors (it saves {', '.join(sorted(allowed))}). Quantize with a config "
                "that produces one of those, or save the unquantized model"
            )
    tensors, metadata = flatten_tensor_state_dict(dict(state_dict))
    metadata = {k: str(v) for k, v in metadata.items()}
    metadata[TORCHAO_VERSION_KEY] = torchao_version()
    return tensors, metadata
