"""Shared by the tests/test_saving_*.py files: directory snapshots and forked savers with a fault hook.

A saver runs in a forked child of the test process (no new interpreter to start), with the file-system
calls of a save wrapped so that the child kills itself with SIGKILL, or pauses, at the N-th of them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import select
import shutil
import signal
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

import qcore
from helpers.int8_backend import BACKEND, Int8TestConfig
from helpers.models import TinyTransformer, make_tiny
from qcore import _atomic, _saving


@contextlib.contextmanager
def saved_models(root: Path) -> Iterator[dict[str, Any]]:
    """The saves' subjects, with the in-test int8 backend registered meanwhile: a bfloat16 TinyTransformer
    (``bf16``, saved to ``src`` under ``root``), its int8 load (``int8``) and an input (``x``)."""
    qcore.register_backend(BACKEND)
    try:
        bf16 = make_tiny()
        qcore.save_pretrained(bf16, root / "src")
        int8 = TinyTransformer.from_pretrained(root / "src", quantization_config=Int8TestConfig())
        x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
        yield {"bf16": bf16, "int8": int8, "src": root / "src", "x": x}
    finally:
        qcore.unregister_backend(BACKEND.quant_method)


LEFTOVER_MARKS = (".qcore-tmp", ".qcore-old")

# Every call a save makes that changes the disk, each with an event before and after it.
HOOKED: list[tuple[Any, str]] = [
    (os, "mkdir"),
    (os, "fsync"),
    (os, "link"),
    (os, "rename"),
    (os, "unlink"),
    (os, "chmod"),
    (shutil, "rmtree"),
    (shutil, "copy2"),
    (_atomic, "exchange_directories"),
    (_saving, "_write_json"),
    (safetensors.torch, "save_file"),
]


def snapshot(directory: Path) -> dict[str, str] | None:
    """Relative path -> sha256 of every file under ``directory`` (symbolic links by their target)."""
    if not directory.is_dir():
        return None
    found = {}
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory).as_posix()
        if path.is_symlink():
            found[relative] = "-> " + os.readlink(path)
        elif path.is_file():
            found[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.endswith(LEFTOVER_MARKS))


def fork_saver(
    action: Callable[[], None],
    *,
    kill_at: int | None = None,
    pause_on: str | None = None,
    fallback: bool = False,
    child_setup: Callable[[], None] | None = None,
) -> tuple[int, int, int | None]:
    """Run ``action`` in a forked child; returns (pid, fd reporting the child's event count and error,
    fd to write one byte to, which resumes a child paused before its first call of ``pause_on``)."""
    report_r, report_w = os.pipe()
    paused_r, paused_w = os.pipe() if pause_on is not None else (None, None)
    resume_r, resume_w = os.pipe() if pause_on is not None else (None, None)
    pid = os.fork()
    if pid:
        os.close(report_w)
        if pause_on is not None:
            os.close(paused_w)
            os.close(resume_r)
            assert os.read(paused_r, 1) == b"p", "the child ended before its pause point"
            os.close(paused_r)
        return pid, report_r, resume_w
    status = 0
    try:
        os.close(report_r)
        count, paused = [0], []

        def event(name: str) -> None:
            count[0] += 1
            if count[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if name == pause_on and not paused:
                paused.append(name)
                os.write(paused_w, b"p")
                os.read(resume_r, 1)

        for owner, name in HOOKED:
            setattr(owner, name, _with_events(getattr(owner, name), functools.partial(event, name)))
        if fallback:
            _atomic._renameat2 = None  # a system without renameat2
        if child_setup is not None:
            child_setup()
        try:
            action()
            message = f"{count[0]}\nok\n"
        except Exception as exc:
            message = f"{count[0]}\n{type(exc).__name__}\n{getattr(exc, 'errno', None)}\n{exc}"
        os.write(report_w, message.encode())
    except BaseException:
        traceback.print_exc()
        status = 3
    finally:
        os._exit(status)


def _with_events(function: Callable[..., Any], event: Callable[[], None]) -> Callable[..., Any]:
    """``function`` with ``event()`` before and after each call."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        event()
        result = function(*args, **kwargs)
        event()
        return result

    return wrapper


def wait_child(pid: int, report_fd: int, timeout: float = 60.0) -> tuple[int, list[str]]:
    """(signal that killed the child or 0, its report lines: event count, outcome, errno, message)."""
    with os.fdopen(report_fd, "rb") as f:
        if not select.select([f], [], [], timeout)[0]:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"the saver child did not finish in {timeout} s")
        report = f.read().decode()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return os.WTERMSIG(status), report.split("\n", 3)
    assert os.WEXITSTATUS(status) == 0, f"the saver child failed (status {os.WEXITSTATUS(status)})"
    return 0, report.split("\n", 3)
