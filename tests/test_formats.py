"""Core extension points for checkpoint formats and key converters (qcore.formats / qcore.converters)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qcore
from qcore.testing import ConformanceModel


class RenamedConverter(qcore.KeyConverter):
    """The conformance model with proj_in stored as "input" and proj_out's rows stored reversed in halves."""

    model_class = "ConformanceModel"

    def matches(self, tensors: dict[str, qcore.TensorInfo]) -> bool:
        return "input.weight" in tensors

    def convert(self, tensors: dict[str, qcore.TensorInfo]) -> dict[str, list[qcore.RowRange]]:
        out = {}
        for key, info in tensors.items():
            if key.startswith("input."):
                out["proj_in." + key.removeprefix("input.")] = [qcore.RowRange(key)]
            elif key.startswith("proj_out."):
                half = info.shape[0] // 2
                out[key] = [qcore.RowRange(key, half), qcore.RowRange(key, 0, half)]
            else:
                out[key] = [qcore.RowRange(key)]
        return out

    def infer_config(self, tensors: dict[str, qcore.TensorInfo]) -> dict[str, int]:
        return {"hidden": tensors["input.weight"].shape[0], "depth": 2}


@pytest.fixture
def converter() -> RenamedConverter:
    converter = qcore.register_converter(RenamedConverter())
    yield converter
    qcore.unregister_converter(converter)


def _renamed_file(path: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = ConformanceModel().state_dict()
    stored = {
        ("input." + k.removeprefix("proj_in.")) if k.startswith("proj_in.") else k: v
        for k, v in state.items()
    }
    for key in ("proj_out.weight", "proj_out.bias"):
        half = stored[key].shape[0] // 2
        stored[key] = torch.cat([stored[key][half:], stored[key][:half]]).contiguous()
    save_file(stored, str(path))
    return state


def test_single_safetensors_file_through_a_converter(tmp_path: Path, converter: RenamedConverter) -> None:
    state = _renamed_file(tmp_path / "renamed.safetensors")
    model = qcore.from_pretrained(ConformanceModel, tmp_path / "renamed.safetensors")
    assert model.config["hidden"] == 256
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_converter_mapping_errors_name_the_tensors(tmp_path: Path, converter: RenamedConverter) -> None:
    _renamed_file(tmp_path / "renamed.safetensors")
    original = converter.convert

    def bad_rows(tensors: dict[str, qcore.TensorInfo]) -> dict[str, list[qcore.RowRange]]:
        mapping = original(tensors)
        mapping["proj_out.bias"] = [qcore.RowRange("proj_out.bias", 0, 10_000)]
        return mapping

    converter.convert = bad_rows  # type: ignore[method-assign]
    with pytest.raises(qcore.CheckpointError, match="rows 0:10000 of 'proj_out.bias'"):
        qcore.from_pretrained(ConformanceModel, tmp_path / "renamed.safetensors")

    def unused(tensors: dict[str, qcore.TensorInfo]) -> dict[str, list[qcore.RowRange]]:
        mapping = original(tensors)
        del mapping["norm_out.bias"]
        return mapping

    converter.convert = unused  # type: ignore[method-assign]
    with pytest.raises(qcore.CheckpointError, match="norm_out.bias"):
        qcore.from_pretrained(ConformanceModel, tmp_path / "renamed.safetensors")


def test_single_file_without_config_asks_for_one(tmp_path: Path) -> None:
    save_file(ConformanceModel().state_dict(), str(tmp_path / "plain.safetensors"))
    with pytest.raises(qcore.ConfigError, match="config=") as info:
        qcore.from_pretrained(ConformanceModel, tmp_path / "plain.safetensors")
    assert info.value.option == "config"
    model = qcore.from_pretrained(ConformanceModel, tmp_path / "plain.safetensors", config={"depth": 2})
    assert model.config["depth"] == 2


def test_single_bin_file_loads_like_its_directory(tmp_path: Path, converter: RenamedConverter) -> None:
    torch.manual_seed(0)
    reference = ConformanceModel()
    qcore.save_pretrained(reference, tmp_path / "directory")
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(qcore.ConfigError, match="config="):
        qcore.from_pretrained(ConformanceModel, tmp_path / "pytorch_model.bin")
    model = qcore.from_pretrained(
        ConformanceModel, tmp_path / "pytorch_model.bin", config=tmp_path / "directory"
    )
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key

    # A key converter applies as to a safetensors file: rows rearranged, config inferred from shapes.
    state = _renamed_file(tmp_path / "renamed.safetensors")
    torch.save(load_file(tmp_path / "renamed.safetensors"), tmp_path / "renamed.bin")
    model = qcore.from_pretrained(ConformanceModel, tmp_path / "renamed.bin")
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key

    (tmp_path / "garbage.bin").write_bytes(b"not a torch.save file")
    with pytest.raises(qcore.CorruptCheckpointError, match="weights_only=True"):
        qcore.from_pretrained(ConformanceModel, tmp_path / "garbage.bin", config={})


def test_locate_checkpoint_takes_a_single_file(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(2)}, str(tmp_path / "one.safetensors"))
    files = qcore.locate_checkpoint(tmp_path / "one.safetensors")
    assert files.weight_files == [tmp_path / "one.safetensors"]


def test_hub_file_shorthand_offline_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(qcore.CheckpointNotFoundError, match="flux1-dev-Q4_K_S.gguf"):
        qcore.locate_checkpoint(
            "city96/FLUX.1-dev-gguf/flux1-dev-Q4_K_S.gguf", local_files_only=True, cache_dir=tmp_path
        )


def test_unknown_suffix_and_format_registration(tmp_path: Path) -> None:
    path = tmp_path / "weights.qfmt"
    path.write_bytes(b"QFMT")
    with pytest.raises(qcore.CheckpointError, match="'qcore.formats'"):
        qcore.from_pretrained(ConformanceModel, path)

    class QFormat(qcore.CheckpointFormat):
        suffixes = (".qfmt",)

        def tensors(self) -> dict[str, qcore.TensorInfo]:
            return {"proj_in.weight": qcore.TensorInfo((256, 128), torch.float32)}

    qcore.register_format(QFormat)
    try:
        with pytest.raises(ValueError, match="already read"):
            qcore.register_format(type("Other", (qcore.CheckpointFormat,), {"suffixes": (".qfmt",)}))
        with pytest.raises(ValueError, match="qcore itself"):
            qcore.register_format(type("Mine", (qcore.CheckpointFormat,), {"suffixes": (".safetensors",)}))
        with pytest.raises(qcore.CorruptCheckpointError, match="'proj_in.weight' cannot be read") as info:
            qcore.from_pretrained(ConformanceModel, path, config={})
        assert "weights.qfmt" in str(info.value)
    finally:
        qcore.unregister_format(QFormat)


def test_formats_are_not_imported_by_import_qcore() -> None:
    import subprocess
    import sys

    code = "import qcore, sys; print(sorted(m for m in ('gguf', 'qcore_gguf') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_tensors_a_format_reads_as_views_arrive_aligned(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = ConformanceModel().state_dict()
    path = tmp_path / "weights.vfmt"
    path.write_bytes(b"VFMT")

    class ViewFormat(qcore.CheckpointFormat):
        """Hands out views of one shared buffer that start 8 bytes past a 64-byte boundary."""

        suffixes = (".vfmt",)

        def __init__(self, path: Path) -> None:
            super().__init__(path)
            self.views: dict[str, torch.Tensor] = {}
            pool = torch.empty(sum(v.numel() * 4 + 128 for v in state.values()), dtype=torch.uint8)
            start = (-pool.data_ptr()) % 64 + 8
            for key, value in state.items():
                nbytes = value.numel() * 4
                view = pool[start : start + nbytes].view(torch.float32).view(value.shape)
                view.copy_(value)
                self.views[key] = view
                start += nbytes + (-(start + nbytes)) % 64 + 8

        def tensors(self) -> dict[str, qcore.TensorInfo]:
            return {k: qcore.TensorInfo(tuple(v.shape), torch.float32) for k, v in state.items()}

        def read(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
            return self.views[key] if rows is None else self.views[key][rows[0] : rows[1]]

    assert all(view.data_ptr() % 64 == 8 for view in ViewFormat(path).views.values())
    qcore.register_format(ViewFormat)
    try:
        model = qcore.from_pretrained(ConformanceModel, path, config={})
    finally:
        qcore.unregister_format(ViewFormat)
    for key, value in model.state_dict().items():
        assert value.data_ptr() % 64 == 0, key
        assert torch.equal(value, state[key]), key
