"""Hostile bitsandbytes statistics: every statistic of a pre-quantized weight, corrupted systematically.

Each case either loads and computes what the undamaged checkpoint computes, or raises a
:class:`qcore.QcoreError` naming the checkpoint key at fault. None may load and compute something else.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import qcore
from helpers.damage import (
    Edit,
    Undamaged,
    assert_many_distinct,
    assert_refused_by_key_or_harmless,
    case_ids,
    drop,
    poke,
    quantized_checkpoints,
    replace,
)
from helpers.models import TinyTransformer
from qcore_bnb import BitsAndBytesConfig

WEIGHTS = "diffusion_pytorch_model.safetensors"
TARGET = "proj_in.weight"  # 64 x 64: 64 blocks of 64 values, one nested block
LOADS = None  # expected outcome: the damage is harmless and the model loads unchanged


CONFIGS = {
    "nf4-dq": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
    ),
    "fp4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": BitsAndBytesConfig(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Undamaged]:
    root = tmp_path_factory.mktemp("bnb-hostile")
    return quantized_checkpoints(root, CONFIGS, load, torch_dtype=torch.bfloat16)


def state_key(quant_type: str) -> str:
    return f"{TARGET}.quant_state.bitsandbytes__{quant_type}"


def edit_state(quant_type: str, change: Callable[[dict[str, Any]], None]) -> Edit:
    key = state_key(quant_type)

    def edit(t: dict[str, torch.Tensor], m: dict[str, str]) -> None:
        info = json.loads(bytes(t[key].tolist()).decode())
        change(info)
        t[key] = torch.tensor(list(json.dumps(info).encode()), dtype=torch.uint8)

    return edit


def set_field(name: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda info: info.__setitem__(name, value)


def del_field(name: str) -> Callable[[dict[str, Any]], None]:
    return lambda info: info.pop(name)


# --- the cases ----------------------------------------------------------------------------------


def tensor_cases(
    checkpoint: str, stat: str, *, floating: bool, fixed_table: bool = False, scales: bool = False
) -> list[tuple[str, str, Edit, str | None]]:
    """Missing, wrong dtype, wrong shape, NaN/inf and (for tables) zeroed or permuted values of ``stat``."""
    key = f"{TARGET}.{stat}" if stat != "SCB" else "proj_in.SCB"
    cases: list[tuple[str, str, Edit, str | None]] = [
        (checkpoint, f"{stat} missing", drop(key), key),
        (checkpoint, f"{stat} int32", replace(key, lambda v: v.to(torch.int32)), key),
        (checkpoint, f"{stat} one value more", replace(key, lambda v: torch.cat([v, v[:1]])), key),
        (checkpoint, f"{stat} one value less", replace(key, lambda v: v[:-1]), key),
        (checkpoint, f"{stat} as a column", replace(key, lambda v: v.reshape(-1, 1)), key),
        (checkpoint, f"{stat} empty", replace(key, lambda v: v[:0]), key),
    ]
    if floating:
        cases += [
            (checkpoint, f"{stat} float64", replace(key, lambda v: v.double()), key),
            (checkpoint, f"{stat} NaN", poke(key, math.nan), key),
            (checkpoint, f"{stat} +inf", poke(key, math.inf), key),
            (checkpoint, f"{stat} -inf", poke(key, -math.inf), key),
        ]
    if scales:
        cases.append((checkpoint, f"{stat} negative", replace(key, lambda v: -v.abs() - 1), key))
    if fixed_table:
        cases += [
            (checkpoint, f"{stat} zeroed", replace(key, torch.zeros_like), key),
            (checkpoint, f"{stat} reversed", replace(key, lambda v: v.flip(0)), key),
            (checkpoint, f"{stat} scaled", replace(key, lambda v: v * 0.5), key),
        ]
    return cases


def state_cases(checkpoint: str, quant_type: str, nested: bool) -> list[tuple[str, str, Edit, str | None]]:
    key = state_key(quant_type)
    other = "fp4" if quant_type == "nf4" else "nf4"
    fields: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
        ("blocksize missing", del_field("blocksize")),
        ("blocksize 0", set_field("blocksize", 0)),
        ("blocksize -64", set_field("blocksize", -64)),
        ("blocksize 63", set_field("blocksize", 63)),
        ("blocksize string", set_field("blocksize", "64")),
        ("blocksize true", set_field("blocksize", True)),
        ("blocksize 2**62", set_field("blocksize", 2**62)),
        ("quant_type missing", del_field("quant_type")),
        (f"quant_type {other} (key says {quant_type})", set_field("quant_type", other)),
        ("quant_type int4", set_field("quant_type", "int4")),
        ("shape missing", del_field("shape")),
        ("shape transposed-size", set_field("shape", [32, 128])),
        ("shape 3-D", set_field("shape", [64, 64, 1])),
        ("shape strings", set_field("shape", ["64", "64"])),
        ("shape negative", set_field("shape", [-64, -64])),
        ("dtype missing", del_field("dtype")),
        ("dtype int8", set_field("dtype", "int8")),
        ("dtype hostile string", set_field("dtype", "float32; rm -rf /")),
    ]
    if nested:
        fields += [
            ("nested_offset NaN", set_field("nested_offset", math.nan)),
            ("nested_offset inf", set_field("nested_offset", math.inf)),
            ("nested_offset -inf", set_field("nested_offset", -math.inf)),
            ("nested_offset string", set_field("nested_offset", "0.1")),
            ("nested_offset missing", del_field("nested_offset")),
            ("nested_offset null", set_field("nested_offset", None)),
            ("nested_blocksize 0", set_field("nested_blocksize", 0)),
            ("nested_blocksize 7", set_field("nested_blocksize", 7)),
            ("nested_blocksize missing", del_field("nested_blocksize")),
            ("nested_dtype float16", set_field("nested_dtype", "float16")),
            ("nested_dtype missing", del_field("nested_dtype")),
        ]
    cases = [
        (checkpoint, f"quant_state {label}", edit_state(quant_type, change), key) for label, change in fields
    ]
    # A valid blocksize that the statistics do not have: reported by the statistic it contradicts.
    cases.append(
        (
            checkpoint,
            "quant_state blocksize 128 for 64 blocks",
            edit_state(quant_type, set_field("blocksize", 128)),
            f"{TARGET}.absmax",
        )
    )
    garbage = [
        ("not JSON", torch.tensor([0xFF, 0x00, 0x7B], dtype=torch.uint8)),
        ("a JSON list", torch.tensor(list(b"[1, 2]"), dtype=torch.uint8)),
        ("deeply nested JSON", torch.tensor(list(b"[" * 5000 + b"]" * 5000), dtype=torch.uint8)),
        ("float32", torch.zeros(8)),
        ("2-D", torch.zeros(2, 4, dtype=torch.uint8)),
        ("empty", torch.zeros(0, dtype=torch.uint8)),
    ]
    cases += [
        (checkpoint, f"quant_state {label}", replace(key, lambda _, v=v: v), key) for label, v in garbage
    ]
    cases.append((checkpoint, "quant_state missing", drop(key), key))
    return cases


def fp4_table_in_nf4(t: dict[str, torch.Tensor], m: dict[str, str]) -> None:
    import bitsandbytes

    t[f"{TARGET}.quant_map"] = bitsandbytes.functional.get_4bit_type("fp4", device="cpu").float()


CASES = [
    *tensor_cases("nf4-dq", "absmax", floating=False),
    *tensor_cases("nf4-dq", "quant_map", floating=True, fixed_table=True),
    *tensor_cases("nf4-dq", "nested_absmax", floating=True, scales=True),
    *tensor_cases("nf4-dq", "nested_quant_map", floating=True, fixed_table=True),
    *state_cases("nf4-dq", "nf4", nested=True),
    *tensor_cases("fp4", "absmax", floating=True, scales=True),
    *tensor_cases("fp4", "quant_map", floating=True, fixed_table=True),
    *state_cases("fp4", "fp4", nested=False),
    (
        "fp4",
        "stray nested_absmax",
        lambda t, m: t.__setitem__(f"{TARGET}.nested_absmax", torch.ones(1)),
        state_key("fp4"),
    ),
    ("nf4-dq", "quant_map of fp4", fp4_table_in_nf4, f"{TARGET}.quant_map"),
    *tensor_cases("int8", "SCB", floating=True, scales=True),
    (
        "int8",
        "weight_format 1",
        replace("proj_in.weight_format", lambda v: torch.ones_like(v)),
        "proj_in.weight_format",
    ),
    (
        "int8",
        "weight_format float",
        replace("proj_in.weight_format", lambda v: v.float()),
        "proj_in.weight_format",
    ),
    (
        "int8",
        "weight_format two values",
        replace("proj_in.weight_format", lambda v: torch.zeros(2, dtype=v.dtype)),
        "proj_in.weight_format",
    ),
    ("int8", "weight_format missing (row-major is the default)", drop("proj_in.weight_format"), LOADS),
    ("int8", "weight float16", replace("proj_in.weight", lambda v: v.half()), "proj_in.weight"),
    ("int8", "weight missing", drop("proj_in.weight"), "proj_in.weight"),
]


def load(path: Path) -> TinyTransformer:
    return qcore.from_pretrained(TinyTransformer, path, torch_dtype=torch.bfloat16)


def test_the_generated_set_is_large() -> None:
    assert_many_distinct(CASES, at_least=100)


@pytest.mark.parametrize(("checkpoint", "label", "edit", "key"), CASES, ids=case_ids(CASES))
def test_damaged_statistic_is_refused_by_key_or_harmless(
    checkpoints: dict[str, Undamaged],
    tmp_path: Path,
    checkpoint: str,
    label: str,
    edit: Edit,
    key: str | None,
) -> None:
    assert_refused_by_key_or_harmless(checkpoints[checkpoint], tmp_path / "damaged", edit, key, label, load)
