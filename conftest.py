"""pytest configuration shared by every test tree of the repository: tests/ (core), plugins/*/tests/ and
examples/qcore-int8/tests/. tests/ is on sys.path (pyproject.toml's ``pythonpath``), so the shared helpers
import as ``helpers``.
"""

from __future__ import annotations

import pytest
import torch

pytest_plugins = ["helpers.fixtures"]

_NO_CUDA = pytest.mark.skip(reason="gpu test: torch.cuda.is_available() is False on this machine")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The one way to mark a GPU test is ``@pytest.mark.gpu``; without CUDA it is skipped with a reason."""
    if torch.cuda.is_available():
        return
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(_NO_CUDA)
