"""The capability checks themselves: they report what fails, at which stage, and a fault is never a pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import qcore
from qcore.testing import (
    CAPABILITIES,
    BackendCapabilities,
    CapabilityResult,
    ConformanceModel,
    capability_matrix,
)

qcore_int8 = pytest.importorskip(
    "qcore_int8", reason="qcore-int8 is not installed (pip install ./examples/qcore-int8)"
)


class GraphBreakModel(ConformanceModel):
    """The kit's model with a graph break in its forward, as a backend's kernel call can cause."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x)
        torch._dynamo.graph_break()
        for block in self.blocks:
            x = block(x)
        return self.proj_out(self.norm_out(x))


class Int8Suite(BackendCapabilities):
    config_class = qcore_int8.Int8Config


class GraphBreakSuite(Int8Suite):
    model_class = GraphBreakModel


def _run(suite_class: type[BackendCapabilities], capability: str, tmp_path: Path) -> CapabilityResult:
    suite = suite_class()
    reference = suite.make_model()
    qcore.save_pretrained(reference, tmp_path / "reference")
    return suite.run_check(capability, tmp_path / "reference", reference, suite.make_inputs(reference))


def test_a_graph_break_fails_compile(tmp_path: Path) -> None:
    assert _run(Int8Suite, "compile", tmp_path).ok
    result = _run(GraphBreakSuite, "compile", tmp_path)
    assert not result.ok and result.stage == "compile (fullgraph)"
    assert result.cell().startswith("no (compile (fullgraph): ")


def test_peft_refusing_the_layer_fails_lora_at_its_stage(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    result = _run(Int8Suite, "lora", tmp_path)
    assert not result.ok
    assert (result.stage, result.error) == ("peft wraps the layer", "ValueError")
    assert "Int8Linear" in result.message


def test_unknown_capability_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown capability 'lora_v2'"):
        _run(Int8Suite, "lora_v2", tmp_path)


def test_matrix_has_a_row_per_suite_and_a_column_per_capability(tmp_path: Path) -> None:
    table = capability_matrix([("int8", Int8Suite), ("int8 with a graph break", GraphBreakSuite)], tmp_path)
    header, rule, *rows = table.splitlines()
    assert header.count("|") == len(CAPABILITIES) + 2 and len(rows) == 2
    compile_column = CAPABILITIES.index("compile") + 2
    assert rows[0].split("|")[compile_column].strip() == "yes"
    assert rows[1].split("|")[compile_column].strip().startswith("no (compile (fullgraph)")
