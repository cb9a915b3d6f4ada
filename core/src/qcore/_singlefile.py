"""Naming one weight file instead of a checkpoint directory: a local path, a hub file URL, or
``<owner>/<repo>/<file>``."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from ._errors import CheckpointNotFoundError
from ._pluginenv import autoload_disabled

FORMATS_GROUP = "qcore.formats"
# Suffixes always taken for weight files: the built-in formats and those with a known distribution.
WEIGHT_SUFFIXES = ("safetensors", "bin", "gguf")


_HUB_FILE_URL = re.compile(
    r"^https://huggingface\.co/(?P<repo>[^/]+/[^/]+)/(?:blob|resolve)/(?P<rev>[^/]+)/(?P<file>.+)$"
)


def _is_weight_file_name(name: str) -> bool:
    suffix = Path(name).suffix.lstrip(".").lower()
    return suffix in WEIGHT_SUFFIXES or bool(
        suffix and not autoload_disabled() and entry_points(group=FORMATS_GROUP, name=suffix)
    )


def fetch_single_file(path: str, hub_options: Mapping[str, Any]) -> Path | None:
    """The local path of the single weight file ``path`` names, or ``None`` when it names a directory or repo.

    ``path`` is a local file, a hub file URL (``https://huggingface.co/<repo>/blob/<revision>/<file>``) or
    ``<owner>/<repo>/<file>`` with a weight file suffix (``.gguf``, ``.safetensors``, ...); hub files are
    downloaded (or taken from the cache) with huggingface_hub, given ``hub_options`` (its keyword arguments;
    a revision in a file URL wins).
    """
    if os.path.isfile(path):
        return Path(path)
    if os.path.isdir(path):
        return None
    options = dict(hub_options)
    match = _HUB_FILE_URL.match(path)
    if match:
        repo, filename = match["repo"], match["file"]
        options["revision"] = match["rev"]
    else:
        parts = path.split("/")
        if len(parts) < 3 or path.startswith((".", "/")) or not _is_weight_file_name(parts[-1]):
            return None
        repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename, **options))
    except Exception as exc:  # huggingface_hub's errors: not found, gated, offline and not cached
        raise CheckpointNotFoundError(
            f"{path!r}: the hub file {filename!r} of {repo!r} cannot be had ({type(exc).__name__}: {exc})"
        ) from exc
