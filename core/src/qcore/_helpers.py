"""Small helpers every backend needs: parameter names, device maps, versions, quieter imports."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ._errors import CorruptCheckpointError

if TYPE_CHECKING:
    from torch import nn

# The device_map strings that ask accelerate to place modules itself.
AUTO_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def split_param_name(param_name: str) -> tuple[str, str]:
    """``"blocks.0.proj.weight"`` -> ``("blocks.0.proj", "weight")``; a top-level name: ``("", name)``."""
    module_name, _, tensor_name = param_name.rpartition(".")
    return module_name, tensor_name


def get_module_for_param(model: nn.Module, param_name: str) -> tuple[nn.Module, str]:
    """The module that holds ``param_name`` and the tensor's name inside it.

    Raises ``AttributeError`` (from ``nn.Module.get_submodule``) when the model has no such module.
    """
    module_name, tensor_name = split_param_name(param_name)
    return (model.get_submodule(module_name) if module_name else model), tensor_name


def device_types(device_map: Any) -> set[str]:
    """The device types (``"cpu"``, ``"cuda"``, ``"disk"``, ...) a ``device_map`` puts weights on.

    Takes every form ``qcore.from_pretrained`` accepts: ``None`` (the CPU), a device, a device string
    or index, one of the automatic strings (``"auto"``, ...: CUDA when available, else the CPU) or a
    mapping of module names to any of these. A value that is no device adds nothing; the loader
    reports it.
    """
    if device_map is None:
        return {"cpu"}
    if isinstance(device_map, Mapping):
        return {kind for value in device_map.values() for kind in device_types(value)}
    if isinstance(device_map, str) and device_map in AUTO_DEVICE_MAPS:
        import torch

        return {"cuda"} if torch.cuda.is_available() else {"cpu"}
    if device_map == "disk":
        return {"disk"}
    if isinstance(device_map, bool):
        return set()
    if isinstance(device_map, int):
        return {"cuda"}
    import torch

    try:
        return {torch.device(device_map).type}
    except (RuntimeError, TypeError, ValueError):
        return set()


def release_of(version: str) -> tuple[int, ...] | None:
    """The release number of a version string (``"5.23.0.dev0"`` and ``"5.23.0+cu121"`` are 5.23.0);
    None for one that does not parse."""
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version).release
    except InvalidVersion:
        return None


def version_at_least(installed: str, minimum: str) -> bool:
    """Whether ``installed`` (a package's ``__version__``) is at least ``minimum``, by release number.

    Pre-release and local parts are ignored (``"0.45.0.dev0"`` and ``"0.45.0+cu121"`` are 0.45.0), so a
    development build of a release counts as that release. A version that does not parse (some source
    builds say ``"unknown"``) counts as new enough: the package imported, and its features decide.
    """
    from packaging.version import Version

    found = release_of(installed)
    if found is None:
        return True
    needed = Version(minimum).release
    width = max(len(found), len(needed))
    return found + (0,) * (width - len(found)) >= needed + (0,) * (width - len(needed))


class _Reroute(logging.Filter):
    """Drops matching records from a third-party logger and re-logs them on ``target`` at ``level``."""

    def __init__(self, patterns: Iterable[str], target: logging.Logger, level: int) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))
        self.target = target
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record whose arguments do not format is not ours to judge
            return True
        if not self.pattern.search(message):
            return True
        if self.target.isEnabledFor(self.level):
            self.target.log(self.level, "%s: %s", record.name, message)
        return False


def reroute_log_messages(
    source: str, patterns: Iterable[str], target: logging.Logger, level: int = logging.DEBUG
) -> None:
    """Move messages matching ``patterns`` from the ``source`` logger to ``target`` at ``level``.

    For the warnings third-party packages log while they import (optional kernels that are not
    installed, ...): a user who did not ask for them does not see them, and ``qcore --debug`` (or
    ``logging.getLogger("qcore").setLevel(logging.DEBUG)``) shows them under the backend's logger.
    Only messages matching a pattern (``re.search``) move; others from ``source`` are untouched. Call
    it before the package is imported. Calling it again for the same source and target does nothing.
    """
    logger = logging.getLogger(source)
    for existing in logger.filters:
        if isinstance(existing, _Reroute) and existing.target is target:
            return
    logger.addFilter(_Reroute(patterns, target, level))


class BatchedChecks:
    """Validity checks of loaded tensors, evaluated together: one synchronisation per device.

    A backend computes each check as a 0-d boolean tensor on the tensor's own device (for example
    ``torch.isfinite(absmax).all()``) and :meth:`require`\\ s it with the checkpoint key it is about.
    Reading each result at once would wait for the GPU every time; :meth:`verify` reads them all at
    once, typically in ``postprocess_model``, and raises :class:`qcore.CorruptCheckpointError` naming
    every key that failed. Checks of CPU tensors cost nothing to read, so a backend may verify those
    as it goes.
    """

    def __init__(self) -> None:
        self._flags: dict[Any, list[Any]] = {}
        self._labels: dict[Any, list[tuple[str, str]]] = {}

    def require(self, ok: Any, key: str, problem: str) -> None:
        """Record ``ok`` (a 0-d boolean tensor); when it is False, ``key`` ``problem`` is reported."""
        self._flags.setdefault(ok.device, []).append(ok.reshape(()))
        self._labels.setdefault(ok.device, []).append((key, problem))

    def __len__(self) -> int:
        return sum(len(flags) for flags in self._flags.values())

    def verify(self, advice: str = "") -> None:
        """Raise :class:`qcore.CorruptCheckpointError` if any recorded check failed; then forget them."""
        import torch

        flags, labels = self._flags, self._labels
        self._flags, self._labels = {}, {}
        failed: list[tuple[str, str]] = []
        for device, device_flags in flags.items():
            passed = torch.stack(device_flags)
            if bool(passed.all()):
                continue
            failed += [labels[device][i] for i in (~passed).nonzero().flatten().tolist()]
        if failed:
            shown = "; ".join(f"{key!r} {problem}" for key, problem in failed[:5])
            more = f" (and {len(failed) - 5} more)" if len(failed) > 5 else ""
            raise CorruptCheckpointError(f"{shown}{more}. {advice}".strip())
