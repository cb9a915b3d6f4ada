"""Shared by the converters: the prefixes single files put before a transformer's keys, and block counts."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import qcore

PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def strip_prefix(tensors: Mapping[str, qcore.TensorInfo]) -> tuple[str, dict[str, qcore.TensorInfo]]:
    """The prefix the file's keys carry (ComfyUI and original checkpoints) and the tensors without it."""
    for prefix in PREFIXES:
        if any(key.startswith(prefix) for key in tensors):
            return prefix, {key.removeprefix(prefix): info for key, info in tensors.items()}
    return "", dict(tensors)


def count_blocks(keys: Mapping[str, Any], block: str) -> int:
    """How many ``<block>.<i>.`` entries the keys number (highest index + 1)."""
    found = {int(m.group(1)) for key in keys if (m := re.match(rf"{block}\.(\d+)\.", key))}
    return max(found) + 1 if found else 0


def block_indices(keys: Mapping[str, Any], block: str, part: str) -> list[int]:
    """The indices ``i`` for which some key starts with ``<block>.<i>.<part>``."""
    pattern = re.compile(rf"{block}\.(\d+)\.{re.escape(part)}")
    return sorted({int(m.group(1)) for key in keys if (m := pattern.match(key))})
