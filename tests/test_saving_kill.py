"""kill -9 at every file-system step of a save: the target always holds a complete checkpoint, and the
next save removes what the killed one left. A live save's staging directory is never removed.

Each kill runs the save in a forked child that SIGKILLs itself at the N-th file-system call (before and
after every mkdir, write, fsync, link, rename, exchange, unlink and rmtree), for every N the save has.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from saving_support import fork_saver, leftovers, saved_models, snapshot, wait_child

import qcore
from helpers.models import TinyTransformer
from qcore import _atomic


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with saved_models(tmp_path_factory.mktemp("models")) as models:
        yield models


def _template(root: Path, models: dict[str, Any], kind: str) -> Path | None:
    """The checkpoint already at the target before the save under test, with files of the user's beside it."""
    if kind == "fresh":
        return None
    path = root / "template"
    if kind == "bf16-sharded":
        qcore.save_pretrained(models["bf16"], path, max_shard_size="8KB")
        qcore.save_pretrained(models["bf16"], path, variant="fp16")
    else:
        qcore.save_pretrained(models["int8"], path)
    (path / "README.md").write_text("model card\n")
    (path / "notes").mkdir()
    (path / "notes" / "eval.txt").write_text("fid 3.1\n")
    return path


def _check_loads(path: Path, models: dict[str, Any], source: str) -> None:
    loaded = TinyTransformer.from_pretrained(path)
    assert torch.equal(loaded(models["x"]), models[source](models["x"]))
    assert getattr(loaded, "is_quantized", False) == (source == "int8")


# (template at the target, model saved, save options): quantized over unquantized and back, and a new target
SCENARIOS = {
    "int8-over-bf16-sharded": ("bf16-sharded", "int8", {}),
    "bf16-sharded-over-int8": ("int8", "bf16", {"max_shard_size": "8KB"}),
    "int8-to-new-target": ("fresh", "int8", {"max_shard_size": "8KB"}),
}


@pytest.fixture
def fast_tmp(tmp_path: Path) -> Iterator[Path]:
    """A directory on tmpfs where there is one: the many kills fsync for nothing there, and tmpfs has
    renameat2's exchange too. The first scenario runs on the test's own tmp_path, whatever it is on."""
    if not Path("/dev/shm").is_dir():
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="qcore-saving-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("mode", ["exchange", "fallback"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_kill_at_every_step_keeps_a_complete_checkpoint(
    scenario: str, mode: str, models: dict[str, Any], tmp_path: Path, fast_tmp: Path
) -> None:
    if (scenario, mode) != (next(iter(SCENARIOS)), "exchange"):
        tmp_path = fast_tmp
    if mode == "exchange" and _atomic._renameat2 is None:
        pytest.skip("this system has no renameat2: the fallback cases cover it")
    template_kind, source, options = SCENARIOS[scenario]
    template = _template(tmp_path, models, template_kind)
    old = snapshot(template) if template is not None else None

    def run(n: int | None) -> tuple[Path, int, list[str]]:
        parent = tmp_path / f"run-{n}"
        parent.mkdir()
        target = parent / "ckpt"
        if template is not None:
            shutil.copytree(template, target)
        pid, report, _ = fork_saver(
            lambda: qcore.save_pretrained(models[source], target, **options),
            kill_at=n,
            fallback=mode == "fallback",
        )
        killed, lines = wait_child(pid, report)
        return target, killed, lines

    target, killed, lines = run(None)
    assert killed == 0 and lines[1] == "ok", lines
    events = int(lines[0])
    new = snapshot(target)
    assert new is not None and new != old
    _check_loads(target, models, source)
    if template is not None:
        _check_loads(template, models, "int8" if template_kind == "int8" else "bf16")
        assert {"README.md", "notes/eval.txt"} <= set(new)
    assert events >= 20

    seen = {"old": 0, "new": 0, "missing": 0, "restored": 0, "leftovers": 0}
    for n in range(1, events + 1):
        target, killed, _ = run(n)
        assert killed == signal.SIGKILL, f"kill point {n} of {events} was not reached"
        state = snapshot(target)
        parent = target.parent
        seen["leftovers"] += bool(leftovers(parent))
        if state is None and old is not None:
            # Only the fallback replace has an instant without the target; the old one waits beside it.
            assert mode == "fallback", f"kill point {n}: no checkpoint at the target"
            backups = [parent / name for name in leftovers(parent) if name.endswith(".qcore-old")]
            assert [snapshot(b) for b in backups] == [old], f"kill point {n}"
            assert _atomic.remove_leftovers(parent) and snapshot(target) == old
            seen["restored"] += 1
        else:
            assert state in (old, new), f"kill point {n} of {events} left an incomplete checkpoint: {state}"
            seen["new" if state == new else "old" if old is not None else "missing"] += 1
        qcore.save_pretrained(models[source], target, **options)
        assert snapshot(target) == new, f"kill point {n}: the next save did not write the checkpoint"
        assert leftovers(parent) == [], f"kill point {n}: the next save left {leftovers(parent)}"
        shutil.rmtree(parent)
    assert seen["old" if old is not None else "missing"] > 0 and seen["new"] > 0 and seen["leftovers"] > 0, (
        seen
    )
    assert (seen["restored"] > 0) == (mode == "fallback" and old is not None), seen


# Where a live save is paused while another save runs beside it (the first call of each).
PAUSE_POINTS = {
    "writing the weights": "save_file",
    "carrying the README over": "link",
    "swapping the directories": "exchange_directories",
}


@pytest.mark.parametrize("mode", ["exchange", "fallback"])
@pytest.mark.parametrize("point", list(PAUSE_POINTS))
def test_a_live_save_is_never_cleaned_up(
    point: str, mode: str, models: dict[str, Any], tmp_path: Path
) -> None:
    template = _template(tmp_path, models, "bf16-sharded")
    assert template is not None
    target = tmp_path / "parent" / "ckpt"
    shutil.copytree(template, target)
    parent = target.parent

    def save() -> None:
        qcore.save_pretrained(models["int8"], target)

    pid, report, _ = fork_saver(save, fallback=mode == "fallback")
    assert wait_child(pid, report)[1][1] == "ok"
    expected = snapshot(target)
    shutil.rmtree(target)
    shutil.copytree(template, target)

    pid, report, resume = fork_saver(save, pause_on=PAUSE_POINTS[point], fallback=mode == "fallback")
    live = leftovers(parent)
    assert len(live) == 1 and live[0].endswith(".qcore-tmp")
    # Another process's save into the same parent, and an explicit cleanup, leave the live one alone.
    qcore.save_pretrained(models["bf16"], parent / "other")
    assert _atomic.remove_leftovers(parent) == []
    assert leftovers(parent) == live
    assert resume is not None
    os.write(resume, b"r")
    os.close(resume)
    killed, lines = wait_child(pid, report)
    assert killed == 0 and lines[1] == "ok", lines
    assert snapshot(target) == expected and leftovers(parent) == []


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def _make_leftover(parent: Path, name: str, owner: dict[str, Any] | None) -> Path:
    path = parent / name
    path.mkdir()
    (path / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 64)
    if owner is not None:
        (path / _atomic.OWNER_FILE).write_text(json.dumps(owner))
    return path


# name, owner record ("live": a live process here, "dead": a dead one, "other-host"), whether it goes
LEFTOVER_CASES = {
    "no record, lock free": (".ckpt.0123abcd.qcore-tmp", None, True),
    "dead owner": (".ckpt.0123abcd.qcore-tmp", "dead", True),
    "live owner on this host": (".ckpt.0123abcd.qcore-tmp", "live", False),
    "owner on another host, lock free": (".ckpt.0123abcd.qcore-tmp", "other-host", True),
    "another target's leftover": (".other.name.89abcdef.qcore-tmp", None, True),
    "not a qcore name (random part)": (".ckpt.XYZ.qcore-tmp", None, False),
    "not hidden": ("ckpt.0123abcd.qcore-tmp", None, False),
}


@pytest.mark.parametrize("case", list(LEFTOVER_CASES))
def test_which_leftovers_are_removed(case: str, tmp_path: Path) -> None:
    name, owner_kind, removed = LEFTOVER_CASES[case]
    owner = {
        None: None,
        "dead": {"pid": _dead_pid(), "host": socket.gethostname()},
        "live": {"pid": os.getppid(), "host": socket.gethostname()},
        "other-host": {"pid": os.getppid(), "host": "elsewhere.invalid"},
    }[owner_kind]
    path = _make_leftover(tmp_path, name, owner)
    assert _atomic.remove_leftovers(tmp_path) == ([path] if removed else [])
    assert path.exists() != removed


def test_a_locked_leftover_is_kept(tmp_path: Path) -> None:
    path = _make_leftover(tmp_path, ".ckpt.0123abcd.qcore-tmp", None)
    fd = os.open(path, os.O_RDONLY)
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX)
        assert _atomic.remove_leftovers(tmp_path) == [] and path.exists()
    finally:
        os.close(fd)
    assert _atomic.remove_leftovers(tmp_path) == [path] and not path.exists()


def test_links_and_files_named_like_leftovers_are_not_followed(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data").write_text("keep")
    (tmp_path / ".ckpt.0123abcd.qcore-tmp").symlink_to(precious)
    (tmp_path / ".ckpt.89abcdef.qcore-old").write_text("a file")
    assert _atomic.remove_leftovers(tmp_path) == []
    assert (precious / "data").read_text() == "keep"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another user")
def test_another_users_leftover_is_not_touched(tmp_path: Path) -> None:
    """In a shared directory (/tmp) anyone can plant a ".x.<hex>.qcore-old" to be "restored" as x."""
    planted = _make_leftover(tmp_path, ".ckpt.0123abcd.qcore-old", None)
    os.chown(planted, 65534, 65534)
    assert _atomic.remove_leftovers(tmp_path) == [] and planted.exists() and not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("original_exists", [False, True])
def test_an_old_copy_is_restored_only_when_its_directory_is_missing(
    original_exists: bool, tmp_path: Path
) -> None:
    backup = _make_leftover(tmp_path, ".ckpt.0123abcd.qcore-old", None)
    if original_exists:
        (tmp_path / "ckpt").mkdir()
    assert _atomic.remove_leftovers(tmp_path) == [backup]
    assert not backup.exists()
    assert (tmp_path / "ckpt" / "diffusion_pytorch_model.safetensors").exists() != original_exists
