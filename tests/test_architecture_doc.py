"""docs/architecture.md lists every module of the qcore package, and the entry-point groups it reads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import qcore

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "core" / "src" / "qcore"
ARCHITECTURE = REPO / "docs" / "architecture.md"


def module_list() -> str:
    """The fenced block of docs/architecture.md that starts with ``core/src/qcore/``."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    for block in re.findall(r"^```\w*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL):
        if block.startswith("core/src/qcore/"):
            return block
    raise AssertionError("docs/architecture.md has no module list (a block starting with core/src/qcore/)")


def listed(block: str) -> list[str]:
    """The module paths of the list, relative to the package: ``testing/`` opens an indented sub-list."""
    names, folder = [], ""
    for line in block.splitlines()[1:]:
        match = re.match(r"^( +)(\S+)", line)
        if not match or not re.fullmatch(r"[\w.]+/?", match.group(2)):
            continue  # a description's continuation line
        indent, name = len(match.group(1)), match.group(2)
        if name.endswith("/"):
            folder = name
        elif name.endswith(".py"):
            names.append(folder + name if indent > 2 and folder else name)
            if indent <= 2:
                folder = ""
    return names


def package_modules() -> list[str]:
    return sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py"))


def test_every_module_of_the_package_is_in_the_architecture_doc() -> None:
    missing = sorted(set(package_modules()) - set(listed(module_list())))
    assert not missing, f"docs/architecture.md does not list {missing}: add one line each saying what it does"


def test_the_module_list_names_only_modules_that_exist() -> None:
    stale = sorted(set(listed(module_list())) - set(package_modules()))
    assert not stale, f"docs/architecture.md lists modules that are not in core/src/qcore: {stale}"


def test_module_list_reader() -> None:
    block = "core/src/qcore/\n  a.py   one\n         more words\n  testing/  kit\n    b.py  two\n"
    block += "  c.py  three\n"
    assert listed(block) == ["a.py", "testing/b.py", "c.py"]


@pytest.mark.parametrize("constant", ["ENTRY_POINT_GROUP", "FORMATS_GROUP", "CONVERTERS_GROUP"])
def test_every_entry_point_group_qcore_reads_is_documented(constant: str) -> None:
    group = getattr(qcore, constant)
    assert f"`{group}`" in ARCHITECTURE.read_text(encoding="utf-8"), f"docs/architecture.md omits {group}"
