"""The loader's contract with users and backends: keyword arguments (diffusers' names), devices,
oversized configs, calibration-only backends, what the hooks receive, and the load record."""

from __future__ import annotations

import ast
import inspect
import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

import qcore
from helpers.fixtures import unaligned_tensors
from helpers.int8_backend import Int8Linear, Int8TestConfig, Int8TestQuantizer
from helpers.models import TinyTransformer, flux_inputs, tiny_flux_config
from qcore._arguments import DIFFUSERS_ONLY_OPTIONS
from qcore.testing import LOAD_ORDER, HookRecorder


class CalibratedConfig(Int8TestConfig):
    quant_method = "calibrated-test"


class CalibratedQuantizer(Int8TestQuantizer):
    requires_calibration = True


class PickyConfig(Int8TestConfig):
    quant_method = "picky-test"


class PickyQuantizer(Int8TestQuantizer):
    """Answers ``False`` for every shape instead of raising."""

    @qcore.hookimpl
    def check_quantized_param_shape(self, param_name: str) -> bool:
        return False


@pytest.fixture
def backends(int8_backend: qcore.Backend) -> Iterator[None]:
    extra = [
        qcore.Backend("calibrated-test", CalibratedConfig, CalibratedQuantizer),
        qcore.Backend("picky-test", PickyConfig, PickyQuantizer),
    ]
    for backend in extra:
        qcore.register_backend(backend)
    try:
        yield
    finally:
        for backend in extra:
            qcore.unregister_backend(backend.quant_method)


def _with_quant_method(saved: Path, quant_method: str) -> None:
    config = json.loads((saved / "config.json").read_text())
    config["quantization_config"]["quant_method"] = quant_method
    (saved / "config.json").write_text(json.dumps(config))


# --- keyword arguments ----------------------------------------------------------------------------


def test_dtype_is_torch_dtype(tiny_ckpt: Path) -> None:
    model = TinyTransformer.from_pretrained(tiny_ckpt, dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    same = TinyTransformer.from_pretrained(tiny_ckpt, dtype=torch.float16, torch_dtype=torch.float16)
    assert {p.dtype for p in same.parameters()} == {torch.float16}


def test_dtype_and_torch_dtype_that_disagree_are_refused(tiny_ckpt: Path) -> None:
    with pytest.raises(qcore.ConfigError, match="dtype=torch.float16 and torch_dtype=torch.bfloat16") as info:
        TinyTransformer.from_pretrained(tiny_ckpt, dtype=torch.float16, torch_dtype=torch.bfloat16)
    assert info.value.option == "dtype"


def test_diffusers_keywords_at_their_defaults_are_accepted(tiny_ckpt: Path) -> None:
    model = TinyTransformer.from_pretrained(
        tiny_ckpt,
        force_download=False,
        proxies=None,
        offload_folder=None,
        offload_state_dict=True,
        disable_mmap=False,
        ignore_mismatched_sizes=False,
        use_flashpack=False,
        flashpack_kwargs={},
        output_loading_info=False,
    )
    assert isinstance(model, TinyTransformer)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("proxies", {"https": "http://proxy:3128"}),  # huggingface_hub >= 1.0 reads them from the environment
        ("offload_folder", "offload"),
        ("disable_mmap", True),
        ("ignore_mismatched_sizes", True),
        ("use_flashpack", True),
        ("flashpack_kwargs", {"num_streams": 4}),
        ("parallel_config", object()),
        ("mirror", "https://hf-mirror.com"),
    ],
)
def test_unsupported_diffusers_keywords_name_themselves(tiny_ckpt: Path, name: str, value: Any) -> None:
    with pytest.raises(qcore.ConfigError, match=f"{name}=.* is not supported by qcore: ") as info:
        TinyTransformer.from_pretrained(tiny_ckpt, **{name: value})
    assert info.value.option == name


@pytest.mark.parametrize("value", [None, False, True])
def test_offload_state_dict_is_accepted_with_any_value(tiny_ckpt: Path, value: bool | None) -> None:
    model = TinyTransformer.from_pretrained(tiny_ckpt, offload_state_dict=value)
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def diffusers_popped_keywords() -> dict[str, ast.expr | None]:
    """The keywords diffusers' ModelMixin.from_pretrained takes out of its ``**kwargs``, with the source
    expression of each one's default."""
    diffusers = pytest.importorskip("diffusers")
    source = textwrap.dedent(inspect.getsource(diffusers.ModelMixin.from_pretrained))
    found: dict[str, ast.expr | None] = {}
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("pop", "get")
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "kwargs"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            found[node.args[0].value] = node.args[1] if len(node.args) > 1 else None
    return found


def test_every_diffusers_keyword_is_taken_or_named() -> None:
    popped = diffusers_popped_keywords()
    assert {"dtype", "torch_dtype", "device_map", "variant", "quantization_config"} <= set(popped)
    ours = set(inspect.signature(qcore.from_pretrained).parameters) - {"model_cls", "diffusers_options"}
    unknown = sorted(set(popped) - ours - set(DIFFUSERS_ONLY_OPTIONS))
    assert not unknown, (
        f"diffusers' from_pretrained takes {unknown}, which qcore.from_pretrained neither implements nor "
        "lists in DIFFUSERS_ONLY_OPTIONS (and docs/user-guide.md)"
    )
    assert not set(DIFFUSERS_ONLY_OPTIONS) & ours


def test_every_diffusers_keyword_at_its_diffusers_default_loads(tiny_ckpt: Path) -> None:
    defaults = {}
    for name, expression in diffusers_popped_keywords().items():
        try:
            defaults[name] = ast.literal_eval(expression) if expression is not None else None
        except ValueError:
            continue  # a module constant, e.g. low_cpu_mem_usage's
    defaults.pop("subfolder")  # the checkpoint is at the top of tiny_ckpt
    model = TinyTransformer.from_pretrained(tiny_ckpt, **defaults)
    plain = TinyTransformer.from_pretrained(tiny_ckpt)
    ours, theirs = model.state_dict(), plain.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_unknown_keyword_is_a_config_error_naming_it(tiny_ckpt: Path) -> None:
    with pytest.raises(qcore.ConfigError, match="unknown keyword argument 'torch_dtpe'") as info:
        qcore.from_pretrained(TinyTransformer, tiny_ckpt, torch_dtpe=torch.float16)
    assert info.value.option == "torch_dtpe"


def test_output_loading_info_returns_what_diffusers_returns(tmp_path: Path) -> None:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    FluxTransformer2DModel(**tiny_flux_config()).to(torch.bfloat16).save_pretrained(tmp_path / "flux")
    flux = tmp_path / "flux"
    theirs, their_info = FluxTransformer2DModel.from_pretrained(
        flux, dtype=torch.bfloat16, output_loading_info=True
    )
    ours, our_info = qcore.from_pretrained(
        FluxTransformer2DModel, flux, dtype=torch.bfloat16, output_loading_info=True
    )
    assert (
        our_info
        == their_info
        == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    )
    assert torch.equal(ours(**flux_inputs())[0], theirs(**flux_inputs())[0])


# --- devices and oversized configs -----------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize(
    "device_map", ["cuda", "cuda:0", 0, torch.device("cuda"), {"": "cuda"}, {"proj_in": 0, "": "cpu"}]
)
def test_cuda_device_map_without_cuda_is_refused_before_any_file_is_read(
    tmp_path: Path, device_map: Any
) -> None:
    # The path does not exist: the device check comes first, so the error is about the device.
    with pytest.raises(qcore.ConfigError, match="this machine has no cuda device") as info:
        TinyTransformer.from_pretrained(tmp_path / "absent", device_map=device_map)
    assert info.value.option == "device_map"


def test_config_far_larger_than_its_weights_is_refused(tiny_ckpt: Path) -> None:
    config = json.loads((tiny_ckpt / "config.json").read_text())
    config["depth"] = 10**7  # would build for many minutes
    (tiny_ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        qcore.CorruptCheckpointError, match="config.json: the config describes a model larger"
    ):
        TinyTransformer.from_pretrained(tiny_ckpt)


def test_oversized_single_parameter_is_refused(tiny_ckpt: Path) -> None:
    config = json.loads((tiny_ckpt / "config.json").read_text())
    config["out_dim"] = 10**9
    (tiny_ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(qcore.CorruptCheckpointError, match="config.json"):
        TinyTransformer.from_pretrained(tiny_ckpt)


def test_config_the_class_cannot_take_is_a_typed_error(tiny_ckpt: Path) -> None:
    config = json.loads((tiny_ckpt / "config.json").read_text())
    config["depth"] = "two"
    (tiny_ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(qcore.CorruptCheckpointError, match="cannot build TinyTransformer from this config"):
        TinyTransformer.from_pretrained(tiny_ckpt)


# --- backends ---------------------------------------------------------------------------------------


def test_calibration_only_backend_cannot_quantize_on_load(
    backends: None, tiny_ckpt: Path, tmp_path: Path
) -> None:
    with pytest.raises(qcore.ConfigError, match="'calibrated-test' needs calibration data") as info:
        TinyTransformer.from_pretrained(tiny_ckpt, quantization_config=CalibratedConfig())
    assert info.value.option == "quantization_config"
    # It still reads checkpoints in its format.
    saved = tmp_path / "calibrated"
    TinyTransformer.from_pretrained(tiny_ckpt, quantization_config=Int8TestConfig()).save_pretrained(saved)
    _with_quant_method(saved, "calibrated-test")
    model = TinyTransformer.from_pretrained(saved)
    assert isinstance(model.hf_quantizer, CalibratedQuantizer) and isinstance(model.proj_in, Int8Linear)


def test_shape_check_answering_false_stops_the_load(backends: None, tiny_ckpt: Path, tmp_path: Path) -> None:
    saved = tmp_path / "picky"
    TinyTransformer.from_pretrained(tiny_ckpt, quantization_config=Int8TestConfig()).save_pretrained(saved)
    _with_quant_method(saved, "picky-test")
    with pytest.raises(qcore.ShapeMismatchError, match="backend 'picky-test' cannot turn into the model's"):
        TinyTransformer.from_pretrained(saved)


class _Probe:
    """An observer that records what the stage 2 and 4 hooks receive."""

    def __init__(self) -> None:
        self.seen: dict[str, Any] = {}

    @qcore.hookimpl
    def update_torch_dtype(
        self, quantizer: qcore.Quantizer | None, checkpoint_dtype: torch.dtype | None
    ) -> None:
        self.seen["checkpoint_dtype"] = checkpoint_dtype
        self.seen["quantizer"] = quantizer

    @qcore.hookimpl
    def preprocess_model(
        self,
        model: torch.nn.Module,
        torch_dtype: torch.dtype | None,
        checkpoint_tensors: dict[str, torch.Tensor],
    ) -> None:
        self.seen["torch_dtype"] = torch_dtype
        self.seen["checkpoint_tensors"] = dict(checkpoint_tensors)
        self.seen["skeleton"] = {(p.device.type, p.dtype) for p in model.parameters()}


def test_preprocess_model_sees_the_load_dtype_and_the_checkpoint_tensors(
    int8_backend: qcore.Backend, tiny_ckpt: Path, tmp_path: Path
) -> None:
    probe = _Probe()
    TinyTransformer.from_pretrained(tiny_ckpt, quantization_config=Int8TestConfig(), observers=[probe])
    assert probe.seen["checkpoint_dtype"] == torch.bfloat16  # from the headers, in stage 2
    assert probe.seen["torch_dtype"] == torch.bfloat16  # none given: the checkpoint's
    assert probe.seen["skeleton"] <= {("meta", torch.float32)}  # float32 on meta, whatever the dtype

    saved = tmp_path / "int8"
    TinyTransformer.from_pretrained(tiny_ckpt, quantization_config=Int8TestConfig()).save_pretrained(saved)
    probe = _Probe()
    TinyTransformer.from_pretrained(saved, torch_dtype=torch.float16, observers=[probe])
    assert probe.seen["torch_dtype"] == torch.float16
    with safe_open(str(saved / "diffusion_pytorch_model.safetensors"), "pt") as f:
        stored = {
            key: (f.get_slice(key).get_dtype(), tuple(f.get_slice(key).get_shape())) for key in f.keys()
        }
    names = {"I8": torch.int8, "F32": torch.float32, "BF16": torch.bfloat16}
    seen = probe.seen["checkpoint_tensors"]
    assert {k: (v.dtype, tuple(v.shape)) for k, v in seen.items()} == {
        k: (names[d], s) for k, (d, s) in stored.items()
    }
    assert {t.device.type for t in seen.values()} == {"meta"}


def test_observers_see_unquantized_loads_with_no_quantizer(tiny_ckpt: Path) -> None:
    recorder, probe = HookRecorder(), _Probe()
    TinyTransformer.from_pretrained(tiny_ckpt, observers=[recorder, probe])
    assert probe.seen["quantizer"] is None
    called = [name for name in LOAD_ORDER if recorder.count(name)]
    assert called == [
        n for n in LOAD_ORDER if n not in ("check_quantized_param_shape", "create_quantized_param")
    ]


# --- the load record ---------------------------------------------------------------------------------


def test_saving_and_dequantize_use_the_load_record(
    int8_backend: qcore.Backend, tiny_ckpt: Path, tmp_path: Path
) -> None:
    recorder = HookRecorder()
    model = TinyTransformer.from_pretrained(
        tiny_ckpt, quantization_config=Int8TestConfig(), observers=[recorder]
    )
    assert not hasattr(model.hf_quantizer, "hooks")  # no back-pointer from the quantizer to the loader
    qcore.save_pretrained(model, tmp_path / "q")
    assert recorder.count("get_state_dict_and_metadata") == 1  # the load's observers see the save
    qcore.dequantize(model)
    assert recorder.count("dequantize") == 1
    with pytest.raises(qcore.QcoreError, match="was not loaded quantized by qcore"):
        qcore.dequantize(model)
    qcore.save_pretrained(model, tmp_path / "plain")
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())


def test_a_quantizer_set_by_hand_is_not_a_qcore_load(int8_backend: qcore.Backend, tiny_ckpt: Path) -> None:
    model = TinyTransformer.from_pretrained(tiny_ckpt)
    model.hf_quantizer = Int8TestQuantizer(Int8TestConfig())
    with pytest.raises(qcore.QcoreError, match="was not loaded quantized by qcore"):
        qcore.dequantize(model)


def test_tensors_handed_to_create_quantized_param_are_aligned(
    int8_backend: qcore.Backend, tiny_ckpt: Path, tmp_path: Path
) -> None:
    saved = tmp_path / "int8"
    quantized = TinyTransformer.from_pretrained(tiny_ckpt, quantization_config=Int8TestConfig())
    qcore.save_pretrained(quantized, saved, max_shard_size="8KB")
    # The files put some tensors at offsets that are not multiples of 64 (so a view would be unaligned).
    unaligned = unaligned_tensors(saved)
    assert unaligned

    starts: dict[str, int] = {}

    class Alignment:
        @qcore.hookimpl(tryfirst=True)
        def create_quantized_param(self, state_dict: dict[str, torch.Tensor]) -> None:
            starts.update({key: tensor.data_ptr() % 64 for key, tensor in state_dict.items()})

    TinyTransformer.from_pretrained(saved, observers=[Alignment()])
    assert set(unaligned) & set(starts)
    assert set(starts.values()) == {0}
