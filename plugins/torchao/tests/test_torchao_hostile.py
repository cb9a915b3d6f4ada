"""Hostile torchao inner tensors: every part of a pre-quantized weight, corrupted systematically.

Each case either loads and computes what the undamaged checkpoint computes, or raises a
:class:`qcore.QcoreError` naming the checkpoint key at fault. None may load and compute something else
(a scale of shape (1,) for 64 rows broadcasts silently in torchao) or fail only at the first forward.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

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
from qcore_torchao import TorchAoConfig

TARGET = "proj_in.weight"  # 64 x 64
QDATA, SCALE, ZERO = "proj_in._weight_qdata", "proj_in._weight_scale", "proj_in._weight_zero_point"
# int8wo and int8dq: Int8Tensor, one scale per row; float8wo: Float8Tensor, one scale per row;
# int4dq: IntxUnpackedToInt8Tensor, int4 values in groups of 32 columns, with zero points.
QUANT_TYPES = ("int8wo", "int8dq", "float8wo", "int4dq")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Undamaged]:
    configs = {name: TorchAoConfig(name) for name in QUANT_TYPES}
    return quantized_checkpoints(tmp_path_factory.mktemp("torchao-hostile"), configs, load)


# --- edits --------------------------------------------------------------------------------------


def set_block_size(value: object) -> Edit:
    def edit(t: dict[str, torch.Tensor], m: dict[str, str]) -> None:
        entry = json.loads(m[TARGET])
        entry["_data"]["block_size"] = value
        m[TARGET] = json.dumps(entry)

    return edit


# --- the cases ----------------------------------------------------------------------------------


def scale_cases(quant_type: str, key: str, *, floating: bool) -> list[tuple[str, str, Edit, str | None]]:
    cases: list[tuple[str, str, Edit, str | None]] = [
        (quant_type, f"{key} missing", drop(key), key),
        (quant_type, f"{key} of shape (1,)", replace(key, lambda v: v.reshape(-1)[:1].clone()), key),
        (
            quant_type,
            f"{key} of shape (1, 1)",
            replace(key, lambda v: v.reshape(-1)[:1].reshape(1, 1).clone()),
            key,
        ),
        (quant_type, f"{key} of length 3", replace(key, lambda v: v.reshape(-1)[:3].clone()), key),
        (quant_type, f"{key} flattened", replace(key, lambda v: v.reshape(-1).clone()), key),
        (quant_type, f"{key} transposed", replace(key, lambda v: v.t().contiguous()), key),
        (quant_type, f"{key} one row less", replace(key, lambda v: v[:-1].clone()), key),
        (quant_type, f"{key} one column more", replace(key, lambda v: torch.cat([v, v[:, :1]], 1)), key),
        (quant_type, f"{key} empty", replace(key, lambda v: v[:0].clone()), key),
    ]
    if floating:
        cases += [
            (quant_type, f"{key} NaN", poke(key, math.nan), key),
            (quant_type, f"{key} +inf", poke(key, math.inf), key),
            (quant_type, f"{key} -inf", poke(key, -math.inf), key),
            (quant_type, f"{key} int32", replace(key, lambda v: v.to(torch.int32)), key),
        ]
    return cases


def qdata_cases(quant_type: str) -> list[tuple[str, str, Edit, str | None]]:
    return [
        (quant_type, "qdata missing", drop(QDATA), QDATA),
        (quant_type, "qdata one row less", replace(QDATA, lambda v: v[:-1].clone()), QDATA),
        (quant_type, "qdata flattened", replace(QDATA, lambda v: v.reshape(-1).clone()), QDATA),
        (quant_type, "qdata as bfloat16", replace(QDATA, lambda v: v.to(torch.bfloat16)), QDATA),
        (quant_type, "qdata as float32", replace(QDATA, lambda v: v.to(torch.float32)), QDATA),
    ]


def block_size_cases(quant_type: str) -> list[tuple[str, str, Edit, str | None]]:
    return [
        (quant_type, "block_size [1, 3] does not tile 64", set_block_size([1, 3]), TARGET),
        (quant_type, "block_size [0, 64]", set_block_size([0, 64]), TARGET),
        (quant_type, "block_size [64, 64] for per-row scales", set_block_size([64, 64]), SCALE),
        (quant_type, "block_size of 3 dims", set_block_size([1, 1, 64]), TARGET),
    ]


CASES = [
    *scale_cases("int8wo", SCALE, floating=True),
    *qdata_cases("int8wo"),
    *block_size_cases("int8wo"),
    *scale_cases("int8dq", SCALE, floating=True),
    *scale_cases("float8wo", SCALE, floating=True),
    *qdata_cases("float8wo"),
    *block_size_cases("float8wo"),
    *scale_cases("int4dq", SCALE, floating=True),
    *scale_cases("int4dq", ZERO, floating=False),
    *qdata_cases("int4dq"),
    ("int4dq", "block_size [1, 64] for groups of 32", set_block_size([1, 64]), SCALE),
    ("int8wo", "metadata entry missing", lambda t, m: m.pop(TARGET), TARGET),
    ("int8wo", "metadata entry not JSON", lambda t, m: m.__setitem__(TARGET, "{"), TARGET),
]


def load(path: Path) -> TinyTransformer:
    return TinyTransformer.from_pretrained(path)


def test_the_generated_set_is_large() -> None:
    assert_many_distinct(CASES, at_least=80)


@pytest.mark.parametrize(("quant_type", "label", "edit", "key"), CASES, ids=case_ids(CASES))
def test_damaged_inner_tensor_is_refused_by_key_or_harmless(
    checkpoints: dict[str, Undamaged],
    tmp_path: Path,
    quant_type: str,
    label: str,
    edit: Edit,
    key: str | None,
) -> None:
    assert_refused_by_key_or_harmless(checkpoints[quant_type], tmp_path / "damaged", edit, key, label, load)
