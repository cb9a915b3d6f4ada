"""What goes wrong with GGUF files and how qcore says so: missing backend, damaged files, wrong use."""

from __future__ import annotations

import json
import struct
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from flux_files import write_bfl_flux_gguf

import qcore
from helpers.envs import clean_environ, report_without_site_packages, site_without
from helpers.fakehub import fake_hub
from qcore_gguf import GGUFConfig, GGUFFormat
from qcore_gguf.testing import write_gguf

pytest.importorskip("diffusers")
from diffusers import FluxTransformer2DModel  # noqa: E402


@pytest.fixture(scope="module")
def flux_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bfl_flux_gguf(tmp_path_factory.mktemp("gguf") / "flux-Q8_0.gguf", "Q8_0")


@pytest.mark.parametrize(
    "setting", [{"QCORE_PLUGINS": "bitsandbytes"}, {"QCORE_DISABLE_PLUGIN_AUTOLOAD": "1"}]
)
def test_missing_backend_is_an_install_hint_never_a_plain_load(
    flux_file: Path, setting: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in setting.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(qcore.BackendNotFoundError) as info:
        qcore.from_pretrained(FluxTransformer2DModel, flux_file, torch_dtype=torch.bfloat16)
    assert info.value.quant_method == "gguf"
    assert "pip install qcore-gguf" in str(info.value) or "QCORE_PLUGINS" in str(info.value)
    assert flux_file.name in str(info.value)


WITHOUT_QCORE_GGUF = """
import importlib.metadata, importlib.util, json, site, sys
site.addsitedir(SITE)

import qcore
from diffusers import FluxTransformer2DModel


def absent():
    try:
        importlib.metadata.distribution("qcore-gguf")
    except importlib.metadata.PackageNotFoundError:
        return importlib.util.find_spec("qcore_gguf") is None
    return False


def attempt(name):
    try:
        qcore.from_pretrained(FluxTransformer2DModel, name)
    except qcore.QcoreError as exc:
        method = getattr(exc, "quant_method", None)
        return {"type": type(exc).__name__, "quant_method": method, "message": str(exc)}
    return {"type": None}


print(json.dumps({
    "absent": absent(),
    "formats": [ep.name for ep in importlib.metadata.entry_points(group="qcore.formats")],
    "backends": sorted(ep.name for ep in importlib.metadata.entry_points(group="qcore.backends")),
    "local": attempt(LOCAL),
    "hub": attempt(HUB),
}))
"""


@pytest.fixture(scope="module")
def without_qcore_gguf(flux_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """What a Python without qcore-gguf reports when it loads ``flux_file``, locally and from the hub."""
    root = tmp_path_factory.mktemp("without-qcore-gguf")
    site = site_without(root, ["qcore_gguf"])
    hub_name = f"acme/flux/{flux_file.name}"
    preamble = f"SITE, LOCAL, HUB = {str(site)!r}, {str(flux_file)!r}, {hub_name!r}\n"
    with pytest.MonkeyPatch.context() as monkeypatch:
        with fake_hub(flux_file.parent, "acme/flux", root / "cache", monkeypatch) as hub:
            env = clean_environ(HF_ENDPOINT=hub.endpoint, HF_HUB_CACHE=str(root / "cache"))
            env.pop("HF_HUB_OFFLINE", None)
            report = report_without_site_packages(preamble + textwrap.dedent(WITHOUT_QCORE_GGUF), root, env)
    report["downloads"] = hub.full_downloads
    return report


@pytest.mark.slow
def test_gguf_file_without_qcore_gguf_installed_is_an_install_hint(
    flux_file: Path, without_qcore_gguf: dict
) -> None:
    report = without_qcore_gguf
    assert report["absent"] and report["formats"] == [] and "gguf" not in report["backends"]
    assert report["backends"]  # the other backends are there: only qcore-gguf is missing
    assert report["downloads"] == [flux_file.name]  # the hub file was fetched, then refused
    for where in ("local", "hub"):
        refused = report[where]
        assert refused["type"] == "BackendNotFoundError", (where, refused)
        assert refused["quant_method"] == "gguf"
        assert "pip install qcore-gguf" in refused["message"], refused["message"]
        assert flux_file.name in refused["message"], refused["message"]


@pytest.mark.slow
def test_gguf_install_hint_names_the_installed_backends(without_qcore_gguf: dict) -> None:
    report = without_qcore_gguf
    assert "bitsandbytes" in report["backends"]
    message = report["local"]["message"]
    assert "No backend is installed" not in message, message
    assert "bitsandbytes" in message, message


def test_gguf_cannot_quantize_on_load(tmp_path: Path) -> None:
    from qcore.testing import ConformanceModel

    model = ConformanceModel()
    qcore.save_pretrained(model, tmp_path / "plain")
    with pytest.raises(qcore.ConfigError, match="cannot quantize on load") as info:
        qcore.from_pretrained(ConformanceModel, tmp_path / "plain", quantization_config=GGUFConfig())
    assert "gguf" in str(info.value)


def _tensor_type_offset(data: bytes, name: str) -> int:
    """Byte offset of the GGML type id in the tensor-info entry of ``name``."""
    encoded = name.encode()
    at = data.index(struct.pack("<Q", len(encoded)) + encoded) + 8 + len(encoded)
    (n_dims,) = struct.unpack_from("<I", data, at)
    return at + 4 + 8 * n_dims


@pytest.mark.parametrize(("type_id", "message"), [(99, "not a readable GGUF file"), (16, "does not read")])
def test_bad_type_id_is_a_corrupt_checkpoint(tmp_path: Path, type_id: int, message: str) -> None:
    path = tmp_path / "bad-type.gguf"
    write_gguf(path, {"a.weight": (np.ones((4, 256), np.float32), "Q8_0")})
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, _tensor_type_offset(bytes(data), "a.weight"), type_id)
    path.write_bytes(bytes(data))
    with pytest.raises(qcore.CorruptCheckpointError, match=message) as info:
        GGUFFormat(path)
    assert str(path) in str(info.value)


def test_truncated_file_is_a_corrupt_checkpoint(flux_file: Path, tmp_path: Path) -> None:
    data = flux_file.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(qcore.CorruptCheckpointError, match="cut.gguf"):
        qcore.from_pretrained(FluxTransformer2DModel, cut, torch_dtype=torch.bfloat16)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not gguf at all")
    with pytest.raises(qcore.CorruptCheckpointError, match="fake.gguf"):
        qcore.from_pretrained(FluxTransformer2DModel, fake)


def test_unknown_suffix_names_the_entry_point_group(tmp_path: Path) -> None:
    odd = tmp_path / "weights.xyzw"
    odd.write_bytes(b"\0" * 16)
    with pytest.raises(qcore.CheckpointError, match="qcore.formats"):
        qcore.from_pretrained(FluxTransformer2DModel, odd)


def test_file_for_another_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.gguf"
    write_gguf(path, {"encoder.layer.0.weight": (np.ones((32, 64), np.float32), "Q8_0")})
    with pytest.raises(qcore.QcoreError):
        qcore.from_pretrained(FluxTransformer2DModel, path, config={"num_layers": 1, "num_single_layers": 1})


def _saved(tmp_path: Path, flux_file: Path) -> tuple[Path, Path]:
    from safetensors.torch import load_file

    model = qcore.from_pretrained(FluxTransformer2DModel, flux_file, torch_dtype=torch.bfloat16)
    qcore.save_pretrained(model, tmp_path / "saved")
    (weights,) = (tmp_path / "saved").glob("*.safetensors")
    assert load_file(weights)  # readable as saved
    return tmp_path / "saved", weights


def _rewrite(weights: Path, edit_tensors: object = None, edit_metadata: object = None) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(weights), framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_tensors:
        edit_tensors(tensors)  # type: ignore[operator]
    if edit_metadata:
        edit_metadata(metadata)  # type: ignore[operator]
    save_file(tensors, str(weights), metadata=metadata)


KEY = "transformer_blocks.0.attn.to_q.weight"


def test_saved_layout_with_partial_blocks_names_the_key(flux_file: Path, tmp_path: Path) -> None:
    path, weights = _saved(tmp_path, flux_file)
    _rewrite(weights, lambda t: t.__setitem__(KEY, t[KEY][:, :-5].clone()))
    with pytest.raises(qcore.CorruptCheckpointError, match="whole number of Q8_0 blocks") as info:
        qcore.from_pretrained(FluxTransformer2DModel, path)
    assert KEY in str(info.value)


def test_saved_layout_with_unknown_type_is_refused(flux_file: Path, tmp_path: Path) -> None:
    path, weights = _saved(tmp_path, flux_file)

    def retype(metadata: dict[str, str]) -> None:
        types = json.loads(metadata["qcore_gguf.types"])
        types[KEY] = "Q9_9"
        metadata["qcore_gguf.types"] = json.dumps(types)

    _rewrite(weights, edit_metadata=retype)
    with pytest.raises(qcore.CorruptCheckpointError, match="Q9_9"):
        qcore.from_pretrained(FluxTransformer2DModel, path)


def test_saved_layout_with_float_blocks_is_refused(flux_file: Path, tmp_path: Path) -> None:
    path, weights = _saved(tmp_path, flux_file)
    _rewrite(weights, lambda t: t.__setitem__(KEY, t[KEY].float()))
    with pytest.raises(qcore.CorruptCheckpointError, match="uint8 blocks") as info:
        qcore.from_pretrained(FluxTransformer2DModel, path)
    assert KEY in str(info.value)


def test_orig_shape_gives_the_logical_shape_of_flattened_tensors(tmp_path: Path) -> None:
    """city96 stores some tensors flattened, with comfy.gguf.orig_shape.<name> holding the real shape."""
    rng = np.random.default_rng(0)
    conv = rng.standard_normal((8, 4, 2, 32)).astype(np.float32)
    norm = rng.standard_normal((4, 16)).astype(np.float32)
    path = tmp_path / "flattened.gguf"
    write_gguf(
        path,
        {"conv.weight": (conv.reshape(64, 32), "Q8_0"), "norm.weight": (norm.reshape(64), "F32")},
        metadata={
            "comfy.gguf.orig_shape.conv.weight": [8, 4, 2, 32],
            "comfy.gguf.orig_shape.norm.weight": [4, 16],
        },
    )
    with GGUFFormat(path) as fmt:
        assert fmt.tensors()["conv.weight"].shape == (8, 4, 2, 32)
        assert fmt.tensors()["norm.weight"].shape == (4, 16)
        assert torch.equal(fmt.read("norm.weight"), torch.from_numpy(norm))
        conv_blocks = fmt.read("conv.weight")
        assert conv_blocks.logical_shape == (8, 4, 2, 32)
        decoded = conv_blocks.dequantize(torch.float32)
        assert float((decoded - torch.from_numpy(conv)).abs().max()) < 0.05
        assert fmt.read("conv.weight", (2, 4)).logical_shape == (2, 4, 2, 32)

    bad = tmp_path / "bad-shape.gguf"
    write_gguf(
        bad,
        {"conv.weight": (conv.reshape(64, 32), "Q8_0")},
        metadata={"comfy.gguf.orig_shape.conv.weight": [8, 4, 4, 16]},
    )
    with pytest.raises(qcore.CorruptCheckpointError, match="not whole Q8_0 blocks"):
        GGUFFormat(bad)
