"""BitsAndBytesConfig: the same fields, defaults and config.json form as diffusers' and transformers'."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch

import qcore

logger = logging.getLogger("qcore.bnb")

QUANT_TYPES = ("fp4", "nf4")
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
# The storage dtypes diffusers and transformers accept; bitsandbytes packs two 4-bit values per byte
# and reinterprets the bytes as this dtype.
QUANT_STORAGE_DTYPES = ("uint8", "int8", "float16", "bfloat16", "float32", "float64")

_OPTIONS = (
    "load_in_8bit",
    "load_in_4bit",
    "llm_int8_threshold",
    "llm_int8_skip_modules",
    "llm_int8_enable_fp32_cpu_offload",
    "llm_int8_has_fp16_weight",
    "bnb_4bit_compute_dtype",
    "bnb_4bit_quant_type",
    "bnb_4bit_use_double_quant",
    "bnb_4bit_quant_storage",
)


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise qcore.ConfigError(
            f"BitsAndBytesConfig: {name} must be True or False, not {value!r}", option=name
        )
    return value


def _dtype(name: str, value: Any, default: torch.dtype, choices: Iterable[str]) -> torch.dtype:
    allowed = tuple(choices)
    if value is None:
        return default
    label = str(value).removeprefix("torch.") if isinstance(value, (str, torch.dtype)) else None
    if label not in allowed:
        raise qcore.ConfigError(
            f"BitsAndBytesConfig: {name}={value!r} is not supported; use one of {', '.join(allowed)} "
            "(a torch.dtype or its name)",
            option=name,
        )
    return getattr(torch, label)


class BitsAndBytesConfig(qcore.QuantizationConfig):
    """Options of a bitsandbytes load: 4-bit (``load_in_4bit``, NF4/FP4) or 8-bit (``load_in_8bit``, int8).

    Fields, defaults and meaning are those of ``diffusers.BitsAndBytesConfig`` and
    ``transformers.BitsAndBytesConfig``; :meth:`to_dict` writes their config.json form, so checkpoints move
    between qcore and diffusers both ways. ``llm_int8_skip_modules`` names modules kept unquantized (for
    4-bit too); names match whole module-path components, so ``"blocks"`` does not skip ``"vace_blocks"``.
    Invalid values raise :class:`qcore.ConfigError` naming the option and the valid choices. The config is
    never modified by a load.
    """

    quant_method = "bitsandbytes"
    # What a user may still change when loading a pre-quantized checkpoint (as in transformers).
    loading_attributes = frozenset(
        {"bnb_4bit_compute_dtype", "llm_int8_threshold", "llm_int8_enable_fp32_cpu_offload"}
    )
    # config.json's form of load_in_4bit / load_in_8bit (diffusers and transformers write both).
    serialized_keys = frozenset({"_load_in_4bit", "_load_in_8bit"})

    def __init__(
        self,
        load_in_8bit: bool = False,
        load_in_4bit: bool = False,
        llm_int8_threshold: float = 6.0,
        llm_int8_skip_modules: list[str] | None = None,
        llm_int8_enable_fp32_cpu_offload: bool = False,
        llm_int8_has_fp16_weight: bool = False,
        bnb_4bit_compute_dtype: torch.dtype | str | None = None,
        bnb_4bit_quant_type: str = "fp4",
        bnb_4bit_use_double_quant: bool = False,
        bnb_4bit_quant_storage: torch.dtype | str | None = None,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise qcore.ConfigError(
                f"BitsAndBytesConfig got unknown option(s) {', '.join(sorted(unknown))}; the options are "
                f"{', '.join(_OPTIONS)}",
                option=sorted(unknown)[0],
            )
        _bool("load_in_8bit", load_in_8bit)
        _bool("load_in_4bit", load_in_4bit)
        if load_in_4bit and load_in_8bit:
            raise qcore.ConfigError(
                "BitsAndBytesConfig: load_in_4bit and load_in_8bit are both True; choose one of them",
                option="load_in_4bit",
            )
        self._load_in_8bit = load_in_8bit
        self._load_in_4bit = load_in_4bit
        if isinstance(llm_int8_threshold, bool) or not isinstance(llm_int8_threshold, (int, float)):
            raise qcore.ConfigError(
                "BitsAndBytesConfig: llm_int8_threshold must be a number (default 6.0), "
                f"not {llm_int8_threshold!r}",
                option="llm_int8_threshold",
            )
        self.llm_int8_threshold = float(llm_int8_threshold)
        self.llm_int8_skip_modules = self._skip_modules(llm_int8_skip_modules)
        self.llm_int8_enable_fp32_cpu_offload = _bool(
            "llm_int8_enable_fp32_cpu_offload", llm_int8_enable_fp32_cpu_offload
        )
        self.llm_int8_has_fp16_weight = _bool("llm_int8_has_fp16_weight", llm_int8_has_fp16_weight)
        if bnb_4bit_quant_type not in QUANT_TYPES:
            raise qcore.ConfigError(
                f"BitsAndBytesConfig: bnb_4bit_quant_type={bnb_4bit_quant_type!r} is not supported; use one "
                f"of {', '.join(QUANT_TYPES)}",
                option="bnb_4bit_quant_type",
            )
        self.bnb_4bit_quant_type = bnb_4bit_quant_type
        self.bnb_4bit_use_double_quant = _bool("bnb_4bit_use_double_quant", bnb_4bit_use_double_quant)
        self.bnb_4bit_compute_dtype = _dtype(
            "bnb_4bit_compute_dtype", bnb_4bit_compute_dtype, torch.float32, COMPUTE_DTYPES
        )
        self.bnb_4bit_quant_storage = _dtype(
            "bnb_4bit_quant_storage", bnb_4bit_quant_storage, torch.uint8, QUANT_STORAGE_DTYPES
        )

    @staticmethod
    def _skip_modules(value: Any) -> list[str] | None:
        if value is None:
            return None
        if (
            isinstance(value, str)
            or not isinstance(value, (list, tuple))
            or not all(isinstance(v, str) for v in value)
        ):
            raise qcore.ConfigError(
                f"BitsAndBytesConfig: llm_int8_skip_modules must be a list of module names such as "
                f"['proj_out'], not {value!r}",
                option="llm_int8_skip_modules",
            )
        return list(value)  # a copy: the caller's list is never touched

    @property
    def load_in_4bit(self) -> bool:
        return self._load_in_4bit

    @property
    def load_in_8bit(self) -> bool:
        return self._load_in_8bit

    def is_quantizable(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit

    def quantization_method(self) -> str | None:
        """``"llm_int8"``, ``"nf4"``, ``"fp4"``, or ``None`` when neither 4- nor 8-bit is asked for."""
        if self.load_in_8bit:
            return "llm_int8"
        if self.load_in_4bit:
            return self.bnb_4bit_quant_type
        return None

    def to_dict(self) -> dict[str, Any]:
        """diffusers' config.json form: ``_load_in_4bit`` and ``load_in_4bit`` both, dtypes as names."""
        return {
            "quant_method": self.quant_method,
            "_load_in_8bit": self.load_in_8bit,
            "_load_in_4bit": self.load_in_4bit,
            "llm_int8_threshold": self.llm_int8_threshold,
            "llm_int8_skip_modules": list(self.llm_int8_skip_modules) if self.llm_int8_skip_modules else None,
            "llm_int8_enable_fp32_cpu_offload": self.llm_int8_enable_fp32_cpu_offload,
            "llm_int8_has_fp16_weight": self.llm_int8_has_fp16_weight,
            "bnb_4bit_quant_type": self.bnb_4bit_quant_type,
            "bnb_4bit_use_double_quant": self.bnb_4bit_use_double_quant,
            "bnb_4bit_compute_dtype": str(self.bnb_4bit_compute_dtype).removeprefix("torch."),
            "bnb_4bit_quant_storage": str(self.bnb_4bit_quant_storage).removeprefix("torch."),
            "load_in_4bit": self.load_in_4bit,
            "load_in_8bit": self.load_in_8bit,
        }

    @classmethod
    def from_dict(cls, config_dict: Mapping[str, Any]) -> BitsAndBytesConfig:
        """Read the config.json form (with or without ``quant_method``, ``_load_in_4bit``, ``load_in_4bit``).

        Keys this version does not know are ignored with a warning, as diffusers does, so that a checkpoint
        written by a newer writer still loads; the keys that decide the on-disk layout are all known.
        """
        data = dict(config_dict)
        method = data.pop("quant_method", cls.quant_method)
        if method != cls.quant_method:
            raise qcore.ConfigMismatchError(
                f"BitsAndBytesConfig is for quant_method {cls.quant_method!r}, got {method!r}",
                option="quant_method",
            )
        for bits in ("4bit", "8bit"):
            public, private = f"load_in_{bits}", f"_load_in_{bits}"
            if public in data and private in data and data[public] != data[private]:
                raise qcore.ConfigError(
                    f"quantization_config has {public}={data[public]!r} but {private}={data[private]!r}; "
                    "they must agree (fix or delete one of them in config.json)",
                    option=public,
                )
            if private in data:
                data[public] = data.pop(private)
        unknown = sorted(set(data) - set(_OPTIONS))
        if unknown:
            logger.warning(
                "quantization_config has option(s) BitsAndBytesConfig does not know, ignored: %s",
                ", ".join(unknown),
            )
        return cls(**{k: v for k, v in data.items() if k in _OPTIONS})
