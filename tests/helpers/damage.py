"""Damaging a saved TinyTransformer checkpoint (one quantized weight, or its quantization_config), and
the rule each damaged weight obeys.

The backends' hostile tests share this: an :data:`Edit` changes the tensors (and, where a backend keeps
its layout there, the safetensors metadata) of a copy of a valid checkpoint. The damaged copy must either
load and compute exactly what the undamaged one computes, or raise a :class:`qcore.QcoreError` naming the
weight file and the checkpoint key at fault; it may never load and compute something else. Each load is
held to the time and memory limits of :func:`helpers.hostile.bounded`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import qcore
from helpers.hostile import assert_names, bounded
from helpers.models import TinyTransformer, make_tiny

Edit = Callable[[dict[str, torch.Tensor], dict[str, str]], None]
Load = Callable[[Path], TinyTransformer]


def drop(key: str) -> Edit:
    return lambda tensors, metadata: tensors.pop(key)


def replace(key: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Edit:
    return lambda tensors, metadata: tensors.__setitem__(key, make(tensors[key]))


def poke(key: str, value: float) -> Edit:
    """Set the first value of ``key`` to ``value`` (NaN, inf...)."""

    def edit(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        damaged = tensors[key].clone()
        damaged.view(-1)[0] = value
        tensors[key] = damaged

    return edit


def quantize_and_save(
    plain: Path, config: qcore.QuantizationConfig, target: Path, torch_dtype: torch.dtype | None = None
) -> Path:
    """The TinyTransformer checkpoint ``plain`` loaded with ``config`` (and ``torch_dtype``), saved to
    ``target``."""
    model = qcore.from_pretrained(TinyTransformer, plain, quantization_config=config, torch_dtype=torch_dtype)
    qcore.save_pretrained(model, target)
    return target


class Undamaged(NamedTuple):
    """A valid checkpoint and what the model loaded from it computes for :func:`tiny_input`."""

    path: Path
    output: torch.Tensor


def quantized_checkpoints(
    root: Path,
    configs: Mapping[str, qcore.QuantizationConfig],
    load: Load,
    torch_dtype: torch.dtype | None = None,
) -> dict[str, Undamaged]:
    """A bfloat16 TinyTransformer saved under ``root``, then quantized by each config and saved under the
    config's name, with the output of the model ``load`` reads back from there."""
    plain = save_tiny(root)
    checkpoints = {}
    for name, config in configs.items():
        path = quantize_and_save(plain, config, root / name, torch_dtype)
        with torch.no_grad():
            checkpoints[name] = Undamaged(path, load(path)(tiny_input()))
    return checkpoints


def case_ids(cases: Sequence[tuple[Any, ...]]) -> list[str]:
    """``"checkpoint: label"`` for each ``(checkpoint, label, edit, key)`` case; :func:`assert_many_distinct`
    checks they are unique."""
    return [f"{case[0]}: {case[1]}" for case in cases]


def assert_many_distinct(cases: Sequence[tuple[Any, ...]], at_least: int) -> None:
    assert len(cases) >= at_least
    assert len(set(case_ids(cases))) == len(cases)


def save_tiny(directory: Path) -> Path:
    """A bfloat16 TinyTransformer saved to ``directory / "bf16"``."""
    path = directory / "bf16"
    qcore.save_pretrained(make_tiny(), path)
    return path


def with_quantization_config(source: Path, target: Path, **extra: object) -> Path:
    """A copy of the checkpoint ``source`` at ``target`` whose config.json's quantization_config has
    ``extra`` added (what another writer, or a newer one, puts there)."""
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"].update(extra)
    (target / "config.json").write_text(json.dumps(config))
    return target


def assert_names_option(error: qcore.ConfigError, key: str, suggestion: str | None) -> None:
    """``error`` is about the option ``key`` and, where there is one, suggests ``suggestion``."""
    assert error.option == key and repr(key) in str(error)
    if suggestion:
        assert f"did you mean {suggestion!r}" in str(error)


def tiny_input() -> torch.Tensor:
    return torch.randn(3, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)


def assert_refused_by_key_or_harmless(
    source: Undamaged, damaged: Path, edit: Edit, key: str | None, label: str, load: Load
) -> None:
    """Copy ``source`` to ``damaged``, apply ``edit`` to its weights file, then load it: the output must
    equal the undamaged one when ``key`` is None, else the load raises a QcoreError whose message names
    the weights file and ``key``."""
    shutil.copytree(source.path, damaged)
    (weights,) = damaged.glob("*.safetensors")
    with safe_open(str(weights), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    edit(tensors, metadata)
    save_file(tensors, str(weights), metadata=metadata)
    if key is None:
        with bounded(damaged):
            model = load(damaged)
        with torch.no_grad():
            assert torch.equal(model(tiny_input()), source.output), label
        return
    with bounded(damaged), pytest.raises(qcore.QcoreError) as info:
        load(damaged)
    assert_names(str(info.value), (weights.name, key), damaged, damaged.parent)
