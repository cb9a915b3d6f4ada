"""The familiar quant_type strings, mapped to torchao config instances, and what each one needs.

diffusers 0.42 dropped these strings (``TorchAoConfig("int8wo")`` raises TypeError there); qcore keeps
them as shorthands. A string is only a way to build a config: what is stored and serialized is the
torchao config it maps to, so ``TorchAoConfig("int8wo") == TorchAoConfig(Int8WeightOnlyConfig())``.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch

import qcore

# Legacy diffusers defaults: int4 weight-only used group_size 128 with tinygemm's tile-packed layout,
# int8-activation/int4-weight group_size 32, uintx weight-only group_size 64.
INT4WO_GROUP_SIZE = 128
INT4DQ_GROUP_SIZE = 32
UINTX_GROUP_SIZE = 64

_FLOAT8_CC = (8, 9)


def _torchao_class(name: str, quant_type: str) -> Any:
    import torchao.quantization as tq

    cls = getattr(tq, name, None)
    if cls is None:
        import torchao

        raise qcore.ConfigError(
            f"quant_type {quant_type!r} needs torchao's {name}, which torchao {torchao.__version__} "
            "does not have: upgrade torchao (pip install -U torchao)",
            option="quant_type",
        )
    return cls


def _take(quant_type: str, kwargs: dict[str, Any], allowed: Iterable[str]) -> dict[str, Any]:
    allowed = tuple(allowed)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        valid = ", ".join(allowed) if allowed else "none"
        raise qcore.ConfigError(
            f"quant_type {quant_type!r} does not take the option(s) {', '.join(unknown)}; "
            f"its options: {valid}",
            option=unknown[0],
        )
    return kwargs


def _group_size(quant_type: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise qcore.ConfigError(
            f"group_size for quant_type {quant_type!r} must be a positive integer, not {value!r}",
            option="group_size",
        )
    return value


def _int8wo(name: str, kw: dict[str, Any]) -> Any:
    _take(name, kw, ("group_size",))
    cls = _torchao_class("Int8WeightOnlyConfig", name)
    if kw.get("group_size") is not None:
        from torchao.quantization.granularity import PerGroup

        return cls(granularity=PerGroup(_group_size(name, kw["group_size"])))
    return cls()


def _int8dq(name: str, kw: dict[str, Any]) -> Any:
    _take(name, kw, ())
    return _torchao_class("Int8DynamicActivationInt8WeightConfig", name)()


_INT4_FORMATS = ("tile_packed_to_4d", "plain", "preshuffled", "plain_int32")


def _int4wo(name: str, kw: dict[str, Any]) -> Any:
    _take(name, kw, ("group_size", "int4_packing_format"))
    group_size = _group_size(name, kw.get("group_size", INT4WO_GROUP_SIZE))
    packing = kw.get("int4_packing_format", "tile_packed_to_4d")
    if packing not in _INT4_FORMATS:
        raise qcore.ConfigError(
            f"int4_packing_format {packing!r} is not one of {', '.join(_INT4_FORMATS)}",
            option="int4_packing_format",
        )
    if packing in ("plain", "preshuffled"):
        _require_mslk(name, f"int4_packing_format={packing!r}")
    return _torchao_class("Int4WeightOnlyConfig", name)(group_size=group_size, int4_packing_format=packing)


def _int4dq(name: str, kw: dict[str, Any]) -> Any:
    _take(name, kw, ("group_size",))
    from torchao.quantization.granularity import PerGroup

    group_size = _group_size(name, kw.get("group_size", INT4DQ_GROUP_SIZE))
    cls = _torchao_class("Int8DynamicActivationIntxWeightConfig", name)
    return cls(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size))


def _float8wo(dtype: torch.dtype) -> Callable[[str, dict[str, Any]], Any]:
    def make(name: str, kw: dict[str, Any]) -> Any:
        _take(name, kw, ())
        return _torchao_class("Float8WeightOnlyConfig", name)(weight_dtype=dtype)

    return make


def _float8dq(granularity: str | None) -> Callable[[str, dict[str, Any]], Any]:
    def make(name: str, kw: dict[str, Any]) -> Any:
        _take(name, kw, ())
        from torchao.quantization.granularity import PerRow, PerTensor

        cls = _torchao_class("Float8DynamicActivationFloat8WeightConfig", name)
        args: dict[str, Any] = dict(activation_dtype=torch.float8_e4m3fn, weight_dtype=torch.float8_e4m3fn)
        if granularity == "tensor":
            args["granularity"] = PerTensor()
        elif granularity == "row":
            args["granularity"] = PerRow()
        return cls(**args)

    return make


def _intx(bits: int, signed: bool) -> Callable[[str, dict[str, Any]], Any]:
    def make(name: str, kw: dict[str, Any]) -> Any:
        _take(name, kw, ("group_size",))
        from torchao.quantization.granularity import PerAxis, PerGroup
        from torchao.quantization.quant_primitives import MappingType

        cls = _torchao_class("IntxWeightOnlyConfig", name)
        dtype = getattr(torch, f"int{bits}", None)
        if dtype is None:
            raise qcore.ConfigError(
                f"quant_type {name!r} needs torch.int{bits}, which torch {torch.__version__} lacks",
                option="quant_type",
            )
        default_group = None if signed else UINTX_GROUP_SIZE
        group = kw.get("group_size", default_group)
        granularity = PerGroup(_group_size(name, group)) if group is not None else PerAxis(0)
        # Unsigned X-bit weights are asymmetric X-bit weights with a zero point: the same grid.
        mapping = MappingType.SYMMETRIC if signed else MappingType.ASYMMETRIC
        return cls(weight_dtype=dtype, granularity=granularity, mapping_type=mapping)

    return make


def _removed(replacement: str) -> Callable[[str, dict[str, Any]], Any]:
    def make(name: str, kw: dict[str, Any]) -> Any:
        import torchao

        raise qcore.ConfigError(
            f"quant_type {name!r} is not available in torchao {torchao.__version__}: {replacement}",
            option="quant_type",
        )

    return make


def _static(name: str, kw: dict[str, Any]) -> Any:
    raise qcore.ConfigError(
        f"quant_type {name!r} needs a calibrated activation scale, which a string cannot carry: pass "
        "torchao.quantization.Float8StaticActivationFloat8WeightConfig(act_quant_scale=...) instead",
        option="quant_type",
    )


_FACTORIES: dict[str, Callable[[str, dict[str, Any]], Any]] = {
    "int8wo": _int8wo,
    "int8_weight_only": _int8wo,
    "int8dq": _int8dq,
    "int8_dynamic_activation_int8_weight": _int8dq,
    "int4wo": _int4wo,
    "int4_weight_only": _int4wo,
    "int4dq": _int4dq,
    "int8_dynamic_activation_int4_weight": _int4dq,
    "float8wo": _float8wo(torch.float8_e4m3fn),
    "float8_weight_only": _float8wo(torch.float8_e4m3fn),
    "float8wo_e4m3": _float8wo(torch.float8_e4m3fn),
    "float8wo_e5m2": _float8wo(torch.float8_e5m2),
    "float8dq": _float8dq(None),
    "float8_dynamic_activation_float8_weight": _float8dq(None),
    "float8dq_e4m3": _float8dq(None),
    "float8dq_tensor": _float8dq("tensor"),
    "float8dq_e4m3_tensor": _float8dq("tensor"),
    "float8dq_row": _float8dq("row"),
    "float8dq_e4m3_row": _float8dq("row"),
    "float8_static_activation_float8_weight": _static,
    "fpx_weight_only": _removed(
        "fpX weight-only quantization was removed from torchao; use 'float8wo' or 'int4wo'"
    ),
}
for _bits in range(1, 9):
    _FACTORIES[f"int{_bits}wo"] = _FACTORIES.get(f"int{_bits}wo") or _intx(_bits, signed=True)
for _bits in range(1, 8):
    _FACTORIES[f"uint{_bits}wo"] = _intx(_bits, signed=False)
_FACTORIES["uintx_weight_only"] = _intx(4, signed=False)

_FPX = re.compile(r"^fp(\d)_e(\d)m(\d)$")


def quant_type_names() -> list[str]:
    """Every accepted string."""
    return sorted(_FACTORIES)


def config_from_string(quant_type: str, kwargs: dict[str, Any]) -> Any:
    """The torchao config a string names; a :class:`qcore.ConfigError` when it names none."""
    key = quant_type.strip().lower()
    factory = _FACTORIES.get(key)
    if factory is None and _FPX.match(key):
        factory = _FACTORIES["fpx_weight_only"]
    if factory is None:
        raise qcore.ConfigError(
            f"unknown torchao quant_type {quant_type!r}; use one of {', '.join(quant_type_names())} "
            "or a torchao AOBaseConfig instance (e.g. torchao.quantization.Int8WeightOnlyConfig())",
            option="quant_type",
        )
    return factory(key, dict(kwargs))


# --- what a config needs to run -----------------------------------------------------------------


def _mslk_ok() -> bool:
    if importlib.util.find_spec("mslk") is None:
        return False
    try:
        from torchao.utils import is_mslk_version_at_least

        return bool(is_mslk_version_at_least("1.0.0"))
    except Exception:  # torchao versions before the mslk rename; let torchao decide at quantize time
        return True


def _require_mslk(quant_type: str, what: str) -> None:
    if not _mslk_ok():
        raise qcore.ConfigError(
            f"quant_type {quant_type!r} with {what} needs the mslk package >= 1.0.0 and a CUDA GPU "
            "(pip install mslk); without it use int4_packing_format='tile_packed_to_4d' (the default, "
            "CUDA), or 'int4dq' / IntxWeightOnlyConfig(weight_dtype=torch.int4) on CPU",
            option="int4_packing_format",
        )


def leaf_configs(config: Any) -> list[Any]:
    """The configs that quantize modules: ``config`` itself, or the values of an ``FqnToConfig``.

    An ``FqnToConfig`` maps module names to a config or ``None`` (left unquantized); its
    ``module_fqn_to_config`` is the older name of the same table. An ``FqnToConfig`` inside another
    is refused: ``quantize_`` would see a lone Linear (fqn ``""``) and apply none of its entries.
    """
    table = getattr(config, "fqn_to_config", None)
    if not isinstance(table, dict):
        return [config]
    module_level = getattr(config, "module_fqn_to_config", None)
    entries = {**(module_level if isinstance(module_level, dict) else {}), **table}
    leaves = []
    for name, leaf in entries.items():
        if leaf is None:
            continue
        if isinstance(getattr(leaf, "fqn_to_config", None), dict):
            raise qcore.ConfigError(
                f"quant_type: nested FqnToConfig entries are not supported ({name!r} maps to another "
                "FqnToConfig); map each name to a torchao config or to None",
                option="quant_type",
            )
        leaves.append(leaf)
    return leaves


def _enum_value(value: Any) -> Any:
    return getattr(value, "value", value)


def hardware_problem(config: Any, device_types: set[str]) -> str | None:
    """Why ``config`` cannot run on the given device types, or ``None`` when nothing is known against it."""
    for leaf in leaf_configs(config):
        problem = _leaf_problem(leaf, device_types)
        if problem:
            return problem
    return None


def _cuda_capabilities() -> list[tuple[int, int]]:
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]


def _leaf_problem(config: Any, device_types: set[str]) -> str | None:
    name = type(config).__name__
    if name in (
        "Float8DynamicActivationFloat8WeightConfig",
        "Float8StaticActivationFloat8WeightConfig",
        "Float8DynamicActivationInt4WeightConfig",
    ):
        if "cpu" in device_types or "mps" in device_types:
            return (
                f"{name} computes matmuls in float8 and needs a CUDA GPU with compute capability >= 8.9 "
                "(e.g. H100, L4, RTX 4090), MI300+ or XPU; it does not run on "
                f"{', '.join(sorted(device_types & {'cpu', 'mps'}))}. Use Float8WeightOnlyConfig "
                "('float8wo') there"
            )
        if "cuda" in device_types and torch.version.hip is None:
            low = [cc for cc in _cuda_capabilities() if cc < _FLOAT8_CC]
            if low:
                return (
                    f"{name} needs CUDA compute capability >= 8.9; this GPU has "
                    f"{low[0][0]}.{low[0][1]}. Use Float8WeightOnlyConfig ('float8wo') or 'int8wo'"
                )
        if name == "Float8DynamicActivationInt4WeightConfig" and not _mslk_ok():
            return f"{name} needs the mslk package >= 1.0.0 (pip install mslk)"
    if name == "Int4WeightOnlyConfig":
        packing = str(_enum_value(getattr(config, "int4_packing_format", "plain")))
        if packing in ("plain", "preshuffled", "tile_packed_to_4d") and device_types - {"cuda"}:
            return (
                f"Int4WeightOnlyConfig with int4_packing_format={packing!r} runs on CUDA only, not on "
                f"{', '.join(sorted(device_types - {'cuda'}))}; for 4-bit weights on CPU use 'uint4wo', "
                "'int4dq' or IntxWeightOnlyConfig(weight_dtype=torch.int4)"
            )
        if packing in ("plain", "preshuffled") and not _mslk_ok():
            return (
                f"Int4WeightOnlyConfig with int4_packing_format={packing!r} needs the mslk package "
                ">= 1.0.0 (pip install mslk), or use int4_packing_format='tile_packed_to_4d'"
            )
        if packing == "plain_int32" and device_types - {"xpu", "npu"}:
            return "Int4WeightOnlyConfig with int4_packing_format='plain_int32' runs on XPU/NPU only"
    return None
