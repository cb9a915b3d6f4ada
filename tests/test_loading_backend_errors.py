"""A backend's error from create_quantized_param names the tensor at fault; the loader adds the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import qcore
from helpers.models import TinyTransformer

qcore_int8 = pytest.importorskip("qcore_int8")


def _damage(checkpoint: Path, key: str) -> Path:
    """Make the scale ``key`` NaN in the shard holding it; returns that shard."""
    for shard in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            if key not in f.keys():
                continue
            metadata = f.metadata()
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        tensors[key] = torch.full_like(tensors[key], float("nan"))
        save_file(tensors, str(shard), metadata=metadata)
        return shard
    raise AssertionError(f"no shard holds {key}")


def test_a_backends_corrupt_checkpoint_error_names_the_shard(tiny_ckpt: Path, tmp_path: Path) -> None:
    model = qcore.from_pretrained(TinyTransformer, tiny_ckpt, quantization_config=qcore_int8.Int8Config())
    saved = tmp_path / "int8"
    qcore.save_pretrained(model, saved, max_shard_size="8KB")
    assert len(list(saved.glob("*.safetensors"))) > 2
    shard = _damage(saved, "blocks.1.attn.weight_scale")

    with pytest.raises(qcore.CorruptCheckpointError) as caught:
        qcore.from_pretrained(TinyTransformer, saved)
    message = str(caught.value)
    assert "'blocks.1.attn.weight_scale' must hold positive finite floats" in message  # the backend's text
    assert str(shard) in message
    others = [path.name for path in saved.glob("*.safetensors") if path != shard]
    assert not any(name in message for name in others)
