"""GGUF files give qcore their tensors' offsets, so converted keys (renamed, split and swapped rows) are
read by qcore's own streaming reader, not by GGUFFormat.read: the same bytes, the same types."""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch
from flux_files import write_bfl_flux_gguf

import qcore
from qcore_gguf import GGUFConfig, GGUFFormat, GGUFWeight

pytest.importorskip("diffusers")
from diffusers import FluxTransformer2DModel  # noqa: E402

READS: list[str] = []


class CountingGGUF(GGUFFormat):
    """GGUFFormat counting the tensors it is asked to read itself."""

    def read(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        READS.append(key)
        return super().read(key, rows)


class NoOffsetsGGUF(CountingGGUF):
    """GGUFFormat that keeps its offsets to itself: every tensor goes through its read()."""

    def tensors(self) -> Mapping[str, qcore.TensorInfo]:
        return {key: dataclasses.replace(info, offset=None) for key, info in super().tensors().items()}


@pytest.fixture
def registered() -> Iterator[None]:
    yield
    qcore.unregister_format(CountingGGUF)
    qcore.unregister_format(NoOffsetsGGUF)


def _load(path: Path, format_class: type[GGUFFormat]) -> dict[str, torch.Tensor]:
    READS.clear()
    qcore.register_format(format_class)
    try:
        model = qcore.from_pretrained(
            FluxTransformer2DModel, path, quantization_config=GGUFConfig(), torch_dtype=torch.bfloat16
        )
    finally:
        qcore.unregister_format(format_class)
    return model.state_dict()


def test_offsets_path_reads_the_same_bytes_as_the_format(tmp_path: Path, registered: None) -> None:
    types = {"Q8_0", "Q4_K", "Q5_0"}
    names = sorted(types)

    def choose(name: str, shape: tuple[int, ...]) -> str:
        if len(shape) == 1 or shape[-1] % 32:
            return "F32" if len(shape) == 1 else "F16"
        picked = names[zlib.crc32(name.encode()) % len(names)]
        return "Q8_0" if picked == "Q4_K" and shape[-1] % 256 else picked

    path = write_bfl_flux_gguf(tmp_path / "mixed.gguf", choose)
    fast = _load(path, CountingGGUF)
    assert READS == []  # every key, fused qkv splits and swapped adaLN halves included, read by qcore
    slow = _load(path, NoOffsetsGGUF)
    assert READS  # the comparison load really took the format's own path
    assert set(fast) == set(slow)
    seen = set()
    for key, expected in slow.items():
        actual = fast[key]
        assert type(actual) is type(expected) and actual.dtype == expected.dtype, key
        assert actual.shape == expected.shape and torch.equal(actual, expected), key
        if isinstance(expected, GGUFWeight):
            assert actual.quant_type == expected.quant_type, key
            seen.add(actual.quant_type)
    assert seen == types


@pytest.mark.gpu
def test_offsets_path_onto_cuda_equals_the_cpu_load(
    tmp_path: Path, registered: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small pieces and few pinned slots: keys span several slots, and the ring is reused many times.
    monkeypatch.setenv("QCORE_IO_PIECE_BYTES", "4096")
    monkeypatch.setenv("QCORE_IO_SLOTS", "3")
    path = write_bfl_flux_gguf(tmp_path / "q8.gguf", "Q8_0")
    on_cpu = _load(path, CountingGGUF)
    READS.clear()
    qcore.register_format(CountingGGUF)
    try:
        model = qcore.from_pretrained(
            FluxTransformer2DModel,
            path,
            quantization_config=GGUFConfig(),
            torch_dtype=torch.bfloat16,
            device_map="cuda",
        )
    finally:
        qcore.unregister_format(CountingGGUF)
    assert READS == []
    on_gpu = model.state_dict()
    for key, expected in on_cpu.items():
        actual = on_gpu[key]
        assert actual.device.type == "cuda" and type(actual) is type(expected), key
        assert torch.equal(actual.cpu(), expected), key
