"""Finding a checkpoint's files: hub options (force_download), transformers' ``pytorch_model.bin`` names,
single weight files (no config.json), and the size cap on JSON files that ``qcore inspect`` downloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import qcore
from helpers.fakehub import fake_hub
from helpers.models import TinyTransformer
from qcore import _checkpoint
from qcore.cli import main

WEIGHTS = "diffusion_pytorch_model.safetensors"


def test_force_download_downloads_the_files_again(
    tiny_ckpt: Path, tiny_input: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with fake_hub(tiny_ckpt, "acme/tiny", tmp_path / "cache", monkeypatch) as hub:
        first = qcore.from_pretrained(TinyTransformer, "acme/tiny")
        qcore.from_pretrained(TinyTransformer, "acme/tiny")
        assert hub.full_downloads.count(WEIGHTS) == 1  # the second load reads the cache
        again = qcore.from_pretrained(TinyTransformer, "acme/tiny", force_download=True)
        assert hub.full_downloads.count(WEIGHTS) == 2
        assert hub.full_downloads.count("config.json") == 2
    with torch.no_grad():
        assert torch.equal(again(tiny_input), first(tiny_input))


def _tiny_clip() -> torch.nn.Module:
    pytest.importorskip("transformers")
    from transformers import CLIPTextModel

    from helpers.pipelines import clip_config

    torch.manual_seed(0)
    return CLIPTextModel(clip_config()).eval()


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_transformers_pytorch_model_bin_checkpoints_are_found(sharded: bool, tmp_path: Path) -> None:
    from transformers import CLIPTextModel

    model = _tiny_clip()
    model.config.save_pretrained(tmp_path)
    state = model.state_dict()
    if sharded:
        keys = list(state)
        halves = {
            "pytorch_model-00001-of-00002.bin": keys[::2],
            "pytorch_model-00002-of-00002.bin": keys[1::2],
        }
        weight_map = {}
        for name, names in halves.items():
            torch.save({key: state[key] for key in names}, tmp_path / name)
            weight_map.update(dict.fromkeys(names, name))
        index = {"metadata": {}, "weight_map": weight_map}
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    else:
        torch.save(state, tmp_path / "pytorch_model.bin")

    loaded = qcore.from_pretrained(CLIPTextModel, tmp_path)
    ids = torch.tensor([[0, 5, 7, 9, 1]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).last_hidden_state, model(ids).last_hidden_state)


def test_a_single_weight_file_has_no_config_path(
    tiny_ckpt: Path, tmp_path: Path, int8_backend: qcore.Backend, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = tiny_ckpt / WEIGHTS
    files = qcore.locate_checkpoint(weights)
    assert files.config_path is None and files.weight_files == [weights]
    model = qcore.from_pretrained(TinyTransformer, weights, config=tiny_ckpt)
    assert isinstance(model, TinyTransformer)
    # quantize needs a config: a single file is asked for one, not read as a config.json
    base = ["--method", "int8-test", "--model", "helpers.models:TinyTransformer"]
    assert main(["quantize", str(weights), str(tmp_path / "q"), *base]) == 1
    err = capsys.readouterr().err
    assert "config=" in err and "JSON" not in err


def test_inspect_caps_hub_json_files_as_it_caps_local_ones(
    tiny_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(_checkpoint, "MAX_JSON_BYTES", 16)
    assert main(["inspect", str(tiny_ckpt)]) == 1
    local = capsys.readouterr().err
    assert "more than any real JSON file (16 bytes)" in local and "config.json" in local
    with fake_hub(tiny_ckpt, "acme/tiny", tmp_path / "cache", monkeypatch) as hub:
        assert main(["inspect", "acme/tiny"]) == 1
    remote = capsys.readouterr().err
    assert "more than any real JSON file (16 bytes)" in remote and "config.json" in remote
    assert "config.json" not in hub.full_downloads  # refused before the download
