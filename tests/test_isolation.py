"""Broken and conflicting backend distributions, really installed next to a working one: every problem
is reported with its distribution's name and never stops the other backends; QCORE_PLUGINS and
QCORE_DISABLE_PLUGIN_AUTOLOAD control discovery."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import envs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> envs.FreshEnv:
    """qcore-int8 plus a distribution for each kind of breakage, all installed from wheels."""
    return envs.cached_env(tmp_path_factory, "plugins", envs.ALL_DISTRIBUTIONS)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, env: envs.FreshEnv) -> Path:
    """A bf16 checkpoint, and copies whose config.json names each installed quant_method."""
    root = tmp_path_factory.mktemp("isolation-ckpts")
    env.run_json(
        f"""
        import json, torch, qcore
        from qcore.testing import ConformanceModel
        torch.manual_seed(0)
        qcore.save_pretrained(ConformanceModel().to(torch.bfloat16), {str(root / "bf16")!r})
        print("{{}}")
        """
    )
    for method in ("broken-import", "bad-hookargs", "unknown-hook", "not-a-backend", "dup"):
        target = root / method
        target.mkdir()
        for f in (root / "bf16").iterdir():
            if f.name != "config.json":  # copies: a weight file linking out of its checkpoint is refused
                shutil.copy(f, target / f.name)
        config = json.loads((root / "bf16" / "config.json").read_text())
        config["quantization_config"] = {"quant_method": method}
        (target / "config.json").write_text(json.dumps(config))
    return root


REPORT = """
import json, sys, qcore
infos = [dict(vars(i)) for i in qcore.available_backends()]
print(json.dumps({"infos": infos}))
"""

TRY_EACH = """
import json, sys, qcore
from qcore.testing import ConformanceModel
root = {root!r}
out = {{}}
for method in {methods!r}:
    try:
        qcore.from_pretrained(ConformanceModel, root + "/" + method)
        out[method] = {{"loaded": True}}
    except Exception as exc:
        out[method] = {{"error": type(exc).__name__, "qcore": isinstance(exc, qcore.QcoreError),
                       "message": str(exc), "distribution": getattr(exc, "distribution", None),
                       "providers": getattr(exc, "providers", None)}}
print(json.dumps(out))
"""

LOAD_INT8 = """
import json, sys, torch, qcore
from qcore.testing import ConformanceModel
model = qcore.from_pretrained(ConformanceModel, {path!r}, quantization_config={{"quant_method": "int8"}})
print(json.dumps({{
    "layer": type(model.proj_in).__name__,
    "imported": sorted(m for m in sys.modules if m.startswith("qcore_")),
}}))
"""


def _by_dist(infos: list[dict]) -> dict[str, dict]:
    return {i["distribution"]: i for i in infos if i["distribution"]}


def test_working_backend_loads_beside_broken_ones(env: envs.FreshEnv, checkpoints: Path) -> None:
    result = env.run_json(LOAD_INT8.format(path=str(checkpoints / "bf16")))
    assert result["layer"] == "Int8Linear"
    # A load imports only the backend it names: the broken distributions are never touched.
    assert result["imported"] == [
        "qcore_int8",
        "qcore_int8._config",
        "qcore_int8._linear",
        "qcore_int8._quantizer",
    ]


def test_available_backends_reports_each_problem_by_distribution(env: envs.FreshEnv) -> None:
    infos = env.run_json(REPORT)["infos"]
    by_dist = _by_dist(infos)
    assert by_dist["qcore-int8"]["status"] == "ok"
    assert by_dist["qcore-int8"]["version"] == "0.1.0"
    assert by_dist["qcore-int8"]["config_class"] == "Int8Config"

    broken = by_dist["qcore-broken-import"]
    assert broken["status"] == "failed"
    assert "'qcore-broken-import'" in broken["error"]
    assert "RuntimeError: qcore_broken_import cannot be imported on purpose" in broken["error"]

    bad_args = by_dist["qcore-bad-hookargs"]
    assert bad_args["status"] == "failed"
    assert "'qcore-bad-hookargs'" in bad_args["error"] and "not_a_spec_argument" in bad_args["error"]
    assert "preprocess_model" in bad_args["error"]

    unknown = by_dist["qcore-unknown-hook"]
    assert unknown["status"] == "failed"
    assert "'qcore-unknown-hook'" in unknown["error"] and "preprocess_modle" in unknown["error"]

    not_backend = by_dist["qcore-not-a-backend"]
    assert not_backend["status"] == "failed" and "not a qcore.Backend" in not_backend["error"]

    # Both claimants of "dup" are listed, each failing with a message naming both.
    for name in ("qcore-dup-a", "qcore-dup-b"):
        assert by_dist[name]["quant_method"] == "dup"
        assert by_dist[name]["status"] == "failed"
        assert "'qcore-dup-a'" in by_dist[name]["error"] and "'qcore-dup-b'" in by_dist[name]["error"]
        assert "QCORE_PLUGINS" in by_dist[name]["error"]


def test_loading_a_broken_backend_raises_a_typed_error(env: envs.FreshEnv, checkpoints: Path) -> None:
    methods = ["broken-import", "bad-hookargs", "unknown-hook", "not-a-backend", "dup"]
    out = env.run_json(TRY_EACH.format(root=str(checkpoints), methods=methods))
    # Never loaded silently unquantized: each checkpoint names a backend that cannot be used.
    assert all("loaded" not in out[m] and out[m]["qcore"] for m in methods), out
    assert out["broken-import"]["error"] == "BackendLoadError"
    assert out["broken-import"]["distribution"] == "qcore-broken-import"
    assert out["bad-hookargs"]["error"] == "BackendValidationError"
    assert "qcore-bad-hookargs" in out["bad-hookargs"]["message"]
    assert out["unknown-hook"]["error"] == "BackendValidationError"
    assert "qcore-unknown-hook" in out["unknown-hook"]["message"]
    assert out["not-a-backend"]["error"] == "BackendLoadError"
    assert out["not-a-backend"]["distribution"] == "qcore-not-a-backend"
    assert out["dup"]["error"] == "DuplicateBackendError"
    assert out["dup"]["providers"] == ["distribution 'qcore-dup-a'", "distribution 'qcore-dup-b'"]


def test_allow_list_picks_one_of_two_claimants(env: envs.FreshEnv, checkpoints: Path) -> None:
    # Distribution names compare normalized: qcore_dup_a is qcore-dup-a.
    allow = {"QCORE_PLUGINS": "int8, qcore_dup_a"}
    infos = env.run_json(REPORT, **allow)["infos"]
    by_dist = _by_dist(infos)
    assert by_dist["qcore-int8"]["status"] == "ok"
    assert by_dist["qcore-dup-a"]["status"] == "ok"
    assert by_dist["qcore-dup-a"]["config_class"] == "DupAConfig"
    for name in ("qcore-dup-b", "qcore-broken-import", "qcore-bad-hookargs", "qcore-unknown-hook"):
        assert by_dist[name]["status"] == "disabled", by_dist[name]
        assert "QCORE_PLUGINS" in by_dist[name]["error"]

    out = env.run_json(TRY_EACH.format(root=str(checkpoints), methods=["dup", "broken-import"]), **allow)
    assert out["dup"] == {"loaded": True}
    # Disabled is not "absent": the error says the backend is installed but not allowed.
    assert out["broken-import"]["error"] == "BackendNotFoundError"
    assert "not in QCORE_PLUGINS" in out["broken-import"]["message"]


def test_allow_list_excludes_unlisted_working_backend(
    env: envs.FreshEnv, checkpoints: Path, tmp_path: Path
) -> None:
    made = tmp_path / "int8"
    env.run_json(
        f"""
        import qcore
        from qcore.testing import ConformanceModel
        m = qcore.from_pretrained(
            ConformanceModel, {str(checkpoints / "bf16")!r}, quantization_config={{"quant_method": "int8"}}
        )
        qcore.save_pretrained(m, {str(made)!r})
        print("{{}}")
        """
    )
    out = env.run_json(TRY_EACH.format(root=str(tmp_path), methods=["int8"]), QCORE_PLUGINS="qcore-dup-a")
    assert out["int8"]["error"] == "BackendNotFoundError"
    assert "QCORE_PLUGINS" in out["int8"]["message"]


def test_disable_autoload(env: envs.FreshEnv, checkpoints: Path) -> None:
    disabled = {"QCORE_DISABLE_PLUGIN_AUTOLOAD": "1"}
    assert env.run_json(REPORT, **disabled)["infos"] == []
    result = env.run_json(
        f"""
        import json, sys, qcore
        from qcore.testing import ConformanceModel
        out = {{}}
        try:
            qcore.from_pretrained(
                ConformanceModel,
                {str(checkpoints / "bf16")!r},
                quantization_config={{"quant_method": "int8"}},
            )
        except qcore.BackendNotFoundError as exc:
            out["error"] = str(exc)
        out["imported"] = sorted(m for m in sys.modules if m.startswith("qcore_"))
        # An explicit registration still works with discovery off.
        import qcore_int8
        qcore.register_backend(qcore_int8.BACKEND)
        model = qcore.from_pretrained(
            ConformanceModel, {str(checkpoints / "bf16")!r}, quantization_config={{"quant_method": "int8"}}
        )
        out["layer"] = type(model.proj_in).__name__
        out["infos"] = [[i.quant_method, i.distribution, i.status] for i in qcore.available_backends()]
        print(json.dumps(out))
        """,
        **disabled,
    )
    assert "QCORE_DISABLE_PLUGIN_AUTOLOAD" in result["error"]
    assert result["imported"] == []
    assert result["layer"] == "Int8Linear"
    assert result["infos"] == [["int8", None, "ok"]]


@pytest.mark.parametrize("value", ["0", "false"])
def test_autoload_stays_on_for_false_values(env: envs.FreshEnv, value: str) -> None:
    infos = env.run_json(REPORT, QCORE_DISABLE_PLUGIN_AUTOLOAD=value)["infos"]
    assert _by_dist(infos)["qcore-int8"]["status"] == "ok"
