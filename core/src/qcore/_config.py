"""The quantization config base class and the rules for merging configs."""

from __future__ import annotations

import copy
import difflib
import inspect
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
    #: Keys of the :meth:`to_dict` form that are not ``__init__`` arguments (e.g. ``"_load_in_4bit"``).
    serialized_keys: ClassVar[frozenset[str]] = frozenset()
    #: Keys other writers (diffusers, transformers) put in a checkpoint's quantization_config that this
    #: config does not use: a checkpoint may carry them, a user's dict may not.
    checkpoint_only_keys: ClassVar[frozenset[str]] = frozenset()

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

    @classmethod
    def option_names(cls) -> frozenset[str]:
        """The keys a config dict may hold: ``quant_method``, the named ``__init__`` arguments and
        :attr:`serialized_keys`."""
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        return frozenset({"quant_method", *named, *cls.serialized_keys})

    @classmethod
    def from_user_dict(cls: type[C], options: Mapping[str, Any]) -> C:
        """A config from a user's dict (``quantization_config={...}``, ``qcore ... --set``): as strict as
        the constructor. A key that is no option raises :class:`qcore.ConfigError` naming it, with the
        closest option name when there is one."""
        if not isinstance(options, Mapping):
            raise ConfigError(
                f"{cls.__name__} options must be a dict, not {type(options).__name__}",
                option="quantization_config",
            )
        known = cls.option_names()
        unknown = sorted(str(key) for key in options if key not in known)
        if unknown:
            key = unknown[0]
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            names = ", ".join(sorted(known - {"quant_method"} - cls.serialized_keys))
            raise ConfigError(
                f"{cls.__name__} has no option {key!r}{hint}; its options are: {names}", option=key
            )
        return cls.from_dict(options)

    @classmethod
    def from_checkpoint_dict(cls: type[C], config_dict: Mapping[str, Any], where: str = "") -> C:
        """A config from a checkpoint's config.json ``quantization_config``.

        Keys of :attr:`checkpoint_only_keys` (written by diffusers or transformers, unused here) are
        dropped; other unknown keys are dropped with a warning naming them, so a checkpoint written by
        a newer or different writer still loads when the keys that decide its layout are known.
        """
        known = cls.option_names()
        data = {k: v for k, v in config_dict.items() if k in known}
        foreign = sorted(str(k) for k in config_dict if k not in known and k in cls.checkpoint_only_keys)
        unknown = sorted(str(k) for k in config_dict if k not in known and k not in cls.checkpoint_only_keys)
        source = f"{where}: " if where else ""
        if foreign:
            logger.debug(
                "%squantization_config keys not used by %s: %s",
                source,
                cls.__name__,
                ", ".join(map(repr, foreign)),
            )
        if unknown:
            logger.warning(
                "%squantization_config has option(s) %s does not know, ignored: %s",
                source,
                cls.__name__,
                ", ".join(map(repr, unknown)),  # repr: checkpoint text never reaches a terminal raw
            )
        return cls.from_dict(data)

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
