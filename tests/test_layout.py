"""The test trees' layout. pytest imports a test module by its basename, with its directory put first
on sys.path (the default "prepend" import mode, no __init__.py), so two trees must not hold modules of
the same name: the second would be an "import file mismatch" error, or silently the first one's code."""

from __future__ import annotations

import collections
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TREES = [REPO / "tests", *sorted(REPO.glob("plugins/*/tests")), *sorted(REPO.glob("examples/*/tests"))]


def test_test_trees_are_where_pytest_looks() -> None:
    assert REPO / "plugins" / "bnb" / "tests" in TREES and REPO / "examples" / "qcore-int8" / "tests" in TREES
    assert not (REPO / "tests" / "gpu").exists(), "gpu tests are gpu-marked tests beside what they test"


def test_module_basenames_are_unique_across_test_trees() -> None:
    places = collections.defaultdict(list)
    for tree in TREES:
        for module in tree.glob("*.py"):
            if module.name != "conftest.py":
                places[module.name].append(str(module.relative_to(REPO)))
    clashes = {name: paths for name, paths in places.items() if len(paths) > 1}
    assert not clashes, f"rename one of each: {clashes}"
