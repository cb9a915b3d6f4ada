"""Pre-quantized bitsandbytes checkpoints: the layout of bitsandbytes' own modules, shards, damaged stats."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import qcore
from helpers.models import TinyTransformer, make_tiny
from qcore_bnb import BitsAndBytesConfig

WEIGHTS = "diffusion_pytorch_model.safetensors"
NF4_DQ = BitsAndBytesConfig(
    load_in_4bit=True,
    bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype="bfloat16",
)
INT8 = BitsAndBytesConfig(load_in_8bit=True)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bnbckpt") / "tiny-bf16"
    qcore.save_pretrained(make_tiny(), path)
    return path


def quantized_copy(ckpt: Path, config: BitsAndBytesConfig, target: Path, **save_kwargs: object) -> Path:
    model = qcore.from_pretrained(
        TinyTransformer, ckpt, quantization_config=config, torch_dtype=torch.bfloat16
    )
    qcore.save_pretrained(model, target, **save_kwargs)
    return target


@pytest.fixture(scope="module")
def nf4_ckpt(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quantized_copy(ckpt, NF4_DQ, tmp_path_factory.mktemp("nf4") / "q")


@pytest.fixture(scope="module")
def int8_ckpt(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quantized_copy(ckpt, INT8, tmp_path_factory.mktemp("int8") / "q")


@pytest.mark.parametrize(
    "options",
    [
        dict(quant_type="nf4", compress_statistics=True, quant_storage=torch.uint8),
        dict(quant_type="fp4", compress_statistics=False, quant_storage=torch.bfloat16),
    ],
)
def test_4bit_keys_dtypes_shapes_equal_bitsandbytes_linear4bit(
    ckpt: Path, tmp_path: Path, options: dict
) -> None:
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=options["quant_type"],
        bnb_4bit_use_double_quant=options["compress_statistics"],
        bnb_4bit_quant_storage=options["quant_storage"],
    )
    saved = load_file(quantized_copy(ckpt, config, tmp_path / "q") / WEIGHTS)
    source = load_file(ckpt / WEIGHTS)
    for name in ("proj_in", "blocks.0.attn", "blocks.1.proj_out", "vace_blocks.0.attn", "proj_out"):
        w = source[f"{name}.weight"]
        bias = f"{name}.bias" in source
        own = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=bias, **options)
        if bias:  # unquantized parameters load in torch_dtype (bf16 here)
            own.bias.data = own.bias.data.to(torch.bfloat16)
        own.load_state_dict(
            {k.removeprefix(f"{name}."): v for k, v in source.items() if k.startswith(f"{name}.")}
        )
        own.weight.data = own.weight.data.to(w.dtype)  # quantize the stored bf16 values, as diffusers does
        own = own.to("cpu")  # bitsandbytes quantizes here
        theirs = own.state_dict()
        ours = {k.removeprefix(f"{name}."): v for k, v in saved.items() if k.startswith(f"{name}.")}
        assert sorted(ours) == sorted(theirs), name
        for key, tensor in theirs.items():
            assert ours[key].dtype == tensor.dtype and ours[key].shape == tensor.shape, (name, key)
            assert same_bits(ours[key], tensor), (name, key)


def test_8bit_keys_dtypes_shapes_equal_bitsandbytes_linear8bitlt(int8_ckpt: Path, ckpt: Path) -> None:
    saved = load_file(int8_ckpt / WEIGHTS)
    source = load_file(ckpt / WEIGHTS)
    for name in ("proj_in", "blocks.0.attn", "blocks.0.proj_out", "proj_out"):
        w = source[f"{name}.weight"]
        bias = f"{name}.bias" in source
        own = bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=bias, has_fp16_weights=False, threshold=6.0)
        if bias:
            own.bias.data = own.bias.data.to(torch.bfloat16)
        own.load_state_dict(
            {k.removeprefix(f"{name}."): v for k, v in source.items() if k.startswith(f"{name}.")}
        )
        theirs = own.to("cpu").state_dict()
        ours = {k.removeprefix(f"{name}."): v for k, v in saved.items() if k.startswith(f"{name}.")}
        assert (
            sorted(ours)
            == sorted(theirs)
            == sorted(["weight", "SCB", "weight_format"] + (["bias"] if bias else []))
        )
        for key, tensor in theirs.items():
            assert same_bits(ours[key], tensor), (name, key)


def test_config_json_is_diffusers_form(nf4_ckpt: Path) -> None:
    diffusers = pytest.importorskip("diffusers")
    config = json.loads((nf4_ckpt / "config.json").read_text())
    stored = config["quantization_config"]
    assert stored == diffusers.BitsAndBytesConfig.from_dict(stored).to_dict()
    assert stored["quant_method"] == "bitsandbytes" and stored["_load_in_4bit"] and stored["load_in_4bit"]
    assert config["_pre_quantization_dtype"] == "bfloat16"


def assert_same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert same_bits(sa[key], sb[key]), key


@pytest.mark.parametrize("which", ["nf4", "int8"])
def test_sharded_save_round_trip_is_bit_exact(
    which: str, nf4_ckpt: Path, int8_ckpt: Path, tmp_path: Path
) -> None:
    source = nf4_ckpt if which == "nf4" else int8_ckpt
    model = qcore.from_pretrained(TinyTransformer, source, torch_dtype=torch.bfloat16)
    qcore.save_pretrained(model, tmp_path / "sharded", max_shard_size="4KB")
    index = json.loads((tmp_path / "sharded" / f"{WEIGHTS}.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    reloaded = qcore.from_pretrained(TinyTransformer, tmp_path / "sharded", torch_dtype=torch.bfloat16)
    assert_same_model(model, reloaded)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(model(x), reloaded(x))


def split_into_shards(source: Path, target: Path, second: set[str]) -> None:
    """Write ``source``'s tensors as two shards, the keys in ``second`` in the second one."""
    shutil.copytree(source, target)
    (target / WEIGHTS).unlink()
    tensors = load_file(source / WEIGHTS)
    names = [
        "diffusion_pytorch_model-00001-of-00002.safetensors",
        "diffusion_pytorch_model-00002-of-00002.safetensors",
    ]
    parts = [
        {k: v for k, v in tensors.items() if k not in second},
        {k: v for k, v in tensors.items() if k in second},
    ]
    for name, part in zip(names, parts, strict=True):
        save_file(part, target / name, metadata={"format": "pt"})
    weight_map = {k: names[k in second] for k in tensors}
    (target / f"{WEIGHTS}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("which", ["nf4", "int8"])
def test_stats_in_another_shard_than_their_weight(
    which: str, nf4_ckpt: Path, int8_ckpt: Path, tmp_path: Path
) -> None:
    source = nf4_ckpt if which == "nf4" else int8_ckpt
    keys = load_file(source / WEIGHTS).keys()
    stats = {
        k
        for k in keys
        if k.startswith("blocks.0.attn.") and k not in ("blocks.0.attn.weight", "blocks.0.attn.bias")
    }
    assert stats
    split_into_shards(source, tmp_path / "split", stats)
    with safe_open(tmp_path / "split" / "diffusion_pytorch_model-00002-of-00002.safetensors", "pt") as f:
        assert "blocks.0.attn.weight" not in f.keys() and stats <= set(f.keys())
    expected = qcore.from_pretrained(TinyTransformer, source, torch_dtype=torch.bfloat16)
    got = qcore.from_pretrained(TinyTransformer, tmp_path / "split", torch_dtype=torch.bfloat16)
    assert_same_model(expected, got)


def damaged(source: Path, target: Path, edit) -> Path:  # noqa: ANN001 (a small callback)
    shutil.copytree(source, target)
    tensors = load_file(source / WEIGHTS)
    edit(tensors)
    save_file(tensors, target / WEIGHTS, metadata={"format": "pt"})
    return target


QS = "blocks.0.attn.weight.quant_state.bitsandbytes__nf4"


def _set(key: str, value: torch.Tensor):  # noqa: ANN202
    return lambda t: t.__setitem__(key, value)


def _drop(key: str):  # noqa: ANN202
    return lambda t: t.pop(key)


NF4_DAMAGE = [
    (
        "missing absmax",
        _drop("blocks.0.attn.weight.absmax"),
        qcore.MissingKeysError,
        "blocks.0.attn.weight.absmax",
    ),
    (
        "missing nested_absmax",
        _drop("proj_in.weight.nested_absmax"),
        qcore.MissingKeysError,
        "proj_in.weight.nested_absmax",
    ),
    ("missing quant_state", _drop(QS), qcore.MissingKeysError, QS),
    (
        "garbage quant_state",
        _set(QS, torch.tensor([0xFF, 0x00, 0x7B], dtype=torch.uint8)),
        qcore.CorruptCheckpointError,
        QS,
    ),
    ("quant_state not uint8", _set(QS, torch.zeros(4)), qcore.CorruptCheckpointError, QS),
    (
        "absmax wrong size",
        _set("blocks.0.attn.weight.absmax", torch.zeros(3, dtype=torch.uint8)),
        qcore.CorruptCheckpointError,
        "blocks.0.attn.weight.absmax",
    ),
    (
        "quant_map wrong dtype",
        _set("proj_out.weight.quant_map", torch.zeros(16, dtype=torch.float16)),
        qcore.CorruptCheckpointError,
        "proj_out.weight.quant_map",
    ),
    (
        "nested_absmax NaN",
        _set("proj_out.weight.nested_absmax", torch.full((1,), float("nan"))),
        qcore.CorruptCheckpointError,
        "proj_out.weight.nested_absmax",
    ),
    (
        "weight wrong shape",
        _set("blocks.0.attn.weight", torch.zeros(100, 1, dtype=torch.uint8)),
        qcore.ShapeMismatchError,
        "blocks.0.attn.weight",
    ),
    ("missing weight", _drop("blocks.0.attn.weight"), qcore.MissingKeysError, "blocks.0.attn.weight"),
    (
        "stray stat",
        _set("norm_out.weight.absmax", torch.zeros(1)),
        qcore.CorruptCheckpointError,
        "norm_out.weight.absmax",
    ),
]


def test_quant_state_for_another_shape_is_refused(nf4_ckpt: Path, tmp_path: Path) -> None:
    blob = load_file(nf4_ckpt / WEIGHTS)[QS]
    info = json.loads(bytes(blob.tolist()))
    info["shape"] = [32, 128]
    fake = torch.tensor(list(json.dumps(info).encode()), dtype=torch.uint8)
    path = damaged(nf4_ckpt, tmp_path / "bad", _set(QS, fake))
    with pytest.raises(qcore.CorruptCheckpointError, match=r"shape \[32, 128\]"):
        qcore.from_pretrained(TinyTransformer, path, torch_dtype=torch.bfloat16)


INT8_DAMAGE = [
    ("missing SCB", _drop("blocks.0.attn.SCB"), qcore.MissingKeysError, "blocks.0.attn.SCB"),
    (
        "float weight",
        _set("proj_in.weight", torch.zeros(64, 64)),
        qcore.CorruptCheckpointError,
        "proj_in.weight",
    ),
    ("SCB wrong size", _set("proj_out.SCB", torch.ones(3)), qcore.CorruptCheckpointError, "proj_out.SCB"),
    (
        "column format",
        _set("proj_out.weight_format", torch.tensor(1, dtype=torch.uint8)),
        qcore.CorruptCheckpointError,
        "proj_out.weight_format",
    ),
]


DAMAGE = [("nf4", *damage) for damage in NF4_DAMAGE] + [("int8", *damage) for damage in INT8_DAMAGE]


@pytest.mark.parametrize(
    ("kind", "label", "edit", "error", "key"), DAMAGE, ids=[f"{d[0]}: {d[1]}" for d in DAMAGE]
)
def test_damaged_checkpoint_raises_naming_the_key(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    kind: str,
    label: str,
    edit,
    error: type,
    key: str,  # noqa: ANN001
) -> None:
    path = damaged(request.getfixturevalue(f"{kind}_ckpt"), tmp_path / "bad", edit)
    with pytest.raises(error) as info:
        qcore.from_pretrained(TinyTransformer, path, torch_dtype=torch.bfloat16)
    assert key in str(info.value)


def test_legacy_config_json_without_quant_method_loads_quantized(nf4_ckpt: Path, tmp_path: Path) -> None:
    path = tmp_path / "legacy"
    shutil.copytree(nf4_ckpt, path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "bfloat16",
    }
    (path / "config.json").write_text(json.dumps(config))
    model = qcore.from_pretrained(TinyTransformer, path, torch_dtype=torch.bfloat16)
    assert isinstance(model.blocks[0].attn, bnb.nn.Linear4bit) and model.is_loaded_in_4bit
    assert_same_model(model, qcore.from_pretrained(TinyTransformer, nf4_ckpt, torch_dtype=torch.bfloat16))


def test_loading_attributes_apply_other_fields_are_ignored(
    nf4_ckpt: Path, caplog: pytest.LogCaptureFixture
) -> None:
    user = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float16
    )
    with caplog.at_level("WARNING", logger="qcore"):
        model = qcore.from_pretrained(
            TinyTransformer, nf4_ckpt, quantization_config=user, torch_dtype=torch.bfloat16
        )
    assert "bnb_4bit_quant_type" in caplog.text
    assert model.blocks[0].attn.compute_dtype == torch.float16  # a loading attribute: the user's wins
    assert model.blocks[0].attn.weight.quant_type == "nf4"  # the layout: the checkpoint's wins
    assert user.bnb_4bit_quant_type == "fp4"


def test_8bit_checkpoint_with_quantize_config_for_4bit_keeps_checkpoint_layout(int8_ckpt: Path) -> None:
    model = qcore.from_pretrained(
        TinyTransformer,
        int8_ckpt,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True),
        torch_dtype=torch.bfloat16,
    )
    assert isinstance(model.proj_in, bnb.nn.Linear8bitLt) and model.is_loaded_in_8bit
