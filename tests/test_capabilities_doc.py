"""docs/capabilities.md's matrix is what the kit's capability checks find now, on every backend's suite.

The suites are the backends' own capability test classes (plugins/*/tests, examples/qcore-int8/tests); this
test runs every check of each (not their declarations) and compares the table with the one in the doc.
Regenerate the table with ``QCORE_REGENERATE_DOCS=1 pytest tests/test_capabilities_doc.py``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from qcore.testing import BackendCapabilities, capability_matrix

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "capabilities.md"
BEGIN, END = "<!-- capability-matrix:begin -->\n", "<!-- capability-matrix:end -->\n"

# (row label, test file, suite class)
ROWS = [
    ("qcore-bnb, NF4", "plugins/bnb/tests/test_bnb_capabilities.py", "TestBnbNF4Capabilities"),
    ("qcore-bnb, LLM.int8", "plugins/bnb/tests/test_bnb_capabilities.py", "TestBnbInt8Capabilities"),
    (
        "qcore-torchao, int8wo",
        "plugins/torchao/tests/test_torchao_capabilities.py",
        "TestTorchAoInt8WeightOnlyCapabilities",
    ),
    (
        "qcore-torchao, float8wo",
        "plugins/torchao/tests/test_torchao_capabilities.py",
        "TestTorchAoFloat8WeightOnlyCapabilities",
    ),
    ("qcore-gguf, Q8_0", "plugins/gguf/tests/test_gguf_capabilities.py", "TestGGUFQ8Capabilities"),
    ("qcore-int8 (example)", "examples/qcore-int8/tests/test_int8_capabilities.py", "TestInt8Capabilities"),
]


def _suite(path: str, name: str) -> type[BackendCapabilities]:
    module_name = "capabilities_" + Path(path).stem
    spec = importlib.util.spec_from_file_location(module_name, ROOT / path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def test_capability_matrix_matches_the_kit(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    pytest.importorskip("diffusers")
    for module in ("qcore_bnb", "qcore_torchao", "qcore_gguf", "qcore_int8"):
        pytest.importorskip(module)
    table = capability_matrix([(label, _suite(path, name)) for label, path, name in ROWS], tmp_path)
    text = DOC.read_text()
    assert BEGIN in text and END in text, f"{DOC} lacks the {BEGIN.strip()} / {END.strip()} markers"
    head, rest = text.split(BEGIN, 1)
    documented, tail = rest.split(END, 1)
    if os.environ.get("QCORE_REGENERATE_DOCS") == "1":
        DOC.write_text(head + BEGIN + table + END + tail)
        return
    assert documented == table, (
        "docs/capabilities.md disagrees with the kit's results; regenerate it with "
        f"QCORE_REGENERATE_DOCS=1 pytest tests/test_capabilities_doc.py\nthe kit found:\n{table}"
    )


def test_declarations_match_the_documented_matrix() -> None:
    """Each suite's ``supports`` is what the doc's row says works (its own test checks it against the kit)."""
    text = DOC.read_text()
    rows = {
        line.split("|")[1].strip(): line for line in text.split(BEGIN, 1)[1].split(END, 1)[0].splitlines()[2:]
    }
    from qcore.testing import CAPABILITIES

    for label, path, name in ROWS:
        try:
            suite = _suite(path, name)
        except pytest.skip.Exception:
            continue
        cells = [cell.strip() for cell in rows[label].split("|")[2:-1]]
        works = {c for c, cell in zip(CAPABILITIES, cells, strict=True) if cell.startswith("yes")}
        assert works == set(suite.supports), (
            f"{label}: doc says {sorted(works)}, supports = {sorted(suite.supports)}"
        )
