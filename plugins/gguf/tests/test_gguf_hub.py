"""A .gguf file named on the hub (``<owner>/<repo>/<file>`` or a file URL) and ``config=`` given as a hub
id, served by a local stand-in for the hub: each load is the same as the local one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flux_files import TINY_FLUX, flux_inputs, write_bfl_flux_gguf

import qcore
from helpers.fakehub import fake_hub
from qcore_gguf import GGUFWeight

pytest.importorskip("diffusers")
from diffusers import FluxTransformer2DModel  # noqa: E402

REPO = "acme/flux-gguf"
FILE = "flux-Q8_0.gguf"


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.uint8)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hub repository's files: the GGUF file, a nested copy, and configs right and wrong for it."""
    root = tmp_path_factory.mktemp("hub-repo")
    write_bfl_flux_gguf(root / FILE, "Q8_0")
    (root / "quants").mkdir()
    (root / "quants" / FILE).write_bytes((root / FILE).read_bytes())
    (root / "config.json").write_text(json.dumps(TINY_FLUX))
    (root / "transformer").mkdir()
    (root / "transformer" / "config.json").write_text(json.dumps(TINY_FLUX))
    (root / "three-layers").mkdir()
    (root / "three-layers" / "config.json").write_text(json.dumps({**TINY_FLUX, "num_layers": 3}))
    return root


@pytest.fixture(scope="module")
def local(repo: Path) -> FluxTransformer2DModel:
    return qcore.from_pretrained(FluxTransformer2DModel, repo / FILE, torch_dtype=torch.bfloat16)


def assert_same_model(model: FluxTransformer2DModel, reference: FluxTransformer2DModel) -> None:
    # Only where each was read from differs.
    skip = ("_name_or_path",)
    assert {k: v for k, v in model.config.items() if k not in skip} == {
        k: v for k, v in reference.config.items() if k not in skip
    }
    ours, theirs = model.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert type(ours[key]) is type(value) and ours[key].dtype == value.dtype, key
        assert torch.equal(_bits(ours[key]), _bits(value)), key
    # Blocks kept as blocks, not a dequantized copy that happens to compare equal.
    assert isinstance(model.transformer_blocks[0].attn.to_q.weight, GGUFWeight)
    with torch.no_grad():
        assert torch.equal(_bits(model(**flux_inputs())[0]), _bits(reference(**flux_inputs())[0]))


@pytest.mark.parametrize(
    "name",
    [
        f"{REPO}/{FILE}",
        f"{REPO}/quants/{FILE}",
        f"https://huggingface.co/{REPO}/blob/main/{FILE}",
        f"https://huggingface.co/{REPO}/resolve/main/quants/{FILE}",
    ],
    ids=["shorthand", "shorthand-nested", "blob-url", "resolve-url-nested"],
)
def test_hub_file_loads_as_the_local_file(
    name: str,
    repo: Path,
    local: FluxTransformer2DModel,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with fake_hub(repo, REPO, tmp_path / "cache", monkeypatch) as hub:
        model = qcore.from_pretrained(FluxTransformer2DModel, name, torch_dtype=torch.bfloat16)
    assert hub.full_downloads == [FILE]  # the file alone: no config.json is looked for beside it
    assert_same_model(model, local)
    # Taken from the cache once downloaded, with the hub unreachable.
    cached = qcore.from_pretrained(
        FluxTransformer2DModel, name, torch_dtype=torch.bfloat16, local_files_only=True
    )
    assert_same_model(cached, local)


def test_hub_file_not_on_the_hub_is_not_found(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with fake_hub(repo, REPO, tmp_path / "cache", monkeypatch):
        for name in (f"{REPO}/flux-Q2_K.gguf", f"https://huggingface.co/{REPO}/blob/main/flux-Q2_K.gguf"):
            with pytest.raises(qcore.CheckpointNotFoundError, match="flux-Q2_K.gguf") as info:
                qcore.from_pretrained(FluxTransformer2DModel, name)
            assert REPO in str(info.value)


@pytest.mark.parametrize("subfolder", [None, "transformer"])
def test_config_as_a_hub_id_is_the_config_as_a_dict(
    subfolder: str | None,
    repo: Path,
    local: FluxTransformer2DModel,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from_dict = qcore.from_pretrained(
        FluxTransformer2DModel, repo / FILE, config=dict(TINY_FLUX), torch_dtype=torch.bfloat16
    )
    assert_same_model(from_dict, local)
    with fake_hub(repo, REPO, tmp_path / "cache", monkeypatch) as hub:
        from_hub = qcore.from_pretrained(
            FluxTransformer2DModel, repo / FILE, config=REPO, subfolder=subfolder, torch_dtype=torch.bfloat16
        )
    assert hub.full_downloads == ["config.json"]
    assert_same_model(from_hub, from_dict)


def test_config_hub_id_is_read_not_ignored(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A config that disagrees with the file fails as that dict does: the hub's config.json is the one used.
    with pytest.raises(qcore.QcoreError, match="transformer_blocks.2"):
        qcore.from_pretrained(
            FluxTransformer2DModel,
            repo / FILE,
            config={**TINY_FLUX, "num_layers": 3},
            torch_dtype=torch.bfloat16,
        )
    with fake_hub(repo, REPO, tmp_path / "cache", monkeypatch):
        with pytest.raises(qcore.QcoreError, match="transformer_blocks.2"):
            qcore.from_pretrained(
                FluxTransformer2DModel,
                repo / FILE,
                config=REPO,
                subfolder="three-layers",
                torch_dtype=torch.bfloat16,
            )
        with pytest.raises(qcore.CheckpointNotFoundError, match="in subfolder 'vae'") as info:
            qcore.from_pretrained(FluxTransformer2DModel, repo / FILE, config=REPO, subfolder="vae")
        assert REPO in str(info.value)
