"""The quantization config base class and the rules for merging configs."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from ._errors import ConfigError, ConfigMismatchError

logger = logging.getLogger("qcore")

C = TypeVar("C", bound="QuantizationConfig")


def _to_jsonable(value: Any) -> Any:
    import torch

    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, Mapping):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_to_jsonable(v) for v in value]
    return value


class QuantizationConfig:
    """Base class of every backend's config.

    A subclass sets ``quant_method`` (the registry name, as written in config.json) and takes its
    options as ``__init__`` keyword arguments, validating them there and raising
    :class:`qcore.ConfigError` with the option's name and the valid choices.

    The defaults of :meth:`to_dict` / :meth:`from_dict` round-trip every public attribute; override
    them where the on-disk form differs (e.g. bitsandbytes' ``_load_in_4bit``).
    ``loading_attributes`` names the options a user may still change when loading a pre-quantized
    checkpoint (e.g. a compute dtype); every other field comes from the checkpoint.
    """

    quant_method: ClassVar[str] = ""
    loading_attributes: ClassVar[frozenset[str]] = frozenset()

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form written to config.json's ``quantization_config``."""
        fields = {k: _to_jsonable(v) for k, v in vars(self).items() if not k.startswith("_")}
        return {"quant_method": self.quant_method, **fields}

    @classmethod
    def from_dict(cls: type[C], config_dict: Mapping[str, Any]) -> C:
        """Build a config from its :meth:`to_dict` form (``quant_method`` is checked, not passed)."""
        data = dict(config_dict)
        method = data.pop("quant_method", cls.quant_method)
        if method != cls.quant_method:
            raise ConfigMismatchError(
                f"{cls.__name__} is for quant_method {cls.quant_method!r}, got {method!r}",
                option="quant_method",
            )
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"invalid {cls.__name__} options {sorted(data)}: {exc}") from exc

    def to_json_string(self, use_diff: bool = False) -> str:
        """``to_dict()`` as indented JSON (``use_diff`` keeps only fields that differ from defaults)."""
        data = self.to_dict()
        if use_diff:
            try:
                default = type(self)().to_dict()
            except Exception:  # a config without defaults for every field has no "diff" form
                default = {}
            data = {k: v for k, v in data.items() if k == "quant_method" or default.get(k) != v}
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantizationConfig):
            return NotImplemented
        return type(self) is type(other) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(self.to_json_string())

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    def __deepcopy__(self, memo: dict[int, Any]) -> QuantizationConfig:
        clone = copy.copy(self)
        clone.__dict__ = copy.deepcopy(self.__dict__, memo)
        return clone


def merge_quantization_configs(
    checkpoint_config: QuantizationConfig, user_config: QuantizationConfig | None
) -> QuantizationConfig:
    """The config a pre-quantized load uses: the checkpoint's, with the user's loading attributes.

    Every other field the user set differently is dropped, and all of them are named in one warning.
    A user config for another quant_method is an error.
    """
    if user_config is None:
        return checkpoint_config
    if user_config.quant_method != checkpoint_config.quant_method:
        raise ConfigMismatchError(
            f"the checkpoint is quantized with quant_method {checkpoint_config.quant_method!r} but "
            f"quantization_config asks for {user_config.quant_method!r}; a pre-quantized checkpoint "
            "cannot be re-quantized: drop quantization_config or load the unquantized checkpoint",
            option="quant_method",
        )
    merged = copy.deepcopy(checkpoint_config)
    ckpt_fields = checkpoint_config.to_dict()
    user_fields = user_config.to_dict()
    dropped = []
    for name, value in user_fields.items():
        if ckpt_fields.get(name) == value:
            continue
        if name in type(checkpoint_config).loading_attributes:
            setattr(merged, name, copy.deepcopy(getattr(user_config, name)))
        else:
            dropped.append(name)
    if dropped:
        logger.warning(
            "The checkpoint's quantization_config is used; these fields of the quantization_config "
            "you passed differ from it and are ignored: %s",
            ", ".join(sorted(dropped)),
        )
    return merged
