"""File-system failures while saving: a CheckpointWriteError naming the path, never a half-written or
deleted checkpoint, nothing left behind, and exit status 1 from ``qcore quantize``.

Faults that can be caused for real here are: a parent that is a file, a dangling or looping symbolic
link, permission denied (the save runs in a forked child that drops root), and a write that fails midway
(a forked child with a file-size limit: EFBIG). A full disk, a read-only file system and I/O errors cannot
be caused without mounting one, so those are injected at each step where the system would report them.
"""

from __future__ import annotations

import errno
import io
import os
import resource
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors
import safetensors.torch
import torch
from saving_support import fork_saver, leftovers, saved_models, snapshot, wait_child

import qcore
from helpers.models import TinyTransformer
from qcore import _atomic, _saving
from qcore.cli import main as qcore_main


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with saved_models(tmp_path_factory.mktemp("models")) as models:
        yield models


def _existing(target: Path, models: dict[str, Any]) -> dict[str, str]:
    qcore.save_pretrained(models["bf16"], target, max_shard_size="8KB")
    (target / "README.md").write_text("model card\n")
    state = snapshot(target)
    assert state is not None
    return state


def _assert_untouched(target: Path, before: dict[str, str] | None) -> None:
    assert snapshot(target) == before
    assert leftovers(target.parent) == []


# --- real faults --------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [0, 2])
def test_parent_is_a_file(depth: int, models: dict[str, Any], tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    target = blocker.joinpath(*["sub"] * depth, "ckpt")
    with pytest.raises(qcore.CheckpointWriteError, match="is a file, not a directory") as info:
        qcore.save_pretrained(models["int8"], target)
    assert info.value.path == str(blocker) and info.value.errno == errno.ENOTDIR
    assert blocker.read_text() == "x" and leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", ["file", "link to a file"])
def test_target_is_not_a_directory(kind: str, models: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file"
    if kind == "link to a file":
        target = tmp_path / "link"
        target.symlink_to(tmp_path / "file")
    with pytest.raises(qcore.CheckpointWriteError, match="not a directory") as info:
        qcore.save_pretrained(models["int8"], target)
    assert (tmp_path / "file").name in info.value.path
    assert (tmp_path / "file").read_text() == "x" and leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_broken_symbolic_link_as_target(kind: str, models: dict[str, Any], tmp_path: Path) -> None:
    link = tmp_path / "ckpt"
    link.symlink_to(tmp_path / "gone" if kind == "dangling" else link)
    with pytest.raises(qcore.CheckpointWriteError, match="symbolic link") as info:
        qcore.save_pretrained(models["int8"], link)
    assert info.value.path == str(link) and os.readlink(link) in str(info.value)
    assert link.is_symlink() and not (tmp_path / "gone").exists() and leftovers(tmp_path) == []


def test_link_to_a_checkpoint_is_followed_and_kept(models: dict[str, Any], tmp_path: Path) -> None:
    real = tmp_path / "store" / "ckpt"
    _existing(real, models)
    link = tmp_path / "ckpt"
    link.symlink_to(real)
    qcore.save_pretrained(models["int8"], link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert (real / "README.md").exists() and TinyTransformer.from_pretrained(link).is_quantized
    assert leftovers(real.parent) == [] and leftovers(tmp_path) == []


def test_mount_point_as_target(
    models: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Mounting needs privileges the tests do not have: the target is declared a mount point instead.
    target = tmp_path / "volume"
    before = _existing(target, models)
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == target or real_ismount(path))
    with pytest.raises(qcore.CheckpointWriteError, match="mount point") as info:
        qcore.save_pretrained(models["int8"], target)
    assert info.value.errno == errno.EBUSY
    _assert_untouched(target, before)
    monkeypatch.undo()
    qcore.save_pretrained(models["int8"], target / "ckpt")  # what the message advises
    assert TinyTransformer.from_pretrained(target / "ckpt").is_quantized


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A root-owned 0755 directory that another user can read but not write (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="qcore-saving-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _as_nobody() -> None:
    os.setgid(65534)
    os.setuid(65534)


@pytest.mark.skipif(os.geteuid() != 0, reason="drops root to get a real permission error")
@pytest.mark.parametrize(
    "case", ["new target", "existing checkpoint", "writable target, read-only parent", "read-only target"]
)
def test_permission_denied(case: str, models: dict[str, Any], shared_tmp: Path) -> None:
    target = shared_tmp / "ckpt"
    before = None
    if case != "new target":
        before = _existing(target, models)
    denied = target if case == "existing checkpoint" else shared_tmp  # the first thing it may not write
    if case == "writable target, read-only parent":
        target.chmod(0o777)
    elif case == "read-only target":  # the user's own directory, in a parent they may write, made read-only
        for path in (shared_tmp, target, *target.iterdir()):
            os.chown(path, 65534, 65534)
        target.chmod(0o555)
        denied = target
    before = snapshot(target) if before is not None else None
    pid, report, _ = fork_saver(lambda: qcore.save_pretrained(models["int8"], target), child_setup=_as_nobody)
    _, (_, outcome, code, message) = wait_child(pid, report)
    assert (outcome, int(code)) == ("CheckpointWriteError", errno.EACCES), message
    assert message.startswith(f"cannot write {denied}: ")
    assert ("left as it was" if before is not None else "Nothing was created") in message
    _assert_untouched(target, before)


def _file_size_limit(limit: int) -> Callable[[], None]:
    def setup() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return setup


@pytest.mark.parametrize("existing", [False, True], ids=["new target", "existing checkpoint"])
@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "bin"])
def test_write_fails_midway(
    safe_serialization: bool, existing: bool, models: dict[str, Any], tmp_path: Path
) -> None:
    target = tmp_path / "ckpt"
    before = _existing(target, models) if existing else None
    pid, report, _ = fork_saver(
        lambda: qcore.save_pretrained(models["int8"], target, safe_serialization=safe_serialization),
        child_setup=_file_size_limit(4096),
    )
    _, (_, outcome, code, message) = wait_child(pid, report)
    assert (outcome, int(code)) == ("CheckpointWriteError", errno.EFBIG), message
    name = "diffusion_pytorch_model.safetensors" if safe_serialization else "diffusion_pytorch_model.bin"
    assert f"cannot write {target / name}: File too large [EFBIG]" in message and "max_shard_size" in message
    assert ("left as it was" if existing else "Nothing was created") in message
    _assert_untouched(target, before)


# --- injected faults ----------------------------------------------------------------------------


def _raise(code: int, path: str | os.PathLike[str]) -> OSError:
    return OSError(code, os.strerror(code), str(path))


class _FailingFile(io.StringIO):
    """A text file whose data never reaches the disk: the write reports ``code``."""

    def __init__(self, code: int, path: str) -> None:
        super().__init__()
        self.code, self.path = code, path

    def write(self, text: str) -> int:
        raise _raise(self.code, self.path)


def _inject(point: str, code: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the file system report ``code`` at ``point`` of the next save."""
    if point == "creating the staging directory":
        real_mkdir = os.mkdir

        def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
            if str(path).endswith(".qcore-tmp"):
                raise _raise(code, path)
            real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)
    elif point == "writing a weight file":
        real_save_file = safetensors.torch.save_file

        def save_file(tensors: dict[str, torch.Tensor], filename: str, metadata: Any = None) -> None:
            real_save_file(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as f:
                f.truncate(100)  # what a full disk leaves: a part of the file
            # safetensors reports the OS error in its message, with its number
            raise safetensors.SafetensorError(
                f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})"
            )

        monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    elif point in ("writing config.json", "writing the index"):
        name = "config.json" if point == "writing config.json" else ".index.json"

        def fake_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if str(path).endswith(name) and "w" in mode:
                Path(path).touch()
                return _FailingFile(code, str(path))
            return open(path, mode, *args, **kwargs)

        monkeypatch.setattr(_saving, "open", fake_open, raising=False)
    elif point == "carrying a file over":
        monkeypatch.setattr(os, "link", lambda src, dst, **kwargs: (_ for _ in ()).throw(_raise(code, dst)))
    elif point == "fsync":
        monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(code, os.strerror(code))))
    elif point == "exchanging the directories":
        monkeypatch.setattr(
            _atomic, "exchange_directories", lambda a, b: (_ for _ in ()).throw(_raise(code, b))
        )
    elif point == "renaming the new directory in (no renameat2)":
        monkeypatch.setattr(_atomic, "_renameat2", None)
        real_rename = os.rename

        def rename(src: Any, dst: Any) -> None:
            if str(src).endswith(".qcore-tmp"):
                raise _raise(code, dst)
            real_rename(src, dst)

        monkeypatch.setattr(os, "rename", rename)
    else:
        raise AssertionError(point)


# (where, errno, whether it needs an existing checkpoint at the target)
INJECTED = [
    ("creating the staging directory", errno.EROFS, False),
    ("creating the staging directory", errno.EDQUOT, False),
    ("creating the staging directory", errno.ENOSPC, False),
    ("writing a weight file", errno.ENOSPC, False),
    ("writing a weight file", errno.EDQUOT, False),
    ("writing a weight file", errno.EIO, False),
    ("writing config.json", errno.ENOSPC, False),
    ("writing the index", errno.ENOSPC, False),
    ("fsync", errno.EIO, False),
    ("carrying a file over", errno.ENOSPC, True),
    ("exchanging the directories", errno.EIO, True),
    ("renaming the new directory in (no renameat2)", errno.EIO, True),
]


CASES = [
    (p, c, existing) for p, c, replaces in INJECTED for existing in ([True] if replaces else [False, True])
]


@pytest.mark.parametrize(
    ("point", "code", "existing"),
    CASES,
    ids=[f"{p}-{errno.errorcode[c]}-{'existing' if e else 'new'}" for p, c, e in CASES],
)
def test_injected_fault(
    point: str,
    code: int,
    existing: bool,
    models: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target = tmp_path / "ckpt"
    before = _existing(target, models) if existing else None
    _inject(point, code, monkeypatch)
    with pytest.raises(qcore.CheckpointWriteError) as info:
        qcore.save_pretrained(models["int8"], target, max_shard_size="8KB")
    monkeypatch.undo()
    message = str(info.value)
    assert info.value.errno == code and f"[{errno.errorcode[code]}]" in message
    assert ".qcore-tmp" not in message and str(tmp_path) in info.value.path
    assert ("left as it was" if existing else "Nothing was created") in message
    _assert_untouched(target, before)
    qcore.save_pretrained(models["int8"], target)  # and the next save works
    assert TinyTransformer.from_pretrained(target).is_quantized


def test_non_file_system_errors_pass_through_unchanged(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "keep").write_text("x")
    with pytest.raises(ZeroDivisionError), _atomic.atomic_directory(target) as staging:
        (staging / "new").write_text("y")
        raise ZeroDivisionError
    assert snapshot(target) == {"keep": snapshot(target)["keep"]} and leftovers(tmp_path) == []


# --- the command line ---------------------------------------------------------------------------


_QUANTIZE = "quantize {src} {dst} --method int8-test --model helpers.models:TinyTransformer"


@pytest.mark.parametrize("case", ["parent is a file", "dangling link"])
def test_quantize_command_exits_1(
    case: str, models: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dst = tmp_path / "out"
    if case == "parent is a file":
        (tmp_path / "file").write_text("x")
        dst = tmp_path / "file" / "out"
    else:
        dst.symlink_to(tmp_path / "gone")
    assert qcore_main(_QUANTIZE.format(src=models["src"], dst=dst).split()) == 1
    err = capsys.readouterr().err
    assert "qcore: error: cannot write" in err and str(tmp_path) in err
    assert not (tmp_path / "gone").exists() and leftovers(tmp_path) == []


def test_quantize_command_exits_1_on_a_full_disk(
    models: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dst = tmp_path / "out"
    _inject("writing a weight file", errno.ENOSPC, monkeypatch)
    assert qcore_main(_QUANTIZE.format(src=models["src"], dst=dst).split()) == 1
    err = capsys.readouterr().err
    assert f"qcore: error: cannot write {dst}/diffusion_pytorch_model.safetensors: No space left" in err
    assert not dst.exists() and leftovers(tmp_path) == []
