"""quant_method -> backend: in-process registrations and lazily loaded entry points.

Entry points live in the group ``qcore.backends``; the entry name is the quant_method, the value
points at a :class:`qcore.Backend` (or a callable returning one). A load imports only the backend it
names. ``QCORE_DISABLE_PLUGIN_AUTOLOAD=1`` turns entry-point discovery off; ``QCORE_PLUGINS=a,b``
allows only the named backends (quant_method or distribution name).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Literal

from ._config import QuantizationConfig
from ._errors import (
    BackendError,
    BackendLoadError,
    BackendNotFoundError,
    ConfigError,
    DuplicateBackendError,
)
from ._pluginenv import autoload_disabled, plugin_allowed
from ._plugins import validate_quantizer_class
from ._quantizer import Quantizer

logger = logging.getLogger("qcore")

ENTRY_POINT_GROUP = "qcore.backends"

_INSTALL_HINTS = {
    "bitsandbytes": "pip install qcore-bnb",
    "torchao": "pip install qcore-torchao",
}


@dataclass(frozen=True)
class Backend:
    """A quantization backend: its ``quant_method``, config class and quantizer class.

    A distribution exposes one in its entry point; ``distribution`` and ``version`` are filled in by
    qcore from the installed distribution's metadata.
    """

    quant_method: str
    config_class: type[QuantizationConfig]
    quantizer_class: type[Quantizer]
    distribution: str | None = None
    version: str | None = None


@dataclass(frozen=True)
class BackendInfo:
    """What :func:`qcore.available_backends` knows of one backend."""

    quant_method: str
    distribution: str | None
    version: str | None
    status: Literal["ok", "failed", "disabled"]
    config_class: str | None = None
    error: str | None = None


_registered: dict[str, Backend] = {}
_loaded: dict[str, Backend] = {}


def _distribution_of(ep: EntryPoint) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    return dist.metadata["Name"], dist.version


def _entry_points(name: str | None = None) -> list[EntryPoint]:
    found = entry_points(group=ENTRY_POINT_GROUP, **({"name": name} if name else {}))
    unique: dict[tuple[str, str | None], EntryPoint] = {}
    for ep in found:
        # The same distribution can be visible twice (e.g. a path listed twice on sys.path).
        unique.setdefault((ep.name, _distribution_of(ep)[0]), ep)
    return list(unique.values())


def _load_entry_point(ep: EntryPoint) -> Backend:
    distribution, version = _distribution_of(ep)
    try:
        obj: Any = ep.load()
        if not isinstance(obj, Backend) and callable(obj):
            obj = obj()
    except Exception as exc:  # any import-time failure of a third-party package
        raise BackendLoadError(ep.name, distribution, f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, Backend):
        raise BackendLoadError(
            ep.name, distribution, f"entry point {ep.value!r} gives {obj!r}, not a qcore.Backend"
        )
    if obj.quant_method != ep.name:
        raise BackendLoadError(
            ep.name,
            distribution,
            f"entry point is named {ep.name!r} but its Backend says quant_method={obj.quant_method!r}",
        )
    _check_backend(obj, distribution)
    return replace(obj, distribution=distribution, version=version)


def _check_backend(backend: Backend, distribution: str | None) -> None:
    cfg = backend.config_class
    if not (isinstance(cfg, type) and issubclass(cfg, QuantizationConfig)):
        raise BackendLoadError(backend.quant_method, distribution, f"{cfg!r} is not a QuantizationConfig")
    if cfg.quant_method != backend.quant_method:
        raise BackendLoadError(
            backend.quant_method,
            distribution,
            f"{cfg.__name__}.quant_method is {cfg.quant_method!r}, expected {backend.quant_method!r}",
        )
    validate_quantizer_class(backend.quantizer_class, backend.quant_method, distribution)


# PEP 508 distribution names: only such a name may be turned into a command for the user to run.
_DISTRIBUTION_NAME = re.compile(r"^([A-Z0-9]|[A-Z0-9][A-Z0-9._-]*[A-Z0-9])$", re.IGNORECASE)


def install_command(quant_method: str) -> str | None:
    """``pip install qcore-<name>`` for a quant_method that can be a distribution name, else None.

    quant_method comes from untrusted checkpoints: ``x; curl ... | sh`` must never become a hint.
    """
    if quant_method in _INSTALL_HINTS:
        return _INSTALL_HINTS[quant_method]
    if not _DISTRIBUTION_NAME.match(quant_method):
        return None
    return f"pip install qcore-{quant_method}"


def install_hint(quant_method: str) -> str:
    command = install_command(quant_method)
    if command is None:
        return (
            "no backend can provide it, as it is not a valid distribution name; the checkpoint's "
            "quantization_config is corrupt or not meant for qcore"
        )
    if quant_method in _INSTALL_HINTS:
        return command
    return (
        f"{command} (or any distribution with an entry point named {quant_method!r} in the group "
        f"{ENTRY_POINT_GROUP!r})"
    )


def get_backend(quant_method: str) -> Backend:
    """The backend for ``quant_method``, importing its distribution on first use."""
    if quant_method in _registered:
        return _registered[quant_method]
    # A backend loaded earlier in the process obeys the discovery settings in force now.
    cached = _loaded.get(quant_method)
    if cached is not None and not autoload_disabled() and plugin_allowed(quant_method, cached.distribution):
        return cached
    hint = install_hint(quant_method)
    if autoload_disabled():
        raise BackendNotFoundError(
            quant_method,
            f"{hint}; note that QCORE_DISABLE_PLUGIN_AUTOLOAD is set, so installed backends are "
            "not discovered (register one with qcore.register_backend)",
            _registered,
        )
    candidates = _entry_points(quant_method)
    allowed = [ep for ep in candidates if plugin_allowed(quant_method, _distribution_of(ep)[0])]
    if not allowed:
        if candidates:
            hint = f"it is installed but not in QCORE_PLUGINS={os.environ.get('QCORE_PLUGINS')!r}"
        raise BackendNotFoundError(quant_method, hint, known_backend_names())
    if len(allowed) > 1:
        raise DuplicateBackendError(
            quant_method, [f"distribution {_distribution_of(ep)[0]!r}" for ep in allowed]
        )
    backend = _load_entry_point(allowed[0])
    _loaded[quant_method] = backend
    logger.debug("loaded backend %r from %s %s", quant_method, backend.distribution, backend.version)
    return backend


def known_backend_names() -> set[str]:
    """The quant_methods a load could use now: registered in-process, or installed and allowed."""
    names = set(_registered)
    if not autoload_disabled():
        names.update(ep.name for ep in _entry_points() if plugin_allowed(ep.name, _distribution_of(ep)[0]))
    return names


def register_backend(backend: Backend) -> Backend:
    """Register a backend in this process (no distribution needed), e.g. in tests or notebooks.

    Raises :class:`qcore.DuplicateBackendError` when the quant_method is taken, in-process or by an
    installed distribution, and :class:`qcore.BackendValidationError` when the hooks are invalid.
    """
    where = f"in-process registration from {backend.quantizer_class.__module__}"
    taken = _registered.get(backend.quant_method)
    if taken is not None:
        raise DuplicateBackendError(
            backend.quant_method, [f"in-process registration from {taken.quantizer_class.__module__}", where]
        )
    if not autoload_disabled():
        installed = [_distribution_of(ep)[0] for ep in _entry_points(backend.quant_method)]
        if installed:
            raise DuplicateBackendError(
                backend.quant_method, [*(f"distribution {d!r}" for d in installed), where]
            )
    _check_backend(backend, None)
    _registered[backend.quant_method] = backend
    return backend


def unregister_backend(quant_method: str) -> None:
    """Remove an in-process registration (a no-op for names that are not registered)."""
    _registered.pop(quant_method, None)


def available_backends() -> list[BackendInfo]:
    """Every backend registered or installed, each loaded to report its status.

    A quant_method claimed by several distributions has one entry per distribution.
    """
    infos = [
        BackendInfo(name, None, None, "ok", backend.config_class.__qualname__)
        for name, backend in _registered.items()
    ]
    eps = [] if autoload_disabled() else [ep for ep in _entry_points() if ep.name not in _registered]
    for ep in eps:
        dist, version = _distribution_of(ep)
        if not plugin_allowed(ep.name, dist):
            reason = f"not in QCORE_PLUGINS={os.environ.get('QCORE_PLUGINS')!r}"
            infos.append(BackendInfo(ep.name, dist, version, "disabled", error=reason))
            continue
        try:
            backend = get_backend(ep.name)
        except BackendError as exc:
            infos.append(BackendInfo(ep.name, dist, version, "failed", error=str(exc)))
        else:
            infos.append(
                BackendInfo(
                    ep.name, backend.distribution, backend.version, "ok", backend.config_class.__qualname__
                )
            )
    return sorted(infos, key=lambda info: (info.quant_method, info.distribution or ""))


def quant_method_of(config: Mapping[str, Any]) -> str | None:
    """A quantization_config's quant_method, including transformers-era bitsandbytes configs that
    carry load_in_4bit/8bit but no quant_method."""
    if config.get("quant_method"):
        return str(config["quant_method"])
    if any(config.get(k) for k in ("load_in_4bit", "load_in_8bit", "_load_in_4bit", "_load_in_8bit")):
        return "bitsandbytes"
    return None


def resolve_config(
    config: QuantizationConfig | Mapping[str, Any], *, checkpoint: str | None = None
) -> tuple[QuantizationConfig, Backend]:
    """A config instance and its backend, from an instance or a dict carrying ``quant_method``.

    A dict from a checkpoint (``checkpoint`` names its config.json) may carry keys other writers add;
    a user's dict is as strict as the config's constructor.
    """
    if isinstance(config, QuantizationConfig):
        backend = get_backend(config.quant_method)
        if not isinstance(config, backend.config_class):
            raise ConfigError(
                f"quantization_config is a {type(config).__qualname__}, but the backend for "
                f"{config.quant_method!r} expects {backend.config_class.__qualname__}",
                option="quantization_config",
            )
        return config, backend
    if isinstance(config, Mapping):
        if checkpoint is None:
            return _resolve_dict(config, None)
        try:
            return _resolve_dict(config, checkpoint)
        except (BackendNotFoundError, ConfigError) as exc:
            # The checkpoint's config.json is at fault (or names a backend to install): say which one.
            if len(exc.args) == 1 and not str(exc).startswith(checkpoint):
                exc.args = (f"{checkpoint}: {exc}",)
            raise
    raise ConfigError(
        f"quantization_config must be a qcore.QuantizationConfig or a dict, not {type(config).__name__}",
        option="quantization_config",
    )


def _resolve_dict(config: Mapping[str, Any], checkpoint: str | None) -> tuple[QuantizationConfig, Backend]:
    quant_method = quant_method_of(config)
    if not quant_method:
        raise ConfigError(
            f"quantization_config {dict(config)!r} has no 'quant_method'", option="quant_method"
        )
    backend = get_backend(str(quant_method))
    data = {k: v for k, v in config.items() if k != "quant_method"}
    data["quant_method"] = quant_method
    if checkpoint is not None:
        return backend.config_class.from_checkpoint_dict(data, checkpoint), backend
    return backend.config_class.from_user_dict(data), backend
