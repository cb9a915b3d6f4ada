"""Bad input: each case raises a typed qcore error whose message names what is at fault."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qcore
from helpers.int8_backend import Int8TestConfig, Int8TestQuantizer
from helpers.models import TinyTransformer

WEIGHTS = "diffusion_pytorch_model.safetensors"


def quantized_checkpoint(tiny_ckpt: Path, target: Path, **save_kwargs: object) -> Path:
    model = TinyTransformer.from_pretrained(tiny_ckpt, quantization_config=Int8TestConfig())
    qcore.save_pretrained(model, target, **save_kwargs)
    return target


def edit_weights(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    tensors = load_file(str(path / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(path / WEIGHTS))


# --- backends and configs -----------------------------------------------------------------------


def test_unknown_quant_method_says_what_to_install(tiny_ckpt: Path) -> None:
    with pytest.raises(
        qcore.BackendNotFoundError, match=r"'svdquant' is not installed: pip install qcore-svdquant"
    ):
        TinyTransformer.from_pretrained(tiny_ckpt, quantization_config={"quant_method": "svdquant"})


def test_checkpoint_with_unknown_quant_method_never_loads_unquantized(tiny_ckpt: Path) -> None:
    config = json.loads((tiny_ckpt / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "nunchaku"}
    (tiny_ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(qcore.BackendNotFoundError, match="nunchaku"):
        TinyTransformer.from_pretrained(tiny_ckpt)


def test_known_backends_get_their_distribution_as_hint(
    tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QCORE_DISABLE_PLUGIN_AUTOLOAD", "1")
    with pytest.raises(qcore.BackendNotFoundError, match="pip install qcore-torchao"):
        qcore.get_backend("torchao")
    with pytest.raises(qcore.BackendNotFoundError, match="pip install qcore-bnb"):
        qcore.get_backend("bitsandbytes")


def test_config_dict_without_quant_method(tiny_ckpt: Path) -> None:
    with pytest.raises(qcore.ConfigError, match="quant_method") as info:
        TinyTransformer.from_pretrained(tiny_ckpt, quantization_config={"bits": 4})
    assert info.value.option == "quant_method"


def test_config_of_the_wrong_type(tiny_ckpt: Path) -> None:
    with pytest.raises(qcore.ConfigError, match="quantization_config must be"):
        TinyTransformer.from_pretrained(tiny_ckpt, quantization_config="int8")  # type: ignore[arg-type]


def test_invalid_config_option_lists_choices(int8_backend: qcore.Backend, tiny_ckpt: Path) -> None:
    with pytest.raises(
        qcore.ConfigError, match="compute_dtype must be one of bfloat16, float16, float32"
    ) as info:
        TinyTransformer.from_pretrained(
            tiny_ckpt, quantization_config={"quant_method": "int8-test", "compute_dtype": "int4"}
        )
    assert info.value.option == "compute_dtype"


def test_unknown_config_field(int8_backend: qcore.Backend) -> None:
    with pytest.raises(qcore.ConfigError, match="Int8TestConfig"):
        Int8TestConfig.from_dict({"quant_method": "int8-test", "bits": 3})


def test_user_config_for_another_method_than_the_checkpoint(
    int8_backend: qcore.Backend, tiny_ckpt: Path, tmp_path: Path
) -> None:
    class OtherConfig(Int8TestConfig):
        quant_method = "int8-other"

    class OtherQuantizer(Int8TestQuantizer):
        pass

    qcore.register_backend(qcore.Backend("int8-other", OtherConfig, OtherQuantizer))
    try:
        saved = quantized_checkpoint(tiny_ckpt, tmp_path / "q")
        with pytest.raises(
            qcore.ConfigMismatchError, match="'int8-test' but quantization_config asks for 'int8-other'"
        ):
            TinyTransformer.from_pretrained(saved, quantization_config=OtherConfig())
    finally:
        qcore.unregister_backend("int8-other")


def test_low_cpu_mem_usage_false_with_quantization(int8_backend: qcore.Backend, tiny_ckpt: Path) -> None:
    with pytest.raises(qcore.ConfigError, match="low_cpu_mem_usage"):
        TinyTransformer.from_pretrained(
            tiny_ckpt, quantization_config=Int8TestConfig(), low_cpu_mem_usage=False
        )


def test_torch_dtype_given_as_string(tiny_ckpt: Path) -> None:
    with pytest.raises(qcore.ConfigError, match="torch_dtype"):
        TinyTransformer.from_pretrained(tiny_ckpt, torch_dtype="bf16")  # type: ignore[arg-type]


def test_device_map_that_is_not_a_device(tiny_ckpt: Path) -> None:
    with pytest.raises(qcore.ConfigError, match="device_map 'everywhere'"):
        TinyTransformer.from_pretrained(tiny_ckpt, device_map="everywhere")


def test_missing_required_package(tiny_ckpt: Path) -> None:
    class NeedsConfig(Int8TestConfig):
        quant_method = "needs-pkg"

    class NeedsQuantizer(Int8TestQuantizer):
        required_packages = ("qcore_no_such_package",)

    qcore.register_backend(qcore.Backend("needs-pkg", NeedsConfig, NeedsQuantizer))
    try:
        with pytest.raises(qcore.QuantizerEnvironmentError, match="qcore_no_such_package"):
            TinyTransformer.from_pretrained(tiny_ckpt, quantization_config=NeedsConfig())
    finally:
        qcore.unregister_backend("needs-pkg")


# --- backend validation -------------------------------------------------------------------------


def _backend(name: str, quantizer: type) -> qcore.Backend:
    config = type(f"{name}Config", (Int8TestConfig,), {"quant_method": name})
    return qcore.Backend(name, config, quantizer)


def test_hookimpl_with_an_argument_the_spec_lacks() -> None:
    class Bad(qcore.Quantizer):
        @qcore.hookimpl
        def preprocess_model(self, model, bits):  # type: ignore[no-untyped-def]
            pass

    with pytest.raises(qcore.BackendValidationError, match=r"backend 'bad-arg'.*preprocess_model.*bits"):
        qcore.register_backend(_backend("bad-arg", Bad))


def test_hookimpl_for_a_hook_that_does_not_exist() -> None:
    class Bad(qcore.Quantizer):
        @qcore.hookimpl
        def preprocess_modle(self, model):  # type: ignore[no-untyped-def]
            pass

    with pytest.raises(
        qcore.BackendValidationError, match=r"backend 'bad-name'.*unknown hook.*preprocess_modle"
    ):
        qcore.register_backend(_backend("bad-name", Bad))


def test_hook_method_without_marker() -> None:
    class Bad(qcore.Quantizer):
        def postprocess_model(self, model):  # type: ignore[no-untyped-def]
            pass

    with pytest.raises(
        qcore.BackendValidationError, match=r"'postprocess_model'.*not marked @qcore.hookimpl"
    ):
        qcore.register_backend(_backend("bad-mark", Bad))


def test_claims_parameters_without_creating_them() -> None:
    class Bad(qcore.Quantizer):
        @qcore.hookimpl
        def check_if_quantized_param(self):  # type: ignore[no-untyped-def]
            return True

    with pytest.raises(qcore.BackendValidationError, match="create_quantized_param"):
        qcore.register_backend(_backend("bad-create", Bad))


def test_second_registration_of_a_taken_quant_method(int8_backend: qcore.Backend) -> None:
    with pytest.raises(
        qcore.DuplicateBackendError, match=r"'int8-test'.*helpers.int8_backend.*helpers.int8_backend"
    ):
        qcore.register_backend(int8_backend)


# --- checkpoints --------------------------------------------------------------------------------


def test_directory_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(qcore.CheckpointNotFoundError, match="nowhere"):
        TinyTransformer.from_pretrained(tmp_path / "nowhere")


def test_invalid_hub_id() -> None:
    with pytest.raises(qcore.CheckpointNotFoundError, match="neither a local directory nor a valid hub id"):
        TinyTransformer.from_pretrained("no such//repo")


def test_subfolder_that_does_not_exist(tiny_ckpt: Path) -> None:
    with pytest.raises(qcore.CheckpointNotFoundError, match="subfolder 'transformer'"):
        TinyTransformer.from_pretrained(tiny_ckpt, subfolder="transformer")


def test_missing_config_json(tiny_ckpt: Path) -> None:
    (tiny_ckpt / "config.json").unlink()
    with pytest.raises(qcore.CheckpointNotFoundError, match="config.json not found"):
        TinyTransformer.from_pretrained(tiny_ckpt)


def test_no_weight_files(tiny_ckpt: Path) -> None:
    (tiny_ckpt / WEIGHTS).unlink()
    with pytest.raises(
        qcore.CheckpointNotFoundError, match=r"no weights in .*diffusion_pytorch_model.safetensors"
    ):
        TinyTransformer.from_pretrained(tiny_ckpt)


def test_corrupt_config_json(tiny_ckpt: Path) -> None:
    (tiny_ckpt / "config.json").write_text("{not json")
    with pytest.raises(qcore.CorruptCheckpointError, match=r"config.json: not valid JSON"):
        TinyTransformer.from_pretrained(tiny_ckpt)


def test_safetensors_file_with_a_garbage_header(tiny_ckpt: Path) -> None:
    (tiny_ckpt / WEIGHTS).write_bytes(b"\xff" * 64)
    with pytest.raises(qcore.CorruptCheckpointError, match=f"{WEIGHTS}: not a valid safetensors file"):
        TinyTransformer.from_pretrained(tiny_ckpt)


def test_truncated_safetensors_file(tiny_ckpt: Path) -> None:
    data = (tiny_ckpt / WEIGHTS).read_bytes()
    (tiny_ckpt / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(qcore.CorruptCheckpointError, match=WEIGHTS):
        TinyTransformer.from_pretrained(tiny_ckpt)


def test_index_naming_a_missing_shard(tiny_model: TinyTransformer, tmp_path: Path) -> None:
    qcore.save_pretrained(tiny_model, tmp_path / "s", max_shard_size="8KB")
    shard = sorted((tmp_path / "s").glob("*-00002-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(qcore.CheckpointNotFoundError, match=f"shard '{shard.name}' listed in"):
        TinyTransformer.from_pretrained(tmp_path / "s")


def test_index_mapping_a_key_to_the_wrong_shard(tiny_model: TinyTransformer, tmp_path: Path) -> None:
    qcore.save_pretrained(tiny_model, tmp_path / "s", max_shard_size="8KB")
    index_path = tmp_path / "s" / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = next(k for k, v in index["weight_map"].items() if "-00001-of-" in v)
    index["weight_map"][key] = next(v for v in index["weight_map"].values() if "-00002-of-" in v)
    index_path.write_text(json.dumps(index))
    with pytest.raises(qcore.CorruptCheckpointError, match=f"key '{key}'"):
        TinyTransformer.from_pretrained(tmp_path / "s")


def test_missing_key(tiny_ckpt: Path) -> None:
    edit_weights(tiny_ckpt, lambda t: t.pop("blocks.1.attn.bias"))
    with pytest.raises(qcore.MissingKeysError, match="blocks.1.attn.bias") as info:
        TinyTransformer.from_pretrained(tiny_ckpt)
    assert info.value.keys == ["blocks.1.attn.bias"]


def test_unexpected_key(tiny_ckpt: Path) -> None:
    edit_weights(tiny_ckpt, lambda t: t.update({"blocks.9.attn.weight": torch.zeros(2)}))
    with pytest.raises(qcore.UnexpectedKeysError, match="blocks.9.attn.weight"):
        TinyTransformer.from_pretrained(tiny_ckpt)


def test_shape_mismatch_names_key_and_file(tiny_ckpt: Path) -> None:
    edit_weights(tiny_ckpt, lambda t: t.update({"proj_in.weight": torch.zeros(64, 32, dtype=torch.bfloat16)}))
    with pytest.raises(
        qcore.ShapeMismatchError, match=rf"'proj_in.weight' in {WEIGHTS}.*\(64, 32\).*\(64, 64\)"
    ):
        TinyTransformer.from_pretrained(tiny_ckpt)


def test_prequantized_stats_missing(int8_backend: qcore.Backend, tiny_ckpt: Path, tmp_path: Path) -> None:
    saved = quantized_checkpoint(tiny_ckpt, tmp_path / "q")
    edit_weights(saved, lambda t: t.pop("blocks.0.attn.weight_scale"))
    with pytest.raises(qcore.MissingKeysError, match="blocks.0.attn.weight_scale"):
        TinyTransformer.from_pretrained(saved)


def test_prequantized_tensor_corrupted(int8_backend: qcore.Backend, tiny_ckpt: Path, tmp_path: Path) -> None:
    saved = quantized_checkpoint(tiny_ckpt, tmp_path / "q")
    edit_weights(saved, lambda t: t.update({"proj_in.weight": t["proj_in.weight"].float()}))
    with pytest.raises(qcore.CorruptCheckpointError, match="'proj_in.weight' must be int8"):
        TinyTransformer.from_pretrained(saved)


def test_bin_file_with_a_pickled_object(tiny_ckpt: Path) -> None:
    (tiny_ckpt / WEIGHTS).unlink()
    with open(tiny_ckpt / "diffusion_pytorch_model.bin", "wb") as f:
        pickle.dump({"proj_in.weight": __import__("collections").OrderedDict}, f)
    with pytest.raises(
        qcore.CorruptCheckpointError,
        match=r"diffusion_pytorch_model.bin: cannot be read with torch.load\(weights_only=True\)",
    ):
        TinyTransformer.from_pretrained(tiny_ckpt)


# --- models and saving --------------------------------------------------------------------------


def test_dtype_cast_of_a_quantized_model(int8_backend: qcore.Backend, tiny_ckpt: Path) -> None:
    model = TinyTransformer.from_pretrained(tiny_ckpt, quantization_config=Int8TestConfig())
    with pytest.raises(qcore.DtypeCastError, match=r"quantized with 'int8-test'.*\.to\(torch.float16\)"):
        model.to(torch.float16)
    model.to("cpu")  # moving without a dtype is fine


def test_not_serializable_backend_leaves_the_existing_checkpoint(tiny_ckpt: Path, tmp_path: Path) -> None:
    class FrozenConfig(Int8TestConfig):
        quant_method = "int8-frozen"

    class FrozenQuantizer(Int8TestQuantizer):
        @qcore.hookimpl
        def is_serializable(self) -> bool:
            return False

    qcore.register_backend(qcore.Backend("int8-frozen", FrozenConfig, FrozenQuantizer))
    try:
        model = TinyTransformer.from_pretrained(tiny_ckpt, quantization_config=FrozenConfig())
        before = {p.name: p.read_bytes() for p in tiny_ckpt.iterdir()}
        with pytest.raises(qcore.SerializationError, match="'int8-frozen'"):
            qcore.save_pretrained(model, tiny_ckpt)
        assert {p.name: p.read_bytes() for p in tiny_ckpt.iterdir()} == before
    finally:
        qcore.unregister_backend("int8-frozen")


def test_failure_while_writing_leaves_no_half_written_directory(tiny_ckpt: Path, tmp_path: Path) -> None:
    class BrokenConfig(Int8TestConfig):
        quant_method = "int8-broken-save"

    class BrokenQuantizer(Int8TestQuantizer):
        @qcore.hookimpl
        def get_state_dict_and_metadata(self, state_dict):  # type: ignore[no-untyped-def]
            # A tensor without data: writing fails after the first shards are on disk.
            return {**state_dict, "zz.bad": torch.empty(4096, device="meta")}, {}

    qcore.register_backend(qcore.Backend("int8-broken-save", BrokenConfig, BrokenQuantizer))
    try:
        model = TinyTransformer.from_pretrained(tiny_ckpt, quantization_config=BrokenConfig())
        before = {p.name: p.read_bytes() for p in tiny_ckpt.iterdir()}
        with pytest.raises(
            qcore.SerializationError, match=r"writing diffusion_pytorch_model-\d+-of-\d+.safetensors failed"
        ):
            qcore.save_pretrained(model, tiny_ckpt, max_shard_size="8KB")
        assert {p.name: p.read_bytes() for p in tiny_ckpt.iterdir()} == before
        with pytest.raises(qcore.SerializationError):
            qcore.save_pretrained(model, tmp_path / "fresh", max_shard_size="8KB")
        assert not (tmp_path / "fresh").exists()
        assert [p.name for p in tmp_path.iterdir() if "qcore-tmp" in p.name] == []
    finally:
        qcore.unregister_backend("int8-broken-save")


def test_saving_over_a_file(tiny_model: TinyTransformer, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(qcore.SerializationError, match="not a directory"):
        qcore.save_pretrained(tiny_model, tmp_path / "f")


def test_dequantize_unsupported(tiny_ckpt: Path) -> None:
    class PlainConfig(Int8TestConfig):
        quant_method = "int8-nodeq"

    class NoDequantize(qcore.Quantizer):
        pass

    qcore.register_backend(qcore.Backend("int8-nodeq", PlainConfig, NoDequantize))
    try:
        model = TinyTransformer.from_pretrained(tiny_ckpt, quantization_config=PlainConfig())
        with pytest.raises(qcore.DequantizeError, match="'int8-nodeq' does not support dequantize"):
            model.dequantize()
    finally:
        qcore.unregister_backend("int8-nodeq")
