"""Replace a directory atomically, and clean up after replacements that were killed.

:func:`atomic_directory` yields an empty staging directory beside the target (``.<name>.<random>.qcore-tmp``).
When the ``with`` block ends normally, the entries of the old target that the new content does not replace
are carried over (as hard links, so even a multi-GB file costs nothing), everything is fsynced, and the
staging directory takes the target's place:

- on Linux with ``renameat2(RENAME_EXCHANGE)`` (ext4, xfs, btrfs, tmpfs, ...) the two directories swap
  names in one step, so the path always holds a complete directory, the old one or the new one;
- elsewhere the old directory is renamed to ``.<name>.<random>.qcore-old`` and the new one renamed in.
  Between those two renames the path is briefly missing; a kill there leaves the old directory intact
  under the ``.qcore-old`` name, and the next save into the same parent renames it back.

A staging directory is locked (``flock`` on the directory itself) for as long as its save runs, and holds a
``.qcore-owner`` file (pid, host) until just before it is swapped in. :func:`remove_leftovers` removes only
leftovers whose lock it can take and whose owner is not a live process on this host, so it never touches a
save in progress, in this process or another.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import platform
import re
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ._errors import CheckpointWriteError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; leftovers are then never removed automatically
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger("qcore")

OWNER_FILE = ".qcore-owner"
_TMP_SUFFIX = ".qcore-tmp"
_OLD_SUFFIX = ".qcore-old"
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.[0-9a-f]{8}\.qcore-(?P<kind>tmp|old)")
# Long enough for any real name, short enough that ".<name>.<8 hex>.qcore-tmp" fits in NAME_MAX (255).
_NAME_KEEP = 200
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_SYSCALL_RENAMEAT2 = {"x86_64": 316, "aarch64": 276}
_LOCK_WAIT_S = 10.0

_ADVICE = {
    errno.ENOSPC: "the file system is full: free space there or save somewhere else",
    errno.EDQUOT: "the disk quota is used up: free space or save somewhere else",
    errno.EFBIG: "the file is larger than this file system or process allows (see `ulimit -f`): "
    "save with a smaller max_shard_size or somewhere else",
    errno.EROFS: "the file system is read-only: save to a writable directory",
    errno.EACCES: "permission denied: make the directory writable for this user or save somewhere else",
    errno.EPERM: "the operation is not permitted there: save somewhere else",
    errno.ENOTDIR: "a component of the path is a file, not a directory: choose another path",
    errno.ENAMETOOLONG: "the path is too long: choose a shorter one",
    errno.ELOOP: "the path has a symbolic-link loop: fix the links or choose another path",
    errno.EIO: "the device reported an I/O error: check the disk",
}


# --- renameat2 ----------------------------------------------------------------------------------


def _load_renameat2() -> Callable[[str, str, int], int] | None:
    """``renameat2(AT_FDCWD, a, AT_FDCWD, b, flags)`` through libc, or the raw syscall on old glibc."""
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    function = getattr(libc, "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        function.restype = ctypes.c_int
        return lambda a, b, flags: function(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flags)
    number = _SYSCALL_RENAMEAT2.get(platform.machine())
    if number is None:
        return None
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    return lambda a, b, flags: syscall(
        ctypes.c_long(number),
        ctypes.c_int(_AT_FDCWD),
        ctypes.c_char_p(os.fsencode(a)),
        ctypes.c_int(_AT_FDCWD),
        ctypes.c_char_p(os.fsencode(b)),
        ctypes.c_uint(flags),
    )


_renameat2 = _load_renameat2()


def _rename_with_flags(src: Path, dst: Path, flags: int) -> bool:
    """True when done; False when this system or file system has no such rename (the caller falls back)."""
    if _renameat2 is None:
        return False
    if _renameat2(str(src), str(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def exchange_directories(a: Path, b: Path) -> bool:
    """Swap the names of two directories in one atomic step; False where the system cannot."""
    return _rename_with_flags(a, b, _RENAME_EXCHANGE)


# --- locks and owners ---------------------------------------------------------------------------


def _lock(fd: int | None, *, wait: bool) -> bool | None:
    """Take the exclusive lock of ``fd``: True; False when another holds it; None without lock support."""
    if fcntl is None or fd is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise
    return True


def _lock_within(fd: int | None, seconds: float) -> bool | None:
    deadline = time.monotonic() + seconds
    while True:
        got = _lock(fd, wait=False)
        if got is not False or time.monotonic() > deadline:
            return got
        time.sleep(0.02)


def _open_directory(path: Path) -> int | None:
    """A descriptor to lock ``path`` with (never through a symbolic link); None where directories cannot
    be opened (Windows), after checking that ``path`` is a directory."""
    if fcntl is None:
        if path.is_symlink() or not path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(path))
        return None
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)


def _close(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _is_at(fd: int | None, path: Path) -> bool:
    """Whether the directory open as ``fd`` is still the one named ``path`` (not removed or replaced)."""
    if fd is None:
        return path.is_dir()
    try:
        here, there = os.fstat(fd), os.lstat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _is_mine(path: Path) -> bool:
    if not hasattr(os, "geteuid"):
        return True
    try:
        return os.lstat(path).st_uid == os.geteuid()
    except OSError:
        return False


def _owner_is_alive(directory: Path) -> bool:
    """Whether the ``.qcore-owner`` record names another live process on this host."""
    try:
        owner = json.loads((directory / OWNER_FILE).read_text(encoding="utf-8"))
        pid, host = int(owner["pid"]), str(owner["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if host != socket.gethostname() or pid == os.getpid():
        return False  # another host's save is protected by its lock alone
    if os.name != "posix":
        return True  # no liveness probe here: assume it runs
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


# --- leftovers ----------------------------------------------------------------------------------


def remove_leftovers(parent: str | os.PathLike[str]) -> list[Path]:
    """Remove what killed saves left in ``parent``; returns what was removed or restored.

    ``.qcore-tmp`` directories are deleted, a ``.qcore-old`` directory is renamed back to its name when
    that name is missing (a kill between the two renames of the fallback replace) and deleted otherwise.
    One whose lock another process holds, whose owner record names a live process here, or that another
    user owns, is left alone.
    Failures are logged, never raised: cleaning up must not stop a save.
    """
    parent = Path(parent)
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    handled = []
    for name in sorted(names):
        match = _LEFTOVER.fullmatch(name)
        if match is None:
            continue
        path = parent / name
        try:
            fd = _open_directory(path)
        except OSError:
            continue  # gone, not a directory, or a symbolic link: not ours to touch
        try:
            if not _is_mine(path):
                continue  # another user's: in a shared directory it may be planted, not left by a save
            locked = _lock(fd, wait=False)
            if locked is False or not _is_at(fd, path) or _owner_is_alive(path):
                continue
            if locked is None and not (path / OWNER_FILE).exists():
                continue  # no lock and no record: cannot tell a live save from a dead one
            original = parent / match["name"]
            if match["kind"] == "old" and not (original.is_dir() and not original.is_symlink()):
                # The old checkpoint of a fallback replace killed between its two renames.
                if len(match["name"]) >= _NAME_KEEP or os.path.lexists(original):
                    logger.warning(
                        "%s holds an older copy of a directory; restore or remove it by hand", path
                    )
                    continue
                os.rename(path, original)
                logger.warning("restored %s from %s, left by an interrupted save", original, path)
            else:
                shutil.rmtree(path)
                logger.info("removed %s, left by an interrupted save", path)
            handled.append(path)
        except OSError as exc:
            logger.warning("could not remove %s, left by an interrupted save: %s", path, exc)
        finally:
            _close(fd)
    return handled


# --- errors -------------------------------------------------------------------------------------


def write_error(
    exc: OSError, path: str | os.PathLike[str], target: Path, *, existed: bool
) -> CheckpointWriteError:
    """A :class:`CheckpointWriteError` for ``exc``, naming ``path`` and saying what happened to ``target``."""
    code = exc.errno
    reason = exc.strerror or str(exc)
    if code is not None and code in errno.errorcode:
        reason = f"{reason} [{errno.errorcode[code]}]"
    advice = _ADVICE.get(code or 0, "check the path and the file system")
    state = (
        f"The checkpoint already at {target} was left as it was"
        if existed
        else f"Nothing was created at {target}"
    )
    return CheckpointWriteError(
        f"cannot write {path}: {reason}; {advice}. {state}.", path=str(path), errno=code
    )


def _target_path(path: str | os.PathLike[str], staging: Path | None, target: Path) -> str:
    """The path the user knows for ``path``: inside the staging directory means inside the target."""
    text = os.fspath(path)
    if staging is not None:
        text = text.replace(str(staging), str(target), 1)
    return text


def _resolve_target(target: Path) -> Path:
    """The directory to replace: a symbolic link to a directory is followed (the link stays)."""
    target = Path(os.path.abspath(target))
    if target.is_symlink():
        if not target.exists():
            raise CheckpointWriteError(
                f"cannot write {target}: it is a symbolic link to {os.readlink(target)}, which does not "
                "exist; create that directory or remove the link",
                path=str(target),
                errno=errno.ENOENT,
            )
        target = Path(os.path.realpath(target))
    if target.exists() and not target.is_dir():
        raise CheckpointWriteError(
            f"cannot write {target}: it exists and is not a directory; remove it or choose another path",
            path=str(target),
            errno=errno.ENOTDIR,
        )
    if target.is_dir() and os.path.ismount(target):
        # A mount point cannot be renamed: it would be copied to the parent's file system and then fail.
        raise CheckpointWriteError(
            f"cannot write {target}: it is a mount point, which cannot be replaced as a whole; save into a "
            "directory inside it",
            path=str(target),
            errno=errno.EBUSY,
        )
    if target.is_dir() and not os.access(target, os.W_OK):
        # Writing into it would fail; replacing it through the parent would override its owner's wish.
        raise CheckpointWriteError(
            f"cannot write {target}: the directory is read-only (for this user, or its file system); "
            "make it writable or save somewhere else. The checkpoint already there was left as it was.",
            path=str(target),
            errno=errno.EACCES,
        )
    return target


def _make_parent(parent: Path, target: Path) -> None:
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = next((p for p in [parent, *parent.parents] if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise CheckpointWriteError(
                f"cannot write {target}: {blocker} is a file, not a directory; choose another path",
                path=str(blocker),
                errno=errno.ENOTDIR,
            ) from exc
        raise write_error(exc, exc.filename or parent, target, existed=False) from exc


# --- the replace --------------------------------------------------------------------------------


class _Staging:
    """The locked staging directory of one save."""

    def __init__(self, parent: Path, name: str) -> None:
        self.parent = parent
        base = name[:_NAME_KEEP]
        for _ in range(100):
            path = parent / f".{base}.{secrets.token_hex(4)}{_TMP_SUFFIX}"
            try:
                os.mkdir(path)
            except FileExistsError:
                continue
            try:
                fd = _open_directory(path)
            except FileNotFoundError:
                continue  # a cleaner removed it in the instant after mkdir
            self.lock = _lock(fd, wait=True)
            # A cleaner may have taken the new directory in the instant before the lock: start again.
            if _is_at(fd, path):
                self.path, self.fd = path, fd
                break
            _close(fd)
        else:
            raise FileExistsError(errno.EEXIST, "no free staging name", str(parent))
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        (path / OWNER_FILE).write_text(json.dumps(record), encoding="utf-8")
        self.old_fd: int | None = None

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.path)
        _close(self.fd)
        _close(self.old_fd)


def _link_or_copy(src: str, dst: Path) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO):
            raise
        shutil.copy2(src, dst, follow_symlinks=False)


def _carry_over(old: Path, new: Path, superseded: Callable[[str], bool] | None, prefix: str = "") -> None:
    """Bring the entries of ``old`` that ``new`` lacks (and ``superseded`` does not drop) into ``new``."""
    for entry in os.scandir(old):
        relative = prefix + entry.name
        if superseded is not None and superseded(relative):
            continue
        dest = new / entry.name
        is_dir = entry.is_dir(follow_symlinks=False)
        if os.path.lexists(dest):
            if is_dir and dest.is_dir() and not dest.is_symlink():
                _carry_over(Path(entry.path), dest, superseded, relative + "/")
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), dest)
        elif is_dir:
            os.mkdir(dest)
            shutil.copystat(entry.path, dest)
            _carry_over(Path(entry.path), dest, superseded, relative + "/")
        else:
            _link_or_copy(entry.path, dest)


def _fsync_path(path: Path | str, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if not directory or exc.errno not in (errno.EINVAL, errno.EBADF):  # some systems cannot sync dirs
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
    finally:
        os.close(fd)


def _fsync_tree(root: Path, *, files: bool) -> None:
    for directory, _, names in os.walk(root):
        for name in names if files else ():
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                _fsync_path(path)
        _fsync_path(directory, directory=True)


def _commit(staging: _Staging, target: Path, superseded: Callable[[str], bool] | None) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(staging.path / OWNER_FILE)
    _fsync_tree(staging.path, files=True)
    if target.is_dir():
        _carry_over(target, staging.path, superseded)
        os.chmod(staging.path, target.stat().st_mode & 0o7777)
        _fsync_tree(staging.path, files=False)  # carried files are as durable as they were
    elif _rename_new(staging, target):
        return _settle(target.parent, None)
    # Keep cleaners of other saves off the old directory while it is swapped out and removed.
    staging.old_fd = _open_directory(target)
    _lock_within(staging.old_fd, _LOCK_WAIT_S)
    if exchange_directories(staging.path, target):
        return _settle(target.parent, staging.path)  # the old directory now has the staging name
    backup = target.parent / f".{target.name[:_NAME_KEEP]}.{secrets.token_hex(4)}{_OLD_SUFFIX}"
    os.rename(target, backup)
    try:
        os.rename(staging.path, target)
    except BaseException:
        os.rename(backup, target)
        raise
    _settle(target.parent, backup)


def _cwd_inside(target: Path) -> Path | None:
    """The working directory relative to ``target`` when it is inside it, else None."""
    try:
        return Path(os.getcwd()).relative_to(os.path.realpath(target))
    except (OSError, ValueError):
        return None


def _rename_new(staging: _Staging, target: Path) -> bool:
    """Rename the staging directory to a ``target`` that did not exist; False when another save created
    ``target`` meanwhile (the caller then replaces that one)."""
    try:
        if _rename_with_flags(staging.path, target, _RENAME_NOREPLACE):
            return True
    except FileExistsError:
        return False
    if os.path.lexists(target):
        return False
    os.rename(staging.path, target)
    return True


def _settle(parent: Path, old: Path | None) -> None:
    """After the new directory is in place: make the rename durable, remove the old one. Failures here
    cannot undo the save, so they are logged."""
    try:
        _fsync_path(parent, directory=True)
        if old is not None:
            shutil.rmtree(old)
    except OSError as exc:
        logger.warning("the new %s is in place, but finishing failed: %s", parent, exc)


@contextlib.contextmanager
def atomic_directory(
    target: str | os.PathLike[str], *, superseded: Callable[[str], bool] | None = None
) -> Iterator[Path]:
    """Yield a staging directory that replaces ``target`` when the block ends without an error.

    The staging directory starts with only the save's owner record (``.qcore-owner``, removed before the
    swap), which the block leaves alone.

    What the block writes becomes the new ``target``. Entries of an existing ``target`` the block did not
    write are kept (hard-linked; directories present on both sides are merged), except those for which
    ``superseded(relative_posix_path)`` is true. On an error, or a kill at any point, ``target`` keeps its
    old content. File-system errors, in the block or in the replace, become :class:`CheckpointWriteError`
    naming the path as the user knows it (inside ``target``, not the staging directory).
    """
    target = _resolve_target(Path(target))
    _make_parent(target.parent, target)
    remove_leftovers(target.parent)
    existed = target.exists()
    try:
        staging = _Staging(target.parent, target.name)
    except OSError as exc:  # the parent refuses a new entry: name the parent, not the staging name
        raise write_error(exc, target.parent, target, existed=existed) from exc
    try:
        try:
            yield staging.path
        except OSError as exc:
            where = _target_path(exc.filename or staging.path, staging.path, target)
            raise write_error(exc, where, target, existed=existed) from exc
        cwd = _cwd_inside(target)
        try:
            _commit(staging, target, superseded)
        except OSError as exc:
            where = _target_path(exc.filename or target, staging.path, target)
            raise write_error(exc, where, target, existed=existed) from exc
        if cwd is not None:  # the working directory was in the old directory, which is gone now
            with contextlib.suppress(OSError):
                os.chdir(target / cwd if (target / cwd).is_dir() else target)
    finally:
        try:
            staging.close()
        except OSError as exc:
            logger.warning("could not remove the staging directory %s: %s", staging.path, exc)
