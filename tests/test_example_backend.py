"""The example external backend qcore-int8: built as a wheel, installed into a fresh environment next
to qcore, found by quant_method without being imported by the user; plus its own behaviour."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from helpers import envs

# --- installed from its own wheel into a fresh environment -------------------------------------------


@pytest.fixture(scope="module")
def example_env(tmp_path_factory: pytest.TempPathFactory) -> envs.FreshEnv:
    return envs.cached_env(tmp_path_factory, "example", ["qcore-int8"])


QUANTIZE_AND_SAVE = """
import json, sys, torch, qcore
from qcore.testing import ConformanceModel
ref, out = {ref!r}, {out!r}
torch.manual_seed(0)
qcore.save_pretrained(ConformanceModel().to(torch.bfloat16), ref)
assert "qcore_int8" not in sys.modules
# The user names the method in a plain dict: no import of the plugin anywhere.
model = qcore.from_pretrained(ConformanceModel, ref, quantization_config={{"quant_method": "int8"}})
qcore.save_pretrained(model, out)
x = torch.randn(2, 128, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
torch.save(model(x), out + "/expected.pt")
print(json.dumps({{"layer": type(model.proj_in).__module__ + "." + type(model.proj_in).__name__}}))
"""

LOAD_BY_QUANT_METHOD = """
import json, sys, torch, qcore
from importlib.metadata import distribution
from qcore.testing import ConformanceModel
path = {path!r}
before = "qcore_int8" in sys.modules
model = qcore.from_pretrained(ConformanceModel, path)
x = torch.randn(2, 128, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
import qcore_int8
info = [b for b in qcore.available_backends() if b.quant_method == "int8"][0]
print(json.dumps({{
    "imported_before_load": before,
    "module_file": qcore_int8.__file__,
    "dist_files": str(distribution("qcore-int8").locate_file("")),
    "quantizer": type(model.hf_quantizer).__module__ + "." + type(model.hf_quantizer).__name__,
    "pre_quantized": model.hf_quantizer.pre_quantized,
    "weight_dtype": str(model.proj_in.weight.dtype),
    "same_output": bool(torch.equal(model(x), torch.load(path + "/expected.pt"))),
    "info": [info.distribution, info.version, info.status, info.config_class],
}}))
"""


@pytest.mark.slow
def test_wheel_installs_and_loads_checkpoint_by_quant_method(
    example_env: envs.FreshEnv, tmp_path: Path
) -> None:
    ref, out = str(tmp_path / "ref"), str(tmp_path / "int8")
    made = example_env.run_json(QUANTIZE_AND_SAVE.format(ref=ref, out=out))
    assert made["layer"] == "qcore_int8._linear.Int8Linear"
    config = json.loads((tmp_path / "int8" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "int8"

    # A new interpreter that has never seen the plugin reads the checkpoint.
    loaded = example_env.run_json(LOAD_BY_QUANT_METHOD.format(path=out))
    assert loaded["imported_before_load"] is False
    site = str(example_env.site_packages)
    assert loaded["module_file"].startswith(site), "qcore_int8 was not imported from the fresh environment"
    assert loaded["dist_files"].startswith(site)
    assert loaded["quantizer"] == "qcore_int8._quantizer.Int8Quantizer"
    assert loaded["pre_quantized"] is True
    assert loaded["weight_dtype"] == "torch.int8"
    assert loaded["same_output"] is True
    assert loaded["info"] == ["qcore-int8", "0.1.0", "ok", "Int8Config"]


@pytest.mark.slow
def test_conformance_suite_passes_in_fresh_environment(example_env: envs.FreshEnv, tmp_path: Path) -> None:
    """The conformance kit, run the way a backend author runs it, against the wheel-installed backend."""
    result = example_env.run(
        f"""
        import sys, pytest
        basetemp = {str(tmp_path / "bt")!r}
        sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-m", "not gpu", "--basetemp", basetemp,
                              "examples/qcore-int8/tests/test_int8_conformance.py"]))
        """,
        cwd=envs.REPO,
    )
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed and int(passed.group(1)) >= 40, result.stdout[-2000:]
    assert "skipped" not in result.stdout and "failed" not in result.stdout, result.stdout[-2000:]
