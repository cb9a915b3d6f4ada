"""qcore-torchao checkpoints: torchao's safetensors layout, exact round trips, sharding, versions, and
corrupt or hostile metadata."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torchao.utils import TorchAOBaseTensor

import qcore
from helpers.models import TinyTransformer
from qcore_torchao import TorchAoConfig

ROUND_TRIP_TYPES = ["int8wo", "int8dq", "float8wo", "float8wo_e5m2", "int4dq", "uint4wo"]


def inner_tensors(t: torch.Tensor) -> dict[str, torch.Tensor]:
    names, _ = t.__tensor_flatten__()
    return {name: getattr(t, name) for name in names}


def assert_same_model(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert type(sa[key]) is type(sb[key]), key
        if isinstance(sa[key], TorchAOBaseTensor):
            ia, ib = inner_tensors(sa[key]), inner_tensors(sb[key])
            assert ia.keys() == ib.keys()
            for part in ia:
                assert ia[part].dtype == ib[part].dtype and torch.equal(ia[part], ib[part]), (key, part)
        else:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            metadata.update(f.metadata() or {})
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors, metadata


@pytest.fixture
def int8_ckpt(tmp_path: Path, tiny_ckpt: Path) -> Path:
    model = TinyTransformer.from_pretrained(tiny_ckpt, quantization_config=TorchAoConfig("int8wo"))
    path = tmp_path / "int8wo"
    qcore.save_pretrained(model, path)
    return path


def rewrite(path: Path, change: Callable[[dict[str, torch.Tensor], dict[str, str]], None]) -> Path:
    """Copy a one-file checkpoint and let ``change`` edit its tensors and header metadata."""
    target = path.parent / f"{path.name}-edited"
    shutil.copytree(path, target)
    (weights,) = target.glob("*.safetensors")
    tensors, metadata = read_checkpoint(target)
    change(tensors, metadata)
    save_file(tensors, str(weights), metadata=metadata)
    return target


@pytest.mark.parametrize("name", ROUND_TRIP_TYPES)
def test_save_load_round_trip_is_exact(
    name: str, tiny_ckpt: Path, tmp_path: Path, tiny_input: torch.Tensor
) -> None:
    config = TorchAoConfig(name, modules_to_not_convert=["proj_out"])
    model = TinyTransformer.from_pretrained(tiny_ckpt, quantization_config=config)
    qcore.save_pretrained(model, tmp_path / name)

    on_disk = json.loads((tmp_path / name / "config.json").read_text())
    assert on_disk["quantization_config"] == config.to_dict()
    tensors, metadata = read_checkpoint(tmp_path / name)
    assert "blocks.0.attn._weight_qdata" in tensors and "blocks.0.attn._weight_scale" in tensors
    assert "blocks.0.attn.weight" not in tensors
    assert "blocks.0.proj_out.weight" in tensors  # skipped modules are stored as plain tensors
    entry = json.loads(metadata["blocks.0.attn.weight"])
    assert entry["_type"] == type(model.blocks[0].attn.weight).__name__
    assert set(json.loads(metadata["tensor_names"])) == set(model.state_dict())
    import torchao

    assert metadata["torchao_version"] == torchao.__version__

    reloaded = TinyTransformer.from_pretrained(tmp_path / name)
    assert reloaded.hf_quantizer.pre_quantized
    assert reloaded.hf_quantizer.quantization_config == config
    assert_same_model(reloaded, model)
    assert torch.equal(reloaded(tiny_input), model(tiny_input))


def test_sharded_round_trip_splits_a_weight_across_shards(
    int8_ckpt: Path, tmp_path: Path, tiny_input: torch.Tensor
) -> None:
    model = TinyTransformer.from_pretrained(int8_ckpt)
    path = tmp_path / "sharded"
    # A 64x64 int8 qdata (4096 bytes) nearly fills a shard, so its scale lands in the next one.
    qcore.save_pretrained(model, path, max_shard_size=4200)
    index = json.loads((path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    assert len(set(weight_map.values())) > 3
    split = [
        name
        for name in json.loads(index["metadata"]["tensor_names"])
        if f"{name.rpartition('.')[0]}._weight_qdata" in weight_map
        and weight_map[f"{name.rpartition('.')[0]}._weight_qdata"]
        != weight_map[f"{name.rpartition('.')[0]}._weight_scale"]
    ]
    assert split, "no weight has its qdata and scale in different shards"
    reloaded = TinyTransformer.from_pretrained(path)
    assert_same_model(reloaded, model)
    assert torch.equal(reloaded(tiny_input), model(tiny_input))


def test_pre_quantized_load_with_the_same_user_config(int8_ckpt: Path) -> None:
    model = TinyTransformer.from_pretrained(int8_ckpt, quantization_config=TorchAoConfig("int8wo"))
    assert model.hf_quantizer.pre_quantized


def test_saved_by_another_torchao_version_loads_with_warnings(
    int8_ckpt: Path, tiny_input: torch.Tensor, caplog: pytest.LogCaptureFixture
) -> None:
    expected = TinyTransformer.from_pretrained(int8_ckpt)(tiny_input)

    def older(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        metadata["torchao_version"] = "0.99.0"

    path = rewrite(int8_ckpt, older)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["quant_type"]["default"]["_version"] = 3
    (path / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="qcore.torchao"):
        model = TinyTransformer.from_pretrained(path)
    assert "saved with torchao 0.99.0" in caplog.text
    assert "Int8WeightOnlyConfig" in caplog.text and "version" in caplog.text
    assert model.hf_quantizer.quantization_config.quant_type.version == 3
    assert torch.equal(model(tiny_input), expected)


def test_config_that_no_longer_parses_is_a_config_error(int8_ckpt: Path) -> None:
    config = json.loads((int8_ckpt / "config.json").read_text())
    config["quantization_config"]["quant_type"]["default"]["_version"] = 1
    (int8_ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(qcore.ConfigError, match="cannot build Int8WeightOnlyConfig"):
        TinyTransformer.from_pretrained(int8_ckpt)


@pytest.mark.parametrize("type_name", ["os.system", "subprocess.Popen", "Popen", "quantize_", "Int8Tensor"])
def test_checkpoint_config_naming_a_class_outside_torchao_is_refused(int8_ckpt: Path, type_name: str) -> None:
    config = json.loads((int8_ckpt / "config.json").read_text())
    config["quantization_config"]["quant_type"]["default"]["_type"] = type_name
    (int8_ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(qcore.ConfigError, match=f"names {type_name!r}, which is not a torchao config class"):
        TinyTransformer.from_pretrained(int8_ckpt)


# --- corrupt tensor metadata --------------------------------------------------------------------

KEY = "blocks.0.attn.weight"


def _set_entry(field: str, value: object) -> Callable[[dict[str, torch.Tensor], dict[str, str]], None]:
    def change(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        entry = json.loads(metadata[KEY])
        entry[field] = value
        metadata[KEY] = json.dumps(entry)

    return change


def _nested(value: object) -> Callable[[dict[str, torch.Tensor], dict[str, str]], None]:
    def change(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        entry = json.loads(metadata[KEY])
        entry["_data"]["dtype"] = value
        metadata[KEY] = json.dumps(entry)

    return change


def _raw(value: str) -> Callable[[dict[str, torch.Tensor], dict[str, str]], None]:
    def change(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        metadata[KEY] = value

    return change


def _drop_entry(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    del metadata[KEY]


def _drop_tensor_names(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    del metadata["tensor_names"]


def _bad_tensor_names(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    metadata["tensor_names"] = "[blocks.0.attn.weight"


def _float_qdata(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tensors["blocks.0.attn._weight_qdata"] = tensors["blocks.0.attn._weight_qdata"].float()


def _short_qdata(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tensors["blocks.0.attn._weight_qdata"] = tensors["blocks.0.attn._weight_qdata"][:-1].clone()


CORRUPTIONS: dict[str, tuple[Callable[..., None], type[qcore.QcoreError], str]] = {
    "os.system as tensor type": (
        _set_entry("_type", "os.system"),
        qcore.CorruptCheckpointError,
        "'blocks.0.attn.weight' is stored as 'os.system'",
    ),
    "non-torchao tensor class": (
        _set_entry("_type", "NF4Tensor"),
        qcore.CorruptCheckpointError,
        "stored as 'NF4Tensor', which is not a torchao tensor class",
    ),
    "nested class not allowed": (
        _nested({"_type": "PosixPath", "_data": "/etc/passwd"}),
        qcore.CorruptCheckpointError,
        "names 'PosixPath'",
    ),
    "nested dtype not a dtype": (
        _nested({"_type": "torch.dtype", "_data": "save"}),
        qcore.CorruptCheckpointError,
        "'save' is not a torch dtype",
    ),
    "invalid json": (
        _raw("{not json"),
        qcore.CorruptCheckpointError,
        "the metadata of 'blocks.0.attn.weight' is not valid JSON",
    ),
    "no _tensor_data_names": (
        _set_entry("_tensor_data_names", None),
        qcore.CorruptCheckpointError,
        "'blocks.0.attn.weight' \\(Int8Tensor\\) lacks",
    ),
    "entry missing": (
        _drop_entry,
        qcore.CorruptCheckpointError,
        "the metadata of 'blocks.0.attn.weight' is missing",
    ),
    "tensor_names missing": (
        _drop_tensor_names,
        qcore.CorruptCheckpointError,
        "carry no torchao tensor metadata",
    ),
    "tensor_names not json": (
        _bad_tensor_names,
        qcore.CorruptCheckpointError,
        "'tensor_names' is not valid JSON",
    ),
    "qdata not quantized": (
        _float_qdata,
        qcore.CorruptCheckpointError,
        "'blocks.0.attn._weight_qdata' of 'blocks.0.attn.weight'",
    ),
    "qdata truncated": (_short_qdata, qcore.ShapeMismatchError, "'blocks.0.attn.weight'.*shape"),
    "unknown tensor attribute": (
        _set_entry("_data", {"no_such_attribute": 1}),
        qcore.CorruptCheckpointError,
        "cannot rebuild 'blocks.0.attn.weight' as Int8Tensor",
    ),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_tensor_metadata_is_a_typed_error_naming_the_tensor(int8_ckpt: Path, case: str) -> None:
    change, error, pattern = CORRUPTIONS[case]
    path = rewrite(int8_ckpt, change)
    with pytest.raises(error, match=pattern):
        TinyTransformer.from_pretrained(path)


def test_missing_piece_names_the_key(int8_ckpt: Path) -> None:
    def drop_scale(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        del tensors["blocks.0.attn._weight_scale"]

    with pytest.raises(qcore.MissingKeysError, match=r"blocks\.0\.attn\._weight_scale"):
        TinyTransformer.from_pretrained(rewrite(int8_ckpt, drop_scale))


def test_saving_a_tensor_type_torchao_cannot_flatten_is_refused(int8_ckpt: Path, tmp_path: Path) -> None:
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    model = TinyTransformer.from_pretrained(int8_ckpt)
    weight = model.blocks[0].attn.weight.dequantize()
    model.blocks[0].attn.weight = nn.Parameter(to_nf4(weight, 32, 2), requires_grad=False)
    target = tmp_path / "nf4"
    with pytest.raises(qcore.SerializationError, match=r"'blocks\.0\.attn\.weight' is a NF4Tensor"):
        qcore.save_pretrained(model, target)
    assert not target.exists()
