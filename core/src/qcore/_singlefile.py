"""Naming one weight file instead of a checkpoint directory: a local path, a hub file URL, or
``<owner>/<repo>/<file>``."""

from __future__ import annotations

import os
import re
from importlib.metadata import entry_points
from pathlib import Path

from ._errors import CheckpointNotFoundError

FORMATS_GROUP = "qcore.formats"
# Suffixes always taken for weight files: the built-in formats and those with a known distribution.
WEIGHT_SUFFIXES = ("safetensors", "bin", "gguf")


def _autoload_disabled() -> bool:
    return os.environ.get("QCORE_DISABLE_PLUGIN_AUTOLOAD", "").strip().lower() not in ("", "0", "false")


_HUB_FILE_URL = re.compile(
    r"^https://huggingface\.co/(?P<repo>[^/]+/[^/]+)/(?:blob|resolve)/(?P<rev>[^/]+)/(?P<file>.+)$"
)


def _is_weight_file_name(name: str) -> bool:
    suffix = Path(name).suffix.lstrip(".").lower()
    return suffix in WEIGHT_SUFFIXES or bool(
        suffix and not _autoload_disabled() and entry_points(group=FORMATS_GROUP, name=suffix)
    )


def fetch_single_file(
    path: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path | None:
    """The local path of the single weight file ``path`` names, or ``None`` when it names a directory or repo.

    ``path`` is a local file, a hub file URL (``https://huggingface.co/<repo>/blob/<revision>/<file>``) or
    ``<owner>/<repo>/<file>`` with a weight file suffix (``.gguf``, ``.safetensors``, ...); hub files are
    downloaded (or taken from the cache) with huggingface_hub.
    """
    if os.path.isfile(path):
        return Path(path)
    if os.path.isdir(path):
        return None
    match = _HUB_FILE_URL.match(path)
    if match:
        repo, filename, revision = match["repo"], match["file"], match["rev"]
    else:
        parts = path.split("/")
        if len(parts) < 3 or path.startswith((".", "/")) or not _is_weight_file_name(parts[-1]):
            return None
        repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    from huggingface_hub import hf_hub_download

    try:
        return Path(
            hf_hub_download(
                repo,
                filename,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                token=token,
            )
        )
    except Exception as exc:  # huggingface_hub's errors: not found, gated, offline and not cached
        raise CheckpointNotFoundError(
            f"{path!r}: the hub file {filename!r} of {repo!r} cannot be had ({type(exc).__name__}: {exc})"
        ) from exc
