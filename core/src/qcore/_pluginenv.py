"""The environment variables that govern plugin discovery, read one way for backends, formats and
converters: ``QCORE_DISABLE_PLUGIN_AUTOLOAD=1`` turns entry-point discovery off; ``QCORE_PLUGINS=a,b``
allows only the named plugins (entry-point name or distribution name)."""

from __future__ import annotations

import os
import re


def autoload_disabled() -> bool:
    return os.environ.get("QCORE_DISABLE_PLUGIN_AUTOLOAD", "").strip().lower() not in ("", "0", "false")


def allow_list() -> set[str] | None:
    """The names in ``QCORE_PLUGINS``, or ``None`` when it is not set (everything is allowed)."""
    raw = os.environ.get("QCORE_PLUGINS")
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def normalized(name: str) -> str:
    # Distribution names compare as packaging does: "qcore_bnb", "qcore.bnb" and "QCore-BNB" are one name.
    return re.sub(r"[-_.]+", "-", name).lower()


def plugin_allowed(name: str, distribution: str | None) -> bool:
    """Whether ``QCORE_PLUGINS`` allows the plugin ``name`` from ``distribution``."""
    allow = allow_list()
    if allow is None or name in allow:
        return True
    return distribution is not None and normalized(distribution) in {normalized(a) for a in allow}
