"""TorchAoConfig: a torchao config instance or a familiar string, serialized as diffusers does."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import qcore

from ._quant_types import config_from_string
from ._serialization import dump_config, parse_config

DEFAULT_KEY = "default"


def _is_ao_config(value: Any) -> bool:
    from torchao.core.config import AOBaseConfig

    return isinstance(value, AOBaseConfig)


class TorchAoConfig(qcore.QuantizationConfig):
    """Quantize with torchao.

    Args:
        quant_type: a torchao ``AOBaseConfig`` instance (``Int8WeightOnlyConfig()``,
            ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``, ``FqnToConfig(...)``, ...)
            or one of the strings diffusers used to accept: ``"int8wo"``, ``"int8dq"``, ``"int4wo"``
            (``group_size=``), ``"int4dq"``, ``"float8wo"``, ``"float8wo_e5m2"``, ``"float8dq"``,
            ``"float8dq_e4m3_tensor"``, ``"float8dq_e4m3_row"``, ``"uint4wo"``, ... The string is only
            a shorthand: the config stores and saves the torchao config it maps to.
        modules_to_not_convert: module names left unquantized, matched by whole name components
            (``"proj_out"`` skips ``blocks.0.proj_out`` but not ``blocks.0.proj_out_2``).
        **kwargs: options of a string quant_type (``group_size``, ``int4_packing_format``).

    The config.json form is diffusers': ``{"quant_method": "torchao", "modules_to_not_convert": ...,
    "quant_type": {"default": config_to_dict(quant_type)}}``.
    """

    quant_method = "torchao"
    # The options of a string quant_type, as older diffusers wrote them.
    serialized_keys = frozenset({"quant_type_kwargs"})
    # transformers' TorchAoConfig options for language models' embeddings; diffusion models have none.
    checkpoint_only_keys = frozenset({"include_input_output_embeddings", "untie_embedding_weights"})

    def __init__(
        self,
        quant_type: Any,
        modules_to_not_convert: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(quant_type, str):
            self._quant_type_name: str | None = quant_type
            config = config_from_string(quant_type, kwargs)
        elif _is_ao_config(quant_type):
            if kwargs:
                raise qcore.ConfigError(
                    f"the option(s) {', '.join(sorted(kwargs))} apply only to a string quant_type; "
                    f"set them on the {type(quant_type).__name__} instance instead",
                    option=sorted(kwargs)[0],
                )
            self._quant_type_name = None
            config = quant_type
        else:
            raise qcore.ConfigError(
                "quant_type must be a torchao AOBaseConfig instance (e.g. "
                "torchao.quantization.Int8WeightOnlyConfig()) or a string such as 'int8wo', not "
                f"{type(quant_type).__name__} {quant_type!r}",
                option="quant_type",
            )
        if isinstance(modules_to_not_convert, str) or (
            modules_to_not_convert is not None and not all(isinstance(m, str) for m in modules_to_not_convert)
        ):
            raise qcore.ConfigError(
                f"modules_to_not_convert must be a list of module names, not {modules_to_not_convert!r}",
                option="modules_to_not_convert",
            )
        self.quant_type = config
        self.modules_to_not_convert = (
            list(modules_to_not_convert) if modules_to_not_convert is not None else None
        )

    def get_apply_tensor_subclass(self) -> Any:
        """The torchao config to hand to ``quantize_`` (diffusers' name for it)."""
        return self.quant_type

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": self.quant_method,
            "modules_to_not_convert": list(self.modules_to_not_convert)
            if self.modules_to_not_convert is not None
            else None,
            "quant_type": {DEFAULT_KEY: dump_config(self.quant_type)},
        }

    @classmethod
    def from_dict(cls, config_dict: Mapping[str, Any]) -> TorchAoConfig:
        """From diffusers' form, and from the string form older diffusers wrote
        (``"quant_type": "int4wo", "quant_type_kwargs": {...}``)."""
        data = dict(config_dict)
        method = data.pop("quant_method", cls.quant_method)
        if method != cls.quant_method:
            raise qcore.ConfigMismatchError(
                f"TorchAoConfig is for quant_method 'torchao', got {method!r}", option="quant_method"
            )
        if "quant_type" not in data:
            raise qcore.ConfigError("a torchao quantization_config needs 'quant_type'", option="quant_type")
        quant_type = data.pop("quant_type")
        modules = data.pop("modules_to_not_convert", None)
        string_kwargs = data.pop("quant_type_kwargs", None) or {}
        if data:
            raise qcore.ConfigError(
                f"unknown torchao quantization_config field(s) {', '.join(sorted(data))}; the fields "
                "are quant_method, quant_type, modules_to_not_convert",
                option=sorted(data)[0],
            )
        if isinstance(quant_type, str):
            if not isinstance(string_kwargs, Mapping):
                raise qcore.ConfigError("quant_type_kwargs must be an object", option="quant_type_kwargs")
            return cls(quant_type, modules_to_not_convert=modules, **dict(string_kwargs))
        if _is_ao_config(quant_type):
            return cls(quant_type, modules_to_not_convert=modules)
        if isinstance(quant_type, Mapping) and "_type" not in quant_type:
            if set(quant_type) != {DEFAULT_KEY}:
                raise qcore.ConfigError(
                    "quant_type must hold exactly one key, 'default' (one config for the whole model; use "
                    f"torchao's FqnToConfig for per-module configs), found {sorted(quant_type)}",
                    option="quant_type",
                )
            quant_type = quant_type[DEFAULT_KEY]
        return cls(parse_config(quant_type, "quantization_config.quant_type"), modules_to_not_convert=modules)

    def to_json_string(self, use_diff: bool = False) -> str:
        # No config without a quant_type exists, so there are no defaults to diff against.
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __repr__(self) -> str:
        shorthand = f" (from {self._quant_type_name!r})" if self._quant_type_name else ""
        return f"TorchAoConfig{shorthand} {self.to_json_string()}"
