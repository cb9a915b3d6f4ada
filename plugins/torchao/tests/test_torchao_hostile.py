"""Hostile torchao inner tensors: every part of a pre-quantized weight, corrupted systematically.

Each case either loads and computes what the undamaged checkpoint computes, or raises a
:class:`qcore.QcoreError` naming the checkpoint key at fault. None may load and compute something else
(a scale of shape (1,) for 64 rows broadcasts silently in torchao) or fail only at the first forward.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import qcore
from helpers.models import TinyTransformer, make_tiny
from qcore_torchao import TorchAoConfig

TARGET = "proj_in.weight"  # 64 x 64
QDATA, SCALE, ZERO = "proj_in._weight_qdata", "proj_in._weight_scale", "proj_in._weight_zero_point"
# int8wo and int8dq: Int8Tensor, one scale per row; float8wo: Float8Tensor, one scale per row;
# int4dq: IntxUnpackedToInt8Tensor, int4 values in groups of 32 columns, with zero points.
QUANT_TYPES = ("int8wo", "int8dq", "float8wo", "int4dq")

Edit = Callable[[dict[str, torch.Tensor], dict[str, str]], None]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("torchao-hostile")
    plain = root / "bf16"
    qcore.save_pretrained(make_tiny(), plain)
    paths = {}
    for name in QUANT_TYPES:
        model = TinyTransformer.from_pretrained(plain, quantization_config=TorchAoConfig(name))
        paths[name] = root / name
        qcore.save_pretrained(model, paths[name])
    return paths


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    (weights,) = path.glob("*.safetensors")
    with safe_open(str(weights), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


# --- edits --------------------------------------------------------------------------------------


def drop(key: str) -> Edit:
    return lambda t, m: t.pop(key)


def replace(key: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Edit:
    return lambda t, m: t.__setitem__(key, make(t[key]))


def poke(key: str, value: float) -> Edit:
    def edit(t: dict[str, torch.Tensor], m: dict[str, str]) -> None:
        damaged = t[key].clone()
        damaged.view(-1)[0] = value
        t[key] = damaged

    return edit


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


def x() -> torch.Tensor:
    return torch.randn(3, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)


@pytest.fixture(scope="module")
def expected_outputs(checkpoints: dict[str, Path]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {name: load(path)(x()) for name, path in checkpoints.items()}


def test_the_generated_set_is_large() -> None:
    assert len(CASES) >= 80
    assert len({(c[0], c[1]) for c in CASES}) == len(CASES)


@pytest.mark.parametrize(
    ("quant_type", "label", "edit", "key"), CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES]
)
def test_damaged_inner_tensor_is_refused_by_key_or_harmless(
    checkpoints: dict[str, Path],
    expected_outputs: dict[str, torch.Tensor],
    tmp_path: Path,
    quant_type: str,
    label: str,
    edit: Edit,
    key: str | None,
) -> None:
    path = tmp_path / "damaged"
    shutil.copytree(checkpoints[quant_type], path)
    tensors, metadata = read(path)
    edit(tensors, metadata)
    (weights,) = path.glob("*.safetensors")
    save_file(tensors, str(weights), metadata=metadata)
    if key is None:
        with torch.no_grad():
            assert torch.equal(load(path)(x()), expected_outputs[quant_type])
        return
    with pytest.raises(qcore.QcoreError) as info:
        load(path)
    assert key in str(info.value), f"{label}: {info.value}"
