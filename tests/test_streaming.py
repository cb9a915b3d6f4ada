"""The CPU read path of the streaming engine and the skipped initialisation of meta skeletons.

CPU tensors are read with ``os.preadv`` into memory of their own: the bytes must be exactly those
safetensors returns, for every dtype and shape, and must not stay tied to the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qcore._checkpoint import CheckpointReader, locate_checkpoint
from qcore._noinit import no_init_on_meta
from qcore._streaming import reservation_sizes, stream_tensors


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "bf16": torch.randn(33, 17, generator=g).to(torch.bfloat16),
        "f32": torch.randn(5, 3, 2, generator=g),
        "f16.scalar": torch.tensor(1.5, dtype=torch.float16),
        "i8": torch.randint(-128, 127, (7, 9), generator=g, dtype=torch.int8),
        "u8.odd": torch.randint(0, 255, (13,), generator=g, dtype=torch.uint8),
        "f8": torch.randn(4, 8, generator=g).to(torch.float8_e4m3fn),
        "empty": torch.empty(0, 4, dtype=torch.bfloat16),
        "i64": torch.arange(11, dtype=torch.int64),
    }


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "Tiny"}))
    save_file(_tensors(), str(tmp_path / "model.safetensors"))
    return tmp_path


def test_cpu_stream_returns_the_bytes_safetensors_reads(checkpoint: Path) -> None:
    expected = load_file(str(checkpoint / "model.safetensors"))
    with CheckpointReader(locate_checkpoint(checkpoint)) as reader:
        order = [(key, torch.device("cpu")) for key in reversed(reader.keys)]
        got = dict(zip((key for key, _ in order), stream_tensors(reader, order), strict=True))
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape, key
        assert torch.equal(got[key].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), key


def test_cpu_stream_tensors_outlive_the_file(checkpoint: Path) -> None:
    file = checkpoint / "model.safetensors"
    expected = {key: t.clone() for key, t in load_file(str(file)).items()}  # safetensors' own are file-backed
    with CheckpointReader(locate_checkpoint(checkpoint)) as reader:
        got = {
            key: t
            for key, t in zip(
                reader.keys,
                stream_tensors(reader, [(k, torch.device("cpu")) for k in reader.keys]),
                strict=True,
            )
        }
    file.write_bytes(b"\0" * file.stat().st_size)  # the tensors own their memory: no file page behind them
    file.unlink()
    got["bf16"].add_(1)  # writable
    assert torch.equal(got["i8"], expected["i8"])
    assert torch.equal(got["bf16"], expected["bf16"] + 1)


def test_no_init_on_meta_skips_meta_tensors_only() -> None:
    original = torch.nn.init.kaiming_uniform_
    with no_init_on_meta():
        meta = torch.nn.Linear(64, 32, device="meta")
        torch.manual_seed(3)
        real = torch.nn.Linear(64, 32)
    torch.manual_seed(3)
    reference = torch.nn.Linear(64, 32)
    assert meta.weight.is_meta
    assert torch.equal(real.weight, reference.weight) and torch.equal(real.bias, reference.bias)
    assert torch.nn.init.kaiming_uniform_ is original


def test_gpu_reservation_counts_the_large_pool_per_device() -> None:
    gpu0, gpu1, cpu = torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cpu")
    mib = 1 << 20
    sizes = reservation_sizes(
        [(mib, gpu0), (mib + 1, gpu0), (3 * mib, gpu0), (5 * mib, gpu1), (9 * mib, cpu), (0, gpu1)]
    )
    # at most 1 MiB comes from the small pool; larger sizes round up to 512 bytes; CPU tensors are not counted
    assert sizes == {gpu0: mib + 512 + 3 * mib, gpu1: 5 * mib}
