"""Fixtures shared by the core and backend test trees (registered by the repository's conftest.py)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import qcore
from helpers.int8_backend import BACKEND
from helpers.models import TinyTransformer, make_tiny


@contextlib.contextmanager
def installed_or_registered(backend: qcore.Backend) -> Iterator[None]:
    """The installed entry point of ``backend.quant_method`` or, where none is installed (sources on
    PYTHONPATH), ``backend`` registered in-process for the duration of the block."""
    try:
        qcore.get_backend(backend.quant_method)
    except qcore.BackendNotFoundError:
        qcore.register_backend(backend)
        try:
            yield
        finally:
            qcore.unregister_backend(backend.quant_method)
    else:
        yield


@pytest.fixture
def int8_backend() -> Iterator[qcore.Backend]:
    """The in-test int8 backend, registered in-process for one test."""
    qcore.register_backend(BACKEND)
    try:
        yield BACKEND
    finally:
        qcore.unregister_backend(BACKEND.quant_method)


@pytest.fixture
def tiny_model() -> TinyTransformer:
    return make_tiny()


@pytest.fixture
def tiny_ckpt(tmp_path: Path, tiny_model: TinyTransformer) -> Path:
    """A bf16 TinyTransformer saved as one safetensors file."""
    path = tmp_path / "tiny-bf16"
    qcore.save_pretrained(tiny_model, path)
    return path


@pytest.fixture
def tiny_input() -> torch.Tensor:
    return torch.randn(3, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)


def unaligned_tensors(checkpoint: Path) -> list[str]:
    """The keys of ``checkpoint``'s safetensors files whose data does not start on a 64-byte boundary of
    the file (a memory-mapped view of them would be unaligned)."""
    unaligned = []
    for shard in checkpoint.glob("*.safetensors"):
        raw = shard.read_bytes()
        length = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + length])
        header.pop("__metadata__", None)
        unaligned += [key for key, entry in header.items() if (8 + length + entry["data_offsets"][0]) % 64]
    return unaligned
