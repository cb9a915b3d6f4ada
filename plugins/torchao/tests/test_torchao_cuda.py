"""qcore-torchao on CUDA: every quant type quantizes on load within its error bound, round-trips through
save/load exactly and dequantizes (or refuses with a typed error); diffusers interop in both directions.

gpu-marked: skipped where CUDA is unavailable. On the GPU machine: ``pytest -m gpu plugins/torchao/tests``.
Load time and peak GPU memory of every load are recorded as test properties, never asserted
(``--junitxml=torchao-gpu.xml`` keeps them; bench/gpu_suite.sh does).
"""

from __future__ import annotations

import gc
import importlib.util
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from torch import nn

import qcore
from helpers.fixtures import installed_or_registered

pytestmark = pytest.mark.gpu

qcore_torchao = pytest.importorskip(
    "qcore_torchao", reason="qcore-torchao is not installed (pip install ./plugins/torchao)"
)
torchao_quantization = pytest.importorskip("torchao.quantization")
TorchAoConfig = qcore_torchao.TorchAoConfig

DEVICE = "cuda"
HIDDEN, DEPTH = 4096, 8  # 419.6M parameters, 800 MiB in bf16
# The diffusers interop model: 2 double and 4 single blocks of Flux-dev's width.
FLUX_CONFIG: dict[str, Any] = dict(
    patch_size=1,
    in_channels=64,
    out_channels=None,
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=24 * 128,
    pooled_projection_dim=768,
    guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
)


class Block(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.q = nn.Linear(hidden, hidden)
        self.up = nn.Linear(hidden, hidden)
        self.down = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.down(torch.nn.functional.gelu(self.up(h)) * torch.sigmoid(self.q(h)))


class MidModel(qcore.ModelMixin):
    _no_split_modules = ["Block"]

    def __init__(self, hidden: int = HIDDEN, depth: int = DEPTH) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(hidden) for _ in range(depth))
        self.proj_out = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.proj_out(x)


class Reference(NamedTuple):
    path: Path  # the bf16 checkpoint
    x: torch.Tensor  # an input on DEVICE
    output: torch.Tensor  # the bf16 model's output for it


def _int4_plain_mslk() -> TorchAoConfig:
    return TorchAoConfig(
        torchao_quantization.Int4WeightOnlyConfig(group_size=128, int4_packing_format="plain")
    )


# name: (config factory, bound on the relative error against bf16). Measured on an H100: int8wo 0.0072,
# int8dq 0.0129, float8wo 0.0286, float8dq 0.0406, int4wo 0.0711, uint4wo 0.0727.
QUANT_TYPES: dict[str, tuple[Callable[[], TorchAoConfig], float]] = {
    "int8wo": (lambda: TorchAoConfig("int8wo"), 0.02),
    "int8dq": (lambda: TorchAoConfig("int8dq"), 0.04),
    "float8wo": (lambda: TorchAoConfig("float8wo"), 0.06),
    "float8dq_e4m3_tensor": (lambda: TorchAoConfig("float8dq_e4m3_tensor"), 0.08),
    "float8dq_e4m3_row": (lambda: TorchAoConfig("float8dq_e4m3_row"), 0.08),
    "int4wo_tile_packed": (lambda: TorchAoConfig("int4wo", group_size=128), 0.15),
    "uint4wo": (lambda: TorchAoConfig("uint4wo"), 0.15),
    "int4wo_plain_mslk": (_int4_plain_mslk, 0.15),
}
NEEDS_MSLK = {"int4wo_plain_mslk"}
NEEDS_SM89 = {"float8dq_e4m3_tensor", "float8dq_e4m3_row", "float8dq_row"}


def skip_unless_supported(name: str) -> None:
    if name in NEEDS_MSLK and importlib.util.find_spec("mslk") is None:
        pytest.skip(f"{name} needs the mslk package")
    if name in NEEDS_SM89 and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip(f"{name} needs CUDA compute capability >= 8.9")


@pytest.fixture(scope="module", autouse=True)
def torchao_backend() -> Iterator[None]:
    with installed_or_registered(qcore_torchao.backend):
        yield


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    path = tmp_path_factory.mktemp("torchao-cuda") / "bf16"
    torch.manual_seed(0)
    model = MidModel().to(torch.bfloat16)
    qcore.save_pretrained(model, path)
    x = torch.randn(8, HIDDEN, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16)
    with torch.no_grad():
        output = model.to(DEVICE)(x)
    del model
    free()
    return Reference(path, x, output)


def free() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def model_bytes(model: nn.Module) -> int:
    def size(t: torch.Tensor) -> int:
        if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(type(t), "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            return sum(size(getattr(t, n)) for n in names)
        return t.numel() * t.element_size()

    return sum(size(t) for t in [*model.parameters(), *model.buffers()])


def measured_load(
    load: Callable[[], nn.Module], record: Callable[[str, object], None], label: str
) -> nn.Module:
    """Runs one load and records its time and GPU memory (peak during the load, final) in MiB."""
    free()
    cuda = DEVICE == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    start = time.perf_counter()
    model = load()
    if cuda:
        torch.cuda.synchronize()
    record(f"{label}_load_s", round(time.perf_counter() - start, 3))
    if cuda:
        record(f"{label}_peak_load_mib", round((torch.cuda.max_memory_allocated() - base) / 2**20, 1))
        record(f"{label}_final_mib", round((torch.cuda.memory_allocated() - base) / 2**20, 1))
    record(f"{label}_model_mib", round(model_bytes(model) / 2**20, 1))
    return model


def test_bf16_load(reference: Reference, record_property: Callable[[str, object], None]) -> None:
    model = measured_load(
        lambda: MidModel.from_pretrained(reference.path, device_map=DEVICE), record_property, "bf16"
    )
    with torch.no_grad():
        assert torch.equal(model(reference.x), reference.output)


@pytest.mark.parametrize("name", QUANT_TYPES)
def test_quantize_on_load_round_trips(
    name: str, reference: Reference, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    skip_unless_supported(name)
    make, bound = QUANT_TYPES[name]
    model = measured_load(
        lambda: MidModel.from_pretrained(
            reference.path, quantization_config=make(), torch_dtype=torch.bfloat16, device_map=DEVICE
        ),
        record_property,
        "quantize",
    )
    weight = model.blocks[0].q.weight
    assert weight.device.type == DEVICE
    record_property("tensor", type(weight).__name__)
    with torch.no_grad():
        out = model(reference.x)
    error = rel_err(out, reference.output)
    record_property("rel_err", round(error, 5))
    assert 0 < error < bound, f"{name}: relative error {error:.5f}, bound {bound}"

    qcore.save_pretrained(model, tmp_path / "q")
    del model
    reloaded = measured_load(
        lambda: MidModel.from_pretrained(tmp_path / "q", device_map=DEVICE), record_property, "reload"
    )
    assert type(reloaded.blocks[0].q.weight) is type(weight)
    with torch.no_grad():
        assert torch.equal(reloaded(reference.x), out), f"{name}: the reloaded model's output differs"

    # Dequantizing either works (close to the quantized output) or is refused with the typed error.
    try:
        qcore.dequantize(reloaded)
    except qcore.DequantizeError as exc:
        assert name in ("int4wo_tile_packed", "int4wo_plain_mslk"), f"{name}: {exc}"
        record_property("dequantize", f"refused: {str(exc)[:160]}")
    else:
        assert isinstance(reloaded.blocks[0].q.weight, nn.Parameter)
        assert type(reloaded.blocks[0].q.weight.data) is torch.Tensor
        with torch.no_grad():
            deq_error = rel_err(reloaded(reference.x), out)
        record_property("dequantize_rel_err_vs_quantized", round(deq_error, 5))
        assert deq_error < bound, f"{name}: dequantized output differs by {deq_error:.5f}"
    del reloaded
    free()


def test_float8_dynamic_on_cpu_is_refused_on_a_cuda_machine(reference: Reference) -> None:
    with pytest.raises(qcore.ConfigError, match="8.9"):
        MidModel.from_pretrained(
            reference.path, quantization_config=TorchAoConfig("float8dq"), device_map="cpu"
        )


def _float8dq_row() -> Any:
    from torchao.quantization.granularity import PerRow

    return torchao_quantization.Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


DIFFUSERS_TYPES: dict[str, Callable[[], Any]] = {
    "int8wo": lambda: torchao_quantization.Int8WeightOnlyConfig(),
    "float8dq_row": _float8dq_row,
}


def flux_inputs() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    tokens, text, dtype = 256, 64, torch.bfloat16
    return dict(
        hidden_states=torch.randn(1, tokens, FLUX_CONFIG["in_channels"], generator=g).to(DEVICE, dtype),
        encoder_hidden_states=torch.randn(1, text, FLUX_CONFIG["joint_attention_dim"], generator=g).to(
            DEVICE, dtype
        ),
        pooled_projections=torch.randn(1, FLUX_CONFIG["pooled_projection_dim"], generator=g).to(
            DEVICE, dtype
        ),
        timestep=torch.tensor([0.5], device=DEVICE, dtype=dtype),
        img_ids=torch.zeros(tokens, 3, device=DEVICE),
        txt_ids=torch.zeros(text, 3, device=DEVICE),
        return_dict=False,
    )


@pytest.fixture(scope="module")
def flux_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    diffusers = pytest.importorskip("diffusers")
    path = tmp_path_factory.mktemp("torchao-cuda-flux") / "bf16"
    torch.manual_seed(0)
    diffusers.FluxTransformer2DModel(**FLUX_CONFIG).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.mark.parametrize("name", DIFFUSERS_TYPES)
def test_diffusers_interop(
    name: str, flux_checkpoint: Path, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    """Both quantize on load to equal outputs; each reads the other's checkpoint to the same output."""
    skip_unless_supported(name)
    import diffusers

    flux = diffusers.FluxTransformer2DModel
    make_ao = DIFFUSERS_TYPES[name]
    inputs = flux_inputs()

    theirs = measured_load(
        lambda: flux.from_pretrained(
            flux_checkpoint,
            quantization_config=diffusers.TorchAoConfig(make_ao()),
            torch_dtype=torch.bfloat16,
            device_map=DEVICE,
        ),
        record_property,
        "diffusers",
    )
    with torch.no_grad():
        theirs_out = theirs(**inputs)[0]
    theirs.save_pretrained(tmp_path / "diffusers", max_shard_size="200MB")
    del theirs

    ours = measured_load(
        lambda: qcore.from_pretrained(
            flux,
            flux_checkpoint,
            quantization_config=TorchAoConfig(make_ao()),
            torch_dtype=torch.bfloat16,
            device_map=DEVICE,
        ),
        record_property,
        "qcore",
    )
    with torch.no_grad():
        ours_out = ours(**inputs)[0]
    qcore.save_pretrained(ours, tmp_path / "qcore", max_shard_size="200MB")
    del ours
    assert torch.equal(ours_out, theirs_out), "quantize-on-load outputs differ"

    read_by_qcore = qcore.from_pretrained(
        flux, tmp_path / "diffusers", torch_dtype=torch.bfloat16, device_map=DEVICE
    )
    with torch.no_grad():
        assert torch.equal(read_by_qcore(**inputs)[0], theirs_out), (
            "diffusers' checkpoint read by qcore differs"
        )
    del read_by_qcore
    free()
    read_by_diffusers = flux.from_pretrained(
        tmp_path / "qcore", torch_dtype=torch.bfloat16, device_map=DEVICE
    )
    with torch.no_grad():
        assert torch.equal(read_by_diffusers(**inputs)[0], ours_out), (
            "qcore's checkpoint read by diffusers differs"
        )
    del read_by_diffusers
    free()
