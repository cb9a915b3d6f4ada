"""What a save leaves in a directory that already has content: other variants, other formats, a user's
files, subfolders, siblings; compared with what diffusers 0.42.1's own save_pretrained leaves.

qcore removes what diffusers removes (this variant's old shards, in either format), and also this
variant's stale index and same-format single file, which diffusers leaves behind to mislead loaders. It
keeps the shards of other variants, which diffusers deletes when the default variant is saved sharded.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from saving_support import leftovers, snapshot

import qcore
from helpers.models import TinyTransformer, make_tiny, tiny_flux_config
from qcore import _atomic
from qcore._saving import superseded_weight_files

diffusers = pytest.importorskip("diffusers")

W = "diffusion_pytorch_model"
SHARD = "120KB"  # the tiny Flux (277 KB in float32) in 3 shards


def _shards(variant: str | None, ext: str = "safetensors", n: int = 3) -> set[str]:
    stem = W if variant is None else f"{W}.{variant}"
    return {f"{stem}-{i:05d}-of-{n:05d}.{ext}" for i in range(1, n + 1)}


def _index(variant: str | None, ext: str = "safetensors") -> str:
    return f"{W}.{ext}.index.json" if variant is None else f"{W}.{ext}.index.{variant}.json"


def _single(variant: str | None, ext: str = "safetensors") -> str:
    return f"{W}.{ext}" if variant is None else f"{W}.{variant}.{ext}"


DEFAULT: dict[str, Any] = {}
FP16 = {"variant": "fp16"}
SHARDED = {"max_shard_size": SHARD}
FP16_SHARDED = {"variant": "fp16", "max_shard_size": SHARD}
BIN = {"safe_serialization": False}
BIN_SHARDED = {"safe_serialization": False, "max_shard_size": SHARD}

# first save, second save, files qcore keeps that diffusers deletes, files diffusers keeps that qcore drops
SEQUENCES = {
    "default then fp16": (DEFAULT, FP16, set(), set()),
    "fp16 then default": (FP16, DEFAULT, set(), set()),
    "sharded then fp16": (SHARDED, FP16, set(), set()),
    "fp16 sharded then default sharded": (FP16_SHARDED, SHARDED, _shards("fp16"), set()),
    "sharded then unsharded": (SHARDED, DEFAULT, set(), {_index(None)}),
    "unsharded then sharded": (DEFAULT, SHARDED, set(), {_single(None)}),
    "bin then safetensors": (BIN, DEFAULT, set(), set()),
    "sharded bin then safetensors": (BIN_SHARDED, DEFAULT, set(), {_index(None, "bin")}),
    "safetensors then bin": (DEFAULT, BIN, set(), set()),
}


@pytest.fixture(scope="module")
def flux() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(**tiny_flux_config())


def _files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


@pytest.mark.parametrize("sequence", list(SEQUENCES))
def test_second_save_keeps_what_diffusers_keeps(sequence: str, flux: torch.nn.Module, tmp_path: Path) -> None:
    first, second, qcore_only, diffusers_only = SEQUENCES[sequence]
    ours, theirs = tmp_path / "qcore", tmp_path / "diffusers"
    for options in (first, second):
        qcore.save_pretrained(flux, ours, **options)
        flux.save_pretrained(theirs, **options)
    assert _files(ours) == (_files(theirs) | qcore_only) - diffusers_only
    assert leftovers(tmp_path) == []
    # Every variant and format left in qcore's directory is complete: it loads and equals the model.
    expected = flux.state_dict()
    for options in (first, second):
        variant = options.get("variant")
        ext = "safetensors" if options.get("safe_serialization", True) else "bin"
        if not {_single(variant, ext), _index(variant, ext)} & _files(ours):
            continue  # the second save superseded the first
        loaded = qcore.from_pretrained(
            diffusers.FluxTransformer2DModel,
            ours,
            variant=variant,
            use_safetensors=options.get("safe_serialization", True),
        )
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())


# name, saved weights file, variant, whether that save supersedes the file
SUPERSEDED = [
    (_single(None), "diffusion_pytorch_model.safetensors", None, True),
    (_single("fp16"), "diffusion_pytorch_model.safetensors", None, False),
    (_single(None), "diffusion_pytorch_model.safetensors", "fp16", False),
    (_single("fp16"), "diffusion_pytorch_model.safetensors", "fp16", True),
    (sorted(_shards(None))[0], "diffusion_pytorch_model.safetensors", None, True),
    (sorted(_shards("fp16"))[0], "diffusion_pytorch_model.safetensors", None, False),
    (sorted(_shards(None, "bin"))[0], "diffusion_pytorch_model.safetensors", None, True),
    (_index(None), "diffusion_pytorch_model.safetensors", None, True),
    (_index(None, "bin"), "diffusion_pytorch_model.safetensors", None, True),
    (_index("fp16"), "diffusion_pytorch_model.safetensors", None, False),
    (_index("fp16"), "diffusion_pytorch_model.safetensors", "fp16", True),
    (_single(None, "bin"), "diffusion_pytorch_model.safetensors", None, False),
    (_single(None), "diffusion_pytorch_model.bin", None, False),
    ("model.safetensors", "diffusion_pytorch_model.safetensors", None, False),
    ("model.safetensors", "model.safetensors", None, True),
    ("model-00001-of-00002.safetensors", "model.safetensors", None, True),
    ("diffusion_pytorch_model.safetensors", "model.safetensors", None, False),
    ("README.md", "diffusion_pytorch_model.safetensors", None, False),
    ("config.json", "diffusion_pytorch_model.safetensors", None, False),
    (f"transformer/{_single(None)}", "diffusion_pytorch_model.safetensors", None, False),
    (f"{W}-1-of-2.safetensors", "diffusion_pytorch_model.safetensors", None, False),
    (f"{W}.fp16x.safetensors", "diffusion_pytorch_model.safetensors", "fp16", False),
]


@pytest.mark.parametrize(("name", "weights_name", "variant", "stale"), SUPERSEDED)
def test_which_files_a_save_supersedes(
    name: str, weights_name: str, variant: str | None, stale: bool
) -> None:
    assert superseded_weight_files(weights_name, variant)(name) is stale


def _user_files(directory: Path) -> None:
    (directory / "README.md").write_text("model card\n")
    (directory / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (directory / "samples").mkdir()
    (directory / "samples" / "grid.txt").write_text("a cat\n")
    (directory / "latest").symlink_to("README.md")
    (directory / "other_model.safetensors").write_bytes(b"not ours")


def test_unrelated_files_are_kept_as_they_were(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    qcore.save_pretrained(make_tiny(), target, max_shard_size="8KB")
    _user_files(target)
    target.chmod(0o750)
    before = {k: v for k, v in (snapshot(target) or {}).items() if not k.startswith((W, "config"))}
    readme_inode = (target / "README.md").stat().st_ino
    qcore.save_pretrained(make_tiny(seed=1), target)
    after = snapshot(target) or {}
    assert {k: v for k, v in after.items() if not k.startswith((W, "config"))} == before
    assert set(after) - set(before) == {"config.json", _single(None)}
    assert (target / "README.md").stat().st_ino == readme_inode  # carried over as a link, not copied
    assert (target / "latest").is_symlink() and target.stat().st_mode & 0o777 == 0o750
    assert leftovers(tmp_path) == []


def test_siblings_of_a_component_are_untouched(tmp_path: Path) -> None:
    pipeline = tmp_path / "pipe"
    (pipeline / "vae").mkdir(parents=True)
    (pipeline / "model_index.json").write_text("{}")
    qcore.save_pretrained(make_tiny(), pipeline / "vae")
    before = snapshot(pipeline)
    qcore.save_pretrained(make_tiny(), pipeline / "transformer")
    qcore.save_pretrained(make_tiny(seed=2), pipeline / "transformer")
    after = snapshot(pipeline) or {}
    assert {k: v for k, v in after.items() if not k.startswith("transformer/")} == before
    assert leftovers(pipeline) == []


def test_atomic_directory_merges_subfolders(tmp_path: Path) -> None:
    """The primitive a whole-pipeline save uses: components are saved into the staging directory."""
    target = tmp_path / "pipe"
    qcore.save_pretrained(make_tiny(), target / "transformer", variant="fp16")
    qcore.save_pretrained(make_tiny(), target / "transformer")
    (target / "transformer" / "README.md").write_text("notes\n")
    (target / "model_index.json").write_text('{"old": true}')
    (target / "old_component").mkdir()
    (target / "old_component" / "x").write_text("x")

    def stale(relative: str) -> bool:
        return relative == "old_component" or relative.startswith("old_component/")

    with _atomic.atomic_directory(target, superseded=stale) as staging:
        assert (
            staging.parent == tmp_path
            and staging.name.startswith(".pipe.")
            and os.listdir(staging) == [_atomic.OWNER_FILE]
        )
        (staging / "model_index.json").write_text('{"new": true}')
        qcore.save_pretrained(make_tiny(seed=3), staging / "transformer")
        assert (target / "model_index.json").read_text() == '{"old": true}'  # nothing visible yet
    assert (target / "model_index.json").read_text() == '{"new": true}'
    assert not (target / "old_component").exists()
    assert (target / "transformer" / "README.md").read_text() == "notes\n"
    x = torch.randn(2, 64).to(torch.bfloat16)
    assert torch.equal(TinyTransformer.from_pretrained(target / "transformer")(x), make_tiny(seed=3)(x))
    assert torch.equal(
        TinyTransformer.from_pretrained(target / "transformer", variant="fp16")(x), make_tiny()(x)
    )
    assert leftovers(tmp_path) == [] and leftovers(target) == []


def test_a_failing_block_leaves_the_directory(tmp_path: Path) -> None:
    target = tmp_path / "pipe"
    target.mkdir()
    (target / "model_index.json").write_text("{}")
    before = snapshot(target)
    with pytest.raises(RuntimeError, match="component failed"), _atomic.atomic_directory(target) as staging:
        (staging / "model_index.json").write_text('{"half": true}')
        raise RuntimeError("component failed")
    assert snapshot(target) == before and leftovers(tmp_path) == []
    shutil.rmtree(target)
    with pytest.raises(RuntimeError), _atomic.atomic_directory(target):
        raise RuntimeError("component failed")
    assert not target.exists() and leftovers(tmp_path) == []


def test_saving_into_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "repo"
    qcore.save_pretrained(make_tiny(), target)
    (target / "sub").mkdir()
    monkeypatch.chdir(target / "sub")
    qcore.save_pretrained(make_tiny(seed=4), "..")
    # The old directory is gone; the process follows its working directory into the new one.
    assert Path(os.getcwd()) == target / "sub" and Path("../config.json").exists()
    x = torch.randn(2, 64).to(torch.bfloat16)
    assert torch.equal(TinyTransformer.from_pretrained(target)(x), make_tiny(seed=4)(x))
