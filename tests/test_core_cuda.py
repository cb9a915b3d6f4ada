"""The core loader on CUDA: the streaming pipeline must deliver exactly the bytes on disk.

gpu-marked: skipped where CUDA is unavailable. On the GPU machine: ``pytest -m gpu tests``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import qcore
from helpers.int8_backend import Int8Linear, Int8TestConfig
from helpers.models import TinyTransformer, make_tiny

pytestmark = pytest.mark.gpu


class Odd(qcore.ModelMixin):
    """Odd sizes, a zero-element parameter and mixed dtypes, to stress piece boundaries."""

    def __init__(self, dim: int = 333) -> None:
        super().__init__()
        self.a = nn.Linear(dim, dim + 7)
        self.empty = nn.Parameter(torch.zeros(0))
        self.b = nn.Linear(dim + 7, 5)
        self.register_buffer("steps", torch.arange(11, dtype=torch.int64))


@pytest.mark.parametrize("piece,slots,threads", [(4096, 3, 2), (1000, 2, 1), (8 << 20, 24, 16)])
def test_streamed_tensors_equal_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, piece: int, slots: int, threads: int
) -> None:
    monkeypatch.setenv("QCORE_IO_PIECE_BYTES", str(piece))
    monkeypatch.setenv("QCORE_IO_SLOTS", str(slots))
    monkeypatch.setenv("QCORE_IO_THREADS", str(threads))
    torch.manual_seed(0)
    model = Odd()
    with torch.no_grad():
        model.a.weight.mul_(3)
    qcore.save_pretrained(model, tmp_path / "odd", max_shard_size="200KB")
    loaded = Odd.from_pretrained(tmp_path / "odd", device_map="cuda")
    for name, tensor in model.state_dict().items():
        got = loaded.state_dict()[name]
        assert got.device.type == "cuda", name
        assert got.dtype == tensor.dtype and torch.equal(got.cpu(), tensor), name


@pytest.mark.usefixtures("int8_backend")
def test_quantize_on_load_on_cuda_equals_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QCORE_IO_PIECE_BYTES", "3000")
    monkeypatch.setenv("QCORE_IO_SLOTS", "4")
    qcore.save_pretrained(make_tiny(), tmp_path / "bf16", max_shard_size="10KB")
    on_cpu = TinyTransformer.from_pretrained(tmp_path / "bf16", quantization_config=Int8TestConfig())
    on_gpu = TinyTransformer.from_pretrained(
        tmp_path / "bf16", quantization_config=Int8TestConfig(), device_map="cuda"
    )
    assert isinstance(on_gpu.blocks[0].attn, Int8Linear)
    for name, tensor in on_cpu.state_dict().items():
        got = on_gpu.state_dict()[name].cpu()
        if name.endswith("weight_scale"):  # CUDA and CPU division round the last bit differently
            assert torch.allclose(got, tensor, rtol=1e-6, atol=0), name
        elif got.dtype == torch.int8:  # so a value on a .5 boundary may round the other way
            assert (got.int() - tensor.int()).abs().max() <= 1, name
        else:
            assert torch.equal(got, tensor), name
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    got, want = on_gpu(x.cuda()).cpu().float(), on_cpu(x).float()
    assert ((got - want).norm() / want.norm()).item() < 1e-2  # bf16 matmuls differ between devices


def test_device_map_dict_splits_cpu_and_cuda(tmp_path: Path) -> None:
    model = make_tiny()
    qcore.save_pretrained(model, tmp_path / "bf16")
    loaded = TinyTransformer.from_pretrained(
        tmp_path / "bf16",
        device_map={
            "proj_in": "cuda",
            "blocks": "cuda",
            "vace_blocks": "cpu",
            "norm_out": "cpu",
            "proj_out": "cpu",
        },
    )
    assert loaded.blocks[0].attn.weight.device.type == "cuda"
    assert loaded.hf_device_map["proj_out"] == torch.device("cpu")  # offloaded: runs on the GPU via hooks
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    assert torch.allclose(loaded(x.cuda()).cpu().float(), model(x).float(), atol=1e-2)


def test_auto_device_map_with_max_memory_offloads_to_cpu(tmp_path: Path) -> None:
    model = make_tiny(dim=256, depth=4)
    qcore.save_pretrained(model, tmp_path / "bf16")
    loaded = TinyTransformer.from_pretrained(
        tmp_path / "bf16", device_map="sequential", max_memory={0: "800KB", "cpu": "1GB"}
    )
    placed = {str(d) for d in loaded.hf_device_map.values()}
    assert placed == {"cuda:0", "cpu"}
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    assert torch.allclose(loaded(x.cuda()).cpu().float(), model(x).float(), atol=1e-2)


class ThreeLarge(qcore.ModelMixin):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(2048, 2048, bias=False) for _ in range(3))  # 16 MiB each


@pytest.mark.parametrize("reserve,segments", [("1", 1), ("0", 3)])
def test_unquantized_load_reserves_its_large_tensors_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reserve: str, segments: int
) -> None:
    monkeypatch.setenv("QCORE_CUDA_RESERVE", reserve)
    torch.manual_seed(0)
    model = ThreeLarge()
    qcore.save_pretrained(model, tmp_path / "three")
    torch.cuda.empty_cache()
    before = torch.cuda.memory_stats()["segment.large_pool.allocated"]
    loaded = ThreeLarge.from_pretrained(tmp_path / "three", device_map="cuda")
    # one cudaMalloc for the three weights, where each would otherwise get a segment of its own
    assert torch.cuda.memory_stats()["segment.large_pool.allocated"] - before == segments
    for got, want in zip(loaded.layers, model.layers, strict=True):
        assert torch.equal(got.weight.cpu(), want.weight)
