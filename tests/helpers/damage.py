"""Damaging one quantized weight of a saved TinyTransformer checkpoint, and the rule each damage obeys.

The backends' hostile tests share this: an :data:`Edit` changes the tensors (and, where a backend keeps
its layout there, the safetensors metadata) of a copy of a valid checkpoint. The damaged copy must either
load and compute exactly what the undamaged one computes, or raise a :class:`qcore.QcoreError` naming the
checkpoint key at fault; it may never load and compute something else.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import qcore
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


def quantized_checkpoints(
    root: Path, configs: Mapping[str, qcore.QuantizationConfig], torch_dtype: torch.dtype | None = None
) -> dict[str, Path]:
    """A bfloat16 TinyTransformer saved under ``root``, then loaded with each config (and ``torch_dtype``)
    and saved under the config's name."""
    plain = root / "bf16"
    qcore.save_pretrained(make_tiny(), plain)
    paths = {}
    for name, config in configs.items():
        model = qcore.from_pretrained(
            TinyTransformer, plain, quantization_config=config, torch_dtype=torch_dtype
        )
        paths[name] = root / name
        qcore.save_pretrained(model, paths[name])
    return paths


def tiny_input() -> torch.Tensor:
    return torch.randn(3, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)


def outputs(checkpoints: Mapping[str, Path], load: Load) -> dict[str, torch.Tensor]:
    """Each undamaged checkpoint's output for :func:`tiny_input`."""
    with torch.no_grad():
        return {name: load(path)(tiny_input()) for name, path in checkpoints.items()}


def assert_refused_by_key_or_harmless(
    source: Path, damaged: Path, edit: Edit, key: str | None, label: str, expected: torch.Tensor, load: Load
) -> None:
    """Copy ``source`` to ``damaged``, apply ``edit`` to its weights file, then load it: the output must
    equal ``expected`` when ``key`` is None, else the load raises a QcoreError whose message names ``key``."""
    shutil.copytree(source, damaged)
    (weights,) = damaged.glob("*.safetensors")
    with safe_open(str(weights), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    edit(tensors, metadata)
    save_file(tensors, str(weights), metadata=metadata)
    if key is None:
        with torch.no_grad():
            assert torch.equal(load(damaged)(tiny_input()), expected), label
        return
    with pytest.raises(qcore.QcoreError) as info:
        load(damaged)
    assert key in str(info.value), f"{label}: {info.value}"
